"""``reweight-audit bench --train``: one training step (forward + backward) of the reweighted loss, side by side.

A tiny Llama body (2 layers, hidden 64) under a large vocabulary, so the head dominates; batch 2 of T
tokens, every position but the first supervised. Variants:

* ``hf`` — the model's own loss (full [B, T, V] logits, cross-entropy);
* ``reweighted-loss`` — ``training.ReweightedLoss("ranktuner-approx")`` on the full logits;
* ``trl-dft`` — TRL's fused head (``add_fused_lm_head``) with SFTTrainer's DFT loss;
* ``fused-<method>`` — ``training.patch(model, method)`` (dft, ranktuner-approx, eaft), the backend chosen
  as training chooses it; ``fused-dft-ours`` forces our own chunked function (on CUDA ``auto`` takes TRL's
  Triton tiles for dft: the pair shows which is faster).

Each variant runs in a fresh subprocess (``python -m reweight_audit.bench.train``), so its peak is its
own: on CUDA ``max_memory_allocated``, on Linux CPUs VmHWM reset after the model is built (both above
the memory held then). Its memory is estimated first and a variant that would not fit is skipped with
the reason. Time: the best of ``repeats`` steps after one warm-up step. The ratio lines compare the
variants against the targets of issue 21.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, Sequence

from reweight_audit.bench import _peak_above, _reset_peak, available_bytes
from reweight_audit.core.errors import AuditError

VARIANTS = ("hf", "reweighted-loss", "trl-dft", "fused-dft", "fused-dft-ours", "fused-ranktuner-approx", "fused-eaft")
VOCABS = (151_936, 262_144)
SEQ_LEN = 4096
FLAT_SEQ_LENS = (1024, 8192)  # fused-ranktuner-approx only: is the fused peak flat in T?
FLAT_VARIANT = "fused-ranktuner-approx"
#: The body alone (forward to the last hidden states, backward of their mean): what every loss pays for the
#: activations at length T. The fused peak minus this one is the loss's own, which the flatness line reads.
BODY = "body"
BATCH = 2
HEADROOM = 0.92  # share of the available memory a variant may take (each runs alone, in its own process)

__all__ = ["FLAT_SEQ_LENS", "SEQ_LEN", "VARIANTS", "VOCABS", "estimate_bytes", "ratio_lines", "run_train_bench"]


def estimate_bytes(variant: str, vocab: int, seq_len: int, batch: int = BATCH, hidden: int = 64) -> int:
    """Estimate of one step's peak above the model: full-logit variants hold about four fp32 [B, T, V] blocks
    (logits, log-softmax, gradients; issue 21 measured 4.05x for HF's loss and 3.3x for ReweightedLoss at
    V = 151,936, T = 4,096), the fused ones a few head chunks, the head's gradient and the activations."""
    logits = batch * seq_len * vocab * 4
    weight = vocab * hidden * 4
    activations = batch * seq_len * hidden * 4 * 64 + batch * 4 * seq_len * seq_len * 4
    if variant == BODY:
        return weight + activations
    if variant in ("hf", "reweighted-loss"):
        return int((4.05 if variant == "hf" else 3.4) * logits) + 3 * weight + activations
    chunks = 6 * (1 << 27 if variant == "trl-dft" else 1 << 25) * 4
    return chunks + 3 * weight + activations


def _build(vocab: int, seq_len: int, device: str, dtype: str) -> tuple[Any, Any, Any]:
    """The tiny Llama from a config and one batch (ids, labels: all but the first position supervised)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from reweight_audit.core.models import resolve_dtype

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(seq_len, 2048))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(resolve_dtype(dtype, device)).train()
    ids = torch.randint(0, vocab, (BATCH, seq_len), device=device)
    labels = ids.clone()
    labels[:, 0] = -100
    return model, ids, labels


def _step_fn(variant: str, model: Any, ids: Any, labels: Any) -> Any:
    """A callable running one forward + backward of ``variant``."""
    if variant == BODY:
        return lambda: model.model(input_ids=ids).last_hidden_state.float().mean().backward()
    if variant == "hf":
        return lambda: model(input_ids=ids, labels=labels).loss.backward()
    if variant == "reweighted-loss":
        from reweight_audit.training.loss import ReweightedLoss

        loss_fn = ReweightedLoss("ranktuner-approx")
        return lambda: loss_fn(model(input_ids=ids), labels).backward()
    if variant == "trl-dft":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer asks for

        def trl_dft() -> None:
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            loss = -(out.log_probs * out.log_probs.exp().detach()).sum() / out.label_mask.sum().clamp(min=1)
            loss.backward()

        return trl_dft
    from reweight_audit.training.patching import patch

    method = variant.removeprefix("fused-").removesuffix("-ours")
    patch(model, method, backend="ours" if variant.endswith("-ours") else "auto")
    return lambda: model(input_ids=ids, labels=labels).loss.backward()


def _warm_imports(device: str) -> None:
    """Load the statistics kernel (numba, ~100 MB of RSS) before the baseline, in every variant alike."""
    import torch

    from reweight_audit.scoring.stats import token_statistics

    token_statistics(torch.zeros(2, 64, device=device), torch.zeros(2, dtype=torch.long, device=device))


def measure_variant(variant: str, vocab: int, seq_len: int, device: str, dtype: str, repeats: int) -> dict:
    """One variant in this process: the peak of its first step above the built model, its best step time."""
    import torch

    torch.set_grad_enabled(True)
    model, ids, labels = _build(vocab, seq_len, device, dtype)
    step = _step_fn(variant, model, ids, labels)
    _warm_imports(device)
    baseline = _reset_peak(device)
    seconds, peak = [], None
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=False)
        started = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        if i == 0:  # the first step allocates everything the later ones reuse
            peak = _peak_above(device, baseline)
    return {"variant": variant, "vocab": vocab, "seq_len": seq_len, "seconds": min(seconds[1:] or seconds),
            "peak_bytes": peak}


def _in_subprocess(variant: str, vocab: int, seq_len: int, device: str, dtype: str, repeats: int) -> dict:
    """``measure_variant`` in a fresh Python, so the peak is this variant's alone."""
    args = json.dumps({"variant": variant, "vocab": vocab, "seq_len": seq_len, "device": device, "dtype": dtype,
                       "repeats": repeats})
    done = subprocess.run([sys.executable, "-m", "reweight_audit.bench.train", args], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"variant": variant, "vocab": vocab, "seq_len": seq_len, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cases(vocabs: Sequence[int], seq_len: int, flat: Sequence[int], variants: Sequence[str]) -> list[tuple]:
    cases = [(v, vocab, seq_len) for vocab in vocabs for v in variants]
    if FLAT_VARIANT in variants:
        cases += [(FLAT_VARIANT, vocabs[0], t) for t in flat if t != seq_len]
        cases += [(BODY, vocabs[0], t) for t in flat]
    return cases


def run_train_bench(*, vocabs: Sequence[int] = VOCABS, seq_len: int = SEQ_LEN, flat_seq_lens: Sequence[int] = FLAT_SEQ_LENS,
                    variants: Sequence[str] = VARIANTS, device: str = "auto", dtype: str = "auto",
                    repeats: int = 2) -> dict:
    """Every variant at every vocabulary (and the flatness lengths), each in its own process; ratios added."""
    from reweight_audit.core.models import resolve_device

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise AuditError(f"bench --train: unknown variant(s) {', '.join(unknown)}; use {', '.join(VARIANTS)}")
    for name, value in (("--seq-len", seq_len), ("--repeats", repeats), *(("--vocab", v) for v in vocabs)):
        if int(value) < 1:
            raise AuditError(f"bench --train: {name} {value}; give a number >= 1")
    device = resolve_device(device)
    results, skipped = [], []
    for variant, vocab, t in _cases(vocabs, seq_len, flat_seq_lens, variants):
        need, have = estimate_bytes(variant, vocab, t), available_bytes(device)
        if need > HEADROOM * have:
            skipped.append({"variant": variant, "vocab": vocab, "seq_len": t,
                            "reason": f"needs about {need / 2**30:,.1f} GiB, {have / 2**30:,.1f} GiB available"})
            continue
        results.append(_in_subprocess(variant, vocab, t, device, dtype, repeats))
    return {"mode": "train", "device": device, "dtype": dtype, "batch": BATCH, "seq_len": seq_len,
            "results": results, "skipped": skipped, "ratios": ratio_lines(results, seq_len, flat_seq_lens)}


def _get(results: list[dict], variant: str, vocab: int, seq_len: int, key: str) -> float | None:
    for r in results:
        if (r["variant"], r["vocab"], r["seq_len"]) == (variant, vocab, seq_len) and r.get(key) is not None:
            return float(r[key])
    return None


def ratio_lines(results: list[dict], seq_len: int, flat_seq_lens: Sequence[int]) -> list[dict]:
    """The issue's targets as ratios: name, value, target, met (pairs missing a side are left out)."""
    fused = [v for v in VARIANTS if v.startswith("fused-")]
    checks = []  # (name, (variant, vocab, T, key), (variant, vocab, T, key), target)
    for vocab in sorted({r["vocab"] for r in results}):
        for v in fused:
            checks.append((f"peak {v} / hf, V={vocab:,}", (v, vocab, seq_len, "peak_bytes"),
                           ("hf", vocab, seq_len, "peak_bytes"), 0.1))
            checks.append((f"peak {v} / trl-dft, V={vocab:,}", (v, vocab, seq_len, "peak_bytes"),
                           ("trl-dft", vocab, seq_len, "peak_bytes"), 1.2))
        checks.append((f"time fused-dft / trl-dft, V={vocab:,}", ("fused-dft", vocab, seq_len, "seconds"),
                       ("trl-dft", vocab, seq_len, "seconds"), 1.1))
        checks.append((f"time fused-dft / hf, V={vocab:,}", ("fused-dft", vocab, seq_len, "seconds"),
                       ("hf", vocab, seq_len, "seconds"), 1.0))
        for v in ("fused-dft-ours", "fused-ranktuner-approx", "fused-eaft"):
            checks.append((f"time {v} / trl-dft, V={vocab:,}", (v, vocab, seq_len, "seconds"),
                           ("trl-dft", vocab, seq_len, "seconds"), 1.3 if v != "fused-dft-ours" else 1.1))
    if len(flat_seq_lens) >= 2 and results:
        vocab = results[0]["vocab"]
        short, long = min(flat_seq_lens), max(flat_seq_lens)
        checks.append((f"peak {FLAT_VARIANT} T={long:,} / T={short:,}, V={vocab:,}",
                       (FLAT_VARIANT, vocab, long, "peak_bytes"), (FLAT_VARIANT, vocab, short, "peak_bytes"), 1.2))
    lines = []
    for name, top, bottom, target in checks:
        a, b = _get(results, *top), _get(results, *bottom)
        if a is not None and b:
            lines.append({"name": name, "value": a / b, "target": target, "met": a / b <= target})
    return lines + _above_body_line(results, flat_seq_lens)


def _above_body_line(results: list[dict], flat_seq_lens: Sequence[int]) -> list[dict]:
    """The flatness ratio of the loss's own peak: the fused step's peak minus the body's, at the longest length
    over the shortest (the tiny body's activations grow with T for every loss alike)."""
    if len(flat_seq_lens) < 2 or not results:
        return []
    vocab, short, long = results[0]["vocab"], min(flat_seq_lens), max(flat_seq_lens)
    above = []
    for t in (long, short):
        fused, body = _get(results, FLAT_VARIANT, vocab, t, "peak_bytes"), _get(results, BODY, vocab, t, "peak_bytes")
        above.append(None if fused is None or body is None else fused - body)
    if above[0] is None or not above[1] or above[1] <= 0:
        return []
    value = above[0] / above[1]
    return [{"name": f"peak {FLAT_VARIANT} above the body T={long:,} / T={short:,}, V={vocab:,}", "value": value,
             "target": 1.2, "met": value <= 1.2}]


def format_lines(result: dict) -> list[str]:
    """The bench's printed lines: one per variant, one per skip, one per ratio."""
    lines = [f"bench --train on {result['device']} ({result['dtype']}), batch {result['batch']}, tiny Llama body"]
    for r in result["results"]:
        where = f"{r['variant']:<24} V={r['vocab']:>7,} T={r['seq_len']:>5,}"
        if "error" in r:
            lines.append(f"{where}  failed: {r['error']}")
            continue
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:8.3f} GiB"
        lines.append(f"{where}  step {r['seconds']:8.3f} s  peak {peak}")
    for s in result["skipped"]:
        lines.append(f"{s['variant']:<24} V={s['vocab']:>7,} T={s['seq_len']:>5,}  skipped: {s['reason']}")
    for line in result["ratios"]:
        verdict = "met" if line["met"] else "MISSED"
        lines.append(f"{line['name']}: {line['value']:.3f} (target <= {line['target']}) {verdict}")
    return lines


if __name__ == "__main__":  # one variant, in the fresh process run_train_bench starts
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure_variant(spec["variant"], spec["vocab"], spec["seq_len"], spec["device"], spec["dtype"],
                                     spec["repeats"])))

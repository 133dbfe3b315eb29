"""``reweight-audit bench``: our engine against the plain forward pass and a naive implementation.

All three run in one process on the same model, batch and machine:

* ``forward`` — the model's own forward pass to full logits (the floor we cannot beat);
* ``naive``  — full logits, ``log_softmax``, and a full ``torch.sort`` per row for E[R];
* ``ours``   — :func:`reweight_audit.scoring.score_batch`.

Throughput is supervised tokens per second (best of ``repeats``). Peak memory is
the high-water mark above the memory held before the variant ran: on CUDA
``torch.cuda.max_memory_allocated``; on Linux CPUs the process's VmHWM, reset
through ``/proc/self/clear_refs`` before each variant.
"""
from __future__ import annotations

import gc
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from reweight_audit.errors import AuditError


@dataclass
class BenchCase:
    model: Any
    head: Any
    sequences: list
    device: str
    chunk_rows: int
    pad_id: int
    label: str

    @property
    def supervised_tokens(self) -> int:
        return int(sum(len(s.sup_index) for s in self.sequences))

    @property
    def total_tokens(self) -> int:
        return int(sum(len(s.input_ids) for s in self.sequences))


# ------------------------------------------------------------------ memory probes


def _rss_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak(device: str) -> int | None:
    """Reset the high-water mark; return the memory held now (the baseline)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _rss_bytes("VmRSS")


def _peak_above(device: str, baseline: int | None) -> int | None:
    if baseline is None:
        return None
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated()) - baseline
    peak = _rss_bytes("VmHWM")
    return None if peak is None else peak - baseline


# ------------------------------------------------------------------------ variants


def forward_variant(case: BenchCase) -> None:
    """The plain forward pass to full [batch, seq, vocab] logits."""
    from reweight_audit.scoring import pad_batch as _pad_batch

    ids, mask = _pad_batch(case.sequences, case.pad_id, case.device)
    logits = case.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    _sync(case.device, logits)


def naive_variant(case: BenchCase) -> dict:
    """Full logits, log_softmax, and a full per-row sort for the expected rank."""
    import torch

    from reweight_audit.scoring import batch_inputs
    from reweight_audit.stats import expected_rank_sorted

    batch = batch_inputs(case.sequences, case.pad_id, case.device)
    logits = case.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    lp = logprobs[batch.rows, batch.cols - 1]
    z = logits[batch.rows, batch.cols - 1]
    targets = batch.targets
    p = lp.exp()
    out = {
        "logp": lp.gather(1, targets[:, None])[:, 0],
        "entropy": -(p * lp).sum(-1),
        "rank": (z >= z.gather(1, targets[:, None])).sum(-1),
        "expected_rank": expected_rank_sorted(p),
        "sum_p2": (p * p).sum(-1),
    }
    top = torch.topk(z, 20, dim=-1).values
    q = torch.log_softmax(top, -1)
    out["topk_entropy"] = -(q.exp() * q).sum(-1)
    _sync(case.device, out["expected_rank"])
    return out


def ours_variant(case: BenchCase) -> dict:
    from reweight_audit.scoring import score_batch

    return score_batch(case.model, case.head, case.sequences, device=case.device, chunk_rows=case.chunk_rows, pad_id=case.pad_id)


def _sync(device: str, tensor: Any) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure(case: BenchCase, fn: Callable[[BenchCase], Any], repeats: int) -> dict:
    """Best-of-``repeats`` seconds and the peak memory of one run above the baseline."""
    import torch

    with torch.no_grad():
        fn(case)  # warm-up (allocator, kernels)
        baseline = _reset_peak(case.device)
        t0 = time.perf_counter()
        fn(case)
        best = time.perf_counter() - t0
        peak = _peak_above(case.device, baseline)
        for _ in range(repeats - 1):
            t0 = time.perf_counter()
            fn(case)
            best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "tokens_per_s": case.supervised_tokens / best, "peak_bytes": peak}


# --------------------------------------------------------------------------- cases


def default_case(model_spec: str, batch_tokens: int, device: str, dtype: str, chunk_rows: int | None) -> BenchCase:
    """CHAMP responses under the chat template until about ``batch_tokens`` supervised tokens."""
    from reweight_audit.corpus import iter_records
    from reweight_audit.model import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model
    from reweight_audit.scoring import NoisyRecord, auto_chunk_rows, choose_template, encode, find_head, verify_head

    device = resolve_device(device)
    source = resolve_model(model_spec)
    tokenizer = load_tokenizer(source)
    template = choose_template(tokenizer, "auto")
    sequences, supervised = [], 0
    for order, record in enumerate(iter_records("champ")):
        enc = encode(NoisyRecord(record.id, record.prompt, record.response, []), order, tokenizer, template, None, {})
        if enc is None:
            continue
        sequences.append(enc)
        supervised += len(enc.sup_index)
        if supervised >= batch_tokens:
            break
    model = load_model(source, device=device, dtype=resolve_dtype(dtype, device))
    head = verify_head(model, find_head(model), sequences[0], device)
    vocab = int(head.weight.shape[0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return BenchCase(model, head, sequences, device, chunk_rows or auto_chunk_rows(vocab, device), pad,
                     label=f"{source.describe()} on {device}")


def synthetic_case(vocab: int, seq_len: int, device: str, chunk_rows: int | None, hidden: int = 64, layers: int = 2,
                   sequences: int = 1, dtype: str = "float32", intermediate: int | None = None, heads: int = 4,
                   kv_heads: int = 4) -> BenchCase:
    """A Llama from a config with a large vocabulary; ``sequences`` of ``seq_len`` tokens, all supervised but the first."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from reweight_audit.model import resolve_device
    from reweight_audit.scoring import Encoded, auto_chunk_rows, find_head

    if vocab < 2 or seq_len < 2:
        raise AuditError("--vocab and --seq-len must both be at least 2")
    device = resolve_device(device)
    torch.manual_seed(0)
    from reweight_audit.model import resolve_dtype

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max(seq_len, 2048))
    torch_dtype = resolve_dtype(dtype, device)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch_dtype).eval()
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(sequences):
        ids = rng.integers(0, vocab, size=seq_len).tolist()
        seqs.append(Encoded(f"synthetic-{i}", i, ids, np.arange(1, seq_len, dtype=np.int64), [""] * (seq_len - 1),
                            np.zeros(seq_len - 1, dtype=bool), [""] * (seq_len - 1)))
    params = sum(p.numel() for p in model.parameters())
    return BenchCase(model, find_head(model), seqs, device, chunk_rows or auto_chunk_rows(vocab, device), 0,
                     label=f"llama from config ({params / 1e6:,.0f}M parameters), vocab {vocab:,}, "
                           f"{sequences} x {seq_len:,} tokens on {device}")


def run_bench(
    *,
    model: str = "default",
    batch_tokens: int = 2048,
    vocab: int | None = None,
    seq_len: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    chunk_rows: int | None = None,
    repeats: int = 2,
    variants: tuple[str, ...] = ("forward", "naive", "ours"),
    check: bool = True,
) -> dict:
    """Measure every variant on one case; return a JSON-ready dict with the ratios."""
    import torch

    torch.set_grad_enabled(False)
    if vocab is not None or seq_len is not None:
        case = synthetic_case(vocab or 151_936, seq_len or 4096, device, chunk_rows)
    else:
        case = default_case(model, batch_tokens, device, dtype, chunk_rows)
    return run_case(case, repeats=repeats, variants=variants, check=check)


def run_case(case: BenchCase, *, repeats: int = 2, variants: tuple[str, ...] = ("forward", "naive", "ours"), check: bool = True) -> dict:
    """Measure every variant on one prepared case; a JSON-ready dict with the ratios."""
    import torch

    functions = {"forward": forward_variant, "naive": naive_variant, "ours": ours_variant}
    results = {name: measure(case, functions[name], repeats) for name in variants}
    agreement = None
    if check and "naive" in variants and "ours" in variants:
        ours, naive = ours_variant(case), naive_variant(case)
        naive = {k: v.double().cpu().numpy() for k, v in naive.items()}
        agreement = {
            "expected_rank_max_rel_err": float(np.max(np.abs(ours["expected_rank"] - naive["expected_rank"]) / naive["expected_rank"])),
            "rank_equal": bool(np.array_equal(ours["rank"], naive["rank"])),
            "logp_max_abs_err": float(np.max(np.abs(ours["logp"] - naive["logp"]))),
        }
    ratios = {}
    if "ours" in results and "forward" in results:
        ratios["ours_over_forward"] = results["ours"]["tokens_per_s"] / results["forward"]["tokens_per_s"]
    if "ours" in results and "naive" in results:
        ratios["ours_over_naive"] = results["ours"]["tokens_per_s"] / results["naive"]["tokens_per_s"]
        if results["ours"]["peak_bytes"] and results["naive"]["peak_bytes"]:
            ratios["peak_ours_over_naive"] = results["ours"]["peak_bytes"] / results["naive"]["peak_bytes"]
    return {
        "case": case.label,
        "supervised_tokens": case.supervised_tokens,
        "total_tokens": case.total_tokens,
        "sequences": len(case.sequences),
        "chunk_rows": case.chunk_rows,
        "device": case.device,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "results": results,
        "ratios": ratios,
        "agreement": agreement,
    }


def gpu_check(repeats: int = 2) -> list[dict]:
    """The prepared GPU run: the default model, then a 1B-class Llama with vocabulary 151,936, both in bf16.

    Sized to finish in a few minutes on one modern GPU.
    """
    import torch

    if not torch.cuda.is_available():
        raise AuditError("--gpu-check needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    results = [run_bench(model="default", batch_tokens=8192, device="cuda", dtype="bfloat16", repeats=repeats)]
    case = synthetic_case(151_936, 2048, "cuda", None, hidden=2048, layers=16, sequences=4, dtype="bfloat16",
                          intermediate=8192, heads=32, kv_heads=8)
    results.append(run_case(case, repeats=repeats))
    return results

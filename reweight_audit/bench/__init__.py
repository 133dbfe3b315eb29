"""``reweight-audit bench``: our engine against the plain forward pass and a naive implementation.

All three run in one process on the same model, batch and machine:

* ``forward`` — the model's own forward pass to full logits (the floor we cannot beat);
* ``naive``  — full logits, ``log_softmax``, and a full ``torch.sort`` per row for E[R];
* ``ours``   — :func:`reweight_audit.scoring.head.score_batch`.

Throughput is supervised tokens per second (best of ``repeats``). Peak memory is
the high-water mark above the memory held before the variant ran: on CUDA
``torch.cuda.max_memory_allocated``; on Linux CPUs the process's VmHWM, reset
through ``/proc/self/clear_refs`` before each variant. A variant whose estimated
memory does not fit what is available is skipped with the reason, never started.

``stats_only`` times the statistics alone on one chunk of the model's real logits
(ns per logit: ours, ``log_softmax``, and softmax + sort + E[R]); ``contended`` runs
the timings while one CPU-bound process per core (started and stopped here) competes.

Each further mode lives in a module of its own in this package (the modes of other stages:
compare at scale, the fused training loss). The package may import every stage below the faces
(training, reporting, evaluation, injection, scoring, methods, core), never ``cli``.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from reweight_audit.core.errors import AuditError


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


# ------------------------------------------------------------- memory estimates


def available_bytes(device: str) -> int:
    """Memory a variant may still take: free GPU memory, or the OS's available RAM."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def estimate_bytes(case: BenchCase, variant: str) -> int:
    """Upper estimate of a variant's peak memory above the model, from the case's shapes.

    forward: fp32 logits [batch, seq, vocab] plus eager attention scores; naive: twice that
    (logits and log_softmax) plus six [supervised, vocab] temporaries (gathers, p, products;
    measured ~5 on a vocabulary of 151,936); ours: hidden states and a head chunk with its
    workspaces (at most six fp32 copies of [chunk_rows, vocab]).
    """
    config = case.model.config.get_text_config()
    batch, width = len(case.sequences), max(len(s.input_ids) for s in case.sequences)
    return variant_bytes(variant, vocab=int(config.vocab_size), batch=batch, width=width,
                         heads=int(getattr(config, "num_attention_heads", 1) or 1),
                         hidden=int(getattr(config, "hidden_size", 0) or 0), supervised=case.supervised_tokens,
                         chunk_rows=case.chunk_rows)


def variant_bytes(variant: str, *, vocab: int, batch: int, width: int, heads: int, hidden: int, supervised: int,
                  chunk_rows: int) -> int:
    """:func:`estimate_bytes` from the shapes alone (Python integers: no overflow at any size)."""
    activations = batch * width * hidden * 4 * 8 + batch * heads * width * width * 4
    logits = batch * width * vocab * 4
    if variant == "forward":
        return activations + logits
    if variant == "naive":
        return activations + 2 * logits + 6 * supervised * vocab * 4
    return activations + 6 * min(chunk_rows, supervised) * vocab * 4


#: Bytes a synthetic sequence holds per token before any model runs: the id list (a Python int and its
#: pointer), the supervised index and labels, and the token text list's pointers.
SEQUENCE_BYTES_PER_TOKEN = 8 + 28 + 8 + 1 + 8 + 8


def synthetic_bytes(*, vocab: int, seq_len: int, hidden: int, layers: int, intermediate: int, heads: int,
                    sequences: int, weight_bytes: int = 4) -> tuple[int, int]:
    """(bytes on the device, bytes in host memory) the synthetic case needs at the least: the Llama's weights
    (``weight_bytes`` each) with the cheapest variant's working memory, and the sequences. Estimated before
    anything is allocated."""
    weights = weight_bytes * (2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate))
    cheapest = variant_bytes("ours", vocab=vocab, batch=sequences, width=seq_len, heads=heads, hidden=hidden,
                             supervised=sequences * (seq_len - 1), chunk_rows=1)
    return weights + cheapest, sequences * seq_len * SEQUENCE_BYTES_PER_TOKEN


def check_synthetic_fits(device: str, *, vocab: int, seq_len: int, hidden: int, layers: int, intermediate: int,
                         heads: int, sequences: int, weight_bytes: int = 4, headroom: float = 0.85) -> None:
    """Refuse, in one line, a ``--vocab``/``--seq-len`` whose synthetic case cannot fit in this machine's memory.

    Checked before the model or the sequences are made: an allocation that large would end in an
    allocator traceback, or in the kernel's out-of-memory killer with no message at all.
    """
    on_device, on_host = synthetic_bytes(vocab=vocab, seq_len=seq_len, hidden=hidden, layers=layers,
                                         intermediate=intermediate, heads=heads, sequences=sequences,
                                         weight_bytes=weight_bytes)
    host = available_bytes("cpu")
    budgets = [(on_host + (on_device if device == "cpu" else 0), host, "memory")]
    if device != "cpu":
        budgets.append((on_device, available_bytes(device), f"{device} memory"))
    for need, have, where in budgets:
        if need > headroom * have:
            raise AuditError(f"--vocab {vocab:,} --seq-len {seq_len:,}: the synthetic case needs at least "
                             f"{need / 2**30:,.1f} GiB of {where}, {have / 2**30:,.1f} GiB available; choose a "
                             "smaller --vocab or --seq-len")


def skip_reason(case: BenchCase, variant: str, headroom: float = 0.85) -> str | None:
    """Why ``variant`` cannot run on this machine (one line), or None when it fits."""
    need, have = estimate_bytes(case, variant), available_bytes(case.device)
    if need <= headroom * have:
        return None
    return f"skipped: needs about {need / 2**30:,.1f} GiB, {have / 2**30:,.1f} GiB available"


# a busy loop that also ends by itself if bench dies without cleaning up (its parent changes)
_BUSY_LOOP = """
import os
parent = os.getppid()
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


@contextlib.contextmanager
def competing_load(processes: int) -> Iterator[dict]:
    """``processes`` CPU-bound busy loops for the duration of the block, started and stopped here."""
    procs = [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP], stdin=subprocess.DEVNULL) for _ in range(processes)]
    try:
        time.sleep(0.5)  # let them reach the scheduler before timing starts
        yield {"competing_processes": processes, "loadavg_before": os.getloadavg()}
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------------ variants


def forward_variant(case: BenchCase) -> None:
    """The plain forward pass to full [batch, seq, vocab] logits."""
    from reweight_audit.scoring.batching import pad_batch

    ids, mask = pad_batch(case.sequences, case.pad_id, case.device)
    logits = case.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    _sync(case.device, logits)


def naive_variant(case: BenchCase) -> dict:
    """Full logits, log_softmax, and a full per-row sort for the expected rank."""
    import torch

    from reweight_audit.scoring.batching import batch_inputs
    from reweight_audit.scoring.stats import expected_rank_sorted

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
    from reweight_audit.scoring.head import score_batch

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
    from reweight_audit.injection.corpus import iter_records
    from reweight_audit.core.models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model
    from reweight_audit.scoring.batching import pad_id_of
    from reweight_audit.scoring.encoding import choose_template, encode
    from reweight_audit.scoring.head import auto_chunk_rows, find_head, verify_head
    from reweight_audit.scoring.reader import NoisyRecord

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
    pad = pad_id_of(tokenizer)
    return BenchCase(model, head, sequences, device, chunk_rows or auto_chunk_rows(vocab, device), pad,
                     label=f"{source.describe()} on {device}")


def synthetic_case(vocab: int, seq_len: int, device: str, chunk_rows: int | None, hidden: int = 64, layers: int = 2,
                   sequences: int = 1, dtype: str = "float32", intermediate: int | None = None, heads: int = 4,
                   kv_heads: int = 4) -> BenchCase:
    """A Llama from a config with a large vocabulary; ``sequences`` of ``seq_len`` tokens, all supervised but the first."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from reweight_audit.core.models import resolve_device
    from reweight_audit.scoring.encoding import Encoded
    from reweight_audit.scoring.head import auto_chunk_rows, find_head

    check_options(batch_tokens=1, vocab=vocab, seq_len=seq_len, chunk_rows=chunk_rows, repeats=1)
    device = resolve_device(device)
    on_cuda = device.startswith("cuda")  # auto is bf16 there
    check_synthetic_fits(device, vocab=vocab, seq_len=seq_len, hidden=hidden, layers=layers,
                         intermediate=intermediate or 2 * hidden, heads=heads, sequences=sequences,
                         weight_bytes=2 if dtype in ("bfloat16", "float16") or (dtype == "auto" and on_cuda) else 4)
    torch.manual_seed(0)
    from reweight_audit.core.models import resolve_dtype

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
    stats_only: bool = False,
    contended: bool = False,
) -> dict:
    """Measure every variant (or, with ``stats_only``, the statistics alone) on one case; a JSON-ready dict."""
    import torch

    check_options(batch_tokens=batch_tokens, vocab=vocab, seq_len=seq_len, chunk_rows=chunk_rows, repeats=repeats)
    # no autograd while measuring, but only here: the caller's process keeps its own setting
    with torch.no_grad():
        if vocab is not None or seq_len is not None:
            case = synthetic_case(151_936 if vocab is None else vocab, 4096 if seq_len is None else seq_len, device,
                                  chunk_rows)
        else:
            case = default_case(model, batch_tokens, device, dtype, chunk_rows)
        if stats_only:
            return run_stats_only(case, repeats=repeats, contended=contended)
        return run_case(case, repeats=repeats, variants=variants, check=check, contended=contended)


def check_options(*, batch_tokens: int, vocab: int | None, seq_len: int | None, chunk_rows: int | None,
                  repeats: int) -> None:
    """Reject sizes that make no sense (0 or negative) instead of quietly using a default."""
    for flag, value, least in (("--batch-tokens", batch_tokens, 1), ("--vocab", vocab, 2), ("--seq-len", seq_len, 2),
                               ("--chunk-rows", chunk_rows, 1), ("--repeats", repeats, 1)):
        if value is not None and value < least:
            raise AuditError(f"{flag} {value}: must be at least {least}")


def run_case(case: BenchCase, *, repeats: int = 2, variants: tuple[str, ...] = ("forward", "naive", "ours"),
             check: bool = True, contended: bool = False) -> dict:
    """Measure every variant on one prepared case; a JSON-ready dict with the ratios."""
    functions = {"forward": forward_variant, "naive": naive_variant, "ours": ours_variant}
    skipped = {name: reason for name in variants if (reason := skip_reason(case, name))}
    load = competing_load(cores()) if contended else contextlib.nullcontext({})
    with load as contention:
        results = {name: measure(case, functions[name], repeats) for name in variants if name not in skipped}
    agreement = None
    if check and "naive" in results and "ours" in results:
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
    return {**_describe(case, contention), "results": results, "skipped": skipped, "ratios": ratios,
            "agreement": agreement}


def _describe(case: BenchCase, contention: dict) -> dict:
    """The case and the machine state, for the JSON."""
    import torch

    from reweight_audit.scoring.stats import backend

    vocab = int(case.model.config.get_text_config().vocab_size)
    return {
        "case": case.label,
        "supervised_tokens": case.supervised_tokens,
        "total_tokens": case.total_tokens,
        "sequences": len(case.sequences),
        "chunk_rows": case.chunk_rows,
        "device": case.device,
        "statistics_backend": backend(vocab) if case.device == "cpu" else "torch",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "contended": contention or None,
        "torch": torch.__version__,
    }


def stats_chunk(case: BenchCase) -> tuple[Any, Any]:
    """The first head chunk of the case's supervised positions: float32 logits [rows, vocab] and targets."""
    from reweight_audit.scoring.batching import batch_inputs
    from reweight_audit.scoring.head import logit_chunks

    batch = batch_inputs(case.sequences, case.pad_id, case.device)
    logits, targets = next(iter(logit_chunks(case.model, case.head, batch, case.sequences, case.device, case.chunk_rows)))
    return logits.float().contiguous(), targets


def _best_seconds(fn: Callable[[], Any], repeats: int, device: str) -> float:
    fn()  # warm-up: workspaces, kernel cache load
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        _sync(device, fn())
        best = min(best, time.perf_counter() - t0)
    return best


def run_stats_only(case: BenchCase, *, repeats: int = 2, contended: bool = False) -> dict:
    """ns per logit of our statistics, of ``log_softmax`` and of softmax + sort + E[R] on one real logits chunk."""
    import torch

    from reweight_audit.scoring.stats import expected_rank_sorted, token_statistics

    logits, targets = stats_chunk(case)
    rows, vocab = logits.shape
    timed = {
        "ours": lambda: token_statistics(logits, targets)["expected_rank"],
        "log_softmax": lambda: torch.log_softmax(logits, dim=-1),
        "sort_expected_rank": lambda: expected_rank_sorted(torch.log_softmax(logits, dim=-1).exp_()),
    }
    load = competing_load(cores()) if contended else contextlib.nullcontext({})
    with load as contention, torch.no_grad():
        seconds = {name: _best_seconds(fn, repeats, case.device) for name, fn in timed.items()}
    ns = {name: value * 1e9 / (rows * vocab) for name, value in seconds.items()}
    return {**_describe(case, contention), "stats_only": {"rows": rows, "vocab": vocab, "ns_per_logit": ns},
            "ratios": {"ours_over_log_softmax": ns["ours"] / ns["log_softmax"],
                       "sort_over_ours": ns["sort_expected_rank"] / ns["ours"]}}


def gpu_check(repeats: int = 2) -> list[dict]:
    """The prepared GPU run: the default model, gemma3-270m when its package is installed (full
    bench and statistics alone), then a 1B-class Llama with vocabulary 151,936, all in bf16.

    Sized to finish in a few minutes on one modern GPU.
    """
    import torch

    from reweight_audit.core.models import GEMMA_MODEL, GEMMA_PACKAGE

    if not torch.cuda.is_available():
        raise AuditError("--gpu-check needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    results = [run_bench(model="default", batch_tokens=8192, device="cuda", dtype="bfloat16", repeats=repeats)]
    if importlib.util.find_spec(GEMMA_PACKAGE) is not None:
        for stats_only in (False, True):
            results.append(run_bench(model=GEMMA_MODEL, batch_tokens=8192, device="cuda", dtype="bfloat16",
                                     repeats=repeats, stats_only=stats_only))
    case = synthetic_case(151_936, 2048, "cuda", None, hidden=2048, layers=16, sequences=4, dtype="bfloat16",
                          intermediate=8192, heads=32, kv_heads=8)
    results.append(run_case(case, repeats=repeats))
    return results

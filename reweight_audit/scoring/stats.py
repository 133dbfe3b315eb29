"""Per-token statistics of a next-token distribution, from one chunk of logits.

``token_statistics(logits, targets)`` reduces a ``[rows, vocab]`` chunk of logits (any float
dtype, any device) to the per-row columns of the ``score`` table: ``logp``, ``entropy``,
``rank`` (``#{i: z_i >= z_target}``, exact, ties count against the target),
``expected_rank`` (``sum_i i p_(i)`` without a sort: a slot histogram of the float32
``exp(z - max)`` with a certified ``expected_rank_error_bound <= 1e-7 * expected_rank``,
rows above it sorted), ``topk_entropy``, ``sum_p2`` and ``finite``.  Every reduction is
float32 or wider.  Non-finite rows get NaN statistics and rank 0.

Two implementations of the same mathematics: on CPU the fused numba kernel
(:mod:`reweight_audit.scoring.stats_kernel`), and this module's torch path everywhere else and as
the tests' reference; ``REWEIGHT_AUDIT_STATS=auto|torch|numba`` chooses.  The derivation
of the bound, the slot layout, the fallback and the measured accuracy are in
docs/statistics.md.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor

__all__ = [
    "BACKEND_ENV",
    "EXPECTED_RANK_RTOL",
    "TOPK",
    "backend",
    "expected_rank_bucketed",
    "expected_rank_sorted",
    "token_statistics",
]

TOPK = 20
"""Top-k of ``topk_entropy`` (EAFT uses the top 20 logits)."""

EXPECTED_RANK_RTOL = 1e-7
"""Rows whose certified expected-rank error bound exceeds this x E[R] are sorted instead."""

_MANT = 23  # float32 mantissa bits
_T1 = 6  # coarse buckets: 2^6 per octave
_FLOOR_EXP = -64  # values of e below 2^-64 share one floor bucket
_LANES = 16  # the floor bucket is scattered into 16 lanes (by position), merged afterwards
_K1 = _LANES + (-_FLOOR_EXP << _T1)  # floor lanes, 64 octaves x 64 buckets, e == 1.0 exactly
_SHIFT1 = _MANT - _T1  # mantissa bits below the coarse key
_BASE1 = ((127 + _FLOOR_EXP) << _T1) - _LANES + 1  # (bits >> SHIFT1) - BASE1 = coarse index
_SUB_MASK = (1 << _SHIFT1) - 1
_SUB_BITS = 15  # slices are computed on 15 mantissa bits: products stay in int32
_PRE_SHIFT = _SHIFT1 - _SUB_BITS
_MAX_SUB = float(1 << _SUB_BITS)  # at most 2^15 slices per coarse bucket
_BUDGET_DIVISOR = 4  # fine slots per row: K1 + vocab / 4
_MIN_EXTRA_SLOTS = 4096
_T_MIN = -87.0  # exp(t) for t < -87.3 is subnormal (or 0) and ~15x slower to compute
_TOPK_BLOCK = 64  # block size of the top-k prefilter
_CPU_CHUNK_ELEMENTS = 1 << 19  # rows per chunk on CPU (10 at V = 49152): measured best
_DEVICE_CHUNK_ELEMENTS = 1 << 23  # off-CPU: large kernels, a ~380 MB workspace
_SYNC_FREE_FALLBACK_FRACTION = 16  # the sync-free path sorts ceil(rows / 16) rows
_KERNEL_BLOCK_ELEMENTS = 1 << 22  # non-float32 input is upcast for the kernel this many logits at a time

BACKEND_ENV = "REWEIGHT_AUDIT_STATS"
"""``auto`` (default: the numba kernel on CPU when numba imports, else torch), ``torch`` or ``numba``."""


def _fine_budget(vocab: int) -> int:
    """Number of fine slots per row (K2): one per coarse bucket plus a share of the vocab."""
    return _K1 + max(vocab // _BUDGET_DIVISOR, _MIN_EXTRA_SLOTS)


@lru_cache(maxsize=None)
def _log2_widths(device: torch.device) -> Tensor:
    """log2 of the width (in e units) of each coarse bucket, float32 [K1] (-inf for width 0).

    Bucket B holds e with ``(bits >> SHIFT1) - BASE1 == B``, an interval of one 64th of an
    octave.  Buckets 0 .. LANES-1 are lanes of the floor ``[0, 2^-64 (1 + 2^-6))``; the
    last bucket holds only e == 1.0 (e <= 1 by construction), width 0.
    """
    keys = torch.arange(_LANES - 1, _K1 + 1, dtype=torch.int64) + _BASE1
    lo = (keys << _SHIFT1).to(torch.int32).view(torch.float32).double()
    lo[0] = 0.0
    width = torch.cat([(lo[1] - lo[0]).expand(_LANES - 1), lo[1:] - lo[:-1]])
    width[-1] = 0.0
    return torch.log2(width).float().to(device)


def expected_rank_sorted(probs: Tensor) -> Tensor:
    """Naive reference: ``sum_i i * p_(i) / sum_i p_i`` by a full sort of every row.

    ``probs`` is ``[rows, vocab]`` (or ``[vocab]``) of non-negative weights in any float
    dtype; they need not be normalised.  Sorted in the input dtype (sorting does not
    round), accumulated in float64.  Returns float64 ``[rows]`` (or a scalar).
    """
    squeeze = probs.dim() == 1
    p = probs.unsqueeze(0) if squeeze else probs
    vocab = p.shape[-1]
    positions = torch.arange(1, vocab + 1, dtype=torch.float64, device=p.device)
    out = torch.empty(p.shape[0], dtype=torch.float64, device=p.device)
    step = max(1, (1 << 22) // max(vocab, 1))  # bound the float64 temporaries
    for start in range(0, p.shape[0], step):
        ordered = torch.sort(p[start : start + step], dim=-1, descending=True).values.double()
        out[start : start + step] = (ordered @ positions) / ordered.sum(-1)
    return out[0] if squeeze else out


class _Workspace:
    """Buffers reused by every row chunk of one call; aliases are noted where used."""

    def __init__(self, rows: int, vocab: int, fine_budget: int, device: torch.device, convert: bool) -> None:
        f32, f64, i32, i64 = torch.float32, torch.float64, torch.int32, torch.int64
        self.fine_budget = fine_budget
        self.z = torch.empty(rows, vocab, dtype=f32, device=device) if convert else None
        self.a = torch.empty(rows, vocab, dtype=f32, device=device)  # compare, t, int32 keys
        self.e = torch.empty(rows, vocab, dtype=f32, device=device)  # exp(t), kept to the end
        self.b = torch.empty(rows, vocab, dtype=i32, device=device)  # gathered per-bucket terms
        self.coarse = torch.empty(rows, vocab, dtype=i64, device=device)  # then e as float64
        self.fine = torch.empty(rows, vocab, dtype=i64, device=device)
        # scatter_add_ from a materialised tensor of ones is ~1.6x faster on CPU than from
        # an expanded scalar (stride 0 takes a slow path)
        self.ones = torch.ones(rows, vocab, dtype=f32, device=device)
        self.lane = (torch.arange(vocab, device=device) % _LANES).to(i32)
        self.counts = torch.empty(rows, _K1, dtype=f32, device=device)
        self.fine_counts = torch.empty(rows, fine_budget, dtype=f32, device=device)
        self.fine_mass = torch.empty(rows, fine_budget, dtype=f64, device=device)
        self.fine_max = torch.empty(rows, fine_budget, dtype=i32, device=device)
        self.k2_f32 = torch.empty(rows, fine_budget, dtype=f32, device=device)
        self.k2_f64 = torch.empty(rows, fine_budget, dtype=f64, device=device)
        self.k2_f64b = torch.empty(rows, fine_budget, dtype=f64, device=device)


_CPU_WORKSPACES = threading.local()


def _workspace(rows: int, vocab: int, device: torch.device, convert: bool) -> _Workspace:
    """A workspace for chunks of ``rows`` x ``vocab``.  On CPU the last one is kept (per
    thread, ~25 MB at V = 49152): the engine calls once per small chunk, and a fresh
    allocation page-faults in every call.  Off-CPU the caching allocator already reuses
    the memory, and holding hundreds of MB between calls would be rude.
    """
    if device.type != "cpu":
        return _Workspace(rows, vocab, _fine_budget(vocab), device, convert)
    budget = _fine_budget(vocab)
    cached: _Workspace | None = getattr(_CPU_WORKSPACES, "workspace", None)
    fits = (
        cached is not None
        and cached.e.shape[1] == vocab
        and cached.e.shape[0] >= rows  # every use slices [:rows]
        and cached.fine_budget == budget
        and (cached.z is not None or not convert)
    )
    if not fits:
        cached = _Workspace(rows, vocab, budget, device, convert)
        _CPU_WORKSPACES.workspace = cached
    return cached


def _expected_rank_buckets(e: Tensor, ws: _Workspace) -> tuple[Tensor, Tensor]:
    """Slotted E[R] and its certified bound for float32 weights ``e`` in [0, 1], [r, V].

    Returns float64 ``(expected_rank, bound)`` (docs/statistics.md).  Overwrites the
    workspace buffers ``a``, ``b``, ``coarse``, ``fine`` and the histograms.
    """
    vocab = e.shape[1]
    bits = e.view(torch.int32)
    coarse, counts = _coarse_histogram(bits, ws)
    nsub, offset = _slice_allocation(counts, e.device, ws.fine_budget)
    fine = _fine_slots(bits, coarse, nsub, offset, ws)
    counts_f, mass, top_bits = _slot_sums(e, bits, fine, coarse, ws)
    return _slotted_expected_rank(counts_f, mass, top_bits, vocab, ws)


def _coarse_histogram(bits: Tensor, ws: _Workspace) -> tuple[Tensor, Tensor]:
    """Pass 1: the coarse bucket of every weight (int64, in ``ws.coarse``) and the count of each bucket [r, K1].

    The clamp keeps garbage (NaN rows) in range.  Below 2^-64 the key is raised to a lane
    picked by position rather than to one index: in a row whose tail is mostly below 2^-64
    (or masked), thousands of adds into one slot serialise the scatter (~4x slower).  The
    lanes are merged after the fine scatter.
    """
    rows = bits.shape[0]
    key = ws.a[:rows].view(torch.int32)
    coarse = ws.coarse[:rows]
    torch.bitwise_right_shift(bits, _SHIFT1, out=key)
    key.sub_(_BASE1).clamp_(max=_K1 - 1)
    torch.maximum(key, ws.lane, out=key)
    coarse.copy_(key)
    counts = ws.counts[:rows].zero_().scatter_add_(1, coarse, ws.ones[:rows])
    return coarse, counts


def _slice_allocation(counts: Tensor, device: torch.device, fine_budget: int) -> tuple[Tensor, Tensor]:
    """How many fine slices each coarse bucket gets (int32 [r, K1]) and where its slices start.

    A heuristic (only the final bound must be rigorous): bucket B gets n_B ~ a_B * scale
    slices, a_B = (w_B floor(c_B^2/4))^(1/3) (in log2: y), the Lagrange optimum of
    sum_B w_B c_B^2 / n_B^2 for sum_B n_B = K2 - K1, less a margin for float rounding.
    Rounding n_B up adds at most one per bucket, so sum_B n_B <= K2 always.
    """
    pairs = torch.floor(counts * counts * 0.25)
    pairs[:, :_LANES] = 0.0  # the floor spans many octaves: mantissa bits cannot split it
    # (log2 of 0 takes a slow path on CPU, hence the clamp and the explicit -inf)
    y = torch.log2(pairs.clamp(min=0.5)).add_(_log2_widths(device)).mul_(1.0 / 3.0)
    y = torch.where(pairs > 0, y, -math.inf)  # -inf: no pairs, or width 0
    total = torch.exp2(y).sum(-1, keepdim=True).clamp_(min=1e-30)
    log2_scale = torch.log2((fine_budget - _K1) * (1.0 - 1e-3) / total)
    nsub = torch.exp2(y.add_(log2_scale)).clamp_(1.0, _MAX_SUB).ceil_().int()
    offset = nsub.cumsum(-1, dtype=torch.int32) - nsub
    return nsub, offset


def _fine_slots(bits: Tensor, coarse: Tensor, nsub: Tensor, offset: Tensor, ws: _Workspace) -> Tensor:
    """The fine slot of every weight (int64, in ``ws.fine``): offset_B + floor(mant * n_B / 2^SHIFT1).

    mant = the mantissa bits below the coarse key: n_B slices of the bucket, in value order.
    Only this monotonicity matters (the bound uses each slot's actual maximum, not its
    width).  Computed as ((mant >> PRE) * n_B) >> 15: int32 arithmetic on contiguous
    operands (per-element shift amounts and strided operands are slow on CPU).
    """
    rows = bits.shape[0]
    key = ws.a[:rows].view(torch.int32)
    term = ws.b[:rows]
    torch.bitwise_and(bits, _SUB_MASK, out=key)
    key >>= _PRE_SHIFT
    key *= torch.gather(nsub, 1, coarse, out=term)
    key >>= _SUB_BITS
    key += torch.gather(offset, 1, coarse, out=term)
    fine = ws.fine[:rows]
    fine.copy_(key)
    return fine


def _slot_sums(e: Tensor, bits: Tensor, fine: Tensor, coarse: Tensor, ws: _Workspace) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 2, per fine slot: count c, mass m and the int32 pattern of the maximum M, floor lanes merged.

    m in float64: the sum of float32 values of one binade is exact in float64.  M as the amax
    of the int32 pattern: monotone, and much faster than a float amax.  e64 reuses the
    coarse-key buffer (``coarse`` is not needed any more).
    """
    rows = e.shape[0]
    ones = ws.ones[:rows]
    counts_f = ws.fine_counts[:rows].zero_().scatter_add_(1, fine, ones)
    e64 = coarse.view(torch.float64).copy_(e)
    mass = ws.fine_mass[:rows].zero_().scatter_add_(1, fine, e64)
    top_bits = ws.fine_max[:rows].zero_().scatter_reduce_(1, fine, bits, "amax")
    counts_f[:, 0] = counts_f[:, :_LANES].sum(-1)  # merge the floor lanes (slots 0..15)
    mass[:, 0] = mass[:, :_LANES].sum(-1)
    top_bits[:, 0] = top_bits[:, :_LANES].amax(-1)
    counts_f[:, 1:_LANES] = 0.0
    mass[:, 1:_LANES] = 0.0
    top_bits[:, 1:_LANES] = 0
    return counts_f, mass, top_bits


def _slotted_expected_rank(counts_f: Tensor, mass: Tensor, top_bits: Tensor, vocab: int,
                           ws: _Workspace) -> tuple[Tensor, Tensor]:
    """E[R] and its bound from the slot sums: cross-slot pairs, plus (c - 1)/2 m for the pairs inside a slot.

    Each slot's mass times (elements strictly above) + (c - 1)/2 = (V - 1/2) - (cum - c/2),
    exact in float32.  In-slot correction -c D / 4 and error bound (c - 2)^+ D / 4 with
    D = c M - m.
    """
    rows = counts_f.shape[0]
    weight = torch.cumsum(counts_f, -1, out=ws.k2_f32[:rows]).sub_(counts_f, alpha=0.5)
    weight = torch.sub(vocab - 0.5, weight, out=weight)
    s_total = mass.sum(-1)
    cross = torch.linalg.vecdot(mass, ws.k2_f64[:rows].copy_(weight))
    c = ws.k2_f64[:rows].copy_(counts_f)
    spread = ws.k2_f64b[:rows].copy_(top_bits.view(torch.float32)).mul_(c).sub_(mass)  # D
    correction = torch.linalg.vecdot(c, spread)
    slack = torch.linalg.vecdot(c.sub_(2.0).clamp_(min=0.0), spread)
    expected_rank = 1.0 + (cross - 0.25 * correction) / s_total
    bound = 0.25 * slack / s_total
    return expected_rank, bound


def expected_rank_bucketed(weights: Tensor, *, fine_budget: int | None = None) -> tuple[Tensor, Tensor]:
    """Expected rank of each row of ``weights`` by the slot histogram, with no fallback.

    ``weights`` is float32 ``[rows, vocab]`` (or ``[vocab]``) with values in ``[0, 1]``
    (e.g. ``exp(z - max)``; they need not sum to 1).  Returns float64 ``(expected_rank,
    bound)`` with ``|expected_rank - expected_rank_sorted(weights)| <= bound`` (up to
    float64 rounding, < 1e-13 relative).  ``fine_budget`` overrides the number of slots per
    row (at least the 4112 coarse buckets).
    """
    if weights.dtype != torch.float32:
        raise TypeError(f"expected_rank_bucketed needs float32 weights, got {weights.dtype}")
    squeeze = weights.dim() == 1
    e = (weights.unsqueeze(0) if squeeze else weights).contiguous()
    budget = _fine_budget(e.shape[-1]) if fine_budget is None else fine_budget
    if budget < _K1:
        raise ValueError(f"fine_budget must be at least {_K1}")
    ws = _Workspace(e.shape[0], e.shape[1], budget, e.device, convert=False)
    er, bound = _expected_rank_buckets(e, ws)
    return (er[0], bound[0]) if squeeze else (er, bound)


def _top_logits(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest values of each row (unsorted) and the row maximum [r, 1].

    The k largest elements all lie in the k blocks with the largest block maxima (at least
    k elements are >= the k-th largest block maximum, so a larger element sits in a block
    whose maximum is larger; elements equal to it are interchangeable), so ``topk`` runs on
    k*64 candidates instead of the row.  NaN propagates into the maximum.
    """
    rows, vocab = z.shape
    nblocks = vocab // _TOPK_BLOCK
    if nblocks <= k:  # small vocabulary: plain topk
        return torch.topk(z, k, dim=-1, sorted=False).values, z.amax(-1, keepdim=True)
    head = z[:, : nblocks * _TOPK_BLOCK].view(rows, nblocks, _TOPK_BLOCK)
    block_max = head.amax(-1)
    chosen = torch.topk(block_max, k, dim=-1, sorted=False).indices
    candidates = head.gather(1, chosen.unsqueeze(-1).expand(rows, k, _TOPK_BLOCK)).view(rows, k * _TOPK_BLOCK)
    row_max = block_max.amax(-1, keepdim=True)
    if nblocks * _TOPK_BLOCK < vocab:  # the ragged tail joins the candidates
        tail = z[:, nblocks * _TOPK_BLOCK :]
        candidates = torch.cat([candidates, tail], dim=1)
        row_max = torch.maximum(row_max, tail.amax(-1, keepdim=True))
    return torch.topk(candidates, k, dim=-1, sorted=False).values, row_max


def _fallback_sort(e: Tensor, expected_rank: Tensor, bound: Tensor, sync_free: bool) -> tuple[Tensor, Tensor]:
    """Replace rows whose certified bound exceeds the tolerance by the exact sorted value.

    The one data-dependent step.  ``sync_free=False`` (CPU): sort exactly the flagged rows,
    found with a host-synchronising ``nonzero``.  ``sync_free=True``: sort the
    ``ceil(rows/16)`` rows with the largest bound/tolerance ratio (static shapes) and keep
    the sorted value where the row was flagged.
    """
    ratio = bound / (EXPECTED_RANK_RTOL * expected_rank)  # NaN on non-finite rows: not flagged
    flagged = ratio > 1.0
    if not sync_free:
        idx = flagged.nonzero().squeeze(1)
        if idx.numel():  # host-side branch: the CPU path only
            expected_rank = expected_rank.index_copy(0, idx, expected_rank_sorted(e.index_select(0, idx)))
            bound = bound.index_fill(0, idx, 0.0)
        return expected_rank, bound
    cap = -(-e.shape[0] // _SYNC_FREE_FALLBACK_FRACTION)
    idx = torch.topk(torch.nan_to_num(ratio, nan=-1.0), cap).indices
    take = flagged.gather(0, idx)
    exact = expected_rank_sorted(e.index_select(0, idx))
    expected_rank = expected_rank.scatter(0, idx, torch.where(take, exact, expected_rank.gather(0, idx)))
    bound = bound.scatter(0, idx, torch.where(take, torch.zeros_like(exact), bound.gather(0, idx)))
    return expected_rank, bound


def _chunk_statistics(
    z: Tensor,
    targets: Tensor,
    topk: int,
    exact_expected_rank: bool,
    sync_free: bool,
    ws: _Workspace,
) -> dict[str, Tensor]:
    """All statistics of one contiguous float32 chunk ``z`` [r, V]."""
    rows, vocab = z.shape
    top, row_max = _top_logits(z, min(topk, vocab))
    finite = ~(torch.isnan(row_max) | (row_max == math.inf)).squeeze(1)
    z_target = z.gather(1, targets.unsqueeze(1))

    # rank: one comparison pass; a float 0/1 buffer sums faster than a bool one, and exactly
    rank = torch.ge(z, z_target, out=ws.a[:rows]).sum(-1).long()

    t = torch.sub(z, row_max, out=ws.a[:rows]).clamp_(min=_T_MIN)  # see docs/statistics.md
    e = torch.exp(t, out=ws.e[:rows])
    # S in float64: for a peaked row S = 1 + tiny, and a float32 S would put an absolute
    # error of ~6e-8 into log S, i.e. into an entropy that may itself be ~1e-6.
    s = e.sum(-1, dtype=torch.float64)
    log_s = torch.log(s)
    logp = (z_target - row_max).squeeze(1) - log_s
    entropy = log_s - torch.linalg.vecdot(e, t) / s
    sum_p2 = torch.linalg.vecdot(e, e) / (s * s)

    top = (top - row_max).clamp_(min=_T_MIN).double()  # the top value is 0: exp in (0, 1]
    top_e = torch.exp(top)
    top_s = top_e.sum(-1)
    topk_entropy = torch.log(top_s) - torch.linalg.vecdot(top_e, top) / top_s

    if exact_expected_rank:
        expected_rank = expected_rank_sorted(e)
        bound = torch.zeros_like(expected_rank)
    else:
        expected_rank, bound = _expected_rank_buckets(e, ws)
        expected_rank, bound = _fallback_sort(e, expected_rank, bound, sync_free)

    nan = torch.full((), math.nan, dtype=torch.float64, device=z.device)
    return {  # float32 columns are rounded once, at the end
        "logp": torch.where(finite, logp, nan).float(),
        "entropy": torch.where(finite, entropy, nan).float(),
        "rank": torch.where(finite, rank, 0),
        "expected_rank": torch.where(finite, expected_rank, nan),
        "expected_rank_error_bound": torch.where(finite, bound, nan),
        "topk_entropy": torch.where(finite, topk_entropy, nan).float(),
        "sum_p2": torch.where(finite, sum_p2, nan).float(),
        "finite": finite,
    }


def token_statistics(
    logits: Tensor,
    targets: Tensor,
    *,
    topk: int = TOPK,
    exact_expected_rank: bool = False,
    chunk_rows: int | None = None,
    sync_free: bool | None = None,
) -> dict[str, Tensor]:
    """Per-row statistics of ``softmax(logits)`` [rows, vocab] at ``targets`` [rows].

    Returns tensors of shape [rows] on the logits' device: ``logp`` (natural log p of the
    target), ``entropy`` (nats, full vocabulary), ``topk_entropy`` (softmax renormalised
    over the top-``topk`` logits), ``sum_p2`` (float32); ``rank`` (int64,
    ``#{i: z_i >= z_target}``); ``expected_rank`` and ``expected_rank_error_bound``
    (float64, ``|expected_rank - exact| <= bound <= 1e-7 * expected_rank``); ``finite``
    (bool: no NaN / +inf logit in the row).  Non-finite rows: NaN floats, rank 0.

    ``exact_expected_rank=True`` sorts every row (the naive reference, bound 0).
    ``chunk_rows`` overrides the internal row chunking.  ``sync_free`` (default: True
    off-CPU) avoids every host synchronisation; see docs/statistics.md for what that
    changes in the fallback.  On CPU the numba kernel runs unless ``exact_expected_rank``,
    ``sync_free=True`` or ``REWEIGHT_AUDIT_STATS=torch`` asks for the torch path.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must have shape [{logits.shape[0]}], got {tuple(targets.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    rows, vocab = logits.shape
    device = logits.device
    out = {
        "logp": torch.empty(rows, dtype=torch.float32, device=device),
        "entropy": torch.empty(rows, dtype=torch.float32, device=device),
        "rank": torch.empty(rows, dtype=torch.int64, device=device),
        "expected_rank": torch.empty(rows, dtype=torch.float64, device=device),
        "expected_rank_error_bound": torch.empty(rows, dtype=torch.float64, device=device),
        "topk_entropy": torch.empty(rows, dtype=torch.float32, device=device),
        "sum_p2": torch.empty(rows, dtype=torch.float32, device=device),
        "finite": torch.empty(rows, dtype=torch.bool, device=device),
    }
    if rows == 0 or vocab == 0:
        if vocab == 0 and rows:
            raise ValueError("logits have an empty vocabulary")
        return out
    on_cpu = device.type == "cpu"
    if on_cpu and not exact_expected_rank and not sync_free and backend(vocab) == "numba":
        return _kernel_statistics(logits, targets, out, topk, chunk_rows)
    if sync_free is None:
        sync_free = not on_cpu
    if chunk_rows is None:
        chunk_rows = max(1, (_CPU_CHUNK_ELEMENTS if on_cpu else _DEVICE_CHUNK_ELEMENTS) // vocab)
    chunk_rows = max(1, min(chunk_rows, rows))
    targets = targets.to(device=device, dtype=torch.int64)
    convert = logits.dtype != torch.float32 or not logits.is_contiguous()
    ws = _workspace(chunk_rows, vocab, device, convert)
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        z = logits[start:stop]
        if ws.z is not None:  # upcast (or make contiguous) into a reused buffer
            z = ws.z[: stop - start].copy_(z)
        part = _chunk_statistics(z, targets[start:stop], topk, exact_expected_rank, sync_free, ws)
        for name, value in part.items():
            out[name][start:stop] = value
    return out


_KERNEL: dict[str, ModuleType | None] = {}


def _kernel() -> ModuleType | None:
    """The numba kernel module (compiled or loaded from numba's cache on first use), or None without numba."""
    if "module" not in _KERNEL:
        try:
            from reweight_audit.scoring import stats_kernel
        except ImportError:  # numba missing: the torch path does everything
            stats_kernel = None
        except Exception as exc:  # numba present but unusable here (e.g. no writable cache location)
            warnings.warn(f"the numba statistics kernel is unavailable ({exc}); using the slower torch path", stacklevel=3)
            stats_kernel = None
        _KERNEL["module"] = stats_kernel
    return _KERNEL["module"]


def backend(vocab: int = 0) -> str:
    """The CPU implementation ``token_statistics`` uses for this vocabulary: ``"numba"`` or ``"torch"``.

    Chosen by the environment variable ``REWEIGHT_AUDIT_STATS`` (``auto``, ``torch`` or
    ``numba``); ``auto`` takes the kernel when numba imports and the vocabulary fits it.
    Off-CPU devices, ``exact_expected_rank`` and ``sync_free=True`` always use torch.
    """
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "numba"):
        raise ValueError(f"{BACKEND_ENV}={choice!r}: use auto, torch or numba")
    if choice == "torch":
        return "torch"
    kernel = _kernel()
    if kernel is None:
        if choice == "numba":
            raise ImportError(f"{BACKEND_ENV}=numba but numba cannot be imported; pip install numba")
        return "torch"
    return "numba" if vocab <= kernel.MAX_VOCAB else "torch"


def _kernel_statistics(logits: Tensor, targets: Tensor, out: dict[str, Tensor], topk: int,
                       chunk_rows: int | None) -> dict[str, Tensor]:
    """``token_statistics`` on CPU through the fused kernel; ``out`` holds the empty columns."""
    kernel = _kernel()
    rows, vocab = logits.shape
    targets = targets.to(device=logits.device, dtype=torch.int64).contiguous()
    if rows and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise IndexError(f"targets must lie in [0, {vocab}); got values from {int(targets.min())} to {int(targets.max())}")
    logits = logits.detach()
    ready = logits.dtype == torch.float32 and logits.is_contiguous()
    step = rows if ready else max(1, chunk_rows or _KERNEL_BLOCK_ELEMENTS // vocab)
    budget = kernel.fine_budget(vocab)
    threads = torch.get_num_threads()
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        z = logits[start:stop] if ready else logits[start:stop].float().contiguous()  # upcast a block at a time
        values, finite = kernel.row_statistics(z.numpy(), targets[start:stop].numpy(), min(topk, vocab),
                                               EXPECTED_RANK_RTOL, budget, threads)
        values = torch.from_numpy(values)
        out["finite"][start:stop] = torch.from_numpy(finite)
        out["rank"][start:stop] = values[6].long()
        for i, name in enumerate(("logp", "entropy", "topk_entropy", "sum_p2", "expected_rank", "expected_rank_error_bound")):
            out[name][start:stop] = values[i]  # float32 columns are rounded once, here
    return out

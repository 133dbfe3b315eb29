"""The fused CPU kernel behind :func:`reweight_audit.scoring.stats.token_statistics` (numba).

One thread handles one row at a time and makes five passes over it: a scan (maximum, rank,
non-finite check, block maxima for the top-k), ``e = exp(t)`` with the three sums, coarse
counts, fine slots, and a pass over the slots.  The maths is the torch path's (see
docs/statistics.md); only the schedule differs: rows are handed out one task at a time to
``torch.get_num_threads()`` Python threads that run the kernel without the GIL, so a thread
that the OS deschedules delays nothing but its own row (no barrier per pass).

The first call in a process compiles the kernel (~4 s of CPU time) or loads it from
numba's on-disk cache (``cache=True``: next to this file, else in ``NUMBA_CACHE_DIR`` or the
user's cache directory; ~0.8 s with the import of numba).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit
from numba.core import types
from numba.extending import intrinsic

__all__ = ["MAX_VOCAB", "exp_weights", "fine_budget", "row_statistics"]

# The layout constants are the torch path's (reweight_audit.scoring.stats); they are repeated here as
# plain ints because numba freezes globals at compile time.
_MANT = 23
_T1 = 6
_FLOOR_EXP = -64
_LANES = 16
_K1 = _LANES + (-_FLOOR_EXP << _T1)
_SHIFT1 = _MANT - _T1
_BASE1 = ((127 + _FLOOR_EXP) << _T1) - _LANES + 1
_SUB_MASK = (1 << _SHIFT1) - 1
_SUB_BITS = 15
_PRE_SHIFT = _SHIFT1 - _SUB_BITS
_MAX_SUB = float(1 << _SUB_BITS)
_T_MIN = -87.0
_BLOCK = 64
_ROW_TASK_ELEMENTS = 1 << 18  # logits per task handed to a thread (one Gemma row, five SmolLM2 rows)

# Reductions may be reassociated (that is what lets them vectorise); no nnan/ninf: the
# non-finite checks must survive.
_FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
_COUNT_SHIFT = 43  # a slot's int64: count << 43 | sum of 24-bit mantissas
_COUNT_ONE = 1 << _COUNT_SHIFT
_MASS_MASK = _COUNT_ONE - 1
MAX_VOCAB = 1 << 19  # 2^19 mantissas of 24 bits fit in 43 bits, 2^19 counts in the 20 above
_FLOOR_LIMIT = (_BASE1 + _LANES) << _SHIFT1  # bit patterns below this are in the floor
_N_OUT = 7  # logp, entropy, topk_entropy, sum_p2, expected_rank, bound, rank (as float64)


@intrinsic
def _f32_bits(typingctx, x):
    """The int32 bit pattern of a float32 (a register bitcast; vectorises)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.int32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, x):
    """The float32 whose bit pattern is the int32 ``x``."""
    if x != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.int32), codegen


@njit(inline="always", fastmath={"contract"})
def _exp_bits(t):
    """Bit pattern of ``exp(t)`` as float32 for t in [-87, 0] (Cephes expf, <= 3e-7 relative).

    t = n ln2 + r, |r| <= ln2/2 (ln2 split in two so ``n ln2`` is exact), e^r = 1 + r +
    r^2 P(r), and 2^n is added to the exponent field (n >= -126: never subnormal).  libm's
    scalar ``expf`` does not vectorise without SVML and costs ~20x more.
    """
    n = np.floor(t * np.float32(1.4426950408889634) + np.float32(0.5))
    r = t - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = (p * r) * r + r
    p = p + np.float32(1.0)
    return np.int32(_f32_bits(p) + (np.int32(n) << 23))


@njit(inline="always")
def _coarse(bits, i):
    """Coarse bucket of a float32 bit pattern at position i (floor values go to lane i % 16)."""
    key = min((bits >> _SHIFT1) - _BASE1, _K1 - 1)
    return max(key, i & (_LANES - 1))


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _scan(z, z_target, block_max):
    """Row maximum, ``#{z_i >= z_target}`` and the number of NaN/+inf logits; fills block maxima."""
    vocab = z.shape[0]
    nblocks = vocab // _BLOCK
    row_max = -np.inf
    rank = 0
    bad = 0
    for b in range(nblocks):
        bm = np.float32(-np.inf)
        for i in range(b * _BLOCK, (b + 1) * _BLOCK):
            v = z[i]
            bm = max(bm, v)
            rank += v >= z_target
            bad += (v != v) | (v == np.inf)
        block_max[b] = bm
        row_max = max(row_max, bm)
    for i in range(nblocks * _BLOCK, vocab):
        v = z[i]
        row_max = max(row_max, v)
        rank += v >= z_target
        bad += (v != v) | (v == np.inf)
    return np.float32(row_max), rank, bad


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _exp_pass(z, row_max, ebits):
    """``e = exp(max(z - M, -87))`` into ``ebits`` (as bit patterns); returns sum e, sum e t, sum e^2 (float64)."""
    s = 0.0
    st = 0.0
    s2 = 0.0
    for i in range(z.shape[0]):
        t = max(z[i] - row_max, np.float32(_T_MIN))
        bits = min(_exp_bits(t), np.int32(0x3F800000))  # e <= 1: the top bucket holds exactly 1.0
        ebits[i] = bits
        e = np.float64(_bits_f32(bits))
        s += e
        st += e * np.float64(t)
        s2 += e * e
    return s, st, s2


@njit(inline="always", fastmath=_FASTMATH)
def _approx_cbrt(x):
    """x^(1/3) to ~1e-3 relative for float64 x > 0: an exponent-field guess (~3%) and one Newton step."""
    y = np.float64(_bits_f32(np.int32(_f32_bits(np.float32(x)) // 3 + 709921077)))
    return y - (y * y * y - x) / (3.0 * y * y)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _allocate(ebits, counts, share, cbrt_width, nsub, offset, fine_budget):
    """Coarse counts, then ``n_B ~ (w_B floor(c_B^2/4))^(1/3)`` slices per bucket, scaled to the budget.

    A heuristic (only the final bound must be rigorous, and it is whatever the layout):
    ``n_B = ceil(max(a_B scale, 1))`` exceeds ``a_B scale`` by less than one, so
    ``sum n_B <= K1 + (K2 - K1)(1 - 1e-3) < K2`` whatever the data.  Returns the slots used.
    """
    counts[:] = 0
    for i in range(ebits.shape[0]):
        counts[_coarse(ebits[i], i)] += 1
    total = 0.0
    for b in range(_K1):  # cbrt_width is 0 on the floor lanes and on the e == 1 bucket
        share[b] = 0.0
        if counts[b] >= 2 and cbrt_width[b] > 0.0:  # no pairs, or no width: nothing to split
            c = np.float64(counts[b])
            share[b] = _approx_cbrt(np.floor(c * c * 0.25)) * cbrt_width[b]
            total += share[b]
    scale = (fine_budget - _K1) * (1.0 - 1e-3) / max(total, 1e-300)
    used = 0
    for b in range(_K1):
        n = np.int32(math.ceil(min(max(share[b] * scale, 1.0), _MAX_SUB)))
        nsub[b] = n
        offset[b] = used
        used += n
    return used


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _fine_pass(ebits, nsub, offset, slot_of, acc, top, used):
    """Per fine slot: count, mass and maximum, as exact integers.

    Every slot above the floor lies inside one binade, so its values are ``mant * 2^(E-150)``
    with one exponent E and 24-bit mantissas: one int64 add of ``2^43 + mant`` accumulates
    the count (high bits) and the mantissa sum (low 43 bits), and ``top`` keeps the largest
    bit pattern.  The slot indices are computed first, in a loop of their own: the scatter
    loop is then short, which measured 1.8x faster than one fused loop.  The floor slots
    (0..15) hold garbage here; :func:`_floor_sums` replaces them.
    """
    for i in range(ebits.shape[0]):
        bits = ebits[i]
        b = _coarse(bits, i)
        slot_of[i] = offset[b] + ((((bits & _SUB_MASK) >> _PRE_SHIFT) * nsub[b]) >> _SUB_BITS)
    acc[:used] = 0
    top[:used] = 0
    for i in range(ebits.shape[0]):
        slot = slot_of[i]
        bits = ebits[i]
        acc[slot] += _COUNT_ONE + ((bits & 0x7FFFFF) | 0x800000)
        top[slot] = max(top[slot], bits)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _floor_sums(ebits):
    """Float64 mass and maximum of the values below the lowest coarse bucket (e < 2^-64 (1 + 2^-6))."""
    mass = 0.0
    largest = 0.0
    for i in range(ebits.shape[0]):
        if ebits[i] < _FLOOR_LIMIT:
            e = np.float64(_bits_f32(ebits[i]))
            mass += e
            largest = max(largest, e)
    return mass, largest


@njit(nogil=True, cache=True)
def _slot_sums(vocab, counts, ebits, nsub, offset, acc, top, unit):
    """E[R] = 1 + sum_{i<j} min(p_i, p_j) from the slots, and its certified bound (docs/statistics.md)."""
    # the floor is one slot, the lowest; its count comes from the coarse counts
    c = np.float64(counts[:_LANES].sum())
    m, largest = _floor_sums(ebits) if c > 0.0 else (0.0, 0.0)
    cum = c
    cross = m * ((vocab - 0.5) - 0.5 * c)  # elements strictly above, plus (c - 1)/2 inside the slot
    spread = max(c * largest - m, 0.0)  # D = c M_s - m >= 0 (up to float64 rounding here)
    correction = c * spread
    slack = max(c - 2.0, 0.0) * spread
    total = m
    for b in range(_LANES, _K1):
        for s in range(offset[b], offset[b] + nsub[b]):
            packed = acc[s]
            if packed == 0:
                continue
            count = packed >> _COUNT_SHIFT
            mantissas = packed & _MASS_MASK
            c = np.float64(count)
            m = np.float64(mantissas) * unit[b]  # unit: the value of mantissa 1 in the bucket's binade
            cum += c
            cross += m * ((vocab - 0.5) - (cum - 0.5 * c))
            largest = np.int64((top[s] & 0x7FFFFF) | 0x800000)
            spread = np.float64(count * largest - mantissas) * unit[b]  # D, from exact integers
            correction += c * spread
            slack += max(c - 2.0, 0.0) * spread
            total += m
    return 1.0 + (cross - 0.25 * correction) / total, 0.25 * slack / total


@njit(inline="always")
def _keep_largest(best, n, k, value):
    """Insert ``value`` into ``best[:n]`` (descending, at most k kept); returns the new n.

    A value equal to the k-th largest is not inserted: equal values are interchangeable.
    (numba's np.partition would do, but costs ~6 s of compilation.)
    """
    if n == k:
        if not value > best[k - 1]:
            return n
        j = k - 1
    else:
        j = n
        n += 1
    while j > 0 and best[j - 1] < value:
        best[j] = best[j - 1]
        j -= 1
    best[j] = value
    return n


@njit(nogil=True, cache=True)
def _topk_entropy(z, row_max, block_max, k, best):
    """Entropy of the softmax of the k largest logits.

    The k largest logits all lie in the blocks (of 64) whose maximum reaches the k-th largest
    block maximum, and are >= it: only those are looked at.
    """
    vocab = z.shape[0]
    nblocks = vocab // _BLOCK
    threshold = -np.inf
    if nblocks > k:
        n = 0
        for b in range(nblocks):
            n = _keep_largest(best, n, k, block_max[b])
        threshold = best[k - 1]
    n = 0
    for b in range(nblocks):
        if block_max[b] >= threshold:
            for i in range(b * _BLOCK, (b + 1) * _BLOCK):
                if z[i] >= threshold:
                    n = _keep_largest(best, n, k, z[i])
    for i in range(nblocks * _BLOCK, vocab):
        if z[i] >= threshold:
            n = _keep_largest(best, n, k, z[i])
    s = 0.0
    st = 0.0
    for j in range(k):
        t = np.float64(max(best[j] - row_max, np.float32(_T_MIN)))
        w = math.exp(t)
        s += w
        st += w * t
    return math.log(s) - st / s


@njit(nogil=True, cache=True)
def _rows(z, targets, k, start, stop, out, finite, ebits, best, block_max, counts, share, nsub, offset,
          slot_of, acc, top, tables):
    """All statistics of rows ``start:stop``; ``out[:, row]`` as in ``_N_OUT``, NaN where undefined."""
    vocab = z.shape[1]
    fine_budget = acc.shape[0]
    for row in range(start, stop):
        zr = z[row]
        z_target = zr[targets[row]]
        row_max, rank, bad = _scan(zr, z_target, block_max)
        out[:, row] = np.nan
        finite[row] = bad == 0
        if bad:
            out[6, row] = 0.0  # never a valid rank
            continue
        out[6, row] = rank
        if row_max == -np.inf:  # every logit masked: no distribution
            continue
        s, st, s2 = _exp_pass(zr, row_max, ebits)
        log_s = math.log(s)
        out[0, row] = np.float64(z_target - row_max) - log_s
        out[1, row] = log_s - st / s
        out[2, row] = _topk_entropy(zr, row_max, block_max, min(k, vocab), best)
        out[3, row] = s2 / (s * s)
        used = _allocate(ebits, counts, share, tables[0], nsub, offset, fine_budget)
        _fine_pass(ebits, nsub, offset, slot_of, acc, top, used)
        out[4, row], out[5, row] = _slot_sums(vocab, counts, ebits, nsub, offset, acc, top, tables[1])


@njit(nogil=True, cache=True)
def _weights(z, out):
    block_max = np.empty(z.shape[1] // _BLOCK + 1, np.float32)
    for row in range(z.shape[0]):
        row_max, _, _ = _scan(z[row], z[row, 0], block_max)
        _exp_pass(z[row], row_max, out[row])


def exp_weights(z: np.ndarray) -> np.ndarray:
    """The kernel's float32 ``e = exp(max(z - max z, -87))`` of each row of a finite float32 ``z``
    (what its expected rank and bound refer to; for tests)."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    out = np.empty(z.shape, np.int32)
    _weights(z, out)
    return out.view(np.float32)


def fine_budget(vocab: int) -> int:
    """Fine slots per row (K2): one per coarse bucket, plus V/4 but at most max(16384, V/16).

    The torch path's V/4 made the bound ~1e-9 on Gemma rows, 100x under tolerance, and its
    slots no longer fitted the L2 cache; with 16,384 the bound is still <= 2e-8 on the real
    rows measured (docs/statistics.md), and every slot costs time in every row.
    """
    return _K1 + max(min(vocab // 4, max(16384, vocab // 16)), 4096)


def _bucket_tables() -> np.ndarray:
    """Per coarse bucket, float64 [2, K1]: the cube root of its width in e units (0 for the floor
    lanes and for e == 1), and the value of mantissa 1 in its binade (2^(E - 150))."""
    keys = np.arange(_LANES, _K1 + 1, dtype=np.int64) + _BASE1  # bucket b spans keys b + BASE1 .. + 1
    edges = (keys << _SHIFT1).astype(np.uint32).view(np.float32).astype(np.float64)
    tables = np.zeros((2, _K1))
    tables[0, _LANES:_K1 - 1] = np.cbrt(edges[1:-1] - edges[:-2])
    tables[1, _LANES:] = np.exp2((keys[:-1] >> _T1) - 150.0)
    return tables


_TABLES = _bucket_tables()


class _Workspace:
    """One thread's buffers for rows of one vocabulary (~20 bytes per logit of one row)."""

    def __init__(self, vocab: int, budget: int) -> None:
        self.arrays = (
            np.empty(vocab, np.int32),  # ebits: exp(t) as float32 bit patterns
            np.empty(max(vocab, 1), np.float32),  # the k largest logits
            np.empty(vocab // _BLOCK + 1, np.float32),  # block maxima
            np.empty(_K1, np.int32),  # coarse counts
            np.empty(_K1, np.float64),  # allocation shares
            np.empty(_K1, np.int32),  # slices per bucket
            np.empty(_K1, np.int32),  # first slot of each bucket
            np.empty(vocab, np.int32),  # the fine slot of each logit
            np.empty(budget, np.int64),  # per slot: count << 43 | sum of mantissas
            np.empty(budget, np.int32),  # per slot: largest bit pattern
        )


_LOCK = threading.Lock()  # one call at a time uses the shared workspaces and pool
_STATE: dict = {"pid": None, "pool": None, "pool_size": 0, "spaces": {}}


def _resources(vocab: int, budget: int, workers: int) -> tuple[ThreadPoolExecutor | None, list[_Workspace]]:
    """The thread pool (re-created after a fork: threads do not survive one) and one workspace per worker."""
    if _STATE["pid"] != os.getpid():
        _STATE.update(pid=os.getpid(), pool=None, pool_size=0, spaces={})
    if workers - 1 > _STATE["pool_size"]:
        if _STATE["pool"] is not None:
            _STATE["pool"].shutdown(wait=False)
        _STATE["pool"] = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="reweight-audit-stats")
        _STATE["pool_size"] = workers - 1
    pool = _STATE["pool"]
    spaces = _STATE["spaces"]
    if (vocab, budget) not in spaces:
        spaces.clear()  # one vocabulary at a time: do not hoard memory
        spaces[(vocab, budget)] = []
    have = spaces[(vocab, budget)]
    have.extend(_Workspace(vocab, budget) for _ in range(workers - len(have)))
    return pool, have[:workers]


def row_statistics(z: np.ndarray, targets: np.ndarray, topk: int, rtol: float, budget: int,
                   threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of every row of a C-contiguous float32 ``z`` [rows, vocab] at int64 ``targets``.

    Returns float64 ``[7, rows]`` (logp, entropy, topk_entropy, sum_p2, expected_rank, its
    bound, rank) and the boolean ``finite [rows]``.  Rows go out a task at a time to
    ``threads`` threads (the caller's among them): a slow thread never holds up the others.
    Rows whose bound exceeds ``rtol * expected_rank`` get the exact value of a sort, bound 0.
    """
    rows, vocab = z.shape
    out = np.empty((_N_OUT, rows))
    finite = np.empty(rows, dtype=np.bool_)
    step = max(1, _ROW_TASK_ELEMENTS // vocab)
    workers = max(1, min(threads, -(-rows // step)))
    with _LOCK:
        pool, spaces = _resources(vocab, budget, workers)
        tasks = itertools.count(0, step)  # next() is atomic under the GIL

        def work(space: _Workspace) -> None:
            for start in tasks:
                if start >= rows:
                    return
                _rows(z, targets, topk, start, min(rows, start + step), out, finite, *space.arrays, _TABLES)

        futures = [pool.submit(work, space) for space in spaces[1:]] if workers > 1 else []
        work(spaces[0])
        for future in futures:
            future.result()
    flagged = np.flatnonzero(out[5] > rtol * out[4])  # NaN rows compare False
    if flagged.size:  # rare: the sort runs here, in numpy (numba's sort costs seconds to compile)
        out[4, flagged] = sorted_expected_rank(exp_weights(z[flagged]))
        out[5, flagged] = 0.0
    return out, finite


def sorted_expected_rank(weights: np.ndarray) -> np.ndarray:
    """Exact ``sum_i i p_(i)`` of each row of non-negative float32 ``weights`` (normalised here), float64."""
    ordered = np.sort(weights, axis=1)[:, ::-1].astype(np.float64)
    positions = np.arange(1, weights.shape[1] + 1, dtype=np.float64)
    return (ordered @ positions) / ordered.sum(axis=1)

"""How well a token ranking finds the injected noise (DESIGN.md, "Metrics").

Pure functions: NumPy arrays in, numbers (or arrays) out; no I/O, no state.

Conventions shared by every function
------------------------------------
``scores``
    1-D numbers, one per token; higher means ranked first (more weight).
    NaN is an error, ±inf is allowed.
``is_noise``
    1-D booleans (0/1 integers are accepted); noise is the positive class.
``seq_codes``
    1-D non-negative integer codes, one per token, naming its sequence.
    Any order; the tokens of a sequence need not be contiguous; unused codes
    are harmless.
``k``
    The cut as a fraction in (0, 1] (the command line's ``--k`` percent / 100).
``scope``
    ``"global"``: one top set over the whole pool; ``"sequence"``: the top
    fraction ``k`` of every sequence, the top set is their union.

Top-set size
    ``n_top = floor(k*n + 1/2)`` (round half up, never banker's rounding;
    ``k*n`` is first rounded to 6 decimals so that ``0.29 * 50``, which is
    14.499999999999998 in floating point, counts as 14.5 and gives 15),
    with ``n`` the pool size (global) or the sequence length (sequence).
    There is no minimum of one: ``k*n < 1/2`` gives an empty top
    set, so the realised top share stays as close to ``k`` as rounding allows.

Ties at the cut
    Every metric is the exact expectation under uniformly random
    tie-breaking. With ``c`` the value of the ``n_top``-th highest score,
    ``a`` tokens strictly above ``c`` and ``g`` tokens equal to it, the ``t =
    n_top - a`` remaining slots go to a uniformly random ``t``-subset of the
    ``g`` tied tokens: inclusion probability 1 above ``c``, ``t/g`` at ``c``,
    0 below. A constant score (``sft``) therefore gets exactly the base rate.

Undefined values are NaN, never 0: no noise tokens -> ``tok_rec``,
``seq_hit``, ``lift`` NaN; an empty top set -> ``tok_prec`` and ``lift`` NaN
(``tok_rec`` and ``seq_hit`` are then 0: nothing was found).

Misuse raises :class:`reweight_audit.errors.AuditError` with a one-line
message.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np

from reweight_audit.errors import AuditError

__all__ = [
    "CUTS",
    "SCOPES",
    "TOPK_KEYS",
    "inclusion_probability",
    "topk_metrics",
    "curve",
    "auroc",
    "average_precision",
    "rank_metrics",
    "noise_mass",
    "bootstrap_intervals",
]

CUTS = (0.01, 0.02, 0.05, 0.10, 0.20, 0.30, 0.50)
SCOPES = ("global", "sequence")
TOPK_KEYS = ("tok_prec", "tok_rec", "seq_hit", "lift")

_NAN = float("nan")
_HIT_CHUNK = 1 << 22      # hypergeometric terms evaluated per chunk
_BOOT_CHUNK = 1 << 22     # multiplicity-matrix entries per chunk


# --------------------------------------------------------------------------- validation


def _array(x, name: str) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise AuditError(f"{name} must be a 1-D array ({exc})") from None
    if a.ndim != 1:
        raise AuditError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        raise AuditError(f"{name} is empty; need at least one token")
    return a


def _same_length(a: np.ndarray, name: str, n: int, ref: str) -> None:
    if a.size != n:
        raise AuditError(f"{name} has {a.size} entries but {ref} has {n}; give one per token")


def _check_scores(x, name: str = "scores") -> np.ndarray:
    a = _array(x, name)
    if a.dtype.kind not in "biuf":
        raise AuditError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    nan = np.isnan(a)
    if nan.any():
        raise AuditError(f"{name} contains NaN (first at index {int(np.argmax(nan))}); "
                         f"every token needs a number")
    return a


def _check_labels(x, n: int, name: str = "is_noise", ref: str = "scores") -> np.ndarray:
    a = _array(x, name)
    _same_length(a, name, n, ref)
    if a.dtype.kind == "b":
        return a
    if a.dtype.kind not in "iuf":
        raise AuditError(f"{name} must be boolean, got dtype {a.dtype}")
    bad = (a != 0) & (a != 1)
    if bad.any():
        raise AuditError(f"{name} must be boolean or 0/1, found {a[np.argmax(bad)]!r} "
                         f"at index {int(np.argmax(bad))}")
    return a.astype(bool)


def _check_codes(x, n: int, name: str = "seq_codes") -> tuple[np.ndarray, int]:
    """Validated codes as intp and the number of codes S (codes are 0..S-1)."""
    a = _array(x, name)
    _same_length(a, name, n, "scores")
    if a.dtype.kind not in "iu":
        raise AuditError(f"{name} must be integer codes, got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.min() < 0:
        raise AuditError(f"{name} must be non-negative, found {int(a.min())}")
    top = int(a.max())
    if top >= n:  # gaps larger than the data: renumber instead of allocating max+1 slots
        uniq, inv = np.unique(a, return_inverse=True)
        return inv.astype(np.intp).reshape(-1), int(uniq.size)
    return a.astype(np.intp, copy=False), top + 1


def _check_k(k, name: str = "k") -> float:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Real):
        raise AuditError(f"{name} must be a number in (0, 100] percent (a fraction in (0, 1]), got {k!r}")
    k = float(k)
    if not (0.0 < k <= 1.0):
        raise AuditError(f"{name} must be in (0, 100] percent (a fraction in (0, 1]), got {k * 100:g}%")
    return k


def _check_scope(scope) -> str:
    if not isinstance(scope, str) or scope not in SCOPES:
        raise AuditError(f"scope must be 'global' or 'sequence', got {scope!r}")
    return scope


def _inputs(scores, is_noise, seq_codes):
    s = _check_scores(scores)
    y = _check_labels(is_noise, s.size)
    codes, n_codes = _check_codes(seq_codes, s.size)
    return s, y, codes, n_codes


# --------------------------------------------------------------------------- tie machinery


def _n_top(k: float, n):
    """Top-set size floor(k*n + 1/2), k*n rounded to 6 decimals first (see module doc)."""
    return np.floor(np.round(k * np.asarray(n, dtype=np.float64), 6) + 0.5).astype(np.int64)


def _hit_prob(g, t, b) -> np.ndarray:
    """P(at least one of b marked items is among t drawn without replacement from g).

    ``1 - C(g-b, t) / C(g, t) = 1 - prod_{i<b} (1 - t/(g-i))``, summed as
    ``log1p`` terms: exact to rounding for any g (no cancellation of large
    log-gammas). Elementwise over broadcast integer arrays, 0 <= b <= g, 0 <= t <= g.
    """
    g, t, b = (np.asarray(v, dtype=np.int64) for v in (g, t, b))
    g, t, b = np.broadcast_arrays(g, t, b)
    out = np.zeros(g.shape, dtype=np.float64)
    sure = b > g - t                       # fewer unmarked items than draws
    out[sure] = 1.0
    todo = np.flatnonzero(~sure & (b > 0) & (t > 0))
    if todo.size == 0:
        return out
    gg, tt, bb = g.ravel()[todo], t.ravel()[todo], b.ravel()[todo]
    ends = np.cumsum(bb)
    logmiss = np.empty(todo.size, dtype=np.float64)
    lo = 0
    while lo < todo.size:                  # chunks of ~_HIT_CHUNK terms, not a loop over units
        base = ends[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, base + _HIT_CHUNK, side="right")))
        cnt = bb[lo:hi]
        unit = np.repeat(np.arange(hi - lo), cnt)
        i = np.arange(unit.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        terms = np.log1p(-tt[lo:hi][unit] / (gg[lo:hi][unit] - i))
        logmiss[lo:hi] = np.bincount(unit, weights=terms, minlength=hi - lo)
        lo = hi
    out.ravel()[todo] = -np.expm1(logmiss)
    return out


class _GlobalPool:
    """One top set over all tokens. One multi-kth ``np.partition`` serves every cut."""

    def __init__(self, s, y, codes, n_codes, ks):
        self.s, self.n = s, s.size
        kth = sorted({self.n - int(_n_top(k, self.n)) for k in ks} - {self.n})
        self.part = np.partition(s, kth) if kth else s
        self.sn = s[y]
        self.n_noise = int(self.sn.size)
        cy = codes[y]
        self.noise_per_seq = np.bincount(cy, minlength=n_codes)
        self.noisy = np.flatnonzero(self.noise_per_seq)
        # Per sequence, its best noise score m and how many of its noise tokens sit at m:
        # at cut c it hits surely if m > c, never if m < c, else hypergeometrically.
        best = np.full(n_codes, -np.inf)
        np.maximum.at(best, cy, self.sn)
        at_best = self.sn == best[cy]
        self.best = best[self.noisy]
        self.n_at_best = np.bincount(cy[at_best], minlength=n_codes)[self.noisy]

    def cut(self, k):
        """(n_top, cut value, share of the tied tokens taken, expected noise in top, hit prob per noisy seq)."""
        n_top = int(_n_top(k, self.n))
        hit = np.zeros(self.noisy.size)
        if n_top == 0:
            return 0, math.inf, 0.0, 0.0, hit
        c = self.part[self.n - n_top]
        above = int(np.count_nonzero(self.s > c))
        tied = int(np.count_nonzero(self.s == c))
        slots = n_top - above
        frac = slots / tied
        noise_above = int(np.count_nonzero(self.sn > c))
        noise_tied = int(np.count_nonzero(self.sn == c))
        hit[self.best > c] = 1.0
        at = self.best == c
        if at.any():
            hit[at] = _hit_prob(tied, slots, self.n_at_best[at])
        return n_top, c, frac, noise_above + noise_tied * frac, hit


def _segment_sort(values: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """``values`` (consecutive segments of the given lengths) sorted ascending within each segment.

    Segments are laid out as rows of a few padded matrices (rows of one width
    per matrix, widths rounded up by at most 25 %) and sorted with one
    ``ndarray.sort(axis=1)`` per width: O(N log L) for segments of length L,
    and much cheaper than one global comparison sort of (segment, value) pairs.
    """
    n, n_seg = values.size, lens.size
    starts = np.cumsum(lens) - lens
    step = np.ones(n_seg, dtype=np.int64)
    big = lens >= 8
    step[big] = np.left_shift(1, np.floor(np.log2(lens[big])).astype(np.int64) - 2)
    width = -(-lens // step) * step                       # 0 for an empty segment
    by_width = np.argsort(width, kind="stable")
    w_sorted = width[by_width]
    row_start = np.empty(n_seg, dtype=np.int64)
    row_start[by_width] = np.cumsum(w_sorted) - w_sorted
    total = int(w_sorted.sum())
    index = np.int32 if total < 2**31 else np.int64
    dest = np.repeat((row_start - starts).astype(index), lens)
    dest += np.arange(n, dtype=index)
    buf = np.full(total, np.inf)                          # +inf padding sorts last
    buf[dest] = values
    edges = np.r_[0, np.flatnonzero(np.diff(w_sorted)) + 1, n_seg]
    for a, b in zip(edges[:-1], edges[1:]):               # one sort per distinct width
        w = int(w_sorted[a])
        if w > 1:
            off = int(row_start[by_width[a]])
            buf[off:off + (b - a) * w].reshape(b - a, w).sort(axis=1)
    return buf[dest]


def _segment_search(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, x: np.ndarray, right: bool) -> np.ndarray:
    """Per segment, the first index in [lo, hi) with ``v >= x`` (``v > x`` if right), else hi.

    ``v`` is sorted within every [lo, hi); a vectorised bisection, O(S log L).
    """
    lo = np.array(lo, dtype=np.int64)
    hi = np.array(hi, dtype=np.int64)
    idx = np.flatnonzero(lo < hi)
    while idx.size:
        a, b = lo[idx], hi[idx]
        mid = (a + b) >> 1
        up = v[mid] <= x[idx] if right else v[mid] < x[idx]
        a = np.where(up, mid + 1, a)
        b = np.where(up, b, mid)
        lo[idx], hi[idx] = a, b
        idx = idx[a < b]
    return lo


def _group_order(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """A stable permutation that makes equal codes contiguous (LSD radix on 16-bit digits)."""
    if n_codes <= 1 << 16:
        return np.argsort(codes.astype(np.uint16), kind="stable")
    if n_codes > 1 << 32:  # pragma: no cover - more sequences than any corpus
        return np.argsort(codes, kind="stable")
    order = np.argsort((codes & 0xFFFF).astype(np.uint16), kind="stable")
    return order[np.argsort((codes[order] >> 16).astype(np.uint16), kind="stable")]


class _SequencePool:
    """Top fraction of every sequence; one within-sequence sort serves every cut.

    Tokens are grouped by sequence (already so in the score table's layout,
    else by a stable radix argsort of the codes) and sorted within sequences
    by :func:`_segment_sort`, all tokens and noise tokens separately. A cut's
    value, tie block and noise counts are then found in every sequence at
    once by vectorised bisection (O(S log L) per cut).
    """

    def __init__(self, s, y, codes, n_codes):
        self.n_codes = n_codes
        len_code = np.bincount(codes, minlength=n_codes)
        brk = np.flatnonzero(codes[1:] != codes[:-1]) + 1
        if brk.size + 1 == np.count_nonzero(len_code):           # every sequence contiguous
            self.seg_code = codes[np.r_[0, brk]]
        else:
            order = _group_order(codes, n_codes)
            s = s[order]
            y = None if y is None else y[order]
            self.seg_code = np.flatnonzero(len_code)
        self.len = len_code[self.seg_code]
        self.start = np.cumsum(self.len) - self.len
        self.v = _segment_sort(s, self.len)
        if y is None:
            self.nlen = np.zeros(self.len.size, dtype=np.int64)
            self.vn = np.zeros(0)
        else:
            self.nlen = np.add.reduceat(y.view(np.uint8), self.start, dtype=np.int64)
            self.vn = _segment_sort(s[y], self.nlen)
        self.nstart = np.cumsum(self.nlen) - self.nlen

    def cut(self, k):
        """Per sequence code: top count, cut value, share of tied tokens taken, expected noise in top, hit prob."""
        n_top = _n_top(k, self.len)
        cval = np.full(self.n_codes, np.inf)
        frac = np.zeros(self.n_codes)
        q = np.zeros(self.n_codes)
        hit = np.zeros(self.n_codes)
        act = np.flatnonzero(n_top)
        if act.size:
            start = self.start[act]
            end = start + self.len[act]
            take = n_top[act]
            at = end - take                               # the take-th highest of the segment
            c = self.v[at]
            left = _segment_search(self.v, start, at, c, right=False)
            right = _segment_search(self.v, at + 1, end, c, right=True)
            tied = right - left
            slots = take - (end - right)
            code = self.seg_code[act]
            cval[code] = c
            frac[code] = slots / tied
            if self.vn.size:
                nstart = self.nstart[act]
                nend = nstart + self.nlen[act]
                nl = _segment_search(self.vn, nstart, nend, c, right=False)
                nr = _segment_search(self.vn, nl, nend, c, right=True)
                n_above = nend - nr
                n_tied = nr - nl
                q[code] = n_above + n_tied * (slots / tied)
                h = np.where(n_above > 0, 1.0, 0.0)
                maybe = (n_above == 0) & (n_tied > 0)
                h[maybe] = _hit_prob(tied[maybe], slots[maybe], n_tied[maybe])
                hit[code] = h
        top = np.zeros(self.n_codes, dtype=np.int64)
        top[self.seg_code] = n_top
        return top, cval, frac, q, hit


def _summary(n, n_noise, n_noisy_seqs, n_top, exp_noise, hit_sum) -> dict[str, float]:
    prec = exp_noise / n_top if n_top > 0 else _NAN
    rec = exp_noise / n_noise if n_noise > 0 else _NAN
    seq_hit = hit_sum / n_noisy_seqs if n_noisy_seqs > 0 else _NAN
    lift = prec / (n_noise / n) if n_noise > 0 and n_top > 0 else _NAN
    return {"tok_prec": float(prec), "tok_rec": float(rec), "seq_hit": float(seq_hit), "lift": float(lift)}


def _evaluate(s, y, codes, n_codes, ks, scope) -> dict[float, dict[str, float]]:
    n, n_noise = s.size, int(np.count_nonzero(y))
    out = {}
    if scope == "global":
        pool = _GlobalPool(s, y, codes, n_codes, ks)
        for k in ks:
            n_top, _, _, exp_noise, hit = pool.cut(k)
            out[k] = _summary(n, n_noise, pool.noisy.size, n_top, exp_noise, hit.sum())
    else:
        pool = _SequencePool(s, y, codes, n_codes)
        n_noisy = int(np.count_nonzero(pool.nlen))
        for k in ks:
            n_top, _, _, q, hit = pool.cut(k)
            out[k] = _summary(n, n_noise, n_noisy, int(n_top.sum()), q.sum(), hit.sum())
    return out


# --------------------------------------------------------------------------- public API


def inclusion_probability(scores: np.ndarray, k: float, groups: np.ndarray | None = None) -> np.ndarray:
    """P(token in the top set) under uniformly random tie-breaking.

    ``groups=None``: one top set of ``n_top = floor(k*N + 1/2)`` tokens.
    ``groups`` (integer codes): the top ``floor(k*n_s + 1/2)`` of every group.
    Tokens strictly above the cut value get 1, strictly below 0, tied at it
    ``(slots left) / (number tied)``; the probabilities sum to ``n_top``.
    """
    s = _check_scores(scores)
    k = _check_k(k)
    if groups is None:
        n = s.size
        n_top = int(_n_top(k, n))
        p = np.zeros(n)
        if n_top == 0:
            return p
        c = np.partition(s, n - n_top)[n - n_top]
        above = s > c
        tied = s == c
        p[above] = 1.0
        p[tied] = (n_top - np.count_nonzero(above)) / np.count_nonzero(tied)
        return p
    codes, n_codes = _check_codes(groups, s.size, "groups")
    _, cval, frac, _, _ = _SequencePool(s, None, codes, n_codes).cut(k)
    c = cval[codes]
    return np.where(s > c, 1.0, np.where(s == c, frac[codes], 0.0))


def topk_metrics(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, k: float,
                 scope: str = "global") -> dict[str, float]:
    """Token precision, token recall, sequence hit rate and lift of the top-k set.

    With ``p_i`` the inclusion probability (:func:`inclusion_probability`):
    ``tok_prec = sum_noise p / sum p``, ``tok_rec = sum_noise p / #noise``,
    ``lift = tok_prec / (#noise / N)``, ``seq_hit`` = mean over sequences with
    >= 1 noise token of P(>= 1 of its noise tokens in the top set). That last
    probability is 1 with a noise token strictly above the cut, else, with b of
    its noise tokens among the g tokens tied at the cut for t slots,
    ``1 - C(g-b, t) / C(g, t)`` (hypergeometric; the tie group is the pool's in
    global scope, the sequence's own in sequence scope).
    """
    s, y, codes, n_codes = _inputs(scores, is_noise, seq_codes)
    k = _check_k(k)
    return _evaluate(s, y, codes, n_codes, (k,), _check_scope(scope))[k]


def curve(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray,
          cuts: Iterable[float] = CUTS, scope: str = "global") -> dict[float, dict[str, float]]:
    """:func:`topk_metrics` at every cut, keyed by ``float(cut)`` in the order given.

    One partition (global) or one within-sequence sort (sequence) serves every cut.
    """
    s, y, codes, n_codes = _inputs(scores, is_noise, seq_codes)
    try:
        ks = [_check_k(c, "every cut") for c in cuts]
    except TypeError:
        raise AuditError(f"cuts must be a sequence of fractions in (0, 1], got {cuts!r}") from None
    if not ks:
        raise AuditError("cuts is empty; give at least one cut")
    res = _evaluate(s, y, codes, n_codes, tuple(dict.fromkeys(ks)), _check_scope(scope))
    return {k: dict(res[k]) for k in ks}


def _positive_table(scores, is_noise):
    """Sorted scores, and per distinct noise score v: v, its noise count, #noise < v."""
    s = _check_scores(scores)
    y = _check_labels(is_noise, s.size)
    asc = np.sort(s)
    pos = np.sort(s[y])
    if pos.size == 0:
        return asc, pos, pos, np.zeros(0, np.int64)
    first = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    mult = np.diff(np.r_[first, pos.size])
    return asc, pos[first], mult, first


def _auroc(asc, v, mult, pos_below) -> float:
    n = asc.size
    n_pos = int(mult.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return _NAN
    left = asc.searchsorted(v, side="left")
    right = asc.searchsorted(v, side="right")
    neg_below = left - pos_below
    neg_tied = right - left - mult
    twice_u = int(np.sum(mult * (2 * neg_below + neg_tied)))   # exact in int64
    return twice_u / (2.0 * n_pos * n_neg)


def _average_precision(asc, v, mult, pos_below) -> float:
    n_pos = int(mult.sum())
    if n_pos == 0:
        return _NAN
    tp = n_pos - pos_below                       # noise with score >= v
    ranked = asc.size - asc.searchsorted(v, side="left")   # tokens with score >= v
    return float(np.sum(mult * (tp / ranked)) / n_pos)


def auroc(scores: np.ndarray, is_noise: np.ndarray) -> float:
    """Area under the ROC curve, noise positive: ``P(s_noise > s_clean) + P(tie)/2``.

    Equals ``sklearn.metrics.roc_auc_score`` (ties as average ranks); computed
    exactly from the Mann-Whitney U in integers. NaN if either class is absent.
    """
    return _auroc(*_positive_table(scores, is_noise))


def average_precision(scores: np.ndarray, is_noise: np.ndarray) -> float:
    """``AP = sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds, noise positive.

    Equals ``sklearn.metrics.average_precision_score`` (tied scores form one
    threshold, no interpolation). NaN without noise tokens; 1 without clean ones.
    """
    return _average_precision(*_positive_table(scores, is_noise))


def rank_metrics(scores: np.ndarray, is_noise: np.ndarray) -> dict[str, float]:
    """``{"auroc": ..., "ap": ...}`` from one sort (same values as :func:`auroc`, :func:`average_precision`)."""
    table = _positive_table(scores, is_noise)
    return {"auroc": _auroc(*table), "ap": _average_precision(*table)}


def _check_weights(weights, n: int | None = None) -> np.ndarray:
    w = _check_scores(weights, "weights")
    if n is not None:
        _same_length(w, "weights", n, "scores")
    if not np.isfinite(w).all():
        raise AuditError(f"weights must be finite, found {w[~np.isfinite(w)][0]} "
                         f"at index {int(np.argmax(~np.isfinite(w)))}")
    if (w < 0).any():
        raise AuditError(f"weights must be non-negative, found {w[w < 0][0]:g} at index {int(np.argmax(w < 0))}")
    return w


def noise_mass(weights: np.ndarray, is_noise: np.ndarray) -> tuple[float, float]:
    """``(share, ratio)``: ``share = sum_noise w / sum w``, ``ratio = share / (#noise / N)``.

    ``ratio > 1``: the method puts more than its token share of weight on
    noise. ``share`` is NaN when ``sum w = 0``; ``ratio`` also when there is no noise.
    """
    w = _check_weights(weights)
    y = _check_labels(is_noise, w.size, ref="weights")
    total = float(w.sum())
    n_noise = int(np.count_nonzero(y))
    share = float(w[y].sum()) / total if total > 0 else _NAN
    ratio = share / (n_noise / y.size) if n_noise > 0 else _NAN
    return share, ratio


def bootstrap_intervals(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, k: float,
                        scope: str = "global", weights: np.ndarray | None = None, n_boot: int = 200,
                        seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over sequences for the :func:`topk_metrics` keys.

    With ``weights``, also ``noise_mass`` and ``noise_mass_ratio`` (:func:`noise_mass`).

    Sequences (the S codes that occur, in code order) are the resampling unit.
    Replicate ``b`` takes the sequences ``rng.integers(0, S, size=S)`` from
    the ``b``-th such call on ``rng = np.random.default_rng(seed)``; each
    statistic is a ratio of sums of per-sequence aggregates (expected noise in
    the top set, expected top count, noise count, hit probability, length,
    weight sums), evaluated as multiplicity-matrix products. The cut is held
    at the full-sample cut, so in global scope the interval is conditional on
    the cut value; in sequence scope every sequence has its own cut and the
    replicate equals :func:`topk_metrics` on the resampled data exactly.
    Replicates where a statistic is undefined (e.g. no noisy sequence drawn)
    are left out of its quantiles; an interval is (NaN, NaN) when every
    replicate is undefined.
    """
    s, y, codes, n_codes = _inputs(scores, is_noise, seq_codes)
    k = _check_k(k)
    scope = _check_scope(scope)
    if isinstance(n_boot, (bool, np.bool_)) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise AuditError(f"n_boot must be a positive integer, got {n_boot!r}")
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise AuditError(f"level must be in (0, 1), got {level!r}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise AuditError(f"seed must be a non-negative integer, got {seed!r}")
    w = None if weights is None else _check_weights(weights, s.size)

    length = np.bincount(codes, minlength=n_codes).astype(np.float64)
    n_noise = np.bincount(codes[y], minlength=n_codes).astype(np.float64)
    if scope == "global":
        pool = _GlobalPool(s, y, codes, n_codes, (k,))
        n_top, c, frac, _, hit_noisy = pool.cut(k)
        if n_top:
            p = (s > c).astype(np.float64)
            p[s == c] = frac
        else:
            p = np.zeros(s.size)
        top = np.bincount(codes, weights=p, minlength=n_codes)
        found = np.bincount(codes[y], weights=p[y], minlength=n_codes)
        hit = np.zeros(n_codes)
        hit[pool.noisy] = hit_noisy
    else:
        n_top_s, _, _, found, hit = _SequencePool(s, y, codes, n_codes).cut(k)
        top = n_top_s.astype(np.float64)
    noisy = (n_noise > 0).astype(np.float64)
    cols = [found, top, n_noise, length, hit * noisy, noisy]
    if w is not None:
        cols += [np.bincount(codes, weights=w, minlength=n_codes),
                 np.bincount(codes[y], weights=w[y], minlength=n_codes)]
    present = length > 0
    agg = np.column_stack(cols)[present]            # [S, columns]
    n_seq = agg.shape[0]

    rng = np.random.default_rng(seed)
    sums = np.empty((n_boot, agg.shape[1]))
    rows = max(1, _BOOT_CHUNK // n_seq)
    mult = np.empty((min(rows, n_boot), n_seq))
    for lo in range(0, n_boot, rows):
        hi = min(n_boot, lo + rows)
        for r in range(hi - lo):                      # one draw per replicate (see docstring)
            mult[r] = np.bincount(rng.integers(0, n_seq, size=n_seq), minlength=n_seq)
        sums[lo:hi] = mult[: hi - lo] @ agg

    with np.errstate(divide="ignore", invalid="ignore"):
        base = sums[:, 2] / sums[:, 3]
        prec = np.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1], np.nan)
        stats = {
            "tok_prec": prec,
            "tok_rec": np.where(sums[:, 2] > 0, sums[:, 0] / sums[:, 2], np.nan),
            "seq_hit": np.where(sums[:, 5] > 0, sums[:, 4] / sums[:, 5], np.nan),
            "lift": np.where(base > 0, prec / base, np.nan),
        }
        if w is not None:
            share = np.where(sums[:, 6] > 0, sums[:, 7] / sums[:, 6], np.nan)
            stats["noise_mass"] = share
            stats["noise_mass_ratio"] = np.where(base > 0, share / base, np.nan)
    q = ((1 - level) / 2, 1 - (1 - level) / 2)
    out = {}
    for name, vals in stats.items():
        vals = vals[~np.isnan(vals)]
        lo, hi = np.quantile(vals, q) if vals.size else (_NAN, _NAN)
        out[name] = (float(lo), float(hi))
    return out

"""The top-k cut with ties, once: which tokens are in the top k, fractionally where tied at the boundary.

The rule (``docs/metrics.md``): the top set of a pool of n tokens has
``top_size(k, n) = floor(k*n + 1/2)`` tokens (``k*n`` rounded to 6 decimals
first). Its cut value c is the ``n_top``-th highest score; tokens above c are
in it, tokens below are out, and the ``tied`` tokens at c share the ``slots``
left (``n_top − #above``): each is in with probability ``slots / tied``, the
exact expectation under uniformly random tie-breaking. A :class:`Cut` holds
(n_top, c, tied, slots) of one pool (global scope) or of every sequence
(sequence scope, arrays indexed by sequence code) and derives from them every
expectation a metric needs: inclusion probabilities, expected counts of a
subset in the top set, and the probability that a group has a member in it.

Three layouts find the cut value: :class:`GlobalTopK` (one multi-kth
partition for every cut), :class:`SequenceTopK` (one within-sequence sort) and
:func:`sorted_cut` (a pool known only through counts of a sorted copy, as
:class:`~reweight_audit.evaluation.metrics.ScoreIndex` holds it). Imports
:mod:`reweight_audit.core` and the package's declarations and checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from reweight_audit.evaluation.metrics.checks import check_codes, check_k, check_scores

_HIT_CHUNK = 1 << 22      # hypergeometric terms evaluated per chunk


def top_size(k: float, n: Any) -> Any:
    """Top-set size floor(k*n + 1/2), k*n rounded to 6 decimals first (elementwise over ``n``)."""
    return np.floor(np.round(k * np.asarray(n, dtype=np.float64), 6) + 0.5).astype(np.int64)


def hit_probability(g: Any, t: Any, b: Any) -> np.ndarray:
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


@dataclass(frozen=True)
class Cut:
    """The top set at one cut: scalars for one pool, or arrays with one entry per sequence code.

    An empty top set (``n_top`` 0) has ``value`` +inf and no tied tokens or slots.
    """

    n_top: Any    # tokens in the top set
    value: Any    # the cut value c: the n_top-th highest score
    tied: Any     # tokens scoring exactly c
    slots: Any    # top-set places left to the tied tokens: n_top − #(score > c)

    @classmethod
    def empty(cls) -> "Cut":
        return cls(0, math.inf, 0, 0)

    @property
    def share(self) -> Any:
        """Each tied token's probability of being in the top set, ``slots / tied`` (0 for an empty top set)."""
        if np.ndim(self.tied) == 0:
            return self.slots / self.tied if self.tied else 0.0
        return np.divide(self.slots, self.tied, out=np.zeros(np.shape(self.tied)), where=self.tied > 0)

    def inclusion(self, s: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        """P(token in the top set) of each score ``s`` (``groups``: each token's sequence code, per-sequence cuts)."""
        c, share = (self.value, self.share) if groups is None else (self.value[groups], self.share[groups])
        return np.where(s > c, 1.0, np.where(s == c, share, 0.0))

    def expected(self, n_above: Any, n_tied: Any) -> Any:
        """Expected members of a subset in the top set, from its members above and tied at the cut."""
        return n_above + n_tied * self.share

    def hit(self, n_above: Any, n_tied: Any) -> np.ndarray:
        """Per group, P(>= 1 of its members in the top set): 1 with a member above the cut, else
        hypergeometric over the tied block (:func:`hit_probability`); ``n_above``/``n_tied`` per group."""
        n_above, n_tied = np.asarray(n_above), np.asarray(n_tied)
        out = np.where(n_above > 0, 1.0, 0.0)
        maybe = (n_above == 0) & (n_tied > 0) & (np.asarray(self.slots) > 0)
        if maybe.any():
            g, t = (np.broadcast_to(np.asarray(v), out.shape)[maybe] for v in (self.tied, self.slots))
            out[maybe] = hit_probability(g, t, n_tied[maybe])
        return out


class GlobalTopK:
    """One top set over all tokens. One multi-kth ``np.partition`` serves every cut of ``ks``.

    With marked tokens ``y`` (noise) and their sequence codes, also the expected marked tokens in the top set
    (:meth:`found`) and each marked sequence's hit probability (:meth:`hits`).
    """

    def __init__(self, s: np.ndarray, ks: tuple[float, ...], y: np.ndarray | None = None,
                 codes: np.ndarray | None = None, n_codes: int = 0):
        self.s, self.n = s, s.size
        kth = sorted({self.n - int(top_size(k, self.n)) for k in ks} - {self.n})
        self.part = np.partition(s, kth) if kth else s
        if y is not None:
            self._mark(s[y], codes[y], n_codes)

    def _mark(self, sn: np.ndarray, cy: np.ndarray, n_codes: int) -> None:
        self.sn = sn
        self.noise_per_seq = np.bincount(cy, minlength=n_codes)
        self.noisy = np.flatnonzero(self.noise_per_seq)
        # Per sequence, its best noise score m and how many of its noise tokens sit at m:
        # at cut c it hits surely if m > c, never if m < c, else hypergeometrically.
        best = np.full(n_codes, -np.inf)
        np.maximum.at(best, cy, sn)
        at_best = sn == best[cy]
        self.best = best[self.noisy]
        self.n_at_best = np.bincount(cy[at_best], minlength=n_codes)[self.noisy]

    def cut(self, k: float) -> Cut:
        n_top = int(top_size(k, self.n))
        if n_top == 0:
            return Cut.empty()
        c = self.part[self.n - n_top]
        above = int(np.count_nonzero(self.s > c))
        return Cut(n_top, c, int(np.count_nonzero(self.s == c)), n_top - above)

    def found(self, cut: Cut) -> float:
        """Expected marked tokens in the top set."""
        if cut.n_top == 0:
            return 0.0
        return cut.expected(int(np.count_nonzero(self.sn > cut.value)), int(np.count_nonzero(self.sn == cut.value)))

    def hits(self, cut: Cut) -> np.ndarray:
        """Per marked sequence (codes ``noisy``, ascending), P(>= 1 of its marked tokens in the top set)."""
        if cut.n_top == 0:
            return np.zeros(self.noisy.size)
        return cut.hit(self.best > cut.value, np.where(self.best == cut.value, self.n_at_best, 0))


def sorted_cut(candidates: np.ndarray, count_ge: Callable[[float], int], count_gt: Callable[[float], int],
               n_top: int) -> Cut:
    """The cut of a pool known through counts: ``count_ge(v)``/``count_gt(v)`` pool tokens score >= v / > v.

    ``candidates`` is ascending and holds every pool value (and maybe others); the
    cut value is the largest candidate with ``count_ge >= n_top``, which is a pool value.
    """
    if n_top == 0:
        return Cut.empty()
    lo, hi = 0, candidates.size - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_ge(candidates[mid]) >= n_top:
            lo = mid
        else:
            hi = mid - 1
    c = candidates[lo]
    above = count_gt(c)
    return Cut(n_top, c, count_ge(c) - above, n_top - above)


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


class SequenceTopK:
    """The top fraction of every sequence; one within-sequence sort serves every cut.

    Tokens are grouped by sequence (already so in the score table's layout,
    else by a stable radix argsort of the codes) and sorted within sequences
    by :func:`_segment_sort`, all tokens and marked (noise) tokens separately.
    A cut's value, tie block and marked counts are then found in every sequence
    at once by vectorised bisection (O(S log L) per cut).
    """

    def __init__(self, s: np.ndarray, y: np.ndarray | None, codes: np.ndarray, n_codes: int):
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

    def cut(self, k: float) -> Cut:
        """Per sequence code: the cut of its own top ``top_size(k, length)`` tokens."""
        n_top = top_size(k, self.len)
        out = Cut(np.zeros(self.n_codes, dtype=np.int64), np.full(self.n_codes, np.inf),
                  np.zeros(self.n_codes, dtype=np.int64), np.zeros(self.n_codes, dtype=np.int64))
        out.n_top[self.seg_code] = n_top
        act = np.flatnonzero(n_top)
        if act.size:
            start = self.start[act]
            end = start + self.len[act]
            at = end - n_top[act]                             # the take-th highest of the segment
            c = self.v[at]
            left = _segment_search(self.v, start, at, c, right=False)
            right = _segment_search(self.v, at + 1, end, c, right=True)
            code = self.seg_code[act]
            out.value[code] = c
            out.tied[code] = right - left
            out.slots[code] = n_top[act] - (end - right)
        return out

    def marked(self, cut: Cut) -> tuple[np.ndarray, np.ndarray]:
        """Per sequence code, its marked tokens above the cut and tied at it (0 where its top set is empty)."""
        n_above = np.zeros(self.n_codes, dtype=np.int64)
        n_tied = np.zeros(self.n_codes, dtype=np.int64)
        act = np.flatnonzero(cut.n_top[self.seg_code])
        if act.size and self.vn.size:
            code = self.seg_code[act]
            nstart = self.nstart[act]
            nend = nstart + self.nlen[act]
            c = cut.value[code]
            nl = _segment_search(self.vn, nstart, nend, c, right=False)
            nr = _segment_search(self.vn, nl, nend, c, right=True)
            n_above[code] = nend - nr
            n_tied[code] = nr - nl
        return n_above, n_tied


def inclusion_probability(scores: np.ndarray, k: float, groups: np.ndarray | None = None) -> np.ndarray:
    """P(token in the top set) under uniformly random tie-breaking.

    ``groups=None``: one top set of ``n_top = floor(k*N + 1/2)`` tokens.
    ``groups`` (integer codes): the top ``floor(k*n_s + 1/2)`` of every group.
    Tokens strictly above the cut value get 1, strictly below 0, tied at it
    ``(slots left) / (number tied)``; the probabilities sum to ``n_top``.
    """
    s = check_scores(scores)
    k = check_k(k)
    if groups is None:
        return GlobalTopK(s, (k,)).cut(k).inclusion(s)
    codes, n_codes = check_codes(groups, s.size, "groups")
    return SequenceTopK(s, None, codes, n_codes).cut(k).inclusion(s, codes)

"""How well a ranking of tokens finds the injected noise: every metric, and the one table that declares them.

Pure functions: NumPy arrays in, numbers (or arrays) out; no I/O, no state
besides :data:`METRICS`. A metric is one function plus one :class:`MetricSpec`
in :data:`METRICS`; tables, curves, per-kind rows, bootstrap intervals and
every export are generated from that table.

Conventions (definitions and proofs: ``docs/metrics.md``): ``scores`` are
1-D, higher ranks first, NaN is an error; ``is_noise`` is the positive
class; ``seq_codes`` name each token's sequence (any order, any codes);
``k`` is the cut as a fraction in (0, 1]; ``scope`` is ``"global"`` (one top
set over the pool) or ``"sequence"`` (the top fraction of every sequence).
The top set has ``floor(k*n + 1/2)`` tokens (``k*n`` rounded to 6 decimals
first); ties at the cut count fractionally, the exact expectation under
uniformly random tie-breaking. Undefined values are NaN, never 0. Misuse
raises a one-line :class:`reweight_audit.core.errors.AuditError`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.core.formatting import fmt_interval, fmt_num, k_label

__all__ = [
    "CUTS",
    "SCOPES",
    "RANK_BY",
    "METRICS",
    "Counts",
    "MetricSpec",
    "ScoreIndex",
    "add_metric",
    "ratio",
    "metric_specs",
    "rank_scores",
    "grad_norm",
    "inclusion_probability",
    "topk_metrics",
    "curve",
    "auroc",
    "average_precision",
    "rank_metrics",
    "noise_mass",
    "bootstrap_intervals",
    "SEQUENCE_FIELDS",
    "sequence_counts",
    "counts_of",
    "resampled_sums",
    "bootstrap_multiplicities",
    "stratum_codes",
    "stratified_mean",
    "stratified_metrics",
    "stratified_specs",
    "StratifiedIndex",
    "ranking_metrics",
    "kind_metrics",
]

CUTS = (0.01, 0.02, 0.05, 0.10, 0.20, 0.30, 0.50)
SCOPES = ("global", "sequence")
RANK_BY = ("weight", "loss", "grad")

_NAN = float("nan")
_HIT_CHUNK = 1 << 22      # hypergeometric terms evaluated per chunk
_BOOT_CHUNK = 1 << 22     # multiplicity-matrix entries per chunk


# --------------------------------------------------------------------------- what a metric is


@dataclass(frozen=True)
class Counts:
    """What every count metric is a function of: one ranking's top set at one cut, and its weight sums.

    Scalars for one value; in the bootstrap, arrays with one entry per replicate
    (each field summed over the resampled sequences). Top-set fields are
    expectations under random tie-breaking; the weights are the ranking scores.
    """

    n: Any                        # tokens in the pool
    n_noise: Any                  # noise tokens in the pool
    n_top: Any = _NAN             # tokens in the top set
    found: Any = _NAN             # noise tokens in the top set
    n_noisy_seqs: Any = _NAN      # sequences with at least one noise token
    hits: Any = _NAN              # of those, sequences with a noise token in the top set
    w_total: Any = _NAN           # sum of the scores over the pool
    w_noise: Any = _NAN           # sum of the scores over the noise tokens


@dataclass(frozen=True)
class MetricSpec:
    """One metric: how it is computed, named, shown and bootstrapped (``docs/metrics.md``).

    Exactly one of ``counts`` (a function of :class:`Counts`, vectorised: it
    also runs on the bootstrap's arrays) and ``ranking`` (a function of a
    :class:`ScoreIndex` and a noise kind code, None for all noise).
    """

    name: str                                    # column in table.csv, curves.csv, by_kind.csv, summary.json
    header: str | None                           # printed/Markdown heading, "{k}" -> the cut; None: exports only
    fmt: Callable[[Any, Any, Any], str] | None   # (value, lo, hi) -> table cell
    interval: bool                               # bootstrap interval in columns <name>_lo, <name>_hi
    per_cut: bool                                # a value per cut and scope (curves.csv) rather than per ranking
    counts: Callable[[Counts], Any] | None = None
    ranking: Callable[[Any, int | None], float] | None = None

    def __post_init__(self) -> None:
        if (self.counts is None) == (self.ranking is None):
            raise AuditError(f"metric {self.name!r}: give exactly one of counts= and ranking=")
        if self.ranking is not None and (self.interval or self.per_cut):
            raise AuditError(f"metric {self.name!r}: a ranking metric has neither a cut nor a bootstrap interval")
        if self.header is not None and self.fmt is None:
            raise AuditError(f"metric {self.name!r}: a shown metric (header) needs fmt")


def ratio(num: Any, den: Any) -> Any:
    """num / den where den > 0, else NaN; elementwise."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def precision(c: Counts) -> Any:
    """tok_prec = noise in the top set / size of the top set."""
    return ratio(c.found, c.n_top)


def recall(c: Counts) -> Any:
    """tok_rec = noise in the top set / noise tokens."""
    return ratio(c.found, c.n_noise)


def hit_rate(c: Counts) -> Any:
    """seq_hit = noisy sequences with a noise token in the top set / noisy sequences."""
    return ratio(c.hits, c.n_noisy_seqs)


def lift(c: Counts) -> Any:
    """lift = tok_prec / (noise tokens / tokens)."""
    return ratio(precision(c), ratio(c.n_noise, c.n))


def mass_share(c: Counts) -> Any:
    """noise_mass = sum of the scores over noise / sum over the pool."""
    return ratio(c.w_noise, c.w_total)


def mass_ratio(c: Counts) -> Any:
    """noise_mass_ratio = noise_mass / (noise tokens / tokens); > 1: more than noise's token share."""
    return ratio(mass_share(c), ratio(c.n_noise, c.n))


#: Every metric, in table order. Tables, curves, per-kind rows, intervals and exports follow this list.
METRICS: list[MetricSpec] = [
    MetricSpec("tok_prec", "TOK PREC@{k}", fmt_interval, interval=True, per_cut=True, counts=precision),
    MetricSpec("tok_rec", "TOK REC@{k}", fmt_interval, interval=True, per_cut=True, counts=recall),
    MetricSpec("seq_hit", "SEQ HIT@{k}", fmt_interval, interval=True, per_cut=True, counts=hit_rate),
    MetricSpec("lift", "LIFT@{k}", lambda x, lo, hi: fmt_num(x, 2, "×"), interval=True, per_cut=True, counts=lift),
    MetricSpec("auroc", "AUROC", lambda x, lo, hi: fmt_num(x, 3), interval=False, per_cut=False,
               ranking=lambda index, kind: index.auroc(kind)),
    MetricSpec("ap", "AP", lambda x, lo, hi: fmt_num(x, 3), interval=False, per_cut=False,
               ranking=lambda index, kind: index.average_precision(kind)),
    MetricSpec("noise_mass", None, None, interval=True, per_cut=False, counts=mass_share),
    MetricSpec("noise_mass_ratio", "NOISE MASS ×", lambda x, lo, hi: fmt_num(x, 2), interval=True, per_cut=False,
               counts=mass_ratio),
]


def add_metric(spec: MetricSpec) -> MetricSpec:
    """Declare one more metric (appended to :data:`METRICS`); it then appears in every table and export."""
    if not spec.name.isidentifier() or any(s.name == spec.name for s in METRICS):
        raise AuditError(f"metric {spec.name!r}: give a new name made of letters, digits and underscores")
    METRICS.append(spec)
    return spec


def metric_specs(*, per_cut: bool | None = None, interval: bool | None = None) -> list[MetricSpec]:
    """The declared metrics, in table order, optionally only those with the given properties."""
    return [s for s in METRICS if (per_cut is None or s.per_cut == per_cut)
            and (interval is None or s.interval == interval)]


def _number(x: Any) -> float:
    """A metric value as a float; NaN as the one module-wide NaN object, so equal results compare equal."""
    x = float(x)
    return _NAN if math.isnan(x) else x


def count_values(c: Counts, *, per_cut_only: bool = False) -> dict[str, float]:
    """Every count metric (or only the per-cut ones) of one set of counts, as floats."""
    return {s.name: _number(s.counts(c)) for s in METRICS if s.counts is not None and (s.per_cut or not per_cut_only)}


def ranking_values(index: "ScoreIndex", kind: int | None = None) -> dict[str, float]:
    """Every ranking metric of the pool of ``kind`` (None: all noise) against the clean tokens."""
    return {s.name: _number(s.ranking(index, kind)) for s in METRICS if s.ranking is not None}


# --------------------------------------------------------------------------- what is ranked


def grad_norm(logp: np.ndarray, sum_p2: np.ndarray) -> np.ndarray:
    """‖∂ℓ/∂z‖ of cross-entropy: sqrt((1 − p)² + Σp² − p²), radicand clipped at 0."""
    p = np.exp(np.asarray(logp, dtype=np.float64))
    rad = (1.0 - p) ** 2 + np.asarray(sum_p2, dtype=np.float64) - p * p
    return np.sqrt(np.maximum(rad, 0.0))


def rank_scores(weights: np.ndarray, rank_by: str, logp: np.ndarray | None = None,
                sum_p2: np.ndarray | None = None) -> np.ndarray:
    """What "high weight" means: ``weight`` w, ``loss`` w·(−log p), ``grad`` w·‖∂ℓ/∂z‖."""
    w = np.asarray(weights, dtype=np.float64)
    if rank_by == "weight":
        return w
    if rank_by == "loss":
        nll = -np.minimum(np.asarray(logp, dtype=np.float64), 0.0)
        return w * nll
    if rank_by == "grad":
        return w * grad_norm(logp, sum_p2)
    raise AuditError(f"--rank-by {rank_by!r} is not known; use one of {', '.join(RANK_BY)}")


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


def _evaluate(s, y, codes, n_codes, ks, scope) -> dict[float, Counts]:
    """The top set's counts at every cut of ``ks``: one partition (global) or one within-sequence sort serves all."""
    n, n_noise = s.size, int(np.count_nonzero(y))
    out = {}
    if scope == "global":
        pool = _GlobalPool(s, y, codes, n_codes, ks)
        for k in ks:
            n_top, _, _, found, hit = pool.cut(k)
            out[k] = Counts(n, n_noise, n_top, found, pool.noisy.size, hit.sum())
    else:
        pool = _SequencePool(s, y, codes, n_codes)
        n_noisy = int(np.count_nonzero(pool.nlen))
        for k in ks:
            n_top, _, _, found, hit = pool.cut(k)
            out[k] = Counts(n, n_noise, int(n_top.sum()), found.sum(), n_noisy, hit.sum())
    return out


class ScoreIndex:
    """One ascending sort of a ranking, shared by AUROC, AP and the per-kind global top-k metrics.

    Every quantity these need is a count of tokens by value ("how many clean
    tokens score below v"), which a sorted copy of all scores and a sorted copy
    of the (few) noise scores answer with binary searches. The pool for a
    positive set P is the clean tokens plus P: all noise (``kind=None``) or the
    noise tokens of one kind code (the other kinds leave the pool).
    """

    def __init__(self, scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray | None = None,
                 kind_codes: np.ndarray | None = None):
        scores = np.asarray(scores, dtype=np.float64)
        self.asc = np.sort(scores)
        idx = np.flatnonzero(is_noise)
        sn = scores[idx]
        order = np.argsort(sn, kind="stable")
        self.noise_asc = sn[order]
        self.noise_seq = None if seq_codes is None else np.asarray(seq_codes)[idx][order]
        self.noise_kind = None if kind_codes is None else np.asarray(kind_codes)[idx][order]
        self.n = int(scores.size)
        self.n_clean = self.n - int(idx.size)
        self._tables: dict = {}

    def positives(self, kind: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Sorted scores of the positive set and their sequence codes."""
        if kind is None:
            return self.noise_asc, self.noise_seq
        sel = self.noise_kind == kind
        return self.noise_asc[sel], None if self.noise_seq is None else self.noise_seq[sel]

    def _clean_lt(self, v):
        return self.asc.searchsorted(v, "left") - self.noise_asc.searchsorted(v, "left")

    def _clean_le(self, v):
        return self.asc.searchsorted(v, "right") - self.noise_asc.searchsorted(v, "right")

    def _by_value(self, kind: int | None):
        """Per distinct positive score v: its multiplicity, positives below v, clean below v, clean tied at v."""
        if kind not in self._tables:
            p, _ = self.positives(kind)
            first = np.flatnonzero(np.r_[True, p[1:] != p[:-1]]) if p.size else np.zeros(0, dtype=np.int64)
            v = p[first]
            below = self._clean_lt(v)
            self._tables[kind] = (np.diff(np.r_[first, p.size]), first, below, self._clean_le(v) - below)
        return self._tables[kind]

    def auroc(self, kind: int | None = None) -> float:
        """P(s_pos > s_clean) + P(tie)/2, exactly, from the Mann-Whitney U in integers; NaN without either class."""
        mult, _, below, tied = self._by_value(kind)
        n_p = int(mult.sum())
        if n_p == 0 or self.n_clean == 0:
            return _NAN
        return float(np.sum(mult * (2 * below + tied))) / (2.0 * n_p * self.n_clean)

    def average_precision(self, kind: int | None = None) -> float:
        """Σ_v (positives at v / n_pos) · precision at threshold v, one threshold per distinct score; NaN without positives."""
        mult, pos_below, below, _ = self._by_value(kind)
        n_p = int(mult.sum())
        if n_p == 0:
            return _NAN
        tp = n_p - pos_below
        return float(np.sum(mult * (tp / (tp + (self.n_clean - below))))) / n_p

    def rank_metrics(self, kind: int | None = None) -> dict[str, float]:
        """Every ranking metric (AUROC, AP, ...) of the pool of ``kind`` (None: all noise)."""
        return ranking_values(self, kind)

    def topk_global(self, k: float, kind: int | None = None) -> dict[str, float]:
        """The per-cut metrics of the global top-k of the pool clean ∪ P (ties fractional)."""
        return count_values(self.topk_counts(k, kind), per_cut_only=True)

    def topk_counts(self, k: float, kind: int | None = None) -> Counts:
        """The counts of the global top-k of the pool clean ∪ P (ties fractional); needs ``seq_codes``."""
        p, p_seq = self.positives(kind)
        n_p, n_c = int(p.size), self.n_clean
        noisy, inv = np.unique(p_seq, return_inverse=True)
        n_pool = n_c + n_p
        n_top = int(_n_top(k, n_pool))
        if n_top == 0:
            return Counts(n_pool, n_p, 0, 0.0, noisy.size, 0.0)
        c, tied, slots = self._cut_value(p, n_top)
        p_lo, p_hi = int(p.searchsorted(c, "left")), int(p.searchsorted(c, "right"))
        found = (n_p - p_hi) + (p_hi - p_lo) * (slots / tied)
        best = np.full(noisy.size, -np.inf)
        np.maximum.at(best, inv, p)
        hit = (best > c).astype(np.float64)
        at = best == c
        if at.any():
            b = np.bincount(inv[p_lo:p_hi], minlength=noisy.size)[at]
            hit[at] = _hit_prob(np.full(b.size, tied), np.full(b.size, slots), b)
        return Counts(n_pool, n_p, n_top, found, noisy.size, hit.sum())

    def _cut_value(self, p: np.ndarray, n_top: int) -> tuple[float, int, int]:
        """The cut value c of the pool clean ∪ p, the tokens tied at c and the top-set slots left for them."""
        n_c, n_p = self.n_clean, int(p.size)

        def pool_ge(v):
            return (n_c - self._clean_lt(v)) + (n_p - int(p.searchsorted(v, "left")))

        lo, hi = 0, self.n - 1  # largest i with pool_ge(asc[i]) >= n_top; asc[lo] is then a pool value
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if pool_ge(self.asc[mid]) >= n_top:
                lo = mid
            else:
                hi = mid - 1
        c = self.asc[lo]
        above = (n_c - int(self._clean_le(c))) + (n_p - int(p.searchsorted(c, "right")))
        return c, pool_ge(c) - above, n_top - above


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
    return count_values(_evaluate(s, y, codes, n_codes, (k,), _check_scope(scope))[k], per_cut_only=True)


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
    return {k: count_values(res[k], per_cut_only=True) for k in ks}


def _check_pair(scores, is_noise) -> tuple[np.ndarray, np.ndarray]:
    s = _check_scores(scores)
    return s, _check_labels(is_noise, s.size)


def auroc(scores: np.ndarray, is_noise: np.ndarray) -> float:
    """Area under the ROC curve, noise positive: ``P(s_noise > s_clean) + P(tie)/2``.

    Equals ``sklearn.metrics.roc_auc_score`` (ties as average ranks); computed
    exactly from the Mann-Whitney U in integers. NaN if either class is absent.
    """
    return ScoreIndex(*_check_pair(scores, is_noise)).auroc()


def average_precision(scores: np.ndarray, is_noise: np.ndarray) -> float:
    """``AP = sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds, noise positive.

    Equals ``sklearn.metrics.average_precision_score`` (tied scores form one
    threshold, no interpolation). NaN without noise tokens; 1 without clean ones.
    """
    return ScoreIndex(*_check_pair(scores, is_noise)).average_precision()


def rank_metrics(scores: np.ndarray, is_noise: np.ndarray) -> dict[str, float]:
    """Every ranking metric (``auroc``, ``ap``, ...) from one sort."""
    return ranking_values(ScoreIndex(*_check_pair(scores, is_noise)))


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
    c = Counts(y.size, int(np.count_nonzero(y)), w_total=float(w.sum()), w_noise=float(w[y].sum()))
    return _number(mass_share(c)), _number(mass_ratio(c))


def bootstrap_intervals(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, k: float,
                        scope: str = "global", weights: np.ndarray | None = None, n_boot: int = 200,
                        seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over sequences for every per-cut metric with ``interval``.

    With ``weights``, also the weight metrics (``noise_mass``, ``noise_mass_ratio``).
    Sequences (the S codes that occur, in code order) are the resampling unit.
    Replicate ``b`` takes the sequences ``rng.integers(0, S, size=S)`` from
    the ``b``-th such call on ``rng = np.random.default_rng(seed)``; every
    metric is a function of :class:`Counts` summed over the drawn sequences
    (multiplicity-matrix products). The cut is held at the full-sample cut, so
    in global scope the interval is conditional on the cut value; in sequence
    scope every sequence has its own cut and the replicate equals
    :func:`topk_metrics` on the resampled data exactly. Replicates where a
    metric is undefined are left out of its quantiles; an interval is
    (NaN, NaN) when every replicate is undefined.
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
    names, per_seq = _sequence_counts(s, y, codes, n_codes, k, scope, w)
    reps = Counts(**dict(zip(names, _resampled_sums(per_seq, n_boot, seed).T)))
    specs = [m for m in metric_specs(interval=True) if m.counts is not None and (m.per_cut or w is not None)]
    q = ((1 - level) / 2, 1 - (1 - level) / 2)
    out = {}
    for spec in specs:
        vals = np.asarray(spec.counts(reps), dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        lo, hi = np.quantile(vals, q) if vals.size else (_NAN, _NAN)
        out[spec.name] = (float(lo), float(hi))
    return out


#: The :class:`Counts` fields a sequence contributes, in the column order of :func:`sequence_counts`.
SEQUENCE_FIELDS = ("found", "n_top", "n_noise", "n", "hits", "n_noisy_seqs")


def _per_sequence(s, y, codes, n_codes, ks, scope) -> np.ndarray:
    """[len(ks), n_codes, SEQUENCE_FIELDS]: per sequence code, its share of the top set's counts at every cut.

    One pool (one partition, or one within-sequence sort) serves every cut. Summed over the sequences, the
    fields are the counts of :func:`_evaluate`; summed over a bootstrap replicate's draws, that replicate's.
    """
    length = np.bincount(codes, minlength=n_codes).astype(np.float64)
    n_noise = np.bincount(codes[y], minlength=n_codes).astype(np.float64)
    noisy = (n_noise > 0).astype(np.float64)
    pool = _GlobalPool(s, y, codes, n_codes, ks) if scope == "global" else _SequencePool(s, y, codes, n_codes)
    out = np.empty((len(ks), n_codes, len(SEQUENCE_FIELDS)))
    for i, k in enumerate(ks):
        if scope == "global":
            n_top, c, frac, _, hit_noisy = pool.cut(k)
            p = np.where(s > c, 1.0, np.where(s == c, frac, 0.0)) if n_top else np.zeros(s.size)
            top = np.bincount(codes, weights=p, minlength=n_codes)
            found = np.bincount(codes[y], weights=p[y], minlength=n_codes)
            hit = np.zeros(n_codes)
            hit[pool.noisy] = hit_noisy
        else:
            n_top_s, _, _, found, hit = pool.cut(k)
            top = n_top_s.astype(np.float64)
        out[i] = np.column_stack([found, top, n_noise, length, hit * noisy, noisy])
    return out


def _sequence_counts(s, y, codes, n_codes, k, scope, w) -> tuple[tuple[str, ...], np.ndarray]:
    """Per sequence that occurs, its :class:`Counts` fields at the full-sample cut: (field names, [S, fields])."""
    per = _per_sequence(s, y, codes, n_codes, (k,), scope)[0]
    names, cols = SEQUENCE_FIELDS, [per]
    if w is not None:
        names += ("w_total", "w_noise")
        cols += [np.column_stack([np.bincount(codes, weights=w, minlength=n_codes),
                                  np.bincount(codes[y], weights=w[y], minlength=n_codes)])]
    return names, np.column_stack(cols)[per[:, 3] > 0]


def sequence_counts(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, cuts: Iterable[float],
                    scope: str = "global", n_seqs: int | None = None) -> np.ndarray:
    """Per sequence code 0..n_seqs-1, the :class:`Counts` fields (:data:`SEQUENCE_FIELDS`) at every cut.

    Returns ``[len(cuts), n_seqs, len(SEQUENCE_FIELDS)]``. Summed over axis 1
    it gives each cut's counts (ties fractional, as everywhere); multiplied by
    a bootstrap multiplicity matrix (:func:`resampled_sums`), each replicate's,
    with the cut held at the full-sample cut. ``n_seqs`` (default: the largest
    code + 1) fixes the rows, so that pools of one run (say, one per noise
    kind) share the same sequences and therefore the same bootstrap draws;
    a sequence without tokens in the pool contributes a row of zeros.
    """
    s, y, codes, n_codes = _inputs(scores, is_noise, seq_codes)
    if n_seqs is not None:
        if int(n_seqs) < int(codes.max()) + 1:
            raise AuditError(f"n_seqs {n_seqs} is smaller than the number of sequence codes {int(codes.max()) + 1}")
        codes, n_codes = np.asarray(seq_codes, dtype=np.intp), int(n_seqs)
    ks = tuple(_check_k(c, "every cut") for c in cuts)
    return _per_sequence(s, y, codes, n_codes, ks, _check_scope(scope))


def counts_of(fields: np.ndarray) -> Counts:
    """:class:`Counts` from an array whose last axis is :data:`SEQUENCE_FIELDS` (any leading shape)."""
    fields = np.asarray(fields, dtype=np.float64)
    return Counts(**{name: fields[..., i] for i, name in enumerate(SEQUENCE_FIELDS)})


def resampled_sums(agg: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, columns]``: replicate b's sum of the rows (sequences) of ``agg`` it draws.

    The draws are those of :func:`bootstrap_intervals` for the same number of
    rows and ``seed`` (replicate b is the b-th ``rng.integers(0, S, size=S)``
    on ``np.random.default_rng(seed)``): every column, method and setting
    resampled with the same draws gives paired replicates.
    """
    agg = np.asarray(agg, dtype=np.float64)
    if agg.ndim != 2 or agg.shape[0] == 0:
        raise AuditError(f"resampled_sums needs a 2-D array with one row per sequence, got shape {agg.shape}")
    if isinstance(n_boot, (bool, np.bool_)) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise AuditError(f"n_boot must be a positive integer, got {n_boot!r}")
    return _resampled_sums(agg, int(n_boot), int(seed))


def bootstrap_multiplicities(n_seq: int, n_boot: int, seed: int, chunk: int = _BOOT_CHUNK) -> Iterator[np.ndarray]:
    """The bootstrap's draws, as consecutive blocks of rows of the multiplicity matrix ``[n_boot, n_seq]``.

    Row b counts how often replicate b draws each sequence: the b-th
    ``rng.integers(0, n_seq, size=n_seq)`` on ``rng = np.random.default_rng(seed)``
    (:func:`bootstrap_intervals`). A block has about ``chunk`` entries; it is reused,
    so copy a block to keep it.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, chunk // max(n_seq, 1))
    mult = np.empty((min(rows, n_boot), n_seq))
    for lo in range(0, n_boot, rows):
        hi = min(n_boot, lo + rows)
        for r in range(hi - lo):                      # one draw per replicate (see bootstrap_intervals)
            mult[r] = np.bincount(rng.integers(0, n_seq, size=n_seq), minlength=n_seq)
        yield mult[: hi - lo]


def _resampled_sums(agg: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, fields]: row b sums the rows of ``agg`` drawn by replicate b (see :func:`bootstrap_intervals`)."""
    sums = np.empty((n_boot, agg.shape[1]))
    lo = 0
    for block in bootstrap_multiplicities(agg.shape[0], n_boot, seed):
        sums[lo:lo + block.shape[0]] = block @ agg
        lo += block.shape[0]
    return sums


# --------------------------------------------------------------------------- one ranking, as compare reports it


def ranking_metrics(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, *, k: float,
                    cuts: Iterable[float], scope: str, n_boot: int, seed: int,
                    index: ScoreIndex | None = None) -> tuple[dict[str, float], dict[float, dict[str, float]]]:
    """Every metric of one ranking in one scope: at cut ``k`` with intervals, and the per-cut ones at every cut.

    Returns ``(row, curve)``: ``row`` has every metric of :data:`METRICS` and
    ``<name>_lo``/``<name>_hi`` for those with an interval (NaN when
    ``n_boot`` is 0); ``curve`` maps each cut of ``cuts`` ∪ {k}, ascending,
    to the per-cut metrics. The weights of the weight metrics are the scores.
    ``index`` (:class:`ScoreIndex` of these scores) is built when not given.
    """
    s, y, codes, n_codes = _inputs(scores, is_noise, seq_codes)
    k = _check_k(k)
    all_cuts = tuple(sorted({_check_k(c, "every cut") for c in cuts} | {k}))
    counts = _evaluate(s, y, codes, n_codes, all_cuts, _check_scope(scope))
    main = replace(counts[k], w_total=float(s.sum()), w_noise=float(s[y].sum()))
    row = {**count_values(main), **ranking_values(index or ScoreIndex(s, y))}
    bounds = bootstrap_intervals(s, y, seq_codes, k, scope, weights=s, n_boot=n_boot, seed=seed) if n_boot else {}
    for spec in metric_specs(interval=True):
        row[f"{spec.name}_lo"], row[f"{spec.name}_hi"] = bounds.get(spec.name, (_NAN, _NAN))
    return row, {c: count_values(counts[c], per_cut_only=True) for c in all_cuts}


def kind_metrics(index: ScoreIndex, scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray,
                 kind_codes: np.ndarray, kinds: list[str], *, k: float, scope: str) -> list[dict]:
    """Per noise kind, every metric at cut ``k`` with positives = that kind, pool = clean tokens + that kind.

    ``kind_codes``: the kind's index in ``kinds`` per noise token, -1 for clean
    ones; ``index`` is the :class:`ScoreIndex` of ``scores`` with these codes.
    Global scope and the ranking metrics come from the shared sort; sequence
    scope evaluates each kind's pool.
    """
    if not kinds:
        return []
    clean = ~is_noise
    n_clean = int(clean.sum())
    noise_idx = np.flatnonzero(is_noise)
    kind_w = np.bincount(kind_codes[noise_idx], weights=scores[noise_idx], minlength=len(kinds))
    clean_w = float(scores[clean].sum())
    rows = []
    for ki, kind in enumerate(kinds):
        if scope == "global":
            counts = index.topk_counts(k, ki)
        else:
            pos = kind_codes == ki
            pool = clean | pos
            s, y, codes, n_codes = _inputs(scores[pool], pos[pool], seq_codes[pool])
            counts = _evaluate(s, y, codes, n_codes, (k,), _check_scope(scope))[k]
        counts = replace(counts, w_total=clean_w + kind_w[ki], w_noise=kind_w[ki])
        rows.append({"kind": kind, "n_kind": int(counts.n_noise), "n_pool": n_clean + int(counts.n_noise),
                     **count_values(counts), **ranking_values(index, ki)})
    return rows


# --------------------------------------------------------------------------- stratified: the same metrics within strata


def stratified_specs() -> list[MetricSpec]:
    """The metrics with a stratified form, in table order: every per-cut count metric, and AUROC."""
    return [s for s in METRICS if (s.counts is not None and s.per_cut) or s.name == "auroc"]


def stratum_codes(values: np.ndarray, n_strata: int) -> np.ndarray:
    """Quantile strata of ``values``: ``⌊N · #{x' < x} / n⌋``, renumbered 0..J−1 over the strata that occur.

    Tied values share a stratum, so a variable with few distinct values gives
    fewer than N strata; with distinct values each holds n/N tokens, give or take one.
    """
    x = _check_scores(values, "values")
    if isinstance(n_strata, (bool, np.bool_)) or not isinstance(n_strata, numbers.Integral) or n_strata < 1:
        raise AuditError(f"the number of strata must be a positive integer, got {n_strata!r}")
    below = np.sort(x).searchsorted(x, "left")
    _, codes = np.unique((below * int(n_strata)) // x.size, return_inverse=True)
    return codes.reshape(-1).astype(np.intp)


def stratified_mean(values: Any, n_noise: Any, axis: int = 0) -> Any:
    """``Σ_j n_j v_j / Σ_j n_j`` over the strata j (along ``axis``) with noise (n_j > 0) and a defined v_j.

    NaN where no stratum qualifies. ``n_noise`` broadcasts against ``values``.
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.broadcast_to(np.asarray(n_noise, dtype=np.float64), v.shape)
    ok = ~np.isnan(v) & (w > 0)
    return ratio(np.where(ok, v * w, 0.0).sum(axis=axis), np.where(ok, w, 0.0).sum(axis=axis))


class _WeightedAUROC:
    """AUROC of one pool with every token counted as often as a replicate draws its sequence.

    ``Σ_g W_noise(v_g)·(W_clean(< v_g) + W_clean(v_g)/2) / (W_noise · W_clean)`` over the
    distinct noise scores v_g: the Mann-Whitney form of :meth:`ScoreIndex.auroc` with
    weights. Tokens are tallied once into (score bucket, sequence) pairs, so a
    replicate costs one weighted sum per pair: rows of the transposed multiplicity
    matrix gathered, summed per bucket, and cumulated over the buckets.
    """

    def __init__(self, s: np.ndarray, y: np.ndarray, codes: np.ndarray, n_seqs: int):
        self.n_seqs = n_seqs
        self.noise_per_seq = np.bincount(codes[y], minlength=n_seqs).astype(np.float64)
        self.clean_per_seq = np.bincount(codes[~y], minlength=n_seqs).astype(np.float64)
        values, group = np.unique(s[y], return_inverse=True)
        self.n_values = g = values.size
        clean, cc = s[~y], codes[~y]
        at = values.searchsorted(clean, "right")        # clean j lies below v_g for every g >= at_j
        tied = (at > 0) & (values[np.maximum(at - 1, 0)] == clean) if g else np.zeros(clean.size, dtype=bool)
        self.noise = self._pairs(group.reshape(-1), codes[y])
        self.clean = self._pairs(at, cc)
        self.tied = self._pairs(at[tied] - 1, cc[tied])

    def _pairs(self, bucket: np.ndarray, seq: np.ndarray) -> tuple[np.ndarray, ...]:
        """(bucket of each run of pairs, where each run starts, sequence of each pair, tokens in each pair)."""
        key, count = np.unique(bucket.astype(np.int64) * self.n_seqs + seq, return_counts=True)
        pair_bucket = key // self.n_seqs
        starts = np.flatnonzero(np.r_[True, pair_bucket[1:] != pair_bucket[:-1]]) if key.size else key
        return pair_bucket[starts], starts, key % self.n_seqs, count.astype(np.float64)

    def _sums(self, pairs: tuple[np.ndarray, ...], rows: np.ndarray, n_buckets: int) -> np.ndarray:
        """[n_buckets, replicates]: per bucket, the replicates' weight of its tokens (``rows``: [S, replicates])."""
        buckets, starts, seq, count = pairs
        out = np.zeros((n_buckets, rows.shape[1]))
        if seq.size:
            out[buckets] = np.add.reduceat(rows[seq] * count[:, None], starts, axis=0)
        return out

    def replicates(self, mult: np.ndarray) -> np.ndarray:
        """[rows of ``mult``]: the AUROC of each replicate (``mult``: [replicates, sequences])."""
        den = (mult @ self.noise_per_seq) * (mult @ self.clean_per_seq)
        rows = np.ascontiguousarray(mult.T)
        g = self.n_values
        below = np.cumsum(self._sums(self.clean, rows, g + 1), axis=0)[:g] + 0.5 * self._sums(self.tied, rows, g)
        num = np.einsum("gb,gb->b", self._sums(self.noise, rows, g), below)
        return ratio(num, den)


class StratifiedIndex:
    """One ranking split into strata: every stratified metric at any cut and scope, with bootstrap intervals.

    The strata's AUROCs and their replicates do not depend on the cut or the
    scope, so they are computed once (on first use) for every call of
    :meth:`metrics`. Replicates use the draws of :func:`bootstrap_intervals`
    (sequences that occur, in code order); strata and cuts are held at the
    full sample's.
    """

    def __init__(self, scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, strata: np.ndarray, *,
                 n_boot: int = 0, seed: int = 0, level: float = 0.95):
        self.s, self.y, codes, _ = _inputs(scores, is_noise, seq_codes)
        self.strata, self.n_strata = _check_codes(strata, self.s.size, "strata")
        _, dense = np.unique(codes, return_inverse=True)   # the sequences that occur, in code order (the draws' rows)
        self.codes = dense.reshape(-1).astype(np.intp)
        self.n_seqs = int(self.codes.max()) + 1
        self.n_boot, self.seed, self.level = int(n_boot), int(seed), float(level)
        self.parts = [np.flatnonzero(self.strata == j) for j in range(self.n_strata)]
        self.indexes = [ScoreIndex(self.s[p], self.y[p]) for p in self.parts]
        self._auroc_reps: np.ndarray | None = None

    def metrics(self, k: float, scope: str = "global") -> tuple[dict[str, float], list[dict[str, float]]]:
        """``(summary, rows)`` as :func:`stratified_metrics` returns them."""
        per = self._tables(_check_k(k), _check_scope(scope))
        rows = []
        for j, (table, index) in enumerate(zip(per, self.indexes)):
            c = counts_of(table.sum(axis=0))
            rows.append({"stratum": j, "n": int(c.n), "n_noise": int(c.n_noise),
                         **{spec.name: _number(spec.counts(c) if spec.counts is not None else spec.ranking(index, None))
                            for spec in stratified_specs()}})
        weights = [r["n_noise"] for r in rows]
        summary: dict[str, float] = {spec.name: _number(stratified_mean([r[spec.name] for r in rows], weights))
                                     for spec in stratified_specs()}
        reps = self._replicates(per) if self.n_boot else {}
        q = ((1 - self.level) / 2, 1 - (1 - self.level) / 2)
        for spec in stratified_specs():
            vals = reps.get(spec.name, np.zeros(0))
            vals = vals[~np.isnan(vals)]
            lo, hi = np.quantile(vals, q) if vals.size else (_NAN, _NAN)
            summary[f"{spec.name}_lo"], summary[f"{spec.name}_hi"] = float(lo), float(hi)
        summary["n_strata"] = self.n_strata
        return summary, rows

    def _tables(self, k: float, scope: str) -> list[np.ndarray]:
        """Per stratum, its sequences' :data:`SEQUENCE_FIELDS` at cut ``k``: [S, fields]."""
        s, y, codes = self.s, self.y, self.codes
        return [_per_sequence(s[p], y[p], codes[p], self.n_seqs, (k,), scope)[0] for p in self.parts]

    def _replicates(self, per: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Per stratified metric, [n_boot] replicates of the noise-weighted mean over the strata."""
        sums = resampled_sums(np.column_stack(per), self.n_boot, self.seed)
        counts = counts_of(sums.reshape(self.n_boot, self.n_strata, len(SEQUENCE_FIELDS)))
        out = {spec.name: stratified_mean(spec.counts(counts), counts.n_noise, axis=1)
               for spec in stratified_specs() if spec.counts is not None}
        out["auroc"] = self.auroc_replicates()
        return out

    def auroc_replicates(self) -> np.ndarray:
        """[n_boot]: the stratified AUROC of every replicate (computed once)."""
        if self._auroc_reps is None:
            s, y, codes = self.s, self.y, self.codes
            aurocs = [_WeightedAUROC(s[p], y[p], codes[p], self.n_seqs) for p in self.parts]
            noise = np.column_stack([np.bincount(codes[p][y[p]], minlength=self.n_seqs) for p in self.parts])
            reps, lo = np.empty(self.n_boot), 0
            chunk = max(1, _BOOT_CHUNK // s.size) * self.n_seqs
            for block in bootstrap_multiplicities(self.n_seqs, self.n_boot, self.seed, chunk=chunk):
                per_stratum = np.column_stack([a.replicates(block) for a in aurocs])
                reps[lo:lo + block.shape[0]] = stratified_mean(per_stratum, block @ noise, axis=1)
                lo += block.shape[0]
            self._auroc_reps = reps
        return self._auroc_reps


def stratified_metrics(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, strata: np.ndarray, *,
                       k: float, scope: str = "global", n_boot: int = 0, seed: int = 0,
                       level: float = 0.95) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Every per-cut metric at cut ``k``, and AUROC, within each stratum; and their mean over the strata, each
    stratum weighted by its noise tokens (:func:`stratified_mean`).

    ``strata`` gives each token's stratum (integer codes, e.g. :func:`stratum_codes`). Within a stratum the
    metrics are those of :func:`topk_metrics` and :func:`auroc` on its tokens alone (its own top k, in
    ``scope``). Returns ``(summary, rows)``: ``summary`` has every stratified metric, ``<name>_lo``/``<name>_hi``
    (percentile bootstrap over sequences with the draws of :func:`bootstrap_intervals`, strata and cuts held
    at the full sample's; NaN when ``n_boot`` is 0) and ``n_strata``; ``rows`` has, per stratum in code
    order, ``stratum``, ``n``, ``n_noise`` and every stratified metric. Several cuts or scopes of one ranking:
    :class:`StratifiedIndex`.
    """
    return StratifiedIndex(scores, is_noise, seq_codes, strata, n_boot=n_boot, seed=seed, level=level).metrics(k, scope)


# --------------------------------------------------------------------------- the declared metrics as table text


def table_cells(row: pd.Series | dict) -> list[str]:
    """The formatted metric cells of one table row, one per shown metric (Table 1 order)."""
    g = row.get
    return [spec.fmt(g(spec.name), g(f"{spec.name}_lo"), g(f"{spec.name}_hi"))
            for spec in metric_specs() if spec.header is not None]


def metric_headers(k: float) -> list[str]:
    """The headings of the shown metrics at cut ``k`` (percent)."""
    return [spec.header.format(k=k_label(k)) for spec in metric_specs() if spec.header is not None]

"""What is ranked (:func:`rank_scores`) and how well a ranking separates noise: AUROC, AP, via :class:`ScoreIndex`.

:class:`ScoreIndex` is one ascending sort of a ranking, validated once when
built; every later query trusts it. Imports :mod:`reweight_audit.core` and
the package's declarations, checks and topk.
"""
from __future__ import annotations

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation.metrics.checks import check_codes, check_finite_weights, check_pair
from reweight_audit.evaluation.metrics.declarations import NAN, Counts, count_values, ranking_values
from reweight_audit.evaluation.metrics.topk import sorted_cut, top_size

RANK_BY = ("weight", "loss", "grad")


def grad_norm(logp: np.ndarray, sum_p2: np.ndarray) -> np.ndarray:
    """‖∂ℓ/∂z‖ of cross-entropy: sqrt((1 − p)² + Σp² − p²), radicand clipped at 0."""
    p = np.exp(np.asarray(logp, dtype=np.float64))
    rad = (1.0 - p) ** 2 + np.asarray(sum_p2, dtype=np.float64) - p * p
    return np.sqrt(np.maximum(rad, 0.0))


def rank_scores(weights: np.ndarray, rank_by: str, logp: np.ndarray | None = None,
                sum_p2: np.ndarray | None = None) -> np.ndarray:
    """What "high weight" means: ``weight`` w, ``loss`` w·(−log p), ``grad`` w·‖∂ℓ/∂z‖.

    ``loss``: a method with a declared loss shape hands its weights with the loss ℓ_t attached
    (``methods.compute_viewed``); that is its loss view (w·(−log p) is the loss of a stop-gradient weight).
    """
    declared = getattr(weights, "loss", None)
    w = np.asarray(weights, dtype=np.float64)
    if rank_by == "loss" and declared is not None:
        return np.asarray(declared, dtype=np.float64)
    if rank_by == "weight":
        return w
    if rank_by == "loss":
        nll = -np.minimum(np.asarray(logp, dtype=np.float64), 0.0)
        return w * nll
    if rank_by == "grad":
        return w * grad_norm(logp, sum_p2)
    raise AuditError(f"--rank-by {rank_by!r} is not known; use one of {', '.join(RANK_BY)}")


class ScoreIndex:
    """One ascending sort of a ranking, shared by AUROC, AP and the per-kind global top-k metrics.

    Every quantity these need is a count of tokens by value ("how many clean
    tokens score below v"), which a sorted copy of all scores and a sorted copy
    of the (few) noise scores answer with binary searches. The pool for a
    positive set P is the clean tokens plus P: all noise (``kind=None``) or the
    noise tokens of one kind code (the other kinds leave the pool).

    Built from raw arrays it validates them once (scores, labels, and the
    sequence codes when given); :meth:`trusted` builds one from checked arrays.
    The checked arrays stay on the index (``s``, ``y``, ``codes``, ``n_codes``,
    ``kind_codes``), so that functions given an index do not scan them again.
    """

    def __init__(self, scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray | None = None,
                 kind_codes: np.ndarray | None = None):
        s, y = check_pair(scores, is_noise)
        codes, n_codes = (None, 0) if seq_codes is None else check_codes(seq_codes, s.size)
        self._build(s, y, codes, n_codes, kind_codes)

    @classmethod
    def trusted(cls, s: np.ndarray, y: np.ndarray, codes: np.ndarray | None = None, n_codes: int = 0,
                kind_codes: np.ndarray | None = None) -> "ScoreIndex":
        """The index of already checked arrays (float64 scores, bool labels, intp codes 0..n_codes-1)."""
        index = cls.__new__(cls)
        index._build(s, y, codes, n_codes, kind_codes)
        return index

    def _build(self, s, y, codes, n_codes, kind_codes) -> None:
        self.s, self.y, self.codes, self.n_codes = s, y, codes, n_codes
        self.kind_codes = None if kind_codes is None else np.asarray(kind_codes)
        self.asc = np.sort(s)
        idx = np.flatnonzero(y)
        sn = s[idx]
        order = np.argsort(sn, kind="stable")
        self.noise_asc = sn[order]
        self.noise_seq = None if codes is None else codes[idx][order]
        self.noise_kind = None if kind_codes is None else self.kind_codes[idx][order]
        self.n = int(s.size)
        self.n_clean = self.n - int(idx.size)
        self._tables: dict = {}
        self._weights_checked = False

    def check_as_weights(self) -> None:
        """The scores, used as weights (the weight metrics' bootstrap), must be finite and non-negative."""
        if not self._weights_checked:
            check_finite_weights(self.s)
            self._weights_checked = True

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
            return NAN
        return float(np.sum(mult * (2 * below + tied))) / (2.0 * n_p * self.n_clean)

    def average_precision(self, kind: int | None = None) -> float:
        """Σ_v (positives at v / n_pos) · precision at threshold v, one threshold per distinct score.

        NaN without positives.
        """
        mult, pos_below, below, _ = self._by_value(kind)
        n_p = int(mult.sum())
        if n_p == 0:
            return NAN
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
        n_top = int(top_size(k, n_pool))
        if n_top == 0:
            return Counts(n_pool, n_p, 0, 0.0, noisy.size, 0.0)
        cut = sorted_cut(self.asc, lambda v: (n_c - self._clean_lt(v)) + (n_p - int(p.searchsorted(v, "left"))),
                         lambda v: (n_c - int(self._clean_le(v))) + (n_p - int(p.searchsorted(v, "right"))), n_top)
        c = cut.value
        p_lo, p_hi = int(p.searchsorted(c, "left")), int(p.searchsorted(c, "right"))
        best = np.full(noisy.size, -np.inf)
        np.maximum.at(best, inv, p)
        at_best = np.bincount(inv[p_lo:p_hi], minlength=noisy.size)   # positives tied at c, per sequence
        hit = cut.hit(best > c, np.where(best == c, at_best, 0))
        return Counts(n_pool, n_p, n_top, cut.expected(n_p - p_hi, p_hi - p_lo), noisy.size, hit.sum())


def auroc(scores: np.ndarray, is_noise: np.ndarray) -> float:
    """Area under the ROC curve, noise positive: ``P(s_noise > s_clean) + P(tie)/2``.

    Equals ``sklearn.metrics.roc_auc_score`` (ties as average ranks); computed
    exactly from the Mann-Whitney U in integers. NaN if either class is absent.
    """
    return ScoreIndex(scores, is_noise).auroc()


def average_precision(scores: np.ndarray, is_noise: np.ndarray) -> float:
    """``AP = sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds, noise positive.

    Equals ``sklearn.metrics.average_precision_score`` (tied scores form one
    threshold, no interpolation). NaN without noise tokens; 1 without clean ones.
    """
    return ScoreIndex(scores, is_noise).average_precision()


def rank_metrics(scores: np.ndarray, is_noise: np.ndarray) -> dict[str, float]:
    """Every ranking metric (``auroc``, ``ap``, ...) from one sort."""
    return ranking_values(ScoreIndex(scores, is_noise))

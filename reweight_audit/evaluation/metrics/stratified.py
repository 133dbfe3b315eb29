"""The same metrics within strata of a variable (position, rarity, length) and their noise-weighted mean.

:class:`StratifiedIndex` validates one ranking once and serves every cut and
scope; its bootstrap uses the draws of :func:`bootstrap_intervals`. Imports
:mod:`reweight_audit.core` and the package's declarations, checks, counts,
ranking and bootstrap.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation.metrics.bootstrap import (_BOOT_CHUNK, LEVEL, bootstrap_multiplicities,
                                                         percentile_interval, resample)
from reweight_audit.evaluation.metrics.checks import check_codes, check_inputs, check_k, check_scope, check_scores
from reweight_audit.evaluation.metrics.counts import SEQUENCE_FIELDS, counts_of, per_sequence
from reweight_audit.evaluation.metrics.declarations import MetricSpec, metric_specs, number, ratio
from reweight_audit.evaluation.metrics.ranking import ScoreIndex


def stratified_specs() -> list[MetricSpec]:
    """The metrics with a stratified form, in table order: every per-cut count metric, and AUROC."""
    return [s for s in metric_specs() if (s.counts is not None and s.per_cut) or s.name == "auroc"]


def stratum_codes(values: np.ndarray, n_strata: int) -> np.ndarray:
    """Quantile strata of ``values``: ``⌊N · #{x' < x} / n⌋``, renumbered 0..J−1 over the strata that occur.

    Tied values share a stratum, so a variable with few distinct values gives
    fewer than N strata; with distinct values each holds n/N tokens, give or take one.
    """
    x = check_scores(values, "values")
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


def stratified_summary(per: list[np.ndarray], indexes: list[Any], auroc_replicates: Callable[[], np.ndarray], *,
                       n_boot: int, seed: int, level: float) -> tuple[dict[str, float], list[dict[str, float]]]:
    """``(summary, rows)`` of :func:`stratified_metrics` from what any engine gives per stratum j: ``per[j]``, its
    sequences' :data:`SEQUENCE_FIELDS` at the cut ([S, fields], the sequences that occur in code order, the
    same S for every stratum), ``indexes[j]`` (what ``auroc(None)`` is asked of) and ``auroc_replicates()``, the
    [n_boot] stratified AUROC replicates (called only when ``n_boot`` > 0)."""
    rows = []
    for j, (table, index) in enumerate(zip(per, indexes)):
        c = counts_of(table.sum(axis=0))
        rows.append({"stratum": j, "n": int(c.n), "n_noise": int(c.n_noise),
                     **{spec.name: number(spec.counts(c) if spec.counts is not None else spec.ranking(index, None))
                        for spec in stratified_specs()}})
    weights = [r["n_noise"] for r in rows]
    summary: dict[str, float] = {spec.name: number(stratified_mean([r[spec.name] for r in rows], weights))
                                 for spec in stratified_specs()}
    reps = _count_replicates(per, n_boot, seed) if n_boot else {}
    if n_boot:
        reps["auroc"] = auroc_replicates()
    for spec in stratified_specs():
        summary[f"{spec.name}_lo"], summary[f"{spec.name}_hi"] = percentile_interval(
            reps.get(spec.name, np.zeros(0)), level)
    summary["n_strata"] = len(per)
    return summary, rows


def _count_replicates(per: list[np.ndarray], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Per stratified count metric, [n_boot] replicates of the noise-weighted mean over the strata."""
    sums = resample(np.column_stack(per), n_boot, seed)
    counts = counts_of(sums.reshape(n_boot, len(per), len(SEQUENCE_FIELDS)))
    return {spec.name: stratified_mean(spec.counts(counts), counts.n_noise, axis=1)
            for spec in stratified_specs() if spec.counts is not None}


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

    The inputs are validated once, here. The strata's AUROCs and their replicates do not depend on the cut or
    the scope, so they are computed once (on first use) for every call of :meth:`metrics`. Replicates use the
    draws of :func:`bootstrap_intervals` (sequences that occur, in code order); strata and cuts are held at
    the full sample's. ``n_boot`` 0: no intervals.
    """

    def __init__(self, scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, strata: np.ndarray, *,
                 n_boot: int, seed: int, level: float = LEVEL):
        self.s, self.y, codes, _ = check_inputs(scores, is_noise, seq_codes)
        self.strata, self.n_strata = check_codes(strata, self.s.size, "strata")
        _, dense = np.unique(codes, return_inverse=True)   # the sequences that occur, in code order (the draws' rows)
        self.codes = dense.reshape(-1).astype(np.intp)
        self.n_seqs = int(self.codes.max()) + 1
        self.n_boot, self.seed, self.level = int(n_boot), int(seed), float(level)
        self.parts = [np.flatnonzero(self.strata == j) for j in range(self.n_strata)]
        self.indexes = [ScoreIndex.trusted(self.s[p], self.y[p]) for p in self.parts]
        self._auroc_reps: np.ndarray | None = None

    def metrics(self, k: float, scope: str = "global") -> tuple[dict[str, float], list[dict[str, float]]]:
        """``(summary, rows)`` as :func:`stratified_metrics` returns them."""
        per = self._tables(check_k(k), check_scope(scope))
        return stratified_summary(per, self.indexes, self.auroc_replicates, n_boot=self.n_boot, seed=self.seed,
                                  level=self.level)

    def _tables(self, k: float, scope: str) -> list[np.ndarray]:
        """Per stratum, its sequences' :data:`SEQUENCE_FIELDS` at cut ``k``: [S, fields]."""
        s, y, codes = self.s, self.y, self.codes
        return [per_sequence(s[p], y[p], codes[p], self.n_seqs, (k,), scope)[0] for p in self.parts]

    def _replicates(self, per: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Per stratified metric, [n_boot] replicates of the noise-weighted mean over the strata."""
        return {**_count_replicates(per, self.n_boot, self.seed), "auroc": self.auroc_replicates()}

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
                       k: float, scope: str = "global", n_boot: int, seed: int,
                       level: float = LEVEL) -> tuple[dict[str, float], list[dict[str, float]]]:
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

"""How well a ranking of tokens finds the injected noise: every metric, and the registry that declares them.

Job: pure functions, NumPy arrays in, numbers (or arrays) out; no I/O, no
state besides the registry :data:`METRICS`. A metric is one function plus one
:class:`MetricSpec` registered with :func:`add_metric`; tables, curves,
per-kind rows, bootstrap intervals and every export are generated from it.
May import only :mod:`reweight_audit.core` (and NumPy); nothing above evaluation.

Modules, each importing only those before it:
``declarations`` (what a metric is, the registry, table text), ``checks``
(validation at the public boundary), ``topk`` (the one top-k-with-ties
primitive), ``counts`` (top-set counts, in total and per sequence),
``ranking`` (what is ranked, :class:`ScoreIndex`, AUROC, AP), ``bootstrap``
(draws, resampled sums, the NaN-dropping quantile), ``stratified``
(strata and their noise-weighted mean) and ``rows`` (one ranking's rows as
compare reports them). Public functions validate their arrays once; the
private twins they call trust them.

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

from reweight_audit.evaluation.metrics.bootstrap import (LEVEL, bootstrap_intervals, bootstrap_multiplicities,
                                                         nan_quantile, percentile_interval, resampled_sums)
from reweight_audit.evaluation.metrics.counts import (SEQUENCE_FIELDS, SequenceCounts, counts_of, curve, noise_mass,
                                                      sequence_counts, topk_metrics)
from reweight_audit.evaluation.metrics.declarations import (CUTS, METRICS, SCOPES, Counts, MetricSpec, add_metric,
                                                            metric_headers, metric_specs, ratio, table_cells)
from reweight_audit.evaluation.metrics.ranking import (RANK_BY, ScoreIndex, auroc, average_precision, grad_norm,
                                                       rank_metrics, rank_scores)
from reweight_audit.evaluation.metrics.rows import kind_metrics, ranking_metrics
from reweight_audit.evaluation.metrics.stratified import (StratifiedIndex, stratified_mean, stratified_metrics,
                                                          stratified_specs, stratum_codes)
from reweight_audit.evaluation.metrics.topk import Cut, inclusion_probability, top_size

__all__ = [
    "CUTS",
    "SCOPES",
    "RANK_BY",
    "LEVEL",
    "METRICS",
    "Counts",
    "Cut",
    "MetricSpec",
    "ScoreIndex",
    "add_metric",
    "ratio",
    "metric_specs",
    "metric_headers",
    "table_cells",
    "rank_scores",
    "grad_norm",
    "top_size",
    "inclusion_probability",
    "topk_metrics",
    "curve",
    "auroc",
    "average_precision",
    "rank_metrics",
    "noise_mass",
    "bootstrap_intervals",
    "nan_quantile",
    "percentile_interval",
    "SEQUENCE_FIELDS",
    "sequence_counts",
    "SequenceCounts",
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

"""One ranking's row at the cut as ``metrics.ranking_metrics`` gives it, from the engine's aggregates."""
from __future__ import annotations

import math

import numpy as np

from reweight_audit.evaluation import metrics
from reweight_audit.evaluation.metrics.bootstrap import LEVEL, field_intervals
from reweight_audit.evaluation.metrics.counts import SEQUENCE_FIELDS
from reweight_audit.evaluation.metrics.declarations import NAN, count_values, ranking_values
from reweight_audit.evaluation.outofcore.histogram import HistogramIndex


def metric_row(main: metrics.Counts, per_seq: np.ndarray, w_total: np.ndarray, w_noise: np.ndarray,
               length: np.ndarray, index: HistogramIndex, opts) -> dict:
    """Every metric at the cut with its interval, as ``metrics.ranking_metrics`` gives it: the counts, the
    per-sequence weight sums and counts (sequences with tokens in the pool: ``length`` > 0) and the ranking."""
    from dataclasses import replace

    # as metrics.weight_sums: the exactly rounded sum of the per-sequence sums, the memory engine's bits
    main = replace(main, w_total=math.fsum(w_total), w_noise=math.fsum(w_noise))
    row = {**count_values(main), **ranking_values(index)}
    bounds = {}
    if opts.bootstrap:
        fields = np.column_stack([per_seq, w_total, w_noise])[length > 0]
        bounds = field_intervals(SEQUENCE_FIELDS + ("w_total", "w_noise"), fields, n_boot=int(opts.bootstrap),
                                 seed=int(opts.seed), level=LEVEL)
    for spec in metrics.metric_specs(interval=True):
        row[f"{spec.name}_lo"], row[f"{spec.name}_hi"] = bounds.get(spec.name, (NAN, NAN))
    return row



"""The percentile bootstrap over sequences: the draws, the resampled sums, and the quantile that drops NaN.

Sequences are the resampling unit; replicate b takes the sequences
``rng.integers(0, S, size=S)`` from the b-th such call on
``rng = np.random.default_rng(seed)``, and every count metric of a replicate
is a function of the per-sequence counts summed over its draws
(multiplicity-matrix products). Imports :mod:`reweight_audit.core` and the
package's declarations, checks, topk and counts.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation.metrics.checks import (check_boot, check_inputs, check_k, check_n_boot,
                                                      check_scope, check_weights)
from reweight_audit.evaluation.metrics.counts import SEQUENCE_FIELDS, per_sequence
from reweight_audit.evaluation.metrics.declarations import Counts, MetricSpec, metric_specs, number

LEVEL = 0.95              # the intervals' coverage: 95 %
_BOOT_CHUNK = 1 << 22     # multiplicity-matrix entries per chunk


def nan_quantile(values: Any, q: tuple[float, ...]) -> np.ndarray:
    """``np.quantile``'s default (linear) quantiles over axis 0 with NaN values left out; NaN where all are NaN.

    ``[len(q), *values.shape[1:]]``; bit for bit ``np.quantile(column[~isnan(column)], q)`` of every column,
    with one sort for all of them (``np.nanquantile`` loops over columns in Python).
    """
    values = np.asarray(values, dtype=np.float64)
    out = np.full((len(q),) + values.shape[1:], np.nan)
    if values.shape[0] == 0:
        return out
    ordered = np.sort(values, axis=0)  # NaN sorts last
    n_valid = np.count_nonzero(~np.isnan(values), axis=0)
    for i, level in enumerate(q):
        pos = level * np.maximum(n_valid - 1, 0)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(n_valid - 1, 0))
        a = np.take_along_axis(ordered, lo[None], axis=0)[0]
        b = np.take_along_axis(ordered, hi[None], axis=0)[0]
        t = pos - lo
        with np.errstate(invalid="ignore"):
            out[i] = np.where(n_valid > 0, np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t), np.nan)
    return out


def percentile_interval(replicates: Any, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of 1-D replicates, undefined (NaN) ones left out."""
    lo, hi = nan_quantile(replicates, ((1 - level) / 2, 1 - (1 - level) / 2))
    return number(lo), number(hi)


def bootstrap_multiplicities(n_seq: int, n_boot: int, seed: int, chunk: int | None = None) -> Iterator[np.ndarray]:
    """The bootstrap's draws, as consecutive blocks of rows of the multiplicity matrix ``[n_boot, n_seq]``.

    Row b counts how often replicate b draws each sequence: the b-th
    ``rng.integers(0, n_seq, size=n_seq)`` on ``rng = np.random.default_rng(seed)``
    (:func:`bootstrap_intervals`). A block has about ``chunk`` entries (default: ``_BOOT_CHUNK``); it is
    reused, so copy a block to keep it.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, (_BOOT_CHUNK if chunk is None else chunk) // max(n_seq, 1))
    mult = np.empty((min(rows, n_boot), n_seq))
    for lo in range(0, n_boot, rows):
        hi = min(n_boot, lo + rows)
        for r in range(hi - lo):                      # one draw per replicate (see bootstrap_intervals)
            mult[r] = np.bincount(rng.integers(0, n_seq, size=n_seq), minlength=n_seq)
        yield mult[: hi - lo]


def resample(agg: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, fields]: row b sums the rows of ``agg`` drawn by replicate b (checked inputs)."""
    sums = np.empty((n_boot, agg.shape[1]))
    lo = 0
    for block in bootstrap_multiplicities(agg.shape[0], n_boot, seed):
        sums[lo:lo + block.shape[0]] = block @ agg
        lo += block.shape[0]
    return sums


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
    check_n_boot(n_boot)
    return resample(agg, int(n_boot), int(seed))


def sequence_fields(s, y, codes, n_codes, k, scope, w) -> tuple[tuple[str, ...], np.ndarray]:
    """Per sequence that occurs, its :class:`Counts` fields at the full-sample cut: (field names, [S, fields])."""
    per = per_sequence(s, y, codes, n_codes, (k,), scope)[0]
    names, cols = SEQUENCE_FIELDS, [per]
    if w is not None:
        names += ("w_total", "w_noise")
        cols += [np.column_stack([np.bincount(codes, weights=w, minlength=n_codes),
                                  np.bincount(codes[y], weights=w[y], minlength=n_codes)])]
    return names, np.column_stack(cols)[per[:, 3] > 0]


def intervals(s: np.ndarray, y: np.ndarray, codes: np.ndarray, n_codes: int, k: float, scope: str,
              w: np.ndarray | None, *, n_boot: int, seed: int, level: float) -> dict[str, tuple[float, float]]:
    """:func:`bootstrap_intervals` of checked inputs."""
    names, per_seq = sequence_fields(s, y, codes, n_codes, k, scope, w)
    return field_intervals(names, per_seq, n_boot=n_boot, seed=seed, level=level)


def field_intervals(names: tuple[str, ...], per_seq: np.ndarray, *, n_boot: int, seed: int,
                    level: float) -> dict[str, tuple[float, float]]:
    """The intervals from per-sequence :class:`Counts` fields ``[S, names]`` (sequences that occur, in code
    order): what an engine that aggregates per sequence (the out-of-core one) hands the bootstrap."""
    reps = Counts(**dict(zip(names, resample(per_seq, n_boot, seed).T)))
    specs: list[MetricSpec] = [m for m in metric_specs(interval=True)
                               if m.counts is not None and (m.per_cut or "w_total" in names)]
    return {spec.name: percentile_interval(spec.counts(reps), level) for spec in specs}


def bootstrap_intervals(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, k: float,
                        scope: str = "global", weights: np.ndarray | None = None, *, n_boot: int,
                        seed: int, level: float = LEVEL) -> dict[str, tuple[float, float]]:
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
    s, y, codes, n_codes = check_inputs(scores, is_noise, seq_codes)
    k = check_k(k)
    scope = check_scope(scope)
    check_boot(n_boot, seed, level)
    w = None if weights is None else check_weights(weights, s.size)
    return intervals(s, y, codes, n_codes, k, scope, w, n_boot=int(n_boot), seed=int(seed), level=float(level))


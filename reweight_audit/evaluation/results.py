"""What ``compare`` hands to its exports and renderers: :class:`CompareResult` and its tables' columns.

The columns are generated from :data:`reweight_audit.evaluation.metrics.METRICS`, so a
declared metric appears in every table. Column meanings: ``docs/formats.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from reweight_audit.evaluation.metrics import metric_specs

#: The columns that say which ranking a row is about.
IDENTITY = ("run", "method", "family", "rank_by", "scope", "k")
#: The run's token and sequence counts, repeated on every row of the main table.
RUN_COUNTS = ("n_tokens", "n_noise", "n_seqs", "n_noise_seqs", "base_rate")
#: The noise kind of a by_kind.csv row and its pool: clean tokens plus that kind's tokens.
KIND = ("kind", "n_kind", "n_pool")
#: The group of a by_group.csv row (``--by-meta``) and its counts.
GROUP = ("group_by", "group", "n_tokens", "n_noise", "n_seqs", "n_noise_seqs")


def _interval(name: str) -> list[str]:
    return [f"{name}_lo", f"{name}_hi"]


def table_columns() -> list[str]:
    """table.csv: identity, per-cut metrics each with its interval, the other metrics, the run's counts,
    then the other metrics' intervals (after the counts: the file's layout since its first version)."""
    cols = list(IDENTITY)
    for spec in metric_specs(per_cut=True):
        cols += [spec.name, *(_interval(spec.name) if spec.interval else [])]
    whole = metric_specs(per_cut=False)
    cols += [spec.name for spec in whole] + list(RUN_COUNTS)
    for spec in whole:
        cols += _interval(spec.name) if spec.interval else []
    return cols


def curve_columns() -> list[str]:
    """curves.csv: identity (``k`` is each cut) and the per-cut metrics."""
    return [*IDENTITY, *(spec.name for spec in metric_specs(per_cut=True))]


def kind_columns() -> list[str]:
    """by_kind.csv: identity, the kind and its pool, and every metric."""
    return [*IDENTITY, *KIND, *(spec.name for spec in metric_specs())]


def group_columns() -> list[str]:
    """by_group.csv: identity, the group and its counts, every metric with its interval."""
    cols = [*IDENTITY, *GROUP]
    for spec in metric_specs():
        cols += [spec.name, *(_interval(spec.name) if spec.interval else [])]
    return cols


@dataclass
class CompareResult:
    """Everything ``compare`` produced. Metric values are fractions (0..1)."""

    table: pd.DataFrame
    curves: pd.DataFrame
    by_kind: pd.DataFrame
    skipped: list[dict]  # {"run", "method", "reason"}
    runs: list[dict]
    config: dict
    k: float  # percent
    files: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    by_group: pd.DataFrame | None = None  # --by-meta: every metric per value of a record meta field
    agreement: pd.DataFrame | None = None  # several runs: each pair's order per metric and run (agreement.csv)
    table1: pd.DataFrame | None = None  # the Table 1 view (table1.csv)
    strata: pd.DataFrame | None = None  # --stratify: every metric within strata (strata.csv)
    #: The loaded runs (``runs.RunData``) and, per run, each method's weight per token: what the
    #: exports are drawn from, kept so that a report can be written after the fact.
    run_data: list = field(default_factory=list, repr=False)
    run_weights: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)

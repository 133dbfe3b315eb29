"""What a metric is: :class:`Counts`, :class:`MetricSpec`, the registry :data:`METRICS` and the table text.

A metric is one function plus one :class:`MetricSpec` registered in
:data:`METRICS` (a :class:`reweight_audit.core.registry.Registry`, in table
order); tables, curves, per-kind rows, bootstrap intervals and every export
are generated from it. Imports only :mod:`reweight_audit.core`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.core.formatting import fmt_interval, fmt_num, k_label
from reweight_audit.core.registry import Registry

if TYPE_CHECKING:
    import pandas as pd

CUTS = (0.01, 0.02, 0.05, 0.10, 0.20, 0.30, 0.50)
SCOPES = ("global", "sequence")

NAN = float("nan")


@dataclass(frozen=True)
class Counts:
    """What every count metric is a function of: one ranking's top set at one cut, and its weight sums.

    Scalars for one value; in the bootstrap, arrays with one entry per replicate
    (each field summed over the resampled sequences). Top-set fields are
    expectations under random tie-breaking; the weights are the ranking scores.
    """

    n: Any                        # tokens in the pool
    n_noise: Any                  # noise tokens in the pool
    n_top: Any = NAN              # tokens in the top set
    found: Any = NAN              # noise tokens in the top set
    n_noisy_seqs: Any = NAN       # sequences with at least one noise token
    hits: Any = NAN               # of those, sequences with a noise token in the top set
    w_total: Any = NAN            # sum of the scores over the pool
    w_noise: Any = NAN            # sum of the scores over the noise tokens


@dataclass(frozen=True)
class MetricSpec:
    """One metric: how it is computed, named, shown and bootstrapped (``docs/metrics.md``).

    Exactly one of ``counts`` (a function of :class:`Counts`, vectorised: it
    also runs on the bootstrap's arrays) and ``ranking`` (a function of a
    :class:`~reweight_audit.evaluation.metrics.ScoreIndex` and a noise kind code, None for all noise).
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


#: Every metric, in table order. Tables, curves, per-kind rows, intervals and exports follow this registry.
METRICS: Registry[MetricSpec] = Registry("metric", hint="see reweight_audit.evaluation.metrics.metric_specs()")


def add_metric(spec: MetricSpec) -> MetricSpec:
    """Declare one more metric (registered last in :data:`METRICS`); it then appears in every table and export."""
    if not spec.name.isidentifier() or spec.name in METRICS:
        raise AuditError(f"metric {spec.name!r}: give a new name made of letters, digits and underscores")
    return METRICS.add(spec.name, spec)


for _spec in (
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
):
    add_metric(_spec)


def metric_specs(*, per_cut: bool | None = None, interval: bool | None = None) -> list[MetricSpec]:
    """The declared metrics, in table order, optionally only those with the given properties."""
    return [s for s in METRICS.values() if (per_cut is None or s.per_cut == per_cut)
            and (interval is None or s.interval == interval)]


def number(x: Any) -> float:
    """A metric value as a float; NaN as the one module-wide NaN object, so equal results compare equal."""
    x = float(x)
    return NAN if math.isnan(x) else x


def count_values(c: Counts, *, per_cut_only: bool = False) -> dict[str, float]:
    """Every count metric (or only the per-cut ones) of one set of counts, as floats."""
    return {s.name: number(s.counts(c)) for s in metric_specs() if s.counts is not None
            and (s.per_cut or not per_cut_only)}


def ranking_values(index: Any, kind: int | None = None) -> dict[str, float]:
    """Every ranking metric of the pool of ``kind`` (None: all noise) against the clean tokens.

    ``index``: a :class:`~reweight_audit.evaluation.metrics.ScoreIndex`.
    """
    return {s.name: number(s.ranking(index, kind)) for s in metric_specs() if s.ranking is not None}


def table_cells(row: pd.Series | dict) -> list[str]:
    """The formatted metric cells of one table row, one per shown metric (Table 1 order)."""
    g = row.get
    return [spec.fmt(g(spec.name), g(f"{spec.name}_lo"), g(f"{spec.name}_hi"))
            for spec in metric_specs() if spec.header is not None]


def metric_headers(k: float) -> list[str]:
    """The headings of the shown metrics at cut ``k`` (percent)."""
    return [spec.header.format(k=k_label(k)) for spec in metric_specs() if spec.header is not None]

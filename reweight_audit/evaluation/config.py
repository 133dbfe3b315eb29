"""The options of ``compare`` and ``sweep`` (command line, ``ra.compare``, ``run_compare``, ``run_sweep``), once.

The checks import the evaluation modules only when a config is built, so that
reading these fields (the command line's ``--help``, the API's signature) stays light.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reweight_audit.core.config import Config, option
from reweight_audit.core.errors import AuditError, require_positive

#: Sequences of one stats table shown in heatmap.html.
HEATMAP_SEQUENCES = 12
METHODS_HELP = "Comma list (default: every method whose statistics exist)."
PARAM_HELP = "Method parameter, e.g. --param talr.w_min=0.1 (repeatable)."
METHOD_FILE_HELP = "Python file that registers extra methods (repeatable)."
BATCH_SEQS_HELP = "Sequences per simulated training batch (TALR)."
SEED_HELP = "Seed of every random choice; the same seed gives the same files."
STRATA_HELP = "Strata per --stratify variable: quantiles over the tokens (10: deciles)."
PARAMS_TYPE = "Mapping[str, Mapping[str, Any]] | Sequence[str]"
#: The evaluation engines: auto picks by the table's size.
ENGINES = ("auto", "memory", "duckdb")
RAY_HELP = ("With --engine duckdb: run the map step on Ray, 'local' (start Ray here), 'auto' (the running cluster) "
            "or a cluster address; the tables and the work folder must be on storage every node reads "
            "(docs/scaling.md).")
ENGINE_HELP = ("auto, memory or duckdb: memory holds the whole table; duckdb is out of core (exact, memory flat "
               "in the tokens); auto picks duckdb when the table would not fit comfortably in memory.")


def _methods(methods: list[str]) -> list[str]:
    if not methods:
        raise AuditError("--methods is empty; give method names (see `reweight-audit methods`) or leave it out")
    return list(dict.fromkeys(methods))


def _percent(k: float) -> float:
    k = float(k)
    if not (0.0 < k <= 100.0) or not math.isfinite(k):
        raise AuditError(f"--k {k:g}: the cut is a percentage in (0, 100], e.g. --k 10 for the top 10%")
    return k


def known(flag: str, values: Sequence[str], choices: Sequence[str], default: Sequence[str]) -> list[str]:
    """The values without repeats, each one of ``choices``; none given: ``default``."""
    for value in values:
        if value not in choices:
            raise AuditError(f"{flag} {value!r} is not known; use one of {', '.join(choices)}")
    return list(dict.fromkeys(values or default))


def param_items(params: Any) -> list[str]:
    """``{"talr": {"w_min": 0.1}}`` or ``["talr.w_min=0.1"]`` as the command line's ``--param`` items."""
    if isinstance(params, Mapping):
        items = []
        for method, values in params.items():
            if not isinstance(values, Mapping):
                raise AuditError(f"--param {method}: give the method's parameters as a dict, "
                                 f"e.g. {{{method!r}: {{'name': value}}}}")
            items += [f"{method}.{key}={value}" for key, value in values.items()]
        return items
    if isinstance(params, str):
        from reweight_audit.core.config import split_list

        return split_list(params)
    if not isinstance(params, Sequence):
        raise AuditError(f"--param {params!r}: give a dict of method parameters or a list of method.name=value")
    return [str(p) for p in params]


def _engine(engine: str) -> str:
    if engine not in ENGINES:
        raise AuditError(f"--engine {engine!r} is not known; use one of {', '.join(ENGINES)}")
    return engine


def _ray(ray: str | None, engine: str) -> str | None:
    if ray and engine == "memory":
        raise AuditError(f"--ray {ray}: the map step on Ray is the out-of-core engine's; use --engine duckdb (or "
                         "auto) or drop --ray")
    return ray or None


def _positive_batch(batch_seqs: int) -> int:
    require_positive("--batch-seqs", batch_seqs, "number of sequences per batch")
    return int(batch_seqs)


def _resamples(bootstrap: int) -> int:
    if bootstrap < 0:
        raise AuditError(f"--bootstrap {bootstrap}: give 0 (no intervals) or a positive number of resamples")
    return int(bootstrap)


def _rank_by(values: list[str]) -> list[str]:
    from reweight_audit.evaluation.metrics import RANK_BY

    return known("--rank-by", values, RANK_BY, ["weight"])


def _scope(values: list[str]) -> list[str]:
    from reweight_audit.evaluation.metrics import SCOPES

    return known("--scope", values, SCOPES, ["global"])


@dataclass
class CompareConfig(Config):
    """The options of one compare; validated on construction (one AuditError line naming the flag)."""

    methods: list[str] | None = option(None, help=METHODS_HELP, check=_methods)
    k: float = option(10.0, help="Top-k cut in percent, in (0, 100].", check=_percent)
    rank_by: list[str] = option(("weight",), help="weight, loss or grad (repeat or comma list).", check=_rank_by)
    scope: list[str] = option(("global",), help="global or sequence (repeat or comma list).", check=_scope)
    params: list[str] = option((), flag="--param", kind="params", api_type=PARAMS_TYPE, help=PARAM_HELP,
                               check=param_items)
    method_files: list[Path] = option((), flag="--method-file", help=METHOD_FILE_HELP)
    batch_seqs: int = option(256, help=BATCH_SEQS_HELP, check=_positive_batch)
    bootstrap: int = option(200, help="Bootstrap resamples over sequences for the 95% intervals.", check=_resamples)
    seed: int = option(0, help=SEED_HELP)
    table1_map: dict[str, str] | None = option(None, kind="any", api_type="str | Mapping[str, str] | None",
                                               help="The method each Table 1 row stands for (default "
                                                    "entropy=entropy,prob=inv-prob,ranktuner=ranktuner-approx).")
    by_meta: str | None = option(None, help="Also every metric per value of this record meta field (e.g. model), "
                                            "read from the noisy JSONL the table was scored from.")
    records: Path | None = option(None, help="With --by-meta: that noisy JSONL (default: the score manifest's "
                                             "input).")
    stratify: list[str] = option((), help="Also every metric within strata of position, length or rarity, averaged "
                                          "over the strata (strata.csv; repeat or comma list).")
    strata: int = option(10, help=STRATA_HELP)
    heatmap_sequences: int = option(HEATMAP_SEQUENCES, cli=False, help="Sequences per run shown in heatmap.html.")
    engine: str = option("auto", help=ENGINE_HELP, check=_engine)
    ray: str | None = option(None, help=RAY_HELP)

    def check(self) -> None:
        from reweight_audit.evaluation import strata, table1

        if not (self.table1_map is None or isinstance(self.table1_map, (str, Mapping))):
            raise AuditError(f"--table1-map {self.table1_map!r}: give a comma list row=method or a dict, or None")
        self.table1_map = table1.parse_map(self.table1_map)
        self.by_meta = self.by_meta or None
        if self.records is not None and not self.by_meta:
            raise AuditError(f"--records {self.records}: it is read only with --by-meta FIELD; add that or drop "
                             "--records")
        if self.records is not None:
            _check_records_file(Path(self.records))
        self.stratify, self.strata = strata.check_stratify(self.stratify, self.strata)
        self.ray = _ray(self.ray, self.engine)

    @property
    def k_frac(self) -> float:
        return self.k / 100.0


def _check_records_file(path: Path) -> None:
    """``--records`` is a noisy JSONL: a parquet (a stats table) or binary file is refused before anything loads."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return  # absent or unreadable: the --by-meta step names it
    hint = "give the noisy JSONL the table was scored from (inject's output)"
    if head.startswith(b"PAR1"):
        raise AuditError(f"--records {path}: a parquet file (a stats table?), not the noisy JSONL; {hint}")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not a character cut at the end of the block read
            raise AuditError(f"--records {path}: not UTF-8 text (byte {exc.start}); {hint}") from None


# --------------------------------------------------------------------------- sweep

#: Cuts of a sweep, in percent: Table 1's 10% and the range around it.
SWEEP_K = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0)
#: The stratify value of the pooled settings.
POOLED = "none"


def _cuts(values: Any) -> list[float]:
    items = [values] if isinstance(values, (str, int, float)) else list(values)
    try:
        cuts = [float(c) for item in items for c in (item.split(",") if isinstance(item, str) else [item])
                if not isinstance(c, str) or c.strip()]
    except (TypeError, ValueError):
        raise AuditError(f"--k {','.join(map(str, items))}: give cuts in percent, e.g. --k 1,2,5,10") from None
    for c in cuts:
        if not 0 < c <= 100:
            raise AuditError(f"--k {c:g}: every cut is a percentage in (0, 100]")
    return cuts or list(SWEEP_K)


def _sweep_rank_by(values: list[str]) -> list[str]:
    from reweight_audit.evaluation.metrics import RANK_BY

    return known("--rank-by", values, RANK_BY, RANK_BY)


def _sweep_scope(values: list[str]) -> list[str]:
    from reweight_audit.evaluation.metrics import SCOPES

    return known("--scope", values, SCOPES, SCOPES)


def _metric(metric: str) -> str:
    names = per_cut_metrics()
    if metric not in names:
        raise AuditError(f"--metric {metric!r}: use one of {', '.join(names)}")
    return metric


def _sweep_stratify(values: list[str]) -> list[str]:
    from reweight_audit.evaluation.strata import STRATIFY_BY

    for value in values:
        if value != POOLED and value not in STRATIFY_BY:
            raise AuditError(f"--stratify {value!r} is not known; use {POOLED} (pooled) or one of "
                             f"{', '.join(STRATIFY_BY)}")
    return list(dict.fromkeys(values or [POOLED]))


def _grid_items(grid: Any) -> list[str]:
    from reweight_audit.evaluation.param_grid import grid_items

    return grid_items(grid)


def _target(target: str | None) -> str | None:
    from reweight_audit.evaluation.table1_search import TARGETS

    if target is not None and target not in TARGETS:
        raise AuditError(f"--target {target!r}: use one of {', '.join(TARGETS)}")
    return target


@dataclass
class SweepConfig(Config):
    """The options of one sweep; validated on construction. ``k`` is in percent, as on the command line."""

    methods: list[str] | None = option(None, help=METHODS_HELP, check=_methods)
    k: list[float] = option(SWEEP_K, kind="cuts", help="Cuts in percent (repeat or comma list).", check=_cuts)
    rank_by: list[str] = option(("weight", "loss", "grad"), help="weight, loss, grad (repeat or comma list).",
                                check=_sweep_rank_by)
    scope: list[str] = option(("global", "sequence"), help="global, sequence (repeat or comma list).",
                              check=_sweep_scope)
    metric: str = option("tok_rec", help="The per-cut metric that orders the methods: tok_rec, tok_prec, seq_hit or "
                                         "lift.", check=_metric)
    claim: str | None = option(None, help='A claimed order, lowest first: "ranktuner-approx < eaft < inv-prob"; exit '
                                          "code 0 only when it holds in every setting.")
    params: list[str] = option((), flag="--param", kind="params", api_type=PARAMS_TYPE, help=PARAM_HELP,
                               check=param_items)
    method_files: list[Path] = option((), flag="--method-file", help=METHOD_FILE_HELP)
    batch_seqs: int = option(256, help=BATCH_SEQS_HELP, check=_positive_batch)
    bootstrap: int = option(100, help="Bootstrap resamples over sequences per setting (0: none).", check=_resamples)
    seed: int = option(0, help=SEED_HELP)
    stratify: list[str] = option((POOLED,), help="The stratify axis: none (pooled), position, length, rarity (repeat "
                                                 "or comma list; a claim is checked in every setting of it).",
                                 check=_sweep_stratify)
    strata: int = option(10, help=STRATA_HELP)
    engine: str = option("auto", help=ENGINE_HELP, check=_engine)
    ray: str | None = option(None, help=RAY_HELP)
    grid: list[str] = option((), kind="params", api_type="Sequence[str] | Mapping[str, Mapping[str, Sequence]]",
                             help="A method parameter as a sweep axis, e.g. --grid ranktuner-approx.low_entropy="
                                  "smooth,trivial (repeatable; every point of the product is a setting).",
                             check=_grid_items)
    target: str | None = option(None, help="Score every setting and row-to-method map by its distance to a "
                                           "published table: table1 (RankTuner's Table 1).", check=_target)
    claim_order: list[str] | None = field(init=False, default=None, repr=False, compare=False)

    def check(self) -> None:
        from reweight_audit.evaluation import strata

        _, self.strata = strata.check_stratify([], self.strata)
        self.claim_order = parse_claim(self.claim)
        self.ray = _ray(self.ray, self.engine)

    @property
    def cuts(self) -> tuple[float, ...]:
        """The cuts as fractions, sorted, without repeats."""
        return tuple(sorted({c / 100.0 for c in self.k}))


def per_cut_metrics() -> list[str]:
    """The metrics a sweep can order methods by: those with a value per cut from the counts."""
    from reweight_audit.evaluation import metrics

    return [s.name for s in metrics.metric_specs(per_cut=True) if s.counts is not None]


def parse_claim(claim: str | None) -> list[str] | None:
    """``"a < b < c"`` → ``[a, b, c]`` (lowest first); every name must be a registered method."""
    if claim is None:
        return None
    names = [part.strip() for part in str(claim).split("<")]
    if len(names) < 2 or not all(names):
        raise AuditError(f"--claim {claim!r}: write the claimed order lowest first, e.g. "
                         "\"ranktuner-approx < eaft < inv-prob\"")
    from reweight_audit.methods import available_methods

    known = [m.name for m in available_methods()]
    for name in names:
        if name not in known:
            raise AuditError(f"--claim names {name!r}, which is not a registered method; registered: "
                             f"{', '.join(known)}")
    if len(set(names)) != len(names):
        raise AuditError(f"--claim {claim!r} names a method twice")
    return names

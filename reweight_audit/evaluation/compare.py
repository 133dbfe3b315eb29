"""``compare``: every weighting method against the injected noise.

:func:`run_compare` validates the options, selects the methods, loads the
stats tables (:mod:`reweight_audit.evaluation.runs`), computes every method's weights
once per run, ranks the tokens by weight, loss share or gradient share and
evaluates every metric (:mod:`reweight_audit.evaluation.metrics`), assembles the tables
(:class:`reweight_audit.evaluation.results.CompareResult`) and has
:mod:`reweight_audit.reporting.exports` write them. Metric definitions: ``docs/metrics.md``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from reweight_audit.evaluation import groups, metrics, strata, table1
from reweight_audit.evaluation.agreement import order_agreement
from reweight_audit.evaluation.config import CompareConfig, SweepConfig
from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import output_lock, prepare_output_dir
from reweight_audit.methods import (
    Method,
    assign_batches,
    available_methods,
    compute_viewed,
    get_method,
    load_method_file,
    missing_columns,
    parse_params,
)
from reweight_audit.evaluation.results import CompareResult, curve_columns, group_columns, kind_columns, table_columns
from reweight_audit.evaluation.outofcore.chunks import parquet_rows
from reweight_audit.evaluation.runs import RunData, StatsSource, StatsTable, _method_columns, load_runs, run_labels

TIE_RULE = "fractional (expected value under random tie-breaking)"
NOISE_MASS_OF = "the ranking score (w, w·nll or w·grad norm, per rank_by)"
#: What the in-memory engine holds per token of a table, by stage, with the default methods (peak RSS measured by
#: ``bench --compare`` at 10M tokens: compare 4.4-5.0 GB; sweep 11.1 GB, as it keeps every rank-by's scores beside
#: the weights).
MEMORY_BYTES_PER_TOKEN = {"compare": 420, "sweep": 1_100}


# --------------------------------------------------------------------------- options


def summary_config(stats_paths: list[Path | StatsTable], config: CompareConfig) -> dict:
    """summary.json's ``config``: the options under the names it has always recorded, and the fixed conventions."""
    return {
        "stats_paths": [str(p) for p in stats_paths],
        "methods": config.methods,
        "rank_by": config.rank_by,
        "k": config.k,
        "scope": config.scope,
        "params": config.params,
        "method_files": [str(p) for p in config.method_files],
        "batch_seqs": config.batch_seqs,
        "n_boot": config.bootstrap,
        "seed": config.seed,
        "heatmap_sequences": config.heatmap_sequences,
        "table1_map": config.table1_map,
        "by_meta": config.by_meta,
        "records": None if config.records is None else str(config.records),
        "stratify": config.stratify,
        "strata": config.strata,
        "cuts": [c * 100.0 for c in metrics.CUTS],
        "tie_rule": TIE_RULE,
        "noise_mass_of": NOISE_MASS_OF,
    }


def stats_sources(stats_paths: StatsSource | Sequence[StatsSource]) -> list[Path | StatsTable]:
    """The stats tables to read (paths as paths, tables in memory as they are); none is one AuditError line."""
    single = isinstance(stats_paths, (str, os.PathLike, StatsTable))
    paths = [_source(p) for p in ([stats_paths] if single else stats_paths)]
    if not paths:
        raise AuditError("compare: give at least one stats.parquet")
    return paths


def _source(source: StatsSource) -> Path | StatsTable:
    return source if isinstance(source, StatsTable) else Path(source)


def select_methods(methods: Sequence[str] | None, params: Sequence[str],
                   method_files: Sequence[Path] = ()) -> tuple[list[Method], dict]:
    """The methods to evaluate (named ones, else every registered one) and their parameters, after loading
    ``method_files``; a parameter of a method not evaluated is one AuditError line."""
    for path in method_files:
        load_method_file(path)
    param_map = parse_params(list(params))
    chosen = [get_method(name) for name in methods] if methods is not None else list(available_methods())
    names = {m.name for m in chosen}
    for name in param_map:
        if name not in names:  # it would silently do nothing
            raise AuditError(f"--param {name}.…: method {name} is not in --methods; add it there or drop "
                             "the parameter")
    return chosen, param_map


# --------------------------------------------------------------------------- evaluation


@dataclass
class _MethodContext:
    """What every method of one run is evaluated with (shared, read-only, by the worker threads)."""

    run: RunData
    columns: Mapping[str, np.ndarray]
    batch: np.ndarray | None
    param_map: dict
    options: CompareConfig
    counts: dict  # the run's token and sequence counts, repeated on every table row


@dataclass
class _RunOutcome:
    """One run's weights and rows."""

    weights: dict[str, np.ndarray] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)
    by_kind: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    t_weights: float = 0.0
    t_metrics: float = 0.0


def _method_weights(ctx: _MethodContext, method: Method) -> np.ndarray:
    batch_dep = bool(getattr(method, "batch_dependent", False))
    # with the method's declared loss attached, so the loss view is ℓ_t (methods.shapes)
    w = compute_viewed(method, ctx.columns, params=ctx.param_map.get(method.name),
                       batch=ctx.batch if batch_dep else None, seed=ctx.options.seed)
    if w.shape != (ctx.run.n_tokens,):
        raise AuditError(f"method {method.name}: returned {w.shape} weights for {ctx.run.n_tokens} tokens; "
                         "a method must return one weight per token")
    return w


def evaluate_method(ctx: _MethodContext, method: Method) -> _RunOutcome:
    """Weights of one method and every rank-by × scope result for it (pure; run in a worker thread)."""
    run, opts = ctx.run, ctx.options
    t0 = time.perf_counter()
    out = _RunOutcome(weights={method.name: _method_weights(ctx, method)})
    out.t_weights = time.perf_counter() - t0
    t0 = time.perf_counter()
    logp = run.column("logp")
    sum_p2 = run.column("sum_p2") if "grad" in opts.rank_by else None
    pool = run.pool  # weights were computed on every row; excluded rows (after-error) leave the metrics here
    for rank_by in opts.rank_by:
        scores = pool.take(metrics.rank_scores(out.weights[method.name], rank_by, logp, sum_p2))
        index = metrics.ScoreIndex(scores, pool.is_noise, pool.seq_codes, pool.kind_codes)
        for scope in opts.scope:
            ident = {"run": run.label, "method": method.name, "family": getattr(method, "family", ""),
                     "rank_by": rank_by, "scope": scope}
            row, curve = metrics.ranking_metrics(scores, pool.is_noise, pool.seq_codes, k=opts.k_frac,
                                                 cuts=metrics.CUTS, scope=scope, n_boot=opts.bootstrap,
                                                 seed=opts.seed, index=index)
            out.table.append({**ident, "k": opts.k, **row, **ctx.counts})
            out.curves += [{**ident, "k": round(cut * 100.0, 10), **vals} for cut, vals in curve.items()]
            out.by_kind += [{**ident, "k": opts.k, **kind_row} for kind_row in metrics.kind_metrics(
                index, run.kinds, k=opts.k_frac, scope=scope)]
    out.t_metrics = time.perf_counter() - t0
    return out


def _computable(run: RunData, methods: list[Method], explicit: bool, skipped: list[dict]) -> list[Method]:
    """The methods whose columns the run has; the others are skipped (an error when named explicitly)."""
    todo = []
    for method in methods:
        miss = list(missing_columns(method, run.numeric_columns))
        if miss and explicit:
            hint = " or score with --ref-model" if "ref_logp" in miss else ""
            raise AuditError(f"{run.path}: method {method.name} needs column(s) {', '.join(miss)}, which the table "
                             f"lacks; drop it from --methods{hint}")
        if miss:
            skipped.append({"run": run.label, "method": method.name,
                            "reason": f"needs column(s) {', '.join(miss)}, absent from {run.path.name}"})
        else:
            todo.append(method)
    return todo


def evaluate_run(run: RunData, methods: list[Method], param_map: dict, options: CompareConfig, *,
                 say: Callable[[str], None], n_workers: int) -> _RunOutcome:
    """Every computable method on one run, ``n_workers`` methods side by side; rows in method order."""
    base = run.summary()
    say(f"{run.label}: {base['n_tokens']:,} tokens, {base['n_noise']:,} noise")
    outcome = _RunOutcome()
    todo = _computable(run, methods, options.methods is not None, outcome.skipped)
    counts = {key: base[key] for key in ("n_tokens", "n_noise", "n_seqs", "n_noise_seqs", "base_rate")}
    ctx = _context(run, todo, param_map, options, counts)
    for method, one in zip(todo, _map_ordered(lambda m: evaluate_method(ctx, m), todo, n_workers)):
        say(f"{run.label}: {method.name} done")
        outcome.weights.update(one.weights)
        outcome.table += one.table
        outcome.curves += one.curves
        outcome.by_kind += one.by_kind
        outcome.t_weights += one.t_weights
        outcome.t_metrics += one.t_metrics
    return outcome


def _context(run: RunData, todo: list[Method], param_map: dict, options: CompareConfig,
             counts: dict) -> _MethodContext:
    """The inputs every method of the run shares, decoded once before any worker starts."""
    columns = run.stat_columns()
    for name in columns:
        columns[name]
    batch = None
    if any(getattr(m, "batch_dependent", False) for m in todo):
        batch = np.asarray(assign_batches(run.seq_codes, options.batch_seqs, options.seed))
    return _MethodContext(run=run, columns=columns, batch=batch, param_map=param_map, options=options, counts=counts)


def run_weights(run: RunData, methods: list[Method], param_map: dict, options: CompareConfig | SweepConfig,
                skipped: list[dict]) -> dict[str, np.ndarray]:
    """Each computable method's weight per token of the run, exactly as compare computes it (the whole table
    is the batch); the methods whose columns are missing are appended to ``skipped``."""
    todo = _computable(run, methods, options.methods is not None, skipped)
    ctx = _context(run, todo, param_map, options, counts={})
    return {method.name: _method_weights(ctx, method) for method in todo}


def _workers(workers: int | None) -> int:
    """Threads for the per-method work: NumPy's sorts and reductions release the GIL."""
    if workers is None:
        return max(1, min(4, os.cpu_count() or 1))
    return max(1, int(workers))


def _map_ordered(fn, items: list, n_workers: int) -> Iterator:
    """fn over items, results in input order; the first exception propagates."""
    if n_workers <= 1 or len(items) <= 1:
        for it in items:
            yield fn(it)
        return
    with ThreadPoolExecutor(max_workers=n_workers) as ex:
        futures = [ex.submit(fn, it) for it in items]
        try:
            for fut in futures:
                yield fut.result()
        finally:
            for fut in futures:
                fut.cancel()


# --------------------------------------------------------------------------- the stage


def run_compare(
    stats_paths: StatsSource | Sequence[StatsSource],
    out_dir: Path | None,
    config: CompareConfig | None = None,
    *,
    writer: Callable[..., Any] | None = None,
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompareResult:
    """Compare every method on every stats table (files, or :class:`StatsTable` in memory) and write the
    exports into ``out_dir``.

    ``config`` holds the options (:class:`~reweight_audit.evaluation.config.CompareConfig`, validated
    when it was built; None: the defaults). ``config.methods=None`` takes every registered
    method whose columns exist (the others are listed in ``skipped``); a method
    named explicitly whose columns are missing is an error. ``progress`` is an
    optional callable ``progress(message)`` (called from this thread only).
    ``workers`` threads evaluate methods side by side (default: up to 4, one
    per CPU); results do not depend on it. Without a ``writer`` (the report stage's
    ``reporting.exports.write_exports``) or an ``out_dir`` it computes without writing anything; the result keeps the runs and their
    weights, so its exports can be written later. The folder is checked and
    locked before any table is read (:func:`reweight_audit.core.io.output_lock`) and
    swapped in whole at the end.
    """
    t_start = time.perf_counter()
    say = progress or (lambda _message: None)
    options = config if config is not None else CompareConfig()
    sources = stats_sources(stats_paths)
    chosen, param_map = select_methods(options.methods, options.params, options.method_files)
    engine = choose_engine(options, sources)
    write = writer is not None and out_dir is not None
    # one compare at a time into a folder, refused before any table is read
    with output_lock(prepare_output_dir(out_dir)) if write else nullcontext():
        if engine == "duckdb":
            result, runs, weights = _compare_out_of_core(sources, chosen, param_map, options, say, out_dir)
        else:
            result, runs, weights = _compare_in_memory(sources, chosen, param_map, options, say, workers)
        timings = result.timings
        result.agreement = order_agreement(result.table)
        result.table1 = table1.table1_frame(result.table, result.runs, options.table1_map, options.k)
        result.run_data, result.run_weights = runs, weights
        if write:
            t0 = time.perf_counter()
            writer(result, Path(out_dir), runs=runs, run_weights=weights,
                   seed=options.seed, heatmap_sequences=options.heatmap_sequences)
            timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return result


def choose_engine(options: CompareConfig | SweepConfig, sources: list[Path | StatsTable]) -> str:
    """``memory`` or ``duckdb``: as asked, or (``auto``) duckdb when the files would not fit in half the memory
    available (``MEMORY_BYTES_PER_TOKEN`` of the stage per token) and the sources are files."""
    if options.engine == "duckdb" or getattr(options, "ray", None):
        _check_out_of_core(options, sources)
        return "duckdb"
    if options.engine == "memory":
        return "memory"
    if any(isinstance(s, StatsTable) for s in sources):
        return "memory"
    tokens = sum(parquet_rows(Path(s)) for s in sources)
    per_token = MEMORY_BYTES_PER_TOKEN["sweep" if isinstance(options, SweepConfig) else "compare"]
    return "duckdb" if tokens * per_token > 0.5 * available_memory() else "memory"


def _check_out_of_core(options: CompareConfig | SweepConfig, sources: list[Path | StatsTable]) -> None:
    if any(isinstance(s, StatsTable) for s in sources):
        raise AuditError("--engine duckdb reads stats.parquet files; a table in memory needs --engine memory")


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable; elsewhere the physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _compare_in_memory(sources, chosen, param_map, options: CompareConfig, say, workers):
    """The in-memory engine: every table read whole, every method's weights kept beside it."""
    t0 = time.perf_counter()
    runs = load_runs(sources)
    _check_grad_columns(runs, options)
    timings = {"load": time.perf_counter() - t0}
    outcomes = [evaluate_run(run, chosen, param_map, options, say=say, n_workers=_workers(workers))
                for run in runs]
    timings["weights"] = sum(o.t_weights for o in outcomes)
    timings["metrics"] = sum(o.t_metrics for o in outcomes)
    summaries = [{**r.summary(), "manifest": r.manifest} for r in runs]
    result = assemble([r.label for r in runs], summaries, outcomes, chosen, options, timings,
                      {**summary_config(sources, options), "engine": "memory"})
    result.by_group = by_group(runs, outcomes, chosen, options)
    result.strata = stratified(runs, outcomes, chosen, options)
    return result, runs, [o.weights for o in outcomes]


def out_of_core_runs(sources, chosen: list[Method], param_map: dict, options: CompareConfig | SweepConfig, say,
                      *, skip_grad: bool):
    """Per table: its path, label, pre-pass, the computable methods and the skipped ones, and the rank-bys (grad
    without sum_p2: an error for compare, left out by a sweep)."""
    from types import SimpleNamespace

    from reweight_audit.core.io import read_manifest
    from reweight_audit.evaluation.outofcore import engine as ooc

    paths = [Path(s) for s in sources]
    labels = run_labels(paths, [read_manifest(p) for p in paths])
    for path, label in zip(paths, labels):
        scan = ooc.scan_run(path)
        numeric = _method_columns(pq.read_schema(path).empty_table())
        rank_by = list(options.rank_by)
        if "grad" in rank_by and "sum_p2" not in numeric:
            if not skip_grad:
                raise AuditError(f"{path}: --rank-by grad needs column sum_p2, which this table lacks; "
                                 "rerun `reweight-audit score` or rank by weight/loss")
            rank_by.remove("grad")
        skipped: list[dict] = []
        todo = _computable(SimpleNamespace(numeric_columns=numeric, path=path, label=label), chosen,
                           options.methods is not None, skipped)
        yield path, label, scan, todo, skipped, rank_by, "sum_p2" in numeric


def _compare_out_of_core(sources, chosen, param_map, options: CompareConfig, say, out_dir):
    """The DuckDB engine (:mod:`reweight_audit.evaluation.outofcore`): chunks, spilled scores, exact aggregates."""
    from reweight_audit.evaluation.outofcore import engine as ooc

    t0 = time.perf_counter()
    timings = {"load": 0.0, "weights": 0.0, "metrics": 0.0}
    outcomes, summaries, samples, labels, grouped, strata_rows = [], [], [], [], [], []
    for path, label, scan, todo, skipped, rank_by, _ in out_of_core_runs(sources, chosen, param_map, options, say,
                                                                         skip_grad=False):
        timings["load"] += time.perf_counter() - t0
        outcome = _RunOutcome(skipped=skipped)
        grouping = _out_of_core_groups(path, scan, options) if options.by_meta else None
        with ooc.work_folder(out_dir, path, summary_config(sources, options)) as work:
            rows = ooc.evaluate_run(ooc.RunJob(path, label, todo, param_map, options, work, say, grouping=grouping),
                                    scan)
        grouped += rows.by_group
        strata_rows += rows.strata
        outcome.table, outcome.curves, outcome.by_kind = rows.table, rows.curves, rows.by_kind
        timings["weights"] += rows.t_weights
        timings["metrics"] += rows.t_metrics
        outcomes.append(outcome)
        summaries.append(rows.summary)
        samples.append(rows)
        labels.append(label)
        t0 = time.perf_counter()
    result = assemble(labels, summaries, outcomes, chosen, options, timings,
                      {**summary_config(sources, options), "engine": "duckdb", "ray": options.ray})
    result.by_group = pd.DataFrame(grouped, columns=group_columns()) if options.by_meta else None
    result.strata = strata.strata_frame(strata_rows) if options.stratify else None
    # weights.parquet, the plots and heatmap.html show each run's first chunk (batch-dependent methods aside)
    return result, [r.sample for r in samples], [r.sample_weights for r in samples]


def _out_of_core_groups(path: Path, scan, options: CompareConfig) -> tuple[np.ndarray, list[str]]:
    """--by-meta: per sequence code its group (as :func:`groups.sequence_groups` makes it) and the group names."""
    from types import SimpleNamespace

    from reweight_audit.core.io import read_manifest

    run = SimpleNamespace(path=path, manifest=read_manifest(path), seq_names=list(scan.seq_code))
    records = groups.records_path(run, options.records)
    return groups.sequence_groups(run, groups.read_meta(records), options.by_meta, records)


def _check_grad_columns(runs: list[RunData], options: CompareConfig) -> None:
    if "grad" in options.rank_by:
        for run in runs:
            if "sum_p2" not in run.numeric_columns:
                raise AuditError(f"{run.path}: --rank-by grad needs column sum_p2, which this table lacks; "
                                 "rerun `reweight-audit score` or rank by weight/loss")


def assemble(labels: list[str], summaries: list[dict], outcomes: list[_RunOutcome], chosen: list[Method],
             options: CompareConfig, timings: dict[str, float], recorded: dict) -> CompareResult:
    """The three tables in Table-1 blocks (run, then rank-by, then scope; methods in registration order)."""
    order = {"run": labels, "rank_by": options.rank_by, "scope": options.scope,
             "method": [m.name for m in chosen]}

    def frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
        return pd.DataFrame(_block_sorted(rows, order), columns=columns)

    return CompareResult(
        table=frame([r for o in outcomes for r in o.table], table_columns()),
        curves=frame([r for o in outcomes for r in o.curves], curve_columns()),
        by_kind=frame([r for o in outcomes for r in o.by_kind], kind_columns()),
        skipped=[s for o in outcomes for s in o.skipped],
        runs=summaries,
        config=recorded, k=options.k, timings=timings)


def by_group(runs: list[RunData], outcomes: list[_RunOutcome], chosen: list[Method],
             options: CompareConfig) -> pd.DataFrame | None:
    """by_group.csv (``--by-meta``): every metric per value of the records' meta field; None without it."""
    if not options.by_meta:
        return None
    families = {m.name: getattr(m, "family", "") for m in chosen}
    rows = []
    for run, outcome in zip(runs, outcomes):
        path = groups.records_path(run, options.records)
        grouping = groups.sequence_groups(run, groups.read_meta(path), options.by_meta, path)
        rows += groups.group_rows(run, outcome.weights, families, options.by_meta, grouping, rank_by=options.rank_by,
                                  scope=options.scope, k=options.k, n_boot=options.bootstrap, seed=options.seed)
    return pd.DataFrame(rows, columns=group_columns())


def stratified(runs: list[RunData], outcomes: list[_RunOutcome], chosen: list[Method],
               options: CompareConfig) -> pd.DataFrame | None:
    """strata.csv (``--stratify``): every method's metrics within strata of each variable; None without it."""
    if not options.stratify:
        return None
    families = {m.name: getattr(m, "family", "") for m in chosen}
    rows = []
    for run, outcome in zip(runs, outcomes):
        rows += strata.strata_rows(run, outcome.weights, families, options.stratify, options.strata,
                                   rank_by=options.rank_by, scope=options.scope, k=options.k, n_boot=options.bootstrap,
                                   seed=options.seed)
    return strata.strata_frame(rows)


def _block_sorted(rows: list[dict], order: dict[str, list[str]]) -> list[dict]:
    keys = ("run", "rank_by", "scope", "method")
    pos = {key: {v: i for i, v in enumerate(order[key])} for key in keys}
    return sorted(rows, key=lambda r: tuple(pos[key].get(r[key], len(pos[key])) for key in keys))

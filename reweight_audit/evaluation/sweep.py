"""``sweep``: does a verdict survive the conventions? Every method over every setting, from the stats tables alone.

A setting is run × rank-by × scope × cut k × noise (all noise, and each noise
kind when there are several) × stratify (``none``: the pooled metric; or the
noise-weighted mean of the metric within strata of position, length or rarity,
:mod:`reweight_audit.evaluation.strata`). Weights are computed once per run exactly as
``compare`` computes them (:func:`reweight_audit.evaluation.compare.run_weights`); every
metric comes from the one engine in :mod:`reweight_audit.evaluation.metrics`
(:func:`~reweight_audit.evaluation.metrics.sequence_counts`: per-sequence counts at
every cut, summed for the value, resampled for the interval). All methods of
a run are resampled with the same draws, so a pair's difference has a paired
bootstrap interval. Definitions: ``docs/metrics.md``, "Sweep".
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from reweight_audit.evaluation import metrics, param_grid, strata, table1_search
from reweight_audit.evaluation.compare import (choose_engine, out_of_core_runs, run_weights, select_methods,
                                                stats_sources)
from reweight_audit.evaluation.config import POOLED, SWEEP_K, SweepConfig
from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import output_lock, prepare_output_dir
from reweight_audit.methods import Method, available_methods
from reweight_audit.evaluation.runs import Pool, RunData, load_runs

#: The cuts of a sweep (fractions): Table 1's 10% and the range around it.
SWEEP_CUTS = tuple(k / 100.0 for k in SWEEP_K)
#: The columns that name a setting.
SETTING = ("run", "rank_by", "scope", "k", "noise", "stratify", "params")
#: Bootstrap resamples per setting: enough for a 95% interval's ends to settle to about a point.
DEFAULT_BOOT = SweepConfig.__dataclass_fields__["bootstrap"].default
#: The noise of a setting when every kind counts.
ALL_NOISE = "all"
LEVEL = 0.95


def sweep_record(config: SweepConfig, stats_paths: list, methods: list[str] | None) -> dict:
    """The sweep's ``config`` (summary): the options under the names it has always recorded."""
    return {"rank_by": config.rank_by, "scope": config.scope, "k": [round(c * 100, 10) for c in config.cuts],
            "n_boot": config.bootstrap, "seed": config.seed, "metric": config.metric, "claim": config.claim_order,
            "level": LEVEL, "stratify": config.stratify, "strata": config.strata,
            "stats_paths": [str(p) for p in stats_paths], "methods": methods, "params": list(config.params),
            "batch_seqs": config.batch_seqs, "grid": list(config.grid), "target": config.target}


@dataclass
class SweepResult:
    """What a sweep produced. Metric values are fractions."""

    table: pd.DataFrame  # sweep.csv: one row per setting and method
    pairs: pd.DataFrame  # pairs.csv: one row per ordered pair of methods
    claim: pd.DataFrame | None  # one row per setting, when a claim was given
    methods: list[str]
    runs: list[dict]
    notes: list[str]
    skipped: list[dict]
    config: dict
    files: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    flips: pd.DataFrame | None = None  # with --grid: per axis and pair, the settings where the order flips
    target: table1_search.TargetResult | None = None  # with --target table1

    @property
    def claim_holds(self) -> bool | None:
        """True when the claimed order holds in every setting; None without a claim."""
        return None if self.claim is None else bool(len(self.claim) and self.claim["holds"].all())


# --------------------------------------------------------------------------- options


# --------------------------------------------------------------------------- one block of settings


@dataclass
class Block:
    """Every method at every cut of one (run, rank-by, scope, noise): values, intervals, paired orders."""

    values: dict[str, np.ndarray]  # metric -> [methods, cuts]
    bounds: dict[str, np.ndarray]  # metric -> [2, methods, cuts] (NaN without a bootstrap)
    sure_less: np.ndarray  # [a, b, cuts]: the interval of metric(b) − metric(a) lies above 0
    n: int
    n_noise: int


def evaluate_block(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, n_seqs: int,
                   cuts: tuple[float, ...], scope: str, metric: str, n_boot: int, seed: int,
                   strata_codes: np.ndarray | None = None) -> Block:
    """``scores`` is [methods, tokens]. Per method, per-sequence counts at every cut; the sum gives the values,
    the bootstrap's multiplicity matrix (the same draws for every method) the replicates. With ``strata_codes``
    (a stratum per token) the counts are taken within each stratum and every value, and every replicate, is the
    noise-weighted mean over the strata (:func:`reweight_audit.evaluation.metrics.stratified_mean`)."""
    if strata_codes is None:
        parts = [slice(None)]
    else:
        parts = [np.flatnonzero(strata_codes == j) for j in np.unique(strata_codes)]
    counter = metrics.SequenceCounts(is_noise, seq_codes, cuts, scope, n_seqs=n_seqs)  # labels, codes checked once
    by_method = [counter.of(s, parts) for s in scores]
    per = [np.stack(p) for p in zip(*by_method)]  # per stratum: [methods, cuts, sequences, fields]
    n_m, n_k, n_s, n_f = per[0].shape
    reps = None
    if n_boot:
        reps = [metrics.resampled_sums(p.transpose(2, 0, 1, 3).reshape(n_s, -1), n_boot, seed)
                .reshape(n_boot, n_m, n_k, n_f) for p in per]
    return block_of([p.sum(axis=2) for p in per], reps, metric=metric, stratified=strata_codes is not None,
                    n=int(is_noise.size), n_noise=int(np.count_nonzero(is_noise)))


def block_of(totals: list[np.ndarray], reps: list[np.ndarray] | None, *, metric: str, stratified: bool, n: int,
             n_noise: int) -> Block:
    """A block from its summed counts: per stratum ``totals`` [methods, cuts, fields] and, with a bootstrap, the
    replicates' sums ``reps`` [boot, methods, cuts, fields] (the same draws for every method)."""
    n_m, n_k, _ = totals[0].shape
    specs = [s for s in metrics.metric_specs(per_cut=True) if s.counts is not None]
    values = {s.name: _combine(s, totals, stratified) for s in specs}
    bounds = {s.name: np.full((2, n_m, n_k), np.nan) for s in specs}
    sure = np.zeros((n_m, n_m, n_k), dtype=bool)
    if reps is not None:
        q = ((1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2)
        for s in specs:
            rep = _combine(s, reps, stratified)  # [boot, methods, cuts]
            bounds[s.name] = metrics.nan_quantile(rep, q)
            if s.name == metric:
                diff = rep[:, None, :, :] - rep[:, :, None, :]  # [boot, a, b, cuts]: metric(b) − metric(a)
                sure = metrics.nan_quantile(diff, q[:1])[0] > 0
    return Block(values, bounds, sure, n=n, n_noise=n_noise)


def _combine(spec: metrics.MetricSpec, totals: list[np.ndarray], stratified: bool) -> np.ndarray:
    """The metric of the summed counts (last axis: the fields); stratified, the noise-weighted mean over the parts."""
    with np.errstate(invalid="ignore", divide="ignore"):
        vals = [np.asarray(spec.counts(metrics.counts_of(t)), float) for t in totals]
        if not stratified:
            return vals[0]
        return metrics.stratified_mean(np.stack(vals), np.stack([metrics.counts_of(t).n_noise for t in totals]))


# --------------------------------------------------------------------------- one run


def noise_sets(pool: Pool, kinds: list[str]) -> list[tuple[str, np.ndarray | None]]:
    """(name, mask of the pool's tokens) per noise set: all noise, and each kind when there are several."""
    if len(kinds) == 1:
        return [(kinds[0], None)]
    sets = [(ALL_NOISE, None)]
    for code, kind in enumerate(kinds):
        sets.append((kind, ~pool.is_noise | (pool.kind_codes == code)))
    return sets


def sweep_run(run: RunData, weights: dict[str, np.ndarray], options: SweepConfig,
              say: Callable[[str], None]) -> list[tuple[dict, Block]]:
    """Every setting of one run: ``(setting without k, block)`` per rank-by × noise × scope."""
    pool = run.pool
    names = list(weights)
    out = []
    logp = run.column("logp")
    codes = {by: None if by == POOLED else metrics.stratum_codes(strata.stratify_values(run, by), options.strata)
             for by in options.stratify}
    for rank_by in options.rank_by:
        if rank_by == "grad" and "sum_p2" not in run.numeric_columns:
            continue  # noted by sweep_notes
        sum_p2 = run.column("sum_p2") if rank_by == "grad" else None
        scores = np.stack([pool.take(metrics.rank_scores(weights[m], rank_by, logp, sum_p2)) for m in names])
        for noise, mask in noise_sets(pool, run.kinds):
            sub = pool if mask is None else pool.subset(mask)
            cols = scores if mask is None else scores[:, mask]
            for scope in options.scope:
                for by, stratum in codes.items():
                    block = evaluate_block(cols, sub.is_noise, sub.seq_codes, len(run.seq_names), options.cuts,
                                           scope, options.metric, options.bootstrap, options.seed,
                                           None if stratum is None else stratum if mask is None else stratum[mask])
                    out.append(({"run": run.label, "rank_by": rank_by, "scope": scope, "noise": noise,
                                 "stratify": by}, block))
        say(f"{run.label}: rank by {rank_by} done")
    return out


# --------------------------------------------------------------------------- the tables


def sweep_table(blocks: list[tuple[dict, Block, list[str]]], cuts: tuple[float, ...],
                families: dict[str, str]) -> pd.DataFrame:
    """sweep.csv: setting, method, family, pool counts, every per-cut metric with its interval."""
    frames = []
    for setting, block, names in blocks:
        n_m, n_k = len(names), len(cuts)
        cols = {**{key: [value] * (n_m * n_k) for key, value in setting.items()},
                "k": np.tile([round(c * 100, 10) for c in cuts], n_m),
                "method": np.repeat(names, n_k), "family": np.repeat([families[m] for m in names], n_k),
                "n": block.n, "n_noise": block.n_noise}
        for name, vals in block.values.items():
            cols[name] = vals.ravel()
            cols[f"{name}_lo"], cols[f"{name}_hi"] = block.bounds[name][0].ravel(), block.bounds[name][1].ravel()
        frames.append(pd.DataFrame(cols))
    order = [*SETTING, "method", "family", "n", "n_noise"]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=order)
    return table[order + [c for c in table.columns if c not in order]]


def pair_counts(blocks: list[tuple[dict, Block, list[str]]], methods: list[str], metric: str) -> pd.DataFrame:
    """pairs.csv: per ordered pair (a, b), over the settings where both are defined: how often metric(a) < metric(b),
    how often they tie, and in how many of the "less" settings the paired interval of the difference excludes 0."""
    index = {m: i for i, m in enumerate(methods)}
    n = len(methods)
    both, less, ties, sure = (np.zeros((n, n), dtype=np.int64) for _ in range(4))
    for _, block, names in blocks:
        at = np.array([index[m] for m in names])
        v = block.values[metric]  # [methods of the block, cuts]
        a, b = v[:, None, :], v[None, :, :]
        ok = ~np.isnan(a) & ~np.isnan(b)
        grid = np.ix_(at, at)
        both[grid] += ok.sum(axis=2)
        less[grid] += (ok & (a < b)).sum(axis=2)
        ties[grid] += (ok & (a == b)).sum(axis=2)
        sure[grid] += (ok & (a < b) & block.sure_less).sum(axis=2)
    ia, ib = np.nonzero(~np.eye(n, dtype=bool))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(both > 0, less / np.maximum(both, 1), np.nan)
    return pd.DataFrame({"a": [methods[i] for i in ia], "b": [methods[j] for j in ib], "settings": both[ia, ib],
                         "less": less[ia, ib], "ties": ties[ia, ib], "share": share[ia, ib],
                         "sure": sure[ia, ib]})


def claim_table(blocks: list[tuple[dict, Block, list[str]]], claim: list[str], metric: str,
                cuts: tuple[float, ...]) -> pd.DataFrame:
    """One row per setting: the claimed methods' values, ``holds`` (each strictly below the next), ``defined``
    (every value is a number) and ``sure`` (every adjacent paired interval excludes 0)."""
    rows = []
    for setting, block, names in blocks:
        where = [names.index(m) if m in names else None for m in claim]
        for ki, cut in enumerate(cuts):
            vals = [block.values[metric][i, ki] if i is not None else np.nan for i in where]
            defined = bool(np.all(np.isfinite(vals)))
            holds = defined and all(x < y for x, y in zip(vals, vals[1:]))
            sure = holds and all(block.sure_less[i, j, ki] for i, j in zip(where, where[1:]))
            rows.append({**setting, "k": round(cut * 100, 10), **{m: v for m, v in zip(claim, vals)},
                         "holds": holds, "defined": defined, "sure": bool(sure)})
    return pd.DataFrame(rows, columns=[*SETTING, *claim, "holds", "defined", "sure"])


# --------------------------------------------------------------------------- provenance


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def run_facts(run: RunData) -> dict:
    """What :func:`sweep_notes` reads of a run: its label, manifest, sequence names, token ids' digest, columns."""
    return {"label": run.label, "manifest": run.manifest, "seq_names": run.seq_names,
            "token_digest": _digest(run.column("token_id")) if "token_id" in run.numeric_columns else None,
            "sum_p2": "sum_p2" in run.numeric_columns}


def sweep_notes(runs: list[dict], options: SweepConfig) -> list[str]:
    """What a reader must know before pooling these settings (``runs``: :func:`run_facts`): different corpora or
    tokenizers, missing grad."""
    notes = []
    corpora = {}
    for run in runs:
        digest = (run["manifest"] or {}).get("input_digest") or _digest(np.asarray(sorted(run["seq_names"]), dtype=str))
        corpora.setdefault(digest, []).append(run["label"])
    if len(corpora) > 1:
        notes.append("the tables come from different corpora (" + "; ".join(", ".join(v) for v in corpora.values())
                     + "): a setting's noise is not the same tokens in every run")
    vocab = {run["label"]: (run["manifest"] or {}).get("vocab_size") for run in runs}
    tokens = {}
    for run in runs:
        tokens.setdefault(run["token_digest"] or run["label"], []).append(run["label"])
    if len({v for v in vocab.values() if v is not None}) > 1 or (len(corpora) == 1 and len(tokens) > 1):
        notes.append("the tables come from different tokenizers ("
                     + "; ".join(f"{label}: vocabulary {v if v is not None else 'unknown'}" for label, v in vocab.items())
                     + "): a token is not the same unit in every run")
    for run in runs:
        if "grad" in options.rank_by and not run["sum_p2"]:
            notes.append(f"{run['label']}: no sum_p2 column, so no rank-by grad settings for this run")
    return notes


# --------------------------------------------------------------------------- the stage


def run_sweep(stats_paths: Path | Sequence[Path], out_dir: Path | None, config: SweepConfig | None = None, *,
              writer: Callable[[Any, Path], Any] | None = None,
              progress: Callable[[str], None] | None = None) -> SweepResult:
    """Every method over every setting of every stats table; writes sweep.csv, pairs.csv, robustness.md,
    robustness.png (and claim.csv with a claim) into ``out_dir`` through ``writer`` (the report stage's
    ``reporting.sweep_report.write_sweep``), all or none; without one nothing is written. ``config.k`` is in percent; None: the defaults.

    The folder is checked and locked before any table is read (:func:`reweight_audit.core.io.output_lock`) and
    swapped in whole at the end (:func:`reweight_audit.core.io.atomic_directory`)."""
    t0 = time.perf_counter()
    say = progress or (lambda _message: None)
    options = config if config is not None else SweepConfig()
    methods = options.methods
    if methods is not None and options.claim_order:
        methods = list(dict.fromkeys([*methods, *options.claim_order]))  # a claim's methods are always computed
    sources = stats_sources(stats_paths)
    chosen, param_map = select_methods(methods, options.params, options.method_files)
    write = writer is not None and out_dir is not None
    # one sweep at a time into a folder, refused before any table is read
    with output_lock(prepare_output_dir(out_dir)) if write else nullcontext():
        engine = choose_engine(options, sources)
        points = grid_points(chosen, options)
        if engine == "duckdb":
            blocks, summaries, facts, skipped = sweep_out_of_core(sources, chosen, param_map, options, say,
                                                                  out_dir if write else None, points=points)
        else:
            blocks, summaries, facts, skipped = _sweep_in_memory(sources, chosen, param_map, options, say, points)
        names = [m.name for m in chosen if any(m.name in b[2] for b in blocks)]
        _check_claim_computed(options.claim_order, names, skipped)
        families = {m.name: m.family for m in chosen}
        result = SweepResult(
            table=sweep_table(blocks, options.cuts, families), pairs=pair_counts(blocks, names, options.metric),
            claim=None if options.claim_order is None else claim_table(blocks, options.claim_order, options.metric, options.cuts),
            methods=names, runs=summaries, notes=sweep_notes(facts, options), skipped=skipped,
            config={**sweep_record(options, sources, methods), "engine": engine, "ray": options.ray})
        add_grid_and_target(result, options, families)
        result.timings["compute"] = time.perf_counter() - t0
        if write:
            writer(result, Path(out_dir))
    result.timings["total"] = time.perf_counter() - t0
    return result


def grid_points(chosen: list, options: SweepConfig) -> list[tuple[str, dict[str, list[str]]]]:
    """The points of the method-parameter grid (``--grid``; none: the one default point), each axis's method
    checked against the selected methods."""
    axes = param_grid.parse_grid(options.grid)
    names = {m.name for m in chosen}
    for axis in axes:
        if axis.method not in names:
            raise AuditError(f"--grid {axis.name}: method {axis.method} is not in --methods; add it there")
    return param_grid.grid_points(axes)


def _sweep_in_memory(sources, chosen, param_map, options: SweepConfig, say, points):
    """Blocks, run summaries, :func:`run_facts` and skipped methods, every table read whole; every run at every
    point of the parameter grid (a setting's ``params`` names the point)."""
    runs = load_runs(sources)
    skipped: list[dict] = []
    blocks = []
    for run in runs:
        for i, (label, items) in enumerate(points):
            weights = run_weights(run, chosen, param_grid.point_params(param_map, items), options,
                                  skipped if i == 0 else [])
            blocks += [({**setting, "params": label}, block, list(weights))
                       for setting, block in sweep_run(run, weights, options, say)]
    summaries = [{k: v for k, v in r.summary().items() if k != "columns"} for r in runs]
    return blocks, summaries, [run_facts(r) for r in runs], skipped


def sweep_out_of_core(sources, chosen: list[Method], param_map: dict, options: SweepConfig, say,
                      out_dir: Path | None = None, *, points=None):
    """A sweep's blocks ``(setting, Block, method names)``, run summaries, notes' facts and skipped methods, with
    the DuckDB engine (:mod:`reweight_audit.evaluation.outofcore.sweeping`), at every point of the grid."""
    from reweight_audit.evaluation.outofcore import engine as ooc

    points = points if points is not None else grid_points(chosen, options)
    blocks, summaries, facts, skipped_all = [], [], [], []
    for path, label, scan, todo, skipped, rank_by, has_p2 in out_of_core_runs(sources, chosen, param_map, options,
                                                                              say, skip_grad=True):
        skipped_all += skipped
        names = [m.name for m in todo]
        for point, items in points:
            job = (path, label, scan, todo, rank_by)
            run_blocks, totals = _point_blocks(job, options, say, out_dir, sources,
                                               param_grid.point_params(param_map, items), point)
            blocks += [({**setting, "params": point}, block, names) for setting, block in run_blocks]
        summary = ooc.run_summary(label, scan, totals)
        summaries.append({k: v for k, v in summary.items() if k not in ("columns", "manifest")})
        facts.append({"label": label, "manifest": summary["manifest"], "seq_names": list(scan.seq_code),
                      "token_digest": scan.token_digest,
                      "sum_p2": has_p2})
    return blocks, summaries, facts, skipped_all


def _point_blocks(run: tuple, options: SweepConfig, say, out_dir, sources, point_map: dict, point: str):
    """One run's blocks at one grid point. The work folder's key names the point, so a resumed run never reads
    another point's shards."""
    from reweight_audit.evaluation.outofcore import engine as ooc
    from reweight_audit.evaluation.outofcore.sweeping import sweep_blocks

    path, label, scan, todo, rank_by = run
    record = {**sweep_record(options, sources, options.methods), "grid_point": point}
    with ooc.work_folder(out_dir, path, record) as work:
        job = ooc.RunJob(path, label, todo, point_map, options, work, say, rank_by=rank_by)
        run_blocks, totals = sweep_blocks(job, scan)
    return [(setting, block_of(*parts, metric=options.metric, stratified=setting["stratify"] != POOLED, n=n,
                               n_noise=n_pos))
            for setting, parts, n, n_pos in run_blocks], totals


def add_grid_and_target(result: SweepResult, options: SweepConfig, families: dict[str, str]) -> None:
    """The parameter flips (with ``--grid``) and the Table 1 search (with ``--target table1``) on ``result``."""
    axes = [a.name for a in param_grid.parse_grid(options.grid)]
    if axes:
        result.flips = param_grid.flips(result.table, options.metric, axes, SETTING)
    if options.target == "table1":
        result.target = table1_search.search_table1(result.table, families, SETTING)


def _check_claim_computed(claim: list[str] | None, names: list[str], skipped: list[dict]) -> None:
    for name in claim or []:
        if name not in names:
            why = next((s["reason"] for s in skipped if s["method"] == name), "not computed")
            raise AuditError(f"--claim names {name}, which no table can compute ({why}); drop it from the claim")


"""Writing ``compare``'s results: the tables, plots and heatmap of one report folder.

The only module that imports :mod:`reweight_audit.reporting.render` (the renderers).
Everything is written into a temporary folder beside ``-o`` and moved in when
complete (:func:`reweight_audit.core.io.atomic_directory`), so a failed compare
leaves the previous report as it was. The samples the plots and the heatmap
show are drawn here, seeded. File formats: ``docs/formats.md``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from reweight_audit.reporting import pages, render as report
from reweight_audit.evaluation.agreement import agreement_markdown, verdicts
from reweight_audit.evaluation.config import HEATMAP_SEQUENCES
from reweight_audit.evaluation.groups import by_group_markdown
from reweight_audit.core.escaping import csv_text
from reweight_audit.core.io import atomic_directory, dump_json, json_safe
from reweight_audit.reporting.render import render_table, table_markdown  # the command line and the API show them
from reweight_audit.evaluation.results import CompareResult
from reweight_audit.evaluation.runs import RunData
from reweight_audit.evaluation.strata import ALL, control_verdicts, controls_markdown
from reweight_audit.evaluation.table1 import table1_markdown

__all__ = ["EXPORT_FILES", "PLOTS", "write_exports", "write_csv", "figures", "render_table", "table_markdown", "report_markdown",
           "summary",
           "weights_table"]

#: Every file of a report, in the order summary.json lists them.
EXPORT_FILES = (
    "table.csv",
    "curves.csv",
    "by_kind.csv",
    "table.md",
    "weights.parquet",
    "recall_curves.png",
    "rank_vs_prob.png",
    "expected_rank_vs_entropy.png",
    "weight_distributions.png",
    "heatmap.html",
    "table1.md",
    "table1.csv",
    "summary.json",
    "report.html",
)
#: Files written only when they have content: several runs (agreement.csv), --by-meta (by_group.csv),
#: --stratify (strata.csv).
OPTIONAL_FILES = ("agreement.csv", "by_group.csv", "strata.csv")
#: The plots, by name; each is written as ``<name>.png``.
PLOTS = ("recall_curves", "rank_vs_prob", "expected_rank_vs_entropy", "weight_distributions")
#: Points per scatter / per distribution in the plots.
PLOT_POINTS = 50_000
#: Tokens of one sequence shown in heatmap.html.
HEATMAP_MAX_TOKENS = 600
#: Reference sample for the heatmap's per-method percentile normalisation.
PERCENTILE_SAMPLE = 200_000


def write_exports(result: CompareResult, out_dir: Path, *, runs: list[RunData],
                  run_weights: list[dict[str, np.ndarray]], seed: int = 0,
                  heatmap_sequences: int = HEATMAP_SEQUENCES) -> dict[str, Path]:
    """Every file of :data:`EXPORT_FILES` into ``out_dir``, all or none; sets and returns ``result.files``."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_tables(result, tmp)
        # dictionary pages for the repetitive text columns only: trying them on the float columns costs more
        # than the whole write and gains nothing
        pq.write_table(weights_table(runs, run_weights), tmp / "weights.parquet",
                       use_dictionary=["run", "seq_id", "token", "noise_kind"])
        plots, heatmap = write_plots(result, tmp, runs=runs, run_weights=run_weights, seed=seed,
                                     heatmap_sequences=heatmap_sequences)
        result.files = {name: out_dir / name for name in EXPORT_FILES + OPTIONAL_FILES
                        if (tmp / name).exists() or name in ("summary.json", "report.html")}
        (tmp / "summary.json").write_text(dump_json(summary(result), ensure_ascii=True), encoding="utf-8")
        # the page last: it lists every other file of the folder
        (tmp / "report.html").write_text(
            pages.compare_page(result, plots, heatmap, files=[n for n in result.files if n != "report.html"]),
            encoding="utf-8")
    return result.files


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as CSV; a text cell a spreadsheet would run as a formula (a run label from a file named
    ``=cmd…``) is prefixed with ``'`` (:func:`reweight_audit.core.escaping.csv_text`). Numbers are never touched."""
    text_columns = frame.select_dtypes(include=["object", "string", "category"]).columns
    if len(text_columns):
        frame = frame.copy()
        for column in text_columns:
            frame[column] = frame[column].map(csv_text)
    frame.to_csv(path, index=False)


def write_tables(result: CompareResult, folder: Path) -> None:
    """table.csv, curves.csv, by_kind.csv and table.md; the views: table1.md/.csv, agreement.csv, by_group.csv."""
    write_csv(result.table, folder / "table.csv")
    write_csv(result.curves, folder / "curves.csv")
    write_csv(result.by_kind, folder / "by_kind.csv")
    (folder / "table.md").write_text(report_markdown(result), encoding="utf-8")
    write_views(result, folder)


def report_markdown(result: CompareResult) -> str:
    """table.md: the main table, then the sections: Controls, Across runs (several runs), By FIELD (--by-meta)."""
    sections = [controls_markdown(result.table, result.strata, result.k),
                agreement_markdown(result.agreement, result.k) if result.agreement is not None else "",
                by_group_markdown(result.by_group, result.k)]
    return "\n".join([report.table_markdown(result), *filter(None, sections)])


def write_views(result: CompareResult, folder: Path) -> None:
    """table1.md and table1.csv always; agreement.csv with several runs; by_group.csv with --by-meta; strata.csv
    with --stratify."""
    if result.table1 is not None:
        write_csv(result.table1, folder / "table1.csv")
        (folder / "table1.md").write_text(table1_markdown(result.table1, result.runs, result.config["table1_map"],
                                                          result.k, report.label_notes(result.runs)),
                                          encoding="utf-8")
    if result.agreement is not None and len(result.agreement):
        write_csv(result.agreement, folder / "agreement.csv")
    if result.by_group is not None:
        write_csv(result.by_group, folder / "by_group.csv")
    if result.strata is not None:
        write_csv(result.strata, folder / "strata.csv")


def write_plots(result: CompareResult, folder: Path, *, runs: list[RunData],
                run_weights: list[dict[str, np.ndarray]], seed: int,
                heatmap_sequences: int) -> tuple[dict[str, bytes], str]:
    """The PNG plots (:data:`PLOTS`) and heatmap.html, from seeded samples of every run; returns both (the PNGs'
    bytes by name and the heatmap's text) for report.html."""
    plots = {}
    for name, figure in figures(result, runs=runs, run_weights=run_weights, seed=seed).items():
        plots[name] = pages.png_bytes(figure)
        (folder / f"{name}.png").write_bytes(plots[name])
    heatmap_runs = [heatmap_run_data(run, choose_heatmap_sequences(run, int(heatmap_sequences), seed), weights, seed)
                    for run, weights in zip(runs, run_weights)]
    heatmap = report.heatmap_html(heatmap_runs, k=result.k)
    (folder / "heatmap.html").write_text(heatmap, encoding="utf-8")
    return plots, heatmap


def figures(result: CompareResult, *, runs: list[RunData], run_weights: list[dict[str, np.ndarray]], seed: int,
            names: tuple[str, ...] = PLOTS) -> dict[str, Any]:
    """The plots ``names`` (of :data:`PLOTS`) as matplotlib figures, drawn from seeded samples of every run."""
    plot_samples = [plot_sample(run, seed) for run in runs] if {"rank_vs_prob", "expected_rank_vs_entropy"} & set(names) \
        else []
    draw = {
        "recall_curves": lambda: report.recall_curves_figure(
            result.curves, k=result.k, highlight=tuple((result.config.get("table1_map") or {}).values())),
        "rank_vs_prob": lambda: report.rank_vs_prob_figure(plot_samples),
        "expected_rank_vs_entropy": lambda: report.expected_rank_vs_entropy_figure(plot_samples),
        "weight_distributions": lambda: report.weight_distributions_figure(
            [{"label": run.label,  # the pool: tokens after an annotated error are in neither class
              "methods": {m: weight_sample(run.pool.take(w), run.pool.is_noise, seed) for m, w in weights.items()}}
             for run, weights in zip(runs, run_weights)]),
    }
    return {name: draw[name]() for name in names}


def summary(result: CompareResult) -> dict:
    """summary.json: the configuration, the runs, the skipped methods and the main table as records."""
    return {
        "tool": "reweight-audit compare",
        "config": result.config,
        "runs": [{key: v for key, v in r.items() if key != "columns"} for r in result.runs],
        "base_rate": {r["label"]: r["base_rate"] for r in result.runs},
        "skipped": result.skipped,
        "notes": report.label_notes(result.runs),
        "table": [json_safe(rec) for rec in result.table.to_dict(orient="records")],
        **_view_records(result),
        "files": {name: p.name for name, p in result.files.items()},
    }


def _view_records(result: CompareResult) -> dict:
    """summary.json's views: table1 (always), agreement verdicts (several runs), by_group (--by-meta), strata (the
    stratified means, --stratify) and the controls' verdicts (when a control was computed)."""
    views = {}
    strata_means = None if result.strata is None else result.strata[result.strata["stratum"] == ALL]
    for key, frame in (("table1", result.table1),
                       ("agreement", verdicts(result.agreement) if result.agreement is not None
                        and len(result.agreement) else None),
                       ("by_group", result.by_group), ("strata", strata_means)):
        if frame is not None:
            views[key] = [json_safe(rec) for rec in frame.to_dict(orient="records")]
    controls = [{key: v[key] for key in ("run", "rank_by", "scope", "columns", "controls", "winners")}
                for v in control_verdicts(result.table, result.strata, result.k)]
    if controls:
        views["controls"] = controls
    return views


def weights_table(runs: list[RunData], run_weights: list[dict[str, np.ndarray]]) -> pa.Table:
    """run, seq_id, pos, token, is_noise, noise_kind and one float32 column per method."""
    all_methods = list(dict.fromkeys(m for w in run_weights for m in w))
    parts = []
    for run, weights in zip(runs, run_weights):
        t = run.table
        n = t.num_rows
        cols = {
            "run": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([run.label])),
            "seq_id": pa.DictionaryArray.from_arrays(pa.array(run.seq_codes.astype(np.int32)),
                                                      pa.array(run.seq_names, pa.string())),
            "pos": t.column("pos"),
            "token": t.column("token"),
            "is_noise": pa.array(run.is_noise),
            "noise_kind": (t.column("noise_kind").cast(pa.string()).fill_null("")
                           if "noise_kind" in t.column_names else pa.array([""] * n)),
        }
        for m in all_methods:
            w = weights.get(m)
            cols[m] = pa.array(w.astype(np.float32)) if w is not None else pa.nulls(n, pa.float32())
        parts.append(pa.table(cols))
    if len(parts) == 1:
        return parts[0]
    # runs' dictionaries differ: unify them
    return pa.concat_tables(parts).unify_dictionaries()



# --------------------------------------------------------------------------- samples for the plots


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def plot_sample(run: RunData, seed: int, limit: int = PLOT_POINTS) -> dict:
    """≤ limit tokens of a run for the scatter plots (noise kept in proportion)."""
    rng = np.random.default_rng(seed)
    idx = _subsample(run.n_tokens, limit, rng)
    out = {"label": run.label, "is_noise": run.is_noise[idx], "p": np.exp(run.column("logp")[idx])}
    for name in ("entropy", "rank", "expected_rank"):
        out[name] = run.column(name)[idx] if name in run.numeric_columns else None
    return out


def weight_sample(weights: np.ndarray, is_noise: np.ndarray, seed: int, limit: int = PLOT_POINTS) -> dict:
    """≤ limit weights of each class for the distribution plot."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, mask in (("noise", is_noise), ("clean", ~is_noise)):
        idx = np.flatnonzero(mask)
        if len(idx) > limit:
            idx = rng.choice(idx, size=limit, replace=False)
        out[name] = weights[idx]
    return out


def choose_heatmap_sequences(run: RunData, n: int, seed: int) -> list[int]:
    """Seeded choice of sequence codes, sequences with noise first."""
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    n_seqs = len(run.seq_names)
    noisy = np.flatnonzero(np.bincount(run.seq_codes[run.is_noise], minlength=n_seqs) > 0)
    chosen = list(rng.permutation(noisy)[:n]) if len(noisy) else []
    if len(chosen) < n:
        clean = np.setdiff1d(np.arange(n_seqs), noisy)
        chosen += list(rng.permutation(clean)[: n - len(chosen)])
    return sorted(int(c) for c in chosen)


def percentile_of(values: np.ndarray, reference_sorted: np.ndarray) -> np.ndarray:
    """Mid-rank percentile (0..1) of ``values`` within a sorted reference."""
    n = len(reference_sorted)
    if n == 0:
        return np.full(len(values), 0.5)
    lo = np.searchsorted(reference_sorted, values, side="left")
    hi = np.searchsorted(reference_sorted, values, side="right")
    return (lo + hi) / (2.0 * n)


def heatmap_run_data(run: RunData, seq_codes: list[int], weights: Mapping[str, np.ndarray],
                     seed: int) -> dict:
    """Tokens, statistics and per-method weights (raw and percentile) of the chosen sequences."""
    rng = np.random.default_rng(seed)
    sel = np.flatnonzero(np.isin(run.seq_codes, np.asarray(seq_codes, dtype=np.int64)))
    pos = run.column("pos")[sel]
    order = np.lexsort((pos, run.seq_codes[sel]))
    sel = sel[order]
    ref_idx = _subsample(run.n_tokens, PERCENTILE_SAMPLE, rng)
    refs = {m: np.sort(w[ref_idx]) for m, w in weights.items()}
    tokens = run.table.column("token").take(pa.array(sel)).to_pylist()
    stats = {}
    stats["p"] = np.exp(run.column("logp")[sel])
    for name, key in (("entropy", "H"), ("rank", "R"), ("expected_rank", "ER")):
        if name in run.numeric_columns:
            stats[key] = run.column(name)[sel]
    seqs = []
    codes_sel = run.seq_codes[sel]
    bounds = np.flatnonzero(np.diff(codes_sel)) + 1
    for chunk in np.split(np.arange(len(sel)), bounds):
        if len(chunk) == 0:
            continue
        truncated = len(chunk) > HEATMAP_MAX_TOKENS
        chunk = chunk[:HEATMAP_MAX_TOKENS]
        rows = sel[chunk]
        seq = {
            "seq_id": run.seq_names[int(codes_sel[chunk[0]])],
            "truncated": bool(truncated),
            "tokens": [tokens[i] if tokens[i] is not None else "" for i in chunk],
            "noise": [bool(x) for x in run.is_noise[rows]],
            "kind": shown_kinds(run, rows),
            "stats": {key: [_json_num(v) for v in arr[chunk]] for key, arr in stats.items()},
            "w": {m: [_json_num(v) for v in w[rows]] for m, w in weights.items()},
            "pct": {m: [round(float(v), 4) for v in percentile_of(w[rows], refs[m])] for m, w in weights.items()},
        }
        seqs.append(seq)
    return {"label": run.label, "methods": list(weights), "seqs": seqs}


def shown_kinds(run: RunData, rows: np.ndarray) -> list[str]:
    """Per row, its noise kind, or for a row left out of the metrics (after-error) that kind; "" for clean."""
    kinds = [run.kinds[c] if c >= 0 else "" for c in run.kind_codes[rows]]
    if run.excluded is None or not run.excluded[rows].any():
        return kinds
    raw = run.table.column("noise_kind").take(pa.array(rows)).to_pylist()
    return [raw[i] if run.excluded[r] else kind for i, (r, kind) in enumerate(zip(rows, kinds))]


def _json_num(v: Any) -> float | None:
    v = float(v)
    if not math.isfinite(v):
        return None
    return float(f"{v:.6g}")

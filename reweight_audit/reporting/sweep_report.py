"""Writing a sweep: sweep.csv, pairs.csv, claim.csv, robustness.md, robustness.png and sweep.json, all or none.

Everything here formats or draws what :mod:`reweight_audit.evaluation.sweep` computed;
the folder is written through :func:`reweight_audit.core.io.atomic_directory`.
File formats: ``docs/formats.md``, "Sweep folder".
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from reweight_audit.core.escaping import markdown_code, markdown_text, plot_text
from reweight_audit.core.formatting import fmt_pct, k_label
from reweight_audit.core.io import atomic_directory, dump_json, json_safe
from reweight_audit.evaluation.metrics import metric_specs
from reweight_audit.reporting import pages
from reweight_audit.reporting.exports import write_csv
from reweight_audit.reporting.render import label_notes
from reweight_audit.evaluation.sweep import SETTING, SweepResult

#: Every file of a sweep folder (claim.csv only with a claim).
SWEEP_FILES = ("sweep.csv", "pairs.csv", "claim.csv", "flips.csv", "table1_target.csv", "robustness.md",
               "robustness.png", "sweep.json", "report.html")


def write_sweep(result: SweepResult, out_dir: Path) -> dict[str, Path]:
    """The sweep's files into ``out_dir``, all or none; sets and returns ``result.files``."""
    with atomic_directory(out_dir) as tmp:
        write_csv(result.table, tmp / "sweep.csv")
        write_csv(result.pairs, tmp / "pairs.csv")
        if result.claim is not None:
            write_csv(result.claim, tmp / "claim.csv")
        if result.flips is not None:
            write_csv(result.flips, tmp / "flips.csv")
        if result.target is not None:
            write_csv(result.target.candidates, tmp / "table1_target.csv")
        (tmp / "robustness.md").write_text(robustness_markdown(result), encoding="utf-8")
        plot_pair_matrix(result, tmp / "robustness.png")
        names = [n for n in SWEEP_FILES if (tmp / n).exists() or n in ("sweep.json", "report.html")]
        result.files = {name: Path(out_dir) / name for name in names}
        (tmp / "sweep.json").write_text(dump_json(sweep_summary(result), ensure_ascii=True), encoding="utf-8")
        write_sweep_page(result, tmp)
    return result.files


def write_sweep_page(result: SweepResult, folder: Path) -> Path:
    """report.html of the sweep (:func:`reweight_audit.reporting.pages.sweep_page`), the heat map embedded."""
    page = pages.sweep_page(result, (folder / "robustness.png").read_bytes(), _header(result.config["metric"]),
                            files=[n for n in result.files if n != "report.html"])
    (folder / "report.html").write_text(page, encoding="utf-8")
    return folder / "report.html"


def sweep_summary(result: SweepResult) -> dict:
    """sweep.json: configuration, runs, notes, skipped methods, the pair table and the claim's verdict."""
    out = {"tool": "reweight-audit sweep", "config": result.config, "runs": result.runs,
           "notes": result.notes + label_notes(result.runs), "skipped": result.skipped, "methods": result.methods,
           "pairs": [json_safe(r) for r in result.pairs.to_dict(orient="records")],
           "files": {name: p.name for name, p in result.files.items()}}
    if result.target is not None:
        out["table1_target"] = {"settings": result.target.n_settings, "candidates": int(len(result.target.candidates)),
                                "any_all_within": result.target.any_all_within,
                                "closest": [json_safe(r) for r in result.target.closest().to_dict(orient="records")]}
    if result.claim is not None:
        out["claim"] = {"order": result.config["claim"], "holds_everywhere": result.claim_holds,
                        "settings": int(len(result.claim)), "holds": int(result.claim["holds"].sum()),
                        "sure": int(result.claim["sure"].sum())}
    return out


def share_matrix(pairs: pd.DataFrame, methods: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(share, sure, settings) as [a, b] matrices in ``methods`` order; the diagonal is NaN / 0."""
    n = len(methods)
    share, sure, settings = np.full((n, n), np.nan), np.zeros((n, n), int), np.zeros((n, n), int)
    pos = {m: i for i, m in enumerate(methods)}
    for row in pairs.itertuples(index=False):
        i, j = pos[row.a], pos[row.b]
        share[i, j], sure[i, j], settings[i, j] = row.share, row.sure, row.settings
    return share, sure, settings


def _header(metric: str) -> str:
    spec = next(s for s in metric_specs() if s.name == metric)
    return (spec.header or metric).replace("@{k}", "").replace("{k}", "")


def robustness_markdown(result: SweepResult) -> str:
    """robustness.md: the settings, the notes, the pair matrix, the orders that never change, the claim."""
    cfg, metric = result.config, _header(result.config["metric"])
    n_settings = int(result.pairs["settings"].max()) if len(result.pairs) else 0
    noise = list(dict.fromkeys(result.table["noise"])) if len(result.table) else []
    lines = ["# reweight-audit sweep: which method puts less weight on noise, whatever the convention", ""]
    for r in result.runs:
        lines.append(f"- **{markdown_text(r['label'])}** ({markdown_code(r['path'])}): {r['n_tokens']:,} tokens, {r['n_noise']:,} noise "
                     f"(base rate {fmt_pct(r['base_rate'])})")
    lines += [f"- settings: run × rank by ({', '.join(cfg['rank_by'])}) × scope ({', '.join(cfg['scope'])}) × "
              f"k ({', '.join(k_label(k) for k in cfg['k'])}) × noise ({', '.join(noise)}) × stratify "
              f"({', '.join(cfg['stratify'])})"
              + (f" × method parameters ({'; '.join(map(markdown_text, cfg.get('grid') or []))})" if cfg.get("grid") else "")
              + f": up to {n_settings} per pair of methods",
              *([f"- stratified settings: the metric within {cfg['strata']} quantile strata of the variable, averaged "
                 "with each stratum weighted by its noise tokens (`none`: pooled)"]
                if any(v != "none" for v in cfg["stratify"]) else []),
              f"- order by {metric}; ties at the cut count fractionally; "
              + (f"bootstrap over sequences, {cfg['n_boot']} resamples, the same draws for every method (seed "
                 f"{cfg['seed']})" if cfg["n_boot"] else "no bootstrap (--bootstrap 0)")]
    lines += [f"- note: {markdown_text(n)}" for n in result.notes + label_notes(result.runs)]
    if result.skipped:
        lines += [f"- skipped: {markdown_text(s['method'])} ({markdown_text(s['run'])}: {markdown_text(s['reason'])})"
                  for s in result.skipped]
    lines += ["", *pair_matrix_markdown(result, metric), "", *consistent_orders(result, metric)]
    if result.claim is not None:
        lines += ["", *claim_markdown(result, metric)]
    if result.flips is not None:
        lines += ["", *flips_markdown(result, metric)]
    if result.target is not None:
        lines += ["", *table1_target_markdown(result)]
    return "\n".join(lines).rstrip() + "\n"


def flips_markdown(result: SweepResult, metric: str) -> list[str]:
    """Which verdicts flip with a method parameter: per grid axis, the pairs whose order it changes, and the claim."""
    f = result.flips
    lines = [f"## Verdicts that flip with a method parameter (by {metric})", "",
             "Per `--grid` axis: the pairs of methods whose order changes between the axis's values with every other "
             "convention and every other axis held fixed, as flipped settings of the settings where both are defined.", ""]
    for axis, part in f.groupby("axis", sort=False):
        moved = part[part["flipped"] > 0].sort_values("flipped", ascending=False, kind="stable")
        lines.append(f"- **{markdown_text(axis)}**: {len(moved)} of {len(part)} pairs flip in some setting"
                     + ("" if len(moved) else " (no verdict depends on it)"))
        for row in moved.head(12).itertuples(index=False):
            lines.append(f"  - {markdown_text(row.a)} vs {markdown_text(row.b)}: {row.flipped} of {row.settings} settings")
    if result.claim is not None and "params" in result.claim:
        lines += ["", *_claim_by_point(result)]
    return lines


def _claim_by_point(result: SweepResult) -> list[str]:
    claim = result.claim
    held = claim.groupby("params", sort=False)["holds"].agg(["sum", "count"])
    return [f"The claim per grid point: " + "; ".join(f"{markdown_text(p)}: {int(r['sum'])} of {int(r['count'])}"
                                                     for p, r in held.iterrows())]


def table1_target_markdown(result: SweepResult) -> list[str]:
    """``--target table1``: does any setting reproduce RankTuner's Table 1, the closest ones, what they share."""
    from reweight_audit.evaluation.table1 import PAPER_TABLE1

    target = result.target
    lines = ["## Target: RankTuner's Table 1", "",
             f"Every setting ({target.n_settings}) × every row-to-method map (each row any computed member of its camp: "
             + "; ".join(f"{PAPER_TABLE1[r][0]}: {', '.join(map(markdown_text, m))}" for r, m in target.members.items())
             + f"), {len(target.candidates)} candidates, scored by the mean absolute difference from the paper's nine "
             "figures (percentage points) and by how many of the nine lie inside our 95% bootstrap intervals.", "",
             "**" + ("Some candidate puts all three rows within their intervals."
                     if target.any_all_within else "No candidate puts all three rows within their intervals.") + "**",
             "", "| # | distance | within | " + " | ".join(c for c in target.setting if c != "run")
             + " | " + " | ".join(PAPER_TABLE1[r][0] for r in PAPER_TABLE1) + " |",
             "|---:|---:|---:|" + "---|" * (len(target.setting) - 1 + len(PAPER_TABLE1))]
    for i, row in enumerate(target.closest().to_dict(orient="records"), 1):
        cells = [k_label(row[c]) if c == "k" else markdown_text(row[c]) for c in target.setting if c != "run"]
        cells += [f"`{markdown_text(row[f'map_{r}'])}`" for r in PAPER_TABLE1]
        lines.append(f"| {i} | {row['distance']:.2f} | {row['within']}/9 | " + " | ".join(cells) + " |")
    shared = target.shared()
    lines += ["", "Shared by the closest: " + "; ".join(f"{markdown_text(c)} = {markdown_text(v)} ({share:.0%})"
                                                       for c, (v, share) in shared.items()) + "."]
    return lines


def pair_matrix_markdown(result: SweepResult, metric: str) -> list[str]:
    """Row A, column B: share of the settings with metric(A) < metric(B), and how many of those are sure."""
    methods = result.methods
    share, sure, settings = share_matrix(result.pairs, methods)
    lines = [f"## A below B: share of settings in which A's {metric} is lower than B's", "",
             f"Row A, column B: the share of the settings (both defined) in which A puts less weight on noise than B "
             f"by {metric}; in parentheses, in how many of those settings the paired 95% bootstrap interval of "
             f"{metric}(B) − {metric}(A) lies above 0. Last column: A's mean share over the other methods.", "",
             "| A \\ B | " + " | ".join(map(markdown_text, methods)) + " | mean |", "|---|" + "---:|" * (len(methods) + 1)]
    for i, a in enumerate(methods):
        cells = ["·" if i == j else (f"{share[i, j] * 100:.0f}% ({sure[i, j]})" if settings[i, j] else "n/a")
                 for j in range(len(methods))]
        others = share[i, np.arange(len(methods)) != i]
        mean = f"{np.nanmean(others) * 100:.0f}%" if np.isfinite(others).any() else "n/a"
        lines.append(f"| **{markdown_text(a)}** | " + " | ".join(cells) + f" | {mean} |")
    return lines


def consistent_orders(result: SweepResult, metric: str) -> list[str]:
    """The pairs whose order is the same in every setting."""
    p = result.pairs
    fixed = p[(p["settings"] > 0) & (p["less"] == p["settings"])]
    lines = [f"## Orders that hold in every setting ({len(fixed)} of {len(p) // 2} pairs)", ""]
    for row in fixed.itertuples(index=False):
        lines.append(f"- {markdown_text(row.a)} < {markdown_text(row.b)} by {metric} in all {row.settings} settings ({row.sure} sure)")
    if not len(fixed):
        lines.append("- none: every pair's order changes with the convention")
    return lines


def claim_markdown(result: SweepResult, metric: str) -> list[str]:
    """The claim's verdict and every setting, failing ones first."""
    claim, order = result.claim, result.config["claim"]
    held = int(claim["holds"].sum())
    lines = [f"## Claim: {' < '.join(order)} (by {metric})", "",
             f"Holds in {held} of {len(claim)} settings ({int(claim['sure'].sum())} with every step sure); "
             + ("it holds everywhere." if result.claim_holds else "it does not hold everywhere."), "",
             "| " + " | ".join([*SETTING, *order, "holds", "sure"]) + " |",
             "|" + "---|" * len(SETTING) + "---:|" * len(order) + "---|---|"]
    for row in claim.sort_values("holds", kind="stable").to_dict(orient="records"):
        cells = [markdown_text(row[c]) if c != "k" else k_label(row[c]) for c in SETTING]
        cells += [fmt_pct(row[m]) for m in order] + ["yes" if row["holds"] else "**no**", "yes" if row["sure"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def claim_lines(result: SweepResult) -> tuple[list[str], list[str]]:
    """(settings where the claim holds, settings where it fails), one line each, for the command line."""
    order = result.config["claim"]
    holds, fails = [], []
    for row in result.claim.to_dict(orient="records"):
        where = ", ".join(f"{c}={k_label(row[c]) if c == 'k' else row[c]}" for c in SETTING)
        vals = " < ".join(f"{m} {fmt_pct(row[m])}" for m in order) if row["holds"] else \
            ", ".join(f"{m} {fmt_pct(row[m])}" for m in order)
        (holds if row["holds"] else fails).append(f"{where}: {vals}" + (" (sure)" if row["sure"] else ""))
    return holds, fails


def heat_map_order(result: SweepResult) -> list[str]:
    """The methods by family (the registry's order of families), within a family by their mean share of
    "A below B" (lowest weight on noise first), so that similar methods sit together at any number of methods."""
    methods = result.methods
    share, _, _ = share_matrix(result.pairs, methods)
    with np.errstate(all="ignore"):
        mean = np.nanmean(np.where(np.eye(len(methods), dtype=bool), np.nan, share), axis=1) if len(methods) else []
    families = dict(zip(result.table["method"], result.table["family"])) if "family" in result.table.columns else {}
    family_order = list(dict.fromkeys(families.get(m, "") for m in methods))
    rank = {m: (family_order.index(families.get(m, "")), -(v if math.isfinite(v) else -1.0), i)
            for i, (m, v) in enumerate(zip(methods, mean))}
    return sorted(methods, key=rank.__getitem__)


def pair_matrix_figure(result: SweepResult):
    """Heat map of the share matrix (row below column), methods ordered by :func:`heat_map_order`, families
    separated by lines; cells labelled with their percentage up to 24 methods (beyond, the colour alone)."""
    from matplotlib.figure import Figure

    methods = heat_map_order(result)
    share, _, _ = share_matrix(result.pairs, methods)
    n = max(len(methods), 1)
    size = max(4.5, 0.42 * n + 2.5)
    fig = Figure(figsize=(size + 1.4, size), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(share), cmap="RdYlGn", vmin=0.0, vmax=1.0)
    fontsize = 8 if n <= 16 else 7
    ax.set_xticks(range(len(methods)), [plot_text(m) for m in methods], rotation=60, ha="right", fontsize=fontsize)
    ax.set_yticks(range(len(methods)), [plot_text(m) for m in methods], fontsize=fontsize)
    ax.set_xlabel("B")
    ax.set_ylabel("A")
    metric = _header(result.config["metric"])
    ax.set_title(f"share of settings with {metric}(A) < {metric}(B)", fontsize=10)
    families = dict(zip(result.table["method"], result.table["family"])) if "family" in result.table.columns else {}
    for i in range(1, len(methods)):
        if families.get(methods[i]) != families.get(methods[i - 1]):
            ax.axhline(i - 0.5, color="black", lw=0.8)
            ax.axvline(i - 0.5, color="black", lw=0.8)
    if n <= 24:
        for i in range(len(methods)):
            for j in range(len(methods)):
                if i != j and math.isfinite(share[i, j]):
                    ax.text(j, i, f"{share[i, j] * 100:.0f}", ha="center", va="center", fontsize=6 if n > 12 else 7)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of settings")
    return fig


def plot_pair_matrix(result: SweepResult, path: Path) -> Path:
    """:func:`pair_matrix_figure` as a PNG file."""
    pair_matrix_figure(result).savefig(path, format="png")
    return path

"""Across runs: does each pair of methods keep its order on each metric in every run (say, on every model)?

From compare's main table (several runs side by side): for every rank-by ×
scope, every unordered pair of methods and every shown metric, the order of
the two in each run where both were computed, whether it is the same in
every run, and in how many runs their bootstrap intervals do not overlap
(the order is then clear in that run). Pure functions; the exports write
``agreement.csv`` and the Markdown section. Definitions: ``docs/metrics.md``,
"Across runs".
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from reweight_audit.core.formatting import k_label
from reweight_audit.evaluation.metrics import metric_specs

#: agreement.csv: one row per rank-by × scope × metric × pair × run.
COLUMNS = ("rank_by", "scope", "metric", "a", "b", "run", "a_value", "a_lo", "a_hi", "b_value", "b_lo", "b_hi",
           "order", "separated", "runs", "same_order", "verdict", "separated_runs")


def order_metrics() -> list[str]:
    """The metrics whose order is checked: those the tables show."""
    return [s.name for s in metric_specs() if s.header is not None]


def _grids(block: pd.DataFrame, columns: list[str], methods: list[str], runs: list[str]) -> dict[str, np.ndarray]:
    """Per column, [methods, runs] (NaN where a method was not computed in a run, or the column is absent)."""
    present = [c for c in columns if c in block.columns]
    wide = block.drop_duplicates(["method", "run"]).set_index(["method", "run"])[present].unstack("run")
    out = {}
    for column in columns:
        if column in present:
            out[column] = wide[column].reindex(index=methods, columns=runs).to_numpy(dtype=float)
        else:
            out[column] = np.full((len(methods), len(runs)), np.nan)
    return out


def order_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """The long table (:data:`COLUMNS`); empty with fewer than two runs. ``verdict``: the order (``<``, ``>``,
    ``=``) when it is the same in every run where both methods were computed, else ``changes``."""
    runs = list(dict.fromkeys(table["run"])) if len(table) else []
    if len(runs) < 2:
        return pd.DataFrame(columns=list(COLUMNS))
    frames = []
    for (rank_by, scope), block in table.groupby(["rank_by", "scope"], sort=False):
        methods = list(dict.fromkeys(block["method"]))
        ia, ib = (np.array(x, dtype=np.int64).reshape(-1) for x in zip(*itertools.combinations(range(len(methods)), 2))) \
            if len(methods) > 1 else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        grids = _grids(block, [m + suffix for m in order_metrics() for suffix in ("", "_lo", "_hi")], methods, runs)
        for metric in order_metrics():
            v, lo, hi = (grids[metric + suffix] for suffix in ("", "_lo", "_hi"))
            frames.append(_pair_frame(rank_by, scope, metric, methods, runs, ia, ib, v, lo, hi))
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))
    return out[list(COLUMNS)]


def _pair_frame(rank_by, scope, metric, methods, runs, ia, ib, v, lo, hi) -> pd.DataFrame:
    """Every pair (ia[i], ib[i]) × run where both values are numbers, with each pair's verdict over its runs."""
    a, b = v[ia], v[ib]  # [pairs, runs]
    ok = ~np.isnan(a) & ~np.isnan(b)
    order = np.where(a < b, "<", np.where(a > b, ">", "="))
    bounds = np.isfinite(lo[ia]) & np.isfinite(hi[ia]) & np.isfinite(lo[ib]) & np.isfinite(hi[ib])
    separated = bounds & ((hi[ia] < lo[ib]) | (hi[ib] < lo[ia]))
    n_runs = ok.sum(axis=1)
    kinds = [((order == sym) & ok).sum(axis=1) for sym in ("<", ">", "=")]
    verdict = np.select([k == n_runs for k in kinds], ["<", ">", "="], "changes")
    verdict = np.where(n_runs > 0, verdict, "")
    pair, run = np.nonzero(ok)
    return pd.DataFrame({
        "rank_by": rank_by, "scope": scope, "metric": metric,
        "a": np.asarray(methods, dtype=object)[ia[pair]], "b": np.asarray(methods, dtype=object)[ib[pair]],
        "run": np.asarray(runs, dtype=object)[run], "a_value": a[pair, run], "a_lo": lo[ia][pair, run],
        "a_hi": hi[ia][pair, run], "b_value": b[pair, run], "b_lo": lo[ib][pair, run], "b_hi": hi[ib][pair, run],
        "order": order[pair, run], "separated": separated[pair, run], "runs": n_runs[pair],
        "same_order": verdict[pair] != "changes", "verdict": verdict[pair],
        "separated_runs": (separated & ok).sum(axis=1)[pair]})


def verdicts(agreement: pd.DataFrame) -> pd.DataFrame:
    """One row per rank-by × scope × metric × pair: runs, verdict, separated_runs (summary.json)."""
    keys = ["rank_by", "scope", "metric", "a", "b"]
    return agreement.drop_duplicates(keys)[keys + ["runs", "same_order", "verdict", "separated_runs"]] \
        .reset_index(drop=True)


def agreement_markdown(agreement: pd.DataFrame, k: float) -> str:
    """The table.md section: per rank-by × scope, a pair's verdict on every metric, with its separated runs."""
    if not len(agreement):
        return ""
    headers = {s.name: s.header.format(k=k_label(k)) for s in metric_specs() if s.header is not None}
    v = verdicts(agreement)
    metrics_shown = list(dict.fromkeys(v["metric"]))
    n_runs = agreement["run"].nunique()
    lines = ["## Across runs: does each pair keep its order?", "",
             f"For each pair (A, B): `<` when A is below B in every one of the {n_runs} runs (where both were "
             "computed), `>` above, `=` tied, `changes` when the order differs between runs; [s/n]: in s of the n "
             "runs the two bootstrap intervals do not overlap. Values and intervals per run: agreement.csv.", ""]
    for (rank_by, scope), block in v.groupby(["rank_by", "scope"], sort=False):
        tok = block[block["metric"] == "tok_rec"] if "tok_rec" in metrics_shown else block
        lines += [f"### rank by {rank_by}, {scope}: {int(tok['same_order'].sum())} of {len(tok)} pairs keep their "
                  f"{headers.get(tok['metric'].iloc[0], '')} order in every run", "",
                  "| A | B | " + " | ".join(headers[m] for m in metrics_shown) + " |",
                  "|---|---|" + "---|" * len(metrics_shown)]
        text = block["verdict"] + " [" + block["separated_runs"].astype(str) + "/" + block["runs"].astype(str) + "]"
        cells = text.set_axis(pd.MultiIndex.from_frame(block[["a", "b", "metric"]])).unstack("metric")
        pairs = list(dict.fromkeys(zip(block["a"], block["b"])))
        cells = cells.reindex(index=pd.MultiIndex.from_tuples(pairs), columns=metrics_shown).fillna("n/a")
        for (a, b), row in zip(pairs, cells.to_numpy()):
            lines.append(f"| {a} | {b} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"

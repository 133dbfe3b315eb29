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

from reweight_audit.formatting import k_label
from reweight_audit.metrics import metric_specs

#: agreement.csv: one row per rank-by × scope × metric × pair × run.
COLUMNS = ("rank_by", "scope", "metric", "a", "b", "run", "a_value", "a_lo", "a_hi", "b_value", "b_lo", "b_hi",
           "order", "separated", "runs", "same_order", "verdict", "separated_runs")


def order_metrics() -> list[str]:
    """The metrics whose order is checked: those the tables show."""
    return [s.name for s in metric_specs() if s.header is not None]


def _order(a: float, b: float) -> str:
    if np.isnan(a) or np.isnan(b):
        return ""
    return "<" if a < b else (">" if a > b else "=")


def _separated(a: float, a_lo: float, a_hi: float, b: float, b_lo: float, b_hi: float) -> bool:
    """The two intervals do not overlap (False without intervals)."""
    return bool(np.isfinite([a_lo, a_hi, b_lo, b_hi]).all() and (a_hi < b_lo or b_hi < a_lo))


def order_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """The long table (:data:`COLUMNS`); empty with fewer than two runs. ``verdict``: the order (``<``, ``>``,
    ``=``) when it is the same in every run where both methods were computed, else ``changes``."""
    runs = list(dict.fromkeys(table["run"])) if len(table) else []
    if len(runs) < 2:
        return pd.DataFrame(columns=list(COLUMNS))
    rows = []
    for (rank_by, scope), block in table.groupby(["rank_by", "scope"], sort=False):
        methods = list(dict.fromkeys(block["method"]))
        values = block.set_index(["method", "run"])
        for metric in order_metrics():
            def get(method: str, run: str, suffix: str = "") -> float:
                col = metric + suffix
                key = (method, run)
                return float(values.at[key, col]) if key in values.index and col in values.columns else np.nan

            for a, b in itertools.combinations(methods, 2):
                pair = []
                for run in runs:
                    va, vb = get(a, run), get(b, run)
                    order = _order(va, vb)
                    if not order:
                        continue
                    bounds = (get(a, run, "_lo"), get(a, run, "_hi"), get(b, run, "_lo"), get(b, run, "_hi"))
                    pair.append({"rank_by": rank_by, "scope": scope, "metric": metric, "a": a, "b": b, "run": run,
                                 "a_value": va, "a_lo": bounds[0], "a_hi": bounds[1], "b_value": vb,
                                 "b_lo": bounds[2], "b_hi": bounds[3], "order": order,
                                 "separated": _separated(va, bounds[0], bounds[1], vb, bounds[2], bounds[3])})
                rows += _with_verdict(pair)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _with_verdict(pair: list[dict]) -> list[dict]:
    orders = {row["order"] for row in pair}
    verdict = orders.pop() if len(orders) == 1 else "changes"
    separated = sum(row["separated"] for row in pair)
    return [{**row, "runs": len(pair), "same_order": verdict != "changes", "verdict": verdict,
             "separated_runs": separated} for row in pair]


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
        cells = block.set_index(["a", "b", "metric"])
        for a, b in dict.fromkeys(zip(block["a"], block["b"])):
            row = []
            for m in metrics_shown:
                if (a, b, m) in cells.index:
                    c = cells.loc[(a, b, m)]
                    row.append(f"{c['verdict']} [{c['separated_runs']}/{c['runs']}]")
                else:
                    row.append("n/a")
            lines.append(f"| {a} | {b} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"

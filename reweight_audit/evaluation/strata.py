"""``compare --stratify``: every metric within strata of a trivial variable, and which methods beat the controls.

An aggregate table can reward a method for where the noise sits (late in the
response, in long responses, on rare token ids) rather than for what it is.
Within strata of that variable the advantage is gone: the metrics are
computed on each stratum's tokens alone and averaged, each stratum weighted by
its noise tokens (:func:`reweight_audit.evaluation.metrics.stratified_metrics`). The
variables are the controls' own definitions (``methods/control.py``). Strata
are quantiles over the tokens the metrics see, fixed once per run; weights stay
those computed on the whole table. Definitions: ``docs/metrics.md``, "Controls
and strata".
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from reweight_audit.evaluation import metrics
from reweight_audit.core.errors import AuditError
from reweight_audit.core.escaping import markdown_text
from reweight_audit.core.formatting import fmt_num, fmt_pct
from reweight_audit.methods.control import relative_position, token_rarity
from reweight_audit.evaluation.runs import RunData

#: The variables ``--stratify`` takes: relative position, the response's length in tokens, the token id's rarity.
STRATIFY_BY = ("position", "length", "rarity")
#: The family of the controls (``methods/control.py``).
CONTROL_FAMILY = "control"
#: The stratum of a strata.csv row holding the noise-weighted mean over the strata.
ALL = "all"


def check_stratify(values: list[str], n_strata: int) -> tuple[list[str], int]:
    """The validated ``--stratify`` variables (no repeats) and ``--strata`` count."""
    for value in values:
        if value not in STRATIFY_BY:
            raise AuditError(f"--stratify {value!r} is not known; use one of {', '.join(STRATIFY_BY)}")
    try:
        n = int(n_strata)
    except (TypeError, ValueError):
        raise AuditError(f"--strata {n_strata!r}: give a whole number of strata, e.g. --strata 10") from None
    if n < 1 or n != n_strata:
        raise AuditError(f"--strata {n_strata!r}: give a whole number of strata, at least 1 (10: deciles)")
    return list(dict.fromkeys(values)), n


def stratify_values(run: RunData, by: str) -> np.ndarray:
    """The stratifying variable of every token the metrics see (the run's pool), as float64."""
    if by == "rarity":
        if "token_id" not in run.numeric_columns:
            raise AuditError(f"{run.path}: --stratify rarity needs the token_id column, which this table lacks; "
                             "rerun `reweight-audit score` or stratify by position or length")
        values = token_rarity(run.column("token_id"))  # over every scored token, as the rarity control counts
    elif by == "position":
        values = relative_position(run.column("pos"), run.column("seq_len"))
    elif by == "length":
        values = run.column("seq_len").astype(np.float64)
    else:
        raise AuditError(f"--stratify {by!r} is not known; use one of {', '.join(STRATIFY_BY)}")
    return run.pool.take(values)


def strata_rows(run: RunData, weights: dict[str, np.ndarray], families: dict[str, str], stratify: list[str],
                n_strata: int, *, rank_by: list[str], scope: list[str], k: float, n_boot: int,
                seed: int) -> list[dict]:
    """strata.csv's rows for one run: per variable × rank-by × scope × method, one row per stratum and one
    ``all`` row (the noise-weighted mean, with bootstrap intervals). ``k`` in percent."""
    pool = run.pool
    logp = run.column("logp")
    sum_p2 = run.column("sum_p2") if "grad" in rank_by else None
    rows = []  # in the main table's order: rank-by, scope, method (sorted below)
    for by in stratify:
        x = stratify_values(run, by)
        codes = metrics.stratum_codes(x, n_strata)
        ranges = _ranges(x, codes)
        for rb in rank_by:
            scores = {m: pool.take(metrics.rank_scores(w, rb, logp, sum_p2)) for m, w in weights.items()}
            for method, s in scores.items():
                index = metrics.StratifiedIndex(s, pool.is_noise, pool.seq_codes, codes, n_boot=n_boot, seed=seed)
                for sc in scope:
                    ident = {"run": run.label, "method": method, "family": families.get(method, ""), "rank_by": rb,
                             "scope": sc, "k": k, "stratify": by}
                    summary, per = index.metrics(k / 100.0, sc)
                    for row, (lo, hi) in zip(per, ranges):
                        rows.append({**ident, "stratum": str(row.pop("stratum") + 1), "x_lo": lo, "x_hi": hi,
                                     "n_tokens": row.pop("n"), **row})
                    rows.append({**ident, "stratum": ALL, "x_lo": float(x.min()), "x_hi": float(x.max()),
                                 "n_tokens": pool.n_tokens, "n_noise": int(pool.is_noise.sum()), **summary})
    order = [{v: i for i, v in enumerate(values)} for values in (stratify, rank_by, scope)]
    return sorted(rows, key=lambda r: (order[0][r["stratify"]], order[1][r["rank_by"]], order[2][r["scope"]]))


def _ranges(x: np.ndarray, codes: np.ndarray) -> list[tuple[float, float]]:
    """Per stratum code, the smallest and largest value of the variable in it."""
    n = int(codes.max()) + 1
    lo, hi = np.full(n, np.inf), np.full(n, -np.inf)
    np.minimum.at(lo, codes, x)
    np.maximum.at(hi, codes, x)
    return list(zip(lo.tolist(), hi.tolist()))


def strata_columns() -> list[str]:
    """strata.csv: identity, the variable and stratum with its range and counts, every stratified metric with its
    interval (on the ``all`` rows), and ``n_strata`` (on the ``all`` rows)."""
    cols = ["run", "method", "family", "rank_by", "scope", "k", "stratify", "stratum", "x_lo", "x_hi", "n_tokens",
            "n_noise"]
    for spec in metrics.stratified_specs():
        cols += [spec.name, f"{spec.name}_lo", f"{spec.name}_hi"]
    return cols + ["n_strata"]


def strata_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=strata_columns())


# --------------------------------------------------------------------------- the report's section


def control_verdicts(table: pd.DataFrame, strata: pd.DataFrame | None, k: float) -> list[dict]:
    """Per run × rank-by × scope: the columns (AUROC and TOK REC@k, pooled and within each ``--stratify``
    variable), every method's values and ``above`` marks (higher than every control in that column), and
    ``winners``, the methods above every control in every column. Empty without a control in the table."""
    if table is None or not len(table) or not (table["family"] == CONTROL_FAMILY).any():
        return []
    verdicts = []
    for (run, rank_by, scope), block in _verdict_columns(table, strata, k).groupby(["run", "rank_by", "scope"],
                                                                                  sort=False):
        heads = list(dict.fromkeys(block["column"]))
        # every column kept, undefined ones too (no noise, all noise, one row: AUROC is NaN and shows as n/a)
        wide = block.pivot_table(index="method", columns="column", values="value", sort=False, aggfunc="first",
                                 dropna=False).reindex(index=list(dict.fromkeys(block["method"])), columns=heads)
        family = block.drop_duplicates("method").set_index("method")["family"]
        control = family.reindex(wide.index) == CONTROL_FAMILY
        best = wide[control].max()
        above = wide.gt(best) & ~control.to_numpy()[:, None]
        verdicts.append({"run": run, "rank_by": rank_by, "scope": scope, "columns": heads, "values": wide[heads],
                         "above": above[heads], "controls": list(wide.index[control]),
                         "winners": [m for m in wide.index if not control[m] and above.loc[m, heads].all()]})
    return verdicts


def controls_markdown(table: pd.DataFrame, strata: pd.DataFrame | None, k: float) -> str:
    """table.md's "Controls" section: :func:`control_verdicts` as one table per run × rank-by × scope."""
    verdicts = control_verdicts(table, strata, k)
    if not verdicts:
        return ""
    lines = ["## Controls", "",
             "The controls (family `control`: `position`, `position-rev`, `rarity`) rank tokens by where they sit or "
             "how common their id is, without a model. A method that does not beat them finds the noise no better "
             "than its position or rarity does. Stratified: the same metric within strata of that variable (quantiles "
             "over the tokens), averaged with each stratum weighted by its noise tokens; weights as in the main "
             "table. ✓: above every control in that column.", ""]
    for v in verdicts:
        heads = v["columns"]
        lines += [f"### {markdown_text(v['run'])}, rank by {v['rank_by']}, {v['scope']}" if v["run"]
                  else f"### rank by {v['rank_by']}, {v['scope']}", "",
                  "| method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        for method in v["values"].index:
            cells = [_cell(h, v["values"].at[method, h]) + (" ✓" if v["above"].at[method, h] else "") for h in heads]
            lines.append(f"| {markdown_text(method)} | " + " | ".join(cells) + " |")
        lines += ["", "Above every control in every column: " + (", ".join(f"`{m}`" for m in v["winners"]) or "none")
                  + ".", ""]
    return "\n".join(lines).rstrip() + "\n"


def _verdict_columns(table: pd.DataFrame, strata: pd.DataFrame | None, k: float) -> pd.DataFrame:
    """Long form: run, rank_by, scope, method, family, column heading, value."""
    key = ["run", "rank_by", "scope", "method", "family"]
    cut = f"{k:g}%"
    parts = []
    for metric, head in (("auroc", "AUROC"), ("tok_rec", f"TOK REC@{cut}")):
        part = table[key + [metric]].rename(columns={metric: "value"})
        parts.append(part.assign(column=head))
    if strata is not None and len(strata):
        overall = strata[strata["stratum"] == ALL]
        for by, block in overall.groupby("stratify", sort=False):
            for metric, head in (("auroc", "AUROC"), ("tok_rec", f"TOK REC@{cut}")):
                part = block[key + [metric]].rename(columns={metric: "value"})
                parts.append(part.assign(column=f"{head} within {by}"))
    frame = pd.concat(parts, ignore_index=True)
    order = {name: i for i, name in enumerate(dict.fromkeys(table["method"]))}
    frame["_order"] = frame["method"].map(order)
    frame["_col"] = frame.groupby(key, sort=False).cumcount()
    return frame.sort_values(["_order", "_col"], kind="stable").drop(columns=["_order", "_col"])


def _cell(head: str, value: float) -> str:
    return fmt_num(value, 3) if head.startswith("AUROC") else fmt_pct(value)

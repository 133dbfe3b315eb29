"""The HTML pages: ``report.html`` of a compare, of a sweep and of a train run, one self-contained file each.

Jinja2 templates (``reporting/templates/``, package data) with autoescape on:
every label, method name, noise kind and path that reaches a page is escaped
there, so a run named ``<b>`` shows as ``<b>``. The plots are matplotlib PNGs
embedded as ``data:`` URIs and the token heatmap is heatmap.html inside an
``iframe srcdoc``: the page needs no network, no CDN and no file beside it,
so it can be attached to a review. Matplotlib rather than Plotly or Altair:
the plots already exist as PNGs, a PNG weighs 50–250 KB where Plotly's
script alone is 3.5 MB per page, and a static image is what a reviewer's
attachment shows anyway; the one interactive view (the heatmap's method
selector) is a few lines of plain JavaScript.

Tables are built here as plain rows of cells (``text`` shown, ``v`` the number
the page sorts by); the templates only lay them out.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable

import pandas as pd

from reweight_audit.core.formatting import fmt_pct, k_label
from reweight_audit.evaluation.metrics import metric_specs
from reweight_audit.evaluation.results import CompareResult

if TYPE_CHECKING:
    import jinja2
    from matplotlib.figure import Figure

__all__ = ["Cell", "HtmlTable", "png_bytes", "data_uri", "compare_page", "sweep_page", "train_page", "frame_table",
           "TABLE1_COLOURED"]

#: The methods coloured as Table 1's where no map is given (the default --table1-map's three).
TABLE1_COLOURED = ("eaft", "dft", "ranktuner-approx")
CONTROL_FAMILY = "control"
#: What each plot shows, under it on the page.
CAPTIONS = {
    "recall_curves": "Share of the noise tokens found in the top k% of tokens. Table 1's methods and the controls "
                     "in colour, the rest grey; lines that coincide are labelled as one group; dotted: chance.",
    "rank_vs_prob": "Rank of the target token against its probability (log axes); noise in red. R ≤ 1/p always.",
    "expected_rank_vs_entropy": "Expected rank against entropy in bits, with Massey's lower bound.",
    "weight_distributions": "Each method's weights, noise against clean (each class sums to 1).",
}


@dataclass
class Cell:
    """One table cell: the text shown and the number the page sorts by (None: sort by the text)."""

    text: str
    v: float | None = None
    paper: bool = False


@dataclass
class Row:
    cells: list[Cell]
    cls: str = ""


@dataclass
class HtmlTable:
    """Headings, rows, and how many leading columns are text (left-aligned)."""

    headers: list[str]
    rows: list[Row] = field(default_factory=list)
    text_columns: int = 1


@lru_cache(maxsize=1)
def _environment() -> "jinja2.Environment":
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("reweight_audit.reporting", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_page(template: str, **context: Any) -> str:
    """The named template with ``context``; every value is escaped by Jinja2's autoescape."""
    return _environment().get_template(template).render(**context)


def png_bytes(figure: "Figure") -> bytes:
    """A matplotlib figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:`` URI an ``<img>`` shows without any file beside the page."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def frame_table(frame: pd.DataFrame, columns: Iterable[str], *, text_columns: int = 1,
                formats: dict[str, Any] | None = None) -> HtmlTable:
    """A plain table of ``frame``'s ``columns``: numbers formatted by ``formats`` (column → function) and sortable."""
    columns = list(columns)
    formats = formats or {}
    table = HtmlTable([c.replace("_", " ") for c in columns], text_columns=text_columns)
    for record in frame.to_dict(orient="records"):
        cells = []
        for c in columns:
            value = record.get(c)
            fmt = formats.get(c)
            cells.append(Cell(fmt(value) if fmt else ("" if value is None else str(value)),
                              _number(value) if fmt else None))
        table.rows.append(Row(cells))
    return table


# ----------------------------------------------------------------------------------------- compare


def _varying(frame: pd.DataFrame, columns: tuple[str, ...] = ("run", "rank_by", "scope")) -> list[str]:
    return [c for c in columns if c in frame.columns and frame[c].nunique(dropna=False) > 1]


def _row_class(method: str, family: str, table1: Iterable[str] = TABLE1_COLOURED) -> str:
    return "control" if family == CONTROL_FAMILY else ("table1" if method in table1 else "")


def table1_methods(result: CompareResult) -> set[str]:
    """The methods standing for Table 1's rows in this compare (``--table1-map``)."""
    return set((result.config.get("table1_map") or {}).values()) or set(TABLE1_COLOURED)


def main_table(result: CompareResult) -> HtmlTable:
    """The main table: varying run/rank-by/scope, method, family, every shown metric with its interval."""
    frame = result.table
    extra = _varying(frame)
    specs = [s for s in metric_specs() if s.header is not None]
    table = HtmlTable([c.replace("_", "-") for c in extra] + ["method", "family"]
                      + [s.header.format(k=k_label(result.k)) for s in specs], text_columns=len(extra) + 2)
    table1 = table1_methods(result)
    for row in frame.to_dict(orient="records"):
        cells = [Cell(str(row[c])) for c in extra] + [Cell(str(row["method"])), Cell(str(row.get("family", "")))]
        cells += [Cell(s.fmt(row.get(s.name), row.get(f"{s.name}_lo"), row.get(f"{s.name}_hi")), _number(row.get(s.name)))
                  for s in specs]
        table.rows.append(Row(cells, _row_class(str(row["method"]), str(row.get("family", "")), table1)))
    return table


def verdict_blocks(result: CompareResult) -> list[dict]:
    """Per run × rank-by × scope: where, the controls, the winners and every column's values (✓ above every control)."""
    from reweight_audit.evaluation.strata import control_verdicts

    blocks = []
    for v in control_verdicts(result.table, result.strata, result.k):
        table = HtmlTable(["method", *v["columns"]])
        for method in v["values"].index:
            cells = [Cell(str(method))]
            for column in v["columns"]:
                value = v["values"].at[method, column]
                text = ("n/a" if _number(value) is None else
                        (f"{value:.3f}" if column.upper().startswith("AUROC") else fmt_pct(value)))
                cells.append(Cell(text + (" ✓" if v["above"].at[method, column] else ""), _number(value)))
            table.rows.append(Row(cells, "control" if method in v["controls"] else
                                  ("win" if method in v["winners"] else "")))
        where = ", ".join(x for x in (v["run"], f"rank by {v['rank_by']}", v["scope"]) if x)
        blocks.append({"where": where, "winners": list(v["winners"]), "controls": list(v["controls"]),
                       "columns": list(v["columns"]), "table": table})
    return blocks


def table1_table(result: CompareResult) -> HtmlTable | None:
    """Table 1's rows: our figure (interval) beside the paper's, and the base rates."""
    from reweight_audit.evaluation.table1 import HEADERS, TABLE1_METRICS

    frame = result.table1
    if frame is None or not len(frame):
        return None
    blocks = _varying(frame)
    heads = [*(c.replace("_", "-") for c in blocks), "Table 1 row", "method"]
    for metric in TABLE1_METRICS:
        heads += [HEADERS[metric], "paper"]
    table = HtmlTable([*heads, "base rate", "paper (implied)"], text_columns=len(blocks) + 2)
    for row in frame.to_dict(orient="records"):
        cells = [Cell(str(row[c])) for c in blocks] + [Cell(str(row["row"])), Cell(str(row["method"]))]
        for metric in TABLE1_METRICS:
            lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
            interval = f" ({fmt_pct(lo)}–{fmt_pct(hi)})" if _number(lo) is not None and _number(hi) is not None else ""
            cells += [Cell(fmt_pct(row[metric]) + interval, _number(row[metric])),
                      Cell(fmt_pct(row["paper_" + metric]), _number(row["paper_" + metric]), paper=True)]
        cells += [Cell(fmt_pct(row["base_rate"]), _number(row["base_rate"])),
                  Cell(fmt_pct(row["paper_base_rate"]), _number(row["paper_base_rate"]), paper=True)]
        table.rows.append(Row(cells))
    return table


def kind_blocks(result: CompareResult) -> list[dict]:
    """Token recall per method × noise kind, one table per run × rank-by × scope."""
    frame = result.by_kind
    if frame is None or not len(frame):
        return []
    groups = list(frame.groupby(["run", "rank_by", "scope"], sort=False))
    blocks = []
    for (run, rank_by, scope), block in groups:
        kinds = list(dict.fromkeys(block["kind"]))
        wide = block.pivot_table(index="method", columns="kind", values="tok_rec", sort=False, dropna=False)
        table = HtmlTable(["method", *kinds])
        for method in dict.fromkeys(block["method"]):
            values = [wide.at[method, kind] if kind in wide.columns else float("nan") for kind in kinds]
            table.rows.append(Row([Cell(str(method))] + [Cell(fmt_pct(v), _number(v)) for v in values]))
        blocks.append({"title": f"{run}, rank by {rank_by}, {scope}" if len(groups) > 1 else "", "table": table})
    return blocks


def agreement_blocks(result: CompareResult) -> list[dict]:
    """Several runs: each pair's verdict per metric, one table per rank-by × scope."""
    from reweight_audit.evaluation.agreement import verdicts

    if result.agreement is None or not len(result.agreement):
        return []
    headers = {s.name: s.header.format(k=k_label(result.k)) for s in metric_specs() if s.header is not None}
    v = verdicts(result.agreement)
    metrics = list(dict.fromkeys(v["metric"]))
    blocks = []
    for (rank_by, scope), block in v.groupby(["rank_by", "scope"], sort=False):
        text = block["verdict"] + " [" + block["separated_runs"].astype(str) + "/" + block["runs"].astype(str) + "]"
        cells = text.set_axis(pd.MultiIndex.from_frame(block[["a", "b", "metric"]])).unstack("metric")
        pairs = list(dict.fromkeys(zip(block["a"], block["b"])))
        cells = cells.reindex(index=pd.MultiIndex.from_tuples(pairs), columns=metrics).fillna("n/a")
        table = HtmlTable(["A", "B", *(headers.get(m, m) for m in metrics)], text_columns=2)
        for (a, b), values in zip(pairs, cells.to_numpy()):
            table.rows.append(Row([Cell(str(a)), Cell(str(b)), *(Cell(str(x)) for x in values)]))
        kept = block[block["metric"] == metrics[0]]
        blocks.append({"title": f"rank by {rank_by}, {scope}: {int(kept['same_order'].sum())} of {len(kept)} pairs "
                                f"keep their {headers.get(metrics[0], metrics[0])} order in every run",
                       "table": table})
    return blocks


def group_section(result: CompareResult) -> dict | None:
    """--by-meta: token recall and AUROC per method and group."""
    frame = result.by_group
    if frame is None or not len(frame):
        return None
    columns = [c for c in ("run", "group", "method", "n_tokens", "n_noise", "tok_rec", "tok_prec", "auroc")
               if c in frame.columns and (c != "run" or frame[c].nunique() > 1)]
    formats = {"tok_rec": fmt_pct, "tok_prec": fmt_pct, "auroc": lambda v: "n/a" if _number(v) is None else f"{v:.3f}",
               "n_tokens": lambda v: f"{int(v):,}", "n_noise": lambda v: f"{int(v):,}"}
    text = sum(1 for c in columns if c in ("run", "group", "method"))
    return {"field": str(frame["group_by"].iloc[0]), "table": frame_table(frame, columns, text_columns=text,
                                                                           formats=formats)}


def run_lines(result: CompareResult) -> list[dict]:
    return [{"label": r["label"], "path": r["path"],
             "text": f"{r['n_tokens']:,} tokens, {r['n_noise']:,} noise (base rate {fmt_pct(r['base_rate'])}), "
                     f"{r['n_noise_seqs']}/{r['n_seqs']} sequences with noise"} for r in result.runs]


def compare_page(result: CompareResult, plots: dict[str, bytes], heatmap: str, files: Iterable[str] = ()) -> str:
    """report.html of a compare: runs, the verdict and the Table 1 view first, then every table, plot and the heatmap.

    ``plots``: PNG bytes by plot name; ``heatmap``: heatmap.html's text (shown in an ``iframe srcdoc``)."""
    from reweight_audit.reporting.render import label_notes

    cfg = result.config
    verdicts = verdict_blocks(result)
    context = {
        "title": f"reweight-audit compare: noise in the top {k_label(result.k)} of tokens",
        "runs": run_lines(result), "notes": label_notes(result.runs), "k": k_label(result.k),
        "settings": f"rank by {', '.join(cfg.get('rank_by', []))}; scope {', '.join(cfg.get('scope', []))}; "
                    f"ties at the cut count fractionally; seed {cfg.get('seed')}; "
                    f"{cfg.get('engine', 'memory')} engine",
        "verdicts": verdicts, "verdict_columns": ", ".join(verdicts[0]["columns"]) if verdicts else "",
        "table1": table1_table(result), "paper_k": _paper_k(), "main": main_table(result),
        "n_boot": cfg.get("n_boot", 0), "kinds": kind_blocks(result), "agreement": agreement_blocks(result),
        "groups": group_section(result), "heatmap": heatmap, "files": list(files),
        "skipped": [f"{s['method']} ({s['run']}: {s['reason']})" for s in result.skipped],
        "figures": [{"uri": data_uri(png), "alt": name.replace("_", " "), "caption": CAPTIONS.get(name, "")}
                    for name, png in plots.items()],
    }
    context["sections"] = [(a, n) for a, n, on in (
        ("verdict", "verdict", True), ("table", "every method", True), ("kinds", "by kind", context["kinds"]),
        ("agreement", "across runs", context["agreement"]), ("groups", "by group", context["groups"]),
        ("plots", "plots", True), ("heatmap", "heatmap", True)) if on]
    return render_page("compare.html", **context)


def _paper_k() -> str:
    from reweight_audit.evaluation.table1 import PAPER_K

    return k_label(PAPER_K)


# ----------------------------------------------------------------------------------------- sweep


def _share(value: Any) -> str:
    return "n/a" if _number(value) is None else f"{float(value) * 100:.0f}%"


def sweep_ranking(result: Any) -> HtmlTable:
    """Per method: family and its mean share of "below" over the other methods (the sweep's one-number summary)."""
    pairs = result.pairs
    families = dict(zip(result.table["method"], result.table["family"])) if "family" in result.table.columns else {}
    table = HtmlTable(["method", "family", "mean share below the others", "settings"], text_columns=2)
    for method in result.methods:
        mine = pairs[(pairs["a"] == method) & (pairs["settings"] > 0)] if len(pairs) else pairs
        mean = float(mine["share"].mean()) if len(mine) else float("nan")
        settings = int(mine["settings"].max()) if len(mine) else 0
        table.rows.append(Row([Cell(str(method)), Cell(str(families.get(method, ""))), Cell(_share(mean), _number(mean)),
                               Cell(f"{settings:,}", settings)], _row_class(str(method), str(families.get(method, "")))))
    return table


def sweep_claim(result: Any) -> dict | None:
    """The claim's verdict and one row per setting (failing settings first)."""
    from reweight_audit.evaluation.sweep import SETTING

    if result.claim is None:
        return None
    order, claim = result.config["claim"], result.claim
    table = HtmlTable([*SETTING, *order, "holds", "sure"], text_columns=len(SETTING))
    for row in claim.sort_values("holds", kind="stable").to_dict(orient="records"):
        cells = [Cell(k_label(row[c]) if c == "k" else str(row[c])) for c in SETTING]
        cells += [Cell(fmt_pct(row[m]), _number(row[m])) for m in order]
        cells += [Cell("yes" if row["holds"] else "no"), Cell("yes" if row["sure"] else "no")]
        table.rows.append(Row(cells))
    return {"order": " < ".join(order), "held": int(claim["holds"].sum()), "total": len(claim),
            "sure": int(claim["sure"].sum()), "everywhere": bool(result.claim_holds), "table": table}


def sweep_page(result: Any, heat_map: bytes, metric: str, files: Iterable[str] = ()) -> str:
    """report.html of a sweep (``result``: :class:`~reweight_audit.evaluation.sweep.SweepResult`): the claim's
    verdict first, the methods by mean share, the pair heat map, the orders that hold in every setting."""
    from reweight_audit.reporting.render import label_notes

    cfg, p = result.config, result.pairs
    fixed = p[(p["settings"] > 0) & (p["less"] == p["settings"])] if len(p) else p
    context = {
        "title": "reweight-audit sweep: which method puts less weight on noise, whatever the convention",
        "runs": [{"label": r["label"], "path": r["path"],
                  "text": f"{r['n_tokens']:,} tokens, {r['n_noise']:,} noise (base rate {fmt_pct(r['base_rate'])})"}
                 for r in result.runs],
        "settings": f"settings: run × rank by ({', '.join(cfg['rank_by'])}) × scope ({', '.join(cfg['scope'])}) × "
                    f"k ({', '.join(k_label(k) for k in cfg['k'])}) × noise kind × stratify "
                    f"({', '.join(cfg['stratify'])}); ordered by {metric}",
        "notes": [*result.notes, *label_notes(result.runs)], "metric": metric, "claim": sweep_claim(result),
        "ranking": sweep_ranking(result), "n_pairs": len(p) // 2, "files": list(files),
        "fixed": [f"{r.a} < {r.b} in all {r.settings} settings ({r.sure} sure)" for r in fixed.itertuples(index=False)],
        "figures": [{"uri": data_uri(heat_map), "alt": "pair heat map",
                     "caption": f"Row A, column B: the share of the settings in which A's {metric} is lower than B's. "
                                "Methods grouped by family (lines), within a family by mean share."}],
    }
    return render_page("sweep.html", **context)


# ----------------------------------------------------------------------------------------- train


def train_page(summary: list[dict], audit_png: bytes, absorption: str, setting: str, k: float,
               files: Iterable[str] = ()) -> str:
    """report.html of a train run: the absorption table (run.json's summary), the audit curves, absorption.md."""
    own_rec = f"own_tok_rec@{k:g}"
    columns = ["method", "steps", "train_loss_first", "train_loss_last", "clean_nll_change", "noise_nll_change",
               "noise_per_clean", own_rec, "own_noise_mass", "seconds_per_step"]
    frame = pd.DataFrame(summary).reindex(columns=columns)

    def three(v: Any) -> str:
        return "n/a" if _number(v) is None else f"{float(v):.3f}"

    formats = {c: three for c in columns[2:]}
    formats["steps"] = lambda v: "n/a" if _number(v) is None else f"{int(v)}"
    return render_page("train.html", title="reweight-audit train: how much noise each loss absorbs",
                       setting=setting, summary=frame_table(frame, columns, formats=formats), absorption=absorption,
                       files=list(files),
                       figures=[{"uri": data_uri(audit_png), "alt": "audit curves",
                                 "caption": "Against the training step, one line per trained method: the probe's noise "
                                            "and clean NLL change, and the method's own weights on the probe."}])

"""Rendering ``compare`` results: rich table, Markdown, PNG plots, heatmap.html.

Everything here draws or formats data that compare already computed; nothing
is recomputed. Metric columns, headings and cell formats come from
:data:`reweight_audit.evaluation.metrics.METRICS`. Plots use matplotlib's Agg canvas
through :class:`matplotlib.figure.Figure` (no pyplot, no global backend state,
no display needed).
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rich.markup import escape
from rich.table import Table

from reweight_audit.core.escaping import markdown_code, markdown_text, plot_text
from reweight_audit.core.formatting import finite, fmt_interval, fmt_num, fmt_pct, k_label
from reweight_audit.evaluation.metrics import metric_headers, metric_specs, table_cells
from reweight_audit.evaluation.results import CompareResult
from reweight_audit.evaluation.runs import REAL_ERROR_KINDS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["fmt_pct", "fmt_interval", "fmt_num", "render_table", "table_markdown", "table_cells", "metric_headers",
           "plot_recall_curves", "plot_rank_vs_prob", "plot_expected_rank_vs_entropy", "plot_weight_distributions",
           "recall_curves_figure", "rank_vs_prob_figure", "expected_rank_vs_entropy_figure",
           "weight_distributions_figure", "heatmap_html", "default_heatmap_method", "label_notes"]

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- formatting


def _varying(df: pd.DataFrame, cols: tuple[str, ...] = ("run", "rank_by", "scope")) -> list[str]:
    return [c for c in cols if c in df.columns and df[c].nunique(dropna=False) > 1]


def _title(result: CompareResult) -> str:
    df = result.table
    parts = [f"Noise in the top {k_label(result.k)} of tokens"]
    for col, name in (("run", "run"), ("rank_by", "rank by"), ("scope", "scope")):
        if col in df.columns and df[col].nunique() == 1:
            parts.append(f"{name}: {escape(str(df[col].iloc[0]))}")
    return parts[0] + (" (" + ", ".join(parts[1:]) + ")" if len(parts) > 1 else "")


def label_notes(runs: list[dict]) -> list[str]:
    """What the labels mean where they are not injected noise: real errors, and tokens left out of the metrics."""
    notes = []
    real = {kind: [(r["label"], r["noise_kinds"][kind]) for r in runs if r.get("noise_kinds", {}).get(kind)]
            for kind in REAL_ERROR_KINDS}
    for kind, where in real.items():
        if where:
            counts = ", ".join(f"{label}: {n:,} tokens" for label, n in where)
            notes.append(f"{kind} is real errors, not injected noise: the first wrong step of a model-written "
                         f"solution as a person marked it (human annotation); {counts}")
    for r in runs:
        for kind, n in (r.get("excluded_kinds") or {}).items():
            notes.append(f"{r['label']}: {n:,} {kind} tokens (after the first wrong step, of unknown correctness) "
                         "are left out of both classes and every metric; the weights were computed with them")
    return notes


def _caption(result: CompareResult) -> str:
    """Base rates, intervals, skipped methods; labels and reasons escaped (a label like "[a/stats]" is not markup)."""
    bits = []
    for r in result.runs:
        bits.append(f"{escape(r['label'])}: {r['n_tokens']:,} tokens, noise base rate {fmt_pct(r['base_rate'])}, "
                    f"{r['n_noise_seqs']}/{r['n_seqs']} sequences with noise")
    n_boot = result.config.get("n_boot", 0)
    if n_boot:
        bits.append(f"in parentheses: bootstrap 95% interval over sequences ({n_boot} resamples)")
    bits += label_notes(result.runs)
    if result.skipped:
        bits.append("skipped: " + "; ".join(escape(f"{s['method']} ({s['run']}: {s['reason']})")
                                            for s in result.skipped))
    return "\n".join(bits)


def render_table(result: CompareResult) -> Table:
    """The paper's Table 1 shape: method, family, precision/recall/hit @k% with intervals, then lift, AUROC, AP,
    noise mass ratio. Run / rank-by / scope columns appear only when they vary, their values on the first row of
    each block, folded rather than cut when the terminal is narrow (two runs' labels may differ only at the end)."""
    df = result.table
    extra = _varying(df)
    table = Table(title=_title(result), caption=_caption(result), caption_justify="left", show_lines=False)
    for col in extra:
        table.add_column(col.replace("_", "-"), style="cyan", overflow="fold")
    table.add_column("method", style="bold", no_wrap=True)
    table.add_column("family", style="dim")
    for h in metric_headers(result.k):
        table.add_column(h, justify="right")
    prev = None
    for _, row in df.iterrows():
        key = tuple(row[c] for c in extra)
        if prev is not None and key != prev:
            table.add_section()
        block = [escape(str(v)) if key != prev else "" for v in key]
        prev = key
        table.add_row(*block, escape(str(row["method"])), escape(str(row.get("family", ""))), *table_cells(row))
    return table


def table_markdown(result: CompareResult) -> str:
    """table.md: the main table, base rates, skipped methods and recall by noise kind."""
    df = result.table
    lines = [f"# reweight-audit compare: top {k_label(result.k)}", ""]
    for r in result.runs:
        lines.append(f"- **{markdown_text(r['label'])}** ({markdown_code(r['path'])}): {r['n_tokens']:,} tokens, "
                     f"{r['n_noise']:,} noise (base rate {fmt_pct(r['base_rate'])}), "
                     f"{r['n_noise_seqs']}/{r['n_seqs']} sequences with noise")
    cfg = result.config
    lines.append(f"- rank by: {', '.join(cfg.get('rank_by', []))}; scope: {', '.join(cfg.get('scope', []))}; "
                 f"ties at the cut count fractionally; seed {cfg.get('seed')}; {cfg.get('engine', 'memory')} engine")
    if cfg.get("n_boot"):
        lines.append(f"- parentheses: bootstrap 95% interval over sequences, {cfg['n_boot']} resamples")
    lines += [f"- {markdown_text(note)}" for note in label_notes(result.runs)]
    lines.append("")
    extra = ["run", "rank_by", "scope"] if len(df) else []
    extra = [c for c in extra if c in _varying(df)] if len(df) else []
    head = [c.replace("_", "-") for c in extra] + ["method", "family"] + metric_headers(result.k)
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * (len(extra) + 2) + ["---:"] * (len(head) - len(extra) - 2)) + "|")
    for _, row in df.iterrows():
        cells = [markdown_text(row[c]) for c in extra] + [markdown_text(row["method"]), markdown_text(row.get("family", ""))]
        lines.append("| " + " | ".join(cells + table_cells(row)) + " |")
    if result.skipped:
        lines += ["", "## Skipped methods", ""]
        for s in result.skipped:
            lines.append(f"- {markdown_code(s['method'])} ({markdown_text(s['run'])}): {markdown_text(s['reason'])}")
    bk = result.by_kind
    if len(bk):
        lines += ["", f"## Token recall @{k_label(result.k)} by noise kind", "",
                  "Pool per kind: clean tokens plus that kind's tokens.", ""]
        for key, grp in bk.groupby(["run", "rank_by", "scope"], sort=False):
            if len(bk.groupby(["run", "rank_by", "scope"])) > 1:
                lines += [f"### {markdown_text(key[0])}, rank by {key[1]}, {key[2]}", ""]
            kinds = list(dict.fromkeys(grp["kind"]))
            lines.append("| method | " + " | ".join(markdown_text(k) + (" (real errors)" if k in REAL_ERROR_KINDS else "")
                                                  for k in kinds) + " |")
            lines.append("|---|" + "|".join(["---:"] * len(kinds)) + "|")
            piv = grp.pivot_table(index="method", columns="kind", values="tok_rec", sort=False, dropna=False)
            for m in dict.fromkeys(grp["method"]):
                vals = [fmt_pct(piv.at[m, kd]) if kd in piv.columns else "n/a" for kd in kinds]
                lines.append(f"| {markdown_text(m)} | " + " | ".join(vals) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- plots


def _figure(n_panels: int, ncols: int, panel_w: float = 4.2, panel_h: float = 3.4):
    from matplotlib.figure import Figure

    n_panels = max(n_panels, 1)
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def plot_recall_curves(curves: pd.DataFrame, path: Path, k: float | None = None,
                       highlight: tuple[str, ...] = ()) -> Path:
    """:func:`recall_curves_figure` as a PNG file."""
    return _save(recall_curves_figure(curves, k, highlight), path)


#: Colours of the highlighted methods in the recall curves: Table 1's three, then the controls (dashed).
HIGHLIGHT_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#e377c2", "#8c564b")
CONTROL_COLOURS = ("#ff7f0e", "#d62728", "#bcbd22", "#7f7f7f")
#: Longest legend label of a group of coinciding lines before it is shortened to "a = b = … (n methods)".
GROUP_LABEL_MEMBERS = 4


def coinciding_groups(curves: pd.DataFrame) -> list[list[str]]:
    """The methods of one panel grouped by identical recall curves (same value at every cut), in table order."""
    groups: dict[tuple, list[str]] = {}
    for method, s in curves.groupby("method", sort=False):
        y = s.sort_values("k")["tok_rec"].to_numpy(dtype=float)
        key = tuple(np.round(np.nan_to_num(y, nan=-1.0), 9))
        groups.setdefault(key, []).append(str(method))
    return list(groups.values())


def _group_label(members: list[str]) -> str:
    if len(members) <= GROUP_LABEL_MEMBERS:
        return " = ".join(members)
    return " = ".join(members[:GROUP_LABEL_MEMBERS - 1]) + f" = … ({len(members)} methods)"


def _highlight_styles(methods: list[str], families: dict[str, str], highlight: tuple[str, ...]) -> dict[str, dict]:
    """A colour (and dashes for controls) per highlighted method; the rest grey."""
    styles, main, control = {}, iter(HIGHLIGHT_COLOURS), iter(CONTROL_COLOURS)
    for m in methods:
        if families.get(m) == "control":
            styles[m] = {"color": next(control, "#7f7f7f"), "ls": "--", "lw": 1.6, "zorder": 3}
        elif m in highlight:
            styles[m] = {"color": next(main, "#1f77b4"), "ls": "-", "lw": 2.0, "zorder": 4}
    return styles


def recall_curves_figure(curves: pd.DataFrame, k: float | None = None, highlight: tuple[str, ...] = ()) -> Figure:
    """Token recall at every cut; one panel per run × rank-by × scope.

    ``highlight`` (Table 1's methods) and the controls are drawn in colour, every other method in thin grey;
    lines that coincide are drawn once and labelled as one group (``dft = talr = …``); chance is the diagonal;
    the legend sits outside the panels."""
    keys = list(dict.fromkeys(zip(curves["run"], curves["rank_by"], curves["scope"]))) if len(curves) else []
    fig, axes = _figure(len(keys), 3, 4.4, 3.6)
    methods = list(dict.fromkeys(curves["method"])) if len(curves) else []
    families = dict(zip(curves["method"], curves["family"])) if "family" in curves.columns else {}
    styles = _highlight_styles(methods, families, tuple(highlight))
    legend: dict[str, list] = {}  # lead method (or a fixed name) -> [line, methods coinciding with it in every panel]
    if not keys:
        axes[0].text(0.5, 0.5, "no methods computed", ha="center", va="center", transform=axes[0].transAxes)
    for ax, (run, rb, sc) in zip(axes, keys):
        sub = curves[(curves["run"] == run) & (curves["rank_by"] == rb) & (curves["scope"] == sc)]
        for members in coinciding_groups(sub):
            _draw_group(ax, sub, members, styles, legend)
        chance, = ax.plot([0, 100], [0, 100], ls=":", color="black", lw=1)
        legend.setdefault(" chance", [chance, None])
        if k is not None:
            ax.axvline(float(k), color="grey", lw=0.6, alpha=0.5)
        ax.set_xlabel("top k% of tokens")
        ax.set_ylabel("noise recall (%)")
        ax.set_title(plot_text(f"{run}\nrank by {rb}, {sc}"), fontsize=9)
        ax.set_xlim(0, 51)
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
    if legend:
        entries = sorted(legend.items(), key=lambda e: (e[0].startswith(" "), methods.index(e[0]) if e[0] in methods
                                                        else 0))
        labels = [{" chance": "chance (random order)", " other": "other methods (see the table)"}.get(name) or
                  plot_text(_group_label([name, *sorted(entry[1] - {name}, key=methods.index)]))
                  for name, entry in entries]
        fig.legend([entry[0] for _, entry in entries], labels, loc="outside right upper", fontsize=8, frameon=False)
    return fig


def _draw_group(ax: Any, sub: pd.DataFrame, members: list[str], styles: dict[str, dict], legend: dict) -> None:
    """One line for a group of coinciding methods: coloured as its first highlighted member, else grey."""
    s = sub[sub["method"] == members[0]].sort_values("k")
    y = s["tok_rec"].to_numpy(dtype=float) * 100
    lead = next((m for m in members if m in styles), None)
    if lead is None:
        line, = ax.plot(s["k"], y, color="0.72", lw=0.9, zorder=1)
        legend.setdefault(" other", [line, None])
        return
    line, = ax.plot(s["k"], y, marker="o", ms=3, **styles[lead])
    # the label names the methods that coincide with the lead in every panel
    entry = legend.setdefault(lead, [line, set(members)])
    entry[1] &= set(members)


def _scatter_panels(samples: list[dict], *, x_of, y_of, need: tuple[str, ...], xlabel: str,
                    ylabel: str, bound, bound_label: str, xlog: bool) -> Figure:
    fig, axes = _figure(len(samples), 2, 5.2, 4.2)
    for ax, s in zip(axes, samples):
        ax.set_title(plot_text(s["label"]), fontsize=9)
        if any(s.get(n) is None for n in need):
            missing = [n for n in need if s.get(n) is None]
            ax.text(0.5, 0.5, f"no {', '.join(missing)} column", ha="center", va="center", transform=ax.transAxes)
            continue
        x = np.asarray(x_of(s), dtype=float)
        y = np.asarray(y_of(s), dtype=float)
        noise = np.asarray(s["is_noise"], dtype=bool)
        ok = np.isfinite(x) & np.isfinite(y) & (y > 0) & ((x > 0) if xlog else True)
        if not ok.any():  # log axes need a positive value (a table of NaNs, or every value 0)
            ax.text(0.5, 0.5, "no values to plot", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.scatter(x[ok & ~noise], y[ok & ~noise], s=4, alpha=0.35, color="steelblue", lw=0,
                   label=f"clean ({int((ok & ~noise).sum()):,})", rasterized=True)
        ax.scatter(x[ok & noise], y[ok & noise], s=5, alpha=0.6, color="crimson", lw=0,
                   label=f"noise ({int((ok & noise).sum()):,})", rasterized=True)
        xs = np.linspace(x[ok].min(), x[ok].max(), 200) if not xlog else np.geomspace(x[ok].min(), 1.0, 200)
        bx, by = bound(xs)
        if len(bx):
            ax.plot(bx, by, color="navy", lw=1.2, label=bound_label)
        if xlog:
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both", lw=0.4)
        ax.legend(fontsize=7, markerscale=3)
    return fig


def plot_rank_vs_prob(samples: list[dict], path: Path) -> Path:
    """:func:`rank_vs_prob_figure` as a PNG file."""
    return _save(rank_vs_prob_figure(samples), path)


def rank_vs_prob_figure(samples: list[dict]) -> Figure:
    """R_t against p_t (log axes) with the envelope R = 1/p; noise in red."""
    return _scatter_panels(
        samples, x_of=lambda s: s["p"], y_of=lambda s: s["rank"], need=("rank",),
        xlabel="p (target probability)", ylabel="R (rank of the target)",
        bound=lambda xs: (xs, 1.0 / xs), bound_label="R = 1/p", xlog=True)


def plot_expected_rank_vs_entropy(samples: list[dict], path: Path) -> Path:
    """:func:`expected_rank_vs_entropy_figure` as a PNG file."""
    return _save(expected_rank_vs_entropy_figure(samples), path)


def expected_rank_vs_entropy_figure(samples: list[dict]) -> Figure:
    """E[R_t] against H_t in bits with the Massey bound 2^(H−2)+1 (H ≥ 2)."""
    def massey(xs):
        hs = np.linspace(2.0, max(float(xs.max()), 2.0), 200)
        return (hs, 2.0 ** (hs - 2.0) + 1.0) if xs.max() >= 2.0 else (np.array([]), np.array([]))

    return _scatter_panels(
        samples, x_of=lambda s: np.asarray(s["entropy"], dtype=float) / LN2, y_of=lambda s: s["expected_rank"],
        need=("entropy", "expected_rank"), xlabel="H (bits)", ylabel="E[R] (expected rank)",
        bound=massey, bound_label="Massey: 2^(H−2)+1", xlog=False)


def _weight_bins(values: np.ndarray, n_bins: int = 40) -> tuple[np.ndarray, bool]:
    """Bin edges over the central 99% of the values (outliers land in the edge bins); log-spaced when the
    positive values span more than three decades there."""
    lo, hi = (float(v) for v in np.quantile(values, [0.005, 0.995]))
    if hi <= lo:  # (nearly) constant
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            half = 0.5 if lo == 0 else abs(lo) * 0.1
            return np.array([lo - half, hi + half]), False
    if lo > 0 and hi / lo > 1e3:
        return np.geomspace(lo, hi, n_bins + 1), True
    return np.linspace(lo, hi, n_bins + 1), False


def plot_weight_distributions(weight_samples: list[dict], path: Path) -> Path:
    """:func:`weight_distributions_figure` as a PNG file."""
    return _save(weight_distributions_figure(weight_samples), path)


def weight_distributions_figure(weight_samples: list[dict]) -> Figure:
    """Noise vs clean weight distributions, one small panel per run × method.

    Each class is normalised to sum to 1 (share of that class's tokens per bin), so the two shapes compare
    directly however rare noise is. Range: the central 99% of the weights.
    """
    panels = [(ws["label"], m, d) for ws in weight_samples for m, d in ws["methods"].items()]
    multi = len(weight_samples) > 1
    fig, axes = _figure(len(panels), 5, 3.0, 2.2)
    if not panels:
        axes[0].text(0.5, 0.5, "no methods computed", ha="center", va="center", transform=axes[0].transAxes)
    handles = None
    for ax, (label, m, d) in zip(axes, panels):
        noise = np.asarray(d["noise"], dtype=float)
        clean = np.asarray(d["clean"], dtype=float)
        noise, clean = noise[np.isfinite(noise)], clean[np.isfinite(clean)]
        ax.set_title(plot_text(f"{label}: {m}" if multi else m), fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
        both = np.concatenate([noise, clean])
        if not both.size:
            continue
        edges, logx = _weight_bins(both)
        hs = []
        for vals, colour, name, fill in ((clean, "0.55", "clean", True), (noise, "crimson", "noise", False)):
            if not vals.size:
                continue
            counts, _ = np.histogram(np.clip(vals, edges[0], edges[-1]), bins=edges)
            hs.append(ax.stairs(counts / vals.size, edges, fill=fill, color=colour, alpha=0.5 if fill else 1.0,
                                lw=1.2, label=name))
        if logx:
            ax.set_xscale("log")
        if len(hs) == 2:
            handles = hs
    if handles:
        fig.legend(handles=handles, labels=["clean tokens", "noise tokens"], loc="outside upper right",
                   fontsize=8, ncols=2)
    return fig


# --------------------------------------------------------------------------- heatmap.html


def _json_for_script(obj: Any) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' survive (all inside strings become \\u escapes)."""
    s = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _display_token(tok: str) -> str:
    """Escaped token text; newlines shown as ↵ (and kept as line breaks), empty tokens as ∅."""
    if tok == "":
        return '<span class="empty">\u2205</span>'
    return html.escape(tok, quote=True).replace("\n", "\u21b5\n").replace("\t", "\u2192\t")


def _fmt_stat(v: Any, digits: int = 4) -> str:
    return f"{float(v):.{digits}g}" if finite(v) else "n/a"


def _tooltip(seq: dict, i: int, method: str | None) -> str:
    st = seq["stats"]
    parts = [f"p = {_fmt_stat(st['p'][i])}"]
    if "H" in st:
        parts.append(f"H = {_fmt_stat(st['H'][i])} nats")
    if "R" in st:
        parts.append(f"R = {_fmt_stat(st['R'][i], 8)}")
    if "ER" in st:
        parts.append(f"E[R] = {_fmt_stat(st['ER'][i])}")
    text = ", ".join(parts)
    if method is not None and method in seq["w"]:
        text += f"\nweight ({method}) = {_fmt_stat(seq['w'][method][i])}, percentile {seq['pct'][method][i] * 100:.1f}"
    if seq["noise"][i]:
        text += f"\nNOISE: {seq['kind'][i] or 'unlabelled'}"
    elif seq["kind"][i]:
        text += f"\nleft out of the metrics: {seq['kind'][i]}"
    return text


def _colour(pct: float) -> str:
    """Percentile 0..1 -> pale yellow ... deep red (same formula as the page's JS)."""
    pct = min(max(float(pct), 0.0), 1.0)
    return f"hsl({55 - 55 * pct:.1f},95%,{96 - 46 * pct:.1f}%)"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:70em;color:#222;
padding:0 1em}
h1{font-size:1.35em}h2{font-size:1.1em;margin-top:1.6em}
.controls{position:sticky;top:0;background:#fff;padding:.6em 0;border-bottom:1px solid #ddd;z-index:2}
.legend{display:inline-block;vertical-align:middle;width:14em;height:.9em;margin:0 .5em;border:1px solid #aaa;
background:linear-gradient(90deg,hsl(55,95%,96%),hsl(27.5,95%,73%),hsl(0,95%,50%))}
.seq{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.86em;line-height:1.9;
white-space:pre-wrap;word-wrap:break-word;border:1px solid #e3e3e3;border-radius:4px;padding:.6em .8em;margin:.4em 0}
.seqhead{font-size:.8em;color:#666;margin-top:1em}
.t{border-radius:2px;cursor:default}
.t.n{outline:2px solid #1a4fd6;outline-offset:-1px;text-decoration:underline wavy #1a4fd6}
.t.x{outline:1px dashed #888;outline-offset:-1px;color:#666}
.t:hover{outline:2px solid #000}
.empty{color:#999}
.missing{color:#a00;font-style:italic}
.note{color:#555;font-size:.85em}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;font-size:12px;padding:.4em .6em;border-radius:4px;
white-space:pre;display:none;z-index:5;max-width:40em}
"""

_JS = """
(function(){
  var DATA = JSON.parse(document.getElementById('rwa-data').textContent);
  var sel = document.getElementById('method');
  var tip = document.getElementById('tip');
  function colour(p){p=Math.min(Math.max(p,0),1);
    return 'hsl('+(55-55*p).toFixed(1)+',95%,'+(96-46*p).toFixed(1)+'%)';}
  function f(v,d){return (v===null||v===undefined)?'n/a':String(Number(Number(v).toPrecision(d||4)));}
  function tipText(seq,i,m){
    var st=seq.stats, out='p = '+f(st.p[i]);
    if(st.H) out+=', H = '+f(st.H[i])+' nats';
    if(st.R) out+=', R = '+f(st.R[i],8);
    if(st.ER) out+=', E[R] = '+f(st.ER[i]);
    if(seq.w[m]) out+='\\nweight ('+m+') = '+f(seq.w[m][i])+', percentile '+(seq.pct[m][i]*100).toFixed(1);
    if(seq.noise[i]) out+='\\nNOISE: '+(seq.kind[i]||'unlabelled');
    else if(seq.kind[i]) out+='\\nleft out of the metrics: '+seq.kind[i];
    return out;}
  function paint(){
    var m = sel.value;
    DATA.runs.forEach(function(run,ri){
      var sec=document.getElementById('run-'+ri), has=run.methods.indexOf(m)>=0;
      sec.querySelector('.missing').style.display = has ? 'none' : 'block';
      run.seqs.forEach(function(seq,si){
        var spans=sec.querySelectorAll('.seq[data-s="'+si+'"] .t');
        for(var i=0;i<spans.length;i++){
          spans[i].style.backgroundColor = has ? colour(seq.pct[m][i]) : '';
          spans[i].removeAttribute('title');
          spans[i].dataset.tip = tipText(seq,i,m);
        }
      });
    });
  }
  document.addEventListener('mouseover',function(e){
    var t=e.target.closest ? e.target.closest('.t') : null;
    if(!t){tip.style.display='none';return;}
    tip.textContent=t.dataset.tip||''; tip.style.display='block';});
  document.addEventListener('mousemove',function(e){
    tip.style.left=Math.min(e.clientX+14, window.innerWidth-tip.offsetWidth-8)+'px';
    tip.style.top=(e.clientY+16)+'px';});
  sel.addEventListener('change',paint);
  paint();
})();
"""


def default_heatmap_method(methods: list[str]) -> str | None:
    for m in ("ranktuner", "ranktuner-approx", "entropy"):
        if m in methods:
            return m
    non_const = [m for m in methods if m != "sft"]
    return (non_const or methods or [None])[0]


def heatmap_html(runs: list[dict], k: float | None = None, title: str = "reweight-audit: token weights") -> str:
    """A self-contained page (inline CSS and JS, no external assets).

    ``runs``: one dict per run as built by :func:`reweight_audit.reporting.exports.heatmap_run_data` (label, methods, seqs with
    tokens, noise, kind, stats, w, pct). Token text is rendered server-side with :func:`html.escape`; the embedded
    JSON carries numbers, method names and noise kinds, with every ``<``, ``>`` and ``&`` as a \\u escape.
    """
    methods = list(dict.fromkeys(m for r in runs for m in r["methods"]))
    default = default_heatmap_method(methods)
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(title)}</title>", f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
           '<p class="note">Each token is coloured by the selected method\'s weight, normalised per method as the '
           "weight's percentile among all tokens of its run (robust to each method's scale). Noise tokens are outlined "
           "in blue with a wavy underline, tokens left out of the metrics (after-error) dashed grey; hover any token for p, entropy H, rank R, expected rank E[R], "
           "the weight and the noise kind."
           + (f" Tables report the top {esc(k_label(k))}." if k is not None else "") + "</p>",
           '<div class="controls"><label for="method">method </label><select id="method">']
    for m in methods:
        out.append(f'<option value="{esc(m)}"{" selected" if m == default else ""}>{esc(m)}</option>')
    out.append('</select> <span class="note">low</span><span class="legend"></span>'
               '<span class="note">high weight percentile</span></div>')
    if not methods:
        out.append('<p class="missing">no methods were computed</p>')
    js_runs = []
    for ri, run in enumerate(runs):
        out.append(f'<section id="run-{ri}"><h2>{esc(str(run["label"]))}</h2>')
        has = default in run["methods"]
        out.append(f'<p class="missing" style="display:{"none" if has else "block"}">'
                   "this method was not computed for this run</p>")
        if not run["seqs"]:
            out.append('<p class="note">no sequences</p>')
        js_seqs = []
        for si, seq in enumerate(run["seqs"]):
            n_noise = sum(seq["noise"])
            out.append(f'<div class="seqhead">sequence {esc(str(seq["seq_id"]))} — {len(seq["tokens"])} tokens, '
                       f"{n_noise} noise" + (" (truncated)" if seq.get("truncated") else "") + "</div>")
            spans = []
            for i, tok in enumerate(seq["tokens"]):
                cls = "t n" if seq["noise"][i] else ("t x" if seq["kind"][i] else "t")
                style = f' style="background-color:{_colour(seq["pct"][default][i])}"' if has else ""
                tipt = esc(_tooltip(seq, i, default if has else None), quote=True)
                spans.append(f'<span class="{cls}"{style} title="{tipt}">{_display_token(tok)}</span>')
            out.append(f'<div class="seq" data-s="{si}">' + "".join(spans) + "</div>")
            js_seqs.append({key: seq[key] for key in ("noise", "kind", "stats", "w", "pct")})
        out.append("</section>")
        js_runs.append({"label": str(run["label"]), "methods": list(run["methods"]), "seqs": js_seqs})
    out.append('<div id="tip"></div>')
    out.append(f'<script type="application/json" id="rwa-data">{_json_for_script({"runs": js_runs})}</script>')
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- train's audit curves


def audit_figure(rows: pd.DataFrame, k: float) -> Figure:
    """Train's audit against the step, one line per trained method (same colour in every panel), chance-free
    zero lines on the NLL changes, the legend outside the panels."""
    panels = [("noise_nll_change", "noise NLL change on the probe"), ("clean_nll_change", "clean NLL change on the probe"),
              ("own/noise_mass", "own weights: share of weight on noise"),
              (f"own/tok_rec@{k:g}", f"own weights: noise recall @{k:g}%")]
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(4, 2, 4.6, 3.2)
    methods = list(dict.fromkeys(rows["train_method"])) if len(rows) else []
    colours = dict(zip(methods, _colours(len(methods))))
    handles = {}
    for ax, (key, title) in zip(axes, panels):
        for method in methods:
            mine = rows[rows["train_method"] == method].sort_values("step")
            column = key.replace("own/", f"{method}/")
            if column not in mine.columns:
                continue
            line, = ax.plot(mine["step"], mine[column].astype(float), marker="o", ms=3, lw=1.5, color=colours[method])
            handles.setdefault(plot_text(method), line)
        if key.endswith("nll_change"):
            ax.axhline(0.0, color="black", lw=0.7, ls=":")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8, frameon=False,
                   title="trained with", title_fontsize=8)
    return fig

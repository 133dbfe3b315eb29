"""report: rich table, Markdown, plots and heatmap.html."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from reweight_audit.reporting import exports, render as report

from reweight_audit.evaluation import runs
from reweight_audit.evaluation.compare import run_compare
from reweight_audit.reporting.exports import write_exports
from reweight_audit.evaluation.config import CompareConfig

PNG = b"\x89PNG\r\n\x1a\n"


def small_stats(path: Path, *, n_seqs: int = 12, seed: int = 0, noise: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 30, size=n_seqs)
    n = int(lengths.sum())
    seq = np.repeat(np.arange(n_seqs), lengths)
    is_noise = (rng.random(n) < 0.15) & noise
    logp = -rng.gamma(0.7, 1.0, size=n) - 1.5 * is_noise
    p = np.exp(logp)
    ent = rng.gamma(1.5, 0.8, size=n) + is_noise
    pq.write_table(pa.table({
        "seq_id": [f"s{i}" for i in seq],
        "pos": np.concatenate([np.arange(L) for L in lengths]).astype(np.int32),
        "token_id": rng.integers(0, 100, size=n).astype(np.int32),
        "token": [" w"] * n,
        "logp": logp.astype(np.float32),
        "entropy": ent.astype(np.float32),
        "rank": (1 + np.floor(rng.random(n) * (1 / p - 1))).astype(np.int64),
        "expected_rank": np.maximum(1.0, 2.0 ** (ent / math.log(2) - 2) + 1) * 1.2,
        "topk_entropy": np.minimum(ent, math.log(20)).astype(np.float32),
        "sum_p2": (p * p + (1 - p) ** 2 * 0.3).astype(np.float32),
        "is_noise": is_noise,
        "noise_kind": np.where(is_noise, "filler", ""),
    }), path)
    return path


def render(table) -> str:
    console = Console(record=True, width=260, color_system=None)
    console.print(table)
    return console.export_text()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = small_stats(tmp_path_factory.mktemp("rep") / "stats.parquet")
    return run_compare([path], Path("/nonexistent"), CompareConfig(methods=["sft", "entropy", "ranktuner", "dft"],
                                                                   bootstrap=30))


def test_formatting_helpers():
    assert report.fmt_pct(0.0454) == "4.54%"
    assert report.fmt_pct(float("nan")) == "n/a" and report.fmt_pct(None) == "n/a"
    assert report.fmt_interval(0.2639, 0.2, 0.3) == "26.39% (20.00–30.00)"
    assert report.fmt_interval(0.5, float("nan"), float("nan")) == "50.00%"
    assert report.fmt_interval(float("nan"), 0.1, 0.2) == "n/a"
    assert report.fmt_num(1.23456, 2, "×") == "1.23×"


def test_render_table_shape(result):
    table = report.render_table(result)
    headers = [c.header for c in table.columns]
    assert headers == ["method", "family", "TOK PREC@10%", "TOK REC@10%", "SEQ HIT@10%", "LIFT@10%", "AUROC", "AP",
                       "NOISE MASS ×"]
    assert table.row_count == 4
    text = render(table)
    sft = next(line for line in text.splitlines() if " sft " in line)
    base = result.runs[0]["base_rate"]
    assert f"{base * 100:.2f}%" in sft and "1.00×" in sft and "0.500" in sft
    assert re.search(r"\d+\.\d\d% \(\d+\.\d\d–\d+\.\d\d\)", text)  # percent, 2 decimals, interval


def test_render_table_varying_columns_and_na(tmp_path):
    path = small_stats(tmp_path / "clean.parquet", noise=False)
    res = run_compare([path], tmp_path, CompareConfig(methods=["sft", "nll"], rank_by=["weight", "loss"], bootstrap=5),
                      writer=write_exports)
    table = report.render_table(res)
    assert [c.header for c in table.columns][:2] == ["rank-by", "method"]
    text = render(table)
    assert "n/a" in text
    md = report.table_markdown(res)
    assert "n/a" in md and "| rank-by | method |" in md


def test_markdown_table(result):
    md = report.table_markdown(result)
    lines = md.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    assert "TOK PREC@10%" in lines[header] and "SEQ HIT@10%" in lines[header]
    body = [line for line in lines[header + 2:] if line.startswith("| ")]
    assert len(body) >= len(result.table)
    assert "by noise kind" in md and "filler" in md


def test_plots_write_pngs(tmp_path, result):
    run = runs.load_run(small_stats(tmp_path / "s.parquet"))
    run.label = "run-a"
    samples = [exports.plot_sample(run, 0)]
    assert report.plot_recall_curves(result.curves, tmp_path / "r.png", k=10).read_bytes()[:8] == PNG
    assert report.plot_rank_vs_prob(samples, tmp_path / "p.png").read_bytes()[:8] == PNG
    assert report.plot_expected_rank_vs_entropy(samples, tmp_path / "e.png").read_bytes()[:8] == PNG
    w = {"sft": np.ones(run.n_tokens), "entropy": run.column("entropy"), "zero": np.zeros(run.n_tokens)}
    ws = [{"label": "run-a", "methods": {m: exports.weight_sample(v, run.is_noise, 0) for m, v in w.items()}}]
    assert report.plot_weight_distributions(ws, tmp_path / "w.png").read_bytes()[:8] == PNG
    # a table without rank / expected_rank columns still plots (a note in the panel)
    samples[0]["rank"] = None
    samples[0]["expected_rank"] = None
    assert report.plot_rank_vs_prob(samples, tmp_path / "p2.png").read_bytes()[:8] == PNG
    assert report.plot_expected_rank_vs_entropy(samples, tmp_path / "e2.png").read_bytes()[:8] == PNG
    # nothing computed at all
    assert report.plot_recall_curves(result.curves.iloc[0:0], tmp_path / "r0.png").read_bytes()[:8] == PNG
    assert report.plot_weight_distributions([], tmp_path / "w0.png").read_bytes()[:8] == PNG


def _heatmap_runs():
    tokens = ["Let", " <script>alert(1)</script>", " a & b", ' "quoted"', "\n", "", " x"]
    n = len(tokens)
    seq = {
        "seq_id": "seq<1>",
        "truncated": False,
        "tokens": tokens,
        "noise": [False, True, False, False, False, True, False],
        "kind": ["", "random-token", "", "", "", "filler</script>", ""],
        "stats": {"p": [0.5] * n, "H": [1.0] * n, "R": [2] * n, "ER": [1.5] * n},
        "w": {"ranktuner": [1.0, 2.0, 0.5, 0.1, 1.0, 3.0, None], "sft": [1.0] * n},
        "pct": {"ranktuner": [0.5, 0.8, 0.3, 0.1, 0.5, 1.0, 0.0], "sft": [0.5] * n},
    }
    return [{"label": "run <A>", "methods": ["sft", "ranktuner"], "seqs": [seq]},
            {"label": "run B", "methods": ["sft"], "seqs": []}]


def test_heatmap_escapes_and_is_self_contained():
    page = report.heatmap_html(_heatmap_runs(), k=10)
    low = page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", low)
    assert "<link" not in low and "@import" not in low and "url(" not in low
    assert "<script>alert" not in page and "</script>\"" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert " a &amp; b" in page and "&quot;quoted&quot;" in page
    assert "seq&lt;1&gt;" in page and "run &lt;A&gt;" in page
    # exactly the data block and the page's script; the kind "filler</script>" cannot close either
    assert page.count("<script") == 2 and page.count("</script>") == 2
    data = re.search(r'<script type="application/json" id="rwa-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data and ">" not in data and "&" not in data
    parsed = json.loads(data)
    assert parsed["runs"][0]["seqs"][0]["kind"][5] == "filler</script>"
    assert parsed["runs"][0]["seqs"][0]["w"]["ranktuner"][6] is None
    assert '<option value="ranktuner" selected>' in page  # the default method
    assert page.count('class="t n"') == 2
    assert "NOISE: random-token" in page  # tooltip without JS
    assert "\u21b5" in page and "\u2205" in page  # newline and empty tokens stay visible


def test_default_heatmap_method():
    assert report.default_heatmap_method(["sft", "dft", "ranktuner"]) == "ranktuner"
    assert report.default_heatmap_method(["sft", "dft"]) == "dft"
    assert report.default_heatmap_method(["sft"]) == "sft"
    assert report.default_heatmap_method([]) is None
    assert "<select" in report.heatmap_html([])

"""report.html of compare, sweep and train: contents, escaping, self-containment; the plots' grouping and order."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from helpers import EVIL_MODEL, hand_stats_table, hand_sweep, H_A, H_B, write_stats
from reweight_audit.evaluation.table1 import DEFAULT_MAP
from reweight_audit.reporting import pages, render
from reweight_audit.reporting.sweep_report import heat_map_order, write_sweep
from reweight_audit.reporting.train_report import write_train_page


# the compare behind the page draws four PNGs: seconds on a loaded 2-core machine
pytestmark_compare = pytest.mark.slow


@pytest.fixture(scope="module")
def compared(small_report_run):
    result, folder = small_report_run
    return result, (folder / "report.html").read_text(encoding="utf-8")


def _no_network(page: str) -> None:
    """Nothing the page loads comes from elsewhere: no src/href to a URL, no CSS import."""
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert "@import" not in page and "url(http" not in page


@pytestmark_compare
def test_compare_page_is_listed_and_self_contained(compared):
    result, page = compared
    assert "report.html" in result.files and result.files["report.html"].is_file()
    _no_network(page)
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 4 and all(src.startswith("data:image/png;base64,") for src in images)
    assert page.count("<iframe") == 1 and 'srcdoc="&lt;!DOCTYPE html&gt;' in page


@pytestmark_compare
def test_compare_page_escapes_every_label(compared):
    _, page = compared
    assert EVIL_MODEL not in page and "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in page
    # a token's markup is escaped once in heatmap.html and once more inside srcdoc
    assert "<img src=x" not in page and "&amp;lt;img src=x onerror=alert(1)&amp;gt;" in page


@pytestmark_compare
def test_compare_page_verdict_first_with_the_winners(compared):
    result, page = compared
    from reweight_audit.evaluation.strata import control_verdicts

    verdicts = control_verdicts(result.table, result.strata, result.k)
    assert len(verdicts) == 2  # two runs, one rank-by, one scope
    head = page[:page.index('id="table"')]  # the verdict comes before the main table
    for v in verdicts:
        assert (", ".join(v["winners"]) in head) if v["winners"] else "no method beats every control" in head
    assert "The Table 1 view" in head and "Entropy-Dominant" in head


@pytestmark_compare
def test_main_table_has_every_row_with_sort_values(compared):
    result, _ = compared
    table = pages.main_table(result)
    assert len(table.rows) == len(result.table)
    assert table.headers[:3] == ["run", "method", "family"]
    entropy_row = DEFAULT_MAP["entropy"]  # the Entropy-Dominant row's method is tinted as a Table 1 method
    row = next(r for r in table.rows if r.cells[1].text == entropy_row and r.cells[0].text == "m-b")
    expected = result.table[(result.table["method"] == entropy_row) & (result.table["run"] == "m-b")].iloc[0]
    assert row.cls == "table1" and row.cells[3].v == pytest.approx(expected["tok_prec"])
    assert "(" in row.cells[3].text  # the interval
    assert {r.cls for r in table.rows if r.cells[2].text == "control"} == {"control"}


def test_coinciding_curves_are_one_group():
    curves = pd.DataFrame({"method": ["a", "a", "b", "b", "c", "c"], "k": [1, 2, 2, 1, 1, 2],
                           "tok_rec": [0.1, 0.2, 0.2, 0.1, 0.1, 0.3]})
    assert render.coinciding_groups(curves) == [["a", "b"], ["c"]]
    assert render._group_label(["a", "b", "c", "d", "e"]) == "a = b = c = … (5 methods)"


@pytestmark_compare
def test_recall_legend_names_highlighted_groups_and_greys_the_rest(compared):
    result, _ = compared
    fig = render.recall_curves_figure(result.curves, k=result.k, highlight=("eaft", "dft", "ranktuner-approx"))
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "other methods (see the table)" in labels and "chance (random order)" in labels
    assert "position" in labels and "rarity" in labels
    dft = next(label for label in labels if label.startswith("dft"))
    # dft and talr are both 1/p-monotone: the same ranking, one line
    assert "talr" in dft
    assert not any(label.startswith(("sft", "entropy")) for label in labels)


def test_sweep_page_and_heat_map_order(tmp_path):
    paths = [write_stats(tmp_path / "a.parquet", hand_stats_table(H_A)),
             write_stats(tmp_path / "b.parquet", hand_stats_table(H_B, corpus="t"))]
    result = hand_sweep(paths, claim="dft < entropy")
    # families in the registry's order (baseline, prob, entropy); within prob, the higher mean share first
    order = heat_map_order(result)
    assert order[0] == "sft" and order[-1] == "entropy" and set(order[1:3]) == {"dft", "inv-prob"}
    files = write_sweep(result, tmp_path / "sweep")
    page = files["report.html"].read_text(encoding="utf-8")
    _no_network(page)
    assert "The claim: dft &lt; entropy" in page and f"{int(result.claim['holds'].sum())} of {len(result.claim)}" in page
    assert page.count("data:image/png;base64,") == 1


def test_train_page_from_the_folder(tmp_path):
    rows = [{"train_method": m, "step": s, "noise_nll_change": -0.1 * s, "clean_nll_change": -0.05 * s,
             f"{m}/noise_mass": 0.2, f"{m}/tok_rec@10": 0.3} for m in ("sft", "<b>dft</b>") for s in (0, 1, 2)]
    pd.DataFrame(rows).to_csv(tmp_path / "audit.csv", index=False)
    summary = [{"method": "<b>dft</b>", "steps": 2, "noise_nll_change": -0.2, "clean_nll_change": -0.1,
                "noise_per_clean": 2.0, "own_tok_rec@10": 0.3, "own_noise_mass": 0.2}]
    (tmp_path / "run.json").write_text(json.dumps({"config": {"k": 10.0, "steps": 2}, "summary": summary}))
    (tmp_path / "absorption.md").write_text("# Noise absorption <i>\n")
    page = write_train_page(tmp_path).read_text(encoding="utf-8")
    _no_network(page)
    assert "&lt;b&gt;dft&lt;/b&gt;" in page and "<b>dft" not in page and "absorption &lt;i&gt;" in page
    assert page.count("data:image/png;base64,") == 1 and "2.000" in page

"""Issue 22: method parameters as a sweep axis (``--grid``) and the search for Table 1's conventions (``--target``)."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from helpers import make_stats, write_stats
from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation import param_grid, sweep, table1_search
from reweight_audit.evaluation.config import SweepConfig
from reweight_audit.evaluation.table1 import PAPER_TABLE1, TABLE1_METRICS
from reweight_audit.reporting.sweep_report import robustness_markdown, write_sweep


def test_grid_parsing_points_and_errors():
    axes = param_grid.parse_grid(["ranktuner-approx.low_entropy=smooth,trivial", "ranktuner-approx.base=1,p"])
    points = param_grid.grid_points(axes)
    assert [label for label, _ in points] == [
        "ranktuner-approx.low_entropy=smooth;ranktuner-approx.base=1",
        "ranktuner-approx.low_entropy=smooth;ranktuner-approx.base=p",
        "ranktuner-approx.low_entropy=trivial;ranktuner-approx.base=1",
        "ranktuner-approx.low_entropy=trivial;ranktuner-approx.base=p"]
    merged = param_grid.point_params({"talr": {"w_min": 0.1}}, points[3][1])
    assert merged == {"talr": {"w_min": 0.1}, "ranktuner-approx": {"low_entropy": "trivial", "base": "p"}}
    assert param_grid.grid_points([]) == [("default", {})]
    assert param_grid.grid_items({"focal": {"gamma": [1, 2]}}) == ["focal.gamma=1,2"]
    assert param_grid.parse_grid(["focal.gamma=1,2,1"])[0].values == ("1", "2")
    with pytest.raises(AuditError, match="METHOD.PARAM=v1,v2"):
        param_grid.parse_grid(["focal.gamma"])
    with pytest.raises(AuditError, match="no parameter 'nope'"):
        param_grid.parse_grid(["focal.nope=1,2"])
    with pytest.raises(AuditError, match="expected a number"):
        param_grid.parse_grid(["focal.gamma=1,x"])
    with pytest.raises(AuditError, match="given twice"):
        param_grid.parse_grid(["focal.gamma=1", "focal.gamma=2"])
    with pytest.raises(AuditError, match="--target 'table2'"):
        SweepConfig(target="table2")


def test_flips_counted_by_hand():
    # two settings (k 10, 20) × axis values x, y × other axis u, v; a < b at x, a > b at y only for k 10 and u
    rows = []
    for k, other, value in itertools.product([10, 20], ["u", "v"], ["x", "y"]):
        label = f"m.p={value};m.q={other}"
        a, b = (0.1, 0.2) if not (k == 10 and other == "u" and value == "y") else (0.3, 0.2)
        rows += [{"run": "r", "k": k, "params": label, "method": "a", "tok_rec": a},
                 {"run": "r", "k": k, "params": label, "method": "b", "tok_rec": b},
                 {"run": "r", "k": k, "params": label, "method": "c", "tok_rec": 0.2}]  # ties b everywhere
    got = param_grid.flips(pd.DataFrame(rows), "tok_rec", ["m.p", "m.q"], ("run", "k", "params"))
    by = got.set_index(["axis", "a", "b"])
    assert by.loc[("m.p", "a", "b"), ["settings", "flipped"]].tolist() == [4, 1]  # (k, q) groups: 4, one flips
    assert by.loc[("m.q", "a", "b"), ["settings", "flipped"]].tolist() == [4, 1]  # at k 10, p = y: u vs v
    assert by.loc[("m.p", "b", "c"), "flipped"] == 0  # a tie is no order


def sweep_table(rng: np.random.Generator, methods: dict[str, str]) -> pd.DataFrame:
    """A random sweep table: two settings, every method with values and intervals."""
    rows = []
    for rank_by in ("weight", "loss"):
        for m in methods:
            row = {"run": "r", "rank_by": rank_by, "method": m}
            for metric in TABLE1_METRICS:
                v = rng.uniform(0, 0.8)
                row.update({metric: v, f"{metric}_lo": v - 0.05, f"{metric}_hi": v + 0.05})
            rows.append(row)
    return pd.DataFrame(rows)


def test_table1_search_by_brute_force():
    families = {"entropy": "entropy", "eaft": "entropy", "dft": "prob", "talr": "prob", "inv-prob": "prob",
                "ranktuner": "rank", "sft": "baseline"}
    table = sweep_table(np.random.default_rng(4), families)
    res = table1_search.search_table1(table, families, ["run", "rank_by"])
    assert res.members == {"entropy": ["entropy", "eaft"], "prob": ["dft", "talr", "inv-prob"], "ranktuner": ["ranktuner"]}
    assert len(res.candidates) == 2 * 2 * 3 * 1 and res.n_settings == 2
    want = []
    for rank_by, e, p, r in itertools.product(("weight", "loss"), *res.members.values()):
        t = table[table["rank_by"] == rank_by].set_index("method")
        dist, within = 0.0, 0
        for row, m in zip(PAPER_TABLE1, (e, p, r)):
            for metric in TABLE1_METRICS:
                paper = PAPER_TABLE1[row][1][metric]
                dist += abs(t.loc[m, metric] - paper) * 100
                within += t.loc[m, f"{metric}_lo"] <= paper <= t.loc[m, f"{metric}_hi"]
        want.append((dist / 9, within, rank_by, e, p, r))
    want.sort(key=lambda w: (w[0], -w[1]))
    got = res.candidates
    np.testing.assert_allclose(got["distance"], [w[0] for w in want], rtol=1e-12)
    assert got["within"].tolist() == [w[1] for w in want]
    assert not res.any_all_within


def test_table1_search_finds_an_exact_reproduction():
    families = {"eaft": "entropy", "dft": "prob", "ranktuner-approx": "rank"}
    table = sweep_table(np.random.default_rng(1), families)
    exact = table["rank_by"] == "loss"
    for row, method in zip(PAPER_TABLE1, families):
        for metric in TABLE1_METRICS:
            paper = PAPER_TABLE1[row][1][metric]
            at = exact & (table["method"] == method)
            table.loc[at, [metric, f"{metric}_lo", f"{metric}_hi"]] = [paper, paper - 0.01, paper + 0.01]
    res = table1_search.search_table1(table, families, ["run", "rank_by"])
    best = res.closest(1).iloc[0]
    assert best["distance"] == pytest.approx(0.0, abs=1e-12) and best["within"] == 9 and best["rank_by"] == "loss"
    assert res.any_all_within
    lines = table1_search.target_lines(res)
    assert "some candidate puts all nine figures within" in lines[0] and "rank_by=loss" in lines[1]
    with pytest.raises(AuditError, match="no entropy-family method"):
        table1_search.search_table1(table[table["method"] != "eaft"], families, ["run", "rank_by"])


def test_sweep_with_grid_and_target_end_to_end(tmp_path):
    stats = write_stats(tmp_path / "s.parquet", make_stats(24, seed=3))
    cfg = SweepConfig(methods=["eaft", "dft", "ranktuner-approx", "sft"], k=[10], rank_by=["weight"],
                      scope=["global"], bootstrap=10, grid=["ranktuner-approx.base=1,p"], target="table1")
    res = sweep.run_sweep([stats], tmp_path / "out", cfg, writer=write_sweep)
    assert set(res.table["params"]) == {"ranktuner-approx.base=1", "ranktuner-approx.base=p"}
    t = res.table[res.table["noise"] == "all"].set_index(["params", "method"])["tok_rec"]
    assert t[("ranktuner-approx.base=1", "dft")] == t[("ranktuner-approx.base=p", "dft")]  # not on the axis
    assert set(res.flips["axis"]) == {"ranktuner-approx.base"}
    assert res.target is not None and len(res.target.candidates) == res.target.n_settings
    md = robustness_markdown(res)
    assert "## Verdicts that flip with a method parameter" in md and "## Target: RankTuner's Table 1" in md
    assert {"flips.csv", "table1_target.csv"} <= set(res.files)
    with pytest.raises(AuditError, match="not in --methods"):
        sweep.run_sweep([stats], None, SweepConfig(methods=["sft"], grid=["focal.gamma=1,2"]))

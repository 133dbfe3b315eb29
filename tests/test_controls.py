"""Controls and strata: the position and rarity controls, stratified metrics (hand-counted, scikit-learn, brute-force
bootstrap), ``compare --stratify`` and the sweep's stratify axis."""
from __future__ import annotations

import importlib
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score
from helpers import H_A, H_B, hand_stats_table, hand_sweep, make_stats, write_stats

from reweight_audit.evaluation import metrics, runs, strata, sweep
from reweight_audit.core.errors import AuditError
from reweight_audit.reporting.exports import write_exports
from reweight_audit.evaluation.config import CompareConfig, SweepConfig

compare = importlib.import_module("reweight_audit.evaluation.compare")  # the module; the attribute is the API function


# ----------------------------------------------------------------------------------------------- strata


def test_stratum_codes_are_quantiles_with_ties_kept_together():
    assert metrics.stratum_codes(np.array([0.4, 0.1, 0.3, 0.2]), 2).tolist() == [1, 0, 1, 0]
    # #{x' < x} = 0, 0, 0, 3 of 4: ⌊2·0/4⌋ = 0 for the tied ones, ⌊2·3/4⌋ = 1
    assert metrics.stratum_codes(np.array([1.0, 1.0, 1.0, 2.0]), 2).tolist() == [0, 0, 0, 1]
    # three values, ten strata: raw strata 0, 3, 6 renumbered 0, 1, 2
    assert metrics.stratum_codes(np.array([5.0, 6.0, 7.0]), 10).tolist() == [0, 1, 2]
    assert metrics.stratum_codes(np.arange(100.0), 10).tolist() == list(np.repeat(np.arange(10), 10))
    with pytest.raises(AuditError, match="positive integer"):
        metrics.stratum_codes(np.arange(3.0), 0)


def test_stratified_mean_weights_by_noise_and_skips_undefined():
    assert metrics.stratified_mean([0.5, 1.0], [1, 3]) == pytest.approx(0.875)
    assert metrics.stratified_mean([0.5, np.nan, 1.0], [1, 5, 3]) == pytest.approx(0.875)
    assert metrics.stratified_mean([0.5, 0.9], [2, 0]) == pytest.approx(0.5)  # no noise: no weight
    assert np.isnan(metrics.stratified_mean([np.nan], [4]))


# Two strata. A: noise scores [2], clean [1, 3]. B: noise [5, 4], clean [4, 1, 6].
HAND_SCORES = np.array([2.0, 1.0, 3.0, 5.0, 4.0, 4.0, 1.0, 6.0])
HAND_NOISE = np.array([1, 0, 0, 1, 1, 0, 0, 0], dtype=bool)
HAND_STRATA = np.array([0, 0, 0, 1, 1, 1, 1, 1])
HAND_SEQS = np.array([0, 0, 1, 1, 2, 2, 3, 3])


def test_stratified_metrics_hand_counted():
    # AUROC: A: 2 beats 1, loses to 3 → 1/2. B: 5 beats 4, 1, loses to 6 (2); 4 ties 4 (½), beats 1 (1): 3.5 of 6.
    # Weighted by noise (1 and 2): (1·½ + 2·7/12) / 3 = 5/9. Pooled: noise 2, 5, 4 against 1, 3, 4, 1, 6: 9.5/15.
    # k = 1/3: A's top ⌊3/3 + ½⌋ = 1 token is 3 (clean): recall 0, precision 0; B's top ⌊5/3 + ½⌋ = 2 are 6 and 5:
    # recall 1/2, precision 1/2. Weighted: (1·0 + 2·½) / 3 = 1/3 both.
    summary, rows = metrics.stratified_metrics(HAND_SCORES, HAND_NOISE, HAND_SEQS, HAND_STRATA, k=1 / 3,
                                               n_boot=0, seed=0)
    assert summary["auroc"] == pytest.approx(5 / 9)
    assert metrics.auroc(HAND_SCORES, HAND_NOISE) == pytest.approx(19 / 30)
    assert summary["tok_rec"] == pytest.approx(1 / 3) and summary["tok_prec"] == pytest.approx(1 / 3)
    assert [(r["stratum"], r["n"], r["n_noise"]) for r in rows] == [(0, 3, 1), (1, 5, 2)]
    assert [r["auroc"] for r in rows] == pytest.approx([0.5, 7 / 12])
    assert [r["tok_rec"] for r in rows] == pytest.approx([0.0, 0.5])
    assert summary["n_strata"] == 2 and np.isnan(summary["auroc_lo"])  # no bootstrap asked


def test_stratified_auroc_equals_sklearn_in_every_stratum():
    rng = np.random.default_rng(5)
    n = 3000
    scores = rng.integers(0, 40, n).astype(float)  # many ties
    noise = rng.random(n) < 0.1 + 0.2 * (scores > 30)
    position = rng.random(n)
    codes = metrics.stratum_codes(position, 10)
    summary, rows = metrics.stratified_metrics(scores, noise, rng.integers(0, 90, n), codes, k=0.1, n_boot=0, seed=0)
    expected = [roc_auc_score(noise[codes == j], scores[codes == j]) for j in range(10)]
    assert [r["auroc"] for r in rows] == pytest.approx(expected, rel=1e-12)
    weights = [int(noise[codes == j].sum()) for j in range(10)]
    assert summary["auroc"] == pytest.approx(np.average(expected, weights=weights), rel=1e-12)


def test_weighted_auroc_is_the_auroc_of_the_resampled_tokens():
    rng = np.random.default_rng(4)
    scores, noise, seqs = rng.integers(0, 30, 2000).astype(float), rng.random(2000) < 0.2, rng.integers(0, 50, 2000)
    auc = metrics.stratified._WeightedAUROC(scores, noise, seqs, 50)
    assert auc.replicates(np.ones((1, 50)))[0] == pytest.approx(metrics.auroc(scores, noise), rel=1e-12)
    draws = next(metrics.bootstrap_multiplicities(50, 20, 3)).copy()
    for b, row in enumerate(draws):
        taken = np.repeat(np.arange(2000), row[seqs].astype(int))
        assert auc.replicates(draws)[b] == pytest.approx(metrics.auroc(scores[taken], noise[taken]), rel=1e-12)
    # a stratum without noise (or without clean tokens) has no AUROC, in every replicate
    assert np.isnan(metrics.stratified._WeightedAUROC(scores, np.zeros(2000, bool), seqs, 50).replicates(draws)).all()
    assert np.isnan(metrics.stratified._WeightedAUROC(scores, np.ones(2000, bool), seqs, 50).replicates(draws)).all()


def test_one_stratum_is_the_pooled_metric():
    table = make_stats(seed=3)
    scores = -table.column("logp").to_numpy().astype(float)
    noise = table.column("is_noise").to_numpy(zero_copy_only=False)
    seqs = pd.factorize(table.column("seq_id").to_numpy(zero_copy_only=False))[0]
    pooled = metrics.topk_metrics(scores, noise, seqs, 0.1)
    summary, _ = metrics.stratified_metrics(scores, noise, seqs, np.zeros(scores.size, int), k=0.1, n_boot=0, seed=0)
    for name in ("tok_prec", "tok_rec", "seq_hit", "lift"):
        assert summary[name] == pytest.approx(pooled[name], rel=1e-12), name
    assert summary["auroc"] == pytest.approx(metrics.auroc(scores, noise), rel=1e-12)


@pytest.mark.parametrize("scope", ["sequence", "global"])
def test_bootstrap_replicates_are_the_metric_on_the_resampled_data(scope):
    """Replicate b equals the stratified metric recomputed on the sequences replicate b drew (sequence scope:
    every metric; global scope, where the cut is held at the full sample's: AUROC, which has no cut)."""
    rng = np.random.default_rng(3)
    n = 300
    scores = rng.integers(0, 15, n).astype(float)
    noise = rng.random(n) < 0.25
    seqs = np.sort(rng.integers(0, 25, n))
    codes = metrics.stratum_codes(rng.random(n), 3)
    n_seqs = int(seqs.max()) + 1
    index = metrics.StratifiedIndex(scores, noise, seqs, codes, n_boot=4, seed=7)
    reps = index._replicates(index._tables(0.2, scope))
    draws = next(metrics.bootstrap_multiplicities(n_seqs, 4, 7)).copy()
    names = ["auroc"] + (["tok_rec", "tok_prec", "seq_hit", "lift"] if scope == "sequence" else [])
    for b in range(4):
        rows = np.concatenate([np.tile(np.flatnonzero(seqs == s), int(m)) for s, m in enumerate(draws[b])])
        copies = np.concatenate([np.repeat(np.arange(int(m)) + 1000 * s, int((seqs == s).sum()))
                                 for s, m in enumerate(draws[b])])
        direct, _ = metrics.stratified_metrics(scores[rows], noise[rows], copies, codes[rows], k=0.2, scope=scope,
                                              n_boot=0, seed=0)
        for name in names:
            assert reps[name][b] == pytest.approx(direct[name], rel=1e-12, abs=1e-15), (name, b)


def test_bootstrap_intervals_bracket_the_value():
    table = make_stats(seed=8)
    scores = table.column("entropy").to_numpy().astype(float)
    noise = table.column("is_noise").to_numpy(zero_copy_only=False)
    seqs = pd.factorize(table.column("seq_id").to_numpy(zero_copy_only=False))[0]
    codes = metrics.stratum_codes(table.column("pos").to_numpy().astype(float), 4)
    summary, _ = metrics.stratified_metrics(scores, noise, seqs, codes, k=0.1, n_boot=200, seed=1)
    for name in ("tok_rec", "auroc"):
        assert summary[f"{name}_lo"] < summary[name] < summary[f"{name}_hi"], name


# ----------------------------------------------------------------------------------------------- the run's columns


def test_seq_len_is_derived_and_a_stored_one_wins(tmp_path):
    run = runs.load_run(write_stats(tmp_path / "a.parquet", hand_stats_table(H_A)))
    assert "seq_len" in run.numeric_columns and run.column("seq_len").tolist() == [4] * 8
    stored = hand_stats_table(H_A).append_column("seq_len", pa.array([9] * 8, pa.int32()))
    run = runs.load_run(write_stats(tmp_path / "b.parquet", stored))
    assert run.column("seq_len").tolist() == [9] * 8


def test_stratify_values_use_the_controls_definitions(tmp_path):
    run = runs.load_run(write_stats(tmp_path / "a.parquet", hand_stats_table(H_A)))
    assert strata.stratify_values(run, "position").tolist() == pytest.approx([0.125, 0.375, 0.625, 0.875] * 2)
    assert strata.stratify_values(run, "length").tolist() == [4.0] * 8
    # every token id differs: each is 1 of 8
    ids = hand_stats_table(H_A).append_column("token_id", pa.array([1, 2, 3, 4, 1, 1, 1, 1], pa.int32()))
    run = runs.load_run(write_stats(tmp_path / "b.parquet", ids))
    assert strata.stratify_values(run, "rarity").tolist() == pytest.approx(
        [math.log(8 / 5)] + [math.log(8)] * 3 + [math.log(8 / 5)] * 4)


# ----------------------------------------------------------------------------------------------- compare --stratify


@pytest.fixture(scope="module")
def stratified_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("strata")
    stats = write_stats(d / "stats.parquet", make_stats(seed=2), model="tiny-lm")
    res = compare.run_compare([stats], d / "out", CompareConfig(methods=None, scope=["global", "sequence"],
                                                                bootstrap=30, stratify=["position", "rarity"], strata=4,
                                                                heatmap_sequences=2), writer=write_exports)
    return d / "out", res


def test_compare_writes_strata_csv_matching_the_engine(stratified_run):
    out, res = stratified_run
    table = pd.read_csv(out / "strata.csv")
    assert list(table.columns) == strata.strata_columns()
    assert set(table["stratify"]) == {"position", "rarity"}
    assert {"position", "position-rev", "rarity"} <= set(table["method"])
    overall = table[table["stratum"] == strata.ALL].set_index(["method", "scope", "stratify"])
    per = table[table["stratum"] != strata.ALL]
    # each `all` row is the noise-weighted mean of its strata rows
    for (method, scope, by), block in per.groupby(["method", "scope", "stratify"]):
        for name in ("tok_rec", "tok_prec", "auroc"):
            expect = metrics.stratified_mean(block[name].to_numpy(), block["n_noise"].to_numpy())
            assert overall.loc[(method, scope, by), name] == pytest.approx(expect, rel=1e-9), (method, name)
        assert block["n_tokens"].sum() == overall.loc[(method, scope, by), "n_tokens"]
    row = overall.loc[("entropy", "global", "position")]
    assert row["auroc_lo"] <= row["auroc"] <= row["auroc_hi"]


def test_table_md_says_which_methods_beat_every_control(stratified_run):
    out, res = stratified_run
    text = (out / "table.md").read_text()
    assert "## Controls" in text and "AUROC within position" in text and "TOK REC@10% within rarity" in text
    verdict = [line for line in text.splitlines() if line.startswith("Above every control in every column:")]
    assert len(verdict) == 2  # one per scope
    # recompute the verdict for the global scope from the tables
    t = res.table[res.table["scope"] == "global"].set_index("method")
    s = res.strata[(res.strata["stratum"] == strata.ALL) & (res.strata["scope"] == "global")]
    columns = {("pooled", m): t[m] for m in ("auroc", "tok_rec")}
    for by, block in s.groupby("stratify"):
        for m in ("auroc", "tok_rec"):
            columns[(by, m)] = block.set_index("method")[m]
    controls = t.index[t["family"] == "control"]
    winners = [m for m in t.index if m not in controls
               and all(col[m] > col[controls].max() for col in columns.values())]
    assert verdict[0] == "Above every control in every column: " + (
        ", ".join(f"`{m}`" for m in winners) or "none") + "."


def test_summary_json_has_the_stratified_means_and_the_verdicts(stratified_run):
    import json

    out, res = stratified_run
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["strata"]) == len(res.strata[res.strata["stratum"] == strata.ALL])
    assert {row["stratum"] for row in summary["strata"]} == {strata.ALL}
    text = (out / "table.md").read_text()
    for verdict in summary["controls"]:
        assert verdict["controls"] == ["position", "position-rev", "rarity"]
        line = "Above every control in every column: " + (", ".join(f"`{m}`" for m in verdict["winners"]) or "none")
        assert line in text


def test_position_control_is_the_relative_position(stratified_run):
    _, res = stratified_run
    run, weights = res.run_data[0], res.run_weights[0]
    pos, length = run.column("pos"), run.column("seq_len")
    assert weights["position"] == pytest.approx((pos + 0.5) / length)
    assert weights["position-rev"] == pytest.approx(1 - (pos + 0.5) / length)


def test_bad_stratify_options_are_one_line_errors(tmp_path):
    stats = write_stats(tmp_path / "s.parquet", hand_stats_table(H_A))
    for kwargs, match in (({"stratify": ["bogus"]}, "--stratify 'bogus' is not known"),
                          ({"stratify": ["position"], "strata": 0}, "--strata 0"),
                          ({"stratify": ["rarity"]}, "needs the token_id column")):
        with pytest.raises(AuditError, match=match):
            compare.run_compare([stats], None, CompareConfig(methods=["sft"], bootstrap=0, **kwargs))


# ----------------------------------------------------------------------------------------------- sweep


def test_sweep_stratified_hand_counted(tmp_path):
    # 2 strata by position: pos 0, 1 (relative .125, .375) and pos 2, 3. Noise: s1 pos 1 (stratum 0), s2 pos 2
    # (stratum 1); each stratum has 4 tokens and 1 noise token, so the mean over strata is the plain mean.
    # Sequence scope at 25%: top ⌊2·¼ + ½⌋ = 1 of each sequence's 2 tokens in a stratum.
    # entropy, run A: stratum 0: s1 (.5, 2.0 noise) takes the noise, s2 (1.0, 2.5) not: 1; stratum 1: s1 (3.0, .1),
    # s2 (.2 noise, .3): 0. Mean ½ (pooled: 0). Global 25%: top 1 of 4 per stratum: 2.5 and 3.0, both clean: 0.
    paths = [write_stats(tmp_path / "a.parquet", hand_stats_table(H_A), model="run-A"),
             write_stats(tmp_path / "b.parquet", hand_stats_table(H_B), model="run-B")]
    res = hand_sweep(paths, stratify=["none", "position"], strata=2)
    rec = res.table.set_index(["run", "scope", "k", "stratify", "method"])["tok_rec"]
    assert rec[("run-A", "sequence", 25.0, "position", "entropy")] == pytest.approx(0.5)
    assert rec[("run-A", "sequence", 25.0, "none", "entropy")] == pytest.approx(0.0)
    assert rec[("run-A", "global", 25.0, "position", "entropy")] == pytest.approx(0.0)
    # run B's s2 noise token has entropy 5.0, the top of stratum 1: ½ at global 25%
    assert rec[("run-B", "global", 25.0, "position", "entropy")] == pytest.approx(0.5)
    assert rec[("run-A", "global", 25.0, "position", "inv-prob")] == pytest.approx(1.0)
    assert rec[("run-A", "global", 25.0, "position", "sft")] == pytest.approx(0.25)
    assert len(res.table) == 2 * 2 * 2 * 2 * 4  # runs × scopes × cuts × stratify × methods
    assert res.pairs.set_index(["a", "b"]).loc[("dft", "sft"), "settings"] == 16


def test_sweep_claim_checked_stratified_only(tmp_path):
    paths = [write_stats(tmp_path / "a.parquet", hand_stats_table(H_A), model="run-A")]
    res = hand_sweep(paths, stratify=["position"], strata=2, claim="dft < entropy")
    assert set(res.claim["stratify"]) == {"position"}
    # entropy A stratified: global 25% 0, global 50% ½, sequence 25% ½, sequence 50%: stratum 0 s1 (.5, 2.0n) → 1,
    # stratum 1 s2 (.2n, .3) → 0: ½. dft is 0 everywhere, so the claim fails only at global 25%.
    assert res.claim["holds"].tolist() == [False, True, True, True]
    with pytest.raises(AuditError, match="--stratify 'bogus'"):
        hand_sweep(paths, stratify=["bogus"])


def test_compare_prints_the_verdict_with_the_run_label_as_text(tmp_path):
    """A label in brackets is printed as text, not read as rich markup (a model name looks like a style tag)."""
    from typer.testing import CliRunner

    from reweight_audit.cli import app

    stats = write_stats(tmp_path / "s.parquet", make_stats(seed=4), model="gemma-3-270m-q4_k_m.gguf")
    result = CliRunner().invoke(app, ["compare", str(stats), "-o", str(tmp_path / "out"), "--bootstrap", "0",
                                      "--methods", "nll,dft,position,rarity", "--stratify", "position", "-q"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    head = [i for i, line in enumerate(lines) if line.startswith("above every control (position, rarity)")]
    assert len(head) == 1 and lines[head[0] + 1].startswith("  [gemma-3-270m-q4_k_m.gguf, rank by weight, global]: ")
    assert lines[-1].startswith("report: ") and lines[-1].endswith("report.html")


def test_sweep_and_compare_agree_on_the_stratified_values_and_intervals(tmp_path):
    stats = write_stats(tmp_path / "s.parquet", make_stats(seed=6), model="tiny-lm")
    methods = ["dft", "entropy", "position", "rarity"]
    cmp = compare.run_compare([stats], None, CompareConfig(methods=methods, scope=["global", "sequence"], bootstrap=40,
                                                           seed=3, stratify=["position"], strata=5))
    swept = sweep.run_sweep([stats], None, SweepConfig(methods=methods, rank_by=["weight"], scope=["global", "sequence"],
                                                       k=[10], stratify=["position"], strata=5, bootstrap=40, seed=3))
    overall = cmp.strata[cmp.strata["stratum"] == strata.ALL].set_index(["scope", "method"])
    rows = swept.table[swept.table["noise"] == "all"]
    assert len(rows) == 2 * len(methods)
    for _, row in rows.iterrows():
        for name in ("tok_rec", "tok_rec_lo", "tok_rec_hi", "tok_prec", "seq_hit_hi"):
            assert row[name] == pytest.approx(overall.loc[(row["scope"], row["method"]), name], rel=1e-12), name

"""compare: methods × rank-by × scope on synthetic stats tables."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import KINDS, make_stats, write_stats
from reweight_audit import methods

from reweight_audit.reporting import exports, render as report

from reweight_audit.evaluation import metrics, runs
from reweight_audit.evaluation.compare import run_compare
from reweight_audit.core.errors import AuditError
from reweight_audit.reporting.exports import write_exports
from reweight_audit.evaluation.config import CompareConfig

@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One full compare with every export: all methods, two rank-bys, two scopes."""
    d = tmp_path_factory.mktemp("cmp")
    stats = write_stats(d / "stats.parquet", make_stats(odd_token="<script>alert('x')</script>"), model="tiny-lm")
    res = run_compare([stats], d / "out", CompareConfig(rank_by=["weight", "loss"], scope=["global", "sequence"],
                                                        bootstrap=20, heatmap_sequences=5), writer=write_exports)
    return stats, d / "out", res


def quick(paths, workers=None, **kw):
    kw.setdefault("bootstrap", 0)
    return run_compare(paths, Path("/nonexistent-not-written"), CompareConfig(**kw), workers=workers)


# ------------------------------------------------------------------------------------------------ outputs


def test_all_files_written_and_parseable(full_run):
    _, out, res = full_run
    for name in exports.EXPORT_FILES:
        assert (out / name).is_file(), name
        assert res.files[name] == out / name
    table = pd.read_csv(out / "table.csv")
    assert {"run", "method", "family", "rank_by", "scope", "k", "tok_prec", "tok_rec", "seq_hit", "lift", "auroc",
            "ap", "noise_mass", "noise_mass_ratio", "tok_prec_lo", "tok_prec_hi", "tok_rec_lo", "seq_hit_hi",
            "lift_lo", "n_tokens", "n_noise", "n_seqs"} <= set(table.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["k"] == 10.0
    assert len(summary["table"]) == len(table)
    assert summary["runs"][0]["label"] == "tiny-lm"
    assert 0 < summary["base_rate"]["tiny-lm"] < 1
    assert any(s["method"] == "rho1" for s in summary["skipped"])
    curves = pd.read_csv(out / "curves.csv")
    assert {c * 100 for c in metrics.CUTS} <= set(np.round(curves["k"], 6))
    by_kind = pd.read_csv(out / "by_kind.csv")
    assert set(by_kind["kind"]) == set(KINDS)
    assert "TOK PREC@10%" in (out / "table.md").read_text()
    for png in ("recall_curves.png", "rank_vs_prob.png", "expected_rank_vs_entropy.png", "weight_distributions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "heatmap.html").read_text().startswith("<!DOCTYPE html>")


def test_one_row_per_run_method_rankby_scope(full_run):
    _, out, res = full_run
    table = pd.read_csv(out / "table.csv")
    computed = [m.name for m in methods.available_methods() if m.name != "rho1"]
    assert len(table) == len(computed) * 2 * 2
    assert not table.duplicated(["run", "method", "rank_by", "scope", "k"]).any()
    assert set(table["method"]) == set(computed)
    assert (table["k"] == 10.0).all()
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == len(table) * len(set(metrics.CUTS) | {0.10})
    by_kind = pd.read_csv(out / "by_kind.csv")
    assert len(by_kind) == len(table) * len(KINDS)


def test_sft_scores_the_base_rate(full_run):
    _, _, res = full_run
    t = res.table
    rows = t[(t["method"] == "sft") & (t["rank_by"] == "weight")]
    assert len(rows) == 2  # global and sequence scope
    for _, row in rows.iterrows():
        # global: exactly the base rate (ties fractional); per sequence: each sequence's top is round(k·n_s)
        # tokens, which weights sequences slightly unequally
        tol = 1e-9 if row["scope"] == "global" else 0.01
        assert row["tok_prec"] == pytest.approx(row["base_rate"], abs=tol)
        assert row["lift"] == pytest.approx(1.0, abs=tol * 20)
        assert row["tok_rec"] == pytest.approx(0.10, abs=0.01)  # the top set is round(k·n) tokens
        assert row["noise_mass_ratio"] == pytest.approx(1.0, abs=1e-9)
        assert row["auroc"] == pytest.approx(0.5, abs=1e-12)


def test_weights_parquet_has_one_column_per_method(full_run):
    stats, out, res = full_run
    w = pq.read_table(out / "weights.parquet")
    computed = [m.name for m in methods.available_methods() if m.name != "rho1"]
    assert w.column_names == ["run", "seq_id", "pos", "token", "is_noise", "noise_kind", *computed]
    src = pq.read_table(stats)
    assert w.num_rows == src.num_rows
    assert w.column("seq_id").to_pylist() == src.column("seq_id").to_pylist()
    cols = {c: src.column(c).to_numpy() for c in ("logp", "entropy")}
    expected = methods.compute_weights(methods.get_method("dft"), cols)
    np.testing.assert_allclose(w.column("dft").to_numpy(), expected, rtol=1e-6)
    assert np.all(w.column("sft").to_numpy() == 1.0)


def test_heatmap_is_self_contained_and_escaped(full_run):
    _, out, _ = full_run
    page = (out / "heatmap.html").read_text()
    low = page.lower()
    for attr in ("src=", "href="):
        for scheme in ("http://", "https://", "//"):
            assert f'{attr}"{scheme}' not in low and f"{attr}'{scheme}" not in low
    assert "<link" not in low
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("<script") == 2  # the JSON data block and the page's own script
    assert '<select id="method">' in page
    assert 'class="t n"' in page


# ------------------------------------------------------------------------------------------------ errors


def test_uncomputable_method_is_skipped_with_reason(tmp_path):
    stats = write_stats(tmp_path / "s.parquet", make_stats(20))
    res = quick([stats])
    skipped = {s["method"]: s["reason"] for s in res.skipped}
    assert "rho1" in skipped and "ref_logp" in skipped["rho1"]
    assert "rho1" not in set(res.table["method"])
    with pytest.raises(AuditError, match="rho1.*ref_logp"):
        quick([stats], methods=["rho1"])
    with_ref = write_stats(tmp_path / "r.parquet", make_stats(20, ref=True))
    res = quick([with_ref], methods=["rho1", "sft"])
    assert list(res.table["method"]) == ["rho1", "sft"] and not res.skipped


def test_bad_stats_file_names_missing_columns(tmp_path):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"seq_id": ["a"], "token": ["x"], "loss": [1.0]}), other)
    with pytest.raises(AuditError) as exc:
        quick([other])
    msg = str(exc.value)
    assert "other.parquet" in msg and "pos" in msg and "logp" in msg and "is_noise" in msg and "\n" not in msg
    notparquet = tmp_path / "x.parquet"
    notparquet.write_text("id,text\n1,hello\n")
    with pytest.raises(AuditError, match="x.parquet"):
        quick([notparquet])
    with pytest.raises(AuditError, match="not found"):
        quick([tmp_path / "missing.parquet"])
    empty = write_stats(tmp_path / "empty.parquet", make_stats(3).slice(0, 0))
    with pytest.raises(AuditError, match="no rows"):
        quick([empty])


@pytest.mark.parametrize("k", [0, -5, 100.5, float("nan")])
def test_k_out_of_range(tmp_path, k):
    stats = write_stats(tmp_path / "s.parquet", make_stats(5))
    with pytest.raises(AuditError, match="--k"):
        quick([stats], k=k)


def test_bad_options(tmp_path):
    stats = write_stats(tmp_path / "s.parquet", make_stats(5))
    with pytest.raises(AuditError, match="rank-by"):
        quick([stats], rank_by=["gradient"])
    with pytest.raises(AuditError, match="scope"):
        quick([stats], scope=["batch"])
    with pytest.raises(AuditError, match="nope"):
        quick([stats], methods=["nope"])
    no_p2 = write_stats(tmp_path / "n.parquet", make_stats(5).drop_columns(["sum_p2"]))
    with pytest.raises(AuditError, match="sum_p2"):
        quick([no_p2], rank_by=["grad"], methods=["sft"])


def test_no_noise_corpus_gives_nan_recall(tmp_path):
    stats = write_stats(tmp_path / "clean.parquet", make_stats(10, noise_rate=0.0))
    res = quick([stats], methods=["sft", "entropy", "ranktuner"], bootstrap=10)
    assert res.table["tok_rec"].isna().all()
    assert res.table["seq_hit"].isna().all()
    assert (res.table["tok_prec"].fillna(0) == 0).all()
    assert res.by_kind.empty
    assert (res.table["n_noise"] == 0).all()


# ------------------------------------------------------------------------------------------------ semantics


def test_rank_by_loss_and_grad_hand_values():
    w = np.array([2.0, 0.5, 1.0])
    logp = np.log(np.array([0.5, 0.9, 0.25]))
    sum_p2 = np.array([0.3, 0.5, 0.25])  # token 2: radicand (0.1)² + 0.5 − 0.81 < 0 -> clipped to 0
    np.testing.assert_allclose(metrics.rank_scores(w, "weight", logp, sum_p2), w)
    np.testing.assert_allclose(metrics.rank_scores(w, "loss", logp, sum_p2),
                               [2 * math.log(2), 0.5 * -math.log(0.9), math.log(4)])
    np.testing.assert_allclose(metrics.rank_scores(w, "grad", logp, sum_p2),
                               [2 * math.sqrt(0.25 + 0.3 - 0.25), 0.0, math.sqrt(0.75 ** 2 + 0.25 - 0.0625)])


def test_rank_by_end_to_end_noise_mass(tmp_path):
    table = make_stats(15)
    stats = write_stats(tmp_path / "s.parquet", table)
    res = quick([stats], methods=["sft", "dft"], rank_by=["weight", "loss", "grad"])
    logp = table.column("logp").to_numpy().astype(float)
    p2 = table.column("sum_p2").to_numpy().astype(float)
    y = table.column("is_noise").to_numpy()
    p = np.exp(logp)
    expected = {
        ("sft", "loss"): -logp,
        ("sft", "grad"): np.sqrt(np.maximum((1 - p) ** 2 + p2 - p * p, 0)),
        ("dft", "loss"): p * -logp,
        ("dft", "weight"): p,
    }
    t = res.table.set_index(["method", "rank_by"])
    for key, s in expected.items():
        assert t.loc[key, "noise_mass"] == pytest.approx(s[y].sum() / s.sum(), rel=1e-6), key


def test_two_runs_side_by_side(tmp_path):
    a = write_stats(tmp_path / "a" / "stats.parquet", make_stats(20, seed=1), model="model-A")
    b = write_stats(tmp_path / "b" / "stats.parquet", make_stats(25, seed=2, ref=True), model="model-B")
    res = run_compare([a, b], tmp_path / "out", CompareConfig(methods=None, bootstrap=0, heatmap_sequences=2),
                      writer=write_exports)
    assert list(dict.fromkeys(res.table["run"])) == ["model-A", "model-B"]
    assert set(res.table[res.table["run"] == "model-B"]["method"]) >= {"rho1"}
    assert "rho1" not in set(res.table[res.table["run"] == "model-A"]["method"])
    assert [s["run"] for s in res.skipped] == ["model-A"]
    w = pq.read_table(tmp_path / "out" / "weights.parquet").to_pandas()
    assert set(w["run"]) == {"model-A", "model-B"}
    assert w.loc[w["run"] == "model-A", "rho1"].isna().all()
    assert w.loc[w["run"] == "model-B", "rho1"].notna().all()
    # same model twice: labels are made unique; no manifest: file stem
    c = write_stats(tmp_path / "c" / "stats.parquet", make_stats(5, seed=3), model="model-A")
    d = write_stats(tmp_path / "run-d.parquet", make_stats(5, seed=4))
    res = quick([a, c, d], methods=["sft"])
    labels = list(dict.fromkeys(res.table["run"]))
    assert len(set(labels)) == 3 and labels[2] == "run-d" and all("model-A" in x for x in labels[:2])


def test_batch_dependent_method_gets_batches(tmp_path):
    table = make_stats(30)
    stats = write_stats(tmp_path / "s.parquet", table)
    res = run_compare([stats], tmp_path / "out", CompareConfig(methods=["talr"], batch_seqs=7, seed=3, bootstrap=0,
                                                               heatmap_sequences=1), writer=write_exports)
    run = runs.load_run(stats)
    batch = methods.assign_batches(run.seq_codes, 7, 3)
    expected = methods.compute_weights(methods.get_method("talr"), {"logp": run.column("logp")}, batch=batch, seed=3)
    got = pq.read_table(res.files["weights.parquet"]).column("talr").to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    unbatched = methods.compute_weights(methods.get_method("talr"), {"logp": run.column("logp")},
                                  batch=np.zeros(len(expected), dtype=np.int64))
    assert not np.allclose(expected, unbatched)


def test_params_and_method_files(tmp_path):
    stats = write_stats(tmp_path / "s.parquet", make_stats(10))
    mfile = tmp_path / "my_methods.py"
    mfile.write_text(
        "import numpy as np\n"
        "from reweight_audit.methods import register\n"
        "@register('noise-oracle', family='baseline', needs=('logp',), formula='-logp', source='test')\n"
        "def oracle(columns, *, batch=None, rng=None):\n"
        "    return -np.asarray(columns['logp'], dtype=float)\n"
    )
    with methods.isolated_registry():
        res = quick([stats], methods=["focal", "noise-oracle"], method_files=[mfile], params=["focal.gamma=0"])
        t = res.table.set_index("method")
        assert t.loc["focal", "tok_prec"] == pytest.approx(t.loc["focal", "base_rate"])  # gamma 0: constant
        assert t.loc["noise-oracle", "family"] == "baseline"
        with pytest.raises(AuditError, match="gamma|parameter"):
            quick([stats], methods=["focal"], params=["focal.beta=1"])
        with pytest.raises(AuditError, match="focal.*--methods"):
            quick([stats], methods=["sft"], params=["focal.gamma=1"])


def test_bad_weights_name_the_method(tmp_path):
    stats = write_stats(tmp_path / "s.parquet", make_stats(5))
    with methods.isolated_registry():
        @methods.register("broken", family="baseline", needs=("logp",), formula="-1", source="test")
        def _broken(columns, *, batch=None, rng=None):
            return -np.ones(len(columns["logp"]))

        with pytest.raises(AuditError, match="broken"):
            quick([stats], methods=["broken"])


def test_heatmap_prefers_noisy_sequences_and_is_seeded(tmp_path):
    stats = write_stats(tmp_path / "s.parquet", make_stats(40))
    run = runs.load_run(stats)
    a = exports.choose_heatmap_sequences(run, 6, seed=1)
    assert a == exports.choose_heatmap_sequences(run, 6, seed=1)
    noisy = set(np.unique(run.seq_codes[run.is_noise]))
    assert len(a) == 6 and set(a) <= noisy
    everything = exports.choose_heatmap_sequences(run, 1000, seed=1)
    assert len(everything) == len(run.seq_names)


@pytest.mark.parametrize("quantise", [None, 1.0, 4.0])
def test_shared_sort_matches_metrics_module(quantise):
    """ScoreIndex (one sort for AUROC, AP and per-kind top-k) equals the metrics module on each kind's pool."""
    rng = np.random.default_rng(7)
    n = 3000
    codes = rng.integers(0, 80, size=n)
    kinds = np.where(rng.random(n) < 0.1, rng.integers(0, 3, size=n), -1)
    y = kinds >= 0
    s = rng.gamma(1.0, 1.0, size=n) + y * 0.7
    if quantise is not None:  # heavy ties, including at every cut
        s = np.round(s * quantise) / quantise
    index = metrics.ScoreIndex(s, y, codes, kinds)
    for kind in (None, 0, 1, 2):
        pool = ~y | (kinds == kind) if kind is not None else np.ones(n, bool)
        pos = y if kind is None else kinds == kind
        got = index.rank_metrics(kind)
        assert got["auroc"] == pytest.approx(metrics.auroc(s[pool], pos[pool]), abs=1e-12)
        assert got["ap"] == pytest.approx(metrics.average_precision(s[pool], pos[pool]), abs=1e-12)
        for k in (0.0001, 0.01, 0.1, 0.37, 1.0):
            want = metrics.topk_metrics(s[pool], pos[pool], codes[pool], k, "global")
            have = index.topk_global(k, kind)
            for name in ("tok_prec", "tok_rec", "seq_hit", "lift"):
                assert have[name] == pytest.approx(want[name], abs=1e-12, nan_ok=True), (kind, k, name)


def test_constant_scores_by_kind_is_base_rate():
    n = 500
    rng = np.random.default_rng(1)
    kinds = np.where(rng.random(n) < 0.2, rng.integers(0, 2, size=n), -1)
    index = metrics.ScoreIndex(np.ones(n), kinds >= 0, rng.integers(0, 20, size=n), kinds)
    for kind in (0, 1):
        n_kind = int((kinds == kind).sum())
        got = index.topk_global(0.1, kind)
        assert got["tok_prec"] == pytest.approx(n_kind / (int((kinds < 0).sum()) + n_kind))
        assert got["lift"] == pytest.approx(1.0)
        assert index.rank_metrics(kind)["auroc"] == pytest.approx(0.5)


def test_results_do_not_depend_on_worker_threads(tmp_path):
    stats = write_stats(tmp_path / "s.parquet", make_stats(30, ref=True))
    one = quick([stats], workers=1, bootstrap=20, scope=["global", "sequence"])
    two = quick([stats], workers=3, bootstrap=20, scope=["global", "sequence"])
    pd.testing.assert_frame_equal(one.table, two.table)
    pd.testing.assert_frame_equal(one.by_kind, two.by_kind)
    pd.testing.assert_frame_equal(one.curves, two.curves)


def f1_at_k(c: metrics.Counts):
    """F1 of the top set: 2·found / (n_top + n_noise), the harmonic mean of tok_prec and tok_rec."""
    return metrics.ratio(2 * np.asarray(c.found, float), np.asarray(c.n_top, float) + c.n_noise)


def test_a_new_metric_is_one_function_and_one_spec_entry(tmp_path, request):
    request.addfinalizer(lambda: metrics.METRICS.remove("f1"))  # the registry forgets f1 after this test
    metrics.add_metric(metrics.MetricSpec("f1", "F1@{k}", report.fmt_interval, interval=True, per_cut=True,
                                          counts=f1_at_k))
    with pytest.raises(AuditError, match="f1"):
        metrics.add_metric(metrics.MetricSpec("f1", None, None, interval=False, per_cut=True, counts=f1_at_k))
    stats = write_stats(tmp_path / "s.parquet", make_stats(25))
    res = run_compare([stats], tmp_path / "out", CompareConfig(methods=["sft", "entropy"], scope=["global", "sequence"],
                                                               bootstrap=20, heatmap_sequences=1), writer=write_exports)
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert list(table.columns[table.columns.get_loc("lift_hi") + 1:][:3]) == ["f1", "f1_lo", "f1_hi"]
    p, r = table["tok_prec"], table["tok_rec"]
    np.testing.assert_allclose(table["f1"], 2 * p * r / (p + r), rtol=1e-12)  # by hand: the harmonic mean
    assert ((table["f1_lo"] <= table["f1"]) & (table["f1"] <= table["f1_hi"])).all()
    curves = pd.read_csv(tmp_path / "out" / "curves.csv")
    np.testing.assert_allclose(curves["f1"], 2 * curves["tok_prec"] * curves["tok_rec"]
                               / (curves["tok_prec"] + curves["tok_rec"]), rtol=1e-12)
    by_kind = pd.read_csv(tmp_path / "out" / "by_kind.csv")
    np.testing.assert_allclose(by_kind["f1"], 2 * by_kind["tok_prec"] * by_kind["tok_rec"]
                               / (by_kind["tok_prec"] + by_kind["tok_rec"]), rtol=1e-12)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {"f1", "f1_lo", "f1_hi"} <= set(summary["table"][0])
    assert "F1@10%" in (tmp_path / "out" / "table.md").read_text()
    assert [c.header for c in report.render_table(res).columns][-1] == "F1@10%"


def test_a_failed_compare_leaves_the_previous_report(tmp_path, monkeypatch):
    stats = write_stats(tmp_path / "s.parquet", make_stats(10))
    out = tmp_path / "out"
    run_compare([stats], out, CompareConfig(methods=["sft", "dft"], bootstrap=0, heatmap_sequences=1),
                writer=write_exports)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full while drawing the heatmap")

    monkeypatch.setattr(report, "heatmap_html", broken)
    with pytest.raises(RuntimeError):
        run_compare([stats], out, CompareConfig(methods=["entropy"], bootstrap=0, heatmap_sequences=1),
                    writer=write_exports)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.parquet"]  # no temporary folder left

"""Tokens after the first wrong step (kind after-error): neither noise nor clean, in no metric; wrong-step is real."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import make_stats, write_stats

from reweight_audit import methods

from reweight_audit.evaluation import metrics, runs
from reweight_audit.reporting.exports import write_exports
from reweight_audit.evaluation.config import CompareConfig

# the module: `reweight_audit.evaluation.compare` as an attribute is the API function
compare = importlib.import_module("reweight_audit.evaluation.compare")

METRIC_COLUMNS = ["tok_prec", "tok_rec", "seq_hit", "lift", "auroc", "ap", "noise_mass", "noise_mass_ratio"]


def with_real_errors(table: pa.Table, seed: int = 0) -> pa.Table:
    """The synthetic table relabelled like champ-fws --after-error keep: per sequence a wrong step, then the rest
    of the sequence after-error (noise-labelled by score, as score labels every span)."""
    df = table.to_pandas()
    rng = np.random.default_rng(seed)
    kind = np.array([""] * len(df), dtype=object)
    for _, idx in df.groupby("seq_id").indices.items():
        if rng.random() < 0.3:  # a solution without an error
            continue
        a = int(rng.integers(1, len(idx) // 2))
        b = a + int(rng.integers(1, 5))
        kind[idx[a:b]] = "wrong-step"
        kind[idx[b:]] = "after-error"
    df["noise_kind"] = kind
    df["is_noise"] = kind != ""
    return pa.Table.from_pandas(df, preserve_index=False)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fws")
    table = with_real_errors(make_stats(40, seed=5))
    kept = table.filter(pc.not_equal(table.column("noise_kind"), "after-error"))
    full = write_stats(d / "full.parquet", table, model="m")
    cut = write_stats(d / "cut.parquet", kept, model="m")
    with_rows = compare.run_compare([full], d / "out", CompareConfig(methods=CHOSEN, heatmap_sequences=3, **KW),
                                    writer=write_exports)
    return d, table, full, cut, with_rows


CHOSEN = ["entropy", "inv-prob", "ranktuner-approx", "sft"]
KW = dict(rank_by=["weight", "loss"], scope=["global", "sequence"], bootstrap=30, seed=1)


def test_after_error_rows_leave_every_metric_but_not_the_weights(real_run):
    d, table, full, cut, with_rows = real_run
    without = compare.run_compare([cut], d / "x", CompareConfig(methods=CHOSEN, **KW), writer=write_exports)
    # per-token methods: leaving the rows out of the metrics is the same as the table without them
    a, b = with_rows.table.drop(columns="run"), without.table.drop(columns="run")
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(with_rows.by_kind.drop(columns="run"), without.by_kind.drop(columns="run"))
    assert set(with_rows.by_kind["kind"]) == {"wrong-step"}
    n_after = int(np.sum(np.asarray(table.column("noise_kind").to_pylist()) == "after-error"))
    run = with_rows.runs[0]
    assert run["n_tokens"] == table.num_rows - n_after and run["n_excluded"] == n_after
    assert run["excluded_kinds"] == {"after-error": n_after}
    # weights.parquet keeps every row, the after-error ones labelled by kind and not counted as noise
    w = pq.read_table(d / "out" / "weights.parquet").to_pandas()
    assert len(w) == table.num_rows
    after = w["noise_kind"] == "after-error"
    assert after.sum() == n_after and not w.loc[after, "is_noise"].any()


def test_batch_dependent_methods_see_the_whole_batch(real_run):
    d, table, full, _, _ = real_run
    res = compare.run_compare([full], d / "talr", CompareConfig(methods=["talr"], batch_seqs=5, seed=2, bootstrap=0,
                                                                heatmap_sequences=1), writer=write_exports)
    run = runs.load_run(full)
    batch = methods.assign_batches(run.seq_codes, 5, 2)
    w = methods.compute_weights(methods.get_method("talr"), {"logp": run.column("logp")}, batch=batch, seed=2)
    got = pq.read_table(res.files["weights.parquet"]).column("talr").to_numpy()
    np.testing.assert_allclose(got, w, rtol=1e-6)
    keep = ~run.excluded
    row, _ = metrics.ranking_metrics(w[keep], run.is_noise[keep], run.seq_codes[keep], k=0.1, cuts=(), scope="global",
                                     n_boot=0, seed=0)
    t = res.table.iloc[0]
    for name in METRIC_COLUMNS:
        assert t[name] == pytest.approx(row[name], rel=1e-12, nan_ok=True), name


def test_reports_say_what_the_labels_are(real_run):
    d = real_run[0]
    md = (d / "out" / "table.md").read_text()
    assert "wrong-step is real errors, not injected noise" in md and "human annotation" in md
    assert "after-error tokens" in md and "left out of both classes" in md
    assert "wrong-step (real errors)" in md  # the by-kind section's heading
    summary = json.loads((d / "out" / "summary.json").read_text())
    assert any("real errors" in note for note in summary["notes"])
    page = (d / "out" / "heatmap.html").read_text()
    assert "left out of the metrics: after-error" in page and 'class="t x"' in page

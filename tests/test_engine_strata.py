"""``compare --stratify`` on the out-of-core engine: strata.csv equal to the memory engine's, and its parts by brute force."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reweight_audit.evaluation.compare import run_compare
from reweight_audit.evaluation.config import CompareConfig
from reweight_audit.evaluation.metrics import bootstrap_multiplicities, stratum_codes
from reweight_audit.evaluation.metrics.stratified import _WeightedAUROC
from reweight_audit.evaluation.outofcore import chunks, strata, tables

from tests.helpers import make_stats, write_stats

#: Counts and values of the variable: equal exactly; every other number to 1e-12 relative, NaN where NaN.
EXACT = ("n_tokens", "n_noise", "n_strata", "x_lo", "x_hi")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """A few hundred rows a chunk, 64-row streamed batches, 5-row steps of the AUROC bootstrap: every table below
    spans chunks, batches and steps, and runs of tied scores cross them."""
    monkeypatch.setattr(chunks, "CHUNK_ROWS", 300)
    monkeypatch.setattr(chunks, "_READ_ROWS", 128)
    monkeypatch.setattr(tables, "_FETCH_ROWS", 64)
    monkeypatch.setattr(strata, "_PIECE", 5 * 7)


def assert_strata_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if a[col].dtype.kind not in "fiu":
            assert list(x) == list(y), col
        elif col in EXACT:
            assert np.array_equal(x.astype(np.float64), y.astype(np.float64), equal_nan=True), col
        else:
            assert np.allclose(x.astype(np.float64), y.astype(np.float64), rtol=1e-12, atol=1e-15,
                               equal_nan=True), (col, x - y)


def both_strata(path, **options) -> tuple[pd.DataFrame, pd.DataFrame]:
    mem, ooc = (run_compare(path, None, CompareConfig(engine=e, **options)) for e in ("memory", "duckdb"))
    assert (mem.config["engine"], ooc.config["engine"]) == ("memory", "duckdb")
    return mem.strata, ooc.strata


def tied(table: pa.Table) -> pa.Table:
    """logp rounded to one decimal: many tied weights (ties at cuts, across batches)."""
    logp = np.round(table.column("logp").to_numpy(), 1).astype(np.float32)
    return table.set_column(table.schema.get_field_index("logp"), "logp", pa.array(logp))


@pytest.mark.slow
def test_every_variable_scope_and_rank_by_agree_with_ties_and_intervals(tmp_path):
    path = write_stats(tmp_path / "stats.parquet", tied(make_stats(16, seed=3)), model="m")
    mem, ooc = both_strata(path, methods=["dft", "sft", "rarity", "talr"], stratify=["position", "length", "rarity"],
                           strata=4, scope=["global", "sequence"], rank_by=["weight", "loss", "grad"], bootstrap=12,
                           batch_seqs=5)
    assert_strata_equal(mem, ooc)
    overall = ooc[ooc["stratum"] == "all"]
    assert overall["auroc_lo"].notna().any() and overall["tok_rec_hi"].notna().any()  # the intervals are compared
    assert len(set(make_stats(16, seed=3).column("noise_kind").to_pylist()) - {""}) > 1  # several kinds


def test_one_stratum_a_stratum_without_noise_and_no_bootstrap_agree(tmp_path):
    table = make_stats(14, seed=11, clean_frac=0.5)  # half the responses clean: strata of length without noise
    path = write_stats(tmp_path / "stats.parquet", table)
    for n_strata in (1, 7):
        mem, ooc = both_strata(path, methods=["dft", "entropy"], stratify=["length"], strata=n_strata,
                               scope=["global", "sequence"], bootstrap=0 if n_strata == 7 else 6)
        assert_strata_equal(mem, ooc)
        per = ooc[ooc["stratum"] != "all"]
        if n_strata == 1:
            assert set(per["stratum"]) == {"1"} and len(per)
        else:
            assert (per["n_noise"] == 0).any() and per["auroc"].isna().any()  # an AUROC undefined in a stratum


def test_strata_boundaries_match_stratum_codes_by_brute_force(tmp_path):
    rng = np.random.default_rng(5)
    for i, x in enumerate([np.round(rng.random(301), 2), rng.integers(0, 4, 200).astype(np.float64),
                           rng.random(97), np.full(10, 0.3)]):
        spill = tmp_path / f"x{i}.parquet"
        kind = np.where(rng.random(x.size) < 0.2, 0, -1).astype(np.int16)
        pq.write_table(pa.table({"x_position": x, "kind": kind}), spill)
        for n_strata in (1, 3, 10, 40):
            with tables.connect(tmp_path / "work") as con:
                found = strata.find_strata(con, spill, "position", n_strata, x.size)
            codes = stratum_codes(x, n_strata)
            assert np.array_equal(found.codes(x), codes)
            for j in range(found.n_strata):
                inside = codes == j
                assert (found.x_lo[j], found.x_hi[j]) == (x[inside].min(), x[inside].max())
                assert (found.n[j], found.n_noise[j]) == (inside.sum(), (kind[inside] >= 0).sum())


def test_auroc_replicates_match_the_weighted_auroc(monkeypatch):
    """Fed highest first in uneven batches (ties split across them), every replicate's AUROC is _WeightedAUROC's."""
    rng = np.random.default_rng(2)
    n, n_seqs, n_boot = 400, 9, 23
    s = np.round(rng.normal(size=n), 1)
    y = rng.random(n) < 0.3
    seq = rng.integers(0, n_seqs, n)
    mult = strata.multiplicities(n_seqs, n_boot, 7)
    order = np.argsort(-s, kind="stable")
    reps = strata.AurocReplicates(mult, np.arange(n_seqs), np.bincount(seq[y], minlength=n_seqs),
                                  np.bincount(seq[~y], minlength=n_seqs))
    for part in np.array_split(order, [5, 6, 90, 200, 201]):
        reps.feed(s[part], y[part].astype(np.int16), seq[part])
    expected = _WeightedAUROC(s, y, seq, n_seqs).replicates(next(bootstrap_multiplicities(n_seqs, n_boot, 7)))
    assert np.allclose(reps.replicates(), expected, rtol=1e-12)


def test_sweep_stratify_axis_agrees(tmp_path):
    """sweep's stratify axis (pooled and within strata, several kinds and their pools, both scopes, ties, paired
    intervals): sweep.csv, pairs.csv and claim.csv equal to the memory engine's."""
    from reweight_audit.evaluation.config import SweepConfig
    from reweight_audit.evaluation.sweep import run_sweep

    path = write_stats(tmp_path / "stats.parquet", tied(make_stats(12, seed=7)), model="m")
    options = dict(methods=["dft", "entropy", "talr", "rarity"], bootstrap=8, batch_seqs=5, k=[5, 30],
                   stratify=["none", "position", "rarity"], strata=3, scope=["global", "sequence"], rank_by=["loss"],
                   claim="entropy < dft")
    mem, ooc = (run_sweep(path, None, SweepConfig(engine=e, **options)) for e in ("memory", "duckdb"))
    assert ooc.config["engine"] == "duckdb" and set(ooc.table["stratify"]) == {"none", "position", "rarity"}
    assert ooc.table["noise"].nunique() > 2  # all noise and each kind's pool
    for name in ("table", "pairs", "claim"):
        assert_strata_equal(getattr(mem, name), getattr(ooc, name))


def test_bench_compare_passes_stratify_and_compares_strata_csv(tmp_path):
    from reweight_audit.bench import compare as bench_compare

    bench = bench_compare.CompareBench(stratify=("position", "rarity"))
    cmd = {stage: bench_compare.command(stage, tmp_path / "t.parquet", tmp_path / "o", "duckdb", bench)
           for stage in ("compare", "sweep")}
    assert cmd["compare"][cmd["compare"].index("--stratify") + 1] == "position,rarity"
    assert cmd["sweep"][cmd["sweep"].index("--stratify") + 1] == "none,position,rarity"
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, value in ((a, 0.5), (b, 0.25)):
        folder.mkdir()
        pd.DataFrame({"method": ["dft"], "auroc": [value]}).to_csv(folder / "strata.csv", index=False)
    differ = bench_compare.reports_differ(a, b, "compare")
    assert differ["strata.csv"] is not None  # compared where written (the other files: missing here)
    assert "strata.csv" not in bench_compare.reports_differ(tmp_path / "o", tmp_path / "o", "compare")

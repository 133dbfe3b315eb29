"""The out-of-core engine (``--engine duckdb``) against the in-memory one: the same tables on small inputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation.compare import run_compare
from reweight_audit.evaluation.config import CompareConfig
from reweight_audit.evaluation.outofcore import chunks, tables

from tests.helpers import make_stats, write_stats

COUNT_COLUMNS = ("n_tokens", "n_noise", "n_seqs", "n_noise_seqs", "n_kind", "n_pool")
#: Sums both engines take the same way (math.fsum of per-sequence sums): the same bits, however the table is chunked
EXACT_SUMS = ("noise_mass", "noise_mass_ratio")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """A few hundred rows a chunk: every table below is read in several chunks, and its rankings spilled in
    score buckets of about 400 rows (a few per table), sorted bucket by bucket."""
    from reweight_audit.evaluation.outofcore import accumulate

    monkeypatch.setattr(accumulate, "BUCKET_ROWS", 400)
    monkeypatch.setattr(chunks, "CHUNK_ROWS", 300)
    monkeypatch.setattr(chunks, "_READ_ROWS", 128)
    monkeypatch.setattr(tables, "_FETCH_ROWS", 64)  # distinct scores, and runs of ties, span streamed batches


def assert_frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if a[col].dtype.kind in "fiu" and b[col].dtype.kind in "fiu":
            x, y = x.astype(np.float64), y.astype(np.float64)
            if col in COUNT_COLUMNS + EXACT_SUMS:
                assert np.array_equal(x, y, equal_nan=True), col
            else:
                assert np.allclose(x, y, rtol=1e-12, atol=1e-15, equal_nan=True), (col, x - y)
        else:
            assert list(x) == list(y), col


def both(paths, **options):
    results = {}
    for engine in ("memory", "duckdb"):
        results[engine] = run_compare(paths, None, CompareConfig(engine=engine, **options))
    return results["memory"], results["duckdb"]


def assert_same(mem, ooc, engines=("memory", "duckdb")) -> None:
    assert_frames_equal(mem.table, ooc.table)
    assert_frames_equal(mem.curves, ooc.curves)
    assert_frames_equal(mem.by_kind, ooc.by_kind)
    assert mem.skipped == ooc.skipped
    for a, b in zip(mem.runs, ooc.runs):
        assert {k: v for k, v in a.items() if k != "base_rate"} == {k: v for k, v in b.items() if k != "base_rate"}
        assert math.isclose(a["base_rate"], b["base_rate"], rel_tol=1e-12)
    assert (mem.config["engine"], ooc.config["engine"]) == engines


@pytest.mark.slow
def test_every_method_rank_by_and_scope_agree(tmp_path):
    path = write_stats(tmp_path / "a" / "stats.parquet", make_stats(24, seed=3, ref=True), model="m")
    mem, ooc = both(path, rank_by=["weight", "loss", "grad"], scope=["global", "sequence"], bootstrap=10,
                    batch_seqs=7)
    assert_same(mem, ooc)


@pytest.mark.slow
def test_ties_and_two_runs_agree(tmp_path):
    table = make_stats(30, seed=5)
    logp = np.round(table.column("logp").to_numpy(), 1)  # many tied weights
    table = table.set_column(table.schema.get_field_index("logp"), "logp", pa.array(logp.astype(np.float32)))
    a = write_stats(tmp_path / "a" / "stats.parquet", table, model="m1")
    b = write_stats(tmp_path / "b" / "stats.parquet", make_stats(25, seed=6), model="m2")
    mem, ooc = both([a, b], methods=["sft", "dft", "random", "rarity", "talr", "position"], k=7.5,
                    scope=["global", "sequence"], bootstrap=20)
    assert_same(mem, ooc)


def test_no_noise_and_one_sequence_agree(tmp_path):
    clean = make_stats(12, seed=1, noise_rate=0.0)
    one = make_stats(1, seed=2, noise_rate=0.3, clean_frac=0.0)
    for i, table in enumerate((clean, one)):
        path = write_stats(tmp_path / f"t{i}" / "stats.parquet", table)
        mem, ooc = both(path, methods=["dft", "entropy", "mile"], scope=["global", "sequence"], bootstrap=10)
        assert_same(mem, ooc)


def test_duckdb_refuses_what_it_cannot_do(tmp_path):
    table = make_stats(6, seed=1)
    order = np.r_[np.arange(0, table.num_rows, 2), np.arange(1, table.num_rows, 2)]  # sequences interleaved
    path = write_stats(tmp_path / "s.parquet", table.take(pa.array(order)))
    with pytest.raises(AuditError, match="not contiguous"):
        run_compare(path, None, CompareConfig(engine="duckdb"))


@pytest.mark.slow
def test_written_reports_agree_and_say_the_engine(tmp_path):
    from reweight_audit.reporting.exports import write_exports

    path = write_stats(tmp_path / "stats.parquet", make_stats(15, seed=4), model="m")
    for engine in ("memory", "duckdb"):
        run_compare(path, tmp_path / engine, CompareConfig(engine=engine, methods=["dft", "talr"], bootstrap=10),
                    writer=write_exports)
    for name in ("table.csv", "curves.csv", "by_kind.csv"):
        assert_frames_equal(pd.read_csv(tmp_path / "memory" / name), pd.read_csv(tmp_path / "duckdb" / name))
    import json

    summaries = {e: json.loads((tmp_path / e / "summary.json").read_text()) for e in ("memory", "duckdb")}
    assert summaries["duckdb"]["config"]["engine"] == "duckdb"
    for engine in ("memory", "duckdb"):  # the reader sees which engine ran, in table.md and report.html
        assert f"{engine} engine" in (tmp_path / engine / "table.md").read_text()
        assert f"{engine} engine" in (tmp_path / engine / "report.html").read_text()
    assert_frames_equal(pd.DataFrame(summaries["memory"]["table"]), pd.DataFrame(summaries["duckdb"]["table"]))


def test_auto_picks_by_size(tmp_path, monkeypatch):
    from reweight_audit.evaluation import compare

    path = write_stats(tmp_path / "stats.parquet", make_stats(5, seed=4))
    assert compare.choose_engine(CompareConfig(), [path]) == "memory"
    monkeypatch.setattr(compare, "available_memory", lambda: 1000)
    assert compare.choose_engine(CompareConfig(), [path]) == "duckdb"
    assert compare.choose_engine(CompareConfig(engine="memory"), [path]) == "memory"
    assert compare.choose_engine(CompareConfig(stratify=["position"]), [path]) == "duckdb"  # both compute strata


def test_duckdb_memory_limit_is_set(tmp_path):
    with tables.connect(tmp_path) as con:
        limit = con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]
        temp = con.sql("SELECT current_setting('temp_directory')").fetchall()[0][0]
    # DuckDB reports the limit in its own units (256MB is shown as 244.1 MiB)
    assert limit.replace(" ", "").upper() in ("244.1MIB", "256.0MB", "256MB"), limit
    assert temp.startswith(str(tmp_path))


def sweep_both(paths, **options):
    from reweight_audit.evaluation.config import SweepConfig
    from reweight_audit.evaluation.sweep import run_sweep

    return [run_sweep(paths, None, SweepConfig(engine=e, **options)) for e in ("memory", "duckdb")]


@pytest.mark.slow
def test_sweep_engines_agree(tmp_path):
    a = write_stats(tmp_path / "a" / "stats.parquet", make_stats(30, seed=7), model="m1")
    table = make_stats(20, seed=8).drop_columns(["sum_p2"])  # no grad settings for this run
    b = write_stats(tmp_path / "b" / "stats.parquet", table, model="m2")
    mem, ooc = sweep_both([a, b], methods=["dft", "entropy", "talr", "random"], bootstrap=25, batch_seqs=6,
                          claim="entropy < dft")
    assert_frames_equal(mem.table, ooc.table)
    assert_frames_equal(mem.pairs, ooc.pairs)
    assert_frames_equal(mem.claim, ooc.claim)
    assert mem.runs == ooc.runs and mem.notes == ooc.notes and mem.skipped == ooc.skipped
    assert ooc.config["engine"] == "duckdb"


def test_sweep_one_kind_agrees(tmp_path):
    table = make_stats(15, seed=9)
    kinds = pa.array(["typo" if n else "" for n in table.column("is_noise").to_pylist()])
    table = table.set_column(table.schema.get_field_index("noise_kind"), "noise_kind", kinds)
    path = write_stats(tmp_path / "stats.parquet", table)
    mem, ooc = sweep_both(path, methods=["dft", "mile"], bootstrap=10, k=[5, 30], rank_by=["loss"])
    assert_frames_equal(mem.table, ooc.table)
    assert_frames_equal(mem.pairs, ooc.pairs)


@pytest.mark.slow
def test_map_step_on_ray_gives_the_same_table(tmp_path, monkeypatch):
    """Shards of whole sequences as Ray tasks (a local Ray, one CPU), their aggregates added: the same tables."""
    ray = pytest.importorskip("ray")
    from reweight_audit.evaluation.outofcore import distributed

    monkeypatch.setattr(distributed, "SHARD_ROWS", 400)  # several shards, each read in several chunks
    path = write_stats(tmp_path / "stats.parquet", make_stats(30, seed=11), model="m")
    options = dict(methods=["dft", "random", "rarity", "talr"], scope=["global", "sequence"], bootstrap=10,
                   batch_seqs=8, stratify=["position", "rarity"], strata=5)  # strata from the shards' spills too
    single = run_compare(path, None, CompareConfig(engine="duckdb", **options))
    from reweight_audit.evaluation.config import SweepConfig
    from reweight_audit.evaluation.sweep import run_sweep

    sweep_options = dict(methods=["dft", "random", "talr"], bootstrap=10, batch_seqs=8, k=[5, 20])
    swept = run_sweep(path, None, SweepConfig(engine="duckdb", **sweep_options))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        mapped = run_compare(path, None, CompareConfig(engine="duckdb", ray="auto", **options))
        swept_on_ray = run_sweep(path, None, SweepConfig(engine="duckdb", ray="auto", **sweep_options))
    finally:
        ray.shutdown()
    assert_same(single, mapped, ("duckdb", "duckdb"))
    assert_frames_equal(single.strata, mapped.strata)
    assert mapped.config["ray"] == "auto"
    assert_frames_equal(swept.table, swept_on_ray.table)
    assert_frames_equal(swept.pairs, swept_on_ray.pairs)


class Stop(Exception):
    """Stands for an interruption (Ctrl-C, a killed job) in the middle of the map step."""


def test_interrupted_compare_reuses_finished_shards(tmp_path, monkeypatch):
    """Shards finished before an interruption are read back on the next run (same table, same options), the
    previous report stays as it was, and the result is the uninterrupted one."""
    from reweight_audit.evaluation.outofcore import distributed
    from reweight_audit.reporting.exports import write_exports

    monkeypatch.setattr(distributed, "SHARD_ROWS", 250)
    path = write_stats(tmp_path / "stats.parquet", make_stats(16, seed=12), model="m")
    options = CompareConfig(engine="duckdb", methods=["dft", "random"], scope=["global", "sequence"], bootstrap=10)
    expected = run_compare(path, None, options)
    out = tmp_path / "report"
    real, calls, stop = distributed.map_shard, [], [True]

    def failing(job, scan, index, *args):
        calls.append(index)
        if index == 2 and stop.pop() if stop else False:
            raise Stop
        return real(job, scan, index, *args)

    monkeypatch.setattr(distributed, "map_shard", failing)
    with pytest.raises(Stop):
        run_compare(path, out, options, writer=write_exports)
    assert not out.exists() and calls == [0, 1, 2]
    calls.clear()
    again = run_compare(path, out, options, writer=write_exports)
    assert calls == [2]  # shards 0 and 1 were read back, only the last one computed
    assert_same(expected, again, ("duckdb", "duckdb"))
    assert not (tmp_path / ".report.engine").exists()  # the work folder goes once the run is done


def test_by_meta_groups_agree(tmp_path):
    import json

    table = make_stats(20, seed=13)
    path = write_stats(tmp_path / "s.parquet", table)
    ids = list(dict.fromkeys(table.column("seq_id").to_pylist()))
    with open(tmp_path / "noisy.jsonl", "w", encoding="utf-8") as fh:
        for i, sid in enumerate(ids):
            meta = {"model": "gpt" if i % 3 else "palm"} if i != 5 else {}
            fh.write(json.dumps({"id": sid, "prompt": "", "response": "x", "spans": [], "meta": meta}) + "\n")
    mem, ooc = both(path, methods=["entropy", "talr"], rank_by=["weight", "loss"], scope=["global", "sequence"],
                    bootstrap=10, by_meta="model", records=tmp_path / "noisy.jsonl")
    assert set(ooc.by_group["group"]) == {"gpt", "palm", "(none)"}
    assert_frames_equal(mem.by_group, ooc.by_group)
    assert_same(mem, ooc)


def test_auto_picks_duckdb_for_a_large_sweep(tmp_path, monkeypatch):
    from reweight_audit.evaluation import compare
    from reweight_audit.evaluation.config import SweepConfig

    path = write_stats(tmp_path / "stats.parquet", make_stats(5, seed=4))
    monkeypatch.setattr(compare, "available_memory", lambda: 1000)
    assert compare.choose_engine(SweepConfig(), [path]) == "duckdb"
    assert compare.choose_engine(SweepConfig(stratify=["none", "position"]), [path]) == "duckdb"  # strata on both


def test_auto_weighs_a_sweep_by_what_a_sweep_holds(tmp_path, monkeypatch):
    """A table whose compare fits in half the memory but whose sweep (every rank-by's scores beside the weights)
    does not: auto runs compare in memory and the sweep out of core."""
    from reweight_audit.evaluation import compare
    from reweight_audit.evaluation.config import SweepConfig
    from reweight_audit.evaluation.outofcore.chunks import parquet_rows

    path = write_stats(tmp_path / "stats.parquet", make_stats(5, seed=4))
    tokens = parquet_rows(path)
    per_token = compare.MEMORY_BYTES_PER_TOKEN
    half = tokens * (per_token["compare"] + per_token["sweep"]) // 2  # between the two stages' needs
    monkeypatch.setattr(compare, "available_memory", lambda: 2 * half)
    assert compare.choose_engine(CompareConfig(), [path]) == "memory"
    assert compare.choose_engine(SweepConfig(), [path]) == "duckdb"


def test_sweep_grid_and_target_agree(tmp_path):
    """A method-parameter grid is a setting axis on both engines: every point's tables equal, flips and the
    Table 1 search computed from them equal too."""
    path = write_stats(tmp_path / "stats.parquet", make_stats(15, seed=11), model="m")
    mem, ooc = sweep_both(path, methods=["ranktuner-approx", "entropy", "inv-prob", "focal"], bootstrap=10,
                          k=[10], rank_by=["weight", "loss"], grid=["ranktuner-approx.low_entropy=smooth,trivial",
                                                                   "focal.detach=true,false"], target="table1")
    assert sorted(set(mem.table["params"])) == sorted(set(ooc.table["params"])) and len(set(mem.table["params"])) == 4
    assert_frames_equal(mem.table, ooc.table)
    assert_frames_equal(mem.flips, ooc.flips)
    assert_frames_equal(mem.target.candidates, ooc.target.candidates)


def test_sample_weights_are_the_memory_weights_of_the_first_chunk(tmp_path):
    """The report's sample (weights.parquet, plots) with the duckdb engine: the first chunk, with the same
    weights as the in-memory engine gives those tokens."""
    path = write_stats(tmp_path / "a" / "stats.parquet", make_stats(20, seed=8), model="m")
    mem, ooc = both(path, methods=["sft", "random", "rarity", "position"], bootstrap=0)
    first = ooc.run_data[0]
    assert 300 <= first.n_tokens < mem.run_data[0].n_tokens  # one chunk of whole sequences, not the table
    for name, w in ooc.run_weights[0].items():
        assert np.allclose(w, mem.run_weights[0][name][:first.n_tokens], rtol=1e-12), name


@pytest.mark.parametrize("layout", ["one sort", "buckets", "buckets, some sorted from the files"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_tally_counts_above_and_tied_by_brute_force(tmp_path, monkeypatch, seed, layout):
    """Per sequence, the rows above and tied at each cut's value, taken in the sorted pass (runs of tied scores
    span the streamed batches of 64 rows), against counting them directly: from a spill without score buckets
    (one sort), and from two shards' spills in 7 buckets (whose edges fall on tied scores) sorted bucket by
    bucket in memory, or from the files where a bucket is over BUCKET_SORT_ROWS."""
    import pyarrow.parquet as pq

    from reweight_audit.evaluation.outofcore.accumulate import SPILL_OPTIONS, SPILL_SCHEMA, score_edges, write_bucketed
    from reweight_audit.evaluation.outofcore.histogram import DescendingCounts

    rng = np.random.default_rng(seed)
    n, n_seqs = 1500, 40
    score = np.round(rng.normal(size=n), 1)  # about 60 distinct values: long tied runs
    kind = np.where(rng.random(n) < 0.2, rng.integers(0, 2, n), -1).astype(np.int16)
    seq = rng.integers(0, n_seqs, n).astype(np.int32)
    (tmp_path / "s").mkdir()
    if layout == "one sort":
        pq.write_table(pa.table({"score": score, "kind": kind, "seq": seq}), tmp_path / "s" / "x.parquet")
    else:
        edges = score_edges(score[:300], 7)
        assert 3 <= edges.size <= 6 and np.isin(edges, score).sum() >= 3  # edges on tied values
        for shard, rows in (("a", slice(0, 700)), ("b", slice(700, n))):
            with pq.ParquetWriter(tmp_path / "s" / f"{shard}.parquet", SPILL_SCHEMA, **SPILL_OPTIONS) as writer:
                for lo in range(rows.start, rows.stop, 350):  # chunks of 350 rows
                    hi = min(lo + 350, rows.stop)
                    write_bucketed(writer, {"score": score[lo:hi], "kind": kind[lo:hi], "seq": seq[lo:hi]}, edges)
        layout_found = tables.bucket_layout(sorted(str(p) for p in (tmp_path / "s").glob("*.parquet")))
        assert layout_found is not None and len(layout_found) == edges.size + 1
    if layout == "buckets, some sorted from the files":
        monkeypatch.setattr(tables, "BUCKET_SORT_ROWS", 250)
    ks = (0.0001, 0.01, 0.3, 0.5, 1.0)
    n_kind = np.array([np.sum(kind == 0), np.sum(kind == 1)])
    counts = DescendingCounts(int(np.sum(kind < 0)), n_kind, ks, (0.3,))
    watches = [(f"n{i}", 0, k, [1, 2]) for i, k in enumerate(ks)] + [("all", 0, 0.3, [0, 1, 2]),
                                                                     ("k1", 2, 0.3, [2])]
    tally = tables.SequenceTally(n_seqs, 3, watches)
    with tables.connect(tmp_path) as con:
        tables.value_counts(con, tmp_path / "s" / "*.parquet", counts, 2, tally=tally)
    label = kind + 1
    for name, pool, k, labels in watches:
        v = counts.cut(pool, k).cut.value
        picked = np.isin(label, labels)
        for part, rows in (("above", score > v), ("tied", score == v)):
            assert np.array_equal(tally.out[f"{name}_{part}"], np.bincount(seq[picked & rows], minlength=n_seqs)), \
                (name, part)


def test_per_sequence_sums_are_in_memory_for_one_ranking_at_a_time(tmp_path, monkeypatch):
    """Bounded memory: the map step keeps nothing per sequence (it is written beside the scores), and the reduce
    reads one method × rank-by's per-sequence sums at a time; the tables still equal the memory engine's."""
    from reweight_audit.evaluation.outofcore import accumulate

    loaded, most = set(), [0]
    load, release, add = accumulate.RankingSums.load, accumulate.RankingSums.release, accumulate.RankingSums.add

    def counting_load(self):
        loaded.add(id(self))
        most[0] = max(most[0], len(loaded))
        return load(self)

    def counting_release(self):
        loaded.discard(id(self))
        release(self)

    def checked_add(self, chunk, s, *extra):
        add(self, chunk, s, *extra)
        assert self.w_total is None and self.w_kind is None and self.seq_fields is None  # nothing kept per sequence

    monkeypatch.setattr(accumulate.RankingSums, "load", counting_load)
    monkeypatch.setattr(accumulate.RankingSums, "release", counting_release)
    monkeypatch.setattr(accumulate.RankingSums, "add", checked_add)
    path = write_stats(tmp_path / "stats.parquet", make_stats(20, seed=9), model="m")
    mem, ooc = both(path, methods=["dft", "entropy", "talr", "rarity"], rank_by=["weight", "loss"],
                    scope=["global", "sequence"], bootstrap=10)
    assert_same(mem, ooc)
    assert most[0] == 1 and not loaded


def test_a_duckdb_failure_is_one_line_that_says_what_to_do(tmp_path):
    with pytest.raises(AuditError, match=r"the DuckDB engine failed: .*--engine memory") as info:
        with tables.connect(tmp_path) as con:
            con.execute(f"SELECT * FROM read_parquet('{tmp_path / 'gone.parquet'}')")
    assert "\n" not in str(info.value)


def test_the_reduce_reports_each_ranking_with_an_eta(tmp_path):
    from reweight_audit.evaluation.sweep import run_sweep
    from reweight_audit.evaluation.config import SweepConfig

    path = write_stats(tmp_path / "stats.parquet", make_stats(8, seed=2), model="m")
    said = []
    run_compare(path, None, CompareConfig(engine="duckdb", methods=["dft", "entropy"], bootstrap=0), progress=said.append)
    assert [m for m in said if "done (" in m][-1].endswith("entropy done (2/2, ETA 0 s)")
    said.clear()
    run_sweep(path, None, SweepConfig(engine="duckdb", methods=["dft", "entropy"], rank_by=["weight", "loss"],
                                      bootstrap=0), progress=said.append)
    assert [m for m in said if "done (" in m][-1].endswith("entropy, rank by loss done (4/4, ETA 0 s)")


def test_rankings_are_spilled_in_score_buckets_every_shard_alike(tmp_path, monkeypatch):
    """The spill's layout that the equal tables above rest on: each ranking's row groups hold one score bucket
    each, every shard's with the same boundaries (the first chunk's), the batch-dependent pass's too, and the
    buckets' score ranges do not overlap, so sorting bucket by bucket, highest first, sorts every row."""
    import pyarrow.parquet as pq

    from reweight_audit.evaluation.outofcore import distributed

    monkeypatch.setattr(distributed, "SHARD_ROWS", 250)  # several map shards
    seen = {}
    layout = tables.bucket_layout

    def keep_layout(files):
        found = layout(files)
        ranges = []  # per bucket, highest first: its scores' range, read while the work folder is there
        for bucket in sorted(found or {}, reverse=True):
            scores = np.concatenate([pq.ParquetFile(f).read_row_groups(groups, columns=["score"]).column(0)
                                     .to_numpy() for f, groups, _ in found[bucket]])
            ranges.append((scores.min(), scores.max()))
        seen[Path(files[0]).name] = (len(files), found, ranges)
        return found

    monkeypatch.setattr(tables, "bucket_layout", keep_layout)
    path = write_stats(tmp_path / "a" / "stats.parquet", make_stats(24, seed=3), model="m")
    mem, ooc = both(path, methods=["entropy", "dft", "talr", "random"], bootstrap=5, batch_seqs=5)
    assert_same(mem, ooc)
    assert len(seen) == 4
    for name, (n_files, found, ranges) in seen.items():
        assert found is not None and len(found) >= 2, name
        assert n_files == 1 if name.startswith("2-") else n_files >= 3, name  # talr: the batch pass; else shards
        assert all(lower_max < higher_min for (higher_min, _), (_, lower_max) in zip(ranges, ranges[1:])), \
            (name, ranges)


finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                          st.sampled_from([0.0, -0.0, 1.0, 1.0 + 2 ** -52, 1e-300, -1e300]))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(scores=st.lists(finite_or_not, min_size=1, max_size=60),
       edges=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=0, max_size=12),
       take_edges_from_scores=st.booleans())
def test_bucket_of_is_searchsorted(scores, edges, take_edges_from_scores):
    """The lookup table gives each score np.searchsorted's bucket: ties at an edge, NaN, ±inf, -0.0, edges a
    unit in the last place apart, scores far outside the edges' range."""
    from reweight_audit.evaluation.outofcore.accumulate import bucket_of

    s = np.array(scores, dtype=np.float64)
    e = s[np.isfinite(s)] if take_edges_from_scores else np.array(edges, dtype=np.float64)
    e = np.unique(e)
    assert np.array_equal(bucket_of(s, e), np.searchsorted(e, s, side="right"))


@pytest.mark.parametrize("n_buckets", [2, 7, 67, 256])
def test_bucket_of_on_a_million_skewed_scores(n_buckets):
    from reweight_audit.evaluation.outofcore.accumulate import bucket_of, score_edges

    rng = np.random.default_rng(n_buckets)
    s = np.concatenate([rng.random(500_000) ** 6, np.round(rng.normal(size=500_000), 2)])  # a heap near 0, ties
    e = score_edges(s[:100_000], n_buckets)
    assert np.array_equal(bucket_of(s, e), np.searchsorted(e, s, side="right"))

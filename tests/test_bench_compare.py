"""bench --compare: the seeded synthetic stats table, the report comparison, and the bench itself at tiny sizes."""
from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from reweight_audit import api
from reweight_audit.bench import compare as bench_compare
from reweight_audit.bench import synthetic
from reweight_audit.cli import app
from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import file_sha256, read_manifest
from reweight_audit.evaluation.runs import load_run
from reweight_audit.methods import available_methods


@pytest.fixture()
def small_groups(monkeypatch):
    """Row groups of 5,000 tokens (ten sequences), so a tiny table spans several."""
    monkeypatch.setattr(synthetic, "ROWS_PER_GROUP", 10 * synthetic.SEQ_TOKENS)


def test_the_same_size_and_seed_give_the_same_bytes_and_another_seed_other_bytes(tmp_path, small_groups):
    first = synthetic.write_table(tmp_path / "a.parquet", 12_345, seed=7)
    synthetic.write_table(tmp_path / "b.parquet", 12_345, seed=7)
    synthetic.write_table(tmp_path / "c.parquet", 12_345, seed=8)
    assert file_sha256(tmp_path / "a.parquet") == file_sha256(tmp_path / "b.parquet")
    assert file_sha256(tmp_path / "a.parquet") != file_sha256(tmp_path / "c.parquet")
    assert first["seed"] == 7 and read_manifest(tmp_path / "a.parquet")["seed"] == 7
    assert first["generator_version"] == synthetic.GENERATOR_VERSION


def test_the_table_is_written_in_bounded_row_groups_each_independent_of_the_size(tmp_path, small_groups):
    synthetic.write_table(tmp_path / "t.parquet", 12_345, seed=1)
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [5_000, 5_000, 2_345]
    # a group is drawn from (seed, group) alone: a larger table starts with the same rows (streaming, flat memory)
    larger = synthetic.row_group(30_000, 1, 1)
    assert larger.equals(pq.ParquetFile(tmp_path / "t.parquet").read_row_group(1))


def test_the_table_passes_the_stats_table_checks_with_plausible_statistics(tmp_path, small_groups):
    n = 23_456
    synthetic.write_table(tmp_path / "t.parquet", n, seed=3)
    run = load_run(tmp_path / "t.parquet")  # every check compare makes on a table
    assert run.n_tokens == n
    assert run.table.schema.names == synthetic.schema().names
    assert 0.025 < run.is_noise.mean() < 0.055
    assert set(run.kinds) == set(synthetic.KINDS)
    lengths = np.bincount(run.seq_codes)
    assert (lengths[:-1] == synthetic.SEQ_TOKENS).all() and lengths[-1] == n % synthetic.SEQ_TOKENS
    noise = run.is_noise
    # spans: most noise tokens have a noise neighbour in their sequence
    neighbour = np.zeros_like(noise)
    neighbour[1:] |= noise[:-1]
    neighbour[:-1] |= noise[1:]
    assert (neighbour[noise]).mean() > 0.8
    logp, entropy, rank = run.column("logp"), run.column("entropy"), run.column("rank")
    assert logp[noise].mean() < logp[~noise].mean() - 1 and entropy[noise].mean() > entropy[~noise].mean()
    assert (rank <= np.minimum(np.exp(-logp), synthetic.VOCAB) * (1 + 1e-5) + 1).all()
    massey = np.where(entropy / math.log(2) >= 2, 2.0 ** (entropy / math.log(2) - 2) + 1, 1.0)
    assert (run.column("expected_rank") >= massey * (1 - 1e-6)).all()
    assert (run.column("topk_entropy") <= math.log(20) + 1e-6).all()
    p2 = np.exp(2 * logp)
    sum_p2 = run.column("sum_p2")
    assert ((sum_p2 >= p2 * (1 - 1e-5)) & (sum_p2 <= p2 + (1 - np.exp(logp)) ** 2 + 1e-6)).all()


def test_every_default_method_of_compare_computes_on_the_table(tmp_path):
    synthetic.write_table(tmp_path / "t.parquet", 3_000, seed=0)
    result = api.compare(tmp_path / "t.parquet", bootstrap=0)
    expected = {m.name for m in available_methods() if m.name != "rho1"}  # rho1 needs a reference model's logp
    assert set(result.table["method"]) == expected
    assert [s["method"] for s in result.skipped] == ["rho1"]
    assert bench_compare.method_count(bench_compare.CompareBench()) == len(expected)
    assert np.isfinite(result.table["auroc"].to_numpy(float)).all()


def test_a_cached_table_is_reused_and_a_changed_file_is_generated_again(tmp_path):
    path, manifest, made = synthetic.cached_table(tmp_path, 1_000, 5)
    assert made and path.name == synthetic.file_name(1_000, 5) and "v%d" % synthetic.GENERATOR_VERSION in path.name
    digest = file_sha256(path)
    assert synthetic.cached_table(tmp_path, 1_000, 5)[2] is False
    with path.open("ab") as f:  # a table that no longer matches its manifest
        f.write(b"x")
    again = synthetic.cached_table(tmp_path, 1_000, 5)
    assert again[2] is True and file_sha256(path) == digest


@pytest.mark.parametrize("text, sizes", [("10M,100M", (10_000_000, 100_000_000)), ("20k", (20_000,)),
                                         ("1.5M, 2000, 1.5M", (2_000, 1_500_000)), ("1B", (10**9,))])
def test_token_sizes_are_parsed(text, sizes):
    assert bench_compare.parse_tokens(text) == sizes


@pytest.mark.parametrize("text", ["", "ten", "10X", "0", "-5"])
def test_bad_token_sizes_are_one_line_errors(text):
    with pytest.raises(AuditError, match="--tokens"):
        bench_compare.parse_tokens(text)


def test_the_memory_engine_is_skipped_where_it_would_not_fit_and_a_bench_that_would_not_fit_on_disk_is_refused(
        tmp_path):
    assert bench_compare.skip_reason("memory", 1_000) is None
    assert bench_compare.skip_reason("memory", 10**12).startswith("skipped: needs about 420,000.0 GB (420 B/token)")
    assert bench_compare.skip_reason("memory", 10**12, "sweep").startswith(
        "skipped: needs about 1,100,000.0 GB (1,100 B/token)")
    assert bench_compare.skip_reason("duckdb", 10**12) is None
    huge = bench_compare.CompareBench(tokens=(10**13,), work=tmp_path / "work", engines=("memory",))
    with pytest.raises(AuditError, match="needs about .* GB of disk"):
        bench_compare.run_compare_bench(huge)
    assert not (tmp_path / "work").exists()  # refused before anything was written


@pytest.mark.slow
def test_a_child_is_measured_alone_its_exit_code_kept_and_it_is_stopped_before_the_machine_runs_out(
        tmp_path, monkeypatch):
    held = b"x" * (600 * 2**20)  # the bench holds more than the run: Linux would count it in a child it forked
    grow = "import sys; block = b'x' * (200 * 2**20); sys.exit(3)"
    found = bench_compare.measure_child([sys.executable, "-c", grow], tmp_path / "grow.log")
    del held
    assert found["exit"] == 3 and "stopped" not in found
    assert 200 * 2**20 < found["peak_rss_bytes"] < 300 * 2**20  # this run's peak alone
    monkeypatch.setattr(bench_compare, "GUARD_MIN_AVAILABLE", 1.01)  # never enough left: stop at the first look
    found = bench_compare.measure_child([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "s.log")
    assert found["exit"] == -9 and found["stopped"].startswith("stopped by bench: ")


@pytest.mark.parametrize("args, message", [
    (["--bootstrap", "-1"], "--bootstrap -1: give 0"),
    (["--engines", "memory,spark"], "--engines memory,spark: this compare offers memory, duckdb"),
    (["--methods", "dft,nope"], "--methods: nope not registered"),
    (["--tokens", "0"], "--tokens 0: give a positive token count"),
    (["--stages", "compare,score"], "--stages compare,score: give compare, sweep or both"),
])
def test_bad_bench_compare_options_are_one_line_errors_before_any_work(tmp_path, args, message):
    result = CliRunner().invoke(app, ["bench", "--compare", *args, "--work", str(tmp_path / "w"),
                                      "-o", str(tmp_path / "b.json")])
    assert isinstance(result.exception, AuditError), result.output
    assert message in str(result.exception)
    assert not (tmp_path / "w").exists() and not (tmp_path / "b.json").exists()


def test_the_ratios_and_the_verdict_are_issue_20s_targets_computed_by_hand():
    def row(stage, engine, tokens, seconds, rss_gb, exit=0):
        return {"stage": stage, "engine": engine, "tokens": tokens, "exit": exit, "seconds": seconds,
                "s_per_m_tokens": seconds / (tokens / 1e6), "peak_rss_bytes": int(rss_gb * 1e9)}
    runs = [row("compare", "memory", 10**7, 70.0, 4.4), row("compare", "duckdb", 10**7, 90.0, 1.0),
            {"stage": "compare", "engine": "memory", "tokens": 10**8, "skipped": "skipped: needs about 42.0 GB"},
            row("compare", "duckdb", 10**8, 1400.0, 1.2),
            row("sweep", "memory", 10**7, 100.0, 4.0), row("sweep", "duckdb", 10**7, 100.0, 1.0),
            row("sweep", "duckdb", 10**8, 1000.0, 3.5, exit=1)]
    found = bench_compare.ratios(runs, (10**7, 10**8))
    assert found == pytest.approx({"compare/duckdb_peak_rss_gb_at_largest": 1.2,
                                   "compare/duckdb_peak_rss_largest_over_smallest": 1.2,
                                   "compare/duckdb_s_per_m_largest_over_memory_s_per_m_smallest": 14.0 / 7.0})
    checks = bench_compare.verdict(runs, found, {10**7: {"compare/table.csv": None, "compare/summary.json": "x"}})
    assert checks == {"every run completed": False,  # the sweep at 100M failed; the skipped run does not count
                      "compare: duckdb peak RSS at the largest size, GB <= 3": True,
                      "compare: duckdb peak RSS, largest size / smallest <= 1.3": True,
                      "compare: duckdb s/M tokens at the largest size / memory s/M tokens at the smallest <= 1.5":
                          False,
                      "engines' reports equal at 10M tokens": False}


def _report(tmp_path):
    synthetic.write_table(tmp_path / "t.parquet", 4_000, seed=2)
    api.compare(tmp_path / "t.parquet", methods=["dft", "entropy"], bootstrap=5, output=tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    return tmp_path / "a", tmp_path / "b"


@pytest.mark.slow
def test_reports_compare_equal_to_themselves_and_every_real_difference_is_found(tmp_path):
    a, b = _report(tmp_path)
    assert bench_compare.reports_differ(a, b) == dict.fromkeys(bench_compare.COMPARED["compare"])
    table = (b / "table.csv").read_text().splitlines()
    header = table[0].split(",")
    row = table[1].split(",")
    auroc = header.index("auroc")
    row[auroc] = repr(float(row[auroc]) * (1 + 1e-14))  # within 1e-12 relative: equal
    (b / "table.csv").write_text("\n".join([table[0], ",".join(row), *table[2:]]) + "\n")
    assert bench_compare.reports_differ(a, b)["table.csv"] is None
    row[auroc] = repr(float(row[auroc]) * (1 + 1e-9))
    (b / "table.csv").write_text("\n".join([table[0], ",".join(row), *table[2:]]) + "\n")
    assert "column auroc, row 1" in bench_compare.reports_differ(a, b)["table.csv"]
    summary = json.loads((a / "summary.json").read_text())
    summary["engine"] = "duckdb"  # how it ran: left out
    summary["runs"][0]["path"] = "/elsewhere/t.parquet"
    (b / "summary.json").write_text(json.dumps(summary))
    assert bench_compare.reports_differ(a, b)["summary.json"] is None
    summary["runs"][0]["n_noise"] += 1  # a count: exactly
    (b / "summary.json").write_text(json.dumps(summary))
    assert "/runs[0]/n_noise" in bench_compare.reports_differ(a, b)["summary.json"]
    (b / "by_kind.csv").unlink()
    assert bench_compare.reports_differ(a, b)["by_kind.csv"].startswith("missing")


@pytest.mark.slow
def test_bench_compare_runs_every_engine_in_fresh_processes_and_reports_equality(tmp_path):
    engines = bench_compare.engines_available()
    out, work = tmp_path / "bench.json", tmp_path / "work"
    stale = work / "runs" / ".compare-5000-duckdb.engine" / "0123456789abcdef"  # an interrupted run's shards
    stale.mkdir(parents=True)
    result = CliRunner().invoke(app, ["bench", "--compare", "--tokens", "5k", "--methods", "dft,entropy",
                                      "--bootstrap", "5", "--work", str(work), "-o", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    runs = figures["runs"]
    assert [(r["stage"], r["engine"]) for r in runs] == [(s, e) for s in ("compare", "sweep") for e in engines]
    for run in runs:
        assert run["exit"] == 0 and run["tokens"] == 5_000 and run["peak_rss_bytes"] > 10**7 and run["seconds"] > 0
        assert f"{run['stage']:7s}    5k tokens  {run['engine']}" in result.output
        assert not (work / "runs" / f"compare-5000-{run['engine']}" / "weights.parquet").exists()
    assert figures["tables"]["5000"]["seed"] == 0 and figures["tables"]["5000"]["generated_now"]
    assert figures["verdict"]["every run completed"]
    assert not stale.exists()  # measured from no finished shard
    assert engines == ("memory", "duckdb")
    assert [r["engine_reported"] for r in runs] == [r["engine"] for r in runs]  # each report says which ran
    assert figures["equal"]["5000"] == {f"{stage}/{name}": None for stage, names in
                                        bench_compare.COMPARED.items() for name in names}
    assert "equal      5k tokens  compare: yes" in result.output and "equal      5k tokens  sweep: yes" in result.output
    assert figures["verdict"]["engines' reports equal at 5k tokens"]

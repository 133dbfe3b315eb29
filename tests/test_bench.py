"""bench: option validation, memory-estimate skips, the competing load and --stats-only, on tiny models."""
from __future__ import annotations

import psutil
import pytest
from typer.testing import CliRunner

from reweight_audit import bench
from reweight_audit.cli import app
from reweight_audit.core.errors import AuditError


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq-len", "0"], "--seq-len 0: must be at least 2"),
        (["--vocab", "0"], "--vocab 0: must be at least 2"),
        (["--vocab", "-3"], "--vocab -3: must be at least 2"),
        (["--batch-tokens", "0"], "--batch-tokens 0: must be at least 1"),
        (["--chunk-rows", "-1"], "--chunk-rows -1: must be at least 1"),
        (["--repeats", "0"], "--repeats 0: must be at least 1"),
    ],
)
def test_sizes_of_zero_or_less_are_errors_not_defaults(tmp_path, args, message):
    result = CliRunner().invoke(app, ["bench", *args, "-o", str(tmp_path / "b.json")])
    assert isinstance(result.exception, AuditError), result.output
    assert message in str(result.exception)
    assert not (tmp_path / "b.json").exists()


def test_a_variant_that_does_not_fit_is_skipped_with_the_reason(monkeypatch):
    case = bench.synthetic_case(1000, 128, "cpu", 8)
    need = {name: bench.estimate_bytes(case, name) for name in ("forward", "naive", "ours")}
    assert need["ours"] < need["forward"] < need["naive"]
    # pretend there is only memory for ours
    monkeypatch.setattr(bench, "available_bytes", lambda device: int(need["ours"] / 0.85) + 1)
    result = bench.run_case(case, repeats=1)
    assert set(result["results"]) == {"ours"}
    assert set(result["skipped"]) == {"forward", "naive"}
    assert result["skipped"]["naive"].startswith("skipped: needs about ")
    assert "GiB available" in result["skipped"]["naive"]
    assert result["ratios"] == {} and result["agreement"] is None


def test_naive_estimate_grows_with_sequence_length_and_ours_does_not():
    short, long = bench.synthetic_case(5000, 64, "cpu", 16), bench.synthetic_case(5000, 256, "cpu", 16)
    assert bench.estimate_bytes(long, "naive") > 3 * bench.estimate_bytes(short, "naive")
    # ours holds one head chunk of logits: only the (small) activations grow
    logits_chunk = 6 * 16 * 5000 * 4
    assert bench.estimate_bytes(long, "ours") - bench.estimate_bytes(short, "ours") < logits_chunk


def test_competing_load_starts_and_stops_its_processes():
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    with bench.competing_load(2) as info:
        started = [p for p in me.children() if p.pid not in before]
        assert len(started) == 2 and info["competing_processes"] == 2
        assert all(p.status() != psutil.STATUS_ZOMBIE for p in started)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started)


def test_stats_only_reports_ns_per_logit_and_ratios():
    case = bench.synthetic_case(3000, 48, "cpu", 40)
    result = bench.run_stats_only(case, repeats=1)
    part = result["stats_only"]
    assert part["rows"] == 40 and part["vocab"] == 3000  # one head chunk of the real logits
    assert set(part["ns_per_logit"]) == {"ours", "log_softmax", "sort_expected_rank"}
    assert all(value > 0 for value in part["ns_per_logit"].values())
    ns = part["ns_per_logit"]
    assert result["ratios"]["ours_over_log_softmax"] == pytest.approx(ns["ours"] / ns["log_softmax"])
    assert result["ratios"]["sort_over_ours"] == pytest.approx(ns["sort_expected_rank"] / ns["ours"])
    assert result["contended"] is None and len(result["loadavg_at_start"]) == 3


@pytest.mark.slow
def test_contended_run_records_its_competitors(monkeypatch):
    monkeypatch.setattr(bench, "cores", lambda: 1)
    case = bench.synthetic_case(1000, 32, "cpu", 16)
    result = bench.run_case(case, repeats=1, variants=("ours",), contended=True)
    assert result["contended"]["competing_processes"] == 1
    assert result["results"]["ours"]["tokens_per_s"] > 0

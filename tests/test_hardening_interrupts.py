"""Issue 12, cases 1, 3 and 13: a compare killed (SIGKILL) or interrupted (SIGINT) in the middle of writing leaves
the earlier report intact; an interrupted score keeps its shards and says how to resume.

The child pauses at a known point of its write (the tables written into the temporary folder, the plots not yet),
so the signal always lands mid-write; the polling limit below only bounds a broken run.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import make_stats, write_noisy
from reweight_audit.demo import DemoConfig
from reweight_audit.evaluation.compare import run_compare
from reweight_audit.evaluation.config import CompareConfig
from reweight_audit.core.io import lock_path
from reweight_audit.scoring.config import ScoreConfig
from reweight_audit.scoring.engine import run_score
from reweight_audit.reporting.exports import write_exports

PAUSE = """
import pathlib, sys, time
flag = pathlib.Path(sys.argv[1])
import importlib
module = importlib.import_module("reweight_audit.{module}")
original = module.{function}

def paused(*args, **kwargs):
    original(*args, **kwargs)
    flag.write_text("paused")
    time.sleep(600)

module.{function} = paused
sys.argv = ["reweight-audit", *sys.argv[2:]]
from reweight_audit.cli import main
main()
"""


def paused_cli(flag: Path, module: str, function: str, *args) -> subprocess.Popen:
    """``reweight-audit ARGS`` in a child that stops for good right after ``module.function`` returned."""
    code = PAUSE.format(module=module, function=function)
    return subprocess.Popen([sys.executable, "-c", code, str(flag), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until_paused(child: subprocess.Popen, flag: Path) -> None:
    deadline = time.monotonic() + 300
    while not flag.exists():
        if child.poll() is not None:
            pytest.fail(f"the child ended before pausing: {child.communicate()}")
        assert time.monotonic() < deadline, "the child never reached its pause"
        time.sleep(0.02)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture()
def stats(tmp_path) -> Path:
    path = tmp_path / "stats.parquet"
    pq.write_table(make_stats(40), path)
    return path


COMPARE = ("compare", "{stats}", "-o", "{out}", "--methods", "sft,dft,entropy", "--bootstrap", "0", "-q")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
@pytest.mark.slow
def test_compare_stopped_mid_write_leaves_the_earlier_report_intact(tmp_path, stats, sig):
    out = tmp_path / "report"
    run_compare([stats], out, CompareConfig(methods=["sft", "dft"], bootstrap=0), writer=write_exports)
    before = files(out)
    flag = tmp_path / "flag"
    child = paused_cli(flag, "reporting.exports", "write_tables", *[a.format(stats=stats, out=out) for a in COMPARE])
    wait_until_paused(child, flag)
    temporary = tmp_path / f".report.{child.pid}.tmp"
    # table.csv, curves.csv, by_kind.csv, table.md and the Table 1 view (table1.csv, table1.md): mid-write
    assert len(list(temporary.iterdir())) == 6
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    assert files(out) == before
    if sig == signal.SIGINT:
        assert child.returncode == 130
        assert err.strip() == f"interrupted: {out} is unchanged (an earlier report stays whole); run the command again"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["flag", "report", "stats.parquet"]
    else:  # nothing runs after SIGKILL: the next compare finds the dead run's lock and temporary folder
        assert temporary.exists() and lock_path(out).exists()
        run_compare([stats], out, CompareConfig(methods=["sft", "dft", "entropy"], bootstrap=0), writer=write_exports)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["flag", "report", "stats.parquet"]
        assert "entropy" in (out / "table.csv").read_text()


@pytest.mark.slow
def test_compare_interrupted_into_a_new_folder_leaves_no_folder(tmp_path, stats):
    out = tmp_path / "new-report"
    flag = tmp_path / "flag"
    child = paused_cli(flag, "reporting.exports", "write_tables", *[a.format(stats=stats, out=out) for a in COMPARE])
    wait_until_paused(child, flag)
    child.send_signal(signal.SIGINT)
    child.communicate(timeout=120)
    assert child.returncode == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flag", "stats.parquet"]


@pytest.mark.slow
def test_score_interrupted_keeps_its_shards_says_so_and_resumes(tmp_path, tiny_model, noisy_rows):
    rows = [dict(r, id=f"{r['id']}-{i}") for i in range(3) for r in noisy_rows]
    noisy = write_noisy(tmp_path / "noisy.jsonl", rows)
    out = tmp_path / "stats.parquet"
    flag = tmp_path / "flag"
    args = ("score", noisy, "-o", out, "--model", tiny_model, "--device", "cpu", "--batch-tokens", "40", "-q")
    child = paused_cli(flag, "scoring.engine", "_score_shard", *args)
    wait_until_paused(child, flag)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130
    assert err.strip() == (f"interrupted: finished batches (if any) are kept in {out}.shards; run the same command "
                           "with --resume to continue")
    shards = tmp_path / "stats.parquet.shards"
    assert sorted(p.name for p in shards.iterdir()) == ["batch-000000.parquet", "state.json"]
    assert not lock_path(out).exists() and not out.exists()
    result = run_score(noisy, out, ScoreConfig(model=str(tiny_model), device="cpu", batch_tokens=40), resume=True)
    assert result.manifest["counts"]["batches_resumed_rank0"] == 1
    assert pq.read_table(out).num_rows == result.manifest["counts"]["rows_written"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flag", "noisy.jsonl", "stats.parquet",
                                                          "stats.parquet.manifest.json"]


@pytest.mark.slow
def test_an_interrupted_demo_leaves_the_previous_folder_and_the_next_one_resumes(tmp_path, tiny_model):
    from contextlib import nullcontext

    from reweight_audit.demo import DemoHooks, run_demo

    class StopAfterOneBatch(DemoHooks):
        def stage(self, step, title):
            def stop(*progress):
                raise KeyboardInterrupt

            return nullcontext(stop if step == "score" else None)

    out = tmp_path / "demo"
    out.mkdir()
    (out / "table.md").write_text("earlier report")
    (out / "mine.txt").write_text("kept beside the results")
    with pytest.raises(KeyboardInterrupt):
        run_demo(out, DemoConfig(limit=2, model=str(tiny_model), device="cpu"), hooks=StopAfterOneBatch())
    assert files(out) == {"mine.txt": b"kept beside the results", "table.md": b"earlier report"}
    work = tmp_path / ".demo.partial"
    assert (work / "noisy.jsonl").exists() and list((work / "stats.parquet.shards").glob("batch-*.parquet"))
    result = run_demo(out, DemoConfig(limit=2, model=str(tiny_model), device="cpu"))
    assert result.scored.manifest["counts"]["batches_resumed_rank0"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # the work folder went in whole
    assert (out / "mine.txt").exists() and (out / "table.md").read_text() != "earlier report"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["stats_paths"] == [str(out / "stats.parquet")]  # where the files are now
    assert summary["runs"][0]["manifest"]["input"] == str(out / "noisy.jsonl")
    assert json.loads((out / "stats.parquet.manifest.json").read_text())["input"] == str(out / "noisy.jsonl")
    assert f"`{out / 'stats.parquet'}`" in (out / "table.md").read_text() and ".partial" not in summary.__repr__()
    assert result.compared.files["table.md"] == out / "table.md" and result.stats == out / "stats.parquet"

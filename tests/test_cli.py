"""The command line: one-line errors with exit code 2, and each command end to end on tiny inputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from reweight_audit.cli import app

runner = CliRunner()


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess, so error handling is what a user sees."""
    return subprocess.run([sys.executable, "-m", "reweight_audit", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("inject", "score", "compare", "methods", "bench", "demo"):
        assert command in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["inject", "missing.jsonl", "-o", "out.jsonl"], "missing.jsonl: no such file"),
        (["inject", "champ", "-o", "out.jsonl", "--noise", "nope"], "unknown noise kind 'nope'"),
        (["inject", "champ", "-o", "out.jsonl", "--rate", "1.5"], "--rate"),
        (["score", "missing.jsonl", "-o", "s.parquet"], "missing.jsonl: no such file"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tmp_path, args, message):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_inject_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"id": "1", "prompt": "p", "response": "a b c d e"}) + "\n")
    result = run_cli("inject", str(src), "-o", str(src))
    assert result.returncode == 2 and "overwrite the input" in result.stderr


def test_inject_writes_champ_with_valid_spans(tmp_path):
    out = tmp_path / "sub" / "noisy.jsonl"
    result = runner.invoke(app, ["inject", "champ", "-o", str(out), "--seed", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 270
    assert all(r["response"][s["start"]:s["end"]] == s["text"] for r in rows for s in r["spans"])
    manifest = json.loads((tmp_path / "sub" / "noisy.jsonl.manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["records"] == 270


def test_methods_lists_the_registry():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("ranktuner", "dft", "talr", "eaft", "rho1"):
        assert name in result.output


def test_score_command_on_a_tiny_model(tmp_path, tiny_model, noisy_rows):
    from helpers import write_noisy

    src = write_noisy(tmp_path / "noisy.jsonl", noisy_rows)
    out = tmp_path / "stats.parquet"
    result = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert out.exists() and (tmp_path / "stats.parquet.manifest.json").exists()


def test_bench_on_a_tiny_model_agrees_with_the_naive_implementation(tmp_path):
    from reweight_audit.bench import run_bench

    result = run_bench(vocab=3000, seq_len=96, device="cpu", repeats=1, chunk_rows=32)
    assert set(result["results"]) == {"forward", "naive", "ours"}
    assert result["agreement"]["rank_equal"]
    assert result["agreement"]["expected_rank_max_rel_err"] < 1e-6
    assert result["agreement"]["logp_max_abs_err"] < 1e-4
    assert result["supervised_tokens"] == 95


@pytest.mark.slow
def test_demo_runs_inject_score_compare_into_one_folder(tmp_path, tiny_model):
    from reweight_audit.reporting.exports import EXPORT_FILES

    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "-o", str(out), "--limit", "3", "--model", str(tiny_model), "--device", "cpu",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    rules = [line.strip("─ ") for line in result.output.splitlines() if line.startswith("─")]
    assert [rule[:3] for rule in rules] == ["1/6", "2/6", "3/6", "4/6", "5/6", "6/6"]
    assert "wrote" in result.output and "demo done" in result.output
    assert result.output.count(" took ") == 6 and "1/6 inject" in result.output  # each stage's time, then the total
    assert result.output.rstrip().splitlines()[-1] == f"report: {out / 'report.html'}"
    assert json.loads((out / "noisy.jsonl.manifest.json").read_text())["records"] == 3
    assert json.loads((out / "stats.parquet.manifest.json").read_text())["stage"] == "score"
    for name in EXPORT_FILES:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["scope"] == ["global", "sequence"] and summary["config"]["n_boot"] == 200
    assert not (out / "stats.parquet.shards").exists()
    real = out / "real-errors"  # the real-error part: the first 3 champ-fws solutions (--limit), by model too
    assert json.loads((real / "fws.jsonl.manifest.json").read_text())["records"] == 3
    assert (real / "table1.md").is_file() and (real / "by_group.csv").is_file()
    assert "wrong-step is real errors" in (real / "table.md").read_text()


def test_train_help_names_the_train_extra():
    """Help texts are plain text: the extra's name in brackets is not eaten as rich markup."""
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "pip install 'reweight-audit[train]'" in " ".join(result.output.split())

"""Issue 12's probe cases against the command line: one ``error:`` line (exit 2) before any work, nothing
half-written; Ctrl-C is one line and exit 130. In-process through ``cli.main`` (what a user runs) where no
second process is needed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_noisy
from reweight_audit import cli


@pytest.fixture()
def main(capsys, monkeypatch):
    """``reweight-audit ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setenv("TQDM_DISABLE", os.environ.get("TQDM_DISABLE", "0"))  # -q sets it; undone afterwards
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main's SIGTERM handler stays out of pytest

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["reweight-audit", *map(str, args)])
        with pytest.raises(SystemExit) as ended:
            cli.main()
        captured = capsys.readouterr()
        return ended.value.code, captured.out, captured.err

    return run


def one_error_line(result: tuple[int, str, str]) -> str:
    code, _out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result
    return lines[0]


@pytest.fixture()
def noisy(tmp_path, noisy_rows) -> Path:
    return write_noisy(tmp_path / "noisy.jsonl", noisy_rows)


def score_args(noisy: Path, out: Path, *extra) -> tuple:
    # a model path that does not exist: every check below must fire before the model would be resolved
    return ("score", noisy, "-o", out, "--model", noisy.parent / "no-model-here", "--device", "cpu", "-q", *extra)


# --------------------------------------------------------------------------- options and paths


@pytest.mark.parametrize("case, args, needle", [
    ("7 bench --seq-len 0", ("bench", "--seq-len", "0", "--vocab", "300"), "--seq-len 0: must be at least 2"),
    ("7 bench --vocab 0", ("bench", "--vocab", "0", "--seq-len", "16"), "--vocab 0: must be at least 2"),
    ("7 bench --vocab -3", ("bench", "--vocab", "-3"), "--vocab -3: must be at least 2"),
    ("7 bench --chunk-rows 0", ("bench", "--chunk-rows", "0"), "--chunk-rows 0"),
    ("15 compare --bootstrap -1", ("compare", "{stats}", "--bootstrap", "-1"), "--bootstrap -1: give 0"),
])
def test_zero_and_negative_counts_are_errors_not_defaults(main, tmp_path, case, args, needle):
    stats = tmp_path / "stats.parquet"
    stats.write_text("never read")
    out = tmp_path / "out"
    line = one_error_line(main(*[a.format(stats=stats) for a in args], "-o", out))
    assert needle in line and "--n-boot" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.parquet"]  # no output, no temporary, no lock


@pytest.mark.parametrize("value", ["0", "-5"])
def test_score_chunk_rows_below_one_is_refused_before_anything_loads(main, tmp_path, noisy, value):
    line = one_error_line(main(*score_args(noisy, tmp_path / "s.parquet", "--chunk-rows", value)))
    assert f"--chunk-rows {value}: give a positive number of rows" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noisy.jsonl"]  # no .shards folder (case 8)


@pytest.mark.parametrize("command", ["score", "bench", "compare-into-a-file"])
def test_outputs_that_are_directories_are_refused_up_front(main, tmp_path, noisy, command):
    folder = tmp_path / "adir"
    folder.mkdir()
    args = {"score": score_args(noisy, folder),
            "bench": ("bench", "--vocab", "300", "--seq-len", "16", "--repeats", "1", "--device", "cpu", "-o", folder),
            "compare-into-a-file": ("compare", tmp_path / "stats.parquet", "-o", noisy)}[command]
    line = one_error_line(main(*args))
    assert ("is a directory" if command != "compare-into-a-file" else "is not a folder") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "noisy.jsonl"] and not list(folder.iterdir())


@pytest.mark.parametrize("name", ["n" * 238 + ".jsonl", "n" * 254 + ".jsonl", "/".join(["d" * 200] * 22) + "/x.jsonl"])
def test_long_output_names_are_one_line(main, tmp_path, noisy, name):
    line = one_error_line(main("inject", noisy, "-o", tmp_path / name, "-q"))
    assert "bytes" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noisy.jsonl"]


def test_a_read_only_report_folder_is_one_line(main, tmp_path, monkeypatch):
    report = tmp_path / "report"
    report.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and not (str(path) == str(report) and mode & os.W_OK))
    line = one_error_line(main("compare", tmp_path / "stats.parquet", "-o", report, "-q"))
    assert "report: the folder is not writable" in line


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("text, needle", [
    ("", "no records (the input is empty or blank)"),
    ("\n\n   \n", "no records (the input is empty or blank)"),
    ("".join(json.dumps({"id": str(i), "prompt": "p", "response": "  "}) + "\n" for i in range(3)),
     "no record has a non-empty response (3 empty, 0 malformed lines skipped)"),
])
def test_inject_without_a_single_record_is_an_error(main, tmp_path, text, needle):
    src = tmp_path / "in.jsonl"
    src.write_text(text)
    line = one_error_line(main("inject", src, "-o", tmp_path / "out.jsonl", "-q"))
    assert line == f"error: {src}: {needle}; " + ("check --response-field" if "response" in needle
                                                   else "give a corpus with records")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_an_absent_id_field_is_an_error_not_hash_ids(main, tmp_path, noisy):
    line = one_error_line(main("inject", noisy, "-o", tmp_path / "out.jsonl", "--id-field", "ident", "-q"))
    assert f"{noisy}:1: id field 'ident' is missing (fields present: id, prompt, response" in line
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("suffix, content", [(".parquet", b"PAR1\x00\x01binary"), (".csv", b"id,prompt,response\n"),
                                             (".jsonl", b"PAR1 but named jsonl"), (".jsonl", b"id,prompt\n1,x\n")])
def test_score_on_a_file_that_is_not_injects_output_says_what_score_reads(main, tmp_path, suffix, content):
    src = tmp_path / f"data{suffix}"
    src.write_bytes(content)
    line = one_error_line(main(*score_args(src, tmp_path / "s.parquet")))
    assert "score reads the JSONL written by 'reweight-audit inject'; run inject on this file first" in line


def test_duplicate_ids_are_refused_by_score_before_any_model_loads(main, tmp_path, noisy):
    doubled = tmp_path / "doubled.jsonl"
    doubled.write_text(noisy.read_text() * 2)  # `cat a.jsonl a.jsonl`
    line = one_error_line(main(*score_args(doubled, tmp_path / "s.parquet")))
    assert "4 record(s) repeat an id, first 's0' (lines 1 and 5), 's1' (lines 2 and 6), 's2' (lines 3 and 7)" in line


# --------------------------------------------------------------------------- a second writer (case 3)


def test_a_second_score_is_refused_at_once_while_the_first_holds_the_output(main, tmp_path, noisy):
    out = tmp_path / "s.parquet"
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom reweight_audit.core.io import acquire_lock\n"
                               "lock = acquire_lock(sys.argv[1])\nprint('held', flush=True)\nsys.stdin.read()",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(main(*score_args(noisy, out)))
        assert f"another run is writing it (pid {holder.pid} on host" in line and "--resume" not in line
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (tmp_path / "s.parquet.shards").exists()


# --------------------------------------------------------------------------- Ctrl-C, one mechanism (case 13)


@pytest.mark.parametrize("command, args, says", [
    ("inject", ("inject", "{noisy}", "-o", "{out}"),
     "{out} was not written (an earlier version is unchanged); run the command again"),
    ("score", ("score", "{noisy}", "-o", "{out}"),
     "finished batches (if any) are kept in {out}.shards; run the same command with --resume to continue"),
    ("compare", ("compare", "{noisy}", "-o", "{out}"),
     "{out} is unchanged (an earlier report stays whole); run the command again"),
    ("demo", ("demo", "-o", "{out}"),
     "{out} is unchanged; finished stages are kept in {work} and the next demo continues from them"),
])
def test_every_command_says_what_an_interrupt_kept_and_exits_130(main, tmp_path, noisy, monkeypatch, command, args,
                                                                  says):
    import importlib

    # reweight_audit.evaluation.compare/inject as attributes are the API's functions; the modules are imported by full name
    compare, inject = (importlib.import_module(f"reweight_audit.{name}") for name in ("evaluation.compare", "injection.run"))
    from reweight_audit import demo
    from reweight_audit.scoring import engine as scoring

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    target = {"inject": (inject, "run_inject"), "score": (scoring, "run_score"), "compare": (compare, "run_compare"),
              "demo": (demo, "run_demo")}[command]
    monkeypatch.setattr(*target, interrupted)
    out = tmp_path / "out"
    fill = {"noisy": noisy, "out": out, "work": tmp_path / ".out.partial"}
    code, _, err = main(*[a.format(**fill) for a in args], "-q")
    assert code == 130 and err.strip() == f"interrupted: {says.format(**fill)}"

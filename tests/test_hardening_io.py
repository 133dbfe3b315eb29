"""Issue 12, the io classes: results swapped in whole, one writer per output, output paths checked first."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from reweight_audit.core import io
from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import acquire_lock, atomic_directory, lock_path, output_lock, prepare_output_dir, \
    prepare_output_file, work_folder


class Boom(Exception):
    pass


def contents(folder) -> dict:
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- a folder of results (case 1)


def test_a_report_folder_is_exchanged_whole_and_keeps_what_it_did_not_write(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "table.csv").write_text("old")
    (out / "summary.json").write_text("old")
    (out / "notes.txt").write_text("mine")  # not the run's: carried over
    (out / "extra").mkdir()
    (out / "extra" / "x.txt").write_text("kept")
    inode_before = os.stat(out).st_ino
    with atomic_directory(out) as work:
        (work / "table.csv").write_text("new")
        (work / "summary.json").write_text("new")
        assert contents(out) == {"notes.txt": "mine", "summary.json": "old", "table.csv": "old"}
    assert contents(out) == {"notes.txt": "mine", "summary.json": "new", "table.csv": "new"}
    assert (out / "extra" / "x.txt").read_text() == "kept"
    assert os.stat(out).st_ino != inode_before  # a new folder took the name: one rename, not file by file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


@pytest.mark.parametrize("existing", [True, False])
@pytest.mark.parametrize("failure", [Boom, KeyboardInterrupt])
def test_a_failed_or_interrupted_run_leaves_the_previous_folder_or_none(tmp_path, existing, failure):
    out = tmp_path / "report"
    if existing:
        out.mkdir()
        (out / "table.csv").write_text("old")
        (out / "summary.json").write_text("old")
    with pytest.raises(failure):
        with atomic_directory(out) as work:
            (work / "table.csv").write_text("new")
            raise failure
    assert (contents(out) == {"summary.json": "old", "table.csv": "old"}) if existing else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["report"] if existing else [])


def test_without_an_atomic_exchange_three_renames_do_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # another OS, or a filesystem that refuses it
    out = tmp_path / "report"
    out.mkdir()
    (out / "a.csv").write_text("old")
    (out / "input.jsonl").write_text("mine")
    with atomic_directory(out) as work:
        (work / "a.csv").write_text("new")
    assert contents(out) == {"a.csv": "new", "input.jsonl": "mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_a_kept_work_folder_survives_a_failure_and_is_continued(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "table.md").write_text("old report")
    with pytest.raises(Boom):
        with atomic_directory(out, keep_work=True) as work:
            (work / "stats.parquet.shards").mkdir()
            (work / "stats.parquet.shards" / "batch-000000.parquet").write_text("finished")
            raise Boom
    assert work == work_folder(out) and (work / "stats.parquet.shards" / "batch-000000.parquet").exists()
    assert contents(out) == {"table.md": "old report"}
    with atomic_directory(out, keep_work=True) as again:
        assert (again / "stats.parquet.shards" / "batch-000000.parquet").read_text() == "finished"
        (again / "table.md").write_text("new report")
    assert (out / "table.md").read_text() == "new report" and not work.exists()


# --------------------------------------------------------------------------- output paths (cases 2, 9, 10, 11)


@pytest.mark.parametrize("name_bytes, refused", [(200, False), (229, False), (230, True), (244, True), (260, True)])
def test_output_names_leave_room_for_their_manifest_and_temporaries(tmp_path, name_bytes, refused):
    name = "n" * (name_bytes - len(".jsonl")) + ".jsonl"
    if refused:
        with pytest.raises(AuditError, match=rf"the name is {name_bytes} bytes.*within 229 bytes"):
            prepare_output_file(tmp_path / name)
        with pytest.raises(AuditError, match="the name is"):
            prepare_output_dir(tmp_path / name)
    else:  # what is accepted can be written whole, manifest and temporaries included
        out = prepare_output_file(tmp_path / name)
        with io.atomic_files(out, io.manifest_path(out)) as (data, manifest):
            data.write_text("x")
            manifest.write_text("{}")
        assert out.read_text() == "x" and io.manifest_path(out).exists()


def test_a_path_over_the_system_limit_is_one_line_not_a_crash(tmp_path):
    deep = tmp_path.joinpath(*(["d" * 200] * 22), "noisy.jsonl")
    for check in (prepare_output_file, prepare_output_dir):
        with pytest.raises(AuditError, match="over this system's limit"):
            check(deep)
    assert not (tmp_path / ("d" * 200)).exists()


def test_unwritable_output_folders_are_refused_before_any_work(tmp_path, monkeypatch):
    report = tmp_path / "report"
    report.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and not (str(path) == str(report) and mode & os.W_OK))
    with pytest.raises(AuditError, match="report: the folder is not writable"):
        prepare_output_dir(report)
    with pytest.raises(AuditError, match="report: the output folder is not writable"):
        prepare_output_file(report / "sub" / "stats.parquet")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the test above stands in")
def test_a_read_only_folder_is_refused(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    report.chmod(0o555)
    try:
        with pytest.raises(AuditError, match="not writable"):
            prepare_output_dir(report)
    finally:
        report.chmod(0o755)


# --------------------------------------------------------------------------- locks (case 3)


HOLDER = textwrap.dedent("""
    import sys
    from reweight_audit.core.io import acquire_lock
    lock = acquire_lock(sys.argv[1])
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    lock.release()
""")


@pytest.mark.slow
def test_a_second_writer_is_refused_at_once_naming_the_owner(tmp_path):
    out = tmp_path / "stats.parquet"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AuditError) as refused:
            acquire_lock(out)
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, still running" in message
        assert message.startswith(f"{out}: another run is writing it") and str(lock_path(out)) in message
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not lock_path(out).exists()  # released on the way out
    with output_lock(out):  # and free again
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_a_stale_lock_is_taken_over_and_named_and_its_leftovers_removed(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "stats.parquet"
    lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    leftovers = [tmp_path / f"stats.parquet.{dead.pid}.tmp", tmp_path / f"stats.parquet.manifest.json.{dead.pid}.tmp"]
    for path in leftovers:
        path.write_text("half")
    (tmp_path / f".stats.parquet.{dead.pid}.tmp").mkdir()  # a folder's temporary
    others = [tmp_path / "stats.parquet.other", tmp_path / f"stats.{dead.pid}.tmp", tmp_path / "stats.parquet.lockx"]
    for path in others:  # not this output's: left alone
        path.write_text("keep")
    with caplog.at_level(logging.WARNING, logger="reweight_audit"):
        lock = acquire_lock(out)
    lock.release()
    assert "took over the stale lock" in caplog.text
    assert f"pid {dead.pid} on host {socket.gethostname()}, no longer running" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in others)


def test_without_flock_a_live_owner_still_holds_the_lock(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, operation):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "x.jsonl"
    lock_path(out).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(AuditError, match=f"pid {os.getppid()}"):
        acquire_lock(out)
    lock_path(out).write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "started": "now"}))
    with pytest.raises(AuditError, match="on host elsewhere"):  # another host's pid cannot be checked from here
        acquire_lock(out)


def test_a_symlinked_report_folder_keeps_its_link(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "a.csv").write_text("old")
    link = tmp_path / "report"
    link.symlink_to(real)
    with atomic_directory(link) as work:
        (work / "a.csv").write_text("new")
    assert link.is_symlink() and (link / "a.csv").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "report"]

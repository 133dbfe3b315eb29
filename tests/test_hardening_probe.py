"""Issue 23's probe, as tests: nothing outside the output is touched, degenerate tables are ordinary,
impossible values are refused with one line."""
from __future__ import annotations

import os
import stat

import pytest

from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import acquire_lock, atomic_directory, atomic_file, lock_path, output_lock, \
    refuse_symlink


# --------------------------------------------------------------------------- links and modes (security)


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    notes = tmp_path / "elsewhere" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    out = tmp_path / "out.jsonl"
    lock_path(out).symlink_to(notes)
    with pytest.raises(AuditError, match="lock file is a symbolic link"):
        acquire_lock(out)
    assert notes.read_text() == "mine" and lock_path(out).is_symlink()


def test_a_dangling_lock_link_creates_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    lock_path(out).symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(AuditError, match="symbolic link"):
        with output_lock(out):
            pass
    assert not (tmp_path / "created-through-the-link").exists()


def test_a_link_swapped_in_for_a_held_lock_is_not_deleted_on_release(tmp_path):
    out = tmp_path / "out.jsonl"
    target = tmp_path / "target.txt"
    target.write_text("mine")
    lock = acquire_lock(out)
    lock.path.unlink()
    lock.path.symlink_to(target)
    lock.release()
    assert lock.path.is_symlink() and target.read_text() == "mine"


def test_refuse_symlink_names_the_link(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "keep.tmp").write_text("theirs")
    link = tmp_path / "stats.parquet.shards"
    link.symlink_to(folder)
    with pytest.raises(AuditError, match="stats.parquet.shards: the shards folder is a symbolic link"):
        refuse_symlink(link, "the shards folder")
    assert refuse_symlink(folder, "the shards folder") == folder


def test_a_planted_temporary_link_is_not_written_through(tmp_path):
    out = tmp_path / "a.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    out.with_name(f"{out.name}.{os.getpid()}.tmp").symlink_to(victim)
    with atomic_file(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and victim.read_text() == "mine"


@pytest.mark.parametrize("through_link", [False, True])
def test_a_replaced_report_folder_keeps_its_mode(tmp_path, through_link):
    real = tmp_path / "private"
    real.mkdir()
    real.chmod(0o700)
    (real / "a.csv").write_text("old")
    out = real
    if through_link:
        out = tmp_path / "report"
        out.symlink_to(real)
    with atomic_directory(out) as work:
        (work / "a.csv").write_text("new")
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o700 and (real / "a.csv").read_text() == "new"
    assert not through_link or out.is_symlink()


def test_a_planted_link_at_the_work_folder_is_removed_not_followed(tmp_path):
    out = tmp_path / "report"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "x").write_text("theirs")
    out.with_name(f".{out.name}.{os.getpid()}.tmp").symlink_to(theirs)
    with atomic_directory(out) as work:
        (work / "a.csv").write_text("new")
    assert sorted(p.name for p in theirs.iterdir()) == ["x"] and (out / "a.csv").read_text() == "new"

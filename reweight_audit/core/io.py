"""Files on disk: output paths, locks, atomic writes, manifests, JSON and parquet.

Contract: a file or folder of outputs appears complete under its final name or
not at all. Every write goes to a temporary sibling first and is renamed into
place when it succeeded; a failure or an interrupt removes the temporary and
leaves whatever was there before. A folder of results is swapped in whole.
Output paths are checked here, before any work, and a problem is one
:class:`AuditError` line naming the path. One run at a time writes an output:
:func:`output_lock`. Layout of manifests and locks: ``docs/formats.md``.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from reweight_audit.core import __version__
from reweight_audit.core.errors import AuditError

MANIFEST_SUFFIX = ".manifest.json"
LOCK_SUFFIX = ".lock"
TOOL = "reweight-audit"
#: Bytes the longest name derived from an output's name adds to it: ``<name>.manifest.json.<pid>.tmp``.
DERIVED_NAME_BYTES = len(MANIFEST_SUFFIX) + len(".4194304.tmp")
#: Bytes the longest path derived from an output adds (``.<name>.partial/stats.parquet.shards/batch-…tmp``),
#: rounded up.
DERIVED_PATH_BYTES = 96
#: Notes for the user that are not errors (a stale lock taken over); the command line prints them.
log = logging.getLogger("reweight_audit")


# --------------------------------------------------------------------------- paths


def manifest_path(output: str | os.PathLike) -> Path:
    """``<output>.manifest.json``, beside the file it describes."""
    p = Path(output)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def _same_file(a: Path, b: Path) -> bool:
    """True when both paths exist and are one file (an absent output cannot be the input)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _shown(path: Path) -> str:
    """A path short enough for a one-line message."""
    text = str(path)
    return text if len(text) <= 160 else f"{text[:60]}…{text[-90:]}"


def _limit(path: Path, name: str, default: int) -> int:
    """``os.pathconf`` of the nearest existing folder at or above ``path``."""
    for folder in (path, *path.parents):
        try:
            return int(os.pathconf(folder, name))
        except (OSError, ValueError):
            continue
    return default


def _check_name(out: Path) -> None:
    """The name and the whole path leave room for what is derived from them (manifest, temporaries, shards)."""
    absolute = Path(os.path.abspath(out))
    name_max = _limit(absolute.parent, "PC_NAME_MAX", 255)
    name_bytes = len(os.fsencode(out.name))
    if name_bytes + DERIVED_NAME_BYTES > name_max:
        raise AuditError(f"{_shown(out)}: the name is {name_bytes} bytes; with the manifest and temporary names "
                         f"derived from it, -o names must stay within {name_max - DERIVED_NAME_BYTES} bytes")
    path_max = _limit(absolute.parent, "PC_PATH_MAX", 4096)
    path_bytes = len(os.fsencode(str(absolute)))
    if path_bytes + DERIVED_PATH_BYTES > path_max:
        raise AuditError(f"{_shown(out)}: the path is {path_bytes} bytes, over this system's limit of "
                         f"{path_max - DERIVED_PATH_BYTES} for an output; choose a shorter -o path")
    for part in absolute.parts:
        if len(os.fsencode(part)) > name_max:
            raise AuditError(f"{_shown(out)}: a folder name in the path is over {name_max} bytes; "
                             "choose a shorter -o path")


def _kind_of(path: Path) -> str:
    """'dir', 'file' or 'absent', without raising (an unreadable path is one AuditError line)."""
    try:
        return "dir" if path.is_dir() else "file" if os.path.lexists(path) else "absent"
    except OSError as exc:
        raise AuditError(f"{_shown(path)}: cannot be checked ({exc.strerror}); choose another -o path") from None


def _check_writable(path: Path, what: str) -> None:
    """The nearest existing folder at or above ``path`` lets us create entries in it."""
    for folder in (path, *path.parents):
        if _kind_of(folder) == "dir":
            if not os.access(folder, os.W_OK | os.X_OK):
                raise AuditError(f"{_shown(folder)}: {what} is not writable; fix its permissions or choose "
                                 "another -o path")
            return
        if _kind_of(folder) == "file":
            return  # _make_dir names this one


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditError(f"{_shown(path)}: cannot create the output folder ({exc.strerror}); "
                         "choose a writable -o path") from None


def refuse_symlink(path: str | os.PathLike, what: str) -> Path:
    """``path`` itself, refused when it is a symbolic link: a folder or file the tool derives from ``-o``
    (``<out>.shards``, ``<out>.lock``, a work folder) is written and cleaned, so following a link there would
    write into, or delete from, whatever the link points to."""
    path = Path(path)
    if os.path.islink(path):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise AuditError(f"{_shown(path)}: {what} is a symbolic link (to {_shown(Path(target))}); the tool does "
                         "not write through it; remove the link or choose another -o path")
    return path


def prepare_output_file(output: str | os.PathLike, *, source: str | os.PathLike | None = None,
                        create: bool = True) -> Path:
    """Check an output file path before any work and (``create``) make its folder.

    Refused: a directory, the input file itself (``source``, when it is a path), a name or path too
    long for the names derived from it, a folder we cannot write into.
    """
    out = Path(output)
    _check_name(out)
    if _kind_of(out) == "dir":
        raise AuditError(f"{_shown(out)}: output is a directory; give a file name inside it")
    if source is not None and _same_file(out, Path(source)):
        raise AuditError(f"{_shown(out)}: the output would overwrite the input; choose another -o path")
    _check_writable(out.parent, "the output folder")
    if create:
        _make_dir(out.parent)
    return out


def prepare_output_dir(output: str | os.PathLike, *, create: bool = True) -> Path:
    """Check an output folder path before any work: a writable folder, or one that can be made beside it."""
    out = Path(output)
    _check_name(out)
    kind = _kind_of(out)
    if kind == "file":
        raise AuditError(f"{_shown(out)}: exists and is not a folder; give a folder for the reports with -o")
    if kind == "dir" and not os.access(out, os.W_OK | os.X_OK):
        raise AuditError(f"{_shown(out)}: the folder is not writable; fix its permissions or choose another -o path")
    _check_writable(out.parent, "the folder above the output")  # the new version is built beside it
    if create:
        _make_dir(out.parent)
    return out


# --------------------------------------------------------------------------- write failures

#: errno values that mean "no room": the message adds what to do about it.
_NO_ROOM = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


def _reason(exc: OSError) -> str:
    """The OS's words for a failed write (pyarrow's I/O errors carry no errno, only text)."""
    if exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    detail = re.search(r"\[errno \d+\] ([^\n]+)", text, re.IGNORECASE)  # pyarrow: "... Detail: [errno 28] No space ..."
    if detail:
        return detail.group(1).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _no_room(exc: OSError) -> bool:
    return exc.errno in _NO_ROOM or "No space left" in str(exc) or "Disk quota" in str(exc)


def write_failed(path: str | os.PathLike, exc: OSError, kept: str) -> AuditError:
    """The one line for a write that failed (disk full, I/O error): the path, the OS's reason, what was kept.

    ``kept`` says what the user still has (the previous file, finished shards); the failed
    write's temporaries are already gone when this is raised.
    """
    where = f" ({_shown(Path(exc.filename))})" if exc.filename and Path(str(exc.filename)).name != Path(path).name \
        and not str(exc.filename).endswith(".tmp") else ""
    hint = "; free some space and run again" if _no_room(exc) else ""
    return AuditError(f"{_shown(Path(path))}: could not be written ({_reason(exc)}{where}); {kept}{hint}")


def _kept_file(path: Path) -> str:
    return f"the previous {path.name} is kept unchanged" if os.path.lexists(path) else "nothing was written"


# --------------------------------------------------------------------------- atomic writes


def _temporary(path: Path) -> Path:
    # ends in .tmp and carries the pid: concurrent writers (ranks) never share one
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for a few renames that must happen together; they arrive right after."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def atomic_files(*paths: str | os.PathLike, kept: str | None = None) -> Iterator[tuple[Path, ...]]:
    """Temporary siblings to write; renamed onto ``paths`` together when the block succeeds.

    Before any rename, the existing files after the first are removed: they
    describe the first (a manifest), and a stale one must never sit beside new
    data. On failure or interrupt the temporaries are removed and the old files
    stay as they were; an interrupt during the renames waits for them. A write
    that fails in the OS (disk full, I/O error) is one :class:`AuditError` line
    naming the first path and what was kept (``kept``; by default the previous
    file, or that nothing was written).
    """
    targets = [Path(p) for p in paths]
    temps = tuple(_temporary(p) for p in targets)
    kept = kept or _kept_file(targets[0])  # decided before the renames can change it
    try:
        for tmp in temps:  # a leftover (or a planted link) under this pid's name: never written through
            _remove_entry(tmp)
        yield temps
        with _signals_deferred():
            for target in targets[1:]:
                target.unlink(missing_ok=True)
            for tmp, target in zip(temps, targets):
                os.replace(tmp, target)
    except OSError as exc:
        raise write_failed(targets[0], exc, kept) from None
    finally:
        for tmp in temps:
            _quietly_unlink(tmp)


def _quietly_unlink(path: Path) -> None:
    """Clean-up that must not replace the error being raised (an I/O error on the cleaning itself)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def atomic_file(path: str | os.PathLike, *, kept: str | None = None) -> Iterator[Path]:
    """One temporary sibling of ``path``, renamed onto it when the block succeeds (see :func:`atomic_files`)."""
    with atomic_files(path, kept=kept) as (tmp,):
        yield tmp


def work_folder(output: str | os.PathLike) -> Path:
    """``.<name>.partial`` beside ``output``: a folder of results being built across runs (the demo's)."""
    out = Path(output)
    return out.with_name(f".{out.name}.partial")


@contextmanager
def atomic_directory(output: str | os.PathLike, *, keep_work: bool = False) -> Iterator[Path]:
    """A folder beside ``output`` to write the results into; swapped with ``output`` when the block succeeds.

    Nothing in ``output`` changes until every file was written: a new
    ``output`` appears whole (one rename), an existing one is exchanged with
    the new version in one ``renameat2(RENAME_EXCHANGE)``, so a failed or
    interrupted run leaves the previous results as they were, never a mix.
    Entries of ``output`` the run did not write are carried over (hard
    links), so files kept beside the results stay. ``keep_work``: build in
    :func:`work_folder`, kept on failure so the next run continues there
    (the demo resumes its scoring); otherwise a temporary ``.<name>.<pid>.tmp``.
    """
    out = prepare_output_dir(output)
    if out.is_symlink():  # the user's link (reports kept on another disk): swap the folder it points to; the link
        out = prepare_output_dir(out.resolve())  # stays, and the target is checked as an -o of its own
    if keep_work:
        work = refuse_symlink(work_folder(out), "the work folder")
    else:
        work = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        _remove_entry(work)  # a leftover of a killed run with this pid (a link there is removed, not followed)
    _make_dir(work)
    done = False
    kept = (f"the previous {out.name} is kept unchanged" if out.is_dir() else "nothing was written") + (
        f"; what was done is kept in {_shown(work)} for the next run" if keep_work else "")
    try:
        yield work
        _carry_over(out, work)
        _keep_mode(out, work)
        _swap_in(work, out)
        done = True
    except OSError as exc:
        raise write_failed(out, exc, kept) from None
    finally:
        if done or not keep_work:
            shutil.rmtree(work, ignore_errors=True)  # after the swap: the previous version


def _remove_entry(path: Path) -> None:
    """Remove whatever is at ``path``: a link itself (never what it points to), a folder with its contents."""
    if os.path.islink(path) or (os.path.lexists(path) and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _keep_mode(out: Path, work: Path) -> None:
    """The new version of a folder gets the permissions of the one it replaces (a private 700 folder stays so)."""
    try:
        if out.is_dir():
            os.chmod(work, stat.S_IMODE(os.stat(out).st_mode))
    except OSError:
        pass  # not ours to change (another owner): the new folder keeps the default mode


def _carry_over(out: Path, work: Path) -> None:
    """Entries of ``out`` that ``work`` lacks, linked into ``work`` (copied where links are refused)."""
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir()):
        target = work / entry.name
        if os.path.lexists(target):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _swap_in(work: Path, out: Path) -> None:
    """``work`` becomes ``out``; the previous ``out`` (if any) is left at ``work``."""
    if not os.path.lexists(out):
        os.rename(work, out)
        return
    if _exchange(work, out):
        return
    # no atomic exchange here (not Linux, or the filesystem refuses it): three renames, uninterruptible
    aside = out.with_name(f".{out.name}.{os.getpid()}.old")
    with _signals_deferred():
        os.rename(out, aside)
        os.rename(work, out)
        os.rename(aside, work)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one system call (Linux ``renameat2``); False where that is not available."""
    rename_exchange, at_fdcwd = 2, -100
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


# --------------------------------------------------------------------------- locks


@dataclass
class OutputLock:
    """The lock on one output: ``<output>.lock``, held with ``flock`` and naming its owner."""

    path: Path
    fd: int

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and let go of it."""
        if self.fd < 0:
            return
        try:
            if _same_inode(self.fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def lock_path(output: str | os.PathLike) -> Path:
    """``<output>.lock``, beside the file or folder it guards."""
    p = Path(output)
    return p.with_name(p.name + LOCK_SUFFIX)


def acquire_lock(output: str | os.PathLike, *, wait: bool = False) -> OutputLock:
    """Take the lock on ``output`` or refuse at once, naming the run that holds it (``wait``: until it is free).

    A lock whose owner is gone (killed: the kernel let go of its ``flock``)
    is taken over and named in a note. Once held, leftovers of killed runs
    (this output's temporaries) are removed. Where the filesystem has no
    ``flock``, a lock file whose owner is alive on this host, or lives on
    another host, counts as held.
    """
    path = lock_path(output)
    _make_dir(path.parent)
    for _attempt in range(5):
        fd = _open_lock(path)
        owner = _read_owner(fd)
        if _held_elsewhere(fd, owner, wait):
            os.close(fd)
            raise AuditError(f"{_shown(Path(output))}: another run is writing it ({_describe(owner)}); wait for "
                             f"it to finish or stop it; if no such run exists, delete {_shown(path)}")
        if not _same_inode(fd, path):  # its owner removed it while we waited: take the new one
            os.close(fd)
            continue
        if owner:
            log.warning("%s: took over the stale lock of a run that ended without cleaning up (%s)",
                        _shown(Path(output)), _describe(owner))
        lock = OutputLock(path, fd)
        try:
            _write_owner(fd)
        except OSError as exc:  # a full disk: no lock is left behind (release removes the file it made)
            lock.release()
            raise write_failed(path, exc, "nothing was written") from None
        _sweep_temporaries(Path(output))
        return lock
    raise AuditError(f"{_shown(path)}: the lock keeps changing hands; another run is starting on this output")


@contextmanager
def output_lock(output: str | os.PathLike, *, wait: bool = False) -> Iterator[OutputLock]:
    """:func:`acquire_lock` for the block, released however it ends."""
    lock = acquire_lock(output, wait=wait)
    try:
        yield lock
    finally:
        lock.release()


def _open_lock(path: Path) -> int:
    """The lock file, opened without following a link (a planted link would get our JSON, then be deleted)."""
    refuse_symlink(path, "the lock file")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # made a link between the check and the open
            refuse_symlink(path, "the lock file")
        raise AuditError(f"{_shown(path)}: cannot create the lock file ({exc.strerror}); "
                         "choose a writable -o path") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AuditError(f"{_shown(path)}: the lock file is not a regular file; remove it or choose another -o path")
    return fd


def _held_elsewhere(fd: int, owner: dict | None, wait: bool = False) -> bool:
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))  # wait: block until the owner lets go
        return False
    except BlockingIOError:
        return True
    except (OSError, ImportError):  # no flock here (filesystem or OS): judge by the owner's pid
        return bool(owner) and (owner.get("host") != socket.gethostname() or _alive(owner.get("pid")))


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _same_inode(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))  # a link put in its place is not our lock
    except OSError:
        return False


def _read_owner(fd: int) -> dict | None:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_owner(fd: int) -> None:
    import sys

    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode("utf-8"), 0)


def _describe(owner: dict | None) -> str:
    if not owner:
        return "owner unknown"
    state = ""
    if owner.get("host") == socket.gethostname():
        state = ", still running" if _alive(owner.get("pid")) else ", no longer running"
    return f"pid {owner.get('pid')} on host {owner.get('host')}{state}, started {owner.get('started')}"


def _sweep_temporaries(output: Path) -> None:
    """Remove what killed runs left of ``output``: ``[.]<name>[.manifest.json].<pid>.tmp`` (and ``.old``)."""
    pattern = re.compile(rf"\.?{re.escape(output.name)}(\.manifest\.json)?\.\d+\.(tmp|old)")
    try:
        entries = list(output.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if pattern.fullmatch(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------- JSON


def json_default(obj: Any) -> Any:
    """For ``json.dumps(default=...)``: numpy scalars as plain numbers, anything else as its text."""
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(obj)


def json_safe(value: Any) -> Any:
    """Plain JSON values: NaN and ±inf become null, numpy scalars numbers, paths text, tuples lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def dump_json(data: Any, *, ensure_ascii: bool = False) -> str:
    """Indented strict JSON (see :func:`json_safe`) with a final newline."""
    return json.dumps(json_safe(data), indent=2, ensure_ascii=ensure_ascii, allow_nan=False,
                      default=json_default) + "\n"


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """:func:`dump_json` into ``path``, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(dump_json(data), encoding="utf-8")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text: str) -> Any:
    """``json.loads`` for a record read from a user's file: a lone surrogate escape (``"\\ud800"``: no
    character, cannot be written as UTF-8) is refused here rather than when an output is written.

    Raises ``ValueError`` (malformed JSON, an integer too long, a lone surrogate) or ``RecursionError``
    (nested too deep); :func:`json_problem` puts either in words.
    """
    value = json.loads(text)
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a \\u escape is a lone surrogate, not a character") from None
    return value


def json_problem(exc: BaseException) -> str:
    """What is wrong with a record's JSON, in words (malformed, nested too deep, an integer too long, ...)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON ({exc.msg}, column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "JSON nested too deep to read"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"unreadable JSON ({text if len(text) <= 200 else text[:200] + '…'})"


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's value; an unreadable or invalid file is one AuditError line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuditError(f"{path}: not valid JSON ({exc}); fix or delete the file") from None


def read_manifest(output: str | os.PathLike) -> dict | None:
    """The manifest beside ``output``, or None when there is none (or it is not a JSON object)."""
    path = manifest_path(output)
    if not path.exists():
        return None
    data = read_json(path)
    return data if isinstance(data, dict) else None


def manifest_header(stage: str, *, input: str, input_digest: str, output: str | os.PathLike) -> dict:
    """The keys every stage's manifest opens with (``docs/formats.md``, "Manifests")."""
    return {"tool": TOOL, "version": __version__, "stage": stage, "input": str(input), "input_digest": input_digest,
            "output": Path(output).name}


# --------------------------------------------------------------------------- digests and parquet


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_parquet_atomic(table: Any, path: str | os.PathLike, *, kept: str | None = None, **options: Any) -> None:
    """``pyarrow.parquet.write_table`` into ``path``, atomically: a failed write (disk full) leaves no file and is
    one line saying what was ``kept`` (:func:`atomic_files`)."""
    import pyarrow.parquet as pq

    with atomic_file(path, kept=kept) as tmp:
        pq.write_table(table, tmp, **options)

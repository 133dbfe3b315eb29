"""Files on disk: output paths, atomic writes, manifests, JSON and parquet.

Contract: a file or folder of outputs appears complete under its final name or
not at all. Every write goes to a temporary sibling first and is renamed into
place when it succeeded; a failure or an interrupt removes the temporary and
leaves whatever was there before. Output paths are checked here, before any
work, and a problem is one :class:`AuditError` line naming the path.
Manifest layout: ``docs/formats.md``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from reweight_audit import __version__
from reweight_audit.errors import AuditError

MANIFEST_SUFFIX = ".manifest.json"
TOOL = "reweight-audit"


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


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditError(f"{path}: cannot create the output folder ({exc.strerror}); choose a writable -o path") from None


def prepare_output_file(output: str | os.PathLike, *, source: str | os.PathLike | None = None,
                        create: bool = True) -> Path:
    """Check an output file path before any work and (``create``) make its folder.

    Refused: a directory, or the input file itself (``source``, when it is a path).
    """
    out = Path(output)
    if out.is_dir():
        raise AuditError(f"{out}: output is a directory; give a file name inside it")
    if source is not None and _same_file(out, Path(source)):
        raise AuditError(f"{out}: the output would overwrite the input; choose another -o path")
    if create:
        _make_dir(out.parent)
    return out


def prepare_output_dir(output: str | os.PathLike) -> Path:
    """Check an output folder path before any work: it is a folder or can become one."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise AuditError(f"{out}: exists and is not a folder; give a folder for the reports with -o")
    _make_dir(out.parent)
    return out


# --------------------------------------------------------------------------- atomic writes


def _temporary(path: Path) -> Path:
    # ends in .tmp and carries the pid: concurrent writers (ranks) never share one
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_files(*paths: str | os.PathLike) -> Iterator[tuple[Path, ...]]:
    """Temporary siblings to write; renamed onto ``paths`` together when the block succeeds.

    Before any rename, the existing files after the first are removed: they
    describe the first (a manifest), and a stale one must never sit beside new
    data. On failure or interrupt the temporaries are removed and the old files
    stay as they were.
    """
    targets = [Path(p) for p in paths]
    temps = tuple(_temporary(p) for p in targets)
    try:
        yield temps
        for target in targets[1:]:
            target.unlink(missing_ok=True)
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """One temporary sibling of ``path``, renamed onto it when the block succeeds (see :func:`atomic_files`)."""
    with atomic_files(path) as (tmp,):
        yield tmp


@contextmanager
def atomic_directory(output: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside ``output``; its files move into ``output`` when the block succeeds.

    Nothing in ``output`` changes until every file was written, so a failed
    run leaves the previous files intact. A new ``output`` appears whole (one
    rename); into an existing one each file is renamed over its old version,
    and files the run did not write stay (the demo keeps its inputs beside its
    report).
    """
    out = prepare_output_dir(output)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed run with this pid
    _make_dir(tmp)
    try:
        yield tmp
        if not out.exists():
            os.rename(tmp, out)
        else:
            for entry in sorted(tmp.iterdir()):
                os.replace(entry, out / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def write_parquet_atomic(table: Any, path: str | os.PathLike, **options: Any) -> None:
    """``pyarrow.parquet.write_table`` into ``path``, atomically: a failed write (disk full) leaves no file."""
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, **options)

"""The converted checkpoint cache: a GGUF model, converted once into a folder ``from_pretrained`` reads fast.

Parsing a GGUF costs transformers ~20 s a load (its metadata is read three times: config, tokenizer,
weights); the same model as safetensors loads in about a second. So the first load of a GGUF converts
it into ``<cache>/checkpoints/<sha256 of the GGUF>/`` and every later load reads that folder. Layout
and manifest: ``docs/formats.md``, "Checkpoint cache".

- The folder appears whole or not at all (:func:`~reweight_audit.core.io.atomic_directory`), built
  under the entry's lock (:func:`~reweight_audit.core.io.output_lock` with ``wait``): of two processes
  loading a model for the first time, one converts and the other waits, then reads the finished entry.
- Its ``manifest.json`` records the source file and digest, the versions that converted it and the
  size and sha256 of every file; each process checks them on its first use of the entry. A damaged
  or missing file, or a conversion by another transformers version, is one note and a rebuild.

Core only, and knows nothing of transformers: the conversion itself is a callable passed in
(``core.models``).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reweight_audit.core.io import TOOL, atomic_directory, dump_json, file_sha256, log, output_lock, read_json
from reweight_audit.core.errors import AuditError

FORMAT = 1
SUBDIR = "checkpoints"
MANIFEST = "manifest.json"
MISSING = "missing"
#: Entries already checked by this process, by (folder, the manifest's inode and mtime): a replaced entry is new.
_checked: set[tuple] = set()


@dataclass(frozen=True)
class CacheEntry:
    """One converted checkpoint, as ``reweight-audit cache list`` shows it."""

    path: Path
    model: str  # the GGUF file it was converted from
    size: int  # bytes of the folder's files
    created: str  # when it was converted (ISO 8601)


def entry_path(root: Path, digest: str) -> Path:
    """The folder of the GGUF with this digest (``sha256:<hex>``)."""
    return Path(root) / SUBDIR / digest.split(":", 1)[-1]


def cached_checkpoint(gguf: Path, digest: str, root: Path, convert: Callable[[Path], None], *,
                      converter: str, versions: dict) -> Path | None:
    """The checked cache folder of ``gguf``; converted now (``convert(folder)``) when absent or damaged.

    ``converter`` names what the conversion depends on (``transformers 5.24.0``): an entry made by
    another is made again. ``versions`` are recorded in the manifest. None, with a note, when the
    cache folder cannot be written: the caller loads the GGUF itself.
    """
    entry = entry_path(root, digest)
    if _problem(entry, digest, converter) is None:
        return entry
    if not _writable(entry.parent):
        log.warning("%s: the checkpoint cache %s is not writable, so the GGUF is read directly (slow); "
                    "set $REWEIGHT_AUDIT_CACHE to a writable folder", gguf.name, entry.parent)
        return None
    with output_lock(entry, wait=True):  # another process converting it: wait, then read its entry
        problem = _problem(entry, digest, converter)
        if problem is None:
            return entry
        note = (f"converting it once into the checkpoint cache ({entry}); later loads read that"
                if problem == MISSING else f"the cached checkpoint {entry} {problem}; converting it again")
        log.warning("%s: %s", gguf.name, note)
        _build(gguf, digest, entry, convert, converter, versions)
    return entry


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _problem(entry: Path, digest: str, converter: str) -> str | None:
    """Why ``entry`` cannot be used as it is, or None; checked once per process and entry."""
    try:
        stat = (entry / MANIFEST).stat()
    except OSError:
        return MISSING if not entry.exists() else "has no manifest"
    key = (str(entry), stat.st_ino, stat.st_mtime_ns)
    if key in _checked:
        return None
    try:
        manifest = read_json(entry / MANIFEST)
    except AuditError:
        return "has an unreadable manifest"
    problem = _manifest_problem(entry, manifest, digest, converter)
    if problem is None:
        _checked.add(key)
    return problem


def _manifest_problem(entry: Path, manifest: object, digest: str, converter: str) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("source_digest") != digest:
        return "has a manifest of another format or source"
    if manifest.get("converter") != converter:
        return f"was converted by {manifest.get('converter')}, not {converter}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "lists no files"
    for name, record in files.items():
        path = entry / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"lacks {name}"
        # size first: a truncated file is caught without reading it; then every byte (0.7 s for 540 MB)
        if size != record.get("size") or file_sha256(path) != record.get("sha256"):
            return f"has a damaged {name}"
    return None


def _build(gguf: Path, digest: str, entry: Path, convert: Callable[[Path], None], converter: str,
           versions: dict) -> None:
    """Convert into a fresh folder and swap it in whole, with its manifest; say how long it took."""
    started = time.monotonic()
    shutil.rmtree(entry, ignore_errors=True)  # a damaged entry: none of it is carried over
    with atomic_directory(entry) as work:
        convert(work)
        files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(work.iterdir()) if p.is_file()}
        manifest = {"tool": TOOL, "format": FORMAT, "source": str(gguf), "source_digest": digest,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "converter": converter,
                    "versions": versions, "files": files}
        (work / MANIFEST).write_text(dump_json(manifest), encoding="utf-8")
    log.warning("%s: cached in %.1f s", gguf.name, time.monotonic() - started)


def list_entries(root: Path) -> list[CacheEntry]:
    """The cache's checkpoints, oldest first; an entry without a readable manifest shows as ``?``."""
    folder = Path(root) / SUBDIR
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            manifest = read_json(path / MANIFEST)
        except AuditError:
            manifest = {}
        manifest = manifest if isinstance(manifest, dict) else {}
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        created = manifest.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                           time.localtime(path.stat().st_mtime))
        entries.append(CacheEntry(path, Path(str(manifest.get("source", "?"))).name, size, created))
    return sorted(entries, key=lambda e: e.created)


def clear_entries(root: Path) -> list[CacheEntry]:
    """Remove every checkpoint (each under its lock: one being converted now is refused); returns them."""
    removed = []
    for entry in list_entries(root):
        with output_lock(entry.path):
            shutil.rmtree(entry.path)
        removed.append(entry)
    return removed

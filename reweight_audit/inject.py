"""Run noise injection over a stream of records and write the noisy corpus.

The I/O edge around ``noise.py``: records are streamed (never the whole corpus
in memory), written to ``<output>.tmp`` and renamed into place, so an
interrupted run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from . import __version__
from .corpus import Record
from .errors import AuditError
from .noise import (
    FAMILIES,
    OFFSET_UNIT,
    WORD_UNIT,
    NoiseConfig,
    Noiser,
    load_word_list,
)

MANIFEST_SUFFIX = ".manifest.json"


@dataclass
class InjectStats:
    """Counters filled while ``inject_records`` streams."""

    records_in: int = 0
    written: int = 0
    clean: int = 0
    skipped_empty: int = 0
    no_eligible: int = 0
    with_noise: int = 0
    spans_by_kind: Counter = field(default_factory=Counter)
    words: int = 0
    noise_words: int = 0


def _sorted_json(obj):
    """Dicts with sorted keys, recursively, so meta from any loader serialises the same."""
    if isinstance(obj, dict):
        return {str(k): _sorted_json(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, (list, tuple)):
        return [_sorted_json(v) for v in obj]
    return obj


def inject_records(
    records: Iterable[Record],
    config: NoiseConfig,
    vocab_pieces: Sequence[str] | None = None,
    *,
    stats: InjectStats | None = None,
    source: str = "input",
) -> Iterator[dict]:
    """Yield one output object per record with a non-blank response.

    Keys, in this order: ``id, prompt, response, clean_response, spans, meta``;
    ``meta`` is the record's meta plus ``clean`` and ``n_spans`` (keys sorted).
    Blank responses are skipped and counted in ``stats``. The configuration
    (and the vocabulary, for ``random-token``) is checked here, before the
    first record is read.
    """
    noiser = Noiser(config, vocab_pieces)
    return _inject_stream(records, noiser, stats if stats is not None else InjectStats(), source)


def _inject_stream(records: Iterable[Record], noiser: Noiser, stats: InjectStats, source: str) -> Iterator[dict]:
    seen: set[str] = set()  # ids only, not bodies: duplicates would share a seed and a score key
    for rec in records:
        stats.records_in += 1
        if not isinstance(rec.id, str) or not rec.id:
            raise AuditError(f"{source}: record #{stats.records_in} has id {rec.id!r}; every record needs a non-empty text id")
        if rec.id in seen:
            raise AuditError(f"{source}: record id {rec.id!r} appears twice; ids seed the noise and key the scores, make them unique")
        seen.add(rec.id)
        if rec.response is None or (isinstance(rec.response, str) and not rec.response.strip()):
            stats.skipped_empty += 1
            continue
        if not isinstance(rec.response, str):
            raise AuditError(f"{source}: record {rec.id!r} field response is {type(rec.response).__name__}, not text; fix the response column")
        inj = noiser.inject(rec.response, rec.id)
        stats.written += 1
        stats.words += inj.words
        stats.noise_words += inj.noise_words
        if inj.clean:
            stats.clean += 1
        elif not inj.eligible:
            stats.no_eligible += 1
        if inj.spans:
            stats.with_noise += 1
        for sp in inj.spans:
            stats.spans_by_kind[sp.kind] += 1
        meta = dict(rec.meta or {})
        meta["clean"] = inj.clean
        meta["n_spans"] = len(inj.spans)
        yield {
            "id": rec.id,
            "prompt": rec.prompt,
            "response": inj.response,
            "clean_response": rec.response,
            "spans": [sp.to_dict() for sp in inj.spans],
            "meta": _sorted_json(meta),
        }


def _same_path(a: Path, b: Path) -> bool:
    """True when both paths exist and are one file (an absent output cannot be the input)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _json_default(obj):
    """Loader meta may carry numpy scalars or dates; write them as plain JSON values."""
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(obj)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_path(output_path: str | os.PathLike) -> Path:
    """``<output>.manifest.json``."""
    p = Path(output_path)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def write_injected(
    records: Iterable[Record],
    output_path: str | os.PathLike,
    config: NoiseConfig,
    *,
    input_digest: str,
    input_desc: str,
    vocab_pieces: Sequence[str] | None = None,
    skipped: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Inject noise into ``records`` and write ``output_path`` (jsonl) plus its manifest.

    Atomic: the data go to ``<output>.tmp`` and are renamed into place only
    when complete. ``skipped`` holds the loader's own skip counts (merged
    into the manifest). ``progress(n)`` is called after each written record.
    Returns the manifest.
    """
    out = Path(output_path)
    if out.is_dir():
        raise AuditError(f"{out}: output is a directory; give a file name such as {out / 'noisy.jsonl'}")
    if input_desc and _same_path(out, Path(input_desc)):
        raise AuditError(f"{out}: output is the input file; choose a different -o path")
    man_path = manifest_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditError(f"{out.parent}: cannot create the output folder ({exc.strerror}); choose a writable -o path") from None

    stats = InjectStats()
    tmp = out.with_name(out.name + ".tmp")
    man_tmp = man_path.with_name(man_path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for obj in inject_records(records, config, vocab_pieces, stats=stats, source=str(input_desc or "input")):
                line = json.dumps(obj, ensure_ascii=False, default=_json_default)
                try:
                    fh.write(line + "\n")
                except UnicodeEncodeError:
                    raise AuditError(
                        f"{input_desc}: record {obj['id']!r} contains an unpaired surrogate (invalid Unicode); fix its text"
                    ) from None
                if progress is not None:
                    progress(stats.written)
        output_sha = _file_sha256(tmp)
        manifest = _manifest(config, stats, out, output_sha, input_digest, input_desc, skipped, vocab_pieces)
        with open(man_tmp, "w", encoding="utf-8", newline="\n") as fh:
            json.dump(manifest, fh, ensure_ascii=False, indent=2)
            fh.write("\n")
        # A stale manifest must never describe the new data: drop it first.
        if man_path.exists():
            man_path.unlink()
        os.replace(tmp, out)
        os.replace(man_tmp, man_path)
    except OSError as exc:
        # Only our own files get this message; a loader's OSError passes through.
        if exc.filename is not None and Path(exc.filename) not in (tmp, man_tmp, out, man_path):
            raise
        raise AuditError(f"{out}: cannot write the output ({exc.strerror}); check the path and free space") from None
    finally:
        for p in (tmp, man_tmp):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    return manifest


def _manifest(
    config: NoiseConfig,
    stats: InjectStats,
    out: Path,
    output_sha: str,
    input_digest: str,
    input_desc: str,
    skipped: dict | None,
    vocab_pieces: Sequence[str] | None,
) -> dict:
    noiser_kinds = [k for k, w in config.noise.items() if w > 0]
    word_lists = {}
    for kind in noiser_kinds:
        fname = FAMILIES[kind].word_list
        if fname:
            entries = load_word_list(fname)
            word_lists[kind] = {
                "file": f"data/{fname}",
                "entries": len(entries),
                "sha256": hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest(),
            }
    vocab = None
    if "random-token" in noiser_kinds:
        from .noise import vocab_noise_pieces

        pieces = vocab_noise_pieces(vocab_pieces or [])
        vocab = {"pieces": len(pieces), "sha256": hashlib.sha256("\n".join(pieces).encode("utf-8")).hexdigest()}
    skip = {"empty_response": stats.skipped_empty}
    for k, v in (skipped or {}).items():
        skip[str(k)] = v
    return {
        "tool": "reweight-audit",
        "version": __version__,
        "stage": "inject",
        "input": str(input_desc),
        "input_digest": input_digest,
        "output": out.name,
        "output_sha256": output_sha,
        "config": config.to_dict(),
        "seed": int(config.seed),
        "rng": "numpy.random.default_rng([seed, blake2b-64(id, little-endian)]); first draw decides clean",
        "records_in": stats.records_in,
        "records": stats.written,
        "clean_sequences": stats.clean,
        "noisy_sequences": stats.with_noise,
        "no_eligible_boundary": stats.no_eligible,
        "skipped": skip,
        "spans": sum(stats.spans_by_kind.values()),
        "spans_by_kind": {k: stats.spans_by_kind.get(k, 0) for k in noiser_kinds},
        "words": stats.words,
        "noise_words": stats.noise_words,
        "noise_word_frac": (stats.noise_words / stats.words) if stats.words else 0.0,
        "word_unit": WORD_UNIT,
        "offset_unit": OFFSET_UNIT,
        "word_lists": word_lists,
        "vocab": vocab,
    }

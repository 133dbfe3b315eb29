"""What ``score`` reads: the noisy JSONL ``inject`` writes, or the same records as rows in memory.

Every record is checked where it is read: a ``response`` text, and spans that fit it
(:func:`reweight_audit.core.spans.check_spans`, the one span validator inject uses too). A
problem is one line naming the file and line (``<path>:<line>``) or the row (``<name> row <i>``).
"""
from __future__ import annotations

import codecs
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from reweight_audit.core.errors import AuditError
from reweight_audit.core.frames import row_json, rows_digest
from reweight_audit.core.io import file_sha256, json_problem, parse_json
from reweight_audit.core.spans import BadAnnotation, check_spans

__all__ = ["NOT_JSONL", "NoisyRecord", "NoisyRows", "NoisySource", "input_digest", "read_noisy", "scan_input"]

#: What a file that is not inject's output is told.
NOT_JSONL = "score reads the JSONL written by 'reweight-audit inject'; run inject on this file first"
#: Spans score reads may come without ``kind`` (scored as ``noise``) or ``text`` (not compared).
OPTIONAL_SPAN_KEYS = ("kind", "text")


@dataclass
class NoisyRecord:
    id: str
    prompt: str
    response: str
    spans: list[dict]
    line: int = 0  # line number in the input file (for messages)


@dataclass
class NoisyRows:
    """Noisy records already in memory (the Python API's DataFrame, as plain rows), scored like a file of them.

    Errors name a row as ``<name> row <i>`` where a file's name ``<path>:<line>``.
    """

    rows: list[dict]
    name: str = "noisy DataFrame"

    def __str__(self) -> str:
        return self.name


#: What ``score`` reads: a JSONL file or rows in memory.
NoisySource = Union[Path, NoisyRows]


def read_noisy(path: NoisySource, report: dict | None = None) -> Iterator[NoisyRecord]:
    """Stream the records of an ``inject`` output (or any JSONL with id/prompt/response, or such rows).

    Records without ``spans`` are scored as all-clean; ``report["no_spans"]`` counts them. A record
    without an id gets the hash of its line (a UTF-8 BOM is not part of the line).
    """
    report = report if report is not None else {}
    report.setdefault("no_spans", 0)
    with _opened(path) as rows:
        for where, raw, row, lineno in rows:
            if not isinstance(row, dict) or "response" not in row:
                fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise AuditError(f"{where}: no 'response' field (fields: {fields}); {NOT_JSONL}")
            response = row["response"]
            if not isinstance(response, str):
                raise AuditError(f"{where}: field 'response' must be text")
            spans = row.get("spans")
            if spans is None:
                report["no_spans"] += 1
                spans = []
            spans = _checked_spans(response, spans, where)
            rid = row.get("id")
            rid = str(rid) if rid not in (None, "") else hashlib.blake2b(raw, digest_size=8).hexdigest()
            yield NoisyRecord(id=rid, prompt=str(row.get("prompt") or ""), response=response, spans=spans,
                              line=lineno)


def _checked_spans(response: str, spans: Any, where: str) -> list[dict]:
    """The record's spans through the one validator; a problem is one line naming the record."""
    try:
        return check_spans(response, spans, optional=OPTIONAL_SPAN_KEYS)
    except BadAnnotation as exc:
        raise AuditError(f"{where}: {exc}; fix the span or re-run inject on the source corpus") from None


def _decode_line(raw: bytes, where: str, *, first: bool) -> Any:
    """One JSON value; a first line that is not JSON says what score reads."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        hint = NOT_JSONL if first else "re-encode the file as UTF-8"
        raise AuditError(f"{where}: not UTF-8 text; {hint}") from None
    try:
        return parse_json(text)
    except (ValueError, RecursionError) as exc:  # malformed, an integer too long, a lone surrogate, too deep
        hint = NOT_JSONL if first else "fix the line or re-run inject"
        raise AuditError(f"{where}: {json_problem(exc)}; {hint}") from None


def scan_input(path: NoisySource) -> int:
    """Read the whole input once, before anything loads: every record valid, every id unique.

    Returns the number of records. Duplicate ids (two inject outputs concatenated) would give
    duplicate ``(seq_id, pos)`` rows that compare counts twice; the first ones are named.
    """
    first_seen: dict[str, int] = {}
    duplicates: list[str] = []
    n_duplicates = n = 0
    for record in read_noisy(path):
        n += 1
        if record.id in first_seen:
            n_duplicates += 1
            if len(duplicates) < 3:
                duplicates.append(f"{record.id!r} (lines {first_seen[record.id]} and {record.line})")
        else:
            first_seen[record.id] = record.line
    if n_duplicates:
        raise AuditError(f"{path}: {n_duplicates} record(s) repeat an id, first {', '.join(duplicates)}; ids key "
                         "the scores, so each must appear once (were two inject outputs concatenated?)")
    return n


def input_digest(source: NoisySource) -> str:
    """What identifies the input in the manifest and in the shards' fingerprint (``--resume``)."""
    if isinstance(source, NoisyRows):
        return rows_digest(source.rows)
    # a noisy JSONL: its bytes, as inject's manifest records a file input (``input_digest``)
    return "sha256:" + file_sha256(source)


@contextmanager
def _opened(source: NoisySource) -> Iterator[Iterator[tuple[str, bytes, Any, int]]]:
    """The source's records as (where, raw bytes, parsed row, line): a file's non-blank lines, or the rows in memory.

    The raw bytes give a record without an id its content hash (a UTF-8 BOM is not part of the line).
    """
    if isinstance(source, NoisyRows):
        yield ((f"{source.name} row {i}", row_json(row).encode("utf-8", "surrogatepass"), row, i + 1)
               for i, row in enumerate(source.rows))
        return
    if not source.exists():
        raise AuditError(f"{source}: no such file; run 'reweight-audit inject' first or check the path")
    with source.open("rb") as f:
        if f.read(4) == b"PAR1" or source.suffix.lower() in (".parquet", ".csv"):
            raise AuditError(f"{source}: a {source.suffix.lstrip('.') or 'parquet'} file; {NOT_JSONL}")
        f.seek(0)
        yield _jsonl_rows(source, f)


def _jsonl_rows(path: Path, lines: Iterable[bytes]) -> Iterator[tuple[str, bytes, Any, int]]:
    for lineno, raw in enumerate(lines, start=1):
        raw = raw.removeprefix(codecs.BOM_UTF8) if lineno == 1 else raw
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        yield where, raw, _decode_line(raw, where, first=lineno == 1), lineno

"""Corpus loading: one record type from every supported source.

Sources: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` files, ``hf:NAME[:CONFIG]``
(a Hugging Face dataset through ``datasets``) and ``champ`` (the CHAMP corpus
shipped in the ``champ-dataset`` package). Records are streamed so memory does
not grow with corpus size.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from reweight_audit.errors import AuditError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Record:
    """One SFT example. Only ``response`` is supervised and gets noise."""

    id: str
    prompt: str
    response: str
    messages: list[dict] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class FieldMap:
    """Which input fields hold the prompt, response and id."""

    prompt: str = "prompt"
    response: str = "response"
    id: str = "id"
    messages: str = "messages"
    id_required: bool = False  # a field named by the user: a record without it is an error, not a hash


@dataclass
class LoadReport:
    """What loading skipped, for the manifest."""

    bad_lines: list[int] = field(default_factory=list)
    empty_responses: list[str] = field(default_factory=list)


def content_id(prompt: str, response: str) -> str:
    """A stable id from content when the record has none of its own."""
    digest = hashlib.blake2b(f"{prompt}\x00{response}".encode("utf-8"), digest_size=8)
    return digest.hexdigest()


def describe_source(source: str) -> str:
    return source if source in ("champ",) or source.startswith("hf:") else str(Path(source))


def source_digest(source: str) -> str:
    """A digest of the input: the file's bytes, or the package/dataset name."""
    if source == "champ":
        return "sha256:" + hashlib.sha256(_champ_path().read_bytes()).hexdigest()
    if source.startswith("hf:"):
        return "hf:" + source[3:]
    path = Path(source)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def check_source(source: str) -> None:
    """Fail early, with the loader's message, for a file source that cannot be read."""
    if source.startswith("hf:"):
        _check_hub_dataset(source)
    if source == "champ" or source.startswith("hf:"):
        return
    path = Path(source)
    if not path.exists():
        raise AuditError(f"{source}: no such file; give a .jsonl/.json/.csv/.parquet path, 'hf:NAME[:CONFIG]' or 'champ'")
    if path.is_dir():
        raise AuditError(f"{source}: is a directory; give a .jsonl/.json/.csv/.parquet file")
    if path.suffix.lower() not in SUFFIXES:
        raise AuditError(f"{source}: unknown file type '{path.suffix}'; use one of {', '.join(SUFFIXES)}")


def iter_records(
    source: str,
    fields: FieldMap | None = None,
    *,
    split: str = "train",
    skip_bad: bool = False,
    report: LoadReport | None = None,
) -> Iterator[Record]:
    """Yield records from ``source``; empty responses are skipped and counted in ``report``."""
    fields = fields or FieldMap()
    report = report if report is not None else LoadReport()
    if source == "champ":
        rows: Iterable[tuple[str, dict]] = _champ_rows()
        fields = FieldMap()
    elif source.startswith("hf:"):
        rows = _hf_rows(source, split)
    else:
        check_source(source)
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = _jsonl_rows(path, skip_bad, report)
        elif suffix == ".json":
            rows = _json_rows(path)
        elif suffix == ".csv":
            rows = _csv_rows(path)
        elif suffix == ".parquet":
            rows = _parquet_rows(path)
        else:
            raise AuditError(f"{source}: unknown file type '{suffix}'; use one of {', '.join(SUFFIXES)}")
    for where, row in rows:
        record = _to_record(row, fields, where)
        if not record.response.strip():
            report.empty_responses.append(record.id)
            continue
        yield record


def _to_record(row: Any, fields: FieldMap, where: str) -> Record:
    if not isinstance(row, dict):
        raise AuditError(f"{where}: expected an object with fields, got {type(row).__name__}")
    messages = row.get(fields.messages)
    if fields.response in row:
        response = row[fields.response]
        prompt = row.get(fields.prompt, "")
        if fields.prompt not in row and not isinstance(messages, list):
            raise AuditError(
                f"{where}: no prompt field '{fields.prompt}'; fields present: {', '.join(map(str, row))}; "
                "choose one with --prompt-field"
            )
    elif isinstance(messages, list):
        prompt, response = _split_messages(messages, where)
    else:
        raise AuditError(
            f"{where}: no response field '{fields.response}' and no '{fields.messages}' chat column; "
            f"fields present: {', '.join(map(str, row))}; choose one with --response-field/--prompt-field"
        )
    if isinstance(prompt, list):  # a chat history as prompt: keep the text only
        prompt = "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    if not isinstance(response, str) or not isinstance(prompt, (str, type(None))):
        raise AuditError(f"{where}: field '{fields.response}'/'{fields.prompt}' must be text, got {type(response).__name__}")
    prompt = prompt or ""
    raw_id = row.get(fields.id)
    if fields.id_required and raw_id in (None, ""):
        state = "is empty" if fields.id in row else f"is missing (fields present: {', '.join(map(str, row))})"
        raise AuditError(f"{where}: id field '{fields.id}' {state}; choose the id field with --id-field, or leave "
                         "the option out to use 'id' where present and a content hash elsewhere")
    rid = str(raw_id) if raw_id not in (None, "") else content_id(prompt, response)
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    return Record(id=rid, prompt=prompt, response=response,
                  messages=messages if isinstance(messages, list) else None, meta=dict(meta))


def _split_messages(messages: list, where: str) -> tuple[str, str]:
    """Chat format: the last assistant turn is the response, the turn before it the prompt."""
    last = None
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "assistant":
            last = i
    if last is None:
        raise AuditError(f"{where}: 'messages' has no assistant turn; the last assistant turn is the response")
    response = str(messages[last].get("content") or "")
    users = [m for m in messages[:last] if isinstance(m, dict) and m.get("role") == "user"]
    prompt = str(users[-1].get("content") or "") if users else ""
    return prompt, response


def _jsonl_rows(path: Path, skip_bad: bool, report: LoadReport) -> Iterator[tuple[str, dict]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is not part of the record
            except UnicodeDecodeError as exc:
                if skip_bad:
                    report.bad_lines.append(lineno)
                    continue
                raise AuditError(f"{path}:{lineno}: not UTF-8 (byte {exc.start}); re-encode the file as UTF-8 or pass --skip-bad") from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                if skip_bad:
                    report.bad_lines.append(lineno)
                    continue
                raise AuditError(f"{path}:{lineno}: malformed JSON ({exc.msg}, column {exc.colno}); fix the line or pass --skip-bad") from None
            if not isinstance(row, dict):
                if skip_bad:
                    report.bad_lines.append(lineno)
                    continue
                raise AuditError(f"{path}:{lineno}: expected a JSON object per line; fix the line or pass --skip-bad")
            yield f"{path}:{lineno}", row


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the data
    except UnicodeDecodeError as exc:
        raise AuditError(f"{path}: not UTF-8 (byte offset {exc.start}); re-encode the file as UTF-8") from None


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise AuditError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); fix the file") from None
    if isinstance(data, dict):
        # {"data": [...]} or {"id": {...}, ...}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        else:
            data = [dict(v, id=v.get("id", k)) for k, v in data.items() if isinstance(v, dict)]
    if not isinstance(data, list):
        raise AuditError(f"{path}: expected a JSON list of objects; write one object per record")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        # utf-8-sig: with a BOM the first column would be named "\ufeffid" and silently be missing
        with path.open(newline="", encoding="utf-8-sig") as f:
            for lineno, row in enumerate(csv.DictReader(f), start=2):
                yield f"{path}:{lineno}", row
    except UnicodeDecodeError as exc:
        raise AuditError(f"{path}: not UTF-8 (byte offset {exc.start}); re-encode the file as UTF-8") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise AuditError(f"{path}: not a readable parquet file ({exc}); check the file") from None
    index = 0
    for batch in reader.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield f"{path} row {index}", row
            index += 1


def _check_hub_dataset(source: str) -> None:
    """A hub dataset (not a local folder) needs the hub: fail at once, naming why, when it cannot be reached."""
    from reweight_audit.hub import offline_reason

    name = source[3:].partition(":")[0]
    if not name:
        raise AuditError(f"{source}: give a dataset name as hf:NAME[:CONFIG]")
    reason = None if Path(name).exists() else offline_reason()
    if reason:
        raise AuditError(f"{source}: the hub is unreachable ({reason}) and hf: datasets are streamed from it; "
                         "save the dataset as .jsonl or .parquet on a machine with network access and pass that file")


def _hf_rows(source: str, split: str) -> Iterator[tuple[str, dict]]:
    _check_hub_dataset(source)
    name, _, config = source[3:].partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types; the message is what the user needs
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AuditError(f"{source} (split '{split}'): could not load ({first}); check the name, --split, and network access to the hub") from None
    for i, row in enumerate(dataset):
        yield f"{source}[{split}][{i}]", dict(row)


def _champ_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise AuditError("champ: the champ-dataset package is not installed; run 'make install' or 'pip install champ-dataset'")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_files" / "v0.json"


def _champ_rows() -> Iterator[tuple[str, dict]]:
    """CHAMP: prompt = problem text, response = solution steps joined by spaces.

    Read from the package's JSON directly; the ``@@`` markers of ``_raw_text``
    are already removed in ``_text``.
    """
    data = json.loads(_champ_path().read_text(encoding="utf-8"))
    for key, problem in data["problems"].items():
        steps = problem.get("solution", {}).get("steps", [])
        response = " ".join(step["_text"].strip() for step in steps if step.get("_text"))
        yield f"champ:{key}", {
            "id": problem.get("identifier") or key,
            "prompt": problem["_text"],
            "response": response,
            "meta": {"category": problem.get("category"), "source": "champ"},
        }

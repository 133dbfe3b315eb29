"""Corpus loading: one record type from every supported source.

Sources: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` files, ``hf:NAME[:CONFIG]``
(a Hugging Face dataset through ``datasets``), ``champ`` (the CHAMP corpus
shipped in the ``champ-dataset`` package: problems and their human-written
solutions) and ``champ-fws`` (the 540 model-written CHAMP solutions with a
human annotation of their first wrong step) and, from Python, a table in memory
(a pandas DataFrame or a ``datasets.Dataset``, :mod:`reweight_audit.core.frames`).
Records are streamed so memory does not grow with corpus size. A record may bring its own ``spans``
(``docs/formats.md``, "Spans"); step-labelled rows (``steps`` plus the index of
the first wrong step, as in ProcessBench) become a response with a
``wrong-step`` span.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from reweight_audit.core.spans import (BadAnnotation, check_after_error, check_spans, first_error_spans,
                                        steps_first_error)
from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import json_problem, parse_json
from reweight_audit.core.frames import TABLE_KINDS, check_table, is_table, rows_digest, table_rows

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
#: Characters one CSV cell may hold (the csv module's default, 131,072, is shorter than a long response).
CSV_FIELD_LIMIT = 1 << 30
CHAMP, CHAMP_FWS = "champ", "champ-fws"
BUILTIN_SOURCES = (CHAMP, CHAMP_FWS)
_SOURCE_HINT = "give a .jsonl/.json/.csv/.parquet path, 'hf:NAME[:CONFIG]', 'champ' or 'champ-fws'"


@dataclass
class Record:
    """One SFT example. Only ``response`` is supervised and gets noise."""

    id: str
    prompt: str
    response: str
    messages: list[dict] | None = None
    meta: dict = field(default_factory=dict)
    spans: list[dict] | None = None  # annotations that came with the record, checked against the response


@dataclass
class FieldMap:
    """Which input fields hold the prompt, response and id; ``steps`` set: step-labelled rows."""

    prompt: str = "prompt"
    response: str = "response"
    id: str = "id"
    messages: str = "messages"
    steps: str | None = None
    first_error: str = "label"
    id_required: bool = False  # a field named by the user: a record without it is an error, not a hash


@dataclass
class LoadReport:
    """What loading skipped, for the manifest."""

    bad_lines: list[int] = field(default_factory=list)
    empty_responses: list[str] = field(default_factory=list)
    bad_annotations: list[str] = field(default_factory=list)  # where: file:line or record id


def content_id(prompt: str, response: str) -> str:
    """A stable id from content when the record has none of its own."""
    digest = hashlib.blake2b(f"{prompt}\x00{response}".encode("utf-8"), digest_size=8)
    return digest.hexdigest()


def is_file_source(source: Any) -> bool:
    """True for a path, False for ``hf:...``, the built-in corpora and a table in memory."""
    return isinstance(source, str) and source not in BUILTIN_SOURCES and not source.startswith("hf:")


def describe_source(source: Any) -> str:
    if is_table(source):
        return type(source).__name__
    return str(Path(source)) if is_file_source(source) else source


def source_digest(source: Any) -> str:
    """A digest of the input: the file's bytes, the table's rows, or the package/dataset name."""
    if is_table(source):
        return rows_digest(table_rows(source))
    if source in BUILTIN_SOURCES:
        return "sha256:" + hashlib.sha256(_champ_path().read_bytes()).hexdigest()
    if source.startswith("hf:"):
        return "hf:" + source[3:]
    path = Path(source)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def check_source(source: Any) -> None:
    """Fail early, with the loader's message, for a source that cannot be read."""
    check_table(source, "corpus")
    if not isinstance(source, str) and not is_table(source):
        raise AuditError(f"corpus: got {type(source).__name__}; {_SOURCE_HINT}, or {TABLE_KINDS}")
    if isinstance(source, str) and source.startswith("hf:"):
        _check_hub_dataset(source)
    if not is_file_source(source):
        return
    path = Path(source)
    if not path.exists():
        raise AuditError(f"{source}: no such file; {_SOURCE_HINT}")
    if path.is_dir():
        raise AuditError(f"{source}: is a directory; give a .jsonl/.json/.csv/.parquet file")
    if path.suffix.lower() not in SUFFIXES:
        raise AuditError(f"{source}: unknown file type '{path.suffix}'; use one of {', '.join(SUFFIXES)}")


def iter_records(
    source: Any,
    fields: FieldMap | None = None,
    *,
    split: str = "train",
    skip_bad: bool = False,
    report: LoadReport | None = None,
    after_error: str = "cut",
) -> Iterator[Record]:
    """Yield records from ``source``; empty responses are skipped and counted in ``report``.

    ``after_error`` (``cut`` or ``keep``) is what first-error annotations
    (``champ-fws``, step-labelled rows) do with the text after the wrong step.
    A record whose annotations do not fit its text stops the run with a line
    naming it, or (``skip_bad``) is skipped and counted in ``report``.
    """
    fields = fields or FieldMap()
    report = report if report is not None else LoadReport()
    check_after_error(after_error)
    if is_table(source):
        name = type(source).__name__
        rows: Iterable[tuple[str, dict]] = ((f"{name} row {i}", row) for i, row in enumerate(table_rows(source)))
    elif source in BUILTIN_SOURCES:
        if fields.steps is not None:
            raise AuditError(f"--steps-field: {source} has no step-labelled rows; use it with a file or an hf: dataset")
        rows = _champ_rows() if source == CHAMP else _champ_fws_rows()
        fields = FieldMap()
    elif source.startswith("hf:"):
        rows = _hf_rows(source, split)
    else:
        rows = _file_rows(source, skip_bad, report)
    for where, row in rows:
        try:
            record = _build_record(source, row, fields, where, after_error)
        except BadAnnotation as exc:
            if not skip_bad:
                raise AuditError(f"{where}: {exc}; fix the annotation or pass --skip-bad to skip such records") from None
            report.bad_annotations.append(where)
            continue
        if not record.response.strip():
            report.empty_responses.append(record.id)
            continue
        yield record


def _file_rows(source: str, skip_bad: bool, report: LoadReport) -> Iterable[tuple[str, dict]]:
    check_source(source)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path, skip_bad, report)
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".csv":
        return _csv_rows(path)
    return _parquet_rows(path)


def _build_record(source: Any, row: Any, fields: FieldMap, where: str, after_error: str) -> Record:
    if not isinstance(row, dict):
        raise AuditError(f"{where}: expected an object with fields, got {type(row).__name__}")
    if isinstance(source, str) and source == CHAMP_FWS:
        return _champ_fws_record(row, after_error)
    if fields.steps is not None:
        return _steps_record(row, fields, where, after_error)
    return _to_record(row, fields, where)


def _to_record(row: dict, fields: FieldMap, where: str) -> Record:
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
    prompt = _prompt_text(prompt, where)
    if not isinstance(response, str):
        raise AuditError(f"{where}: field '{fields.response}' must be text, got {type(response).__name__}")
    if not isinstance(prompt, (str, type(None))):
        raise AuditError(f"{where}: field '{fields.prompt}' must be text, got {type(prompt).__name__}")
    prompt = prompt or ""
    spans = row.get("spans")
    if spans is not None and spans != "":  # an empty CSV cell is no spans
        spans = check_spans(response, _json_text(spans))
    else:
        spans = None
    return Record(id=_record_id(row, fields, prompt, response, where), prompt=prompt, response=response,
                  messages=messages if isinstance(messages, list) else None, meta=_meta(row), spans=spans)


def _steps_record(row: dict, fields: FieldMap, where: str, after_error: str) -> Record:
    """A step-labelled row: response = the steps joined by a blank line, a ``wrong-step`` span over the first wrong one."""
    for name, option in ((fields.steps, "--steps-field"), (fields.first_error, "--first-error-field"),
                         (fields.prompt, "--prompt-field")):
        if name not in row:
            raise AuditError(f"{where}: no field '{name}'; fields present: {', '.join(map(str, row))}; "
                             f"choose one with {option}")
    prompt = _prompt_text(row[fields.prompt], where)
    if not isinstance(prompt, (str, type(None))):
        raise AuditError(f"{where}: field '{fields.prompt}' must be text, got {type(prompt).__name__}")
    steps = _json_text(row[fields.steps])
    response, spans, label = steps_first_error(steps, row[fields.first_error], after_error)
    meta = {**_meta(row), "first_error_step": label, "steps": len(steps)}
    return Record(id=_record_id(row, fields, prompt or "", response, where), prompt=prompt or "", response=response,
                  meta=meta, spans=spans)


def _prompt_text(prompt: Any, where: str) -> Any:
    if isinstance(prompt, list):  # a chat history as prompt: keep the text only
        return "\n".join(content_text(m.get("content"), f"{where}: the prompt's chat history") for m in prompt
                         if isinstance(m, dict))
    return prompt


def _json_text(value: Any) -> Any:
    """A list written as JSON text (a CSV cell) as the list; anything else as it is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _record_id(row: dict, fields: FieldMap, prompt: str, response: str, where: str) -> str:
    raw_id = row.get(fields.id)
    if fields.id_required and raw_id in (None, ""):
        state = "is empty" if fields.id in row else f"is missing (fields present: {', '.join(map(str, row))})"
        raise AuditError(f"{where}: id field '{fields.id}' {state}; choose the id field with --id-field, or leave "
                         "the option out to use 'id' where present and a content hash elsewhere")
    return str(raw_id) if raw_id not in (None, "") else content_id(prompt, response)


def _meta(row: dict) -> dict:
    return dict(row["meta"]) if isinstance(row.get("meta"), dict) else {}


def _split_messages(messages: list, where: str) -> tuple[str, str]:
    """Chat format: the last assistant turn is the response, the turn before it the prompt."""
    last = None
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "assistant":
            last = i
    if last is None:
        raise AuditError(f"{where}: 'messages' has no assistant turn; the last assistant turn is the response")
    response = content_text(messages[last].get("content"), f"{where}: the assistant turn")
    users = [m for m in messages[:last] if isinstance(m, dict) and m.get("role") == "user"]
    prompt = content_text(users[-1].get("content"), f"{where}: the user turn") if users else ""
    return prompt, response


def content_text(content: Any, where: str) -> str:
    """A chat turn's content as text: a string, or a list of parts (the OpenAI / Hugging Face format) whose text
    parts are joined as the chat templates join them (no separator); any other part is refused by its type."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise AuditError(f"{where}: content must be text or a list of parts, got {type(content).__name__}")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise AuditError(f"{where}: a content part of type {kind!r} is not text; only text parts can be "
                             "scored (drop the other parts or the record)")
    return "".join(texts)


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
                row = parse_json(text)
            except (ValueError, RecursionError) as exc:
                if skip_bad:
                    report.bad_lines.append(lineno)
                    continue
                raise AuditError(f"{path}:{lineno}: {json_problem(exc)}; fix the line or pass --skip-bad") from None
            if not isinstance(row, dict):
                if skip_bad:
                    report.bad_lines.append(lineno)
                    continue
                raise AuditError(f"{path}:{lineno}: expected a JSON object per line; fix the line or pass --skip-bad")
            yield f"{path}:{lineno}", row


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "…"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the data
    except UnicodeDecodeError as exc:
        raise AuditError(f"{path}: not UTF-8 (byte offset {exc.start}); re-encode the file as UTF-8") from None


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        data = parse_json(_read_text(path))
    except json.JSONDecodeError as exc:
        raise AuditError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); fix the file") from None
    except (ValueError, RecursionError) as exc:
        raise AuditError(f"{path}: {json_problem(exc)}; fix the file") from None
    if isinstance(data, dict):
        # {"data": [...]} or {"id": {...}, ...}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        else:
            data = [dict(v, id=v.get("id", k)) for k, v in data.items() if isinstance(v, dict)]
            if not data:
                raise AuditError(f"{path}: a JSON object, but not of records (no list of objects, no object per id); "
                                 "write a list of objects, one per record")
    if not isinstance(data, list):
        raise AuditError(f"{path}: expected a JSON list of objects; write one object per record")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        # utf-8-sig: with a BOM the first column would be named "\ufeffid" and silently be missing
        csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))  # a long response is one cell
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            try:
                for row in reader:
                    yield f"{path}:{reader.line_num}", row
            except csv.Error as exc:
                raise AuditError(f"{path}:{reader.line_num}: not readable as CSV ({_one_line(exc)}); fix the "
                                 "line") from None
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
    from reweight_audit.core.hub import offline_reason

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
    for key, problem in _champ_data()["problems"].items():
        steps = problem.get("solution", {}).get("steps", [])
        response = " ".join(step["_text"].strip() for step in steps if step.get("_text"))
        yield f"champ:{key}", {
            "id": problem.get("identifier") or key,
            "prompt": problem["_text"],
            "response": response,
            "meta": {"category": problem.get("category"), "source": "champ"},
        }


def _champ_data() -> dict:
    return json.loads(_champ_path().read_text(encoding="utf-8"))


def _champ_fws_rows() -> Iterator[tuple[str, dict]]:
    """CHAMP's first-wrong-step annotations: one row per annotated model solution (540: 444 with an error).

    ``fws_annotations`` is keyed ``"<model>|<prompt setting>"``; each holds the
    solution ``text`` and ``start_idx``/``end_idx`` of its first wrong step
    (both null when a person found none). ``author`` is the model that wrote it.
    """
    for pid, problem in _champ_data()["problems"].items():
        for key, note in (problem.get("fws_annotations") or {}).items():
            model, _, setting = key.partition("|")
            rid = f"{problem.get('identifier') or pid}|{key}"
            yield f"champ-fws:{rid}", {
                "id": rid,
                "prompt": problem["_text"],
                "text": note.get("text"),
                "start_idx": note.get("start_idx"),
                "end_idx": note.get("end_idx"),
                "meta": {"source": CHAMP_FWS, "problem": pid, "category": problem.get("category"),
                         "model": model, "setting": setting, "has_error": note.get("start_idx") is not None},
            }


def _champ_fws_record(row: dict, after_error: str) -> Record:
    """prompt = the problem, response = the model's solution, a ``wrong-step`` span over the annotated characters."""
    text, start, end = row["text"], row["start_idx"], row["end_idx"]
    if not isinstance(text, str):
        raise BadAnnotation(f"the annotated solution is {type(text).__name__}, not text")
    if (start is None) != (end is None):
        raise BadAnnotation(f"start_idx {start!r} and end_idx {end!r}: give both or neither")
    wrong = None
    if start is not None:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
            raise BadAnnotation(f"start_idx {start!r}/end_idx {end!r} are not character offsets")
        wrong = (start, end)
    response, spans = first_error_spans(text, wrong, after_error)
    return Record(id=row["id"], prompt=row["prompt"], response=response, meta=dict(row["meta"]), spans=spans)


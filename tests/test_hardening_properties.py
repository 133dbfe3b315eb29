"""Issue 23, property-based: any input either loads or is the project's one-line AuditError, never another exception.

The readers (inject's corpus reader, score's noisy-JSONL reader) and the stats-table validator (compare's
``load_run``) are fed what hypothesis makes up: bytes, JSON values of any shape, columns of any type and value.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reweight_audit.core.errors import AuditError

# derandomize: the same examples on every run, so CI is repeatable (a found case becomes a test of its own)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
#: Keys a reader looks for, so that made-up records reach the checks past "no response field".
record_keys = st.sampled_from(["id", "prompt", "response", "spans", "messages", "meta", "text", "start", "end",
                               "kind", "role", "content", "type"])
records = st.dictionaries(record_keys | st.text(max_size=6), json_values, max_size=6)
#: Lines of a file: JSON records, bare JSON values, and raw text (malformed JSON, odd escapes, huge numbers).
odd_lines = st.sampled_from(['{"id": 1e999}', '{"response": "\\ud800"}', '{"id": ' + "9" * 5000 + "}",
                             "[" * 5000, '{"response": "x", "spans": [{"start": 0.5, "end": 1}]}', "\ufeff{}", ""])
lines = st.one_of(records.map(json.dumps), json_values.map(json.dumps), st.text(max_size=40), odd_lines)


def _one_line(exc: AuditError) -> None:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text


_scratch: list[Path] = []  # the module's scratch folder (hypothesis runs many examples in one test function)


@pytest.fixture(scope="module", autouse=True)
def _scratch_folder():
    with tempfile.TemporaryDirectory(prefix="prop-") as folder:
        _scratch.append(Path(folder))
        yield
        _scratch.pop()


def _written(data: bytes, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(dir=_scratch[-1]))  # an example's own folder, removed with the module's
    path = folder / name
    path.write_bytes(data)
    return path


def _file_bytes(text_lines: list[str], raw: bytes | None) -> bytes:
    return raw if raw is not None else "\n".join(text_lines).encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- inject's corpus reader


@SETTINGS
@given(text_lines=st.lists(lines, max_size=5), raw=st.none() | st.binary(max_size=200),
       suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_the_corpus_reader_loads_or_refuses_in_one_line(text_lines, raw, suffix):
    from reweight_audit.injection.corpus import FieldMap, iter_records

    path = _written(_file_bytes(text_lines, raw), "corpus" + suffix)
    try:
        loaded = list(iter_records(str(path), FieldMap()))
    except AuditError as exc:
        _one_line(exc)
        return
    for record in loaded:  # what loads is text, whatever the file held
        assert isinstance(record.response, str) and record.response
        assert isinstance(record.prompt, str)
        record.response.encode("utf-8")  # no lone surrogate got through


# --------------------------------------------------------------------------- score's reader


@SETTINGS
@given(text_lines=st.lists(lines, max_size=5), raw=st.none() | st.binary(max_size=200))
def test_the_noisy_jsonl_reader_loads_or_refuses_in_one_line(text_lines, raw):
    from reweight_audit.scoring.reader import read_noisy, scan_input

    path = _written(_file_bytes(text_lines, raw), "noisy.jsonl")
    try:
        scan_input(path)
        loaded = list(read_noisy(path))
    except AuditError as exc:
        _one_line(exc)
        return
    for record in loaded:
        record.response.encode("utf-8")
        for span in record.spans:  # spans that fit the text, as the encoder indexes them
            assert 0 <= span["start"] < span["end"] <= len(record.response)


@SETTINGS
@given(rows=st.lists(records, max_size=4))
def test_rows_in_memory_load_or_refuse_in_one_line(rows):
    from reweight_audit.scoring.reader import NoisyRows, read_noisy

    try:
        list(read_noisy(NoisyRows(rows)))
    except AuditError as exc:
        _one_line(exc)


# --------------------------------------------------------------------------- the stats-table validator

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
N_ROWS = st.integers(min_value=0, max_value=6)


def _column(kind: str, n: int):
    """A strategy for one column of ``n`` values of ``kind``, nulls allowed."""
    values = {
        "float": floats, "int": st.integers(min_value=-3, max_value=10**6), "bool": st.booleans(),
        "text": st.text(max_size=4), "list": st.lists(st.integers(0, 3), max_size=2),
    }[kind]
    return st.lists(st.none() | values, min_size=n, max_size=n)


@st.composite
def stats_tables(draw) -> pa.Table:
    n = draw(N_ROWS)
    names = ["seq_id", "pos", "token", "logp", "is_noise", "entropy", "rank", "expected_rank", "noise_kind", "extra"]
    kinds = ["float", "int", "bool", "text", "list"]
    typical = {"seq_id": "text", "pos": "int", "token": "text", "logp": "float", "is_noise": "bool",
               "entropy": "float", "rank": "int", "expected_rank": "float", "noise_kind": "text", "extra": "float"}
    columns = {}
    for name in names:
        if name not in ("seq_id", "pos", "token", "logp", "is_noise") and draw(st.booleans()):
            continue  # an optional column left out
        if draw(st.booleans()) and not draw(st.booleans()):  # a required column missing, now and then
            continue
        kind = typical[name] if draw(st.integers(0, 3)) else draw(st.sampled_from(kinds))
        columns[name] = draw(_column(kind, n))
    if "pos" in columns and draw(st.booleans()):  # distinct positions, so the later checks are reached too
        columns["pos"] = list(range(n))
    return pa.table({name: pa.array(values) for name, values in columns.items()}) if columns else pa.table({})


@SETTINGS
@given(table=stats_tables())
def test_the_stats_validator_loads_or_refuses_in_one_line(table):
    from reweight_audit.evaluation.runs import StatsTable, load_run

    try:
        run = load_run(StatsTable(table, "made-up.parquet"))
    except AuditError as exc:
        _one_line(exc)
        return
    # what loads is what the methods may trust: finite log p ≤ 0, boolean labels, in-range known statistics
    logp = run.column("logp")
    assert np.isfinite(logp).all() and logp.max() <= 1e-3
    assert run.is_noise.dtype == bool and len(run.is_noise) == run.n_tokens
    for name, low in (("entropy", 0.0), ("rank", 1.0), ("expected_rank", 1.0)):
        if name in run.columns:
            values = run.column(name)
            finite = values[np.isfinite(values)]
            assert not np.isinf(values).any() and (finite >= low - 1e-4 * max(1.0, low)).all(), name
            if name == "rank":
                assert all(math.isclose(v, round(v)) for v in finite)


def test_a_field_name_with_a_line_break_stays_one_line():
    """Found by hypothesis (``rows=[{'\\n': None}]``): the field names of a record without a response went into
    the message as they were; AuditError escapes any control character that reaches its message."""
    from reweight_audit.scoring.reader import NoisyRows, read_noisy

    with pytest.raises(AuditError) as caught:
        list(read_noisy(NoisyRows([{"\n": None, "a\tb": 1}])))
    assert "\n" not in str(caught.value) and "\\n" in str(caught.value) and "\\t" in str(caught.value)

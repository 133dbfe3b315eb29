"""Corpus loaders: every format, field mapping, chat messages, stable ids, bad input."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from reweight_audit.injection.corpus import FieldMap, LoadReport, content_id, iter_records
from reweight_audit.core.errors import AuditError

ROWS = [
    {"id": "a", "prompt": "What is 2+2?", "response": "It is 4."},
    {"id": "b", "prompt": "Name a prime.", "response": "Seven is prime."},
]


def test_jsonl_json_csv_parquet_give_the_same_records(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps(ROWS), encoding="utf-8")
    pd.DataFrame(ROWS).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "c.parquet")
    expected = [(r["id"], r["prompt"], r["response"]) for r in ROWS]
    for name in ("c.jsonl", "c.json", "c.csv", "c.parquet"):
        got = [(r.id, r.prompt, r.response) for r in iter_records(str(tmp_path / name))]
        assert got == expected, name


def test_field_mapping_and_content_ids(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n", encoding="utf-8")
    [rec] = iter_records(str(path), FieldMap(prompt="question", response="answer"))
    assert (rec.prompt, rec.response) == ("Q?", "A.")
    assert rec.id == content_id("Q?", "A.")
    [again] = iter_records(str(path), FieldMap(prompt="question", response="answer"))
    assert again.id == rec.id


def test_chat_messages_last_assistant_turn_is_the_response(tmp_path):
    path = tmp_path / "chat.jsonl"
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "two"},
    ]
    path.write_text(json.dumps({"id": 7, "messages": messages}) + "\n", encoding="utf-8")
    [rec] = iter_records(str(path))
    assert (rec.id, rec.prompt, rec.response) == ("7", "second", "two")
    assert rec.messages == messages


def test_champ_has_270_records_with_text():
    records = list(iter_records("champ"))
    assert len(records) == 270
    assert all(r.prompt.strip() and r.response.strip() for r in records)
    assert len({r.id for r in records}) == 270
    assert "@@" not in "".join(r.response for r in records)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(AuditError, match="no such file"):
        list(iter_records(str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(AuditError, match="unknown file type"):
        list(iter_records(str(tmp_path / "x.txt")))


def test_malformed_line_names_the_line_and_skip_bad_counts(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{not json\n\xff\xfe\n{"prompt": "p", "response": "s"}\n')
    with pytest.raises(AuditError, match=r"bad.jsonl:2: malformed JSON.*--skip-bad"):
        list(iter_records(str(path)))
    report = LoadReport()
    records = list(iter_records(str(path), skip_bad=True, report=report))
    assert [r.response for r in records] == ["r", "s"]
    assert report.bad_lines == [2, 3]


def test_non_utf8_is_reported(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"prompt": "p", "response": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(AuditError, match=r"latin.jsonl:1: not UTF-8"):
        list(iter_records(str(path)))


def test_missing_field_lists_the_fields_present(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(AuditError, match=r"f.jsonl:1: no response field 'response'.*fields present: question, answer"):
        list(iter_records(str(path)))


def test_empty_responses_are_skipped_and_counted(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "1", "prompt": "p", "response": "   \n"},
        {"id": "2", "prompt": "p", "response": "fine"},
        {"id": "3", "prompt": "p", "response": ""},
    ]) + "\n")
    report = LoadReport()
    assert [r.id for r in iter_records(str(path), report=report)] == ["2"]
    assert report.empty_responses == ["1", "3"]


def test_hf_loader_reads_a_local_dataset_directory(tmp_path):
    # datasets resolves a local directory without the hub; the hf: path is the same code a hub id takes
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    got = [(r.id, r.prompt, r.response) for r in iter_records(f"hf:{folder}", split="train")]
    assert got == [(r["id"], r["prompt"], r["response"]) for r in ROWS]
    with pytest.raises(AuditError, match="split 'nope'"):
        list(iter_records(f"hf:{folder}", split="nope"))

"""Step-labelled rows (ProcessBench style): steps joined by a blank line, a wrong-step span, the after-error rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reweight_audit.core.spans import BadAnnotation, first_error_spans, steps_first_error
from reweight_audit.injection.corpus import FieldMap, LoadReport, iter_records
from reweight_audit.core.errors import AuditError
from reweight_audit.injection.run import run_inject
from reweight_audit.injection.config import InjectConfig

SAMPLE = Path(__file__).parent / "data" / "processbench_sample.jsonl"
FIELDS = FieldMap(prompt="problem", steps="steps", first_error="label")


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


def test_cut_ends_each_response_with_its_first_wrong_step():
    rows = sample_rows()
    records = list(iter_records(str(SAMPLE), FIELDS))
    assert [r.id for r in records] == [row["id"] for row in rows]
    no_error, first, middle, last = records
    assert no_error.response == "\n\n".join(rows[0]["steps"]) and no_error.spans == []
    assert first.response == "Two books cost 2 * 12 = 26 dollars."
    assert first.spans == [{"start": 0, "end": 35, "kind": "wrong-step", "text": first.response}]
    steps = rows[2]["steps"]
    start = len(steps[0]) + 2 + len(steps[1]) + 2  # two steps and two blank-line separators before it
    assert middle.response == "\n\n".join(steps[:3])
    assert middle.spans == [{"start": start, "end": start + len(steps[2]), "kind": "wrong-step", "text": steps[2]}]
    # a wrong step with surrounding spaces: the response loses its trailing blanks, the span with it
    assert last.response.endswith("So the answer is 1000.")
    assert last.spans[0]["text"] == "  So the answer is 1000."
    assert [r.meta["first_error_step"] for r in records] == [-1, 0, 2, 1]
    assert middle.prompt == rows[2]["problem"] and middle.meta["steps"] == 5


def test_keep_labels_what_follows_as_after_error():
    records = list(iter_records(str(SAMPLE), FIELDS, after_error="keep"))
    rows = sample_rows()
    for rec, row in zip(records, rows):
        assert rec.response == "\n\n".join(row["steps"])
        for span in rec.spans:
            assert rec.response[span["start"]:span["end"]] == span["text"]
    middle = records[2]
    wrong, after = middle.spans
    assert wrong["text"] == rows[2]["steps"][2]
    assert after == {"start": wrong["end"] + 2, "end": len(middle.response), "kind": "after-error",
                     "text": "\n\n".join(rows[2]["steps"][3:])}
    assert [len(r.spans) for r in records] == [0, 2, 2, 1]  # the last step has nothing after it


def test_inject_keeps_the_wrong_step_and_records_the_choice(tmp_path):
    out = tmp_path / "noisy.jsonl"
    result = run_inject(str(SAMPLE), out, InjectConfig(prompt_field="problem", steps_field="steps", after_error="keep",
                                                       noise="filler", rate=1.0))
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    kept = [s for r in rows for s in r["spans"] if s["kind"] in ("wrong-step", "after-error")]
    assert len(kept) == 5
    assert all(r["response"][s["start"]:s["end"]] == s["text"] for r in rows for s in r["spans"])
    assert result.manifest["loader"] == {"source": str(SAMPLE), "steps_field": "steps",
                                         "first_error_field": "label", "after_error": "keep"}
    assert result.manifest["kept_spans_by_kind"] == {"after-error": 2, "wrong-step": 3}


def test_other_field_names_and_text_labels(tmp_path):
    src = tmp_path / "mine.csv"
    src.write_text('q,chain,first_bad\nWhat?,"[""a b"", ""c d""]",1\nWhy?,"[""e f""]",-1\n', encoding="utf-8")
    fields = FieldMap(prompt="q", steps="chain", first_error="first_bad")
    first, second = iter_records(str(src), fields)
    assert first.response == "a b\n\nc d" and first.spans[0]["text"] == "c d"
    assert second.response == "e f" and second.spans == []


@pytest.mark.parametrize("row, message", [
    ({"problem": "p", "steps": ["a", "b"], "label": 2}, "outside the 2 steps"),
    ({"problem": "p", "steps": ["a", "b"], "label": -2}, "outside the 2 steps"),
    ({"problem": "p", "steps": ["a", "b"], "label": 0.5}, "not an integer"),
    ({"problem": "p", "steps": ["a", "  "], "label": 1}, "blank"),
    ({"problem": "p", "steps": "a b", "label": 0}, "list of texts"),
])
def test_bad_labels_name_the_line_or_are_skipped(tmp_path, row, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"problem": "p", "steps": ["x y"], "label": -1}) + "\n" + json.dumps(row) + "\n",
                   encoding="utf-8")
    with pytest.raises(AuditError, match=message) as info:
        list(iter_records(str(src), FIELDS))
    assert str(info.value).startswith(f"{src}:2: ")
    report = LoadReport()
    assert len(list(iter_records(str(src), FIELDS, skip_bad=True, report=report))) == 1
    assert report.bad_annotations == [f"{src}:2"]


def test_missing_fields_say_which_option_to_use(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"problem": "p", "steps": ["a"]}) + "\n", encoding="utf-8")
    with pytest.raises(AuditError, match="no field 'label'.*--first-error-field"):
        list(iter_records(str(src), FIELDS))
    with pytest.raises(AuditError, match="no field 'reasoning'.*--steps-field"):
        list(iter_records(str(src), FieldMap(prompt="problem", steps="reasoning")))
    with pytest.raises(AuditError, match="--after-error"):
        list(iter_records(str(src), FIELDS, after_error="drop"))
    with pytest.raises(AuditError, match="--steps-field: champ-fws has no step-labelled rows"):
        list(iter_records("champ-fws", FIELDS))


def test_first_error_spans_by_hand():
    text = "Step one.\n\nStep two is wrong. \n\nStep three."
    wrong = (11, 30)  # "Step two is wrong. "
    assert first_error_spans(text, wrong, "cut") == (
        "Step one.\n\nStep two is wrong.", [{"start": 11, "end": 29, "kind": "wrong-step", "text": "Step two is wrong."}])
    response, spans = first_error_spans(text, wrong, "keep")
    assert response == text
    assert spans == [{"start": 11, "end": 30, "kind": "wrong-step", "text": "Step two is wrong. "},
                     {"start": 32, "end": 43, "kind": "after-error", "text": "Step three."}]
    assert first_error_spans(text, None, "cut") == (text, [])
    with pytest.raises(BadAnnotation, match="outside"):
        first_error_spans(text, (40, 50), "cut")
    assert steps_first_error(["a", "b", "c"], "1", "cut") == ("a\n\nb", [{"start": 3, "end": 4, "kind": "wrong-step",
                                                                        "text": "b"}], 1)

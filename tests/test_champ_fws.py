"""The champ-fws source: CHAMP's 540 model solutions with their annotated first wrong step."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from reweight_audit.cli import app
from reweight_audit.injection.corpus import _champ_data, iter_records


@pytest.fixture(scope="module")
def annotations() -> dict:
    """The package's own annotations, read straight from its data file: the reference for every check."""
    notes = {}
    for pid, problem in _champ_data()["problems"].items():
        for key, note in (problem.get("fws_annotations") or {}).items():
            notes[f"{pid}|{key}"] = (problem["_text"], note)
    return notes


@pytest.fixture(scope="module")
def cut() -> list:
    return list(iter_records("champ-fws"))


@pytest.fixture(scope="module")
def keep() -> list:
    return list(iter_records("champ-fws", after_error="keep"))


def test_540_solutions_444_with_a_wrong_step(cut, annotations):
    assert len(cut) == 540 == len({r.id for r in cut}) == len(annotations)
    assert sum(bool(r.spans) for r in cut) == 444
    assert sum(not r.spans for r in cut) == 96
    assert Counter(r.meta["model"] for r in cut) == {"GPT-3.5": 134, "GPT-4": 136, "GPT-4 Turbo": 134,
                                                     "PaLM 2 Medium": 136}
    assert Counter(r.meta["setting"] for r in cut) == {"No C w/o H": 270, "Direct C w/ H": 270}


def test_cut_ends_at_the_wrong_step(cut, annotations):
    for rec in cut:
        problem, note = annotations[rec.id]
        assert rec.prompt == problem and rec.meta["model"] == note["author"]
        text, start, end = note["text"], note["start_idx"], note["end_idx"]
        if start is None:
            assert rec.response == text and rec.spans == [] and rec.meta["has_error"] is False
            continue
        [span] = rec.spans
        assert rec.response == text[:end].rstrip()
        assert span["kind"] == "wrong-step" and span["start"] == start and span["end"] == len(rec.response)
        assert span["text"] == text[start:end].rstrip() == rec.response[start:]


def test_keep_labels_the_rest_after_error(keep, annotations):
    after = 0
    for rec in keep:
        _, note = annotations[rec.id]
        assert rec.response == note["text"]
        for span in rec.spans:
            assert rec.response[span["start"]:span["end"]] == span["text"]
        if note["start_idx"] is not None:
            wrong = rec.spans[0]
            assert (wrong["kind"], wrong["start"], wrong["end"]) == ("wrong-step", note["start_idx"], note["end_idx"])
            if len(rec.spans) == 2:
                after += 1
                tail = rec.spans[1]
                assert tail["kind"] == "after-error" and tail["end"] == len(rec.response.rstrip())
                assert not rec.response[wrong["end"]:tail["start"]].strip()
            else:  # the wrong step is the end of the solution
                assert not rec.response[wrong["end"]:].strip()
    assert after == 432


def test_inject_records_the_choice_and_keeps_the_spans(tmp_path):
    out = tmp_path / "fws.jsonl"
    result = CliRunner().invoke(app, ["inject", "champ-fws", "-o", str(out), "--after-error", "keep", "--limit", "12",
                                      "--noise", "filler,typo", "--rate", "0.5", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    manifest = json.loads((tmp_path / "fws.jsonl.manifest.json").read_text(encoding="utf-8"))
    assert manifest["loader"]["after_error"] == "keep" and manifest["loader"]["source"] == "champ-fws"
    kinds = Counter(s["kind"] for r in rows for s in r["spans"])
    assert kinds["wrong-step"] == manifest["kept_spans_by_kind"]["wrong-step"] > 0
    assert kinds["filler"] > 0 and "kept" in result.output
    for row in rows:
        spans = row["spans"]
        assert all(row["response"][s["start"]:s["end"]] == s["text"] for s in spans)
        kept = [s for s in spans if s["kind"] in ("wrong-step", "after-error")]
        noise = [s for s in spans if s not in kept]
        assert not any(n["start"] < k["end"] and k["start"] < n["end"] for n in noise for k in kept)
        assert {"model", "setting", "problem"} <= set(row["meta"])

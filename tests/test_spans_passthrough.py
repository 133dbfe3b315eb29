"""Spans that come with a corpus survive inject: moved exactly through the edits, never overlapped by noise."""
from __future__ import annotations

import json
import random

import pytest

from reweight_audit.core.spans import BadAnnotation, check_spans
from reweight_audit.injection.corpus import LoadReport, Record, iter_records
from reweight_audit.core.errors import AuditError
from reweight_audit.injection.run import inject_records, run_inject
from reweight_audit.core.io import manifest_path
from reweight_audit.injection.noise import NoiseConfig, Noiser, Span, _Edit, apply_edits, known_kinds, shift_spans
from reweight_audit.injection.config import InjectConfig

WORDS = ["the", "answer", "is", "$x^2$", "12", "3.5", "apples", "`code`", "so", "we", "get", "café", "数学",
         "\\(a+b\\)", "thus", "hmm,", "(note)", "x_1", "7th", "1,000"]
SEPARATORS = [" ", " ", " ", "\n", "\n\n", "  ", "\t", "\r\n"]


def random_text(rng: random.Random) -> str:
    n = rng.randint(1, 60)
    parts = []
    for i in range(n):
        parts.append(rng.choice(WORDS))
        if i < n - 1:
            parts.append(rng.choice(SEPARATORS))
    return rng.choice(["", " ", "\n"]) + "".join(parts) + rng.choice(["", ".", " \n"])


def random_spans(rng: random.Random, text: str) -> list[dict]:
    """Up to four spans at random offsets (they may overlap each other or touch word edges)."""
    spans = []
    for _ in range(rng.randint(0, 4)):
        if len(text) < 1:
            break
        start = rng.randrange(len(text))
        end = rng.randint(start + 1, min(len(text), start + 40))
        spans.append({"start": start, "end": end, "kind": rng.choice(["wrong-step", "after-error", "mine"]),
                      "text": text[start:end]})
    return spans


def random_config(rng: random.Random) -> NoiseConfig:
    kinds = [k for k in known_kinds() if k != "random-token"]
    chosen = rng.sample(kinds, rng.randint(1, len(kinds)))
    if rng.random() < 0.5:
        return NoiseConfig(noise=",".join(chosen), rate=rng.choice([0.2, 0.6, 1.0]), seed=rng.randrange(100))
    return NoiseConfig(noise=",".join(chosen), target_frac=rng.choice([0.1, 0.4]), seed=rng.randrange(100))


def overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_given_spans_move_exactly_and_noise_stays_outside_them():
    rng = random.Random(1234)
    moved = 0
    for case in range(400):
        text = random_text(rng)
        given = random_spans(rng, text)
        records = [Record(id=f"c{case}", prompt="", response=text, spans=given)]
        [out] = inject_records(records, random_config(rng))
        kept, injected = out["spans"][:len(given)], out["spans"][len(given):]
        assert [(s["kind"], s["text"]) for s in kept] == [(s["kind"], s["text"]) for s in given]
        for span in out["spans"]:
            assert out["response"][span["start"]:span["end"]] == span["text"], (case, span)
        for noise in injected:
            assert noise["kind"] in known_kinds()
            assert not any(overlaps(noise, span) for span in kept), (case, noise)
        moved += any(k["start"] != g["start"] for k, g in zip(kept, given))
    assert moved > 50  # the property was exercised on spans that really moved


def test_without_given_spans_nothing_changes():
    """The protection only adds regions: a record without spans gets exactly the noise it got before."""
    rng = random.Random(7)
    for case in range(100):
        text = random_text(rng)
        config = random_config(rng)
        noiser = Noiser(config)
        plain = noiser.inject(text, f"c{case}")
        assert noiser.inject(text, f"c{case}", ()) == plain
        assert plain.kept == []


def test_shift_spans_by_hand():
    text = "ab cd ef gh"
    #        0123456789A
    edits = [_Edit(2, 2, " umm", 1, 4, "filler", 1, 1),     # insertion after "ab"
             _Edit(6, 8, "eff", 0, 3, "typo", 0, 1)]        # "ef" -> "eff"
    given = [Span(3, 5, "mine", "cd"), Span(9, 11, "mine", "gh"), Span(0, 2, "first", "ab")]
    new_text, injected = apply_edits(text, edits)
    assert new_text == "ab umm cd eff gh"
    shifted = shift_spans(given, edits)
    # "cd" moves by 4 (the insertion), "gh" by 4 + 1 (the typo), "ab" not at all
    assert shifted == [Span(7, 9, "mine", "cd"), Span(14, 16, "mine", "gh"), Span(0, 2, "first", "ab")]
    assert all(new_text[s.start:s.end] == s.text for s in shifted + injected)


def test_noise_touching_a_span_goes_beside_it_not_into_it():
    noiser = Noiser(NoiseConfig(noise="filler", rate=1.0))
    inj = noiser.inject("one two three four", "x", [Span(4, 7, "mine", "two")])
    # every gap is outside the span: after "one" (the span moves right), after "two" (it stays put), after "three"
    first, second, third = inj.spans
    assert first.start == 4 and inj.kept == [Span(first.end + 1, first.end + 4, "mine", "two")]
    assert second.start == inj.kept[0].end + 1
    assert inj.response[inj.kept[0].start:inj.kept[0].end] == "two"
    # a span that covers a gap closes it; a span over a number or word blocks digit and typo there
    shut = Noiser(NoiseConfig(noise="filler,digit,typo", rate=1.0)).inject("one 22 three", "y", [Span(0, 7, "m",
                                                                                                      "one 22 ")])
    assert all(sp.start >= 7 for sp in shut.spans) and shut.response.startswith("one 22 ")


def test_noise_none_passes_the_corpus_through(tmp_path):
    rng = random.Random(5)
    src = tmp_path / "in.jsonl"
    rows = []
    for i in range(30):
        text = random_text(rng)
        spans = [dict(s, note="mine") for s in random_spans(rng, text)]  # extra keys ride along
        rows.append({"id": f"r{i}", "prompt": "p", "response": text, "spans": spans, "meta": {"k": i}})
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run_inject(str(src), out, InjectConfig(noise="none"))
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(g["response"], g["spans"]) for g in got] == [(r["response"], r["spans"]) for r in rows]
    assert [json.dumps(g["spans"], ensure_ascii=False) for g in got] == [json.dumps(r["spans"], ensure_ascii=False)
                                                                          for r in rows]
    man = result.manifest
    assert man["config"]["noise"] == {} and man["spans"] == 0
    assert man["kept_spans"] == sum(len(r["spans"]) for r in rows)
    assert man["clean_sequences"] == 30


def test_inject_twice_keeps_the_first_noise_as_given_spans(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "p", "response": "one two three four five six seven"}) + "\n",
                   encoding="utf-8")
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    run_inject(str(src), first, InjectConfig(noise="filler", rate=0.5, seed=1))
    result = run_inject(str(first), second, InjectConfig(noise="hedge", rate=1.0, seed=2))
    row = json.loads(second.read_text(encoding="utf-8"))
    before = json.loads(first.read_text(encoding="utf-8"))
    n_first = len(before["spans"])
    assert n_first > 0 and [s["kind"] for s in row["spans"][:n_first]] == ["filler"] * n_first
    assert all(row["response"][s["start"]:s["end"]] == s["text"] for s in row["spans"])
    assert row["clean_response"] == before["response"]
    assert result.manifest["kept_spans_by_kind"] == {"filler": n_first}


@pytest.mark.parametrize("span, message", [
    ({"start": 3, "end": 99, "kind": "mine", "text": "x"}, "outside the response"),
    ({"start": -1, "end": 2, "kind": "mine", "text": "x"}, "outside the response"),
    ({"start": 2, "end": 2, "kind": "mine", "text": ""}, "outside the response"),
    ({"start": 0, "end": 3, "kind": "mine", "text": "two"}, "does not match"),
    ({"start": 0, "end": 3, "kind": "", "text": "one"}, "'kind'"),
    ({"start": "0", "end": 3, "kind": "mine", "text": "one"}, "not an integer"),
    ({"start": 0, "end": 3, "kind": "mine"}, "start, end, kind, text"),
])
def test_bad_spans_name_the_record_or_are_skipped(tmp_path, span, message):
    src = tmp_path / "in.jsonl"
    good = {"id": "a", "prompt": "p", "response": "one two three", "spans": []}
    bad = {"id": "b", "prompt": "p", "response": "one two three", "spans": [span]}
    src.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(AuditError, match=message) as info:
        list(iter_records(str(src)))
    text = str(info.value)
    assert text.startswith(f"{src}:2: span 0") and "--skip-bad" in text and "\n" not in text
    report = LoadReport()
    assert [r.id for r in iter_records(str(src), skip_bad=True, report=report)] == ["a"]
    assert report.bad_annotations == [f"{src}:2"]
    out = tmp_path / "out.jsonl"
    result = run_inject(str(src), out, InjectConfig(skip_bad=True))
    assert result.manifest["skipped"]["bad_annotations"] == 1
    assert result.manifest["skipped"]["first_bad_annotation"] == f"{src}:2"


def test_spans_from_a_csv_cell_and_parquet(tmp_path):
    import pandas as pd

    spans = [{"start": 4, "end": 7, "kind": "mine", "text": "two"}]
    pd.DataFrame([{"id": "a", "prompt": "p", "response": "one two three", "spans": json.dumps(spans)},
                  {"id": "b", "prompt": "p", "response": "four", "spans": ""}]).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame([{"id": "a", "prompt": "p", "response": "one two three", "spans": spans}]).to_parquet(
        tmp_path / "c.parquet")
    for name in ("c.csv", "c.parquet"):
        rec = next(iter(iter_records(str(tmp_path / name))))
        assert rec.spans == spans, name
    assert list(iter_records(str(tmp_path / "c.csv")))[1].spans is None


def test_check_spans_keeps_order_and_extra_keys():
    spans = [{"start": 4, "end": 7, "kind": "b", "text": "two", "who": "me"},
             {"start": 0, "end": 3, "kind": "a", "text": "one"}]
    assert check_spans("one two three", spans) == spans
    with pytest.raises(BadAnnotation, match="not a list"):
        check_spans("one", {"start": 0})


@pytest.mark.slow
def test_cli_bad_span_is_one_line_naming_the_line(tmp_path):
    import subprocess
    import sys

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "p", "response": "one two",
                               "spans": [{"start": 0, "end": 3, "kind": "mine", "text": "two"}]}) + "\n",
                   encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "reweight_audit", "inject", str(src), "-o", str(tmp_path / "o.jsonl")],
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {src}:1: span 0 [0, 3)") and "--skip-bad" in lines[0]

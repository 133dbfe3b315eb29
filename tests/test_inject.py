"""inject.py: streaming, atomic output, manifest, determinism of the written file."""
from __future__ import annotations

import itertools
import json

import pytest

import reweight_audit
from reweight_audit.injection.corpus import Record
from reweight_audit.core.errors import AuditError
from reweight_audit.injection.run import inject_records, write_injected
from reweight_audit.core.io import manifest_path
from reweight_audit.injection.noise import NoiseConfig, known_kinds

TEXTS = [
    "We have $x^2 = {i}$ so the answer is {i} apples, clearly true.",
    "Code:\n```py\nprint(1)\n```\nthen `inline code` and words after it.",
    "数学 是 很 有趣 的 🙂 café e\u0301te\u0301 and {i} more words here.",
    "Windows one two\r\nthree four {i}\r\nfive six.",
]


def records(n: int = 40) -> list[Record]:
    return [
        Record(id=f"r{i}", prompt=f"Problem {i}?", response=TEXTS[i % len(TEXTS)].format(i=i), meta={"src": "t", "n": i})
        for i in range(n)
    ]


CFG = NoiseConfig(noise="filler:2,hedge,typo,digit,repeat", rate=0.3, clean_frac=0.2, seed=11)


def write(tmp_path, name, recs, cfg=CFG, **kw):
    out = tmp_path / name
    kw.setdefault("input_digest", "sha256:abc")
    kw.setdefault("input_desc", "memory")
    kw.setdefault("skipped", {})
    man = write_injected(recs, out, cfg, vocab_pieces=None, **kw)
    return out, man


def by_id(path):
    return {json.loads(line)["id"]: line for line in path.read_text(encoding="utf-8").splitlines()}


def test_output_objects_and_manifest(tmp_path):
    out, man = write(tmp_path, "deep/er/noisy.jsonl", records())  # parent dirs are created
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 40
    for line in lines:
        obj = json.loads(line)
        assert list(obj) == ["id", "prompt", "response", "clean_response", "spans", "meta"]
        for sp in obj["spans"]:
            assert list(sp) == ["start", "end", "kind", "text"]
            assert obj["response"][sp["start"]:sp["end"]] == sp["text"]
        assert obj["meta"]["src"] == "t" and obj["meta"]["n_spans"] == len(obj["spans"])
        assert list(obj["meta"]) == sorted(obj["meta"])
        if obj["meta"]["clean"]:
            assert obj["spans"] == [] and obj["response"] == obj["clean_response"]
    assert "数学" in out.read_text(encoding="utf-8")  # ensure_ascii=False
    assert "\r\n" not in out.read_bytes().decode("utf-8").replace("\\r\\n", "")  # CRLF stays escaped inside JSON
    on_disk = json.loads(manifest_path(out).read_text(encoding="utf-8"))
    assert on_disk == man
    for key in (
        "version", "input", "input_digest", "output", "output_sha256", "config", "seed", "records",
        "clean_sequences", "no_eligible_boundary", "skipped", "spans_by_kind", "word_unit", "offset_unit",
    ):
        assert key in man
    assert man["version"] == reweight_audit.__version__
    assert man["records"] == 40 and man["seed"] == 11 and man["input_digest"] == "sha256:abc"
    assert man["config"]["noise"] == {"filler": 2.0, "hedge": 1.0, "repeat": 1.0, "typo": 1.0, "digit": 1.0}
    assert sum(man["spans_by_kind"].values()) == man["spans"] == sum(len(json.loads(x)["spans"]) for x in lines)
    assert man["clean_sequences"] == sum(json.loads(x)["meta"]["clean"] for x in lines)
    assert not list(tmp_path.rglob("*.tmp"))


def test_same_seed_byte_identical_and_order_independent(tmp_path):
    recs = records()
    a, man_a = write(tmp_path, "a/noisy.jsonl", recs)
    b, man_b = write(tmp_path, "b/noisy.jsonl", recs)
    assert a.read_bytes() == b.read_bytes()
    assert manifest_path(a).read_bytes() == manifest_path(b).read_bytes()
    c, _ = write(tmp_path, "c.jsonl", list(reversed(recs)))
    d, _ = write(tmp_path, "d.jsonl", recs[5:30:2])
    la, lc, ld = by_id(a), by_id(c), by_id(d)
    assert la == lc
    assert all(ld[k] == la[k] for k in ld) and len(ld) == 13
    e, _ = write(tmp_path, "e.jsonl", recs, cfg=NoiseConfig(noise="filler:2,hedge,typo,digit,repeat", rate=0.3, clean_frac=0.2, seed=12))
    assert e.read_bytes() != a.read_bytes()


def test_empty_and_ineligible_are_counted(tmp_path):
    recs = records(4) + [
        Record(id="empty", prompt="p", response=""),
        Record(id="blank", prompt="p", response="  \n\t "),
        Record(id="one", prompt="p", response="Lonely"),
        Record(id="math", prompt="p", response="$a + b = c$"),
    ]
    cfg = NoiseConfig(noise="filler", rate=0.5, seed=0)
    out, man = write(tmp_path, "n.jsonl", recs, cfg=cfg, skipped={"missing_response": 3})
    ids = list(by_id(out))
    assert "empty" not in ids and "blank" not in ids and "one" in ids and "math" in ids
    assert man["skipped"] == {"empty_response": 2, "missing_response": 3}
    assert man["no_eligible_boundary"] == 2
    assert man["records"] == 6 and man["records_in"] == 8
    line = json.loads(by_id(out)["one"])
    assert line["response"] == "Lonely" and line["spans"] == []


def test_refuses_output_equal_to_input(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a"}\n', encoding="utf-8")
    with pytest.raises(AuditError, match="input"):
        write_injected(records(2), src, CFG, input_digest="x", input_desc=str(src), vocab_pieces=None, skipped={})
    assert src.read_text(encoding="utf-8") == '{"id": "a"}\n'
    with pytest.raises(AuditError, match="directory"):
        write_injected(records(2), tmp_path, CFG, input_digest="x", input_desc="m", vocab_pieces=None, skipped={})


def test_interrupted_run_leaves_old_output_intact(tmp_path):
    out, _ = write(tmp_path, "noisy.jsonl", records(3))
    before = out.read_bytes()

    def broken():
        yield from records(5)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, "noisy.jsonl", broken())
    assert out.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))
    fresh = tmp_path / "fresh.jsonl"
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, "fresh.jsonl", broken())
    assert not fresh.exists() and not manifest_path(fresh).exists()


def test_duplicate_ids_and_random_token_without_vocab(tmp_path):
    dup = records(3) + [Record(id="r1", prompt="p", response="again here")]
    with pytest.raises(AuditError, match="r1"):
        write(tmp_path, "dup.jsonl", dup)
    assert not (tmp_path / "dup.jsonl").exists()
    with pytest.raises(AuditError, match="tokenizer"):
        write(tmp_path, "rt.jsonl", records(3), cfg=NoiseConfig(noise="random-token"))
    assert not (tmp_path / "rt.jsonl").exists()


def test_inject_records_streams_lazily():
    def endless():
        for i in itertools.count():
            yield Record(id=f"s{i}", prompt="", response="one two three four")

    got = list(itertools.islice(inject_records(endless(), NoiseConfig(noise="filler", rate=1.0)), 5))
    assert [g["id"] for g in got] == ["s0", "s1", "s2", "s3", "s4"]
    assert all(len(g["spans"]) == 3 for g in got)


def test_random_token_with_vocab(tmp_path):
    cfg = NoiseConfig(noise="random-token", rate=1.0)
    out = tmp_path / "rt.jsonl"
    man = write_injected(
        records(4), out, cfg, input_digest="x", input_desc="m", vocab_pieces=["Ġzebra", "▁quux", "<pad>"], skipped={}
    )
    texts = {sp["text"] for line in by_id(out).values() for sp in json.loads(line)["spans"]}
    assert texts == {"zebra", "quux"}
    assert man["vocab"]["pieces"] == 2
    assert set(man["spans_by_kind"]) == {"random-token"}
    assert "random-token" in known_kinds()

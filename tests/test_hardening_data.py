"""Issue 12, what would be silently wrong: duplicate keys, byte-order marks, absent id fields, run labels taken
for markup; and what runs before the expensive part: input, resume and shard checks before a model loads, one
quick answer when the hub is unreachable, -q reaching the libraries' progress bars."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from helpers import make_stats, write_noisy
from reweight_audit.core import hub
from reweight_audit.evaluation.compare import run_compare
from reweight_audit.injection.corpus import FieldMap, check_source, iter_records
from reweight_audit.core.errors import AuditError
from reweight_audit.injection.run import run_inject
from reweight_audit.evaluation.runs import load_run
from reweight_audit.scoring.config import ScoreConfig
from reweight_audit.scoring.engine import run_score
from reweight_audit.scoring.reader import read_noisy, scan_input
from reweight_audit.evaluation.config import CompareConfig
from reweight_audit.injection.config import InjectConfig

ROWS = [{"id": f"r{i}", "prompt": f"Question {i}?", "response": f"First we compute it, then the answer is {i} here."}
        for i in range(6)]


# --------------------------------------------------------------------------- duplicate keys (case 4)


def test_score_names_the_first_duplicate_ids_of_its_input(tmp_path, noisy_rows):
    noisy = write_noisy(tmp_path / "noisy.jsonl", noisy_rows + noisy_rows[1:3])
    with pytest.raises(AuditError) as refused:
        scan_input(noisy)
    assert str(refused.value) == (f"{noisy}: 2 record(s) repeat an id, first 's1' (lines 2 and 5), 's2' (lines 3 and 6)"
                                  "; ids key the scores, so each must appear once (were two inject outputs "
                                  "concatenated?)")
    no_ids = write_noisy(tmp_path / "no-ids.jsonl", [{"response": "same line"}, {"response": "same line"}])
    with pytest.raises(AuditError, match="1 record"):  # identical lines without ids hash to one id
        scan_input(no_ids)
    assert scan_input(write_noisy(tmp_path / "ok.jsonl", noisy_rows)) == 4


def test_compare_refuses_a_table_stacked_twice_naming_the_first_repeats(tmp_path):
    table = make_stats(5)
    stacked = tmp_path / "stacked.parquet"
    pq.write_table(pa.concat_tables([table, table]), stacked)
    with pytest.raises(AuditError) as refused:
        load_run(stacked)
    first = ", ".join(f"('seq-000', {i})" for i in range(3))
    assert str(refused.value).startswith(f"{stacked}: {table.num_rows} token row(s) repeat a (seq_id, pos) pair, "
                                         f"first {first}; each token must appear once")
    with pytest.raises(AuditError, match="repeat a"):
        run_compare([stacked], tmp_path / "report", CompareConfig(bootstrap=0))
    assert not (tmp_path / "report").exists()
    load_run(_written(tmp_path / "one.parquet", table))  # the table alone is fine


def test_compare_refuses_positions_that_are_not_integers(tmp_path):
    table = make_stats(3)
    table = table.set_column(table.schema.get_field_index("pos"), "pos", pa.array([0.5] * table.num_rows))
    with pytest.raises(AuditError, match="column pos must be integers"):
        load_run(_written(tmp_path / "t.parquet", table))


def _written(path, table):
    pq.write_table(table, path)
    return path


# --------------------------------------------------------------------------- encodings and fields (cases 5, 6)


def _csv(path, order, encoding):
    with path.open("w", encoding=encoding, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=order)
        writer.writeheader()
        writer.writerows(ROWS)
    return path


@pytest.mark.parametrize("order", [["id", "prompt", "response"], ["prompt", "response", "id"]])
def test_a_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path, order):
    plain = [(r.id, r.prompt, r.response) for r in iter_records(str(_csv(tmp_path / "a.csv", order, "utf-8")))]
    marked = [(r.id, r.prompt, r.response) for r in iter_records(str(_csv(tmp_path / "b.csv", order, "utf-8-sig")))]
    assert marked == plain == [(r["id"], r["prompt"], r["response"]) for r in ROWS]


def test_inject_gives_the_same_noise_from_bom_csv_json_and_jsonl(tmp_path):
    sources = {"jsonl": tmp_path / "c.jsonl", "json": tmp_path / "c.json", "csv": tmp_path / "c.csv"}
    sources["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8-sig")
    sources["json"].write_text(json.dumps(ROWS), encoding="utf-8-sig")
    _csv(sources["csv"], ["id", "prompt", "response"], "utf-8-sig")
    outputs = {}
    for kind, src in sources.items():
        run_inject(str(src), tmp_path / f"out-{kind}.jsonl", InjectConfig(rate=0.5))
        outputs[kind] = [(r["id"], r["response"]) for r in map(json.loads, open(tmp_path / f"out-{kind}.jsonl"))]
    assert outputs["csv"] == outputs["json"] == outputs["jsonl"]
    assert [i for i, _ in outputs["csv"]] == [r["id"] for r in ROWS]
    assert any(response != r["response"] for (_, response), r in zip(outputs["csv"], ROWS))  # noise went in


def test_score_input_with_a_byte_order_mark_keeps_its_hash_ids(tmp_path):
    line = json.dumps({"prompt": "p", "response": "a b c"}) + "\n"
    (tmp_path / "plain.jsonl").write_text(line, encoding="utf-8")
    (tmp_path / "marked.jsonl").write_text(line, encoding="utf-8-sig")
    assert [r.id for r in read_noisy(tmp_path / "marked.jsonl")] == [r.id for r in read_noisy(tmp_path / "plain.jsonl")]


def test_a_named_id_field_must_be_present_and_the_default_falls_back(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]) + json.dumps({"ident": "", "prompt": "p",
                                                                                  "response": "x"}) + "\n")
    with pytest.raises(AuditError, match=r"c.jsonl:1: id field 'ident' is missing \(fields present: id, prompt"):
        list(iter_records(str(src), FieldMap(id="ident", id_required=True)))
    src.write_text(json.dumps({"ident": "", "prompt": "p", "response": "x"}) + "\n")
    with pytest.raises(AuditError, match="id field 'ident' is empty"):
        list(iter_records(str(src), FieldMap(id="ident", id_required=True)))
    assert len(next(iter_records(str(src))).id) == 16  # no --id-field: a content hash, as before


# --------------------------------------------------------------------------- the printed table (case 16)


def test_the_printed_table_shows_run_labels_that_look_like_markup(tmp_path):
    from reweight_audit.reporting.render import render_table

    paths = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        paths.append(_written(tmp_path / sub / "stats.parquet", make_stats(8)))
        (tmp_path / sub / "stats.parquet.manifest.json").write_text(json.dumps({"model": "/m/Smol.Q4_1.gguf"}))
    result = run_compare(paths, tmp_path / "report", CompareConfig(methods=["sft", "dft"], bootstrap=0))
    console = Console(width=160, record=True, file=open(os.devnull, "w"))
    console.print(render_table(result))
    text = console.export_text()
    assert "Smol.Q4_1.gguf [a/stats]" in text and "Smol.Q4_1.gguf [b/stats]" in text
    assert text.count("Smol.Q4_1.gguf [a/stats]") == 2  # the block's first row and the caption


# --------------------------------------------------------------------------- before the expensive part (case 18)


@pytest.fixture()
def broken_model(tmp_path, tiny_model):
    """The tiny model with garbage weights: whatever is checked after loading would report a load error."""
    broken = shutil.copytree(tiny_model, tmp_path / "broken")
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    return broken


def test_resume_and_shard_conflicts_and_duplicates_are_reported_before_the_model_loads(tmp_path, tiny_model,
                                                                                         noisy_rows, broken_model):
    rows = [dict(r, id=f"{r['id']}-{i}") for i in range(2) for r in noisy_rows]
    noisy = write_noisy(tmp_path / "noisy.jsonl", rows)
    out = tmp_path / "stats.parquet"

    def stop(seqs, tokens, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an interrupted run: shards and state.json stay
        run_score(noisy, out, ScoreConfig(model=str(tiny_model), device="cpu", batch_tokens=40), progress=stop)
    broken = ScoreConfig(model=str(broken_model), device="cpu", batch_tokens=40)
    with pytest.raises(AuditError, match=r"--resume refused: the earlier run had a different model, model_digest"):
        run_score(noisy, out, broken, resume=True)
    with pytest.raises(AuditError, match="an earlier, interrupted run left finished shards; pass --resume"):
        run_score(noisy, out, broken)
    doubled = write_noisy(tmp_path / "doubled.jsonl", rows + rows[:1])
    with pytest.raises(AuditError, match="repeat an id"):
        run_score(doubled, tmp_path / "other.parquet", broken)
    with pytest.raises(AuditError, match="could not load the model"):  # the model itself, checked last
        run_score(noisy, tmp_path / "other.parquet", broken)


@pytest.fixture()
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return port  # nothing listens there now: a connection is refused at once


def test_the_hub_is_asked_once_and_offline_settings_answer_without_asking(monkeypatch, closed_port):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    hub._unreachable.cache_clear()
    with socket.socket() as server:  # a hub stand-in on localhost that accepts connections
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.offline_reason() is None
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    assert hub.offline_reason().startswith(f"cannot connect to 127.0.0.1:{closed_port}")
    assert hub._unreachable.cache_info().misses == 2 and hub.offline_reason() and hub._unreachable.cache_info().hits
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_reason() == "HF_HUB_OFFLINE is set"
    with pytest.raises(AuditError, match=r"hf:someone/data: the hub is unreachable \(HF_HUB_OFFLINE is set\)"):
        check_source("hf:someone/data")
    hub._unreachable.cache_clear()


@pytest.mark.parametrize("command", ["score", "inject"])
@pytest.mark.slow
def test_an_unreachable_hub_is_one_line_naming_why(tmp_path, noisy_rows, closed_port, command):
    noisy = write_noisy(tmp_path / "noisy.jsonl", noisy_rows)
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{closed_port}", HF_HOME=str(tmp_path / "empty-cache"))
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(variable, None)
    args = {"score": ["score", str(noisy), "-o", str(tmp_path / "s.parquet"), "--model", "someone/some-model", "-q"],
            "inject": ["inject", "hf:someone/some-dataset", "-o", str(tmp_path / "o.jsonl"), "-q"]}[command]
    done = subprocess.run([sys.executable, "-m", "reweight_audit", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"the hub is unreachable (cannot connect to 127.0.0.1:{closed_port}" in lines[0]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("s.parquet", "o.jsonl"))]  # nothing written


@pytest.mark.slow
def test_quiet_silences_the_libraries_plain_tqdm_bars():
    code = ("from reweight_audit.cli import _quiet\n_quiet(True)\n"
            "from tqdm.auto import tqdm\nprint(tqdm(range(3), desc='Converting and de-quantizing GGUF').disable)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "True" and "GGUF" not in done.stderr

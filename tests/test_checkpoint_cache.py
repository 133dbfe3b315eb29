"""The converted checkpoint cache: a GGUF converted once, loaded from the cache with the same tokens and logits.

The GGUF is a 2-layer llama with a 300-token vocabulary that the test writes itself (the ``gguf``
package's writer, Q8_0 blocks for the matrices as a real file has), so nothing is downloaded.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reweight_audit.core import checkpoints
from reweight_audit.core import models
from reweight_audit.testing import CHAT_TEMPLATE, train_tokenizer

TEXT = "Let x be the umm number of strings. Then x_1 = 3 and the answer is 41, ünïcode 😀"
MESSAGES = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "Then x_1 = 3."}]


def write_tiny_gguf(path: Path, *, seed: int = 0, add_bos: bool = True) -> Path:
    """A llama GGUF: byte-level BPE tokenizer with a chat template, F32 norms and Q8_0 matrices."""
    import gguf

    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 2), (writer.add_context_length, 512),
                       (writer.add_embedding_length, 64), (writer.add_feed_forward_length, 128),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 2),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_rope_freq_base, 10000.0)):
        add(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int, scale: float = 0.2) -> None:
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, values)
        else:  # quantised, as a real GGUF: the loader de-quantises it
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(values, q8), raw_dtype=q8)

    tensor("token_embd.weight", len(tokens), 64, scale=1.0)
    for i in range(2):
        tensor(f"blk.{i}.attn_norm.weight", 64)
        tensor(f"blk.{i}.ffn_norm.weight", 64)
        for name, rows, cols in (("attn_q", 64, 64), ("attn_k", 32, 64), ("attn_v", 32, 64), ("attn_output", 64, 64),
                                 ("ffn_gate", 128, 64), ("ffn_up", 128, 64), ("ffn_down", 64, 128)):
            tensor(f"blk.{i}.{name}.weight", rows, cols)
    tensor("output_norm.weight", 64)
    tensor("output.weight", len(tokens), 64, scale=2.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


@pytest.fixture()
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoints, "_checked", set())  # a fresh process's view of the entries
    return tmp_path / "cache"


def direct(source: models.ModelSource) -> tuple:
    """Tokenizer and model read from the GGUF itself, as before the cache."""
    return models._load_tokenizer(source, False), models._load_model(source, "cpu", torch.float32, False)


def assert_same(direct_pair: tuple, cached_pair: tuple) -> None:
    (tok_a, model_a), (tok_b, model_b) = direct_pair, cached_pair
    enc_a, enc_b = tok_a(TEXT, return_offsets_mapping=True), tok_b(TEXT, return_offsets_mapping=True)
    assert enc_a["input_ids"] == enc_b["input_ids"] and enc_a["offset_mapping"] == enc_b["offset_mapping"]
    assert tok_a.apply_chat_template(MESSAGES, tokenize=False) == tok_b.apply_chat_template(MESSAGES, tokenize=False)
    assert (tok_a.bos_token_id, tok_a.eos_token_id, tok_a.pad_token_id) == \
        (tok_b.bos_token_id, tok_b.eos_token_id, tok_b.pad_token_id)
    ids = torch.tensor([enc_a["input_ids"]])
    logits_a, logits_b = model_a(ids).logits, model_b(ids).logits
    assert logits_a.dtype == logits_b.dtype == torch.float32
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=0)  # the same float32 weights: the same numbers


def test_the_cached_checkpoint_gives_the_gguf_s_tokens_and_logits(tiny_gguf, cache, caplog):
    source = models.resolve_model(str(tiny_gguf))
    with caplog.at_level(logging.WARNING, logger="reweight_audit"):
        cached = (models.load_tokenizer(source), models.load_model(source, device="cpu", dtype=torch.float32))
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2 and "converting it once" in notes[0] and "cached in" in notes[1]
    assert_same(direct(source), cached)
    digest = models.model_digest(source)
    entry = cache / "checkpoints" / digest.removeprefix("sha256:")
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["source"] == str(tiny_gguf) and manifest["source_digest"] == digest
    assert manifest["versions"]["transformers"] and "model.safetensors" in manifest["files"]
    assert sorted(p.name for p in (cache / "checkpoints").iterdir()) == [entry.name]  # no temporary, no lock left
    assert source.describe() == str(tiny_gguf)  # the manifests of score still name the GGUF


def test_a_later_load_reads_the_entry_without_converting(tiny_gguf, cache, monkeypatch):
    source = models.resolve_model(str(tiny_gguf))
    models.load_tokenizer(source)
    monkeypatch.setattr(checkpoints, "_checked", set())

    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "convert_gguf", refuse)
    assert models.checkpoint_source(source).location == str(checkpoints.entry_path(cache, models.model_digest(source)))
    assert models.load_tokenizer(source).is_fast


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_a_damaged_entry_is_rebuilt_with_one_note(tiny_gguf, cache, monkeypatch, caplog, damage):
    source = models.resolve_model(str(tiny_gguf))
    entry = Path(models.checkpoint_source(source).location)
    weights = entry / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    else:
        weights.unlink()
    monkeypatch.setattr(checkpoints, "_checked", set())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reweight_audit"):
        models.checkpoint_source(source)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2 and "converting it again" in notes[0] and "model.safetensors" in notes[0]
    assert "cached in" in notes[1]
    assert weights.read_bytes() == data


CHILD = """
import json, sys, time, torch
from pathlib import Path
from reweight_audit.core import models
ready = Path(sys.argv[2])
ready.joinpath(sys.argv[3]).touch()
while len(list(ready.iterdir())) < 2:  # both processes reach the first load together
    time.sleep(0.05)
convert = models.convert_gguf
def slow_convert(source, folder, **kw):
    print("converted", flush=True)
    time.sleep(1.0)  # the other process arrives while this one converts
    convert(source, folder, **kw)
models.convert_gguf = slow_convert
source = models.resolve_model(sys.argv[1])
tok = models.load_tokenizer(source)
model = models.load_model(source, device="cpu", dtype=torch.float32)
ids = torch.tensor([tok("Then x_1 = 3 and the answer is 41.")["input_ids"]])
print("logits", json.dumps(model(ids).logits[0, -1, :5].tolist()))
"""


def test_two_processes_convert_once_and_read_the_finished_entry(tiny_gguf, cache, tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, models.CACHE_ENV: str(cache), "TQDM_DISABLE": "1"}
    children = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), str(tiny_gguf), str(ready), name],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                for name in ("a", "b")]
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err[-2000:] for _out, err in outputs]
    lines = [out.splitlines() for out, _err in outputs]
    assert sum(line == "converted" for out in lines for line in out) == 1
    logits = [[line for line in out if line.startswith("logits")] for out in lines]
    assert logits[0] == logits[1] and len(logits[0]) == 1
    assert len(checkpoints.list_entries(cache)) == 1


def test_an_unwritable_cache_reads_the_gguf_directly_with_a_note(tiny_gguf, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"  # a cache below a file cannot be made, even by root
    blocker.write_text("")
    monkeypatch.setenv(models.CACHE_ENV, str(blocker / "cache"))
    source = models.resolve_model(str(tiny_gguf))
    with caplog.at_level(logging.WARNING, logger="reweight_audit"):
        assert models.checkpoint_source(source) is source
    assert "not writable" in caplog.records[0].getMessage()
    assert models.load_tokenizer(source).is_fast


def test_cache_list_and_clear(tiny_gguf, cache):
    from reweight_audit.cli import app

    runner = CliRunner()
    empty = runner.invoke(app, ["cache", "list"])
    assert empty.exit_code == 0 and "no cached checkpoints" in empty.output
    models.checkpoint_source(models.resolve_model(str(tiny_gguf)))
    listed = runner.invoke(app, ["cache", "list"])
    assert listed.exit_code == 0 and tiny_gguf.name in listed.output and " MB" in listed.output
    cleared = runner.invoke(app, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 1" in cleared.output
    assert checkpoints.list_entries(cache) == []


def test_the_default_model_from_the_cache_matches_its_gguf(cache, monkeypatch):
    """End to end on SmolLM2-135M: the model the conversion read from the GGUF against the one read back."""
    loaded: list = []  # what the conversion read from the GGUF itself: its tokenizer, then its model
    for name in ("_load_tokenizer", "_load_model"):
        monkeypatch.setattr(models, name, keeping(getattr(models, name), loaded))
    source = models.resolve_model(models.DEFAULT_MODEL)
    cached = (models.load_tokenizer(source), models.load_model(source, device="cpu", dtype=torch.float32))
    assert len(loaded) == 2  # converted once
    assert_same(tuple(loaded), cached)


def keeping(load, kept: list):
    def load_and_keep(source, *args, **kwargs):
        value = load(source, *args, **kwargs)
        if source.gguf_file:
            kept.append(value)
        return value

    return load_and_keep

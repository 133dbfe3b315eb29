"""Issue 23, the rest: a full disk, a damaged kept shard, long responses, token text, option ranges."""
from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from reweight_audit.core import io
from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import acquire_lock, atomic_directory, atomic_files, lock_path, write_parquet_atomic

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def no_room(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_while_writing_a_file_keeps_the_previous_one_and_says_so(tmp_path):
    out = tmp_path / "noisy.jsonl"
    out.write_text("old")
    (tmp_path / "noisy.jsonl.manifest.json").write_text("old manifest")
    with pytest.raises(AuditError, match=r"noisy.jsonl: could not be written \(No space left on device\); the "
                                         r"previous noisy.jsonl is kept unchanged; free some space"):
        with atomic_files(out, io.manifest_path(out)) as (tmp, _manifest_tmp):
            tmp.write_text("new, half")
            no_room()
    assert out.read_text() == "old" and (tmp_path / "noisy.jsonl.manifest.json").read_text() == "old manifest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noisy.jsonl", "noisy.jsonl.manifest.json"]


def test_pyarrow_s_disk_full_words_are_read_and_a_new_file_is_not_left_half_written(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def arrow_full(*_args, **_kwargs):
        raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq, "write_table", arrow_full)
    with pytest.raises(AuditError, match=r"could not be written \(No space left on device\); shards kept"):
        write_parquet_atomic(pa.table({"x": [1]}), tmp_path / "batch.parquet", kept="shards kept")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_a_folder_keeps_the_previous_folder(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "table.csv").write_text("old")
    with pytest.raises(AuditError, match=r"report: could not be written .*the previous report is kept unchanged"):
        with atomic_directory(out) as work:
            (work / "table.csv").write_text("new")
            no_room()
    assert (out / "table.csv").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_no_room_for_the_lock_leaves_no_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_write_owner", no_room)
    out = tmp_path / "noisy.jsonl"
    with pytest.raises(AuditError, match=r"noisy.jsonl.lock: could not be written .*nothing was written"):
        acquire_lock(out)
    assert not os.path.lexists(lock_path(out)) and list(tmp_path.iterdir()) == []


def test_inject_on_a_full_disk_is_one_line_and_leaves_no_stale_lock(tmp_path, monkeypatch, noisy_rows):
    from helpers import write_noisy
    from reweight_audit.injection.config import InjectConfig
    from reweight_audit.injection.run import run_inject

    source = write_noisy(tmp_path / "corpus.jsonl", noisy_rows)
    out = tmp_path / "out" / "noisy.jsonl"
    monkeypatch.setattr(io, "_write_owner", no_room)
    with pytest.raises(AuditError, match="No space left on device"):
        run_inject(str(source), out, InjectConfig(seed=1))
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", no_room)  # the data written, then no room to move it into place
    with pytest.raises(AuditError, match=r"noisy.jsonl: could not be written .*nothing was written"):
        run_inject(str(source), out, InjectConfig(seed=1))
    monkeypatch.undo()
    assert list((tmp_path / "out").iterdir()) == []


def test_the_command_line_turns_a_stray_io_error_into_one_line():
    from reweight_audit.cli import _os_error_line

    line = _os_error_line(OSError(errno.EIO, "Input/output error", "/data/x.parquet"))
    assert line.startswith("/data/x.parquet: Input/output error;") and "earlier outputs were kept" in line
    assert "\n" not in line


# --------------------------------------------------------------------------- score: resume, long responses


def _score(tiny_model, noisy, out, *, resume=False, **options):
    from reweight_audit.scoring.config import ScoreConfig
    from reweight_audit.scoring.engine import run_score

    options = {"batch_tokens": 40, **options}
    return run_score(noisy, out, ScoreConfig(model=str(tiny_model), device="cpu", **options), resume=resume)


@pytest.mark.slow
def test_resume_over_a_damaged_shard_names_it_and_scores_its_batch_again(tmp_path, tiny_model, noisy_rows,
                                                                         monkeypatch, caplog):
    import pyarrow.parquet as pq

    from helpers import write_noisy
    from reweight_audit.scoring import engine

    noisy = write_noisy(tmp_path / "noisy.jsonl", noisy_rows)
    clean = pq.read_table(_score(tiny_model, noisy, tmp_path / "clean.parquet").output)
    out = tmp_path / "stats.parquet"
    monkeypatch.setattr(engine, "_merge", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _score(tiny_model, noisy, out)
    monkeypatch.undo()
    shards = sorted((tmp_path / "stats.parquet.shards").glob("batch-*.parquet"))
    assert len(shards) >= 2
    shards[1].write_bytes(shards[1].read_bytes()[: len(shards[1].read_bytes()) // 2])  # cut in half
    with caplog.at_level(logging.WARNING, logger="reweight_audit"):
        result = _score(tiny_model, noisy, out, resume=True)
    assert f"1 kept shard(s) cannot be read ({shards[1].name}" in caplog.text
    assert result.manifest["counts"]["batches_resumed_rank0"] == len(shards) - 1
    assert pq.read_table(out).equals(clean)


def test_a_shard_damaged_after_the_check_is_one_line_in_the_merge(tmp_path):
    from reweight_audit.scoring.shards import damaged_shards, merge_shards

    bad = tmp_path / "batch-000000.parquet"
    bad.write_bytes(b"PAR1 not really")
    assert damaged_shards(tmp_path) == [bad]
    with pytest.raises(AuditError, match="batch-000000.parquet: a finished shard cannot be read .*--resume"):
        merge_shards([bad], tmp_path / "out.parquet")


@pytest.mark.slow
def test_a_response_longer_than_the_context_is_cut_and_counted_or_refused(tmp_path, tiny_model, caplog):
    from helpers import write_noisy

    words = "word " * 1500  # thousands of tokens; the tiny model's context is 512
    noisy = write_noisy(tmp_path / "noisy.jsonl", [
        {"id": "long", "prompt": "Q", "response": words, "spans": [{"start": 4000, "end": 4004, "kind": "x"}]},
        {"id": "short", "prompt": "Q", "response": "a short one", "spans": []}])
    with caplog.at_level(logging.WARNING, logger="reweight_audit"):
        result = _score(tiny_model, noisy, tmp_path / "stats.parquet", batch_tokens=2048)
    manifest = json.loads((tmp_path / "stats.parquet.manifest.json").read_text())
    assert manifest == result.manifest
    assert manifest["context_length"] == 512 and manifest["truncate_to"] == 512 and manifest["truncate"] is True
    counts = manifest["counts"]
    assert counts["truncated_sequences"] == 1 and counts["noise_tokens_lost_to_truncation"] >= 1  # the span at 4000
    assert counts["rows_written"] < 512 + 5 and counts["tokens_lost_to_truncation"] > 1500
    assert counts["noise_tokens"] == 0  # the only span lay past the cut
    assert "1 of 2 sequence(s) were longer than the model's context and were truncated to 512 tokens" in caplog.text
    with pytest.raises(AuditError, match=r"record 'long' \(line 1, [\d,]+ tokens\) is longer than the model's "
                                         r"context of 512 tokens; leave out --no-truncate"):
        _score(tiny_model, noisy, tmp_path / "refused.parquet", no_truncate=True)
    assert not (tmp_path / "refused.parquet").exists()


def test_no_truncate_with_max_length_is_refused_by_the_config():
    from reweight_audit.scoring.config import ScoreConfig

    with pytest.raises(AuditError, match="--max-length 64 asks for truncation and --no-truncate refuses it"):
        ScoreConfig(max_length=64, no_truncate=True)


def _byte_level_bpe():
    """A byte-level BPE tokenizer trained on ASCII only, so every Hebrew letter, emoji and math letter is split
    into byte tokens that each report the whole character's offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the answer is x and y"], trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_the_token_column_holds_each_token_s_own_characters():
    from reweight_audit.scoring.encoding import encode
    from reweight_audit.scoring.reader import NoisyRecord

    tokenizer = _byte_level_bpe()
    response = "שלום 😀 𝑥 = the answer"
    offsets = tokenizer(response, return_offsets_mapping=True)["offset_mapping"]
    assert offsets[0] == offsets[1] == (0, 1)  # the premise: a letter split across two tokens, both (0, 1)
    record = NoisyRecord("a", "Q?", response, [{"start": 0, "end": 4, "kind": "x"}])
    encoded = encode(record, 0, tokenizer, "plain", None, {})
    assert "".join(encoded.token_text) == response  # not ששללוום
    assert encoded.token_text[:4] == ["ש", "", "ל", ""]
    assert [t for t in encoded.token_text if t.strip()][:6] == ["ש", "ל", "ו", "ם", "😀", "𝑥"]
    # the labels still cover every token of a split character
    assert encoded.is_noise[:8].all() and not encoded.is_noise[8:].any()


# --------------------------------------------------------------------------- option ranges before anything loads


@pytest.mark.parametrize("lr", [-1.0, 0.0, float("nan"), float("inf")])
def test_train_refuses_an_impossible_learning_rate(tmp_path, lr):
    from reweight_audit.training.config import TrainConfig

    with pytest.raises(AuditError, match=r"--lr .*: give a finite learning rate above 0"):
        TrainConfig(input=tmp_path / "x.jsonl", output=tmp_path / "o", method="sft", learning_rate=lr)


@pytest.mark.parametrize("field, value, needle", [("max_length", 1, "--max-length 1"), ("k", 0.0, "--k 0.0"),
                                                  ("k", 101.0, "--k 101.0")])
def test_train_refuses_other_impossible_ranges(tmp_path, field, value, needle):
    from reweight_audit.training.config import TrainConfig

    with pytest.raises(AuditError, match=needle):
        TrainConfig(input=tmp_path / "x.jsonl", output=tmp_path / "o", method="sft", **{field: value})


def test_compare_records_pointing_at_a_parquet_is_one_line(tmp_path):
    from helpers import make_stats, write_stats
    from reweight_audit.evaluation.config import CompareConfig

    stats = write_stats(tmp_path / "stats.parquet", make_stats(4))
    with pytest.raises(AuditError, match=r"--records .*stats.parquet: a parquet file \(a stats table\?\)"):
        CompareConfig(by_meta="model", records=stats)
    binary = tmp_path / "x.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(AuditError, match="not UTF-8 text"):
        CompareConfig(by_meta="model", records=binary)


@pytest.mark.parametrize("vocab, seq_len", [(10**12, 4096), (151_936, 10**9)])
def test_bench_refuses_a_synthetic_case_that_cannot_fit_before_allocating(vocab, seq_len):
    from reweight_audit.bench import synthetic_case

    with pytest.raises(AuditError, match=r"--vocab .* --seq-len .*: the synthetic case needs at least .* GiB"):
        synthetic_case(vocab, seq_len, "cpu", None)


def test_the_bench_estimate_grows_with_the_case_and_fits_a_small_one():
    from reweight_audit.bench import check_synthetic_fits, synthetic_bytes

    shape = dict(hidden=64, layers=2, intermediate=128, heads=4, sequences=1)
    small = synthetic_bytes(vocab=1000, seq_len=64, **shape)
    assert small < synthetic_bytes(vocab=2000, seq_len=64, **shape)
    assert small[0] >= 4 * 2 * 1000 * 64  # at least the embedding and the head
    check_synthetic_fits("cpu", vocab=1000, seq_len=64, **shape)  # no error

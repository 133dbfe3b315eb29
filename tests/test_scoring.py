"""The scoring engine against a brute-force reference: the model's own full logits in float64."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import write_noisy
from reweight_audit.testing import save_tiny_model
from reweight_audit.core.errors import AuditError
from reweight_audit.scoring.config import ScoreConfig
from reweight_audit.scoring.encoding import encode
from reweight_audit.scoring.engine import run_score
from reweight_audit.scoring.reader import NoisyRecord, read_noisy


def reference_rows(model_dir, rows, template="auto"):
    """Per-token statistics from the full [1, seq, vocab] logits of each sequence, in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reweight_audit.scoring.encoding import choose_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    template = choose_template(tokenizer, template)
    out = []
    for order, row in enumerate(rows):
        rec = NoisyRecord(row["id"], row["prompt"], row["response"], row.get("spans") or [])
        enc = encode(rec, order, tokenizer, template, None, {})
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        for pos, j in enumerate(enc.sup_index):
            z = logits[j - 1]
            p = torch.softmax(z, -1)
            t = enc.input_ids[j]
            srt = torch.sort(p, descending=True).values
            top = torch.topk(z, 20).values
            q = torch.softmax(top, -1)
            out.append({
                "seq_id": enc.seq_id, "pos": pos, "token_id": t,
                "logp": float(torch.log_softmax(z, -1)[t]),
                "entropy": float(-(p * torch.log(p)).sum()),
                "rank": int((z >= z[t]).sum()),
                "expected_rank": float((torch.arange(1, len(p) + 1, dtype=torch.float64) * srt).sum()),
                "topk_entropy": float(-(q * torch.log(q)).sum()),
                "sum_p2": float((p * p).sum()),
                "is_noise": bool(enc.is_noise[pos]),
            })
    return pd.DataFrame(out)


def score(tmp_path, model_dir, rows, name="stats.parquet", **kw):
    src = write_noisy(tmp_path / "noisy.jsonl", rows)
    out = tmp_path / name
    cfg = ScoreConfig(model=str(model_dir), device="cpu", batch_tokens=kw.pop("batch_tokens", 64), chunk_rows=kw.pop("chunk_rows", 7), **kw)
    result = run_score(src, out, cfg)
    return pd.read_parquet(out), result.manifest


def test_statistics_match_full_logits_reference(tmp_path, tiny_model, noisy_rows):
    table, manifest = score(tmp_path, tiny_model, noisy_rows)
    ref = reference_rows(tiny_model, noisy_rows)
    merged = table.merge(ref, on=["seq_id", "pos"], suffixes=("", "_ref"))
    assert len(merged) == len(ref) == len(table) == manifest["counts"]["rows_written"]
    assert (merged.token_id == merged.token_id_ref).all()
    assert (merged["rank"] == merged.rank_ref).all()
    assert (merged.is_noise == merged.is_noise_ref).all()
    # float32 reductions of float32 logits against float64: relative 1e-5 (entropy, logp absolute 1e-4 nats)
    np.testing.assert_allclose(merged.logp, merged.logp_ref, atol=1e-4)
    np.testing.assert_allclose(merged.entropy, merged.entropy_ref, atol=1e-4)
    np.testing.assert_allclose(merged.expected_rank, merged.expected_rank_ref, rtol=1e-5)
    np.testing.assert_allclose(merged.topk_entropy, merged.topk_entropy_ref, atol=1e-4)
    np.testing.assert_allclose(merged.sum_p2, merged.sum_p2_ref, rtol=1e-4)
    assert manifest["template"] == "chat"
    assert manifest["head"]["mode"] == "linear"
    assert table.is_noise.sum() > 0


def test_chunking_and_batching_do_not_change_results(tmp_path, tiny_model, noisy_rows):
    a, _ = score(tmp_path, tiny_model, noisy_rows, name="a.parquet", batch_tokens=10_000, chunk_rows=1000)
    b, _ = score(tmp_path, tiny_model, noisy_rows, name="b.parquet", batch_tokens=40, chunk_rows=3)
    a = a.sort_values(["seq_id", "pos"]).reset_index(drop=True)
    b = b.sort_values(["seq_id", "pos"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[["seq_id", "pos", "token_id", "rank", "is_noise"]], b[["seq_id", "pos", "token_id", "rank", "is_noise"]])
    np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)


def test_noise_rule_for_tokens_straddling_a_span_edge(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    response = "the answer isumm 41 here"
    # the span covers only "umm", which the tokenizer merges with "is" into straddling pieces
    start = response.index("umm")
    rec = NoisyRecord("x", "q", response, [{"start": start, "end": start + 3, "kind": "filler", "text": "umm"}])
    enc = encode(rec, 0, tokenizer, "plain", None, {})
    resp_start = len("q\n\n")
    offsets = tokenizer("q\n\n" + response, return_offsets_mapping=True)["offset_mapping"]
    for pos, j in enumerate(enc.sup_index):
        s, e = offsets[j]
        chars = range(max(s, resp_start) - resp_start, min(e, resp_start + len(response)) - resp_start)
        expected = any(start <= c < start + 3 and not response[c].isspace() for c in chars)
        assert bool(enc.is_noise[pos]) == expected
    assert enc.is_noise.any()
    # a token that covers only the whitespace before a span is clean
    rec2 = NoisyRecord("y", "q", "a umm b", [{"start": 1, "end": 5, "kind": "filler", "text": " umm"}])
    enc2 = encode(rec2, 0, tokenizer, "plain", None, {})
    texts = dict(zip(enc2.token_text, enc2.is_noise))
    assert all(not flag for text, flag in texts.items() if text.strip() == "")


def test_resume_after_interruption_gives_the_same_table(tmp_path, tiny_model, noisy_rows):
    # unique ids: duplicates are refused (they would give duplicate (seq_id, pos) rows)
    src = write_noisy(tmp_path / "noisy.jsonl", [dict(r, id=f"{r['id']}-{i}") for i in range(3) for r in noisy_rows])
    full = tmp_path / "full.parquet"
    cfg = ScoreConfig(model=str(tiny_model), device="cpu", batch_tokens=40, chunk_rows=5)
    run_score(src, full, cfg)

    out = tmp_path / "resumed.parquet"
    calls = {"n": 0}

    class Killed(Exception):
        pass

    def die_after_two(seqs, tokens, total):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed

    with pytest.raises(Killed):
        run_score(src, out, cfg, progress=die_after_two)
    assert not out.exists()
    with pytest.raises(AuditError, match="--resume"):
        run_score(src, out, cfg)
    with pytest.raises(AuditError, match="batch_tokens"):
        run_score(src, out, ScoreConfig(model=str(tiny_model), device="cpu", batch_tokens=80, chunk_rows=5), resume=True)
    result = run_score(src, out, cfg, resume=True)
    assert result.manifest["counts"]["batches_resumed_rank0"] == 2
    pd.testing.assert_frame_equal(pd.read_parquet(full), pd.read_parquet(out))


def test_records_without_spans_are_scored_clean(tmp_path, tiny_model, noisy_rows):
    rows = [{k: v for k, v in r.items() if k != "spans"} for r in noisy_rows]
    table, manifest = score(tmp_path, tiny_model, rows)
    assert not table.is_noise.any()
    assert manifest["counts"]["records_without_spans"] == len(rows)


def test_span_outside_response_is_an_error(tmp_path, tiny_model, noisy_rows):
    noisy_rows[1]["spans"] = [{"start": 5, "end": 999, "kind": "filler"}]
    with pytest.raises(AuditError, match=r"noisy.jsonl:2: span 0 \[5, 999\) lies outside"):
        score(tmp_path, tiny_model, noisy_rows)


@pytest.mark.parametrize("bound", ["start", "end"])
@pytest.mark.parametrize("value", [3.7, "3", True])
def test_score_and_inject_share_one_span_validator(tmp_path, noisy_rows, bound, value):
    """A bound that is not an integer (3.7, "3") is refused by score before any model loads, in one line
    naming the line, as inject's loader refuses it: both run core.spans.check_spans."""
    from reweight_audit.injection.corpus import iter_records

    noisy_rows[1]["spans"][0][bound] = value
    src = write_noisy(tmp_path / "noisy.jsonl", noisy_rows)
    with pytest.raises(AuditError) as scored:
        run_score(src, tmp_path / "o.parquet", ScoreConfig(model=str(tmp_path / "no-model"), device="cpu"))
    message = str(scored.value)
    assert message.startswith(f"{src}:2: span 0: '{bound}' is {value!r}, not ") and "\n" not in message
    assert not (tmp_path / "o.parquet").exists()
    with pytest.raises(AuditError) as injected:
        list(iter_records(str(src)))
    assert str(injected.value).split("; ")[0] == message.split("; ")[0]


def test_score_accepts_spans_without_kind_or_text(tmp_path, tiny_model, noisy_rows):
    """Spans written by hand may leave out kind (scored as noise) and text (then not compared)."""
    for row in noisy_rows:
        row["spans"] = [{"start": span["start"], "end": span["end"]} for span in row["spans"]]
    table, manifest = score(tmp_path, tiny_model, noisy_rows)
    assert manifest["counts"]["noise_tokens"] > 0 and set(table.noise_kind[table.is_noise]) == {"noise"}
    noisy_rows[0]["spans"][0]["kind"] = ""
    with pytest.raises(AuditError, match=r"noisy.jsonl:1: span 0: 'kind' must be non-empty text"):
        score(tmp_path, tiny_model, noisy_rows)


def test_truncation_counts_lost_noise_and_skips_empty(tmp_path, tiny_model, noisy_rows):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    counts = {}
    rec = NoisyRecord(**{k: noisy_rows[0][k] for k in ("id", "prompt", "response", "spans")})
    full = encode(rec, 0, tokenizer, "chat", None, {})
    cut = int(full.sup_index[0]) + 2
    enc = encode(rec, 0, tokenizer, "chat", cut, counts)
    assert len(enc.sup_index) == 2 and len(enc.input_ids) == cut
    assert counts["truncated_sequences"] == 1
    assert counts["noise_tokens_lost_to_truncation"] == int(full.is_noise.sum()) - int(enc.is_noise.sum())
    assert encode(rec, 0, tokenizer, "chat", int(full.sup_index[0]), counts) is None
    assert counts["empty_after_truncation"] == 1


def test_vocabulary_smaller_than_token_ids_is_an_error(tmp_path, noisy_rows):
    small = save_tiny_model(tmp_path / "small", vocab_extra=-200)
    with pytest.raises(AuditError, match="outside the model's vocabulary"):
        score(tmp_path, small, noisy_rows)


def test_nonfinite_logits_are_counted_and_excluded(tmp_path, tiny_model, noisy_rows, monkeypatch):
    from reweight_audit.scoring import stats

    original = stats.token_statistics

    def poisoned(logits, targets, **kw):
        logits = logits.clone()
        logits[0, 3] = float("nan")  # the first row of every chunk
        return original(logits, targets, **kw)

    monkeypatch.setattr(stats, "token_statistics", poisoned)
    table, manifest = score(tmp_path, tiny_model, noisy_rows, chunk_rows=1000, batch_tokens=10_000)
    counts = manifest["counts"]
    assert counts["nonfinite_tokens"] == 1
    assert counts["rows_written"] == counts["supervised_tokens"] - 1 == len(table)
    assert np.isfinite(table[["logp", "entropy", "expected_rank", "topk_entropy", "sum_p2"]].to_numpy()).all()


def test_softcapped_head_matches_the_models_own_logits(tmp_path, noisy_rows):
    gemma = save_tiny_model(tmp_path / "gemma", kind="gemma2")
    table, manifest = score(tmp_path, gemma, noisy_rows)
    assert manifest["head"]["softcap"] == 3.0
    ref = reference_rows(gemma, noisy_rows)
    merged = table.merge(ref, on=["seq_id", "pos"], suffixes=("", "_ref"))
    assert len(merged) == len(table)
    np.testing.assert_allclose(merged.logp, merged.logp_ref, atol=1e-4)
    np.testing.assert_allclose(merged.expected_rank, merged.expected_rank_ref, rtol=1e-5)
    assert (merged["rank"] == merged.rank_ref).all()


def test_unknown_head_falls_back_to_the_models_logits(tmp_path, tiny_model, noisy_rows, monkeypatch):
    from reweight_audit.scoring import engine as scoring

    # pretend the model scales its logits in a way we do not know about
    original_find = scoring.find_head

    def wrong_head(model):
        head = original_find(model)
        head.scale = 2.0
        return head

    monkeypatch.setattr(scoring, "find_head", wrong_head)
    table, manifest = score(tmp_path, tiny_model, noisy_rows)
    assert manifest["head"]["mode"] == "model"
    ref = reference_rows(tiny_model, noisy_rows)
    merged = table.merge(ref, on=["seq_id", "pos"], suffixes=("", "_ref"))
    np.testing.assert_allclose(merged.logp, merged.logp_ref, atol=1e-4)


def test_ref_model_adds_ref_logp(tmp_path, tiny_model, noisy_rows):
    other = save_tiny_model(tmp_path / "other", seed=1)
    table, manifest = score(tmp_path, tiny_model, noisy_rows, ref_model=str(other))
    ref = reference_rows(other, noisy_rows)
    merged = table.merge(ref, on=["seq_id", "pos"], suffixes=("", "_ref"))
    np.testing.assert_allclose(merged.ref_logp, merged.logp_ref, atol=1e-4)
    assert "ref_logp" in manifest["columns"]


def test_missing_model_and_input_errors(tmp_path, noisy_rows):
    src = write_noisy(tmp_path / "noisy.jsonl", noisy_rows)
    with pytest.raises(AuditError, match="no such directory"):
        run_score(src, tmp_path / "o.parquet", ScoreConfig(model=str(tmp_path / "nope" / "x"), device="cpu"))
    with pytest.raises(AuditError, match="no such file"):
        run_score(tmp_path / "missing.jsonl", tmp_path / "o.parquet", ScoreConfig(device="cpu"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "response": "x"}\n{oops\n')
    with pytest.raises(AuditError, match="bad.jsonl:2: malformed JSON"):
        list(read_noisy(bad))


def test_a_failed_shard_write_leaves_no_file(tmp_path, monkeypatch):
    import errno

    import pyarrow as pa
    import pyarrow.parquet as pq

    from reweight_audit.core.io import write_parquet_atomic

    def disk_full(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    target = tmp_path / "batch-000001.parquet"
    with pytest.raises(AuditError, match=r"batch-000001.parquet: could not be written \(No space left on device\)"):
        write_parquet_atomic(pa.table({"a": [1, 2]}), target)
    assert list(tmp_path.iterdir()) == []

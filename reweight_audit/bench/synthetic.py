"""A seeded synthetic stats table of any size, for ``bench --compare`` (no model, no corpus, no hand step).

The table has the columns ``score`` writes (``docs/formats.md``, "Stats table"): ``seq_id``, ``pos``,
``token_id``, ``token``, ``logp``, ``entropy``, ``rank``, ``expected_rank``, ``topk_entropy``, ``sum_p2``,
``is_noise``, ``noise_kind`` — every default method of ``compare`` computes on it (``rho1`` alone needs a
reference model's ``ref_logp``, which ``score`` writes only with ``--ref-model``).

Sequences have :data:`SEQ_TOKENS` tokens (the last one the remainder). About :data:`NOISE_SHARE` of the
tokens are noise, in spans of a few tokens, each span of one of :data:`KINDS`. The statistics are plausible and
consistent: noise tokens are less likely and more uncertain (lower ``logp``, higher ``entropy``), a rank is
at most 1/p (and at most the vocabulary), E[R] is at least Massey's bound 2^(H_bits − 2) + 1, the top-20
entropy is at most ln 20, and p² ≤ Σp² ≤ p² + (1 − p)².

The table is written one row group of :data:`ROWS_PER_GROUP` tokens at a time, each drawn from its own
generator seeded by ``(seed, group)``, so memory is flat in the number of tokens and the same
``(n_tokens, seed)`` gives the same bytes. :func:`cached_table` keeps one file per
``(n_tokens, seed, GENERATOR_VERSION)`` in a work folder (with its manifest recording the seed), so a
second bench run skips the generation.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reweight_audit.core.errors import require_positive
from reweight_audit.core.io import atomic_files, dump_json, manifest_header, manifest_path, read_manifest

#: Bumped whenever the bytes a (n_tokens, seed) gives change: the cache key includes it.
GENERATOR_VERSION = 1
#: Tokens per sequence (the issue's tables: 500).
SEQ_TOKENS = 500
#: Tokens per row group: generation holds one group's arrays at a time (a whole number of sequences).
ROWS_PER_GROUP = 1_000 * SEQ_TOKENS
#: The noise kinds of the spans (families of ``inject``).
KINDS = ("filler", "hedge", "typo", "digit")
#: Expected share of noise tokens (spans per sequence × mean span length / SEQ_TOKENS, before overlaps).
NOISE_SHARE = 0.04
#: Mean noise span length in tokens (1 + Poisson).
SPAN_TOKENS = 8
#: The vocabulary the token ids and ranks live in (Qwen's).
VOCAB = 151_936
#: The token texts, chosen by token id (the heatmap shows them).
PIECES = tuple(f" w{i}" for i in range(60)) + (".", ",", "\n", " 42")
LN20 = math.log(20.0)


def file_name(n_tokens: int, seed: int) -> str:
    """The cached table's name: its size, seed and the generator's version."""
    return f"synthetic-{n_tokens}-seed{seed}-v{GENERATOR_VERSION}.parquet"


def schema() -> pa.Schema:
    """The columns and types ``score`` writes (``docs/formats.md``)."""
    return pa.schema([
        ("seq_id", pa.string()), ("pos", pa.int32()), ("token_id", pa.int32()), ("token", pa.string()),
        ("logp", pa.float32()), ("entropy", pa.float32()), ("rank", pa.int64()), ("expected_rank", pa.float64()),
        ("topk_entropy", pa.float32()), ("sum_p2", pa.float32()), ("is_noise", pa.bool_()),
        ("noise_kind", pa.string()),
    ])


def _noise_spans(rng: np.random.Generator, n_seqs: int, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token of the group: whether a span covers it, and its kind code (0: clean, i + 1: KINDS[i])."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    per_seq = rng.poisson(NOISE_SHARE * SEQ_TOKENS / SPAN_TOKENS, size=n_seqs)
    seq = np.repeat(np.arange(n_seqs), per_seq)
    span_len = np.minimum(1 + rng.poisson(SPAN_TOKENS - 1, size=seq.size), lengths[seq])
    start = offsets[seq] + np.floor(rng.random(seq.size) * (lengths[seq] - span_len + 1)).astype(np.int64)
    kind = rng.integers(0, len(KINDS), size=seq.size)
    n = int(offsets[-1])
    cover = np.zeros(n + 1, dtype=np.int32)  # a difference array: +1 where a span starts, −1 after it ends
    np.add.at(cover, start, 1)
    np.add.at(cover, start + span_len, -1)
    noise = np.cumsum(cover[:n]) > 0
    # each noise token takes the kind of the latest span started at or before it (overlaps are rare)
    order = np.argsort(start, kind="stable")
    latest = np.full(n, -1, dtype=np.int64)
    latest[start[order]] = order
    latest = np.maximum.accumulate(latest)
    kinds = np.where(noise, kind[np.maximum(latest, 0)] + 1, 0)
    return noise, kinds


def _statistics(rng: np.random.Generator, noise: np.ndarray) -> dict[str, np.ndarray]:
    """Consistent per-token statistics; noise tokens are less likely and more uncertain."""
    n = noise.size
    entropy = rng.gamma(1.5, 0.8, size=n) + noise * rng.gamma(2.0, 0.8, size=n)
    logp = -(rng.gamma(0.6, 1.0, size=n) * (0.6 + 0.3 * entropy)) - noise * rng.gamma(1.5, 1.5, size=n)
    logp = np.maximum(logp, -25.0)
    p = np.exp(logp)
    rank = 1 + np.floor(rng.random(n) ** 2 * (np.minimum(1.0 / p, VOCAB) - 1.0))
    h_bits = entropy / math.log(2.0)
    massey = np.where(h_bits >= 2, 2.0 ** (h_bits - 2) + 1, 1.0)
    expected_rank = np.minimum(massey * (1 + rng.gamma(1.0, 0.5, size=n)), VOCAB)
    topk = np.minimum(entropy * rng.uniform(0.7, 1.0, size=n), LN20)
    sum_p2 = p * p + (1 - p) ** 2 * rng.random(n) ** 2
    zipf = (rng.zipf(1.3, size=n) - 1) % VOCAB
    token_id = np.where(noise, rng.integers(0, VOCAB, size=n), zipf)
    return {"logp": logp, "entropy": entropy, "rank": rank, "expected_rank": expected_rank, "topk_entropy": topk,
            "sum_p2": sum_p2, "token_id": token_id}


def row_group(n_tokens: int, seed: int, group: int) -> pa.Table:
    """Row group ``group`` of the ``(n_tokens, seed)`` table: its own generator, seeded by ``(seed, group)``."""
    first = group * ROWS_PER_GROUP
    rows = min(ROWS_PER_GROUP, n_tokens - first)
    rng = np.random.default_rng(np.random.SeedSequence([seed, group, GENERATOR_VERSION]))
    first_seq, n_seqs = first // SEQ_TOKENS, -(-rows // SEQ_TOKENS)
    lengths = np.full(n_seqs, SEQ_TOKENS, dtype=np.int64)
    lengths[-1] = rows - SEQ_TOKENS * (n_seqs - 1)
    noise, kind_codes = _noise_spans(rng, n_seqs, lengths)
    stats = _statistics(rng, noise)
    names = pa.array([f"syn-{first_seq + i:09d}" for i in range(n_seqs)], pa.string())
    seq = np.repeat(np.arange(n_seqs), lengths)
    pos = np.arange(rows, dtype=np.int64) - np.repeat(np.arange(n_seqs) * SEQ_TOKENS, lengths)
    columns = {
        "seq_id": pc.take(names, pa.array(seq)),
        "pos": pa.array(pos.astype(np.int32)),
        "token_id": pa.array(stats["token_id"].astype(np.int32)),
        "token": pc.take(pa.array(PIECES, pa.string()), pa.array(stats["token_id"] % len(PIECES))),
        "logp": pa.array(stats["logp"].astype(np.float32)),
        "entropy": pa.array(stats["entropy"].astype(np.float32)),
        "rank": pa.array(stats["rank"].astype(np.int64)),
        "expected_rank": pa.array(stats["expected_rank"].astype(np.float64)),
        "topk_entropy": pa.array(stats["topk_entropy"].astype(np.float32)),
        "sum_p2": pa.array(stats["sum_p2"].astype(np.float32)),
        "is_noise": pa.array(noise),
        "noise_kind": pc.take(pa.array(("",) + KINDS, pa.string()), pa.array(kind_codes)),
    }
    return pa.table(columns, schema=schema())


def write_table(path: Path, n_tokens: int, seed: int, *,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the ``(n_tokens, seed)`` table to ``path`` with its manifest, atomically; return the manifest.

    One row group at a time (memory flat in ``n_tokens``); ``progress(tokens_done, n_tokens)`` after each.
    """
    require_positive("--tokens", n_tokens)
    started = time.perf_counter()
    groups = -(-n_tokens // ROWS_PER_GROUP)
    with atomic_files(path, manifest_path(path)) as (tmp, tmp_manifest):
        with pq.ParquetWriter(tmp, schema()) as writer:
            for group in range(groups):
                table = row_group(n_tokens, seed, group)
                writer.write_table(table, row_group_size=ROWS_PER_GROUP)
                if progress is not None:
                    progress(min((group + 1) * ROWS_PER_GROUP, n_tokens), n_tokens)
        manifest = {
            **manifest_header("synthetic", input="synthetic", input_digest=f"synthetic:seed={seed}", output=path),
            "model": None, "generator_version": GENERATOR_VERSION, "seed": seed, "n_tokens": n_tokens,
            "seq_tokens": SEQ_TOKENS, "rows_per_group": ROWS_PER_GROUP, "row_groups": groups,
            "noise_share_target": NOISE_SHARE, "kinds": list(KINDS), "bytes": tmp.stat().st_size,
            "seconds": round(time.perf_counter() - started, 3),
        }
        tmp_manifest.write_text(dump_json(manifest), encoding="utf-8")
    return manifest


def cached_table(work: Path, n_tokens: int, seed: int, *,
                 progress: Callable[[int, int], None] | None = None) -> tuple[Path, dict, bool]:
    """The ``(n_tokens, seed)`` table in ``work``: (path, manifest, whether it was generated now).

    A file whose manifest records the same size, seed and generator version is reused as it is.
    """
    work.mkdir(parents=True, exist_ok=True)
    path = work / file_name(n_tokens, seed)
    manifest = read_manifest(path) if path.exists() else None
    if manifest and (manifest.get("n_tokens"), manifest.get("seed"), manifest.get("generator_version")) == (
            n_tokens, seed, GENERATOR_VERSION) and manifest.get("bytes") == path.stat().st_size:
        return path, manifest, False
    return path, write_table(path, n_tokens, seed, progress=progress), True

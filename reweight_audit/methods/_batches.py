"""Per-batch reductions for batch-dependent methods: every token gets a statistic of its own batch."""
from __future__ import annotations

import numpy as np


def batch_codes(batch: np.ndarray | None, n: int) -> np.ndarray:
    """Dense batch codes 0..B−1 per token; ``batch=None`` puts all ``n`` tokens in batch 0."""
    if batch is None:
        return np.zeros(n, dtype=np.int64)
    _, inverse = np.unique(np.asarray(batch), return_inverse=True)
    return inverse.reshape(-1)


def batch_mean(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Per token, the mean of ``values`` over the tokens that share its batch code."""
    if values.size == 0:
        return np.zeros(0)
    sums = np.bincount(codes, weights=values)
    counts = np.bincount(codes)
    return (sums / np.maximum(counts, 1))[codes]


def batch_max(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Per token, the maximum of ``values`` over the tokens that share its batch code."""
    if values.size == 0:
        return np.zeros(0)
    top = np.full(int(codes.max()) + 1, -np.inf)
    np.maximum.at(top, codes, values)
    return top[codes]


def sequence_codes(columns, why: str) -> np.ndarray:
    """Per token, a code for its sequence: the ``seq_code`` column when given, else runs of ``pos``.

    ``compare`` hands methods ``seq_code`` (derived from the table's ``seq_id``); training's rows are
    row-major, so there a sequence is a run of ``pos`` = 0, 1, 2, ... and a new one starts wherever
    ``pos`` does not go up by one. Neither column: ``ValueError`` naming ``why`` (the parameter setting).
    """
    if "seq_code" in columns:
        return np.asarray(columns["seq_code"]).reshape(-1)
    if "pos" not in columns:
        raise ValueError(f"parameter {why} needs each token's sequence: a 'seq_code' or 'pos' column")
    pos = np.asarray(columns["pos"], dtype=np.int64).reshape(-1)
    starts = np.ones(pos.size, dtype=bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    return np.cumsum(starts) - 1


def micro_batch_codes(codes: np.ndarray, seqs: np.ndarray, per_micro: int) -> np.ndarray:
    """Dense codes for micro-batches: each batch's sequences, in order of their codes, cut into runs of ``per_micro``.

    ``codes`` are the dense batch codes (``batch_codes``), ``seqs`` the sequence codes; a token's
    micro-batch is (its batch, the index of its sequence among the batch's sorted sequences // per_micro).
    """
    if codes.size == 0:
        return np.zeros(0, dtype=np.int64)
    codes, seqs = np.asarray(codes, dtype=np.int64), np.asarray(seqs, dtype=np.int64)
    # one int64 key per (batch, sequence), ordered as the pair (codes and sequence codes are dense, >= 0): a 1-D
    # unique sorts ~10x faster than np.unique(axis=1)'s lexicographic pass over a stacked array
    span = int(seqs.max()) + 1
    keys, inverse = np.unique(codes * span + seqs, return_inverse=True)
    batch = keys // span
    # keys are sorted by batch, then sequence: a sequence's index within its batch is its position minus the
    # position where its batch starts
    first = np.searchsorted(batch, batch, side="left")
    micro = (np.arange(keys.size) - first) // int(per_micro)
    _, dense = np.unique(batch * (int(micro.max()) + 1) + micro, return_inverse=True)
    return dense.reshape(-1)[inverse.reshape(-1)]

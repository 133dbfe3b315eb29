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

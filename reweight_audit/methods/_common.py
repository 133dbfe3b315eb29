"""Shared helpers for the built-in methods: column access and probabilities in float64."""
from __future__ import annotations

from typing import Mapping

import numpy as np


def col(columns: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Column ``name`` as float64 (statistics may be stored as float32 or int)."""
    return np.asarray(columns[name], dtype=np.float64)


def n_rows(columns: Mapping[str, np.ndarray]) -> int:
    """Token count for methods that need no column (``compute_weights`` guarantees one 1-D column)."""
    for values in columns.values():
        arr = np.asarray(values)
        if arr.ndim == 1:
            return int(arr.shape[0])
    raise ValueError("no 1-D column to count tokens from")


def logp_col(columns: Mapping[str, np.ndarray], name: str = "logp") -> np.ndarray:
    """log p_t clamped to <= 0.

    A log-softmax computed in fp32 can round to a tiny positive value for a
    near-certain token; clamping keeps p_t <= 1 so 1 - p_t never goes negative.
    """
    return np.minimum(col(columns, name), 0.0)


def nll_col(columns: Mapping[str, np.ndarray], name: str = "logp") -> np.ndarray:
    """-log p_t >= 0 (the +0.0 turns -0.0 into 0.0)."""
    return -logp_col(columns, name) + 0.0


def one_minus_p(logp: np.ndarray) -> np.ndarray:
    """1 - p_t computed as -expm1(log p_t): exact near p_t = 1, where 1 - exp() cancels."""
    return -np.expm1(logp) + 0.0  # +0.0: p_t = 1 gives 0.0, not -0.0


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> float:
    """Validate a numeric parameter; ValueError becomes an AuditError naming the method."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"parameter {name} must be a number, got {value!r}") from None
    if not np.isfinite(v):
        raise ValueError(f"parameter {name} must be finite, got {value!r}")
    if low is not None and v < low:
        raise ValueError(f"parameter {name} must be >= {low}, got {value!r}")
    if high is not None and v > high:
        raise ValueError(f"parameter {name} must be <= {high}, got {value!r}")
    return v

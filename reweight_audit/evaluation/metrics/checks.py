"""Validation at the public boundary: every check turns misuse into one line of :class:`AuditError`.

The public functions of this package call these once; the private twins they
call trust their (already checked) arrays. Imports only :mod:`reweight_audit.core`.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation.metrics.declarations import SCOPES


def array_1d(x: Any, name: str) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise AuditError(f"{name} must be a 1-D array ({exc})") from None
    if a.ndim != 1:
        raise AuditError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        raise AuditError(f"{name} is empty; need at least one token")
    return a


def same_length(a: np.ndarray, name: str, n: int, ref: str) -> None:
    if a.size != n:
        raise AuditError(f"{name} has {a.size} entries but {ref} has {n}; give one per token")


def check_scores(x: Any, name: str = "scores") -> np.ndarray:
    a = array_1d(x, name)
    if a.dtype.kind not in "biuf":
        raise AuditError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    nan = np.isnan(a)
    if nan.any():
        raise AuditError(f"{name} contains NaN (first at index {int(np.argmax(nan))}); "
                         f"every token needs a number")
    return a


def check_labels(x: Any, n: int, name: str = "is_noise", ref: str = "scores") -> np.ndarray:
    a = array_1d(x, name)
    same_length(a, name, n, ref)
    if a.dtype.kind == "b":
        return a
    if a.dtype.kind not in "iuf":
        raise AuditError(f"{name} must be boolean, got dtype {a.dtype}")
    bad = (a != 0) & (a != 1)
    if bad.any():
        raise AuditError(f"{name} must be boolean or 0/1, found {a[np.argmax(bad)]!r} "
                         f"at index {int(np.argmax(bad))}")
    return a.astype(bool)


def check_codes(x: Any, n: int, name: str = "seq_codes") -> tuple[np.ndarray, int]:
    """Validated codes as intp and the number of codes S (codes are 0..S-1)."""
    a = array_1d(x, name)
    same_length(a, name, n, "scores")
    if a.dtype.kind not in "iu":
        raise AuditError(f"{name} must be integer codes, got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.min() < 0:
        raise AuditError(f"{name} must be non-negative, found {int(a.min())}")
    return code_layout(a)


def code_layout(a: np.ndarray) -> tuple[np.ndarray, int]:
    """Checked non-negative integer codes as intp 0..S-1 and S: as given, or renumbered (in order) when the
    largest code is not below the number of tokens (gaps larger than the data: no max+1 slots)."""
    top = int(a.max())
    if top >= a.size:
        uniq, inv = np.unique(a, return_inverse=True)
        return inv.astype(np.intp).reshape(-1), int(uniq.size)
    return a.astype(np.intp, copy=False), top + 1


def check_k(k: Any, name: str = "k") -> float:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Real):
        raise AuditError(f"{name} must be a number in (0, 100] percent (a fraction in (0, 1]), got {k!r}")
    k = float(k)
    if not (0.0 < k <= 1.0):
        raise AuditError(f"{name} must be in (0, 100] percent (a fraction in (0, 1]), got {k * 100:g}%")
    return k


def check_scope(scope: Any) -> str:
    if not isinstance(scope, str) or scope not in SCOPES:
        raise AuditError(f"scope must be 'global' or 'sequence', got {scope!r}")
    return scope


def check_inputs(scores: Any, is_noise: Any, seq_codes: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(scores as float64, labels as bool, sequence codes as intp, number of codes)."""
    s = check_scores(scores)
    y = check_labels(is_noise, s.size)
    codes, n_codes = check_codes(seq_codes, s.size)
    return s, y, codes, n_codes


def check_pair(scores: Any, is_noise: Any) -> tuple[np.ndarray, np.ndarray]:
    s = check_scores(scores)
    return s, check_labels(is_noise, s.size)


def check_weights(weights: Any, n: int | None = None) -> np.ndarray:
    w = check_scores(weights, "weights")
    if n is not None:
        same_length(w, "weights", n, "scores")
    check_finite_weights(w)
    return w


def check_finite_weights(w: np.ndarray) -> None:
    """Weights (already float64 without NaN) must be finite and non-negative."""
    if not np.isfinite(w).all():
        raise AuditError(f"weights must be finite, found {w[~np.isfinite(w)][0]} "
                         f"at index {int(np.argmax(~np.isfinite(w)))}")
    if (w < 0).any():
        raise AuditError(f"weights must be non-negative, found {w[w < 0][0]:g} at index {int(np.argmax(w < 0))}")


def check_boot(n_boot: Any, seed: Any, level: Any) -> None:
    """A bootstrap's replicates (positive), seed (non-negative) and level (in (0, 1))."""
    check_n_boot(n_boot)
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise AuditError(f"level must be in (0, 1), got {level!r}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise AuditError(f"seed must be a non-negative integer, got {seed!r}")


def check_n_boot(n_boot: Any) -> None:
    if isinstance(n_boot, (bool, np.bool_)) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise AuditError(f"n_boot must be a positive integer, got {n_boot!r}")

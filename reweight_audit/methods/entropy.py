"""Entropy-dominant methods: weights that grow with the model's predictive uncertainty."""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ._common import check_range, col
from .registry import register

# EAFT's top-k; the `topk_entropy` column is defined over the top-20 logits.
TOPK = 20


@register(
    "entropy",
    family="entropy",
    needs=("entropy",),
    formula="w = H_t (nats, full vocabulary)",
    source="entropy-dominant, full vocabulary",
)
def entropy(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """w_t = H_t = −Σ_i p_i ln p_i. Tiny negatives from fp rounding are clamped to 0."""
    return np.maximum(col(columns, "entropy"), 0.0)


@register(
    "eaft",
    family="entropy",
    needs=("topk_entropy",),
    formula="w = (H_top20 / ln 20)^α",
    source="EAFT, arXiv 2601.02151: the loss scaled by the normalised top-k entropy, k = 20",
    param_sources={"alpha": "1 (default): the entropy weight to the first power, as EAFT writes it; other "
                            "powers are ours"},
)
def eaft(columns: Mapping[str, np.ndarray], *, batch=None, rng=None, alpha: float = 1.0) -> np.ndarray:
    """w_t = (H_top20,t / ln 20)^α: top-20 entropy normalised to [0, 1] (ln 20 is its maximum).

    Clipped into [0, 1] first so fp rounding can neither go negative nor
    exceed the uniform-top-20 maximum. α >= 0 (α = 0 gives all ones).
    """
    alpha = check_range("alpha", alpha, 0.0)
    h = np.clip(col(columns, "topk_entropy") / math.log(TOPK), 0.0, 1.0)
    return np.power(h, alpha)

"""Baselines: plain SFT (every token weight 1) and a seeded random weight (chance)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ._common import n_rows
from .registry import register


@register(
    "sft",
    family="baseline",
    needs=(),
    formula="w = 1",
    source="standard SFT",
)
def sft(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """w_t = 1. Constant weights tie everywhere, so ranking metrics score the base rate."""
    return np.ones(n_rows(columns), dtype=np.float64)


@register(
    "random",
    family="baseline",
    needs=(),
    formula="w ~ Uniform[0, 1), seeded",
    source="chance baseline",
)
def random(columns: Mapping[str, np.ndarray], *, batch=None, rng: np.random.Generator | None = None) -> np.ndarray:
    """w_t ~ U[0, 1) from the generator ``compute_weights`` seeds, so a run is reproducible."""
    if rng is None:  # called directly, outside compute_weights
        rng = np.random.default_rng(0)
    return rng.random(n_rows(columns))

"""Loss-based methods: weights that follow the token's loss."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ._common import check_range, logp_col, nll_col, one_minus_p
from .registry import register


@register(
    "nll",
    family="loss",
    needs=("logp",),
    formula="w = −log p_t",
    source="loss-proportional",
)
def nll(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """w_t = −log p_t: the token's own cross-entropy loss."""
    return nll_col(columns)


@register(
    "focal",
    family="loss",
    needs=("logp",),
    formula="w = (1 − p_t)^γ",
    source="focal loss (Lin et al. 2017)",
)
def focal(columns: Mapping[str, np.ndarray], *, batch=None, rng=None, gamma: float = 2.0) -> np.ndarray:
    """w_t = (1 − p_t)^γ, the focal-loss modulating factor; γ >= 0 (γ = 0 is plain SFT)."""
    gamma = check_range("gamma", gamma, 0.0)
    return np.power(one_minus_p(logp_col(columns)), gamma)

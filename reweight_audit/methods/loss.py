"""Loss-based methods: weights that follow the token's loss."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ._common import check_range, nll_col
from .registry import register
from .shapes import FOCAL


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
    formula=(
        "w = −dℓ/d(log p_t) of ℓ = −(1 − p_t)^γ·log p_t: detach=false: (1 − p_t)^γ + γ·p_t·(1 − p_t)^(γ−1)·(−log p_t); "
        "detach=true: (1 − p_t)^γ, the factor a stop-gradient"
    ),
    source="focal loss, Lin et al. 2017 (arXiv 1708.02002), eq. 5: FL(p_t) = −(1 − p_t)^γ·log(p_t), γ = 2 their default",
    shape=FOCAL,
    param_sources={
        "gamma": "2 (default): Lin et al.'s best setting (their γ ∈ [0, 5], γ = 0 is cross-entropy)",
        "detach": "false (default): Lin et al.'s loss as published, the factor differentiated; true: the factor as a "
                  "stop-gradient weight (this toolkit's default before issue 22; no source trains so)",
    },
)
def focal(
    columns: Mapping[str, np.ndarray], *, batch=None, rng=None, gamma: float = 2.0, detach: bool = False
) -> np.ndarray:
    """The focal loss's weight on the NLL gradient, −dℓ/d(log p) (``shapes.focal_weight``); γ >= 0.

    ``detach=False`` (default): Lin et al.'s loss ℓ = −(1 − p)^γ·log p as published,
    differentiated through the factor: w = (1 − p)^γ + γ·p·(1 − p)^(γ−1)·(−log p),
    1.07 at p = 0.01 (not monotone in p), 0.60 against 0.25 at p = 0.5.
    ``detach=True``: w = (1 − p)^γ, the factor as a stop-gradient.
    """
    gamma = check_range("gamma", gamma, 0.0)
    if not isinstance(detach, (bool, np.bool_)):
        raise ValueError(f"parameter detach must be true or false, got {detach!r}")
    weight, _ = FOCAL.views(columns, batch, {"gamma": gamma, "detach": bool(detach)})
    return weight

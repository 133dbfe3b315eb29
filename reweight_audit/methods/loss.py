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
    formula=(
        "detach=true: w = (1 − p_t)^γ; detach=false: w = (1 − p_t)^γ + γ·p_t·(1 − p_t)^(γ−1)·(−log p_t), "
        "the NLL-gradient weight of L = −(1 − p_t)^γ·log p_t"
    ),
    source=(
        "focal loss (Lin et al. 2017, FL(p) = −(1 − p)^γ·log p, γ = 2 their default); detach=false is the "
        "gradient of that loss as published (the factor is not detached); detach=true (default, unchanged) "
        "is the factor alone, the weight when (1 − p)^γ is a stop-gradient"
    ),
)
def focal(
    columns: Mapping[str, np.ndarray], *, batch=None, rng=None, gamma: float = 2.0, detach: bool = True
) -> np.ndarray:
    """The focal loss's weight on the NLL gradient; γ >= 0 (γ = 0 is plain SFT either way).

    ``detach=True`` (default): w_t = (1 − p_t)^γ, the modulating factor, which is the
    gradient weight only when the factor is a stop-gradient. ``detach=False``: Lin et
    al.'s loss L = −(1 − p)^γ·log p as published, differentiated through the factor.
    L depends on the logits only through log p, and ∂(−log p)/∂(log p) = −1, so its
    weight on the NLL gradient is −dL/d(log p) = (1 − p)^γ + γ·p·(1 − p)^(γ−1)·(−log p):
    1.07 at p = 0.01 (not monotone in p), 0.60 against 0.25 at p = 0.5. The second
    term is computed as γ·p·(1 − p)^γ·(−log p)/(1 − p), with (−log p)/(1 − p) → 1 at
    p = 1 and p·(−log p) → 0 at p = 0, so it is finite for every γ >= 0.
    """
    gamma = check_range("gamma", gamma, 0.0)
    if not isinstance(detach, (bool, np.bool_)):
        raise ValueError(f"parameter detach must be true or false, got {detach!r}")
    logp = logp_col(columns)
    q = one_minus_p(logp)
    factor = np.power(q, gamma)
    if detach:
        return factor
    nll = -logp + 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(q > 0.0, nll / np.where(q > 0.0, q, 1.0), 1.0)  # (−log p)/(1 − p) → 1 as p → 1
    p = np.exp(logp)
    p_ratio = np.where(p > 0.0, p * ratio, 0.0)  # p·(−log p) → 0 as p → 0 (log p = −inf)
    return factor + gamma * factor * p_ratio

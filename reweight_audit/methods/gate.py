"""Probability gates: a token keeps its full NLL gradient or none of it, by its own probability.

ProFit (Liu, Wu et al., arXiv 2601.09195) bets the opposite way to inverse-probability
weighting: low-probability target tokens are "mostly replaceable expressions", so they are
masked out of the loss, and only tokens the model already finds likely are trained on.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ._common import check_range, logp_col
from .registry import register


@register(
    "profit",
    family="prob",
    needs=("logp",),
    formula="w = 1[p_t ≥ τ] (stop-gradient hard gate on the NLL)",
    source=(
        "ProFit, arXiv 2601.09195: a token contributes only when its probability exceeds a fixed τ; "
        "mask as in the authors' code (github.com/Utaotao/ProFit, _profit_cross_entropy: p < τ ignored)"
    ),
    param_sources={"tau": "0.1 (default): the authors' run script and README ('recommended')"},
)
def profit(columns: Mapping[str, np.ndarray], *, batch=None, rng=None, tau: float = 0.1) -> np.ndarray:
    """w_t = 1 if p_t ≥ τ else 0: the loss is ``sg(1[p_t ≥ τ]) · (−log p_t)``.

    The paper says "exceeds"; the authors' code masks ``p < τ``, so a token exactly
    at the threshold is kept, and so it is here. Compared in log space
    (log p_t ≥ ln τ) so the edge does not depend on exp() rounding. τ in [0, 1]:
    τ = 0 keeps every token (plain SFT), τ = 1 keeps only p_t = 1. Default τ = 0.1,
    the setting of the authors' run script and README ("recommended").
    """
    tau = check_range("tau", tau, 0.0, 1.0)
    logp = logp_col(columns)
    keep = np.ones(logp.shape, dtype=bool) if tau == 0.0 else logp >= math.log(tau)
    # A NaN log-probability stays NaN (not a silent 0), so compute_weights reports the bad column.
    return np.where(np.isnan(logp), np.nan, keep.astype(np.float64))

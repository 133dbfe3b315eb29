"""Reference-model methods: weights that compare the model with a reference model."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ._common import logp_col
from .registry import register


@register(
    "rho1",
    family="reference",
    needs=("logp", "ref_logp"),
    formula="w = max(0, −log p_t − (−log p_ref,t))",
    source="Rho-1, arXiv 2404.07965",
)
def rho1(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """w_t = max(0, NLL_t − NLL_ref,t) = max(0, log p_ref,t − log p_t): Rho-1's excess loss.

    High where the reference model finds the token much easier than the model
    does; 0 where the model is already as good as the reference.
    """
    excess = logp_col(columns, "ref_logp") - logp_col(columns, "logp")
    return np.maximum(excess, 0.0) + 0.0

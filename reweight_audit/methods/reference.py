"""Reference-model methods: weights that compare the model with a reference model."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ._batches import batch_codes
from ._common import check_range, logp_col
from .registry import register

#: What rho1 returns: the graded excess loss, or Rho-1's 0/1 mask of the top k% by excess loss.
SELECT_MODES = ("graded", "top-k")


def top_k_mask(score: np.ndarray, codes: np.ndarray, k_pct: float) -> np.ndarray:
    """1.0 on the floor(k% · n_b) highest-scoring tokens of each batch b, else 0.0.

    Ties are broken by row order (the earlier row first), so the mask is deterministic.
    """
    mask = np.zeros(score.size)
    order = np.lexsort((np.arange(score.size), -score, codes))  # by batch, then score descending, then row
    sorted_codes = codes[order]
    starts = np.searchsorted(sorted_codes, sorted_codes, side="left")
    rank_in_batch = np.arange(score.size) - starts
    counts = np.bincount(codes)[sorted_codes]
    keep = rank_in_batch < np.floor(counts * (k_pct / 100.0) + 1e-9)
    mask[order[keep]] = 1.0
    return mask


@register(
    "rho1",
    family="reference",
    needs=("logp", "ref_logp"),
    formula=(
        "select=graded: w = max(0, −log p_t − (−log p_ref,t)); select=top-k: w = 1 on the top k_pct% of "
        "the batch by excess loss −log p_t + log p_ref,t, else 0"
    ),
    source=(
        "Rho-1 (Selective Language Modeling), Lin et al., arXiv 2404.07965, eqs. 3–5: L_SLM = −(1/(N·k%))·Σ_i "
        "I_k%(x_i)·log P(x_i), I_k% = 1 on the top k% by excess loss L_θ − L_ref, 'ranking the tokens in a batch' "
        "(read from the paper PDF, github.com/microsoft/rho docs/rho-1.pdf)"
    ),
    batch_dependent=True,
    param_sources={
        "select": "top-k (default): the paper's SLM mask; graded: the excess loss itself as a score (no source "
                  "trains so; this toolkit's default before issue 22)",
        "k_pct": "60 (default): the paper's token selection ratio for Tinyllama-1.1B ('we use 60% for the "
                 "Tinyllama-1.1B model and 70% for the Mistral-7B model', §3.1 Pretraining Setting; its Figure 9: "
                 "about 60% of the tokens suits SLM); 70: its 7B runs",
    },
)
def rho1(
    columns: Mapping[str, np.ndarray],
    *,
    batch: np.ndarray | None = None,
    rng=None,
    select: str = "top-k",
    k_pct: float = 60.0,
) -> np.ndarray:
    """Rho-1's excess loss NLL_t − NLL_ref,t = log p_ref,t − log p_t, as a score or as its mask.

    ``select="graded"``: w_t = max(0, excess), high where the reference
    model finds the token much easier than the model does; 0 where the model is
    already as good as the reference. ``batch`` is not looked at.

    ``select="top-k"`` (default, the paper's SLM): w_t = 1 for the floor(k_pct% · n) tokens of the simulated
    batch with the highest excess loss (not clipped at 0), else 0: Selective Language
    Modeling's loss mask, ranked within each batch as its trainer does (``batch=None``:
    all tokens are one batch). ``k_pct`` in [0, 100] (default 60).
    """
    if select not in SELECT_MODES:
        raise ValueError(f"parameter select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
    k_pct = check_range("k_pct", k_pct, 0.0, 100.0)
    excess = logp_col(columns, "ref_logp") - logp_col(columns, "logp")
    if select == "graded":
        return np.maximum(excess, 0.0) + 0.0
    mask = top_k_mask(np.nan_to_num(excess, nan=-np.inf), batch_codes(batch, excess.size), k_pct)
    return np.where(np.isnan(excess), np.nan, mask)  # a NaN input stays visible to compute_weights' check

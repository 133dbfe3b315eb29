"""Entropy-scaled token loss: MiLe (Su et al., NAACL 2024 Findings; arXiv 2310.19531).

MiLe scales each token's cross-entropy by a power of the predictive entropy, so tokens
the model is unsure about ("difficult to learn") get more gradient than easy, frequent
ones. The scale is detached from the graph, so it is a pure per-token weight.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ._batches import batch_codes, batch_max, batch_mean
from ._common import check_range, col
from .registry import register

@register(
    "mile",
    family="entropy",
    needs=("entropy",),
    formula="w = (1 + H_t)^γ / mean_batch((1 + H)^γ), H_t in nats, stop-gradient",
    source=(
        "MiLe loss, Su et al., NAACL 2024 Findings (arXiv 2310.19531); equation from the authors' code "
        "(github.com/suu990901/LLaMA-MiLe-Loss, utils/trainer.py: loss = α·(σ + H)^γ·CE, σ = 1, "
        "α = 1/mean((σ + H)^γ), H detached); the paper body was not read. Their normaliser's mean also counts the "
        "ignored positions (prompt, padding) of the micro-batch; ours is over the supervised tokens of the "
        "simulated batch, the only tokens a statistics table has: one constant per batch apart, so orders within a "
        "batch agree"
    ),
    batch_dependent=True,
    param_sources={"gamma": "1 (default): γ = 1 in the authors' runs (utils/trainer.py)"},
)
def mile(
    columns: Mapping[str, np.ndarray],
    *,
    batch: np.ndarray | None = None,
    rng=None,
    gamma: float = 1.0,
) -> np.ndarray:
    """w_t = (1 + H_t)^γ / mean over the batch of (1 + H)^γ: batch mean exactly 1.

    The authors normalise by the (all-reduced) batch mean so the loss stays on the
    cross-entropy scale; that constant differs between simulated batches, so the
    method is batch-dependent (``batch=None``: all tokens are one batch). Within a
    batch the weight rises with entropy: a peaked row (H = 0) gets the least, a flat
    row (H = ln V) the most. Their code clamps probabilities at 1e-8 before taking
    the entropy (adding < 2e-7 nats per clamped token); the `entropy` column is
    exact. Computed as exp(γ·log(1 + H) − batch max) so a large γ cannot overflow.
    γ >= 0 (γ = 0 is plain SFT).
    """
    gamma = check_range("gamma", gamma, 0.0)
    # σ = 1 as in the authors' code, so a zero-entropy token keeps a weight > 0: log(σ + H) = log1p(H).
    log_scale = gamma * np.log1p(np.maximum(col(columns, "entropy"), 0.0))
    codes = batch_codes(batch, log_scale.size)
    scale = np.exp(log_scale - batch_max(log_scale, codes))  # in (0, 1], the batch's largest is 1
    return scale / batch_mean(scale, codes)

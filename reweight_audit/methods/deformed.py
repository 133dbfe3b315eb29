"""Deformed-log losses, registered as their per-token weight on the NLL gradient.

The family L_α(p) = (1 − p^α)/α (a Tsallis-style deformed log of p; α → 0 gives −log p,
α = 1 gives 1 − p) changes the loss *shape*, not a weight. With α held fixed or detached
(stop-gradient), L depends on the logits z only through p_t, so by the chain rule

    ∂L/∂z = (dL/dp) · ∂p/∂z,    ∂(−log p)/∂z = (−1/p) · ∂p/∂z,
    dL/dp = −p^(α−1)   ⇒   ∂L/∂z = p^α · ∂(−log p)/∂z     for every logit.

So w_t = p_t · |dL/dp_t| = p_t^α is the exact multiplier on the NLL gradient (the
"gate" of DEFT's "gate × error" form), and `--rank-by grad` shows the true gradient
share. The methods differ only in how α is chosen:

* ``deformed-log``: one fixed α for every token (Beyond Log Likelihood's family).
* ``deft``: α_t = Σ_i p_i², the row's concentration (exp of minus its Rényi-2 entropy).
* ``deft-cayley``: α_t from the Cayley-transform focus trajectory of the DEFT paper.

Under `--rank-by weight` a fixed α ranks tokens exactly like ``dft`` (p^α is monotone
in p); the loss and grad views differ.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ._batches import batch_codes, batch_mean, micro_batch_codes, sequence_codes
from ._common import check_range, col, logp_col
from .registry import register
from .shapes import DEFORMED_LOG, DEFT, LossShape, deformed_loss
from .shapes import deformed_weight as _shape_weight

# deft-cayley clamps the focus index into [0.001, 1], as the authors' code does.
CAYLEY_ALPHA_MIN = 0.001


def deformed_weight(logp: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """w = p^α = exp(α · log p), the NLL-gradient weight of L_α(p) = (1 − p^α)/α (``shapes.deformed_weight``).

    Computed from log p so a p that underflows exp() still gets p^α right for small α.
    α = 0 gives 1 (the NLL) even where log p = −inf.
    """
    with np.errstate(invalid="ignore"):
        return _shape_weight(logp, alpha=alpha)


@register(
    "deformed-log",
    family="prob",
    needs=("logp",),
    formula="w = p_t^α: NLL-gradient weight of L = (1 − p_t^α)/α (α = 0: NLL, α = 1: 1 − p)",
    source=(
        "Beyond Log Likelihood, arXiv 2510.00526: objective family (1 − p^α)/α ('GeneralFamily-α', "
        "github.com/GaotangLi/Beyond-Log-Likelihood); α = 10 is their −p^10 up to a constant factor"
    ),
    shape=DEFORMED_LOG,
    param_sources={"alpha": "10 (default): the authors' math script's −p^10 objective (github.com/GaotangLi/"
                            "Beyond-Log-Likelihood); α → 0 is the NLL, α = 1 is 1 − p (both in the paper's family)"},
)
def deformed_log(columns: Mapping[str, np.ndarray], *, batch=None, rng=None, alpha: float = 10.0) -> np.ndarray:
    """w_t = p_t^α for one fixed α >= 0; larger α leans harder on the model's prior."""
    alpha = check_range("alpha", alpha, 0.0)
    return DEFORMED_LOG.views(columns, batch, {"alpha": alpha})[0]


@register(
    "deft",
    family="prob",
    needs=("logp", "sum_p2"),
    formula=(
        "w = p_t^α_t · α_t/(α_t + eps), α_t = sg(Σ_i p_i²): NLL-gradient weight of L = (1 − p_t^α_t)/(α_t + eps)"
    ),
    source=(
        "DEFT, arXiv 2602.11424 (trust gate set by Rényi-2 concentration); loss −(exp(α·log p_t) − 1)/α "
        "with α = Σp² detached, from the authors' code (github.com/luludus/DEFT, fsdp_sft_trainer.py), which "
        "divides by α + 1e-6; we read the abstract and code, not the paper body"
    ),
    shape=DEFT,
    param_sources={"eps": "1e-6 (default): the authors' code, loss / (α + 1e-6) (fsdp_sft_trainer.py); the factor "
                          "α/(α + eps) is 1/(1 + eps·V) on a flat row: > 0.95 below a 50k vocabulary, ≈ 0.79 at 262k "
                          "(Gemma 3); eps=0: the family (1 − p^α)/α as written"},
)
def deft(columns: Mapping[str, np.ndarray], *, batch=None, rng=None, eps: float = 1e-6) -> np.ndarray:
    """w_t = p_t^(Σ_i p_i²): Dynamic Entropy Fine-Tuning's gate, parameter-free.

    Σp² runs from 1/V (flat row: α → 0, the NLL) to 1 (one-hot row: α = 1, DFT's
    w = p). A confident row whose mass sits on another token ("confident conflict",
    α ≈ 1, p_t ≈ 0) is gated to ≈ p_t ≈ 0; an unsure row keeps NLL-like weight.
    Σp² is clipped into [0, 1] against rounding. The authors' code divides the
    loss by α + 1e-6 instead of α, which puts a factor α/(α + eps) on w: on a flat
    row α = 1/V, so the factor is 1/(1 + eps·V): > 0.95 for V < 50k, about 0.79 at
    V = 262k. ``eps=1e-6`` (default) scores the authors' code; ``eps=0`` the loss as
    written in the family, without that guard. eps >= 0.
    """
    eps = check_range("eps", eps, 0.0)
    return DEFT.views(columns, batch, {"eps": eps})[0]


def cayley_constants(columns, batch, *, micro_batch_seqs: int) -> dict:
    """deft-cayley's detached α_t = clip(f + (1 − f)·p_t/(2 − p_t), 0.001, 1), f = ½·mean(p) over the (micro-)batch."""
    p = np.exp(logp_col(columns))
    codes = batch_codes(batch, p.size)
    if micro_batch_seqs:
        seqs = sequence_codes(columns, f"micro_batch_seqs={micro_batch_seqs}")
        codes = micro_batch_codes(codes, seqs, int(micro_batch_seqs))
    floor = 0.5 * batch_mean(p, codes)
    return {"alpha": np.clip(floor + (1.0 - floor) * p / (2.0 - p), CAYLEY_ALPHA_MIN, 1.0)}


DEFT_CAYLEY = LossShape("ℓ = (1 − p_t^α_t)/α_t, α_t = sg(Cayley focus index)", cayley_constants, deformed_loss,
                        _shape_weight)


@register(
    "deft-cayley",
    family="prob",
    needs=("logp",),
    formula=(
        "w = p_t^α_t, α_t = clip(f + (1 − f)·p_t/(2 − p_t), 0.001, 1), f = ½·mean(p) over the simulated batch "
        "(micro_batch_seqs=0) or over micro-batches of N sequences (micro_batch_seqs=N)"
    ),
    source=(
        "DEFT paper's Cayley-transform focus trajectory, arXiv 2602.11424; equation read from the authors' "
        "code (github.com/luludus/DEFT, objective 'Cayley_Trans'), not from the paper body"
    ),
    batch_dependent=True,
    shape=DEFT_CAYLEY,
    param_sources={"micro_batch_seqs": "4 (default): the authors' code averages p over the per-GPU micro-batch, 4 "
                                       "sequences by default; 0: over the whole simulated batch (--batch-seqs)"},
)
def deft_cayley(
    columns: Mapping[str, np.ndarray], *, batch: np.ndarray | None = None, rng=None, micro_batch_seqs: int = 4
) -> np.ndarray:
    """w_t = p_t^α_t with the focus index moved along the Cayley map of the uncertainty d = 1 − p_t.

    α_local = (1 − d)/(1 + d) = p/(2 − p) runs from 0 (p = 0: NLL-like) to 1
    (p = 1: DFT-like); a floor f = ½ · (mean p over the simulated batch) lifts it,
    α = f + (1 − f) · α_local, clamped into [0.001, 1]. The code's 1e-8 guards are
    left out (they move α by < 1e-7). ``batch=None`` treats all tokens as one batch.

    ``micro_batch_seqs``: N >= 1 (default 4) averages p over micro-batches of N
    sequences, each simulated batch's sequences cut in order of their codes (the
    authors' code averages over the per-GPU micro-batch, 4 sequences by default;
    needs the ``seq_code`` or ``pos`` column); 0 over the whole simulated batch.
    """
    if isinstance(micro_batch_seqs, bool) or int(micro_batch_seqs) != micro_batch_seqs or micro_batch_seqs < 0:
        raise ValueError(f"parameter micro_batch_seqs must be a whole number >= 0, got {micro_batch_seqs!r}")
    return DEFT_CAYLEY.views(columns, batch, {"micro_batch_seqs": int(micro_batch_seqs)})[0]


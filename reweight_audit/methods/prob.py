"""Probability-dominant methods: weights that are functions of p_t = exp(log p_t)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ._batches import sequence_codes
from ._common import check_range, logp_col, one_minus_p
from .registry import register


@register(
    "dft",
    family="prob",
    needs=("logp",),
    formula="w = p_t (stop-gradient)",
    source="DFT, arXiv 2508.05629",
)
def dft(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """w_t = p_t: Dynamic Fine-Tuning scales each token's loss by its own (detached) probability."""
    return np.exp(logp_col(columns))


@register(
    "inv-prob",
    family="prob",
    needs=("logp",),
    formula="w = 1 − p_t",
    source="prob-dominant: cross-entropy gradient on the target logit",
)
def inv_prob(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """w_t = 1 − p_t, the magnitude of ∂(−log p_t)/∂z_t; via −expm1 so p_t ≈ 1 stays exact."""
    return one_minus_p(logp_col(columns))


# ----------------------------------------------------------------------- TALR


def _floor_mean_one(q: np.ndarray, w_min: float) -> np.ndarray:
    """Weights w_i = max(w_min, c·q_i) with the one c > 0 that makes mean(w) = 1.

    Flooring first and rescaling afterwards would push floored tokens back
    below the floor; solving for c instead keeps both promises exactly: every
    weight >= w_min, and the batch mean is 1. Needs 0 <= w_min <= 1 and q with
    a positive entry. Sorting q in descending order, if the top k tokens stay
    above the floor then c = (n − (n−k)·w_min) / Σ_{top k} q, and the right k
    is the one where token k is above the floor and token k+1 is not.
    """
    n = q.size
    if w_min >= 1.0:
        return np.ones(n)  # mean 1 with every weight >= 1: all exactly 1
    order = np.argsort(-q, kind="stable")
    qs = q[order]
    k = np.arange(1, n + 1)
    c = (n - (n - k) * w_min) / np.cumsum(qs)
    above = c * qs >= w_min * (1 - 1e-12)  # token k (1-based) unfloored under c_k
    nxt = np.append(qs[1:], 0.0)
    below = (c * nxt <= w_min * (1 + 1e-12)) | (k == n)  # token k+1 floored under c_k
    ok = np.flatnonzero(above & below)
    kk = int(ok[0]) if ok.size else n - 1  # always found; the fallback guards rounding
    w = np.maximum(w_min, c[kk] * q)
    return w / w.mean()  # removes the last ulps of drift (floored stay >= w_min·(1−ε))


#: TALR's temperature: the median per-token NLL of the batch, or the median of its sequences' mean NLLs.
TAU_MODES = ("per-token", "per-sequence")


def _median_nll(logp: np.ndarray, seqs: np.ndarray | None) -> float:
    """Median of −log p over the tokens (``seqs`` None) or of each sequence's mean −log p."""
    if seqs is None:
        return float(np.median(-logp))
    _, inverse = np.unique(seqs, return_inverse=True)
    inverse = inverse.reshape(-1)
    means = np.bincount(inverse, weights=-logp) / np.bincount(inverse)
    return float(np.median(means))


def _talr_one_batch(logp: np.ndarray, w_min: float, tau_min: float, seqs: np.ndarray | None = None) -> np.ndarray:
    n = logp.size
    if n == 0:
        return np.zeros(0)
    tau = max(_median_nll(logp, seqs), tau_min)
    z = logp / tau
    e = np.exp(z - z.max())  # max-shift: softmax without overflow
    q = n * e / e.sum()  # softmax scaled to mean 1
    return _floor_mean_one(q, w_min)


@register(
    "talr",
    family="prob",
    needs=("logp",),
    formula=(
        "w = n·softmax_batch(log p_t / τ), τ = median NLL of the batch (tau=per-token: over its tokens; "
        "per-sequence: over its sequences' mean NLLs); w >= w_min; batch mean 1"
    ),
    source=(
        "TALR, arXiv 2509.20758: w ∝ p_t^(1/τ) normalised over the batch, τ the median loss of the batch, "
        "weights floored"
    ),
    batch_dependent=True,
    param_sources={
        "w_min": "0.01 (default): a floor of 1% of SFT's weight; the paper floors the weights but its value was not "
                 "checked here",
        "tau_min": "1e-6 (default): a guard of ours (τ = 0 when over half the batch has p = 1); no source",
        "tau": "per-token (default): the median per-token loss of the batch, one reading of the paper; "
               "per-sequence: the median of the batch's per-sequence mean losses, the other; the paper's text "
               "supports both, so neither is its stated value",
    },
)
def talr(
    columns: Mapping[str, np.ndarray],
    *,
    batch: np.ndarray | None = None,
    rng=None,
    w_min: float = 0.01,
    tau_min: float = 1e-6,
    tau: str = "per-token",
) -> np.ndarray:
    """Token-Adaptive Loss Reweighting, per simulated training batch.

    Within a batch of n tokens: q_t = n · exp(log p_t / τ) / Σ_s exp(log p_s / τ)
    (∝ p_t^(1/τ), mean 1), with the temperature τ = median over the batch of
    −log p_t. Then w_t = max(w_min, c·q_t) with c chosen so the batch mean is
    exactly 1 (see ``_floor_mean_one``): low-probability tokens are damped, but
    never below w_min, and the total weight per batch equals plain SFT's.

    ``batch=None`` treats all tokens as one batch. Guard: when the median NLL
    is 0 (over half the batch has p = 1) τ would be 0; τ = max(median, tau_min)
    (default 1e-6 nats) then sends every token with any loss to the floor.
    ``w_min`` defaults to 0.01, i.e. a token keeps at least 1% of plain SFT's
    weight; it must lie in [0, 1] (mean 1 is impossible with a floor above 1).

    ``tau`` says what the median is taken over: ``"per-token"`` (default) the
    batch's per-token NLLs; ``"per-sequence"`` each sequence's mean NLL (one value
    per sequence, so a few long sequences do not set τ alone; needs the
    ``seq_code`` or ``pos`` column). On a batch where most tokens are near-certain
    the per-token median is tiny (e.g. 0.005 nats) and sends every token with any
    loss to the floor; a per-sequence median is usually larger.
    """
    w_min = check_range("w_min", w_min, 0.0, 1.0)
    tau_min = check_range("tau_min", tau_min, 0.0)
    if tau_min <= 0:
        raise ValueError("parameter tau_min must be > 0")
    if tau not in TAU_MODES:
        raise ValueError(f"parameter tau must be one of {', '.join(TAU_MODES)}, got {tau!r}")
    logp = logp_col(columns)
    seqs = sequence_codes(columns, "tau=per-sequence") if tau == "per-sequence" else None
    if batch is None:
        return _talr_one_batch(logp, w_min, tau_min, seqs)
    out = np.empty_like(logp)
    _, inverse = np.unique(np.asarray(batch), return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    for idx in np.split(order, bounds):
        out[idx] = _talr_one_batch(logp[idx], w_min, tau_min, None if seqs is None else seqs[idx])
    return out

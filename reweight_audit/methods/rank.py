"""Rank-based methods: RankTuner (arXiv 2602.01745) and its variants.

RankTuner compares the rank R_t of the ground-truth token (how many guesses,
in descending probability order, until the target) with the expected rank
E[R_t] = Σ_i i·p_(i) under the model's own distribution. With the NDCG-style
compression f(x) = 1/log2(x + 1) the relative rank indicator is
I_t = 2^(f(R_t) − f(E[R_t])) and the token weight is its reciprocal
S_t = 1/I_t = 2^(f(E[R_t]) − f(R_t)).

Properties (the tests check them): S = 1 when R = E[R]; S grows with R at
fixed E[R] (a worse guess than expected needs more gradient); S falls with
E[R] at fixed R (the same miss is forgiven at a harder position); and with
both large, f(·) → 0 so S → 1: the "noise region" where high-entropy,
low-probability tokens get neutral weight. Since 0 < f <= 1 for x >= 1,
S lies in (1/2, 2).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ._common import col, logp_col
from .registry import register

LN2 = math.log(2.0)


def rank_discount(x: np.ndarray) -> np.ndarray:
    """The NDCG-style compression f(x) = 1/log2(x + 1) = ln 2 / log1p(x); f(1) = 1 exactly."""
    return LN2 / np.log1p(x)


def _ranks(columns: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """A rank column clamped to >= 1: E[R] computed in floating point can land a hair below 1."""
    return np.maximum(col(columns, name), 1.0)


def relative_scale(rank: np.ndarray, expected_rank: np.ndarray) -> np.ndarray:
    """S = 2^(f(E[R]) − f(R)), f(x) = 1/log2(x + 1); R and E[R] clamped to >= 1."""
    r = np.maximum(np.asarray(rank, dtype=np.float64), 1.0)
    er = np.maximum(np.asarray(expected_rank, dtype=np.float64), 1.0)
    return np.exp2(rank_discount(er) - rank_discount(r))


@register(
    "ranktuner",
    family="rank",
    needs=("rank", "expected_rank"),
    formula="S = 2^(f(E[R_t]) − f(R_t)), f(x) = 1/log2(x+1)",
    source="RankTuner, arXiv 2602.01745 (exact indicator)",
)
def ranktuner(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """w_t = S_t = 1/I_t = 2^(f(E[R_t]) − f(R_t)), f(x) = 1/log2(x + 1)."""
    return relative_scale(_ranks(columns, "rank"), _ranks(columns, "expected_rank"))


LOW_ENTROPY_MODES = ("smooth", "trivial")


@register(
    "ranktuner-approx",
    family="rank",
    needs=("logp", "entropy", "rank"),
    formula="S = (p_t·s(H_t))^(−K(ξ_t)), s(H) = 2^(H_bits−2)+1, ξ_t = max(R_t, s(H_t)), K(ξ) = log2(ξ+1)^(−2)",
    source="RankTuner, arXiv 2602.01745 (practical form)",
)
def ranktuner_approx(
    columns: Mapping[str, np.ndarray],
    *,
    batch=None,
    rng=None,
    low_entropy: str = "smooth",
) -> np.ndarray:
    """w_t = (p_t · s(H_t))^(−K(ξ_t)), RankTuner's practical form (no expected rank needed).

    s(H) = 2^(H_bits − 2) + 1 with H_bits = H / ln 2 is Massey's lower bound on
    E[R] and replaces it; ξ_t = max(R_t, s(H_t)); K(ξ) = log2(ξ + 1)^(−2)
    (the paper drops a ξ/(ξ+1) factor for stability).

    The bound holds only for H_bits >= 2. ``low_entropy`` picks what to use
    below that:

    * ``"smooth"`` (default): the same formula, so s(H) runs smoothly from 1.25
      at H = 0 to 2 at H_bits = 2 (not a proven bound there, but continuous).
    * ``"trivial"``: s(H) = 1, the only bound that holds everywhere (E[R] >= 1);
      s jumps from 1 to 2 at H_bits = 2.

    Computed in log space: log s = softplus(H − 2 ln 2), log(ξ + 1) =
    softplus(log ξ), so nothing overflows for any entropy.
    """
    if low_entropy not in LOW_ENTROPY_MODES:
        raise ValueError(
            f"parameter low_entropy must be one of {', '.join(LOW_ENTROPY_MODES)}, got {low_entropy!r}"
        )
    logp = logp_col(columns)
    h = np.maximum(col(columns, "entropy"), 0.0)
    log_r = np.log(_ranks(columns, "rank"))
    # log s(H) = log(1 + 2^(H/ln2 − 2)) = log(1 + e^(H − 2 ln 2))
    log_s = np.logaddexp(0.0, h - 2.0 * LN2)
    if low_entropy == "trivial":
        log_s = np.where(h < 2.0 * LN2, 0.0, log_s)
    log_xi = np.maximum(log_r, log_s)
    k = (LN2 / np.logaddexp(0.0, log_xi)) ** 2  # log2(ξ+1)^(−2)
    return np.exp(-k * (logp + log_s))


@register(
    "ranktuner-dft",
    family="rank",
    needs=("logp", "rank", "expected_rank"),
    formula="w = p_t · 2^(f(E[R_t]) − f(R_t))",
    source="RankTuner on the DFT base (math setting), arXiv 2602.01745",
)
def ranktuner_dft(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """w_t = p_t · S_t: RankTuner's scale on DFT's base weight w_t = p_t (its math-reasoning setting)."""
    s = relative_scale(_ranks(columns, "rank"), _ranks(columns, "expected_rank"))
    return np.exp(logp_col(columns)) * s

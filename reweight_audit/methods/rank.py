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

The paper multiplies S into a base weight, w̃_t = w_t · S_t: w_t = p_t for its
mathematical-reasoning SFT (the DFT base) and w_t = 1 for general tasks (the
reference note's "Loss & Training"). ``base="1"`` or ``base="p"`` picks one on
both the exact and the practical S; the registered names fix the common pairs:
``ranktuner`` (1 · exact S), ``ranktuner-dft`` (p · exact S),
``ranktuner-approx`` (1 · practical S) and ``ranktuner-approx-dft``
(p · practical S: the weight the paper trains math with, its Table 1 weight
not being stated; registered in ``rank_math``, after the 2025-2026 methods, so
the older names keep their places in every listing).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ._common import col, logp_col
from .registry import register

LN2 = math.log(2.0)

#: RankTuner's base weight w_t in w̃_t = w_t · S_t: "1" (general tasks) or "p" (math, the DFT base).
BASES = ("1", "p")
#: Which source supports which base weight (docs/methods.md).
BASE_SOURCE = ("1 (default): the paper's general-task setting, w_t = 1; p: its math setting, w_t = p_t "
               "(the DFT base; needs the logp column). Which one its Table 1 ranks by is not stated")


def rank_discount(x: np.ndarray) -> np.ndarray:
    """The NDCG-style compression f(x) = 1/log2(x + 1) = ln 2 / log1p(x); f(1) = 1 exactly."""
    return LN2 / np.log1p(x)


def _ranks(columns: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """A rank column clamped to >= 1: E[R] computed in floating point can land a hair below 1."""
    return np.maximum(col(columns, name), 1.0)


def _check_base(base: str) -> str:
    if base not in BASES:
        raise ValueError(f"parameter base must be one of {', '.join(BASES)}, got {base!r}")
    return base


def on_base(scale: np.ndarray, columns: Mapping[str, np.ndarray], base: str) -> np.ndarray:
    """w̃ = w · S with w = 1 or w = p_t (needs ``logp`` then)."""
    if base == "p" and "logp" not in columns:
        raise ValueError("parameter base=p needs the logp column")
    return np.exp(logp_col(columns)) * scale if base == "p" else scale


def relative_scale(rank: np.ndarray, expected_rank: np.ndarray) -> np.ndarray:
    """S = 2^(f(E[R]) − f(R)), f(x) = 1/log2(x + 1); R and E[R] clamped to >= 1."""
    r = np.maximum(np.asarray(rank, dtype=np.float64), 1.0)
    er = np.maximum(np.asarray(expected_rank, dtype=np.float64), 1.0)
    return np.exp2(rank_discount(er) - rank_discount(r))


@register(
    "ranktuner",
    family="rank",
    needs=("rank", "expected_rank"),
    formula="w = b_t · S_t, S = 2^(f(E[R_t]) − f(R_t)), f(x) = 1/log2(x+1); b_t = 1 (base=1) or p_t (base=p)",
    source=(
        "RankTuner, arXiv 2602.01745 (exact indicator): w̃_t = w_t·S_t, S_t = I_t^(−1), I_t = 2^(f(R_t) − f(E[R_t]))"
    ),
    param_sources={"base": BASE_SOURCE},
)
def ranktuner(columns: Mapping[str, np.ndarray], *, batch=None, rng=None, base: str = "1") -> np.ndarray:
    """w_t = b_t · S_t, S_t = 1/I_t = 2^(f(E[R_t]) − f(R_t)), f(x) = 1/log2(x + 1).

    ``base`` is the paper's base weight b_t: ``"1"`` (default; its general-task
    setting) or ``"p"`` (b_t = p_t, its math setting; the same as ``ranktuner-dft``).
    """
    _check_base(base)
    return on_base(relative_scale(_ranks(columns, "rank"), _ranks(columns, "expected_rank")), columns, base)


LOW_ENTROPY_MODES = ("smooth", "trivial")

PRACTICAL_FORMULA = "S = (p_t·s(H_t))^(−K(ξ_t)), s(H) = 2^(H_bits−2)+1, ξ_t = max(R_t, s(H_t)), K(ξ) = log2(ξ+1)^(−2)"
#: Which source supports which low_entropy value (docs/methods.md).
LOW_ENTROPY_PARAM = ("smooth (default): the paper's s(H) = 2^(H_bits−2)+1 as written, for every H (s(0) = 1.25); "
                     "trivial: s = 1 below 2 bits, the only bound on E[R] that holds there. The paper states the "
                     "bound for H ≥ 2 bits and says nothing below, so neither value is its stated one")


def check_low_entropy(low_entropy: str) -> str:
    if low_entropy not in LOW_ENTROPY_MODES:
        raise ValueError(
            f"parameter low_entropy must be one of {', '.join(LOW_ENTROPY_MODES)}, got {low_entropy!r}"
        )
    return low_entropy


def practical_scale(columns: Mapping[str, np.ndarray], low_entropy: str) -> np.ndarray:
    """RankTuner's practical S_t = (p_t · s(H_t))^(−K(ξ_t)) (no expected rank needed).

    s(H) = 2^(H_bits − 2) + 1 with H_bits = H / ln 2 is Massey's lower bound on
    E[R] and replaces it; ξ_t = max(R_t, s(H_t)); K(ξ) = log2(ξ + 1)^(−2)
    (the paper drops a ξ/(ξ+1) factor for stability).

    The bound holds only for H_bits >= 2 (the paper states it "for H_t ≥ 2"
    and says nothing about lower entropies). ``low_entropy`` picks what to use below that:

    * ``"smooth"`` (default): the same formula, so s(H) runs smoothly from 1.25
      at H = 0 to 2 at H_bits = 2. Not a bound there: s(0) = 1.25 > E[R] = 1 for
      a one-hot row, so a confident token (p ≈ 1, R = 1) gets S < 1, e.g.
      p = 0.9, H = 0.3 nats, R = 1: s = 1.337, K = 0.667, S = 0.884.
    * ``"trivial"``: s(H) = 1, the only bound that holds everywhere (E[R] >= 1);
      s jumps from 1 to 2 at H_bits = 2. The same token: s = ξ = K = 1, S = 1/p = 1.111.
      Below 2 bits K = 1 whenever R = 1, so S = 1/p there: confident tokens sit above 1.

    Computed in log space: log s = softplus(H − 2 ln 2), log(ξ + 1) =
    softplus(log ξ), so nothing overflows for any entropy.
    """
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
    "ranktuner-approx",
    family="rank",
    needs=("logp", "entropy", "rank"),
    formula=f"w = b_t · {PRACTICAL_FORMULA}; b_t = 1 (base=1) or p_t (base=p)",
    source=(
        "RankTuner, arXiv 2602.01745 (practical form, S_t = (p_t·s(H_t))^(−K(ξ_t))); base=p is "
        "ranktuner-approx-dft"
    ),
    param_sources={"low_entropy": LOW_ENTROPY_PARAM, "base": BASE_SOURCE},
)
def ranktuner_approx(
    columns: Mapping[str, np.ndarray],
    *,
    batch=None,
    rng=None,
    low_entropy: str = "smooth",
    base: str = "1",
) -> np.ndarray:
    """w_t = b_t · (p_t · s(H_t))^(−K(ξ_t)), RankTuner's practical form (see ``practical_scale``).

    ``base``: ``"1"`` (default, the paper's general-task setting) or ``"p"``
    (b_t = p_t, its math setting; the same as ``ranktuner-approx-dft``).
    """
    check_low_entropy(low_entropy)
    _check_base(base)
    return on_base(practical_scale(columns, low_entropy), columns, base)


@register(
    "ranktuner-dft",
    family="rank",
    needs=("logp", "rank", "expected_rank"),
    formula="w = p_t · 2^(f(E[R_t]) − f(R_t))",
    source="RankTuner on the DFT base (math setting, w_t = p_t) with the exact S, arXiv 2602.01745",
)
def ranktuner_dft(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """w_t = p_t · S_t: RankTuner's scale on DFT's base weight w_t = p_t (its math-reasoning setting)."""
    s = relative_scale(_ranks(columns, "rank"), _ranks(columns, "expected_rank"))
    return np.exp(logp_col(columns)) * s

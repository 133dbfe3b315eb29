"""Declared per-token loss shapes: one definition from which the weight, loss and grad views follow.

A method that changes the loss *shape* (focal, the deformed logs, DEFT) declares it
as a :class:`LossShape`: its per-token loss ℓ(x; c) as a function of x = log p_t
(the only quantity differentiated) and of per-token constants c that are detached
(stop-gradient: DEFT's α = Σp², deft-cayley's batch floor, focal's factor when
detached), together with ℓ's derivative. Every view comes from that one object:

* **weight**: w_t = −∂ℓ/∂x, the exact multiplier on the NLL gradient (∂(−log p)/∂x = −1,
  and ℓ depends on the logits only through x), so training ``w_t · NLL_t`` with w
  detached has the same gradient as ℓ itself;
* **loss**: ℓ_t, the token's share of the objective the authors minimise;
* **grad**: |∂ℓ/∂z| = w_t · ‖∂(−log p_t)/∂z‖ (evaluation's ``grad_norm``).

A method without a shape trains ``sg(w_t) · NLL_t``; its loss view is w_t · NLL_t, the
same identity (:func:`loss_view`). ``tests/test_fidelity_shapes.py`` checks every
declared weight against central differences of the declared loss in float64. The
training loss may use :func:`shape_of` and :meth:`LossShape.weight` (what the fused loss
consumes); this module stays pure NumPy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ._common import logp_col, one_minus_p


@dataclass(frozen=True)
class LossShape:
    """ℓ(x; c) and −∂ℓ/∂x for x = log p_t; ``constants`` gives the detached c from the columns and parameters.

    ``constants(columns, batch, **params) -> dict`` (per-token arrays or scalars), ``loss(x, **c)`` and
    ``weight(x, **c)`` (= −dℓ/dx). ``formula`` is ℓ as the docs print it.
    """

    formula: str
    constants: Callable[..., dict[str, Any]]
    loss: Callable[..., np.ndarray]
    weight: Callable[..., np.ndarray]

    def views(self, columns: Mapping[str, np.ndarray], batch: np.ndarray | None, params: Mapping[str, Any]
              ) -> tuple[np.ndarray, np.ndarray]:
        """(weight, loss) per token, from the columns' ``logp`` and the detached constants."""
        x = logp_col(columns)
        c = self.constants(columns, batch, **params)
        with np.errstate(all="ignore"):
            return self.weight(x, **c) + 0.0, self.loss(x, **c) + 0.0


# ----------------------------------------------------------------------------- focal


def _focal_constants(columns, batch, *, gamma: float, detach: bool) -> dict[str, Any]:
    x = logp_col(columns)
    # detached: the factor (1 − p)^γ is a constant of the step; otherwise it is differentiated
    return {"gamma": gamma, "factor": np.power(one_minus_p(x), gamma) if detach else None}


def focal_loss(x: np.ndarray, *, gamma: float, factor: np.ndarray | None) -> np.ndarray:
    """ℓ = −(1 − p)^γ · log p (Lin et al. 2017); with a detached factor, factor · (−log p)."""
    nll = -x + 0.0
    q = factor if factor is not None else np.power(one_minus_p(x), gamma)
    return np.where(q > 0.0, q * nll, 0.0)  # 0 · inf at p = 0 never arises (q = 1 there); p = 1: 0


def focal_weight(x: np.ndarray, *, gamma: float, factor: np.ndarray | None) -> np.ndarray:
    """−dℓ/dx: the factor when detached; else (1 − p)^γ + γ·p·(1 − p)^(γ−1)·(−log p).

    The second term is computed as γ·p·(1 − p)^γ·(−log p)/(1 − p), with (−log p)/(1 − p) → 1 at
    p = 1 and p·(−log p) → 0 at p = 0, so it is finite for every γ >= 0.
    """
    if factor is not None:
        return factor
    q = one_minus_p(x)
    f = np.power(q, gamma)
    nll = -x + 0.0
    ratio = np.where(q > 0.0, nll / np.where(q > 0.0, q, 1.0), 1.0)
    p = np.exp(x)
    p_ratio = np.where(p > 0.0, p * ratio, 0.0)
    return f + gamma * f * p_ratio


FOCAL = LossShape("ℓ = −(1 − p_t)^γ·log p_t (detach=true: the factor a stop-gradient)",
                  _focal_constants, focal_loss, focal_weight)


# ------------------------------------------------------------------ the deformed logs


def deformed_loss(x: np.ndarray, *, alpha: np.ndarray | float, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """ℓ = scale · (1 − p^α)/α, computed as −expm1(α·x)/α; α = 0 gives −log p (the limit)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    safe = np.where(alpha > 0.0, alpha, 1.0)
    return scale * np.where(alpha > 0.0, -np.expm1(alpha * x) / safe, -x + 0.0)


def deformed_weight(x: np.ndarray, *, alpha: np.ndarray | float, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """−dℓ/dx = scale · p^α = scale · exp(α · log p); α = 0 gives scale even where log p = −inf."""
    alpha = np.asarray(alpha, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # 0 · (−inf) for α = 0 is replaced just below
        w = np.exp(alpha * x)
    return scale * np.where(alpha == 0.0, 1.0, w)


def _fixed_alpha(columns, batch, *, alpha: float) -> dict[str, Any]:
    return {"alpha": alpha}


DEFORMED_LOG = LossShape("ℓ = (1 − p_t^α)/α", _fixed_alpha, deformed_loss, deformed_weight)


def deft_constants(columns, batch, *, eps: float) -> dict[str, Any]:
    """DEFT's detached α = Σ_i p_i² (clipped into [0, 1]) and the code's factor α/(α + eps)."""
    alpha = np.clip(np.asarray(columns["sum_p2"], dtype=np.float64), 0.0, 1.0)
    if eps == 0.0:
        return {"alpha": alpha, "scale": 1.0}
    with np.errstate(all="ignore"):
        scale = np.where(alpha + eps > 0.0, alpha / (alpha + eps), 1.0)
    return {"alpha": alpha, "scale": scale}


DEFT = LossShape("ℓ = (1 − p_t^α_t)/(α_t + eps), α_t = sg(Σ_i p_i²)", deft_constants, deformed_loss,
                 deformed_weight)


def shape_of(method: Any) -> LossShape | None:
    """The method's declared loss shape (``Method.shape``), or None for a stop-gradient weight on the NLL."""
    return getattr(method, "shape", None)


def loss_view(weights: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """The loss view of a stop-gradient weight: ℓ_t = w_t · (−log p_t) (log p clamped to <= 0)."""
    return np.asarray(weights, dtype=np.float64) * (-np.minimum(np.asarray(logp, dtype=np.float64), 0.0))


class ViewedWeights(np.ndarray):
    """A method's weights (float64, one per token) that also carry its loss view (``.loss``).

    ``compute_views`` returns one, so every place that ranks by ``loss`` (evaluation's ``rank_scores``)
    uses the declared loss ℓ_t rather than w_t·NLL_t. Only the array itself carries it: a slice or a
    computed array derived from it has ``loss = None`` (its rows are no longer the loss's rows).
    """

    loss: np.ndarray | None

    def __new__(cls, weights: np.ndarray, loss: np.ndarray) -> "ViewedWeights":
        obj = np.asarray(weights, dtype=np.float64).view(cls)
        obj.loss = np.asarray(loss, dtype=np.float64)
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        self.loss = None

"""RankTuner's math-setting weight with the practical S: ``ranktuner-approx-dft`` (arXiv 2602.01745).

The paper trains mathematical reasoning with w̃_t = p_t · S_t, S_t its practical
form (``rank.practical_scale``); ``ranktuner-approx.base=p`` computes the same.
It lives in its own module, imported after the 2025-2026 families and before the
controls, so that adding it (issue 22) left every older method's place in the
listings, the docs table and compare's reports unchanged.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .rank import LOW_ENTROPY_PARAM, PRACTICAL_FORMULA, check_low_entropy, on_base, practical_scale
from .registry import register


@register(
    "ranktuner-approx-dft",
    family="rank",
    needs=("logp", "entropy", "rank"),
    formula=f"w = p_t · S_t, {PRACTICAL_FORMULA}",
    source=(
        "RankTuner, arXiv 2602.01745: the weight the paper trains math with (w̃_t = w_t·S_t, w_t = p_t, "
        "practical S_t)"
    ),
    param_sources={"low_entropy": LOW_ENTROPY_PARAM},
)
def ranktuner_approx_dft(
    columns: Mapping[str, np.ndarray], *, batch=None, rng=None, low_entropy: str = "smooth"
) -> np.ndarray:
    """w_t = p_t · S_t with the practical S_t: RankTuner's math-reasoning setting (DFT base)."""
    check_low_entropy(low_entropy)
    return on_base(practical_scale(columns, low_entropy), columns, "p")

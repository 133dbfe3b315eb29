"""Controls: trivial rankings from where a token sits and how common it is, not from the model.

A diagnostic that a token's position or rarity alone can match says little about a method.
These are registered like any method (family ``control``) so every table shows, beside each
method, what the trivial answer scores. The same functions define the strata of
``compare --stratify`` (:mod:`reweight_audit.evaluation.strata`), so a control and its stratification
are one definition.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ._common import col
from .registry import register


def relative_position(pos: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
    """(pos + ½) / seq_len: the middle of the token's share of its response, in (0, 1).

    The half-token offset makes the reverse, 1 − x, the same quantity counted from the
    response's end, and gives a one-token response ½ rather than 0/0.
    """
    pos = np.asarray(pos, dtype=np.float64)
    seq_len = np.asarray(seq_len, dtype=np.float64)
    if np.any(seq_len < 1) or np.any(pos < 0) or np.any(pos >= seq_len):
        raise ValueError("needs 0 ≤ pos < seq_len for every token (pos counts the sequence's supervised tokens)")
    return (pos + 0.5) / seq_len


def token_rarity(token_id: np.ndarray) -> np.ndarray:
    """−log(count of the token's id / tokens): the surprisal of the id under the corpus's own unigram counts."""
    ids = np.asarray(token_id)
    if ids.size == 0:
        return np.zeros(0)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return np.log(ids.size) - np.log(counts[inverse.reshape(-1)].astype(np.float64))


@register(
    "position",
    family="control",
    needs=("pos", "seq_len"),
    formula="w = (pos + ½) / seq_len",
    source="control: the token's relative position in its response",
)
def position(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """Later tokens first. On first-wrong-step data errors sit late (everything after one is cut or set aside)."""
    return relative_position(col(columns, "pos"), col(columns, "seq_len"))


@register(
    "position-rev",
    family="control",
    needs=("pos", "seq_len"),
    formula="w = 1 − (pos + ½) / seq_len",
    source="control: the token's relative position, counted from the response's end",
)
def position_rev(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """Earlier tokens first: the mirror image of ``position``."""
    return 1.0 - relative_position(col(columns, "pos"), col(columns, "seq_len"))


@register(
    "rarity",
    family="control",
    needs=("token_id",),
    formula="w = −log(n(token_id) / N), counts over the scored tokens",
    source="control: the token id's unigram surprisal in the scored corpus",
)
def rarity(columns: Mapping[str, np.ndarray], *, batch=None, rng=None) -> np.ndarray:
    """Rare ids first. Injected words are often rare tokens, so this can find them without any model."""
    return token_rarity(columns["token_id"])

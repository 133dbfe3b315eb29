"""Encoded sequences into padded batches: the length-sorted plan, the padding, where the supervised tokens sit.

Also the two conventions every batch of the project shares, defined once: the pad id a tokenizer
without one gets (:func:`pad_id_of`), and Hugging Face's label for "no loss here" (:data:`IGNORE_INDEX`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from reweight_audit.scoring.encoding import Encoded

__all__ = ["IGNORE_INDEX", "BatchInputs", "batch_inputs", "pad_batch", "pad_id_of", "plan_batches"]

IGNORE_INDEX = -100  # Hugging Face's label for "no loss here"


def pad_id_of(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token, else 0.

    Padded positions are masked out of attention and never supervised, so any id in the
    vocabulary serves.
    """
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0))


def plan_batches(sequences: Sequence[Encoded], batch_tokens: int) -> list[list[int]]:
    """Sort by length and fill batches up to ``batch_tokens`` padded tokens.

    A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i].input_ids), sequences[i].order))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        length = len(sequences[i].input_ids)
        if current and length * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(sequences: Sequence[Encoded], pad_id: int, device: str) -> tuple[Any, Any]:
    """Right-padded ``input_ids`` and ``attention_mask`` [batch, longest] on ``device``."""
    import torch

    width = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids, dtype=torch.long)
        mask[row, : len(s.input_ids)] = 1
    return ids.to(device), mask.to(device)


@dataclass
class BatchInputs:
    """A padded batch and where its supervised tokens sit."""

    ids: Any
    mask: Any
    rows: Any
    cols: Any  # position of each supervised token; its prediction comes from cols - 1
    targets: Any


def batch_inputs(sequences: Sequence[Encoded], pad_id: int, device: str) -> BatchInputs:
    """The padded batch with the (row, position, token id) of every supervised token, in sequence order."""
    import torch

    ids, mask = pad_batch(sequences, pad_id, device)
    rows = torch.cat([torch.full((len(s.sup_index),), r, dtype=torch.long) for r, s in enumerate(sequences)]).to(device)
    cols = torch.cat([torch.from_numpy(s.sup_index) for s in sequences]).to(device)
    return BatchInputs(ids, mask, rows, cols, ids[rows, cols])

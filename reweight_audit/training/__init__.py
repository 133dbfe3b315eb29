"""Beside the pipeline, train: fine-tune with any registered method's weights and audit the model as it learns.

``fused`` holds ``FusedReweightedLoss`` (the chunked loss from hidden states and the head: no
``[batch, seq, vocab]`` logits) and ``patching`` the one-line use, ``reweight_audit.training.patch(model,
"ranktuner-approx")``; ``loss`` holds ``ReweightedLoss`` (a Trainer ``compute_loss_func`` on full logits, for
models whose outputs are only logits) and ``AuditCallback``; ``run`` is ``reweight-audit train`` (``run_train``).

May import: every stage below it (core, methods, scoring's public surface, evaluation, reporting); only the faces
(cli, api) import it.
"""
from __future__ import annotations

from typing import Any

__all__ = ["patch", "unpatch"]


def __getattr__(name: str) -> Any:
    # lazy: importing training.config (the CLI's options) must not import torch and transformers
    if name in __all__:
        from reweight_audit.training import patching

        return getattr(patching, name)
    raise AttributeError(f"module 'reweight_audit.training' has no attribute {name!r}")

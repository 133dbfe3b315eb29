"""One line to train with any registered method on the fused loss: ``patch(model, "ranktuner-approx")``.

``patch`` replaces the causal LM's ``forward`` (as Liger's ``apply_liger_kernel_to_*`` does): called
with ``labels``, it runs the model's body, then ``FusedReweightedLoss`` on the last hidden states and
the output head, and returns the loss without logits; called without labels (generation, the audit),
it is the model's own forward. ``Trainer`` then trains on it unchanged: it passes
``num_items_in_batch`` for gradient accumulation, and padding (``-100`` labels), packing with
``position_ids`` and bf16 autocast go to the body as they would to the model.

TRL's ``SFTTrainer`` adds its own fused head when it is built and calls ``model(..., fused_lm_head=True)``;
``patch(trainer, ...)`` (or ``patch(trainer.model, ...)`` after the trainer exists) answers that call
too: ``log_probs`` carries the reweighted loss (so SFTTrainer's ``nll`` loss type returns it exactly,
num_items_in_batch included) and ``entropy``, ``is_top1``, ``label_mask`` feed its metrics.
"""
from __future__ import annotations

import functools
import types
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from reweight_audit.core.errors import AuditError
from reweight_audit.methods import Method
from reweight_audit.training.fused import FusedReweightedLoss, linear_head

__all__ = ["patch", "unpatch"]

_ORIGINAL = "_reweight_audit_forward"  # the model's own forward, kept on the model by patch
_LOSS = "_reweight_audit_loss"


def _causal_lm(target: Any) -> Any:
    """The causal LM to patch: a Trainer's model, the model inside a PEFT wrapper, or the model itself."""
    model = getattr(target, "model", target) if hasattr(target, "args") and hasattr(target, "train") else target
    base = getattr(model, "get_base_model", None)
    model = base() if callable(base) else model
    if not callable(getattr(model, "get_output_embeddings", None)):
        raise AuditError(f"patch: {type(model).__name__} is not a causal LM with an output head")
    return model


def _body(model: Any) -> Any:
    """The decoder body: what score's head code runs (base_model_prefix, else get_decoder)."""
    return getattr(model, model.base_model_prefix, None) or model.get_decoder()


def patch(target: Any, method: str | Method = "sft", /, *, reference: Any = None, seed: int = 0,
          chunk_rows: int | None = None, backend: str = "auto", **params: Any) -> FusedReweightedLoss:
    """Make ``target``'s forward return the fused reweighted loss when given labels; returns the loss object.

    ``target`` is a causal LM (also inside PEFT), or a ``Trainer``/``SFTTrainer`` (its model; an
    SFTTrainer must use ``loss_type="nll"``, the default). ``reference`` is the reference model for
    Rho-1 (run on the same inputs, without grad). Patching again replaces the method; ``unpatch``
    restores the model's own forward.
    """
    args = getattr(target, "args", None)
    if args is not None and getattr(args, "loss_type", "nll") not in ("nll", None):
        raise AuditError(f"patch: the SFTTrainer's loss_type is {args.loss_type!r}; use loss_type='nll' and let "
                         "the method weight the tokens (e.g. method='dft')")
    model = _causal_lm(target)
    loss_fn = FusedReweightedLoss(method, seed=seed, chunk_rows=chunk_rows, backend=backend, **params)
    if "ref_logp" in loss_fn.needs and reference is None:
        raise AuditError(f"method {loss_fn.method.name!r} needs a reference model: patch(model, ..., reference=ref)")
    linear_head(model)  # a head we cannot fuse fails now
    original = getattr(model, _ORIGINAL, None) or model.forward

    @functools.wraps(type(model).forward)  # generate checks its keyword arguments against this signature
    def forward(self: Any, *args: Any, labels: Any = None, num_items_in_batch: Any = None,
                fused_lm_head: bool = False, **kwargs: Any) -> Any:
        if labels is None:
            return original(*args, **kwargs)
        return _fused_forward(self, loss_fn, reference, args, kwargs, labels, num_items_in_batch, fused_lm_head)

    model.forward = types.MethodType(forward, model)
    setattr(model, _ORIGINAL, original)
    setattr(model, _LOSS, loss_fn)
    return loss_fn


def unpatch(target: Any) -> None:
    """Restore the model's own forward."""
    model = _causal_lm(target)
    original = getattr(model, _ORIGINAL, None)
    if original is not None:
        model.forward = original
        delattr(model, _ORIGINAL)
        delattr(model, _LOSS)


def _fused_forward(model: Any, loss_fn: FusedReweightedLoss, reference: Any, args: tuple, kwargs: dict,
                   labels: torch.Tensor, num_items_in_batch: Any, fused_lm_head: bool) -> Any:
    """The body once, then the fused loss; SFTTrainer's fused-head call gets TRL's output fields."""
    for name in ("logits_to_keep", "return_dict", "shift_labels"):
        kwargs.pop(name, None)
    kwargs["use_cache"] = False
    hidden = _body(model)(*args, **kwargs).last_hidden_state
    head = linear_head(model)
    labels = labels.to(head.weight.device)
    ref = {}
    if "ref_logp" in loss_fn.needs:
        with torch.no_grad():
            ref_inputs = {k: v.to(next(reference.parameters()).device) if torch.is_tensor(v) else v
                          for k, v in kwargs.items()}
            ref_args = [a.to(next(reference.parameters()).device) if torch.is_tensor(a) else a for a in args]
            ref = {"ref_hidden": _body(reference)(*ref_args, **ref_inputs).last_hidden_state,
                   "ref_head": linear_head(reference)}
    if fused_lm_head:
        loss_fn.extra = frozenset({"entropy", "is_top1"})
    loss = loss_fn(hidden.to(head.weight.device), labels, head, num_items_in_batch=num_items_in_batch, **ref)
    if not fused_lm_head:
        return CausalLMOutputWithPast(loss=loss)
    return _trl_fields(loss, loss_fn, labels, num_items_in_batch)


def _trl_fields(loss: torch.Tensor, loss_fn: FusedReweightedLoss, labels: torch.Tensor, num_items_in_batch: Any) -> Any:
    """What SFTTrainer reads from a fused-head call, with −Σ log_probs / D equal to our loss.

    SFTTrainer's nll loss is −Σ log_probs / D, D = num_items_in_batch or the supervised count (at least 1),
    so the whole weighted loss, times D, sits in the first supervised slot (its gradient flows from there).
    """
    from trl.trainer.utils import FusedCausalLMOutput

    mask = labels[:, 1:] != -100
    columns = loss_fn.last_columns
    divisor = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    log_probs = torch.zeros(mask.shape, dtype=loss.dtype, device=loss.device)
    log_probs = log_probs.index_put((torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)),
                                    -loss * torch.as_tensor(divisor, device=loss.device))
    entropy = torch.zeros(mask.shape, dtype=torch.float32, device=loss.device)
    entropy[mask] = columns["entropy"].float().to(loss.device)
    is_top1 = torch.zeros(mask.shape, dtype=torch.bool, device=loss.device)
    is_top1[mask] = columns["is_top1"].to(loss.device)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)

"""The chunked output head: the model body once per batch, the head chunk by chunk, each chunk to statistics.

Only the hidden states of supervised positions are gathered; the head is applied to them
``chunk_rows`` rows at a time and each chunk reduced at once by
:func:`reweight_audit.scoring.stats.token_statistics`, so the ``[batch, seq, vocab]`` logits tensor
never exists. :func:`verify_head` checks our head against the model's own logits and falls back to
them (one sequence at a time) when a model post-processes its logits in a way we do not reproduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.scoring.batching import BatchInputs, batch_inputs
from reweight_audit.scoring.encoding import Encoded

__all__ = ["STATS_COLUMNS", "Head", "auto_chunk_rows", "check_vocabulary", "chunk_statistics", "find_head",
           "logit_chunks", "score_batch", "target_logp", "to_host", "verify_head"]

#: The statistics of a supervised token the score table keeps (``docs/formats.md``).
STATS_COLUMNS = ("logp", "entropy", "rank", "expected_rank", "topk_entropy", "sum_p2")


@dataclass
class Head:
    """The output head as a matrix plus the model's logit post-processing."""

    weight: Any  # [vocab, hidden]
    bias: Any | None
    softcap: float | None = None
    scale: float | None = None  # multiply
    divide: float | None = None  # divide (granite's logits_scaling)
    mode: str = "linear"  # "linear" or "model" (fallback: the model's own logits, one sequence at a time)

    def logits(self, hidden: Any) -> Any:
        import torch

        out = hidden @ self.weight.T
        if self.bias is not None:
            out = out + self.bias
        if self.scale is not None:
            out = out * self.scale
        if self.divide is not None:
            out = out / self.divide
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def describe(self) -> dict:
        return {"mode": self.mode, "softcap": self.softcap, "scale": self.scale, "divide": self.divide}


def find_head(model: Any) -> Head:
    """The model's output head and the logit post-processing its config names (softcap, scale)."""
    import torch

    out = model.get_output_embeddings()
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    divide = getattr(text_config, "logits_scaling", None)
    if isinstance(out, torch.nn.Linear):
        return Head(out.weight, out.bias, softcap=softcap or None, scale=scale if scale not in (None, 1, 1.0) else None,
                    divide=divide if divide not in (None, 1, 1.0) else None)
    return Head(None, None, mode="model")


def check_vocabulary(model: Any, sequences: Sequence[Encoded]) -> None:
    """Every token id must index the model's embedding and output head."""
    out = model.get_output_embeddings()
    sizes = [model.get_input_embeddings().num_embeddings]
    if out is not None and hasattr(out, "weight"):
        sizes.append(int(out.weight.shape[0]))
    vocab = min(sizes)
    largest = max(max(s.input_ids) for s in sequences)
    if largest >= vocab:
        raise AuditError(
            f"token id {largest} is outside the model's vocabulary of {vocab}; the tokenizer does not belong to this model "
            "(pass the model's own tokenizer directory to --model)"
        )


def _body_of(model: Any) -> Any:
    return getattr(model, model.base_model_prefix, None) or model.get_decoder()


def verify_head(model: Any, head: Head, seq: Encoded, device: str) -> Head:
    """Check our head against the model's own logits on one sequence; fall back when they differ.

    This catches post-processing we do not know about (a custom head, scaling).
    """
    import torch

    if head.mode != "linear":
        return head
    ids = torch.tensor([seq.input_ids[:64]], device=device)
    reference = model(input_ids=ids, use_cache=False).logits[0].float()
    hidden = _body_of(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
    ours = head.logits(hidden).float()
    tolerance = 1e-3 if reference.dtype == torch.float32 and hidden.dtype == torch.float32 else 5e-2
    scale = reference.abs().max().clamp_min(1.0)
    if not torch.allclose(ours, reference, atol=float(tolerance * scale), rtol=0):
        return Head(None, None, mode="model")
    return head


def auto_chunk_rows(vocab: int, device: str) -> int:
    """Rows per head chunk so that a handful of fp32 [rows, vocab] buffers fit comfortably."""
    import psutil
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = free // 4
    else:
        budget = min(psutil.virtual_memory().available // 8, 2 << 30)
    per_row = vocab * 4 * 6  # logits, probabilities and a few reduction temporaries
    return int(max(16, min(4096, budget // per_row)))


def logit_chunks(model: Any, head: Head, batch: BatchInputs, sequences: Sequence[Encoded], device: str,
                 chunk_rows: int) -> Iterator[tuple[Any, Any]]:
    """(logits, targets) for the supervised tokens, ``chunk_rows`` rows at a time; the body runs once."""
    if head.mode != "linear":
        yield from _model_logits(model, sequences, device, chunk_rows)
        return
    hidden = _body_of(model)(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).last_hidden_state
    picked = hidden[batch.rows, batch.cols - 1]
    del hidden
    for i in range(0, len(batch.targets), chunk_rows):
        yield head.logits(picked[i:i + chunk_rows]), batch.targets[i:i + chunk_rows]


def _model_logits(model: Any, sequences: Sequence[Encoded], device: str, chunk_rows: int) -> Iterator[tuple[Any, Any]]:
    """Fallback for heads we cannot reproduce: the model's own logits, one sequence at a time, kept positions only."""
    import torch

    for s in sequences:
        ids = torch.tensor([s.input_ids], device=device)
        keep = torch.from_numpy(s.sup_index - 1).to(device)
        for i in range(0, len(keep), chunk_rows):
            part = keep[i:i + chunk_rows]
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=part).logits[0]
            yield logits, ids[0, part + 1]


def score_batch(
    model: Any,
    head: Head,
    sequences: Sequence[Encoded],
    *,
    device: str,
    chunk_rows: int,
    pad_id: int,
    ref: tuple[Any, Head] | None = None,
) -> dict[str, np.ndarray]:
    """Statistics for every supervised token of one batch, as numpy arrays."""
    import torch

    from reweight_audit.scoring.stats import token_statistics

    batch = batch_inputs(sequences, pad_id, device)
    parts: dict[str, list] = {}
    for logits, targets in logit_chunks(model, head, batch, sequences, device, chunk_rows):
        for name, value in token_statistics(logits, targets).items():
            parts.setdefault(name, []).append(value)
    if ref is not None:
        ref_model, ref_head = ref
        for logits, targets in logit_chunks(ref_model, ref_head, batch, sequences, device, chunk_rows):
            parts.setdefault("ref_logp", []).append(target_logp(logits, targets))
    return to_host({name: torch.cat(values) for name, values in parts.items()})


def chunk_statistics(logits: Any, targets: Any) -> dict[str, Any]:
    """The table's statistics (:data:`STATS_COLUMNS`) and ``finite`` of one ``[rows, vocab]`` chunk, as tensors.

    The same reduction :func:`score_batch` applies to each head chunk (a training step's logits, say).
    """
    from reweight_audit.scoring.stats import token_statistics

    stats = token_statistics(logits, targets)
    return {name: stats[name] for name in (*STATS_COLUMNS, "finite")}


def target_logp(logits: Any, targets: Any) -> Any:
    """log p(target) = z_target − logsumexp(z), in float32: the reference model's one statistic."""
    import torch

    logits = logits.float()
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def to_host(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    """Copy reduced statistics to numpy; on CUDA through pinned buffers, with one synchronisation per batch."""
    import torch

    first = next(iter(tensors.values()))
    if first.device.type != "cuda":
        return {name: value.numpy() for name, value in tensors.items()}
    pinned = {name: torch.empty(value.shape, dtype=value.dtype, pin_memory=True) for name, value in tensors.items()}
    for name, value in tensors.items():
        pinned[name].copy_(value, non_blocking=True)
    torch.cuda.current_stream(first.device).synchronize()
    return {name: value.numpy() for name, value in pinned.items()}

"""Train with what you audit: the method registry as a training loss, and a live audit.

``ReweightedLoss(method, **params)`` is a ``compute_loss_func`` for Hugging Face's ``Trainer``
(and TRL's ``SFTTrainer``): per supervised token t it computes the statistics the method needs
from the training logits with ``stats.token_statistics`` (the code ``score`` uses), evaluates the
*registered* method on them with ``compute_weights`` (the code ``compare`` uses), and returns

    L = Σ_t w_t · (−log p_t) / D,   D = num_items_in_batch if given, else #supervised tokens,

with the weights detached: gradients flow through −log p_t only. There is one formula per
method, for audit and training alike.

``AuditCallback(probe, methods=..., every=N)`` scores an injected probe corpus with the model
being trained (eval mode, no grad) at the start, every N optimizer steps and at the end, and
logs ``compare``'s metrics of each method's weights on it (``audit/<method>/tok_rec@10`` ...)
plus noise absorption: the mean NLL of the probe's noise and clean tokens and their change since
the first audit. Nothing here prints; the command line (``reweight-audit train``) does.
"""
from __future__ import annotations

import hashlib
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from reweight_audit.core.errors import AuditError
from reweight_audit.methods import Method, get_method
from reweight_audit.scoring.batching import IGNORE_INDEX, pad_id_of, plan_batches
from reweight_audit.scoring.encoding import Encoded, choose_template, encode_records
from reweight_audit.scoring.head import chunk_statistics, find_head, score_batch, target_logp, to_host, verify_head
from reweight_audit.scoring.shards import batch_table
from reweight_audit.core.io import write_parquet_atomic
from reweight_audit.training.fused import checked_method, host_weights, position_columns

AUDIT_PREFIX = "audit/"
#: compare's columns -> the names logged per method (k is appended to the top-k ones)
TOPK_LOGGED = ("tok_prec", "tok_rec", "seq_hit")
FREE_LOGGED = ("auroc", "noise_mass")
ABSORPTION_KEYS = ("noise_nll", "clean_nll", "noise_nll_change", "clean_nll_change")

__all__ = ["AuditCallback", "Probe", "ReweightedLoss", "absorption", "load_probe", "probe_metrics", "score_probe"]


# --------------------------------------------------------------------------- the loss


def _logits_of(outputs: Any) -> torch.Tensor:
    """``outputs.logits`` of a ModelOutput, a dict or a tuple whose first element is the logits."""
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    elif isinstance(outputs, (tuple, list)):
        logits = outputs[0] if outputs else None
    else:
        logits = getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise AuditError("ReweightedLoss: the model outputs carry no [batch, seq, vocab] logits; "
                         "use a causal LM and do not skip its logits (e.g. Liger's fused loss)")
    return logits


class ReweightedLoss:
    """``compute_loss_func`` for ``Trainer``: Σ_t w_t·(−log p_t) / D with w from the registry (detached).

    ``method`` is a registered name (or a ``Method``); ``params`` override its defaults, checked
    now. ``seed`` seeds methods that draw random numbers (call i uses ``seed + i``). Batch-
    dependent methods (TALR) see the supervised tokens of the batch passed in (one device's
    micro-batch). Rows with NaN/inf logits keep weight 1, so their NaN reaches the loss exactly as
    with the default loss (and an fp16 grad scaler skips the step).

    Rho-1 needs the reference model's log p_t, hence the inputs: pass ``reference=ref_model`` and
    ``model=trained_model``; a forward pre-hook on ``model`` keeps the latest ``input_ids`` and
    ``attention_mask`` so the reference can run on the same batch.
    """

    def __init__(self, method: str | Method = "sft", /, *, seed: int = 0, reference: Any = None,
                 model: Any = None, **params: Any) -> None:
        self.method = checked_method("ReweightedLoss", method, params)
        self.params = dict(params)
        self.seed = int(seed)
        self.calls = 0
        self.last_weights: np.ndarray | None = None  # float64, one per supervised token of the last call
        self.reference = reference
        self._inputs: dict[str, torch.Tensor] = {}
        self._hook = None
        if "ref_logp" in self.method.needs:
            if reference is None or model is None:
                raise AuditError(f"method {self.method.name!r} needs a reference model: "
                                 "pass ReweightedLoss(..., reference=ref_model, model=trained_model)")
            self._hook = model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)

    def _capture_inputs(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._inputs = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask")}

    def __call__(self, outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None) -> torch.Tensor:
        if labels is None:
            raise AuditError("ReweightedLoss needs labels (-100 where no loss is wanted); the batch has none")
        logits = _logits_of(outputs)
        shifted = labels[:, 1:].to(logits.device)  # token t+1 is predicted at position t
        supervised = shifted != IGNORE_INDEX
        rows = logits[:, :-1][supervised]  # [N, V], still attached to the graph
        targets = shifted[supervised]
        # log-softmax in float32 whatever the autocast dtype, as Hugging Face's own loss does
        nll = F.cross_entropy(rows.float(), targets, reduction="none")
        weights = self.token_weights(rows.detach(), targets, supervised)
        total = (weights * nll).sum()
        if num_items_in_batch is None:
            return total / targets.numel()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def token_weights(self, rows: torch.Tensor, targets: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
        """float32 weights on the logits' device, one per supervised token (row-major order)."""
        with torch.no_grad():
            columns = self._columns(rows, targets, supervised)
        weights = host_weights(self.method, columns, self.params, self.seed + self.calls)
        self.calls += 1
        self.last_weights = weights
        return torch.from_numpy(weights).to(device=rows.device, dtype=torch.float32)

    def _columns(self, rows: torch.Tensor, targets: torch.Tensor, supervised: torch.Tensor) -> dict[str, np.ndarray]:
        """What compare would hand the method: the statistics, plus token_id, pos and seq_len (as for a score
        table; the batch is the corpus of the rarity control)."""
        tensors = position_columns(supervised, targets)
        if set(self.method.needs) - {"token_id", "pos", "seq_len"}:
            tensors.update(chunk_statistics(rows, targets))
            if self.reference is not None:
                tensors["ref_logp"] = self._reference_logp(supervised, targets).to(rows.device)
        return to_host({name: value.contiguous() for name, value in tensors.items()})

    def _reference_logp(self, supervised: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ids = self._inputs.get("input_ids")
        if ids is None or ids.shape[0] != supervised.shape[0] or ids.shape[1] != supervised.shape[1] + 1:
            raise AuditError("ReweightedLoss: no input_ids of this batch were seen; pass model= the model "
                             "being trained so the reference model can run on the same inputs")
        device = next(self.reference.parameters()).device
        mask = self._inputs.get("attention_mask")
        logits = self.reference(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device),
                                use_cache=False).logits
        return target_logp(logits[:, :-1][supervised.to(device)], targets.to(device))

    def close(self) -> None:
        """Remove the input hook (Rho-1 only)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


# --------------------------------------------------------------------------- the probe


@dataclass
class Probe:
    """An injected corpus encoded for one tokenizer, in score's batches."""

    path: Path
    digest: str  # sha256 of the file as read
    sequences: list[Encoded]
    batches: list[list[int]]
    pad_id: int
    n_noise: int
    n_tokens: int


def load_probe(path: str | Path, tokenizer: Any, *, template: str = "auto", max_length: int | None = None,
               max_records: int | None = None, batch_tokens: int = 2048) -> Probe:
    """Read and encode an ``inject`` output with ``score``'s reader, encoder and batch planner."""
    path = Path(path)
    raw = path.read_bytes() if path.exists() else None
    template = choose_template(tokenizer, template)
    sequences: list[Encoded] = list(encode_records(path, tokenizer, template, max_length, {}, limit=max_records))
    n_noise = sum(int(s.is_noise.sum()) for s in sequences)
    n_tokens = sum(len(s.sup_index) for s in sequences)
    if not sequences:
        raise AuditError(f"{path}: the probe has no record with a supervised token")
    if n_noise == 0 or n_noise == n_tokens:
        raise AuditError(f"{path}: the probe needs both noise and clean tokens (it has {n_noise} noise of "
                         f"{n_tokens}); give an 'inject' output")
    return Probe(path, hashlib.sha256(raw or b"").hexdigest(), sequences, plan_batches(sequences, batch_tokens),
                 pad_id_of(tokenizer), n_noise, n_tokens)


def _unwrap(model: Any) -> Any:
    """The causal LM inside a PEFT wrapper (its LoRA layers stay active), else the model itself."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def score_probe(model: Any, probe: Probe, *, chunk_rows: int = 256) -> Any:
    """The probe's score table (a pyarrow Table, score's columns) under ``model``, in eval mode and without grad.

    The model's train/eval mode is restored afterwards.
    """
    import pyarrow as pa

    net = _unwrap(model)
    device = str(next(net.parameters()).device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            head = verify_head(net, find_head(net), probe.sequences[0], device)
            tables = []
            for members in probe.batches:
                batch = [probe.sequences[i] for i in members]
                stats = score_batch(net, head, batch, device=device, chunk_rows=chunk_rows, pad_id=probe.pad_id)
                tables.append(batch_table(batch, stats))
    finally:
        net.train(was_training)
    return pa.concat_tables(tables)


def absorption(table: Any) -> tuple[float, float]:
    """(mean NLL of the noise tokens, mean NLL of the clean tokens) of a score table."""
    nll = -table.column("logp").to_numpy().astype(np.float64)
    noise = table.column("is_noise").to_numpy(zero_copy_only=False).astype(bool)
    mean = lambda x: float(x.mean()) if x.size else math.nan  # noqa: E731
    return mean(nll[noise]), mean(nll[~noise])


def probe_metrics(table: Any, *, methods: Sequence[str] | None = None, k: float = 10.0,
                  params: Sequence[str] = (), batch_seqs: int = 256, seed: int = 0,
                  save_as: Path | None = None) -> dict[str, float]:
    """compare's metrics of every method's weights on a probe table: ``{"<method>/tok_rec@10": ...}``.

    Runs ``compare.run_compare`` itself (no bootstrap, nothing exported) on the table written to
    ``save_as`` (kept) or to a temporary file; rank by weight, global scope.
    """
    from reweight_audit.evaluation.compare import run_compare
    from reweight_audit.evaluation.config import CompareConfig

    with tempfile.TemporaryDirectory(prefix="reweight-audit-probe-") as tmp:
        path = Path(save_as) if save_as is not None else Path(tmp) / "probe.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(table, path)
        config = CompareConfig(methods=list(methods) if methods is not None else None, k=k, params=list(params),
                               batch_seqs=batch_seqs, bootstrap=0, seed=seed)
        result = run_compare([path], Path(tmp), config, workers=1)
    out: dict[str, float] = {}
    for row in result.table.to_dict(orient="records"):
        for name in TOPK_LOGGED:
            out[f"{row['method']}/{name}@{k:g}"] = float(row[name])
        for name in FREE_LOGGED:
            out[f"{row['method']}/{name}"] = float(row[name])
    return out


# --------------------------------------------------------------------------- the callback


class AuditCallback(TrainerCallback):
    """Audit the model being trained on an injected probe at the start, every ``every`` steps and at the end.

    Logged keys (prefix ``audit/``): ``<method>/tok_prec@k``, ``tok_rec@k``, ``seq_hit@k``,
    ``auroc``, ``noise_mass`` for each method (default: every registered method whose statistics
    exist), and ``noise_nll``, ``clean_nll`` (mean −log p of the probe's noise / clean tokens) with
    ``noise_nll_change``, ``clean_nll_change`` since the first audit: a falling noise NLL is noise
    the model is learning. Every audit is also kept in ``history``.

    To reach ``report_to`` (TensorBoard, W&B, ...) the values go through ``trainer.log``, so call
    ``callback.attach(trainer)`` (it adds the callback). Passed only as ``callbacks=[...]``, the
    values land in ``trainer.state.log_history`` and ``history`` but not in the integrations.
    ``save_dir`` keeps each audit's probe table as ``step-NNNNNN.parquet`` for ``reweight-audit compare``.
    """

    def __init__(self, probe: str | Path, methods: Sequence[str] | None = None, every: int = 50, *,
                 k: float = 10.0, params: Sequence[str] = (), tokenizer: Any = None, template: str = "auto",
                 max_length: int | None = None, max_records: int | None = None, batch_seqs: int = 256,
                 seed: int = 0, save_dir: str | Path | None = None) -> None:
        if int(every) < 1:  # as train's --every: a positive number of steps
            raise AuditError(f"AuditCallback: every={every}; give a number of steps >= 1")
        self.probe_path = Path(probe)
        if not self.probe_path.exists():
            raise AuditError(f"{self.probe_path}: no such probe file; write one with 'reweight-audit inject'")
        self.methods = list(methods) if methods is not None else None
        if self.methods is not None:
            for name in self.methods:
                get_method(name)  # an unknown name fails now, not after the first training step
        self.every, self.k, self.params = int(every), float(k), list(params)
        self.tokenizer, self.template, self.max_length, self.max_records = tokenizer, template, max_length, max_records
        self.batch_seqs, self.seed = int(batch_seqs), int(seed)
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.history: list[dict[str, float]] = []
        self.probe: Probe | None = None
        self._trainer: Any = None
        self._start: tuple[float, float] | None = None
        self._warned = False
        self.seconds = 0.0  # wall time spent auditing, so a caller can take it out of the step time

    def attach(self, trainer: Any) -> "AuditCallback":
        """Add this callback to ``trainer`` and log through ``trainer.log`` (so ``report_to`` sees it)."""
        self._trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        tokenizer = self.tokenizer or getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is None:
            raise AuditError("AuditCallback: no tokenizer; pass tokenizer= or give the Trainer a processing_class")
        self.probe = load_probe(self.probe_path, tokenizer, template=self.template, max_length=self.max_length,
                                max_records=self.max_records)
        self.audit(model, state, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.audit(model, state, control)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.history or self.history[-1]["step"] != state.global_step:
            self.audit(model, state, control)

    def audit(self, model: Any, state: Any, control: Any) -> dict[str, float]:
        """Score the probe now, log the metrics and return them (keys without the ``audit/`` prefix)."""
        if self.probe is None:
            raise AuditError("AuditCallback.audit before on_train_begin: the probe is not loaded yet")
        started = time.perf_counter()
        table = score_probe(model, self.probe)
        save_as = self.save_dir / f"step-{state.global_step:06d}.parquet" if self.save_dir else None
        metrics = probe_metrics(table, methods=self.methods, k=self.k, params=self.params,
                                batch_seqs=self.batch_seqs, seed=self.seed, save_as=save_as)
        noise_nll, clean_nll = absorption(table)
        if self._start is None:
            self._start = (noise_nll, clean_nll)
        metrics.update(noise_nll=noise_nll, clean_nll=clean_nll, noise_nll_change=noise_nll - self._start[0],
                       clean_nll_change=clean_nll - self._start[1])
        self.history.append({"step": state.global_step, **metrics})
        self.seconds += time.perf_counter() - started
        self._emit({AUDIT_PREFIX + key: value for key, value in metrics.items()}, state, control)
        return metrics

    def _emit(self, logs: dict[str, float], state: Any, control: Any) -> None:
        if self._trainer is not None:
            # Trainer.log resets control.should_log; keep the flag so the step's own loss log still happens
            keep = control.should_log
            self._trainer.log(dict(logs))
            control.should_log = keep
            return
        state.log_history.append({**logs, "step": state.global_step})
        if not self._warned:
            self._warned = True
            warnings.warn("AuditCallback is not attached: audit values go to trainer.state.log_history only; "
                          "call AuditCallback(...).attach(trainer) to send them to report_to", stacklevel=2)

"""The fused, chunked reweighted loss: from the last hidden states and the output head, never [N, V] logits.

``FusedReweightedLoss(method, **params)(hidden, labels, head)`` computes, for the supervised positions
of a batch (labels shifted by one, ``-100`` ignored),

    L = Σ_t w_t · (−log p_t) / D,   D = num_items_in_batch if given, else #supervised tokens,

with ``w`` the *registered* method's weights (detached), in two passes over row chunks of the
supervised hidden states:

1. **statistics** (no grad): each chunk's logits (score's head: bias, scale, soft-cap), reduced at
   once to the columns the method needs — ``logp``, ``entropy``, ``sum_p2`` by a light torch
   reduction, ``rank``, ``expected_rank``, ``topk_entropy`` by score's ``token_statistics`` (the
   numba kernel on CPU, the sync-free torch path elsewhere). The whole micro-batch's columns then
   go to the method at once, so batch-dependent methods (TALR, MiLe, deft-cayley) see the batch.
2. **loss** (``ReweightedHead``, a ``torch.autograd.Function``): the forward is Σ c_t·nll_t with
   c = w / D and the nll of pass 1 (no second projection); the backward recomputes each chunk's
   logits and turns them into c_t·(softmax(z_t) − onehot(y_t))·∂z/∂u in place, then
   ``grad_hidden[chunk] = g @ W`` and ``grad_W += gᵀ @ h`` (docs/training.md has the derivation).

Methods whose statistics TRL's fused head already gives (log p, entropy, Σp²) may instead run on
TRL's ``ChunkedLogProbFunction`` (``backend="trl"``; Triton tiles on CUDA): its detached entropy
and ``log Σp²`` feed the weights and its differentiable log p the loss. ``backend="auto"`` takes
TRL there when it is installed and the device is CUDA, ours otherwise.

Weights: methods with a torch port (``DEVICE_WEIGHTS``) are evaluated on the device with no host
synchronisation; every other method goes through the numpy registry (``compute_weights``) on the
host, once per micro-batch. A test checks the ports against the numpy definitions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from reweight_audit.core.errors import AuditError
from reweight_audit.methods import Method, compute_weights, get_method
from reweight_audit.scoring.batching import IGNORE_INDEX
from reweight_audit.scoring.head import Head, find_head, to_host
from reweight_audit.scoring.stats import TOPK, token_statistics

__all__ = ["BACKENDS", "DEVICE_WEIGHTS", "FusedReweightedLoss", "ReweightedHead", "chunk_rows_for", "device_weights",
           "head_statistics", "host_weights", "linear_head", "position_columns", "reference_logp"]

#: statistics TRL's fused head gives (log p with grad, detached entropy and log Σp²)
TRL_STATISTICS = frozenset({"logp", "entropy", "sum_p2"})
#: statistics only score's kernel gives (exact rank, expected rank, top-k entropy)
KERNEL_STATISTICS = frozenset({"rank", "expected_rank", "topk_entropy"})
#: columns that need no projection: the token, its position, the reference model's log p
FREE_COLUMNS = frozenset({"token_id", "pos", "seq_len", "ref_logp"})
BACKENDS = ("auto", "ours", "trl")
_CPU_CHUNK_ELEMENTS = 1 << 25  # [rows, vocab] float32 buffers of 128 MiB: rows fixed, so memory flat in T
_DEVICE_CHUNK_ELEMENTS = 1 << 27  # 512 MiB on an accelerator: larger GEMMs
TRL_VOCAB_TILE = 32768  # vocabulary columns per tile of TRL's function, as its own add_fused_lm_head uses
_T_MIN = -87.0  # exp(t) below is subnormal or 0 in float32 (score's stats clamp the same way)


def linear_head(model: Any) -> Head:
    """score's ``find_head``: the head matrix, bias, scale and soft-cap; an error for heads we cannot fuse."""
    head = find_head(model)
    if head.mode != "linear":
        raise AuditError(f"{type(model).__name__}: the output head is not a plain linear layer, so the fused loss "
                         "cannot reproduce it; train with ReweightedLoss (full logits) instead")
    return head


def chunk_rows_for(vocab: int, device: torch.device, chunk_rows: int | None = None) -> int:
    """Rows per head chunk: a fixed budget of logits per chunk (not a fraction of the batch)."""
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    budget = _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    return max(8, budget // max(vocab, 1))


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the projection runs in: autocast's when it is on (as the model's own head), else the input's."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _pre_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, head: Head) -> Tensor:
    """u = (h Wᵀ + b)·scale / divide in float32: the logits before the soft-cap."""
    u = (hidden @ weight.T).float()  # a fresh buffer: everything after works in place
    if bias is not None:
        u.add_(bias.float())
    if head.scale is not None:
        u.mul_(head.scale)
    if head.divide is not None:
        u.div_(head.divide)
    return u


def _cap(u: Tensor, head: Head) -> Tensor:
    """z = c·tanh(u / c) (Gemma's soft-cap), or u; in place."""
    return u if head.softcap is None else u.div_(head.softcap).tanh_().mul_(head.softcap)


# --------------------------------------------------------------------------- pass 1: statistics


def _sum64(e: Tensor, block: int = 8192) -> Tensor:
    """Row sums in float64 (a peaked row's S = 1 + tiny needs them); on CPU by column blocks, as a float64
    reduction there materialises a float64 copy of the whole chunk."""
    if e.device.type != "cpu":
        return e.sum(-1, dtype=torch.float64)
    s = torch.zeros(e.shape[0], dtype=torch.float64, device=e.device)
    for start in range(0, e.shape[1], block):
        s += e[:, start:start + block].sum(-1, dtype=torch.float64)
    return s


def _light_statistics(z: Tensor, targets: Tensor, needs: frozenset) -> dict[str, Tensor]:
    """log p (and entropy, Σp² when needed) of float32 logits [r, V], consumed in place; S = Σ exp(z − max) in
    float64. As score's torch path, t = z − max is clamped at −87 (exp below is 0 in float32), so no −inf·0."""
    row_max = z.amax(-1, keepdim=True)
    finite = torch.isfinite(row_max).squeeze(1)
    t = z.sub_(row_max)
    t_target = t.gather(1, targets[:, None]).squeeze(1)
    if "entropy" in needs:  # the entropy needs t beside e (clamped: no −inf·0); otherwise e replaces t
        e = torch.exp(t.clamp_(min=_T_MIN))
    else:
        e = t.exp_()
    s = _sum64(e)
    log_s = torch.log(s)
    out = {"logp": (t_target - log_s).float(), "finite": finite, "lse": row_max.squeeze(1).double() + log_s}
    if "is_top1" in needs:  # the target is a largest logit (TRL's metric; the rank is not needed for it)
        out["is_top1"] = t_target >= 0
    if "entropy" in needs:
        out["entropy"] = (log_s - torch.linalg.vecdot(e, t) / s).float()
    if "sum_p2" in needs:
        out["sum_p2"] = (torch.linalg.vecdot(e, e) / (s * s)).float()
    return out


def _kernel_statistics(z: Tensor, targets: Tensor, needs: frozenset) -> dict[str, Tensor]:
    """score's ``token_statistics`` of one chunk, the needed columns plus logp and finite."""
    stats = token_statistics(z, targets)
    out = {name: stats[name] for name in {"logp", "finite", *(needs & (TRL_STATISTICS | KERNEL_STATISTICS))}}
    out["lse"] = z.gather(1, targets[:, None]).squeeze(1).double() - stats["logp"].double()  # log Σ exp z
    if "is_top1" in needs:
        out["is_top1"] = stats["rank"] == 1
    return out


@torch.no_grad()
def head_statistics(hidden: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None, head: Head,
                    needs: frozenset | set, chunk_rows: int) -> dict[str, Tensor]:
    """The columns ``needs`` asks for (and ``logp``, ``finite``, ``lse`` = log Σ_v exp z_v) of the N supervised rows,
    chunk by chunk.

    Only a ``[chunk_rows, V]`` block of logits exists at a time; the reductions are score's.
    """
    needs = frozenset(needs)
    reduce = _kernel_statistics if needs & KERNEL_STATISTICS else _light_statistics
    dtype = _compute_dtype(hidden)
    w = weight.to(dtype)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, hidden.shape[0], chunk_rows):
        h = hidden[start:start + chunk_rows].detach().to(dtype)
        z = _cap(_pre_logits(h, w, bias, head), head).contiguous()
        for name, value in reduce(z, targets[start:start + chunk_rows], needs).items():
            parts.setdefault(name, []).append(value)
        del z
    if not parts:
        empty = torch.empty(0, device=hidden.device)
        return {"logp": empty, "finite": empty.bool()}
    return {name: torch.cat(values) for name, values in parts.items()}


@torch.no_grad()
def reference_logp(hidden: Tensor, targets: Tensor, head: Head, chunk_rows: int) -> Tensor:
    """The reference model's log p of each supervised row from its own hidden states and head (Rho-1)."""
    return head_statistics(hidden, targets, head.weight, head.bias, head, frozenset(), chunk_rows)["logp"]


# --------------------------------------------------------------------------- pass 2: the loss and its gradient


class ReweightedHead(torch.autograd.Function):
    """Σ_t c_t·nll_t with the gradient of Σ_t c_t·(−log softmax(z_t)[y_t]) for the hidden states, W and b.

    ``coef`` (c = w / D) and ``nll`` are detached [N] tensors from the statistics pass. The backward
    recomputes one chunk of logits at a time; neither [N, V] logits nor their gradient ever exist.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, coef: Tensor,
                nll: Tensor, lse: Tensor, head: Head, chunk_rows: int) -> Tensor:
        ctx.save_for_backward(hidden, weight, bias, targets, coef, lse)
        ctx.head, ctx.chunk_rows, ctx.dtype = head, chunk_rows, _compute_dtype(hidden)
        # 0·nll stays 0 for a zero-weight row; a NaN nll (non-finite logits) keeps weight 1, so NaN reaches the loss
        return (coef.double() * nll.double()).sum().float()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        hidden, weight, bias, targets, coef, lse = ctx.saved_tensors
        head, rows, dtype = ctx.head, ctx.chunk_rows, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        scale = coef.float() * grad_out.float()
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].to(dtype)
            part = slice(start, start + rows)
            g = _logit_gradient(h, w, bias, head, targets[part], scale[part], lse[part])
            if grad_h is not None:
                grad_h[start:start + rows] = (g.to(dtype) @ w).float()
            if grad_w is not None:
                grad_w.addmm_(g.T, h.float())
            if grad_b is not None:
                grad_b += g.sum(0)
            del g
        return (None if grad_h is None else grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


def _logit_gradient(h: Tensor, w: Tensor, bias: Tensor | None, head: Head, targets: Tensor, scale: Tensor,
                    lse: Tensor) -> Tensor:
    """∂L/∂u for one chunk: c_t·(softmax(z_t) − onehot(y_t)) times the soft-cap and scale slopes, float32 [r, V].

    softmax(z_t) = exp(z_t − lse_t) with the statistics pass's log Σ exp z: three passes over the chunk."""
    z = _pre_logits(h, w, bias, head)
    slope = None
    if head.softcap is not None:  # z = c·tanh(u / c), dz/du = 1 − tanh²; in place, one buffer less
        tanh = z.div_(head.softcap).tanh_()
        slope = 1.0 - tanh.square()
        z = tanh.mul_(head.softcap)
    # c·softmax in place: the chunk's only [r, V] buffer (plus the soft-cap slope)
    g = z.sub_(lse.float()[:, None]).exp_().mul_(scale[:, None])
    g.scatter_add_(1, targets[:, None], -scale[:, None])
    if slope is not None:
        g.mul_(slope)
    factor = (head.scale or 1.0) / (head.divide or 1.0)
    if factor != 1.0:
        g.mul_(factor)
    return g


# --------------------------------------------------------------------------- weights


def host_weights(method: Method, columns: Mapping[str, np.ndarray], params: Mapping[str, Any],
                 seed: int) -> np.ndarray:
    """The registry's float64 weights; rows whose statistics are not finite keep weight 1 (their NaN reaches the loss)."""
    columns = dict(columns)
    n = len(next(iter(columns.values())))
    ok = np.ones(n, dtype=bool)
    for name in ("logp", "entropy", "expected_rank", "ref_logp"):
        if name in columns:
            ok &= np.isfinite(columns[name])
    if "finite" in columns:
        ok &= columns.pop("finite")
    weights = np.ones(n, dtype=np.float64)
    if ok.any():
        kept = {name: value[ok] for name, value in columns.items()}
        weights[ok] = compute_weights(method, kept, params=params, seed=seed)
    return weights


def _logp(c: Mapping[str, Tensor]) -> Tensor:
    return c["logp"].double().clamp(max=0.0)  # as the registry's logp_col: p <= 1


def _power(logp: Tensor, alpha: Tensor | float) -> Tensor:
    """p^α from log p; α = 0 gives 1 (the registry's deformed_weight)."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=logp.device)
    return torch.where(alpha == 0.0, torch.ones_like(logp), torch.exp(alpha * logp))


def _relative_scale(c: Mapping[str, Tensor]) -> Tensor:
    """RankTuner's exact S = 2^(f(E[R]) − f(R)), f(x) = ln 2 / log1p(x), ranks clamped to >= 1."""
    f = lambda x: math.log(2.0) / torch.log1p(x.double().clamp(min=1.0))  # noqa: E731
    return torch.exp2(f(c["expected_rank"]) - f(c["rank"]))


def _practical_scale(c: Mapping[str, Tensor], low_entropy: str) -> Tensor:
    """RankTuner's practical S = (p·s(H))^(−K(ξ)) in log space (the registry's practical_scale)."""
    ln2 = math.log(2.0)
    logp, h = _logp(c), c["entropy"].double().clamp(min=0.0)
    log_s = torch.logaddexp(torch.zeros_like(h), h - 2.0 * ln2)
    if low_entropy == "trivial":
        log_s = torch.where(h < 2.0 * ln2, torch.zeros_like(log_s), log_s)
    log_xi = torch.maximum(torch.log(c["rank"].double().clamp(min=1.0)), log_s)
    k = (ln2 / torch.logaddexp(torch.zeros_like(log_xi), log_xi)) ** 2
    return torch.exp(-k * (logp + log_s))


def _on_base(scale: Tensor, c: Mapping[str, Tensor], base: str) -> Tensor:
    return scale * _logp(c).exp() if base == "p" else scale


def _focal(c: Mapping[str, Tensor], gamma: float, detach: bool) -> Tensor:
    """As ``methods.shapes.focal_weight``: the factor (1 − p)^γ when detached, else −dℓ/dlog p of the published
    loss, (1 − p)^γ·(1 + γ·p·(−log p)/(1 − p)), with (−log p)/(1 − p) → 1 at p = 1 and p·(…) → 0 at p = 0."""
    x = _logp(c)
    q = -torch.expm1(x)
    f = torch.pow(q, float(gamma))
    if detach:
        return f
    ratio = torch.where(q > 0.0, -x / torch.where(q > 0.0, q, torch.ones_like(q)), torch.ones_like(q))
    p = x.exp()
    p_ratio = torch.where(p > 0.0, p * ratio, torch.zeros_like(p))
    return f + float(gamma) * f * p_ratio


def _deft(c: Mapping[str, Tensor], eps: float) -> Tensor:
    alpha = c["sum_p2"].double().clamp(0.0, 1.0)
    w = _power(_logp(c), alpha)
    return w if eps == 0.0 else w * (alpha / (alpha + eps))


def _profit(c: Mapping[str, Tensor], tau: float = 0.1) -> Tensor:
    logp = _logp(c)
    return torch.ones_like(logp) if tau == 0.0 else (logp >= math.log(tau)).double()


#: torch ports of registered methods: name -> (columns, **params) -> float64 weights on the device (None: use
#: the numpy registry for these parameters). Parameters are checked by the registry once, at construction;
#: test_fused checks every port against its numpy definition.
DEVICE_WEIGHTS: dict[str, Callable[..., Tensor | None]] = {
    "sft": lambda c: torch.ones_like(c["logp"], dtype=torch.float64),
    "dft": lambda c: _logp(c).exp(),
    "inv-prob": lambda c: -torch.expm1(_logp(c)),
    "nll": lambda c: -_logp(c) + 0.0,
    "focal": _focal,
    "entropy": lambda c: c["entropy"].double().clamp(min=0.0),
    "eaft": lambda c, alpha=1.0: torch.pow((c["topk_entropy"].double() / math.log(TOPK)).clamp(0.0, 1.0), float(alpha)),
    "ranktuner": lambda c, base="1": _on_base(_relative_scale(c), c, base),
    "ranktuner-dft": lambda c: _on_base(_relative_scale(c), c, "p"),
    "ranktuner-approx": lambda c, low_entropy="smooth", base="1": _on_base(_practical_scale(c, low_entropy), c, base),
    "ranktuner-approx-dft": lambda c, low_entropy="smooth": _on_base(_practical_scale(c, low_entropy), c, "p"),
    "profit": _profit,
    "deformed-log": lambda c, alpha=10.0: _power(_logp(c), float(alpha)),
    "deft": _deft,
}


def device_weights(method: Method, columns: Mapping[str, Tensor], params: Mapping[str, Any]) -> Tensor | None:
    """The method's weights on the columns' device, or None when it has no port for these parameters.

    Ports are looked up by name and trusted only for the built-in function (a plugin reusing a name is not).
    """
    port = DEVICE_WEIGHTS.get(method.name)
    if port is None or method.fn.__module__.split(".")[:2] != ["reweight_audit", "methods"]:
        return None
    # every parameter given, defaults from the registered signature: a port never keeps a default of its own
    weights = port(columns, **{**method.params, **params})
    if weights is None:
        return None
    # as host_weights: a row with non-finite statistics keeps weight 1
    return torch.where(columns["finite"] & torch.isfinite(weights), weights, torch.ones_like(weights))


# --------------------------------------------------------------------------- the loss


def position_columns(supervised: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """token_id, pos (index among its row's supervised tokens) and seq_len, as score's table numbers them."""
    pos = (supervised.cumsum(1) - 1)[supervised]
    seq_len = supervised.sum(1, keepdim=True).expand_as(supervised)[supervised]
    return {"token_id": targets, "pos": pos, "seq_len": seq_len}


@dataclass
class FusedBatch:
    """The supervised rows of one micro-batch: their hidden states [N, H], targets [N] and mask [B, T-1]."""

    hidden: Tensor
    targets: Tensor
    supervised: Tensor

    @classmethod
    def of(cls, hidden: Tensor, labels: Tensor) -> "FusedBatch":
        shifted = labels[:, 1:].to(hidden.device)  # token t+1 is predicted at position t
        supervised = shifted != IGNORE_INDEX
        return cls(hidden[:, :-1][supervised], shifted[supervised], supervised)


def checked_method(owner: str, method: str | Method, params: Mapping[str, Any]) -> Method:
    """The registered method (or ``method`` itself), with ``params`` refused in one line unless they are its
    parameters: the loss classes' shared check before they compute anything."""
    found = method if isinstance(method, Method) else get_method(str(method))
    unknown = sorted(set(params) - set(found.params))
    if unknown:
        known = ", ".join(found.params) or "none"
        raise AuditError(f"{owner}({found.name!r}): unknown parameter(s) {', '.join(unknown)} (parameters: {known})")
    return found


class FusedReweightedLoss:
    """Σ_t w_t·(−log p_t) / D from the last hidden states and the head, in chunks (module docstring).

    ``method`` is a registered name (or a ``Method``); ``params`` override its defaults, checked now.
    ``seed`` seeds methods that draw random numbers (call i uses ``seed + i``). ``backend``: ``ours``,
    ``trl`` (TRL's ``ChunkedLogProbFunction``, only for methods needing log p / entropy / Σp²) or
    ``auto``. ``last_weights`` keeps the last call's weights (a tensor on the device).
    """

    def __init__(self, method: str | Method = "sft", /, *, seed: int = 0, chunk_rows: int | None = None,
                 backend: str = "auto", **params: Any) -> None:
        self.method = checked_method("FusedReweightedLoss", method, params)
        if backend not in BACKENDS:
            raise AuditError(f"FusedReweightedLoss: backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.params, self.seed, self.chunk_rows, self.backend = dict(params), int(seed), chunk_rows, backend
        _check_values(self.method, self.params)
        self.needs = frozenset(self.method.needs)
        self.extra: frozenset = frozenset()  # statistics wanted beside the method's (TRL's metrics: entropy, is_top1)
        self.last_columns: dict[str, Tensor] = {}
        self.calls = 0
        self.last_weights: Tensor | None = None
        self.last_backend: str | None = None

    def backend_for(self, device: torch.device) -> str:
        """``ours`` or ``trl`` for this method on this device."""
        fits = not (self.needs - TRL_STATISTICS - FREE_COLUMNS)
        if self.backend == "trl" and not fits:
            raise AuditError(f"method {self.method.name!r} needs {', '.join(sorted(self.needs & KERNEL_STATISTICS))}, "
                             "which TRL's fused head does not give; use backend='ours' or 'auto'")
        if self.backend != "auto":
            return self.backend
        return "trl" if fits and device.type == "cuda" and _trl_function() is not None else "ours"

    def __call__(self, hidden: Tensor, labels: Tensor, head: Head, *, num_items_in_batch: Any = None,
                 ref_hidden: Tensor | None = None, ref_head: Head | None = None) -> Tensor:
        """The loss of one micro-batch: ``hidden`` [B, T, H] (the body's last hidden states), ``labels`` [B, T]."""
        if "ref_logp" in self.needs and (ref_hidden is None or ref_head is None):
            raise AuditError(f"method {self.method.name!r} needs the reference model's hidden states "
                             "(patch(model, ..., reference=ref_model))")
        batch = FusedBatch.of(hidden, labels)
        rows = chunk_rows_for(head.weight.shape[0], hidden.device, self.chunk_rows)
        backend = self.backend_for(hidden.device)
        self.last_backend = backend
        needs = self.needs | self.extra
        if backend == "trl":
            logp, columns = self._trl_columns(batch, head, needs)
        else:
            columns = head_statistics(batch.hidden, batch.targets, head.weight, head.bias, head, needs, rows)
        lse = columns.pop("lse", None)
        columns.update(position_columns(batch.supervised, batch.targets))
        if ref_hidden is not None and ref_head is not None:
            ref = ref_hidden[:, :-1][batch.supervised.to(ref_hidden.device)]
            columns["ref_logp"] = reference_logp(ref, batch.targets.to(ref.device), ref_head, rows).to(hidden.device)
        self.last_columns = columns
        coef = self.weights(columns) / _denominator(num_items_in_batch, batch.targets.numel(), hidden.device)
        if backend == "trl":
            return -(coef * logp).sum()
        return ReweightedHead.apply(batch.hidden, head.weight, head.bias, batch.targets, coef, -columns["logp"],
                                    lse, head, rows)

    def weights(self, columns: Mapping[str, Tensor]) -> Tensor:
        """float32 weights on the device, one per supervised row: the torch port, else the numpy registry."""
        weights = device_weights(self.method, columns, self.params) if columns["logp"].numel() else None
        if weights is None:
            host = to_host({name: value.contiguous() for name, value in columns.items()}) if columns["logp"].numel() \
                else {}
            values = host_weights(self.method, host, self.params, self.seed + self.calls) if host else np.zeros(0)
            weights = torch.from_numpy(values).to(columns["logp"].device)
        self.calls += 1
        self.last_weights = weights.float()
        return self.last_weights

    def _trl_columns(self, batch: FusedBatch, head: Head, needs: frozenset) -> tuple[Tensor, dict[str, Tensor]]:
        """TRL's fused head: log p with its gradient, and the detached entropy and Σp² the method needs."""
        function = _trl_function()
        if function is None:
            raise AuditError("backend='trl' needs TRL: pip install 'reweight-audit[train]'")
        outputs = tuple(name for name, want in (("entropy", "entropy"), ("log_sum_sq_probs", "sum_p2"),
                                                ("is_top1", "is_top1")) if want in needs)
        scale = (head.scale or 1.0) / (head.divide or 1.0)
        logp, entropy, log_sum_sq, _, is_top1 = function.apply(batch.hidden, head.weight, head.bias, batch.targets, 1.0,
                                                         TRL_VOCAB_TILE, head.softcap, scale, outputs)
        columns = {"logp": logp.detach(), "finite": torch.isfinite(logp.detach())}
        if entropy is not None:
            columns["entropy"] = entropy.detach()
        if log_sum_sq is not None:
            columns["sum_p2"] = log_sum_sq.exp()
        if is_top1 is not None:
            columns["is_top1"] = is_top1
        return logp, columns


#: one plausible row of every statistic: the registry checks a method's parameter values on it
_PROBE_ROW = {"logp": -1.0, "entropy": 1.0, "rank": 2, "expected_rank": 2.0, "topk_entropy": 1.0, "sum_p2": 0.5,
              "token_id": 0, "pos": 0, "seq_len": 1, "ref_logp": -1.0}


def _check_values(method: Method, params: Mapping[str, Any]) -> None:
    """Bad parameter values fail now, with the registry's one-line error, not at the first training step."""
    compute_weights(method, {name: np.array([value]) for name, value in _PROBE_ROW.items()}, params=params)


def _denominator(num_items_in_batch: Any, count: int, device: torch.device) -> Tensor | float:
    """D: num_items_in_batch (a tensor stays on the device: no host sync) or the supervised count (at least 1)."""
    if num_items_in_batch is None:
        return float(max(count, 1))
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device)
    return float(num_items_in_batch)


def _trl_function() -> Any:
    """TRL's ``ChunkedLogProbFunction`` (trl >= 1.16), or None without TRL."""
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError:
        return None
    return ChunkedLogProbFunction

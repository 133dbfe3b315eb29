"""The scoring engine: one chunked forward pass to per-token statistics.

The model body runs once per batch; only the hidden states of supervised
positions are gathered, and the output head is applied to them chunk by chunk
(``chunk_rows`` rows at a time), each chunk reduced to statistics at once. The
``[batch, seq, vocab]`` logits tensor never exists.

Output goes to ``<out>.shards/`` one parquet file per batch (atomic renames),
and is merged into ``<out>`` when every batch is done, so ``--resume`` picks up
an interrupted run where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from reweight_audit import __version__
from reweight_audit.distributed import agree
from reweight_audit.errors import AuditError

NOISE_RULE = "a token is noise when any non-whitespace character it covers lies inside an injected span"
STATS_COLUMNS = ("logp", "entropy", "rank", "expected_rank", "topk_entropy", "sum_p2")
SHARD_FORMAT = 1


# --------------------------------------------------------------------------- input


@dataclass
class NoisyRecord:
    id: str
    prompt: str
    response: str
    spans: list[dict]


def read_noisy(path: Path, report: dict | None = None) -> Iterator[NoisyRecord]:
    """Stream the records of an ``inject`` output (or any JSONL with id/prompt/response).

    Records without ``spans`` are scored as all-clean; ``report["no_spans"]`` counts them.
    """
    report = report if report is not None else {}
    report.setdefault("no_spans", 0)
    if not path.exists():
        raise AuditError(f"{path}: no such file; run 'reweight-audit inject' first or check the path")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise AuditError(f"{where}: not UTF-8; re-encode the file as UTF-8") from None
            except json.JSONDecodeError as exc:
                raise AuditError(f"{where}: malformed JSON ({exc.msg}); fix the line or re-run inject") from None
            if not isinstance(row, dict) or "response" not in row:
                fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise AuditError(f"{where}: no 'response' field (fields: {fields}); score the output of 'reweight-audit inject'")
            response = row["response"]
            if not isinstance(response, str):
                raise AuditError(f"{where}: field 'response' must be text")
            spans = row.get("spans")
            if spans is None:
                report["no_spans"] += 1
                spans = []
            if not isinstance(spans, list):
                raise AuditError(f"{where}: field 'spans' must be a list of {{start, end, kind, text}}")
            for span in spans:
                try:
                    start, end = int(span["start"]), int(span["end"])
                except (KeyError, TypeError, ValueError):
                    raise AuditError(f"{where}: a span lacks integer 'start'/'end'; re-run inject") from None
                if not 0 <= start < end <= len(response):
                    raise AuditError(
                        f"{where}: span [{start}, {end}) lies outside the response (length {len(response)}); re-run inject on the source corpus"
                    )
                if "text" in span and response[start:end] != span["text"]:
                    raise AuditError(f"{where}: span [{start}, {end}) text does not match the response; the file was edited after inject")
            rid = row.get("id")
            rid = str(rid) if rid not in (None, "") else hashlib.blake2b(raw, digest_size=8).hexdigest()
            yield NoisyRecord(id=rid, prompt=str(row.get("prompt") or ""), response=response, spans=spans)


# ----------------------------------------------------------------- sequence building


@dataclass
class Encoded:
    """A tokenised sequence and what we know about its supervised tokens."""

    seq_id: str
    order: int  # position in the input file
    input_ids: list[int]
    sup_index: np.ndarray  # positions in input_ids of supervised tokens (all >= 1)
    token_text: list[str]
    is_noise: np.ndarray
    noise_kind: list[str]


def render(tokenizer: Any, prompt: str, response: str, template: str) -> tuple[str, int, bool]:
    """Full text and the char offset where the response starts; bool: specials already in text."""
    if template == "chat":
        messages = [{"role": "user", "content": prompt}] if prompt else []
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) if messages else ""
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head) and full[len(head):].startswith(response):
            return full, len(head), True
        start = full.rfind(response)
        if start < 0:
            raise AuditError(
                "the chat template rewrites the response text (e.g. trims it), so response tokens cannot be located; pass --template plain"
            )
        return full, start, True
    # plain: prompt, a blank line, response; the tokenizer adds its own BOS if it has one
    if prompt:
        head = prompt + "\n\n"
        return head + response, len(head), False
    return response, 0, False


def choose_template(tokenizer: Any, template: str) -> str:
    if template not in ("auto", "chat", "plain"):
        raise AuditError(f"--template {template}: use auto, chat or plain")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise AuditError("--template chat: the tokenizer has no chat template; use --template plain or auto")
    if template == "auto":
        return "chat" if has_chat else "plain"
    return template


def encode(
    record: NoisyRecord,
    order: int,
    tokenizer: Any,
    template: str,
    max_length: int | None,
    counts: dict,
) -> Encoded | None:
    """Tokenise one record; map spans to tokens; None when nothing supervised remains."""
    full, resp_start, has_specials = render(tokenizer, record.prompt, record.response, template)
    try:
        enc = tokenizer(full, add_special_tokens=not has_specials, return_offsets_mapping=True)
    except NotImplementedError:
        raise AuditError("the tokenizer cannot return offset mappings; use a fast (tokenizers-backed) tokenizer") from None
    ids: list[int] = enc["input_ids"]
    offsets = enc["offset_mapping"]
    resp_end = resp_start + len(record.response)

    # per-char noise labels of the response: index of the span covering it, -1 if none
    n_chars = len(record.response)
    span_of_char = np.full(n_chars, -1, dtype=np.int32)
    kinds = []
    for i, span in enumerate(record.spans):
        span_of_char[int(span["start"]):int(span["end"])] = i
        kinds.append(str(span.get("kind", "noise")))
    space = np.fromiter((c.isspace() for c in record.response), dtype=bool, count=n_chars) if record.spans else None

    sup, text, noise, kind = [], [], [], []
    for j, (s, e) in enumerate(offsets):
        if e <= resp_start or s >= resp_end or e <= s:
            continue
        if j == 0:
            counts["unscorable_first_tokens"] = counts.get("unscorable_first_tokens", 0) + 1
            continue
        lo, hi = max(s, resp_start) - resp_start, min(e, resp_end) - resp_start
        sup.append(j)
        text.append(record.response[lo:hi])
        label = -1
        if record.spans:
            covered = span_of_char[lo:hi][~space[lo:hi]]
            hits = covered[covered >= 0]
            if hits.size:
                label = int(hits[0])
        noise.append(label >= 0)
        kind.append(kinds[label] if label >= 0 else "")
    if not sup:
        counts["empty_sequences"] = counts.get("empty_sequences", 0) + 1
        return None
    sup_index = np.asarray(sup, dtype=np.int64)
    is_noise = np.asarray(noise, dtype=bool)
    if max_length is not None and len(ids) > max_length:
        keep = sup_index < max_length
        counts["truncated_sequences"] = counts.get("truncated_sequences", 0) + 1
        counts["noise_tokens_lost_to_truncation"] = counts.get("noise_tokens_lost_to_truncation", 0) + int(is_noise[~keep].sum())
        counts["tokens_lost_to_truncation"] = counts.get("tokens_lost_to_truncation", 0) + int((~keep).sum())
        ids = ids[:max_length]
        sup_index, is_noise = sup_index[keep], is_noise[keep]
        text = [t for t, k in zip(text, keep) if k]
        kind = [t for t, k in zip(kind, keep) if k]
        if sup_index.size == 0:
            counts["empty_after_truncation"] = counts.get("empty_after_truncation", 0) + 1
            return None
    return Encoded(record.id, order, list(ids), sup_index, text, is_noise, kind)


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


# --------------------------------------------------------------------------- head


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


def body_of(model: Any) -> Any:
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
    hidden = body_of(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
    ours = head.logits(hidden).float()
    tolerance = 1e-3 if reference.dtype == torch.float32 and hidden.dtype == torch.float32 else 5e-2
    scale = reference.abs().max().clamp_min(1.0)
    if not torch.allclose(ours, reference, atol=float(tolerance * scale), rtol=0):
        return Head(None, None, mode="model")
    return head


# ------------------------------------------------------------------------- engine


@dataclass
class ScoreConfig:
    model: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    batch_tokens: int = 2048
    chunk_rows: int | None = None
    max_length: int | None = None
    template: str = "auto"
    ref_model: str | None = None
    trust_remote_code: bool = False


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


def _pad_batch(sequences: Sequence[Encoded], pad_id: int, device: str) -> tuple[Any, Any]:
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
    import torch

    ids, mask = _pad_batch(sequences, pad_id, device)
    rows = torch.cat([torch.full((len(s.sup_index),), r, dtype=torch.long) for r, s in enumerate(sequences)]).to(device)
    cols = torch.cat([torch.from_numpy(s.sup_index) for s in sequences]).to(device)
    return BatchInputs(ids, mask, rows, cols, ids[rows, cols])


def logit_chunks(model: Any, head: Head, batch: BatchInputs, sequences: Sequence[Encoded], device: str,
                 chunk_rows: int) -> Iterator[tuple[Any, Any]]:
    """(logits, targets) for the supervised tokens, ``chunk_rows`` rows at a time; the body runs once."""
    if head.mode != "linear":
        yield from _model_logits(model, sequences, device, chunk_rows)
        return
    hidden = body_of(model)(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).last_hidden_state
    picked = hidden[batch.rows, batch.cols - 1]
    del hidden
    for i in range(0, len(batch.targets), chunk_rows):
        yield head.logits(picked[i:i + chunk_rows]), batch.targets[i:i + chunk_rows]


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

    from reweight_audit.stats import token_statistics

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


# ------------------------------------------------------------------------ output


def shard_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def batch_table(sequences: Sequence[Encoded], stats: dict[str, np.ndarray]) -> Any:
    """One parquet table for a batch; rows with non-finite logits are dropped (counted by the caller)."""
    import pyarrow as pa

    seq_id = np.concatenate([np.full(len(s.sup_index), s.seq_id, dtype=object) for s in sequences])
    order = np.concatenate([np.full(len(s.sup_index), s.order, dtype=np.int64) for s in sequences])
    pos = np.concatenate([np.arange(len(s.sup_index), dtype=np.int32) for s in sequences])
    token_id = np.concatenate([np.asarray(s.input_ids, dtype=np.int32)[s.sup_index] for s in sequences])
    token = [t for s in sequences for t in s.token_text]
    is_noise = np.concatenate([s.is_noise for s in sequences])
    noise_kind = [k for s in sequences for k in s.noise_kind]
    # a row with no distribution at all (every logit -inf) is "finite" but has NaN statistics: drop it too
    finite = stats["finite"] & np.isfinite(stats["logp"]) & np.isfinite(stats["entropy"]) & np.isfinite(stats["expected_rank"])
    columns = {
        "seq_id": pa.array(seq_id, pa.string()),
        "pos": pa.array(pos),
        "token_id": pa.array(token_id),
        "token": pa.array(token, pa.string()),
        "logp": pa.array(stats["logp"].astype(np.float32)),
        "entropy": pa.array(stats["entropy"].astype(np.float32)),
        "rank": pa.array(stats["rank"].astype(np.int64)),
        "expected_rank": pa.array(stats["expected_rank"].astype(np.float64)),
        "topk_entropy": pa.array(stats["topk_entropy"].astype(np.float32)),
        "sum_p2": pa.array(stats["sum_p2"].astype(np.float32)),
    }
    if "ref_logp" in stats:
        columns["ref_logp"] = pa.array(stats["ref_logp"].astype(np.float32))
        finite = finite & np.isfinite(stats["ref_logp"])
    columns["is_noise"] = pa.array(is_noise)
    columns["noise_kind"] = pa.array(noise_kind, pa.string())
    columns["seq_order"] = pa.array(order)
    table = pa.table(columns)
    if not finite.all():
        table = table.filter(pa.array(finite))
    return table


def write_table_atomic(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        # a failed write (disk full, interrupt) leaves neither a truncated shard nor its temporary
        if tmp.exists():
            tmp.unlink()


def merge_shards(shards: Sequence[Path], output: Path, row_group_size: int = 1 << 17) -> int:
    """Stream shard tables into one parquet file, sorted by input order then position within each shard.

    Memory holds one shard at a time; the file is renamed into place when complete.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tmp = output.with_name(output.name + f".tmp{os.getpid()}")
    writer = None
    rows = 0
    try:
        for shard in shards:
            table = pq.read_table(shard)
            table = table.take(pc.sort_indices(table, sort_keys=[("seq_order", "ascending"), ("pos", "ascending")]))
            table = table.drop_columns(["seq_order"])
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table, row_group_size=row_group_size)
            rows += table.num_rows
        if writer is None:
            raise AuditError(f"{output}: nothing to write: no sequence had a supervised token")
        writer.close()
        writer = None
        os.replace(tmp, output)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return rows


# --------------------------------------------------------------------------- run


ProgressFn = Callable[[int, int, int], None]  # (sequences done, tokens done, sequences total)
WINDOW_SEQS = 20_000  # sequences encoded, sorted and batched together; bounds memory on large corpora


@dataclass
class ScoreResult:
    output: Path
    manifest: dict


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def count_records(path: Path) -> int:
    """Non-empty lines, for the progress bar's total (a byte scan, no JSON parsing)."""
    n = 0
    with path.open("rb") as f:
        for line in f:
            n += bool(line.strip())
    return n


def assign_to_ranks(costs: Sequence[int], world_size: int) -> list[int]:
    """Longest-processing-time assignment of batches to ranks by padded token count.

    Deterministic; every rank computes the same answer. Balances work even when
    the long sequences all sit in the last batches of a window.
    """
    load = [0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def iter_windows(
    input_path: Path, tokenizer: Any, template: str, max_length: int | None, counts: dict, read_report: dict, window: int
) -> Iterator[list[Encoded]]:
    """Encoded sequences in windows of ``window`` records, streamed from the file."""
    current: list[Encoded] = []
    for order, record in enumerate(read_noisy(input_path, read_report)):
        counts["records"] = counts.get("records", 0) + 1
        encoded = encode(record, order, tokenizer, template, max_length, counts)
        if encoded is not None:
            current.append(encoded)
        if len(current) >= window:
            yield current
            current = []
    if current:
        yield current


def run_score(
    input_path: Path,
    output: Path,
    config: ScoreConfig,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    rank: int = 0,
    world_size: int = 1,
    window: int = WINDOW_SEQS,
) -> ScoreResult:
    """Score every supervised token of ``input_path`` and write ``output`` plus its manifest.

    With ``world_size`` > 1 (torchrun), every rank reads the corpus, scores its
    share of each window's batches into the shared shard folder, and rank 0
    merges once all ranks report success.
    """
    import torch

    from reweight_audit import corpus
    from reweight_audit.model import load_model, load_tokenizer, model_digest, resolve_device, resolve_dtype, resolve_model

    input_path, output = Path(input_path), Path(output)
    if input_path.exists() and input_path.resolve() == output.resolve():
        raise AuditError(f"{output}: the output would overwrite the input; choose another -o path")
    if config.batch_tokens < 1:
        raise AuditError("--batch-tokens must be a positive number of tokens")
    if config.max_length is not None and config.max_length < 2:
        raise AuditError("--max-length must be at least 2 tokens")
    started = time.time()
    read_report: dict = {}
    counts: dict[str, int] = {}
    failure: BaseException | None = None
    try:
        if not input_path.exists():
            raise AuditError(f"{input_path}: no such file; run 'reweight-audit inject' first or check the path")
        output.parent.mkdir(parents=True, exist_ok=True)
        device = resolve_device(config.device)
        if world_size > 1 and device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
        dtype = resolve_dtype(config.dtype, device)
        source = resolve_model(config.model)
        tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
        template = choose_template(tokenizer, config.template)
        windows = iter_windows(input_path, tokenizer, template, config.max_length, counts, read_report, window)
        first = next(windows, None)  # input errors surface before the model loads
        if first is None:
            if not counts.get("records"):
                raise AuditError(f"{input_path}: no records; run inject on a non-empty corpus")
            raise AuditError(f"{input_path}: no record has a supervised token left to score (see --max-length)")
        total_records = count_records(input_path)

        model = load_model(source, device=device, dtype=dtype, trust_remote_code=config.trust_remote_code)
        check_vocabulary(model, first)
        head = verify_head(model, find_head(model), first[0], device)
        vocab = int(head.weight.shape[0]) if head.mode == "linear" else int(model.config.get_text_config().vocab_size)
        chunk_rows = config.chunk_rows or auto_chunk_rows(vocab, device)
        ref = None
        ref_source = None
        if config.ref_model:
            ref_source = resolve_model(config.ref_model)
            ref_tok = load_tokenizer(ref_source, trust_remote_code=config.trust_remote_code)
            if ref_tok.get_vocab() != tokenizer.get_vocab():
                raise AuditError(f"--ref-model {config.ref_model}: its tokenizer differs from the scored model's; Rho-1 needs the same vocabulary")
            ref_model = load_model(ref_source, device=device, dtype=dtype, trust_remote_code=config.trust_remote_code)
            check_vocabulary(ref_model, first)
            ref = (ref_model, verify_head(ref_model, find_head(ref_model), first[0], device))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

        identity = {
            "format": SHARD_FORMAT,
            "input_digest": corpus.source_digest(str(input_path)),
            "model": source.describe(),
            "model_digest": model_digest(source),
            "ref_model": ref_source.describe() if ref_source else None,
            "template": template,
            "dtype": str(dtype).replace("torch.", ""),
            "batch_tokens": config.batch_tokens,
            "max_length": config.max_length,
            "window": window,
        }
        key = fingerprint(identity)
        shards = shard_dir(output)
        state_file = shards / "state.json"
        if shards.exists():
            previous = json.loads(state_file.read_text()) if state_file.exists() else None
            if not resume and previous is not None and any(shards.glob("batch-*.parquet")):
                raise AuditError(
                    f"{shards}: an earlier run left finished shards; pass --resume to continue it, or delete the folder to start over"
                )
            if resume and previous is not None and previous.get("key") != key:
                changed = [k for k in identity if previous.get("identity", {}).get(k) != identity[k]]
                raise AuditError(
                    f"{shards}: --resume refused: the earlier run had a different {', '.join(changed) or 'configuration'}; "
                    "rerun with the same options or delete the folder"
                )
        shards.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            write_json_atomic(state_file, {"key": key, "identity": identity})
    except Exception as exc:  # every rank must learn of any failure, or the others wait at the barrier
        failure = exc
    agree(failure, world_size)

    import itertools

    failure = None
    n_batches = resumed = scored_tokens = done_seqs = done_tokens = 0
    supervised = noise_tokens = n_sequences = 0
    forward_seconds = 0.0
    try:
        for sequences in itertools.chain([first], windows):
            n_sequences += len(sequences)
            supervised += sum(len(s.sup_index) for s in sequences)
            noise_tokens += sum(int(s.is_noise.sum()) for s in sequences)
            if sequences is not first:
                check_vocabulary(model, sequences)
            batches = plan_batches(sequences, config.batch_tokens)
            costs = [len(b) * max(len(sequences[j].input_ids) for j in b) for b in batches]
            owner = assign_to_ranks(costs, world_size)
            for local, members in enumerate(batches):
                index = n_batches + local
                batch = [sequences[j] for j in members]
                n_tok = sum(len(s.sup_index) for s in batch)
                if owner[local] != rank:
                    continue
                path = shards / f"batch-{index:06d}.parquet"
                if resume and path.exists():
                    resumed += 1
                else:
                    t0 = time.perf_counter()
                    stats = score_batch(model, head, batch, device=device, chunk_rows=chunk_rows, pad_id=pad_id, ref=ref)
                    forward_seconds += time.perf_counter() - t0
                    write_table_atomic(batch_table(batch, stats), path)
                    scored_tokens += n_tok
                done_seqs += len(batch)
                done_tokens += n_tok
                if progress:
                    progress(done_seqs * world_size, done_tokens * world_size, total_records)
            n_batches += len(batches)
    except Exception as exc:  # every rank must learn of any failure, or the others wait at the barrier
        failure = exc
    agree(failure, world_size)
    # rank 0 merges; the others wait for it, so no process leaves the group while another still needs it
    failure = None
    manifest: dict = {}
    if rank == 0:
        try:
            shard_paths = [shards / f"batch-{i:06d}.parquet" for i in range(n_batches)]
            missing = [p for p in shard_paths if not p.exists()]
            if missing:
                raise AuditError(f"{shards}: {len(missing)} batch shards are missing; run again with --resume to finish")
            rows = merge_shards(shard_paths, output)
            manifest = {
                "tool": "reweight-audit",
                "version": __version__,
                "command": "score",
                "input": str(input_path),
                "input_digest": identity["input_digest"],
                "model": source.describe(),
                "model_spec": config.model,
                "model_digest": identity["model_digest"],
                "ref_model": identity["ref_model"],
                "template": template,
                "dtype": identity["dtype"],
                "device": device,
                "world_size": world_size,
                "batch_tokens": config.batch_tokens,
                "chunk_rows": chunk_rows,
                "max_length": config.max_length,
                "window": window,
                "vocab_size": vocab,
                "head": head.describe(),
                "noise_rule": NOISE_RULE,
                "columns": list(STATS_COLUMNS) + (["ref_logp"] if ref else []),
                "row_order": "batches in length order; within a batch, input order then position",
                "counts": {
                    "sequences": n_sequences,
                    "supervised_tokens": supervised,
                    "rows_written": rows,
                    "noise_tokens": noise_tokens,
                    "nonfinite_tokens": supervised - rows,
                    "records_without_spans": read_report.get("no_spans", 0),
                    "batches": n_batches,
                    "batches_resumed_rank0": resumed,
                    **counts,
                },
                "timing": {
                    "seconds_total": round(time.time() - started, 3),
                    "seconds_scoring_rank0": round(forward_seconds, 3),
                    "tokens_per_second_rank0": round(scored_tokens / forward_seconds, 2) if forward_seconds > 0 else None,
                },
            }
            write_json_atomic(manifest_path(output), manifest)
            shutil.rmtree(shards, ignore_errors=True)
        except Exception as exc:
            failure = exc
    agree(failure, world_size)
    return ScoreResult(output, manifest)

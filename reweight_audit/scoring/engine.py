"""The scoring engine: one chunked forward pass to per-token statistics.

The model body runs once per batch; only the hidden states of supervised
positions are gathered, and the output head is applied to them chunk by chunk
(``chunk_rows`` rows at a time), each chunk reduced to statistics at once. The
``[batch, seq, vocab]`` logits tensor never exists.

Output goes to ``<out>.shards/`` one parquet file per batch (atomic renames),
and is merged into ``<out>`` when every batch is done, so ``--resume`` picks up
an interrupted run where it stopped. :func:`run_score` is the stage; its steps,
the engine's rules and the table's columns: ``docs/design.md``, "Scoring", and
``docs/formats.md``.
"""
from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar, Union

import numpy as np

from reweight_audit.scoring.distributed import agree
from reweight_audit.core.errors import AuditError, require_positive
from reweight_audit.core.frames import row_json, rows_digest
from reweight_audit.scoring.config import ScoreConfig
from reweight_audit.core.io import (
    acquire_lock,
    atomic_files,
    dump_json,
    file_sha256,
    manifest_header,
    manifest_path,
    prepare_output_file,
    read_json,
    refuse_symlink,
    write_json_atomic,
    write_parquet_atomic,
)

T = TypeVar("T")

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
    line: int = 0  # line number in the input file (for messages)


#: What a file that is not inject's output is told.
NOT_JSONL = "score reads the JSONL written by 'reweight-audit inject'; run inject on this file first"


@dataclass
class NoisyRows:
    """Noisy records already in memory (the Python API's DataFrame, as plain rows), scored like a file of them.

    Errors name a row as ``<name> row <i>`` where a file's name ``<path>:<line>``.
    """

    rows: list[dict]
    name: str = "noisy DataFrame"

    def __str__(self) -> str:
        return self.name


#: What ``score`` reads: a JSONL file or rows in memory.
NoisySource = Union[Path, NoisyRows]


def read_noisy(path: NoisySource, report: dict | None = None) -> Iterator[NoisyRecord]:
    """Stream the records of an ``inject`` output (or any JSONL with id/prompt/response, or such rows).

    Records without ``spans`` are scored as all-clean; ``report["no_spans"]`` counts them. A record
    without an id gets the hash of its line (a UTF-8 BOM is not part of the line).
    """
    report = report if report is not None else {}
    report.setdefault("no_spans", 0)
    with _opened(path) as rows:
        for where, raw, row, lineno in rows:
            if not isinstance(row, dict) or "response" not in row:
                fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise AuditError(f"{where}: no 'response' field (fields: {fields}); {NOT_JSONL}")
            response = row["response"]
            if not isinstance(response, str):
                raise AuditError(f"{where}: field 'response' must be text")
            spans = row.get("spans")
            if spans is None:
                report["no_spans"] += 1
                spans = []
            _check_spans(spans, response, where)
            rid = row.get("id")
            rid = str(rid) if rid not in (None, "") else hashlib.blake2b(raw, digest_size=8).hexdigest()
            yield NoisyRecord(id=rid, prompt=str(row.get("prompt") or ""), response=response, spans=spans,
                              line=lineno)


def _decode_line(raw: bytes, where: str, *, first: bool) -> Any:
    """One JSON value; a first line that is not JSON says what score reads."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        hint = NOT_JSONL if first else "re-encode the file as UTF-8"
        raise AuditError(f"{where}: not UTF-8 text; {hint}") from None
    except json.JSONDecodeError as exc:
        hint = NOT_JSONL if first else "fix the line or re-run inject"
        raise AuditError(f"{where}: malformed JSON ({exc.msg}); {hint}") from None


def _check_spans(spans: Any, response: str, where: str) -> None:
    if not isinstance(spans, list):
        raise AuditError(f"{where}: field 'spans' must be a list of {{start, end, kind, text}}")
    for span in spans:
        try:
            start, end = int(span["start"]), int(span["end"])
        except (KeyError, TypeError, ValueError):
            raise AuditError(f"{where}: a span lacks integer 'start'/'end'; re-run inject") from None
        if not 0 <= start < end <= len(response):
            raise AuditError(f"{where}: span [{start}, {end}) lies outside the response (length {len(response)}); "
                             "re-run inject on the source corpus")
        if "text" in span and response[start:end] != span["text"]:
            raise AuditError(f"{where}: span [{start}, {end}) text does not match the response; "
                             "the file was edited after inject")


def scan_input(path: NoisySource) -> int:
    """Read the whole input once, before anything loads: every record valid, every id unique.

    Returns the number of records. Duplicate ids (two inject outputs concatenated) would give
    duplicate ``(seq_id, pos)`` rows that compare counts twice; the first ones are named.
    """
    first_seen: dict[str, int] = {}
    duplicates: list[str] = []
    n_duplicates = n = 0
    for record in read_noisy(path):
        n += 1
        if record.id in first_seen:
            n_duplicates += 1
            if len(duplicates) < 3:
                duplicates.append(f"{record.id!r} (lines {first_seen[record.id]} and {record.line})")
        else:
            first_seen[record.id] = record.line
    if n_duplicates:
        raise AuditError(f"{path}: {n_duplicates} record(s) repeat an id, first {', '.join(duplicates)}; ids key "
                         "the scores, so each must appear once (were two inject outputs concatenated?)")
    return n


@contextmanager
def _opened(source: NoisySource) -> Iterator[Iterator[tuple[str, bytes, Any, int]]]:
    """The source's records as (where, raw bytes, parsed row, line): a file's non-blank lines, or the rows in memory.

    The raw bytes give a record without an id its content hash (a UTF-8 BOM is not part of the line).
    """
    if isinstance(source, NoisyRows):
        yield ((f"{source.name} row {i}", row_json(row).encode("utf-8", "surrogatepass"), row, i + 1)
               for i, row in enumerate(source.rows))
        return
    if not source.exists():
        raise AuditError(f"{source}: no such file; run 'reweight-audit inject' first or check the path")
    with source.open("rb") as f:
        if f.read(4) == b"PAR1" or source.suffix.lower() in (".parquet", ".csv"):
            raise AuditError(f"{source}: a {source.suffix.lstrip('.') or 'parquet'} file; {NOT_JSONL}")
        f.seek(0)
        yield _jsonl_rows(source, f)


def _jsonl_rows(path: Path, lines: Iterable[bytes]) -> Iterator[tuple[str, bytes, Any, int]]:
    for lineno, raw in enumerate(lines, start=1):
        raw = raw.removeprefix(codecs.BOM_UTF8) if lineno == 1 else raw
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        yield where, raw, _decode_line(raw, where, first=lineno == 1), lineno


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


def pad_batch(sequences: Sequence[Encoded], pad_id: int, device: str) -> tuple[Any, Any]:
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

    ids, mask = pad_batch(sequences, pad_id, device)
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


def merge_shards(shards: Sequence[Path], output: Path, row_group_size: int = 1 << 17) -> int:
    """Stream shard tables into one parquet file, sorted by input order then position within each shard.

    Memory holds one shard at a time. ``output`` is written directly: the caller gives a temporary
    (:func:`reweight_audit.core.io.atomic_files`, which moves it into place with its manifest).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    writer = None
    rows = 0
    try:
        for shard in shards:
            table = pq.read_table(shard)
            table = table.take(pc.sort_indices(table, sort_keys=[("seq_order", "ascending"), ("pos", "ascending")]))
            table = table.drop_columns(["seq_order"])
            if writer is None:
                writer = pq.ParquetWriter(output, table.schema)
            writer.write_table(table, row_group_size=row_group_size)
            rows += table.num_rows
        if writer is None:
            raise AuditError("nothing to merge: no sequence had a supervised token; check --max-length")
    finally:
        if writer is not None:
            writer.close()
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


def count_records(path: NoisySource) -> int:
    """Non-empty lines (or the rows in memory), for the progress bar's total (a byte scan, no JSON parsing)."""
    if isinstance(path, NoisyRows):
        return len(path.rows)
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
    input_path: NoisySource, tokenizer: Any, template: str, max_length: int | None, counts: dict, read_report: dict,
    window: int
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
    input_path: Path | str | NoisyRows,
    output: Path,
    config: ScoreConfig | None = None,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    window: int = WINDOW_SEQS,
) -> ScoreResult:
    """Score every supervised token of ``input_path`` (a noisy JSONL, or :class:`NoisyRows` in memory);
    write ``output`` (stats table) and its manifest.

    Without ``rank``/``world_size`` the process group comes from the
    environment (torchrun, accelerate launch; one process otherwise). Every
    rank scores its share of each window's batches into the shared shard
    folder, and rank 0 merges once every rank reported success; the other
    ranks return an empty manifest. ``progress(sequences, tokens, total)``
    is called on rank 0 after each batch. Rank 0 holds the output's lock
    (:func:`reweight_audit.core.io.acquire_lock`) from before the input is read
    until the merge is done.
    """
    if world_size is None or rank is None:
        from reweight_audit.scoring.distributed import dist_context

        with dist_context() as (rank, world_size):
            return run_score(input_path, output, config, resume=resume, progress=progress, rank=rank,
                             world_size=world_size, window=window)
    config = config or ScoreConfig()
    input_path = input_path if isinstance(input_path, NoisyRows) else Path(input_path)
    output = Path(output)
    _check_options(input_path, output, config)
    started = time.time()
    # one run per output: rank 0 holds the lock for the whole run, and a refusal reaches every rank
    lock = on_every_rank(world_size, lambda: acquire_lock(prepare_output_file(output)) if rank == 0 else None)
    try:
        setup = on_every_rank(world_size, lambda: _set_up(input_path, output, config, resume, rank, world_size,
                                                          window))
        tally = on_every_rank(world_size, lambda: _score_windows(setup, resume, progress if rank == 0 else None,
                                                                 rank, world_size))
        # rank 0 merges; the others wait for it, so no process leaves the group while another still needs it
        manifest = on_every_rank(world_size, lambda: _merge(setup, tally, world_size, started) if rank == 0 else {})
    finally:
        if lock is not None:
            lock.release()
    return ScoreResult(output, manifest)


def on_every_rank(world_size: int, stage: Callable[[], T]) -> T:
    """Run one stage on this rank, then agree with the others: every rank raises when any rank failed.

    Without the exchange a rank that failed would leave the others waiting at the next collective.
    """
    failure: BaseException | None = None
    result = None
    try:
        result = stage()
    except Exception as exc:
        failure = exc
    agree(failure, world_size)
    return result


def _check_options(input_path: NoisySource, output: Path, config: ScoreConfig) -> None:
    """Options and paths, before anything is read or loaded (0 or a negative count is never "the default")."""
    if isinstance(input_path, Path) and not input_path.exists():
        raise AuditError(f"{input_path}: no such file; run 'reweight-audit inject' first or check the path")
    prepare_output_file(output, source=_input_file(input_path), create=False)
    require_positive("--batch-tokens", config.batch_tokens, "number of tokens")
    require_positive("--chunk-rows", config.chunk_rows, "number of rows")
    if config.max_length is not None and config.max_length < 2:
        raise AuditError(f"--max-length {config.max_length}: give at least 2 tokens")


@dataclass
class _Setup:
    """What every rank holds once the input, the model(s) and the shard folder are ready."""

    input_path: NoisySource
    output: Path
    config: ScoreConfig
    device: str
    source: Any  # ModelSource
    template: str
    windows: Iterator[list[Encoded]]  # the windows after ``first``
    first: list[Encoded]
    total_records: int
    counts: dict[str, int]
    read_report: dict
    model: Any
    head: Head
    ref: tuple[Any, Head] | None
    pad_id: int
    vocab: int
    chunk_rows: int
    identity: dict
    shards: Path


def _set_up(input_path: NoisySource, output: Path, config: ScoreConfig, resume: bool, rank: int, world_size: int,
            window: int) -> _Setup:
    """What can fail cheaply comes first: the whole input, the tokenizer(s), the shards; then the model(s).

    A bad record, a duplicate id, a refused ``--resume`` or another run's shards are reported
    before any model loads; the shard folder is claimed only once the model(s) loaded.
    """
    from reweight_audit.core.models import load_tokenizer, resolve_device, resolve_dtype, resolve_model

    total_records = scan_input(input_path)
    device = _rank_device(resolve_device(config.device), world_size)
    dtype = resolve_dtype(config.dtype, device)
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    template = choose_template(tokenizer, config.template)
    ref_source = _reference_source(config, tokenizer)
    identity = run_identity(input_path, source, ref_source, template, dtype, config, window)
    shards = check_shards(refuse_symlink(shard_dir(output), "the shards folder"), identity, resume=resume)
    counts: dict[str, int] = {}
    read_report: dict = {}
    windows = iter_windows(input_path, tokenizer, template, config.max_length, counts, read_report, window)
    first = _first_window(windows, input_path, counts)
    model, head, vocab = _load_scorer(source, config, device, dtype, first)
    ref = _load_scorer(ref_source, config, device, dtype, first)[:2] if ref_source else None
    claim_shards(shards, identity, resume=resume, write_state=rank == 0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    chunk_rows = config.chunk_rows if config.chunk_rows is not None else auto_chunk_rows(vocab, device)
    return _Setup(input_path, output, config, device, source, template, windows, first, total_records, counts,
                  read_report, model, head, ref, pad_id, vocab, chunk_rows, identity, shards)


def run_identity(input_path: NoisySource, source: Any, ref_source: Any, template: str, dtype: Any, config: ScoreConfig,
                 window: int) -> dict:
    """What makes two runs the same run (``state.json``'s fingerprint; ``--resume`` needs it equal)."""
    from reweight_audit.core.models import model_digest

    return {
        "format": SHARD_FORMAT,
        "input_digest": input_digest(input_path),
        "model": source.describe(),
        "model_digest": model_digest(source),
        "ref_model": ref_source.describe() if ref_source else None,
        "template": template,
        "dtype": str(dtype).replace("torch.", ""),
        "batch_tokens": config.batch_tokens,
        "max_length": config.max_length,
        "window": window,
    }


def _input_file(source: NoisySource) -> Path | None:
    return source if isinstance(source, Path) else None


def input_digest(source: NoisySource) -> str:
    """What identifies the input in the manifest and in the shards' fingerprint (``--resume``)."""
    if isinstance(source, NoisyRows):
        return rows_digest(source.rows)
    # a noisy JSONL: its bytes, as inject's manifest records a file input (``input_digest``)
    return "sha256:" + file_sha256(source)


def _rank_device(device: str, world_size: int) -> str:
    """Under several ranks, plain ``cuda`` means this rank's own GPU."""
    if world_size > 1 and device == "cuda":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return device


def _first_window(windows: Iterator[list[Encoded]], input_path: NoisySource, counts: dict) -> list[Encoded]:
    first = next(windows, None)
    if first is None:
        if not counts.get("records"):
            raise AuditError(f"{input_path}: no records; run inject on a non-empty corpus")
        raise AuditError(f"{input_path}: no record has a supervised token left to score (see --max-length)")
    return first


def _load_scorer(source: Any, config: ScoreConfig, device: str, dtype: Any, first: list[Encoded]) -> tuple[Any, Head, int]:
    """The model, its verified head and its vocabulary size."""
    from reweight_audit.core.models import load_model

    model = load_model(source, device=device, dtype=dtype, trust_remote_code=config.trust_remote_code)
    check_vocabulary(model, first)
    head = verify_head(model, find_head(model), first[0], device)
    vocab = int(head.weight.shape[0]) if head.mode == "linear" else int(model.config.get_text_config().vocab_size)
    return model, head, vocab


def _reference_source(config: ScoreConfig, tokenizer: Any) -> Any:
    """``--ref-model`` (Rho-1), resolved and its tokenizer checked against the scored model's, or None."""
    from reweight_audit.core.models import load_tokenizer, resolve_model

    if not config.ref_model:
        return None
    ref_source = resolve_model(config.ref_model)
    ref_tok = load_tokenizer(ref_source, trust_remote_code=config.trust_remote_code)
    if ref_tok.get_vocab() != tokenizer.get_vocab():
        raise AuditError(f"--ref-model {config.ref_model}: its tokenizer differs from the scored model's; "
                         "Rho-1 needs the same vocabulary")
    return ref_source


def check_shards(shards: Path, identity: dict, *, resume: bool) -> Path:
    """Refuse another run's finished shards (unless resuming) and a ``--resume`` of a different run.

    ``state.json`` holds the run's fingerprint (``identity``). Nothing is written: this runs before any
    model loads. The lock on the output (rank 0's) means no other run is writing here now.
    """
    key = fingerprint(identity)
    state_file = shards / "state.json"
    previous = read_json(state_file) if state_file.exists() else None
    if previous is not None and not resume and any(shards.glob("batch-*.parquet")):
        raise AuditError(f"{shards}: an earlier, interrupted run left finished shards; pass --resume to continue "
                         "it, or delete the folder to start over")
    if previous is not None and resume and previous.get("key") != key:
        changed = [k for k in identity if previous.get("identity", {}).get(k) != identity[k]]
        raise AuditError(f"{shards}: --resume refused: the earlier run had a different "
                         f"{', '.join(changed) or 'configuration'}; rerun with the same options or delete the folder")
    return shards


def claim_shards(shards: Path, identity: dict, *, resume: bool, write_state: bool) -> Path:
    """:func:`check_shards`, then make ``shards`` this run's folder (``write_state``: rank 0 records the run)."""
    check_shards(shards, identity, resume=resume)
    shards.mkdir(parents=True, exist_ok=True)
    if write_state:
        for leftover in shards.glob("*.tmp"):  # a killed run's half-written shards; no other writer runs now
            leftover.unlink(missing_ok=True)
        write_json_atomic(shards / "state.json", {"key": fingerprint(identity), "identity": identity})
    return shards


@dataclass
class _Tally:
    """What this rank scored, over all windows, and what the whole input holds (every rank reads it)."""

    n_batches: int = 0  # batches planned, all ranks'
    resumed: int = 0  # this rank's batches found finished (--resume)
    scored_tokens: int = 0  # tokens this rank scored now, over forward_seconds
    forward_seconds: float = 0.0
    done_seqs: int = 0  # this rank's sequences, scored or resumed
    done_tokens: int = 0
    n_sequences: int = 0  # the input's
    supervised: int = 0
    noise_tokens: int = 0


def _score_windows(setup: _Setup, resume: bool, progress: ProgressFn | None, rank: int, world_size: int) -> _Tally:
    """Every window: plan its batches, take this rank's share, score each into its shard (kept ones skipped)."""
    tally = _Tally()
    for sequences in itertools.chain([setup.first], setup.windows):
        tally.n_sequences += len(sequences)
        tally.supervised += sum(len(s.sup_index) for s in sequences)
        tally.noise_tokens += sum(int(s.is_noise.sum()) for s in sequences)
        if sequences is not setup.first:
            check_vocabulary(setup.model, sequences)
        batches = plan_batches(sequences, setup.config.batch_tokens)
        owner = assign_to_ranks([len(b) * max(len(sequences[j].input_ids) for j in b) for b in batches], world_size)
        for local, members in enumerate(batches):
            if owner[local] == rank:
                _score_shard(setup, [sequences[j] for j in members], tally.n_batches + local, resume, tally)
                if progress:
                    progress(tally.done_seqs * world_size, tally.done_tokens * world_size, setup.total_records)
        tally.n_batches += len(batches)
    return tally


def _score_shard(setup: _Setup, batch: list[Encoded], index: int, resume: bool, tally: _Tally) -> None:
    path = setup.shards / f"batch-{index:06d}.parquet"
    n_tok = sum(len(s.sup_index) for s in batch)
    if resume and path.exists():
        tally.resumed += 1
    else:
        t0 = time.perf_counter()
        stats = score_batch(setup.model, setup.head, batch, device=setup.device, chunk_rows=setup.chunk_rows,
                            pad_id=setup.pad_id, ref=setup.ref)
        tally.forward_seconds += time.perf_counter() - t0
        write_parquet_atomic(batch_table(batch, stats), path)
        tally.scored_tokens += n_tok
    tally.done_seqs += len(batch)
    tally.done_tokens += n_tok


def _merge(setup: _Setup, tally: _Tally, world_size: int, started: float) -> dict:
    """Rank 0: merge every shard into the output and write its manifest, together; remove the shard folder."""
    shard_paths = [setup.shards / f"batch-{i:06d}.parquet" for i in range(tally.n_batches)]
    missing = [p for p in shard_paths if not p.exists()]
    if missing:
        raise AuditError(f"{setup.shards}: {len(missing)} batch shards are missing; run again with --resume to finish")
    with atomic_files(setup.output, manifest_path(setup.output)) as (data_tmp, manifest_tmp):
        rows = merge_shards(shard_paths, data_tmp)
        manifest = score_manifest(setup, tally, rows, world_size, started)
        manifest_tmp.write_text(dump_json(manifest), encoding="utf-8")
    shutil.rmtree(setup.shards, ignore_errors=True)
    return manifest


def score_manifest(setup: _Setup, tally: _Tally, rows: int, world_size: int, started: float) -> dict:
    """The score stage's manifest (``docs/formats.md``, "Manifests")."""
    config, identity = setup.config, setup.identity
    return {
        **manifest_header("score", input=setup.input_path, input_digest=identity["input_digest"], output=setup.output),
        "model": identity["model"],
        "model_spec": config.model,
        "model_digest": identity["model_digest"],
        "ref_model": identity["ref_model"],
        "template": setup.template,
        "dtype": identity["dtype"],
        "device": setup.device,
        "world_size": world_size,
        "batch_tokens": config.batch_tokens,
        "chunk_rows": setup.chunk_rows,
        "max_length": config.max_length,
        "window": identity["window"],
        "vocab_size": setup.vocab,
        "head": setup.head.describe(),
        "noise_rule": NOISE_RULE,
        "columns": list(STATS_COLUMNS) + (["ref_logp"] if setup.ref else []),
        "row_order": "batches in length order; within a batch, input order then position",
        "counts": {
            "sequences": tally.n_sequences,
            "supervised_tokens": tally.supervised,
            "rows_written": rows,
            "noise_tokens": tally.noise_tokens,
            "nonfinite_tokens": tally.supervised - rows,
            "records_without_spans": setup.read_report.get("no_spans", 0),
            "batches": tally.n_batches,
            "batches_resumed_rank0": tally.resumed,
            **setup.counts,
        },
        "timing": {
            "seconds_total": round(time.time() - started, 3),
            "seconds_scoring_rank0": round(tally.forward_seconds, 3),
            "tokens_per_second_rank0": (round(tally.scored_tokens / tally.forward_seconds, 2)
                                        if tally.forward_seconds > 0 else None),
        },
    }

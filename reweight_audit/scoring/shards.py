"""Where a run's batches go: one parquet shard per batch, the run's fingerprint, ``--resume``, ranks, the merge.

Shards lie in ``<out>.shards/`` (atomic renames), with ``state.json`` holding the run's
identity: ``--resume`` continues only the same run, and a run never mixes with another's
finished shards. Batches go to ranks by a deterministic assignment every rank computes alike;
rank 0 merges the shards into ``<out>`` in input order (``docs/design.md``, "Scoring").
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import log, read_json, write_json_atomic
from reweight_audit.scoring.config import ScoreConfig
from reweight_audit.scoring.encoding import Encoded
from reweight_audit.scoring.reader import NoisySource, input_digest

__all__ = ["SHARD_FORMAT", "assign_to_ranks", "batch_table", "check_shards", "claim_shards", "damaged_shards",
           "fingerprint", "merge_shards", "run_identity", "shard_dir", "statistic_columns"]

SHARD_FORMAT = 1


def shard_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(input_path: NoisySource, source: Any, ref_source: Any, template: str, dtype: Any, config: ScoreConfig,
                 window: int, limit: int | None = None) -> dict:
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
        "max_length": limit,  # what sequences are cut to: --max-length, else the model's context
        "window": window,
    }


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


def damaged_shards(shards: Path) -> list[Path]:
    """Kept shards that would not merge (unreadable parquet, or without a shard's columns), named in a note.

    Every kept shard is read whole (a shard is one batch), before any model loads: a damaged one
    found here is scored again (:func:`claim_shards` removes it), never found by the merge after
    every other batch was scored.
    """
    damaged = _unreadable(shards)
    if damaged:
        first, why = damaged[0]
        log.warning("%s: %d kept shard(s) cannot be read (%s: %s); their batches will be scored again", shards,
                    len(damaged), first.name, why)
    return [path for path, _why in damaged]


def _unreadable(shards: Path) -> list[tuple[Path, str]]:
    """Each kept shard that cannot be read as a shard, with the reason."""
    import pyarrow.parquet as pq

    needed = {"seq_id", "pos", "token_id", "token", "logp", "is_noise", "seq_order"}
    damaged = []
    for path in sorted(shards.glob("batch-*.parquet")):
        try:
            missing = needed - set(pq.read_table(path).column_names)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            damaged.append((path, _first_line(exc)))
            continue
        if missing:
            damaged.append((path, f"no {', '.join(sorted(missing))} column"))
    return damaged


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def claim_shards(shards: Path, identity: dict, *, resume: bool, write_state: bool,
                 damaged: Sequence[Path] = ()) -> Path:
    """:func:`check_shards`, then make ``shards`` this run's folder (``write_state``: rank 0 records the run).

    Rank 0 removes a killed run's temporaries and the ``damaged`` kept shards
    (:func:`damaged_shards`), so their batches are scored again.
    """
    check_shards(shards, identity, resume=resume)
    shards.mkdir(parents=True, exist_ok=True)
    if write_state:
        for leftover in shards.glob("*.tmp"):  # a killed run's half-written shards; no other writer runs now
            leftover.unlink(missing_ok=True)
        for path in damaged:
            path.unlink(missing_ok=True)
        write_json_atomic(shards / "state.json", {"key": fingerprint(identity), "identity": identity})
    return shards


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



#: The stored type of each statistic (float32 where the kernel's precision is float32; rank an integer; E[R]
#: float64, whose relative tolerance is finer than float32's).
STATISTIC_TYPES = {"logp": np.float32, "entropy": np.float32, "rank": np.int64, "expected_rank": np.float64,
                   "topk_entropy": np.float32, "sum_p2": np.float32}


def statistic_columns(stats) -> dict[str, Any]:
    """The statistics' columns (pyarrow arrays) as a stats table stores them (score's shards; bench's synthetic
    tables)."""
    import pyarrow as pa

    return {name: pa.array(np.asarray(stats[name]).astype(kind)) for name, kind in STATISTIC_TYPES.items()}


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
        **statistic_columns(stats),
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


def _read_shard(shard: Path) -> Any:
    """A finished shard's table; one that became unreadable since it was written is one line naming it."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(shard)
    except Exception as exc:  # ArrowInvalid, OSError: the file changed under us
        raise AuditError(f"{shard}: a finished shard cannot be read ({_first_line(exc)}); run again with --resume "
                         "to score its batch again") from None


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
            table = _read_shard(shard)
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

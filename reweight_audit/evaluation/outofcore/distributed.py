"""The map step on Ray: shards of whole sequences evaluated by Ray tasks, their partial aggregates added.

A map task reads one row range of whole sequences (:func:`.chunks.read_rows`,
only the row groups that hold it), computes every method's weights on it
(methods that are not batch-dependent), writes its ranking scores into its own
folder of the work folder and returns its sums per sequence and per kind.
The sums add (:meth:`.accumulate.RankingSums.merge`); the scores of every shard
are read by DuckDB in place (one glob), so the reduce is the single-process
one. Batch-dependent methods need whole simulated batches, which cross shards:
they run in the driver's batch pass. Ray is an existing engine (``ray start``
on each node); the work folder and the tables must be on storage every node
reads (``docs/scaling.md``).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from reweight_audit.evaluation.outofcore import chunks as ch
from reweight_audit.evaluation.outofcore.accumulate import RunTotals
from reweight_audit.evaluation.outofcore.weights import chunk_rankings

#: Rows per map task.
SHARD_ROWS = 1 << 22


def connect_ray(address: str) -> Any:
    """Ray, started here (``local``) or joined (``auto`` or an address); reused when this process already has it."""
    import ray

    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return ray


def map_shard(job: Any, scan: ch.TableScan, index: int, start: int, stop: int, methods: list,
              sums: dict) -> tuple[RunTotals, dict]:
    """One map task: rows ``[start, stop)`` of the table, chunk by chunk; returns its totals and sums."""
    job.say = _quiet
    first, end = ch.code_range(scan, start, stop)
    totals = RunTotals(end - first, len(scan.kinds), first)
    mine = {key: s.shard(f"shard-{index}", first, end - first) for key, s in sums.items()}
    rngs = {m.name: _generator_at(job.options.seed, start) for m in methods}
    lo = start
    while lo < stop:
        hi = _chunk_end(scan, lo, stop)
        chunk = ch.make_chunk(ch.read_rows(scan.path, lo, hi, list(scan.columns)), scan)
        totals.add(chunk)
        chunk_rankings(job, chunk, methods, mine, rngs)
        lo = hi
    for s in mine.values():
        s.close()
    return totals, mine


def _quiet(_message: str) -> None:
    return None


def _chunk_end(scan: ch.TableScan, lo: int, stop: int) -> int:
    """The first sequence start at or after ``lo + CHUNK_ROWS`` (``stop`` if none before it)."""
    starts = np.asarray(scan.seq_starts)
    at = int(np.searchsorted(starts, lo + ch.CHUNK_ROWS, side="left"))
    return min(stop, int(starts[at])) if at < starts.size else stop


def _generator_at(seed: int, row: int) -> np.random.Generator:
    """The method's generator as the single-process pass has it at ``row``: ``row`` 64-bit draws on (one per
    token for a method that draws one uniform per token, as ``random`` does)."""
    rng = np.random.default_rng(seed)
    if row:
        rng.bit_generator.advance(row)
    return rng


def ray_weight_pass(job: Any, scan: ch.TableScan, methods: list, sums: dict, address: str) -> RunTotals:
    """The map step of ``methods`` on Ray, one task per shard not finished before; the shards' sums are added
    into ``sums``."""
    ray = connect_ray(address)
    task = ray.remote(map_shard)
    say = job.say
    totals = RunTotals(scan.n_seqs, len(scan.kinds))
    todo = []
    for i, (a, b) in enumerate(ch.shard_ranges(scan, SHARD_ROWS)):
        part = load_shard(job.work, i)
        if part is None:
            todo.append(i)
        else:
            _merge(totals, sums, part)
    job.say = None  # the driver's progress callback stays here
    try:
        ranges = ch.shard_ranges(scan, SHARD_ROWS)
        refs = {task.remote(job, scan, i, *ranges[i], methods, sums): i for i in todo}
    finally:
        job.say = say
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        part = ray.get(ready[0])
        save_shard(job.work, refs[ready[0]], part)
        _merge(totals, sums, part)
        say(f"map: {len(refs) - len(pending)}/{len(refs)} shards")
    return totals


def local_weight_pass(job: Any, scan: ch.TableScan, methods: list, sums: dict) -> RunTotals:
    """The map step in this process, shard after shard; a shard finished by an earlier, interrupted run (same
    table, same options: the work folder is keyed by them) is read back instead of computed again."""
    import time

    totals = RunTotals(scan.n_seqs, len(scan.kinds))
    ranges = ch.shard_ranges(scan, SHARD_ROWS)
    say, t0, done_rows, computed = job.say, time.perf_counter(), 0, 0
    for i, (a, b) in enumerate(ranges):
        part = load_shard(job.work, i)
        if part is None:
            part = map_shard(job, scan, i, a, b, methods, sums)
            job.say = say
            save_shard(job.work, i, part)
            computed += b - a
        _merge(totals, sums, part)
        done_rows = b
        spent = time.perf_counter() - t0
        eta = spent / computed * (scan.n_rows - done_rows) if computed else 0.0
        say(f"weights: {done_rows:,}/{scan.n_rows:,} rows, shard {i + 1}/{len(ranges)}, ETA {eta:.0f} s")
    return totals


def _merge(totals: RunTotals, sums: dict, part: tuple[RunTotals, dict]) -> None:
    shard_totals, shard_sums = part
    totals.merge(shard_totals)
    for key, s in shard_sums.items():
        sums[key].merge(s)


def _done(work: Path, index: int) -> Path:
    return work / f"shard-{index}" / "done.pkl"


def save_shard(work: Path, index: int, part: tuple) -> None:
    """A finished shard's sums, beside its spilled scores; written last and atomically: its presence means done."""
    path = _done(work, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(part, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def load_shard(work: Path, index: int) -> tuple | None:
    """A shard finished before (None: not finished; it is computed again, its partial files overwritten)."""
    path = _done(work, index)
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)

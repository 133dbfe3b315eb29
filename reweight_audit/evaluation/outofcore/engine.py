"""One run through the out-of-core engine: chunks → per-sequence sums and spilled scores → DuckDB → rows.

The rows are those :func:`reweight_audit.evaluation.compare.evaluate_method`
builds in memory, with the same numbers (counts exactly, the rest to rounding).
Memory is O(sequences) for one ranking at a time, not O(tokens) nor O(sequences × methods).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import read_manifest
from reweight_audit.evaluation import metrics
from reweight_audit.evaluation.metrics.declarations import NAN, count_values, ranking_values
from reweight_audit.evaluation.outofcore import chunks as ch
from reweight_audit.evaluation.outofcore import distributed
from reweight_audit.evaluation.outofcore import strata, tables
from reweight_audit.evaluation.outofcore.accumulate import (BUCKET_ROWS, RankingSums, RunTotals, bucket_count,
                                                            score_edges, totals_counts)
from reweight_audit.evaluation.outofcore.weights import chunk_rankings, method_weights, ranking_scores
from reweight_audit.evaluation.outofcore.grouped import group_rows
from reweight_audit.evaluation.outofcore.histogram import DescendingCounts, HistogramIndex
from reweight_audit.evaluation.outofcore.rows import metric_row
from reweight_audit.evaluation.runs import REQUIRED_COLUMNS, RunData
from reweight_audit.methods import Method, assign_batches


@dataclass
class RunRows:
    """One run's rows, its summary (as ``RunData.summary()`` gives it) and timings."""

    table: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)
    by_kind: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    sample: RunData | None = None  # the first chunk: what weights.parquet, the plots and the heatmap show
    sample_weights: dict[str, np.ndarray] = field(default_factory=dict)
    by_group: list[dict] = field(default_factory=list)
    strata: list[dict] = field(default_factory=list)  # --stratify: strata.csv's rows (outofcore.strata)
    t_weights: float = 0.0
    t_metrics: float = 0.0


@dataclass
class RunJob:
    """What one run is evaluated with."""

    path: Path
    label: str
    methods: list[Method]
    param_map: dict
    options: object  # CompareConfig
    work: Path
    say: Callable[[str], None]
    rank_by: list[str] | None = None  # None: options.rank_by
    grouping: tuple[np.ndarray, list[str]] | None = None  # --by-meta: per sequence code its group, the names

    def __post_init__(self) -> None:
        if self.rank_by is None:
            self.rank_by = list(self.options.rank_by)


@contextmanager
def work_folder(out_dir: Path | None, path: Path, record: dict) -> Iterator[Path]:
    """Where a run's shards, spilled scores and DuckDB's temporary files go; removed once the run is evaluated.

    With an output folder it is ``.<out>.engine/<key>`` beside it, the key a digest of the table (path, size,
    modification time), the options and the shard size: an interrupted run leaves its finished shards there and
    the next run with the same table and options reads them back. Without one, a temporary folder.
    """
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="reweight-audit-engine-") as tmp:
            yield Path(tmp)
        return
    stat = Path(path).stat()
    key = json.dumps({"table": str(Path(path).resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns,
                      "options": record, "shard_rows": distributed.SHARD_ROWS, "chunk_rows": ch.CHUNK_ROWS,
                      "bucket_rows": BUCKET_ROWS, "spill_layout": 2},
                     sort_keys=True, default=str)
    folder = Path(out_dir).parent / f".{Path(out_dir).name}.engine" / hashlib.sha256(key.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    yield folder  # an exception leaves it for the next run
    shutil.rmtree(folder, ignore_errors=True)
    with suppress(OSError):
        folder.parent.rmdir()  # the last run's folder gone: the parent too


def scan_run(path: Path) -> ch.TableScan:
    """The pre-pass of one table; sequences split over the table are refused (chunks must hold whole ones)."""
    scan = ch.scan_table(path)
    if not scan.contiguous:
        raise AuditError(f"{path}: a sequence's rows are not contiguous (the table is not grouped by seq_id); "
                         "--engine duckdb reads whole sequences in row order: sort the table by seq_id, or use "
                         "--engine memory")
    return scan


def evaluate_run(job: RunJob, scan: ch.TableScan) -> RunRows:
    """Every method of ``job`` on one table, out of core."""
    opts = job.options
    ks = tuple(sorted(set(metrics.CUTS) | {opts.k_frac}))
    sums = {(m.name, r): RankingSums(job.work / "main" / f"{i}-{r}.parquet", scan.n_seqs, len(scan.kinds), ks,
                                     opts.k_frac, "sequence" in opts.scope, n_buckets=bucket_count(scan.n_rows))
            for i, m in enumerate(job.methods) for r in opts.rank_by}
    out = RunRows()
    t0 = time.perf_counter()
    with tables.connect(job.work) as con:
        totals, out.sample, out.sample_weights = weight_pass(job, scan, con, sums)
        out.t_weights = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, m in enumerate(job.methods):
            for r in opts.rank_by:
                _ranking_rows(job, con, m, r, sums[(m.name, r)].load(), totals, ks, out, scan.kinds)
                sums[(m.name, r)].release()  # one ranking's per-sequence arrays in memory at a time
            job.say(reduce_progress(job.label, m.name, i + 1, len(job.methods), t0))
        if job.grouping is not None:
            out.by_group = group_rows(job, con, totals, sums)
        out.strata = strata.strata_rows(job, con, totals, sums)  # [] without --stratify
    out.t_metrics = time.perf_counter() - t0
    out.summary = run_summary(job.label, scan, totals)
    return out


def reduce_progress(label: str, done_what: str, done: int, total: int, t0: float) -> str:
    """The reduce's progress line: what finished, how many of how many, and the ETA at the pace so far."""
    eta = (time.perf_counter() - t0) / done * (total - done)
    return f"{label}: {done_what} done ({done}/{total}, ETA {eta:.0f} s)"


def weight_pass(job: RunJob, scan: ch.TableScan, con, sums: dict) -> tuple[RunTotals, RunData, dict]:
    """Every method's weights chunk by chunk (row chunks; batch chunks for batch-dependent methods), each
    rank-by's scores handed to ``sums[(method, rank_by)].add(chunk, scores)``; returns the run's totals and its
    first chunk with the plain methods' weights on it (the report's sample)."""
    totals = RunTotals(scan.n_seqs, len(scan.kinds))
    plain = [m for m in job.methods if not getattr(m, "batch_dependent", False)]
    batched = [m for m in job.methods if getattr(m, "batch_dependent", False)]
    address = getattr(job.options, "ray", None)
    sample, sample_weights = _sample(job, scan, plain)
    _set_edges(job, sample, sample_weights, sums)  # before the map step: every shard buckets alike
    if address:
        totals.merge(distributed.ray_weight_pass(job, scan, plain, sums, address))
    else:
        totals.merge(distributed.local_weight_pass(job, scan, plain, sums))
    if batched:
        for chunk in _progress(_batch_chunks(job, scan, con), scan.n_rows, job.say, "batch-dependent weights"):
            chunk_rankings(job, chunk, batched, sums, _generators(job, batched))
    for one in sums.values():
        one.close()
    return totals, sample, sample_weights


def _sample(job: RunJob, scan: ch.TableScan, plain: list[Method]) -> tuple[RunData, dict]:
    """The first chunk and the plain methods' weights on it: what weights.parquet, the plots and the heatmap show,
    and where each ranking's score buckets come from (:func:`_set_edges`)."""
    chunk = ch.make_chunk(ch.read_rows(scan.path, 0, _first_end(scan), list(scan.columns)), scan)
    first, seed = chunk.run, job.options.seed
    weights = {m.name: method_weights(job, m, chunk, np.random.default_rng(seed)) for m in plain}
    first.label = job.label
    return first, weights


def _set_edges(job: RunJob, first: RunData, weights: dict, sums: dict) -> None:
    """Each plain method × rank-by's score buckets, from its scores on the first chunk (the batch-dependent
    methods' pass is not sharded: it takes them from its own first chunk)."""
    logp = first.column("logp")
    sum_p2 = first.column("sum_p2") if "grad" in job.rank_by else None
    for (name, rank_by), one in sums.items():
        if name in weights:
            one.edges = score_edges(ranking_scores(first, weights[name], rank_by, logp, sum_p2), one.n_buckets)


def _first_end(scan: ch.TableScan) -> int:
    """Where the first chunk of whole sequences ends."""
    starts = np.asarray(scan.seq_starts + [scan.n_rows])
    return int(starts[min(int(np.searchsorted(starts, ch.CHUNK_ROWS)), starts.size - 1)])


def _generators(job: RunJob, methods: list[Method]) -> dict:
    """One generator per method, drawn on chunk after chunk (made once per pass, kept on the job)."""
    key = tuple(m.name for m in methods)
    store = job.__dict__.setdefault("_rngs", {})
    if key not in store:
        store[key] = {m.name: np.random.default_rng(job.options.seed) for m in methods}
    return store[key]


def _progress(chunks, n_rows: int, say: Callable[[str], None], stage: str):
    """The chunks, saying after each how many rows are done and the stage's ETA."""
    t0, done = time.perf_counter(), 0
    for chunk in chunks:
        yield chunk
        done += chunk.run.n_tokens
        spent = time.perf_counter() - t0
        eta = spent / done * (n_rows - done) if done else 0.0
        say(f"{stage}: {done:,}/{n_rows:,} rows, ETA {eta:.0f} s")


def _batch_chunks(job: RunJob, scan: ch.TableScan, con):
    """Chunks of whole simulated batches, from a copy of the table sorted by batch (table order within one)."""
    batch_of_seq = assign_batches(np.arange(scan.n_seqs), job.options.batch_seqs, job.options.seed)
    target = job.work / "batched.parquet"
    # only what a chunk is checked with and what the batch-dependent methods read: a narrower sort
    needs = {c for m in job.methods if getattr(m, "batch_dependent", False) for c in m.needs}
    needs |= strata.needs(job.options)  # --stratify's variables are spilled beside the scores
    columns = [c for c in scan.columns if c in (*REQUIRED_COLUMNS, "noise_kind", "seq_len", "sum_p2") or c in needs]
    tables.batch_ordered_copy(con, scan.path, list(scan.seq_code), batch_of_seq, target, columns)
    pending, size = [], 0
    for b in pq.ParquetFile(target, pre_buffer=False).iter_batches(batch_size=1 << 16):  # pre_buffer: chunks._open
        pending.append(b)
        size += b.num_rows
        if size >= ch.CHUNK_ROWS:
            table = pa.Table.from_batches(pending)
            batch = table.column("_batch").to_numpy()
            change = np.flatnonzero(batch[1:] != batch[:-1])
            if change.size:
                cut = int(change[-1]) + 1
                yield ch.make_chunk(table.slice(0, cut).drop_columns(["_batch"]), scan, batch[:cut])
                rest = table.slice(cut)
                pending, size = rest.to_batches(), rest.num_rows
    if size:
        table = pa.Table.from_batches(pending)
        yield ch.make_chunk(table.drop_columns(["_batch"]), scan, table.column("_batch").to_numpy())


# --------------------------------------------------------------------------- rows


def _ranking_rows(job: RunJob, con, m: Method, rank_by: str, sums: RankingSums, totals: RunTotals,
                  ks: tuple[float, ...], out: RunRows, scan_kinds: list[str]) -> None:
    opts = job.options
    counts = DescendingCounts(totals.n_clean, totals.n_kind, ks, (opts.k_frac,))
    tally = _global_tally(totals, ks, opts.k_frac) if "global" in opts.scope else None
    tables.value_counts(con, sums.pattern, counts, len(totals.n_kind), tally=tally)
    index = HistogramIndex(counts)
    base = _base_counts(totals)
    for scope in opts.scope:
        ident = {"run": job.label, "method": m.name, "family": getattr(m, "family", ""), "rank_by": rank_by,
                 "scope": scope}
        if scope == "global":
            per_cut, per_seq, kind_counts = _global_scope(tally.out, counts, totals, ks, opts.k_frac)
        else:
            per_cut, per_seq, kind_counts = _sequence_scope(sums, totals, ks)
        row = _main_row(per_cut[opts.k_frac], per_seq, sums, totals, index, opts)
        out.table.append({**ident, "k": opts.k, **row, **base})
        out.curves += [{**ident, "k": round(c * 100.0, 10), **count_values(per_cut[c], per_cut_only=True)}
                       for c in ks]
        out.by_kind += _kind_rows(ident, opts.k, kind_counts, sums, totals, index, scan_kinds)


def _base_counts(totals: RunTotals) -> dict:
    n, n_noise = int(totals.length.sum()), int(totals.n_noise.sum())
    return {"n_tokens": n, "n_noise": n_noise, "n_seqs": int(np.count_nonzero(totals.length)),
            "n_noise_seqs": int(np.count_nonzero(totals.n_noise)), "base_rate": n_noise / n if n else NAN}


def _global_tally(totals: RunTotals, ks, k) -> tables.SequenceTally:
    """What global scope needs per sequence, taken in the sorted pass: all tokens above and tied at the main cut,
    the noise at every cut, and kind j's tokens at its pool's cut."""
    n_kinds = len(totals.n_kind)
    noise = list(range(1, n_kinds + 1))
    watches = [("all", 0, k, [0, *noise])] + [(f"n{i}", 0, c, noise) for i, c in enumerate(ks)]
    watches += [(f"k{j}", 1 + j, k, [1 + j]) for j in range(n_kinds)]
    return tables.SequenceTally(totals.n_seqs, n_kinds + 1, watches)


def _global_scope(per: dict, counts: DescendingCounts, totals: RunTotals, ks, k):
    noise_cuts = [counts.cut(0, c) for c in ks]
    kind_cuts = [counts.cut(1 + j, k) for j in range(len(totals.n_kind))]
    main = counts.cut(0, k)
    n, n_noise = int(totals.length.sum()), int(totals.n_noise.sum())
    n_noisy = int(np.count_nonzero(totals.n_noise))
    per_cut = {}
    for i, c in enumerate(ks):
        pc = noise_cuts[i]
        hits = pc.cut.hit(per[f"n{i}_above"], per[f"n{i}_tied"]).sum() if pc.cut.n_top else 0.0
        per_cut[c] = metrics.Counts(n, n_noise, pc.cut.n_top, pc.found, n_noisy, hits)
    i = ks.index(k)
    share = main.cut.share
    found = per[f"n{i}_above"] + per[f"n{i}_tied"] * share
    top = per["all_above"] + per["all_tied"] * share
    hit = main.cut.hit(per[f"n{i}_above"], per[f"n{i}_tied"]) if main.cut.n_top else np.zeros(totals.n_seqs)
    noisy = (totals.n_noise > 0).astype(np.float64)
    per_seq = np.column_stack([found, top, totals.n_noise, totals.length, hit * noisy, noisy])
    kind_counts = []
    for j, pc in enumerate(kind_cuts):
        n_p = int(totals.n_kind[j])
        hits = pc.cut.hit(per[f"k{j}_above"], per[f"k{j}_tied"]).sum() if pc.cut.n_top else 0.0
        kind_counts.append(metrics.Counts(totals.n_clean + n_p, n_p, pc.cut.n_top, pc.found,
                                          int(totals.kind_seqs[j]), hits))
    return per_cut, per_seq, kind_counts


def _sequence_scope(sums: RankingSums, totals: RunTotals, ks):
    per_cut = {c: totals_counts(sums.seq_totals[i]) for i, c in enumerate(ks)}
    kind_counts = [totals_counts(row) for row in sums.kind_totals]
    return per_cut, sums.seq_fields, kind_counts


def _main_row(main: metrics.Counts, per_seq: np.ndarray, sums: RankingSums, totals: RunTotals,
              index: HistogramIndex, opts) -> dict:
    return metric_row(main, per_seq, sums.w_total, sums.w_noise, totals.length, index, opts)


def _kind_rows(ident: dict, k: float, kind_counts: list, sums: RankingSums, totals: RunTotals,
               index: HistogramIndex, kinds: list[str]) -> list[dict]:
    from dataclasses import replace

    rows = []
    for j, (kind, c) in enumerate(zip(kinds, kind_counts)):
        c = replace(c, w_total=sums.clean_w + sums.kind_w[j], w_noise=sums.kind_w[j])
        rows.append({**ident, "k": k, "kind": kind, "n_kind": int(c.n_noise), "n_pool": totals.n_clean + int(c.n_noise),
                     **count_values(c), **ranking_values(index, j)})
    return rows


def run_summary(label: str, scan: ch.TableScan, totals: RunTotals) -> dict:
    """The run's summary, as ``RunData.summary()`` gives it for the whole table."""
    base = _base_counts(totals)
    manifest = read_manifest(scan.path)
    return {"label": label, "path": str(scan.path), "model": (manifest or {}).get("model"), **base,
            "noise_kinds": {k: int(c) for k, c in zip(scan.kinds, totals.n_kind)},
            "n_excluded": totals.n_rows - base["n_tokens"], "excluded_kinds": dict(totals.excluded_kinds),
            "columns": sorted(scan.columns), "manifest": manifest}

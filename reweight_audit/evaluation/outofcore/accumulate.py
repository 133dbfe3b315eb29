"""Per-chunk work of the out-of-core engine: each method's weights on a chunk, spilled scores, per-sequence sums.

A chunk holds whole sequences (whole simulated batches for batch-dependent
methods), so everything local to a sequence (its counts in sequence scope, its
weight sums, its length and noise) is computed here with the in-memory
functions and written per sequence code to a file of its ranking, read back one
ranking at a time: O(sequences), never O(tokens) nor O(sequences × methods).
The ranking scores themselves go to one parquet file per method × rank-by, in
score buckets (one row group per bucket and chunk), where DuckDB sorts them one
bucket at a time and they are counted per distinct value (:mod:`.tables`).
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation import metrics
from reweight_audit.evaluation.metrics.checks import code_layout
from reweight_audit.evaluation.metrics.counts import SEQUENCE_FIELDS, evaluate, per_sequence
from reweight_audit.evaluation.outofcore.chunks import Chunk
from reweight_audit.methods import Method, compute_viewed

#: A spilled score row; ``bucket``: its score's range (:func:`score_edges`), one per row group.
SPILL_SCHEMA = pa.schema([("score", pa.float64()), ("kind", pa.int16()), ("seq", pa.int32()),
                          ("bucket", pa.int16())])
#: Rows per score bucket (the table's rows over this give the buckets, at most :data:`MAX_BUCKETS`): the reduce
#: sorts one bucket at a time in memory, highest first (:func:`.tables.value_counts`), where one sort of 100M
#: rows spilled to disk. Measured on one ranking's 100M-row spill: 13.5 s in one sort under DuckDB's 256 MB,
#: 5.8 s in 64 buckets of 1.6M rows (7.4 s in 16, 5.9 s in 128).
BUCKET_ROWS = 1_500_000
MAX_BUCKETS = 256
#: LZ4 without dictionary pages: measured on a million rows (4% noise, 500-token sequences), writing takes about
#: half the time of dictionary pages for the kind and sequence codes (the codes' hashing dominated), at the same
#: 8.3 bytes a row on disk (uncompressed: 16), and reads back several times faster.
SPILL_OPTIONS = {"use_dictionary": False, "compression": "lz4"}
#: Counts fields summed over a chunk's sequences (sequence scope; per kind too).
_TOTALS = ("n", "n_noise", "n_top", "found", "n_noisy_seqs", "hits")


def bucket_count(n_rows: int) -> int:
    """How many score buckets a ranking of ``n_rows`` rows is spilled in."""
    return max(1, min(MAX_BUCKETS, math.ceil(n_rows / BUCKET_ROWS)))


def score_edges(scores: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket boundaries: the ``n_buckets``-quantiles of a first chunk's finite scores, each once.

    Bucket b holds ``edges[b - 1] <= score < edges[b]`` (NaN and +inf in the last), so tied scores share a
    bucket and the buckets in descending order, each sorted, are the rows sorted. The boundaries only decide the
    buckets' sizes, never a result: every shard of a ranking must use the same ones, so they are set from the
    first chunk before the map step and handed to each shard (:meth:`RankingSums.shard`).
    """
    finite = scores[np.isfinite(scores)]
    if n_buckets <= 1 or finite.size == 0:
        return np.empty(0)
    return np.unique(np.quantile(finite, np.arange(1, n_buckets) / n_buckets))


#: Cells of :func:`bucket_of`'s lookup table.
_CELLS = 1 << 16


def bucket_of(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each score's bucket, ``np.searchsorted(edges, scores, side="right")`` exactly, in a third of its time.

    A monotone map f (scale the edges' range onto cells, clip, floor) sends each score to a cell; for a score
    whose cell holds no edge's, every edge e has f(e) < f(s) (so e <= s) or f(e) > f(s) (so e > s), and its
    bucket is the number of edge cells below: a table lookup. The few scores in an edge's cell (and NaN) are
    searched. Unsorted keys make ``searchsorted`` branch-bound: 32 ms per million scores among 66 edges, where
    this takes about 10 (the map step does it per chunk and ranking).
    """
    if edges.size < 2 or not edges[-1] > edges[0]:
        return np.searchsorted(edges, scores, side="right")
    scale = _CELLS / (edges[-1] - edges[0])
    edge_cells = _cells(edges, edges[0], scale)
    below = np.searchsorted(edge_cells, np.arange(_CELLS + 2), side="left")  # edges whose cell is below c
    exact = np.zeros(_CELLS + 2, dtype=bool)
    exact[edge_cells] = True
    cells = _cells(scores, edges[0], scale)
    bucket = below[cells]
    search = np.flatnonzero(exact[cells])
    bucket[search] = np.searchsorted(edges, scores[search], side="right")
    return bucket


def _cells(values: np.ndarray, low: float, scale: float) -> np.ndarray:
    """f: monotone in the value (rounded subtraction and multiplication by a positive scale are), NaN to the top."""
    x = np.clip((values - low) * scale, -1.0, _CELLS)
    x[np.isnan(x)] = _CELLS
    return np.floor(x).astype(np.intp) + 1


def write_bucketed(writer: pq.ParquetWriter, columns: dict[str, np.ndarray], edges: np.ndarray) -> None:
    """A chunk's spilled rows (``columns["score"]`` and the rest), one row group per score bucket, in bucket order
    (the row groups' statistics then say each one's bucket: :func:`.tables.bucket_layout`)."""
    bucket = bucket_of(columns["score"], edges).astype(np.int16)
    table = pa.table({**columns, "bucket": bucket}, schema=writer.schema)
    if not edges.size:
        writer.write_table(table)
        return
    order = np.argsort(bucket, kind="stable")
    table = table.take(order)
    bounds = np.searchsorted(bucket[order], np.arange(edges.size + 2))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            writer.write_table(table.slice(lo, hi - lo))


@dataclass
class RunTotals:
    """What does not depend on the method: per sequence its pool tokens and noise, per kind its tokens.

    The per-sequence arrays cover the codes ``first .. first + n_seqs - 1`` (a shard's sequences; all by default).
    """

    n_seqs: int
    n_kinds: int
    first: int = 0
    length: np.ndarray = None
    n_noise: np.ndarray = None
    n_kind: np.ndarray = None
    kind_seqs: np.ndarray = None  # per kind, sequences with a token of it
    kind_noise: np.ndarray = None  # [kinds, sequences]: each sequence's tokens of each kind
    n_rows: int = 0
    excluded_kinds: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.length = np.zeros(self.n_seqs, dtype=np.int64)
        self.n_noise = np.zeros(self.n_seqs, dtype=np.int64)
        self.n_kind = np.zeros(self.n_kinds, dtype=np.int64)
        self.kind_seqs = np.zeros(self.n_kinds, dtype=np.int64)
        self.kind_noise = np.zeros((self.n_kinds, self.n_seqs), dtype=np.int64)

    def add(self, chunk: Chunk) -> None:
        run, pool = chunk.run, chunk.run.pool
        self.n_rows += run.n_tokens
        for kind, n in run.excluded_kinds.items():
            self.excluded_kinds[kind] = self.excluded_kinds.get(kind, 0) + n
        n_local = len(run.seq_names)
        at = chunk.codes - self.first
        self.length[at] += np.bincount(pool.seq_codes, minlength=n_local)
        self.n_noise[at] += np.bincount(pool.seq_codes[pool.is_noise], minlength=n_local)
        kinds = chunk.kind_codes
        noise = kinds >= 0
        self.n_kind += np.bincount(kinds[noise], minlength=self.n_kinds)
        pairs = np.unique(np.stack([kinds[noise].astype(np.int64), pool.seq_codes[noise]]), axis=1)
        self.kind_seqs += np.bincount(pairs[0], minlength=self.n_kinds)
        np.add.at(self.kind_noise, (kinds[noise].astype(np.int64), chunk.seq_codes[noise] - self.first), 1)

    def merge(self, other: "RunTotals") -> None:
        """Add another shard's totals (its sequences are a range of this one's)."""
        at = slice(other.first - self.first, other.first - self.first + other.n_seqs)
        self.length[at] += other.length
        self.n_noise[at] += other.n_noise
        self.kind_noise[:, at] += other.kind_noise
        self.n_kind += other.n_kind
        self.kind_seqs += other.kind_seqs
        self.n_rows += other.n_rows
        for kind, n in other.excluded_kinds.items():
            self.excluded_kinds[kind] = self.excluded_kinds.get(kind, 0) + n

    @property
    def n_clean(self) -> int:
        return int(self.length.sum() - self.n_kind.sum())


@dataclass
class RankingSums:
    """One method × rank-by: its spill files and what is summed per kind over the chunks.

    What is per sequence (weight sums, and the counts at the cut in sequence scope) is written chunk by chunk
    to a second file beside the scores (``<name>-seq.parquet``, one row per sequence: a chunk holds whole
    sequences) and read back by :meth:`load` when this ranking's rows are built, one ranking at a time: the
    map step keeps nothing per sequence, so memory does not grow with the table × the methods.
    """

    spill: Path  # where this process writes its scores
    n_seqs: int
    n_kinds: int
    ks: tuple[float, ...]
    k: float
    sequence: bool  # sequence scope asked for
    first: int = 0  # the first sequence code this copy's chunks hold (a shard's)
    n_buckets: int = 1  # score buckets (bucket_count); edges: their boundaries (score_edges), from the first chunk
    edges: np.ndarray | None = None
    writer: pq.ParquetWriter | None = None
    seq_writer: pq.ParquetWriter | None = None
    w_total: np.ndarray | None = None  # per sequence (after load): the scores' sum
    w_noise: np.ndarray | None = None
    w_clean: np.ndarray | None = None  # per sequence, the clean tokens' scores
    w_kind: np.ndarray | None = None  # [S, kinds]: per sequence and kind, the noise tokens' scores
    seq_fields: np.ndarray | None = None  # [S, SEQUENCE_FIELDS] at k, sequence scope
    seq_totals: np.ndarray | None = None  # [cuts, _TOTALS], sequence scope
    kind_totals: np.ndarray | None = None  # [kinds, _TOTALS] at k, sequence scope

    def __post_init__(self) -> None:
        if self.sequence:
            self.seq_totals = np.zeros((len(self.ks), len(_TOTALS)))
            self.kind_totals = np.zeros((self.n_kinds, len(_TOTALS)))

    @property
    def seq_spill(self) -> Path:
        """Where this process writes the per-sequence sums."""
        return self.spill.with_name(f"{self.spill.stem}-seq.parquet")

    def add(self, chunk: Chunk, s: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> None:
        """One chunk's ranking scores (one per pool token); ``extra``: float64 columns spilled beside them
        (``--stratify``'s variables, :mod:`.strata`)."""
        pool = chunk.run.pool
        y, local, kinds = pool.is_noise, pool.seq_codes, chunk.kind_codes
        extra = extra or {}
        if self.writer is None:
            self.spill.parent.mkdir(parents=True, exist_ok=True)
            schema = pa.schema(list(SPILL_SCHEMA) + [pa.field(name, pa.float64()) for name in extra])
            self.writer = pq.ParquetWriter(self.spill, schema, **SPILL_OPTIONS)
        if self.edges is None:  # a pass that is not sharded (the batch-dependent methods'): its first chunk's
            self.edges = score_edges(s, self.n_buckets)
        write_bucketed(self.writer, {"score": s, "kind": kinds, "seq": chunk.seq_codes.astype(np.int32), **extra},
                       self.edges)
        n_local = len(chunk.run.seq_names)
        # per sequence in row order, as np.bincount sums them over the whole table: the same bits
        columns = {"seq": pa.array(chunk.codes.astype(np.int32)),
                   "w_total": np.bincount(local, weights=s, minlength=n_local),
                   "w_noise": np.bincount(local[y], weights=s[y], minlength=n_local),
                   "w_clean": np.bincount(local[~y], weights=s[~y], minlength=n_local)}
        if self.n_kinds:  # a table without noise has no kinds (and no such column)
            columns["w_kind"] = _rows(np.bincount(local[y] * self.n_kinds + kinds[y], weights=s[y],
                                                  minlength=n_local * self.n_kinds), self.n_kinds)
        if self.sequence:
            columns["seq_fields"] = _rows(self._add_sequence_scope(s, y, local, kinds, n_local).reshape(-1),
                                          len(SEQUENCE_FIELDS))
        table = pa.table(columns)
        if self.seq_writer is None:
            self.seq_writer = pq.ParquetWriter(self.seq_spill, table.schema, compression="none")
        self.seq_writer.write_table(table)

    def _add_sequence_scope(self, s, y, local, kinds, n_local) -> np.ndarray:
        """Adds the chunk's totals at every cut and per kind; returns its per-sequence fields at k."""
        per = per_sequence(s, y, local, n_local, self.ks, "sequence")
        self.seq_totals += _totals(per)
        clean = ~y
        for j in range(self.n_kinds):
            pos = kinds == j
            keep = clean | pos
            if keep.any():
                codes, n_codes = code_layout(local[keep])
                c = evaluate(s[keep], pos[keep], codes, n_codes, (self.k,), "sequence")[self.k]
                self.kind_totals[j] += [getattr(c, name) for name in _TOTALS]
        return per[self.ks.index(self.k)]

    def load(self) -> "RankingSums":
        """Reads every shard's per-sequence sums of this ranking into the arrays (all ``n_seqs`` sequences)."""
        self.w_total, self.w_noise, self.w_clean = (np.zeros(self.n_seqs) for _ in range(3))
        self.w_kind = np.zeros((self.n_seqs, self.n_kinds))
        self.seq_fields = np.zeros((self.n_seqs, len(SEQUENCE_FIELDS))) if self.sequence else None
        name = self.seq_spill.name
        for path in sorted(self.spill.parent.parent.glob(f"*/{name}")):
            table = pq.read_table(path)
            at = table.column("seq").to_numpy()
            for field in ("w_total", "w_noise", "w_clean"):
                getattr(self, field)[at] += table.column(field).to_numpy()  # 0.0 + x: -0.0 read back as 0.0
            if self.n_kinds:
                self.w_kind[at] += _flat(table.column("w_kind"), at.size)
            if self.sequence:
                self.seq_fields[at] += _flat(table.column("seq_fields"), at.size)
        return self

    def release(self) -> None:
        """Drops the arrays :meth:`load` read (the next ranking's take their place)."""
        self.w_total = self.w_noise = self.w_clean = self.w_kind = self.seq_fields = None

    @property
    def clean_w(self) -> float:
        """The clean tokens' scores summed as ``metrics.rows`` sums them (fsum of per-sequence sums)."""
        return math.fsum(self.w_clean)

    @property
    def kind_w(self) -> list[float]:
        """Per kind, its noise tokens' scores summed as ``metrics.rows`` sums them."""
        return [math.fsum(self.w_kind[:, j]) for j in range(self.n_kinds)]

    def close(self) -> None:
        for writer in (self.writer, self.seq_writer):
            if writer is not None:
                writer.close()
        self.writer = self.seq_writer = None

    @property
    def pattern(self) -> Path:
        """Every shard's spill of this ranking: what DuckDB reads (``work/<shard>/<name>``)."""
        return self.spill.parent.parent / "*" / self.spill.name

    def shard(self, folder: str, first: int, n_seqs: int) -> "RankingSums":
        """An empty copy for the sequences ``first .. first + n_seqs - 1``, writing into ``work/<folder>/``."""
        return RankingSums(self.spill.parent.parent / folder / self.spill.name, n_seqs, self.n_kinds, self.ks,
                           self.k, self.sequence, first, self.n_buckets, shard_edges(self.edges))

    def merge(self, other: "RankingSums") -> None:
        """Add a shard's totals (its files stay where they are, matched by :attr:`pattern` and :meth:`load`)."""
        if self.sequence:
            self.seq_totals += other.seq_totals
            self.kind_totals += other.kind_totals

    def __getstate__(self) -> dict:
        return {**self.__dict__, "writer": None, "seq_writer": None}


def shard_edges(edges: np.ndarray | None) -> np.ndarray:
    """A shard's bucket boundaries: the ranking's (one bucket if it has none yet: a shard never picks its own,
    which the other shards' would not match)."""
    return np.empty(0) if edges is None else edges


def _rows(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    """A flat array as rows of ``width`` values (one per sequence)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values), width)


def _flat(column: pa.ChunkedArray, n: int) -> np.ndarray:
    """A column of :func:`_rows` back as [n, width]."""
    return column.combine_chunks().flatten().to_numpy().reshape(n, -1)


def _totals(per: np.ndarray) -> np.ndarray:
    """[cuts, _TOTALS] of per-sequence fields [cuts, S, SEQUENCE_FIELDS]."""
    f = {name: per[:, :, i] for i, name in enumerate(SEQUENCE_FIELDS)}
    return np.stack([f["n"].sum(1), f["n_noise"].sum(1), f["n_top"].sum(1), f["found"].sum(1),
                     f["n_noisy_seqs"].sum(1), f["hits"].sum(1)], axis=1)


def totals_counts(row: np.ndarray) -> metrics.Counts:
    """:class:`Counts` from one row of summed :data:`_TOTALS`."""
    return metrics.Counts(**{name: float(v) if name in ("found", "hits") else int(round(v))
                             for name, v in zip(_TOTALS, row)})


def chunk_weights(method: Method, chunk: Chunk, params: dict | None, rng: np.random.Generator) -> np.ndarray:
    """The method's weights on the chunk, as compare computes them (``rng``: the method's one generator, drawn
    on in table order across chunks, so that a random method gets the whole table's draws)."""
    batch = chunk.batch if getattr(method, "batch_dependent", False) else None
    # with the method's declared loss attached, as compare's (the loss view is ℓ_t: methods.shapes)
    w = compute_viewed(method, chunk.run.stat_columns(), params=params, batch=batch, seed=rng)
    if w.shape != (chunk.run.n_tokens,):
        raise AuditError(f"method {method.name}: returned {w.shape} weights for {chunk.run.n_tokens} tokens; "
                         "a method must return one weight per token")
    return w

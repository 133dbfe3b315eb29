"""The DuckDB side: a connection that spills, the batch-ordered copy, the per-value counts and per-sequence counts.

Every query reads the spilled parquet files in place (a spill in score buckets:
one bucket's row groups at a time, read with Arrow). Results that grow with
the tokens (counts per distinct score) are streamed as Arrow record batches,
never fetched whole; results per sequence are O(sequences).
"""
from __future__ import annotations

import glob
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from queue import Empty, Queue
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation.outofcore.histogram import DescendingCounts

#: DuckDB's memory limit: it spills to the work folder beyond this.
MEMORY_LIMIT = "256MB"
#: The batch-ordered copy's (a wide sort joined to the batch of each sequence, rows kept in order): at 256 MB
#: DuckDB could not pin its blocks on a 100M-row table (an out-of-memory error), at 1 GB it ran.
COPY_MEMORY_LIMIT = "1GB"
_FETCH_ROWS = 1 << 20
#: A score bucket past this many rows is sorted by DuckDB from the files (spilling), not read into memory.
BUCKET_SORT_ROWS = 8_000_000


@contextmanager
def connect(work: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-process DuckDB that keeps under :data:`MEMORY_LIMIT` and spills into ``work``; a DuckDB error
    inside (out of memory, out of disk) becomes one line that says what to do."""
    con = duckdb.connect(":memory:")
    tmp = work / "duckdb_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
    con.execute(f"SET threads = {max(1, os.cpu_count() or 1)}")
    con.execute(f"SET temp_directory = '{_quote(tmp)}'")
    # every query here orders its result itself (or has no order): let DuckDB sort and scan without keeping row
    # order (measured about a quarter faster); the batch-ordered copy turns it back on for its COPY
    con.execute("SET preserve_insertion_order = false")
    try:
        yield con
    except duckdb.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AuditError(f"{work}: the DuckDB engine failed: {first}; free memory or disk space for its work "
                         "folder (or give -o on a larger disk), or use --engine memory for a table that fits "
                         "in memory") from None
    finally:
        con.close()


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def batch_ordered_copy(con: duckdb.DuckDBPyConnection, source: Path, seq_ids: list[str], batch_of_seq: np.ndarray,
                       target: Path, columns: list[str]) -> None:
    """``columns`` of ``source``, rows sorted by their sequence's simulated batch (table order within a batch),
    with ``_batch``."""
    con.register("_seq_batch", pa.table({"_sid": pa.array(seq_ids, pa.string()), "_batch": batch_of_seq}))
    con.execute("SET preserve_insertion_order = true")  # the file's rows in the ORDER BY's order
    con.execute(f"SET memory_limit = '{COPY_MEMORY_LIMIT}'")
    keep = ", ".join("t." + '"' + c.replace('"', '""') + '"' for c in columns)
    con.execute(f"""COPY (SELECT {keep}, m._batch
                          FROM read_parquet('{_quote(source)}', file_row_number = true) t
                          JOIN _seq_batch m ON CAST(t.seq_id AS VARCHAR) = m._sid
                          ORDER BY m._batch, t.file_row_number)
                    TO '{_quote(target)}' (FORMAT parquet)""")
    con.execute("SET preserve_insertion_order = false")
    con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
    con.unregister("_seq_batch")


def value_counts(con: duckdb.DuckDBPyConnection, spill: Path, counts: DescendingCounts, n_kinds: int,
                 where: str = "", kind_columns: list[str] | None = None, tally: "SequenceTally | None" = None) -> None:
    """Feed ``counts`` the clean and per-kind tokens at every distinct score, highest first, batch by batch.

    ``where``: a condition on the rows (""; all); ``kind_columns``: the positives' conditions (default: each
    kind). DuckDB sorts the rows (:func:`_descending`: one score bucket at a time); each streamed batch is counted
    per distinct score here, the last score of a batch carried to the next (it may continue there). ``tally``: the
    per-sequence counts above and tied at cuts, taken in the same pass (the rows' sequence codes streamed too).
    """
    conds = kind_columns if kind_columns is not None else [f"kind = {j}" for j in range(n_kinds)]
    label = " ".join(["CASE WHEN kind < 0 THEN 0"] + [f"WHEN {c} THEN {j + 1}" for j, c in enumerate(conds)]
                     + ["ELSE -1 END"])
    seq = ", seq" if tally is not None else ""
    query = f"""SELECT score, ({label})::SMALLINT AS label{seq} FROM {{rows}} {f"WHERE {where}" if where else ""}
                ORDER BY score DESC"""
    carry = None
    for batch in _batches(_descending(con, spill, query)):
        score, labels = batch.column(0).to_numpy(), batch.column(1).to_numpy()
        value, table = _distinct_counts(score, labels, len(conds) + 1)
        if carry is not None and value[0] == carry[0]:
            table[:, 0] += carry[1]
        elif carry is not None:
            counts.feed(np.array([carry[0]]), carry[1][:1], carry[1][1:, None])
        if value.size > 1:
            counts.feed(value[:-1], table[0, :-1], table[1:, :-1])
        carry = (value[-1], table[:, -1].copy())
        if tally is not None:
            tally.batch(counts, score, labels, batch.column(2).to_numpy())
    if carry is not None:
        counts.feed(np.array([carry[0]]), carry[1][:1], carry[1][1:, None])
    if tally is not None:
        tally.finish(counts)


def _descending(con: duckdb.DuckDBPyConnection, spill: Path, query: str) -> Iterator[pa.RecordBatch]:
    """``query``'s rows (``{rows}``: the rows it reads) sorted, highest score first.

    A spill written in score buckets (:func:`bucket_layout`) is sorted one bucket at a time, highest first:
    each bucket's row groups read with Arrow and sorted by DuckDB in memory, where one sort of every row would
    spill to disk (about 2.3 times as long at 100M rows). A bucket over :data:`BUCKET_SORT_ROWS` (scores far
    from the first chunk's quantiles) and a spill without buckets are sorted by DuckDB from the files, spilling.
    """
    files = sorted(glob.glob(str(spill)))
    layout = bucket_layout(files)
    if layout is None:
        yield from con.sql(query.format(rows=f"read_parquet('{_quote(spill)}')")).to_arrow_reader(_FETCH_ROWS)
        return
    readers = {path: pq.ParquetFile(path, pre_buffer=False) for path in files}  # pre_buffer: chunks._open
    for bucket in sorted(layout, reverse=True):
        parts = layout[bucket]
        if sum(n for _, _, n in parts) > BUCKET_SORT_ROWS:
            names = ", ".join(f"'{_quote(Path(path))}'" for path in files)
            rows = f"(SELECT * FROM read_parquet([{names}]) WHERE bucket = {bucket})"
            yield from con.sql(query.format(rows=rows)).to_arrow_reader(_FETCH_ROWS)
            continue
        con.register("_bucket_rows", pa.concat_tables(readers[path].read_row_groups(groups) for path, groups, _ in parts))
        try:
            yield from con.sql(query.format(rows="_bucket_rows")).to_arrow_reader(_FETCH_ROWS)
        finally:
            con.unregister("_bucket_rows")


def bucket_layout(files: list[str]) -> dict[int, list[tuple[str, list[int], int]]] | None:
    """Per score bucket, each file's row groups of it and their rows; None unless every row group of every file
    holds one bucket (its statistics' min = max), as :func:`.accumulate.write_bucketed` writes them."""
    layout: dict[int, list[tuple[str, list[int], int]]] = {}
    for path in files:
        meta = pq.ParquetFile(path, pre_buffer=False).metadata
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if "bucket" not in names:
            return None
        at, mine = names.index("bucket"), {}
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(at).statistics
            if meta.row_group(g).num_rows == 0:
                continue
            if stats is None or not stats.has_min_max or stats.min != stats.max:
                return None
            groups, rows = mine.get(stats.min, ([], 0))
            mine[stats.min] = (groups + [g], rows + meta.row_group(g).num_rows)
        for bucket, (groups, rows) in mine.items():
            layout.setdefault(int(bucket), []).append((path, groups, rows))
    return layout or None


class SequenceTally:
    """Per sequence code, the tokens above and tied at cuts found by :func:`value_counts`, in its sorted pass.

    A watch ``(name, pool, k, labels)`` asks, once ``counts.cut(pool, k)`` is known (value v), for the rows whose
    label is in ``labels`` (0: clean, 1 + j: the j-th positive set) scoring above v (``<name>_above``) and exactly
    v (``<name>_tied``). Streamed highest first, rows above v are the rows
    before v's: per label, the rows of finished scores are summed per sequence (``done``), those of the score
    still running on from the last batch apart (``run``, at ``run_value``); nothing is kept once every watch is
    answered.
    """

    def __init__(self, n_seqs: int, n_labels: int, watches: list[tuple[str, int, float, list[int]]]):
        self.n_seqs, self.n_labels = n_seqs, n_labels
        self.watches = list(watches)
        self.done = np.zeros((n_labels, n_seqs), dtype=np.int64)
        self.run = np.zeros((n_labels, n_seqs), dtype=np.int64)
        self.run_value = None
        self.out: dict[str, np.ndarray] = {}

    def _per_seq(self, labels: np.ndarray, seq: np.ndarray) -> np.ndarray:
        keep = labels >= 0
        flat = labels[keep].astype(np.int64) * self.n_seqs + seq[keep]
        return np.bincount(flat, minlength=self.n_labels * self.n_seqs).reshape(self.n_labels, self.n_seqs)

    def _answer(self, counts: DescendingCounts, score: np.ndarray, labels: np.ndarray, seq: np.ndarray) -> None:
        """The watches whose cut is now known (its value at or above the batch's last; ``score``: the batch)."""
        pending = []
        for name, pool, k, sel in self.watches:
            pc = counts.pools[pool].found.get(k)
            if pc is None:
                pending.append((name, pool, k, sel))
                continue
            if pc.cut.n_top == 0:  # an empty top set: nothing above or tied that counts
                self.out[f"{name}_above"] = self.out[f"{name}_tied"] = np.zeros(self.n_seqs, dtype=np.int32)
                continue
            v = pc.cut.value
            lo = int(np.searchsorted(-score, -v, side="left"))  # first row at v (descending)
            hi = int(np.searchsorted(-score, -v, side="right"))
            above = self.done[sel].sum(axis=0)
            tied = np.zeros(self.n_seqs, dtype=np.int64)
            if self.run_value is not None and self.run_value > v:
                above += self.run[sel].sum(axis=0)
            elif self.run_value is not None and self.run_value == v:
                tied += self.run[sel].sum(axis=0)
            above += self._per_seq(labels[:lo], seq[:lo])[sel].sum(axis=0)
            tied += self._per_seq(labels[lo:hi], seq[lo:hi])[sel].sum(axis=0)
            # int32 (a sequence's tokens): a sweep holds every noise set's counts of one ranking at once
            self.out[f"{name}_above"], self.out[f"{name}_tied"] = above.astype(np.int32), tied.astype(np.int32)
        self.watches = pending

    def batch(self, counts: DescendingCounts, score: np.ndarray, labels: np.ndarray, seq: np.ndarray) -> None:
        """One streamed batch, after ``counts`` was fed every score of it but the last."""
        self._answer(counts, score, labels, seq)
        if not self.watches:
            return
        last = score[-1]
        start = int(np.searchsorted(-score, -last, side="left"))  # the last score's rows: a run that may go on
        if self.run_value is not None and self.run_value != last:
            self.done += self.run
            self.run[:] = 0
        if start:
            self.done += self._per_seq(labels[:start], seq[:start])
        self.run += self._per_seq(labels[start:], seq[start:])
        self.run_value = last

    def finish(self, counts: DescendingCounts) -> None:
        """After the last feed: the watches at the last score (its rows all in ``run``)."""
        empty = np.zeros(0)
        self._answer(counts, empty, np.zeros(0, dtype=np.int16), np.zeros(0, dtype=np.int32))
        for name, *_ in self.watches:  # a cut never reached (no rows): nothing above or tied
            self.out[f"{name}_above"] = self.out[f"{name}_tied"] = np.zeros(self.n_seqs, dtype=np.int32)


def _distinct_counts(score: np.ndarray, label: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct scores of a descending run and, per label (0: clean, 1 + j: the j-th positive set), the rows at each."""
    start = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])
    group = np.repeat(np.arange(start.size), np.diff(np.r_[start, score.size]))
    keep = label >= 0  # rows in none of the sets (another kind, for a kind's pool) count nowhere
    table = np.bincount(label[keep].astype(np.int64) * start.size + group[keep], minlength=n_labels * start.size)
    return score[start], table.reshape(n_labels, start.size)


def _batches(reader: pa.RecordBatchReader, ahead: int = 2) -> Iterator[pa.RecordBatch]:
    """The reader's non-empty batches, fetched by a thread up to ``ahead`` batches in advance: DuckDB produces
    the next sorted batch (without the GIL) while this thread counts the last one."""
    queue: Queue = Queue(maxsize=ahead)
    done = object()
    stop = threading.Event()

    def fetch() -> None:
        try:
            for batch in reader:
                if stop.is_set():
                    return
                if batch.num_rows:
                    queue.put(batch)
            queue.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, raised there
            queue.put(exc)

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue, then let it end
            with suppress(Empty):
                queue.get(timeout=0.05)

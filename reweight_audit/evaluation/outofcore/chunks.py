"""A stats table read in sequence-aligned chunks: one light pre-pass, then chunks loaded and checked like a table.

The pre-pass (:func:`scan_table`) reads only ``seq_id``, ``is_noise`` and
``noise_kind`` and keeps what is per sequence or per kind: the sequence codes
(first appearance, as :func:`reweight_audit.evaluation.runs.load_run` numbers
them), the noise kinds (sorted, as there) and whether every sequence's rows are
contiguous. :func:`shard_ranges` cuts the rows into ranges of whole
sequences and :func:`read_rows` reads one (only the row groups that hold it).
A chunk is a
:class:`~reweight_audit.evaluation.runs.RunData` (loaded by ``load_run``, so
every check of a table applies to it) plus its sequences' global codes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation.runs import EXCLUDED_KINDS, REQUIRED_COLUMNS, RunData, StatsTable, load_run

#: Rows per chunk (whole sequences or batches are added until a chunk has at least this many).
CHUNK_ROWS = 1 << 20
_READ_ROWS = 1 << 16  # rows per parquet read (a chunk gathers several)


@dataclass
class TableScan:
    """What the pre-pass learns about a stats table: sequences, kinds, size, layout."""

    path: Path
    n_rows: int = 0
    seq_code: dict[str, int] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)
    contiguous: bool = True
    columns: tuple[str, ...] = ()
    seq_starts: list[int] = field(default_factory=list)  # the row where each sequence starts (code order)
    token_digest: str | None = None  # sha256 of token_id as compare decodes it (None: no such column)

    @property
    def n_seqs(self) -> int:
        return len(self.seq_code)


def parquet_rows(path: Path) -> int:
    """The table's rows from its footer (no data read); 0 when it cannot be read (the loader says why later)."""
    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception:  # noqa: BLE001 - any unreadable file is reported by load_run with its reason
        return 0


def _open(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise AuditError(f"{path}: file not found; give the stats.parquet written by `reweight-audit score`")
    try:
        # pre_buffer off: with it, iter_batches keeps every range it read cached until the reader closes
        # (measured: Arrow's allocation grew ~10 MB per million rows read; flat without it)
        return pq.ParquetFile(path, pre_buffer=False)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for non-parquet input
        raise AuditError(f"{path}: not a readable parquet file ({type(exc).__name__}); give the stats.parquet "
                         "written by `reweight-audit score`") from None


def scan_table(path: Path) -> TableScan:
    """The pre-pass: sequence codes in order of first appearance, the noise kinds, contiguity (O(sequences))."""
    pf = _open(path)
    names = pf.schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise AuditError(f"{path}: not a reweight-audit stats table, missing column(s) {', '.join(missing)}; "
                         "rerun `reweight-audit score` to write the current format")
    scan = TableScan(path, int(pf.metadata.num_rows), columns=tuple(names))
    kinds: set[str] = set()
    last, row = None, 0
    read = ["seq_id", "is_noise"] + [c for c in ("noise_kind", "token_id") if c in names]
    digest = hashlib.sha256() if "token_id" in names else None
    for batch in pf.iter_batches(batch_size=_READ_ROWS, columns=read):
        if digest is not None:
            digest.update(_decoded(batch.column("token_id"), pf.schema_arrow.field("token_id").type).tobytes())
        ids = batch.column("seq_id").cast(pa.string()).to_numpy(zero_copy_only=False).astype(object)
        last = _scan_sequences(scan, ids, last, row)
        row += batch.num_rows
        if "noise_kind" in names:
            kinds |= _noise_kinds(batch)
        elif pc.any(batch.column("is_noise").cast(pa.bool_())).as_py():
            kinds.add("unlabelled")
    scan.kinds = sorted(kinds)
    scan.token_digest = None if digest is None else digest.hexdigest()
    return scan


def _decoded(column: pa.Array, kind: pa.DataType) -> np.ndarray:
    """A numeric column as :meth:`RunData.column` decodes it: int64 when whole numbers without nulls, else float64."""
    if pa.types.is_integer(kind) and not column.null_count:
        return np.ascontiguousarray(column.to_numpy().astype(np.int64, copy=False))
    return np.ascontiguousarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False))


def _scan_sequences(scan: TableScan, ids: np.ndarray, last: str | None, row: int) -> str | None:
    """Codes for new sequence ids; a sequence seen before, after another one, makes the table non-contiguous.

    Only the rows where the id changes are looked at (one Python step per sequence, not per token)."""
    if not ids.size:
        return last
    codes = scan.seq_code
    change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    starts = change if ids[0] == last else np.r_[0, change]
    for i in starts.tolist():
        sid = ids[i]
        if sid in codes:
            scan.contiguous = False
        else:
            codes[sid] = len(codes)
            scan.seq_starts.append(row + i)
    return ids[-1]


def _noise_kinds(batch: pa.RecordBatch) -> set[str]:
    """The kind names of the noise rows (not of an excluded kind), "" as "unlabelled", as ``load_run`` names them."""
    noise = np.asarray(batch.column("is_noise").fill_null(False).cast(pa.bool_()).to_numpy(zero_copy_only=False))
    kind = batch.column("noise_kind").cast(pa.string()).fill_null("").to_numpy(zero_copy_only=False)
    kind = kind[noise]
    return {str(k) if k else "unlabelled" for k in np.unique(kind) if k not in EXCLUDED_KINDS}


@dataclass
class Chunk:
    """Whole sequences of a table, loaded and checked; ``codes`` maps the chunk's sequence codes to the table's."""

    run: RunData
    codes: np.ndarray  # chunk code -> table code
    kind_map: np.ndarray  # chunk kind code -> table kind code
    batch: np.ndarray | None = None  # per row, its simulated batch (batch_chunks only)

    @property
    def seq_codes(self) -> np.ndarray:
        """Per pool token, its table sequence code."""
        return self.codes[self.run.pool.seq_codes]

    @property
    def kind_codes(self) -> np.ndarray:
        """Per pool token, its table kind code (-1: clean)."""
        local = self.run.pool.kind_codes
        if not self.kind_map.size:  # no noise in the chunk
            return np.full(local.size, -1, dtype=np.int16)
        return np.where(local >= 0, self.kind_map[np.maximum(local, 0)], -1).astype(np.int16)


def make_chunk(table: pa.Table, scan: TableScan, batch: np.ndarray | None = None) -> Chunk:
    """One chunk as a checked :class:`RunData` (its messages name the table's file) and its code maps."""
    run = load_run(StatsTable(table, str(scan.path)))
    run.path = scan.path
    codes = np.fromiter((scan.seq_code[s] for s in run.seq_names), dtype=np.int64, count=len(run.seq_names))
    kind_map = np.array([scan.kinds.index(k) for k in run.kinds], dtype=np.int16)
    return Chunk(run, codes, kind_map, batch)


def shard_ranges(scan: TableScan, rows: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of whole sequences, each of at least ``rows`` rows (the last may be smaller)."""
    ranges, start = [], 0
    for begin in scan.seq_starts[1:] + [scan.n_rows]:
        if begin - start >= rows or begin == scan.n_rows:
            ranges.append((start, begin))
            start = begin
    return [r for r in ranges if r[1] > r[0]]


def read_rows(path: Path, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows ``[start, stop)`` of a parquet file, reading only the row groups that hold them."""
    pf = pq.ParquetFile(path)
    groups, first, at = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if at < stop and at + n > start:
            groups.append(g)
            first = at if first is None else first
        at += n
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - first, stop - start)


def code_range(scan: TableScan, start: int, stop: int) -> tuple[int, int]:
    """The sequence codes ``[first, end)`` of the whole sequences in rows ``[start, stop)``."""
    starts = np.asarray(scan.seq_starts)
    return int(np.searchsorted(starts, start)), int(np.searchsorted(starts, stop))

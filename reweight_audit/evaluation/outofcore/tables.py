"""The DuckDB side: a connection that spills, the batch-ordered copy, the per-value counts and per-sequence counts.

Every query reads the spilled parquet files in place. Results that grow with
the tokens (counts per distinct score) are streamed as Arrow record batches,
never fetched whole; results per sequence are O(sequences).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from reweight_audit.evaluation.outofcore.histogram import DescendingCounts, PoolCut

#: DuckDB's memory limit: it spills to the work folder beyond this.
MEMORY_LIMIT = "1GB"
_FETCH_ROWS = 1 << 18


def connect(work: Path) -> duckdb.DuckDBPyConnection:
    """An in-process DuckDB that keeps under :data:`MEMORY_LIMIT` and spills into ``work``."""
    con = duckdb.connect(":memory:")
    tmp = work / "duckdb_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
    con.execute(f"SET threads = {max(1, os.cpu_count() or 1)}")
    con.execute(f"SET temp_directory = '{_quote(tmp)}'")
    con.execute("SET preserve_insertion_order = true")
    return con


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def batch_ordered_copy(con: duckdb.DuckDBPyConnection, source: Path, seq_ids: list[str], batch_of_seq: np.ndarray,
                       target: Path, columns: list[str]) -> None:
    """``columns`` of ``source``, rows sorted by their sequence's simulated batch (table order within a batch),
    with ``_batch``."""
    con.register("_seq_batch", pa.table({"_sid": pa.array(seq_ids, pa.string()), "_batch": batch_of_seq}))
    keep = ", ".join("t." + '"' + c.replace('"', '""') + '"' for c in columns)
    con.execute(f"""COPY (SELECT {keep}, m._batch
                          FROM read_parquet('{_quote(source)}', file_row_number = true) t
                          JOIN _seq_batch m ON CAST(t.seq_id AS VARCHAR) = m._sid
                          ORDER BY m._batch, t.file_row_number)
                    TO '{_quote(target)}' (FORMAT parquet)""")
    con.unregister("_seq_batch")


def value_counts(con: duckdb.DuckDBPyConnection, spill: Path, counts: DescendingCounts, n_kinds: int,
                 where: str = "", kind_columns: list[str] | None = None) -> None:
    """Feed ``counts`` the clean and per-kind tokens at every distinct score, highest first, batch by batch.

    ``where``: a condition on the rows (""; all); ``kind_columns``: the positives' conditions (default: each
    kind). DuckDB sorts the rows (spilling to disk past its memory limit); each streamed batch is counted per
    distinct score here, the last score of a batch carried to the next (it may continue there).
    """
    conds = kind_columns if kind_columns is not None else [f"kind = {j}" for j in range(n_kinds)]
    label = " ".join(["CASE WHEN kind < 0 THEN 0"] + [f"WHEN {c} THEN {j + 1}" for j, c in enumerate(conds)]
                     + ["ELSE -1 END"])
    reader = con.sql(f"""SELECT score, ({label})::SMALLINT AS label
                         FROM read_parquet('{_quote(spill)}') {f"WHERE {where}" if where else ""}
                         ORDER BY score DESC""").to_arrow_reader(_FETCH_ROWS)
    carry = None
    for batch in _batches(reader):
        value, table = _distinct_counts(batch.column(0).to_numpy(), batch.column(1).to_numpy(), len(conds) + 1)
        if carry is not None and value[0] == carry[0]:
            table[:, 0] += carry[1]
        elif carry is not None:
            counts.feed(np.array([carry[0]]), carry[1][:1], carry[1][1:, None])
        if value.size > 1:
            counts.feed(value[:-1], table[0, :-1], table[1:, :-1])
        carry = (value[-1], table[:, -1].copy())
    if carry is not None:
        counts.feed(np.array([carry[0]]), carry[1][:1], carry[1][1:, None])


def _distinct_counts(score: np.ndarray, label: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct scores of a descending run and, per label (0: clean, 1 + j: the j-th positive set), the rows at each."""
    start = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])
    group = np.repeat(np.arange(start.size), np.diff(np.r_[start, score.size]))
    keep = label >= 0  # rows in none of the sets (another kind, for a kind's pool) count nowhere
    table = np.bincount(label[keep].astype(np.int64) * start.size + group[keep], minlength=n_labels * start.size)
    return score[start], table.reshape(n_labels, start.size)


def _batches(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    for batch in reader:
        if batch.num_rows:
            yield batch


def sequence_counts_at(con: duckdb.DuckDBPyConnection, spill: Path, n_seqs: int, main: PoolCut,
                       noise_cuts: list[PoolCut], kind_cuts: list[PoolCut]) -> dict[str, np.ndarray]:
    """Per sequence code: tokens above/tied at the main cut, noise above/tied at every cut of ``noise_cuts``, and
    kind j's tokens above/tied at its pool's cut ``kind_cuts[j]``; ``[n_seqs]`` arrays."""
    specs = [(f"n{i}", "kind >= 0", pc.cut.value) for i, pc in enumerate(noise_cuts)]
    specs += [(f"k{j}", f"kind = {j}", pc.cut.value) for j, pc in enumerate(kind_cuts)]
    # the noise columns from the noise rows alone (a few percent of the table): one small GROUP BY
    return {**above_tied(con, spill, n_seqs, [("all", "", main.cut.value)]),
            **above_tied(con, spill, n_seqs, specs, where="kind >= 0")}


def above_tied(con: duckdb.DuckDBPyConnection, spill: Path, n_seqs: int,
               specs: list[tuple[str, str, float]], where: str = "") -> dict[str, np.ndarray]:
    """Per sequence code, for each ``(name, condition, value)``: the tokens meeting the SQL condition ("": all)
    that score above ``value`` (``<name>_above``) and exactly ``value`` (``<name>_tied``); one GROUP BY seq."""
    columns, params = [], []
    for name, condition, value in specs:
        cond = f"{condition} AND " if condition else ""
        columns.append(f"count(*) FILTER (WHERE {cond}score > ?) AS {name}_above")
        columns.append(f"count(*) FILTER (WHERE {cond}score = ?) AS {name}_tied")
        params.extend([float(value), float(value)])
    rows = f"WHERE {where}" if where else ""
    table = con.sql(f"SELECT seq, {', '.join(columns)} FROM read_parquet('{_quote(spill)}') {rows} GROUP BY seq",
                    params=params).to_arrow_table()
    seq = table.column("seq").to_numpy()
    out = {}
    for name in table.column_names[1:]:
        full = np.zeros(n_seqs, dtype=np.int64)
        full[seq] = table.column(name).to_numpy()
        out[name] = full
    return out

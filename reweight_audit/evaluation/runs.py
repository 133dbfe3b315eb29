"""Loading runs: a ``score`` stats table read, validated and decoded once for ``compare``.

:func:`load_run` turns ``stats.parquet`` (and its manifest, when present),
or a :class:`StatsTable` already in memory, into a :class:`RunData`: sequence and noise-kind codes, the noise labels, and
the numeric columns a weighting method may read. Any problem with the file is
one :class:`AuditError` line naming it. Table format: ``docs/formats.md``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reweight_audit.core.spans import AFTER_ERROR, WRONG_STEP
from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import read_manifest

#: Columns every stats table must have (identity and labels).
REQUIRED_COLUMNS = ("seq_id", "pos", "token", "logp", "is_noise")
#: Columns never handed to a weighting method: the noise labels are what the methods are judged against.
LABEL_COLUMNS = ("is_noise", "noise_kind")
#: Span kinds whose tokens are neither noise nor clean: compare leaves them out of both classes, out of every
#: metric, after the weights were computed on the full table (``docs/metrics.md``, "Tokens left out").
EXCLUDED_KINDS = (AFTER_ERROR,)
#: Span kinds that are real errors a person marked, not injected noise (the reports say so).
REAL_ERROR_KINDS = (WRONG_STEP,)
#: The statistics ``score`` writes, by name: a table may lack any of them, but one it has must be numbers.
KNOWN_NUMERIC_COLUMNS = ("logp", "entropy", "rank", "expected_rank", "topk_entropy", "sum_p2", "ref_logp", "token_id",
                         "seq_len")
#: Lowest possible value of a known statistic and why (a float32 rounding of TOLERANCE below it is accepted).
LOWER_BOUNDS = {
    "entropy": (0.0, "entropy is at least 0 nats"),
    "topk_entropy": (0.0, "entropy is at least 0 nats"),
    "rank": (1.0, "a rank counts from 1 (1: the target is the most likely token)"),
    "expected_rank": (1.0, "an expected rank E[R] is at least 1"),
}
#: Known statistics that count something: whole numbers.
WHOLE_NUMBER_COLUMNS = ("rank", "token_id", "seq_len")
#: Slack below a lower bound: float32 sums of a near-certain distribution round a little below it.
TOLERANCE = 1e-4
#: Columns derived from the table when it lacks them: ``seq_len``, the sequence's rows (its supervised tokens),
#: for the position control and ``--stratify position|length``; ``seq_code``, the sequence's code (for methods
#: whose parameter takes a per-sequence statistic: talr.tau=per-sequence, deft-cayley.micro_batch_seqs).
DERIVED_COLUMNS = ("seq_len", "seq_code")


class StatColumns(Mapping):
    """The run's numeric columns as float64/int64 numpy arrays, decoded on first use."""

    def __init__(self, run: "RunData"):
        self._run = run

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._run.numeric_columns:
            raise KeyError(name)
        return self._run.column(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._run.numeric_columns)

    def __len__(self) -> int:
        return len(self._run.numeric_columns)


@dataclass(frozen=True)
class Pool:
    """The tokens the metrics see: every row but those of :data:`EXCLUDED_KINDS` (or a subset of them).

    ``rows`` indexes the table (None: every row); the arrays are the run's, taken at ``rows``.
    """

    rows: np.ndarray | None
    is_noise: np.ndarray
    seq_codes: np.ndarray
    kind_codes: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.is_noise.size)

    def take(self, values: np.ndarray) -> np.ndarray:
        """``values`` (one per table row) at the pool's rows."""
        return values if self.rows is None else values[self.rows]

    def subset(self, keep: np.ndarray) -> "Pool":
        """The pool's tokens where ``keep`` (a bool per pool token) holds."""
        where = np.flatnonzero(keep)
        rows = where if self.rows is None else self.rows[where]
        return Pool(rows, self.is_noise[where], self.seq_codes[where], self.kind_codes[where])


@dataclass
class StatsTable:
    """A stats table already in memory (the Python API's DataFrame), loaded and checked like a file.

    ``name`` stands where a file's path would in labels and messages.
    """

    table: pa.Table
    name: str
    manifest: dict | None = None

    def __str__(self) -> str:
        return self.name


#: What ``compare`` reads: a stats.parquet path or a table in memory.
StatsSource = Union[Path, str, StatsTable]


@dataclass
class RunData:
    """One stats table, decoded once."""

    label: str
    path: Path  # the file, or for a table in memory its name
    manifest: dict | None
    table: pa.Table
    seq_codes: np.ndarray  # int64 code per token
    seq_names: list[str]  # code -> seq_id
    is_noise: np.ndarray  # bool
    kind_codes: np.ndarray  # int32, -1 for clean tokens
    kinds: list[str]  # code -> noise kind
    numeric_columns: tuple[str, ...]
    excluded: np.ndarray | None = None  # bool per token: a kind of EXCLUDED_KINDS (None: none)
    excluded_kinds: dict[str, int] = field(default_factory=dict)  # kind -> tokens left out
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def n_tokens(self) -> int:
        return int(self.table.num_rows)

    @property
    def columns(self) -> set[str]:
        return set(self.table.column_names)

    def column(self, name: str) -> np.ndarray:
        arr = self._cache.get(name)
        if arr is None and name == "seq_len" and name not in self.table.column_names:
            arr = self._cache[name] = np.bincount(self.seq_codes)[self.seq_codes].astype(np.int64)
        if arr is None and name == "seq_code" and name not in self.table.column_names:
            arr = self._cache[name] = self.seq_codes
        if arr is None:
            col = self.table.column(name)
            if pa.types.is_floating(col.type) or (pa.types.is_integer(col.type) and col.null_count):
                # nulls become NaN, which compute_weights reports against the method and column
                arr = col.cast(pa.float64()).to_numpy()
            elif pa.types.is_integer(col.type):
                arr = col.to_numpy().astype(np.int64, copy=False)
            elif pa.types.is_boolean(col.type):
                arr = col.fill_null(False).to_numpy()
            else:
                arr = col.to_numpy()
            self._cache[name] = arr
        return arr

    def stat_columns(self) -> Mapping[str, np.ndarray]:
        return StatColumns(self)

    @cached_property
    def pool(self) -> Pool:
        """The tokens every metric is computed on: all rows but the excluded ones."""
        if self.excluded is None:
            return Pool(None, self.is_noise, self.seq_codes, self.kind_codes)
        rows = np.flatnonzero(~self.excluded)
        return Pool(rows, self.is_noise[rows], self.seq_codes[rows], self.kind_codes[rows])

    def summary(self) -> dict:
        """The run's counts over its pool (``n_tokens``: tokens the metrics see; ``n_excluded``: rows left out)."""
        pool = self.pool
        n = pool.n_tokens
        n_noise = int(pool.is_noise.sum())
        n_codes = len(self.seq_names)
        noisy_seq = np.bincount(pool.seq_codes[pool.is_noise], minlength=n_codes) > 0
        kind_counts = np.bincount(pool.kind_codes[pool.kind_codes >= 0], minlength=len(self.kinds))
        return {
            "label": self.label,
            "path": str(self.path),
            "model": (self.manifest or {}).get("model"),
            "n_tokens": n,
            "n_noise": n_noise,
            "n_seqs": int(np.count_nonzero(np.bincount(pool.seq_codes, minlength=n_codes))),
            "n_noise_seqs": int(noisy_seq.sum()),
            "base_rate": n_noise / n if n else math.nan,
            "noise_kinds": {k: int(c) for k, c in zip(self.kinds, kind_counts)},
            "n_excluded": self.n_tokens - n,
            "excluded_kinds": dict(self.excluded_kinds),
            "columns": sorted(self.columns),
        }


# --------------------------------------------------------------------------- loading


def load_run(source: StatsSource, label: str | None = None) -> RunData:
    """Read and validate one stats table. Raises AuditError on any problem."""
    if isinstance(source, StatsTable):
        path, manifest = Path(source.name), source.manifest
        table = _check_table(source.table, path)
    else:
        path = Path(source)
        table = _read_table(path)
        manifest = read_manifest(path)
    seq_codes, seq_names = _dictionary_codes(table.column("seq_id").cast(pa.string()))
    is_noise = table.column("is_noise").fill_null(False).to_numpy(zero_copy_only=False).astype(bool, copy=False)
    excluded, excluded_kinds = _excluded_rows(table)
    if excluded is not None:
        is_noise = is_noise & ~excluded
    kind_codes, kinds = _kind_codes(table, is_noise)
    run = RunData(
        label=label or "",
        path=path,
        manifest=manifest,
        table=table,
        seq_codes=seq_codes.astype(np.int64, copy=False),
        seq_names=[str(s) for s in seq_names],
        is_noise=is_noise,
        kind_codes=kind_codes,
        kinds=kinds,
        numeric_columns=_method_columns(table),
        excluded=excluded,
        excluded_kinds=excluded_kinds,
    )
    _check_unique_tokens(run)
    _check_statistics(run)
    logp = run.column("logp")
    bad = ~np.isfinite(logp)
    if bad.any():
        raise AuditError(f"{path}: column logp has {int(bad.sum())} non-finite value(s); rerun `reweight-audit score`")
    if logp.max() > 1e-3:
        raise AuditError(f"{path}: column logp has positive values (max {logp.max():.3g}); logp must be log p ≤ 0")
    return run


def _check_unique_tokens(run: RunData) -> None:
    """Each ``(seq_id, pos)`` once: a table stacked twice (or scored from duplicate ids) would count tokens twice."""
    pos = run.column("pos").astype(np.int64, copy=False)
    if pos.size and pos.min() < 0:
        raise AuditError(f"{run.path}: column pos has negative values; rerun `reweight-audit score`")
    key = run.seq_codes * (int(pos.max()) + 1 if pos.size else 1) + pos
    order = np.argsort(key, kind="stable")
    repeated = order[1:][key[order][1:] == key[order][:-1]]
    if repeated.size:
        first = ", ".join(f"({run.seq_names[run.seq_codes[i]]!r}, {int(pos[i])})" for i in np.sort(repeated)[:3])
        raise AuditError(f"{run.path}: {repeated.size} token row(s) repeat a (seq_id, pos) pair, first {first}; "
                         "each token must appear once (a table concatenated twice, or scored from duplicate ids): "
                         "rerun `reweight-audit score` on input with unique ids")


def _bad_values(run: RunData, name: str, bad: np.ndarray, problem: str, meaning: str) -> None:
    """One line naming the file, the column, how many rows, the first one and its value, and what to do."""
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        value = run.column(name)[first]
        raise AuditError(f"{run.path}: column {name} has {int(bad.sum())} value(s) {problem}, first at row {first} "
                         f"({value:g}); {meaning}; rerun `reweight-audit score` or fix the table")


def _check_statistics(run: RunData) -> None:
    """The known statistics' ranges: nothing impossible reaches a method (nulls/NaN stay, each method says so)."""
    with np.errstate(invalid="ignore"):
        for name in KNOWN_NUMERIC_COLUMNS:
            if name not in run.table.column_names or name == "logp":
                continue
            values = run.column(name)
            if name in LOWER_BOUNDS:
                low, meaning = LOWER_BOUNDS[name]
                _bad_values(run, name, np.isinf(values), "that are infinite", f"{name} is finite ({meaning})")
                _bad_values(run, name, values < low - TOLERANCE * max(1.0, low), f"below {low:g}", meaning)
            if name in WHOLE_NUMBER_COLUMNS and values.dtype.kind == "f":
                _bad_values(run, name, np.isfinite(values) & (values != np.round(values)), "that are fractional",
                            f"{name} counts something, so it is a whole number")
            if name in WHOLE_NUMBER_COLUMNS and name not in LOWER_BOUNDS:
                _bad_values(run, name, values < 0, "below 0", f"{name} is never negative")


def _read_table(path: Path) -> pa.Table:
    """The parquet table, with the required columns and types; every failure names the file and what to do."""
    if not path.exists():
        raise AuditError(f"{path}: file not found; give the stats.parquet written by `reweight-audit score`")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for non-parquet input
        detail = (str(exc).splitlines() or [""])[0]
        raise AuditError(
            f"{path}: not a readable parquet file ({type(exc).__name__}: {detail}); "
            "give the stats.parquet written by `reweight-audit score`"
        ) from None
    return _check_table(table, path)


def _check_table(table: pa.Table, path: Path) -> pa.Table:
    """The required columns, their types, and at least one row; ``path`` names the table in messages."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise AuditError(
            f"{path}: not a reweight-audit stats table, missing column(s) {', '.join(missing)}; "
            "rerun `reweight-audit score` to write the current format"
        )
    if table.num_rows == 0:
        raise AuditError(f"{path}: the stats table has no rows; score a corpus with at least one response token")
    logp_col = table.column("logp")
    if not (pa.types.is_floating(logp_col.type) or pa.types.is_integer(logp_col.type)):
        raise AuditError(f"{path}: column logp has type {logp_col.type}, expected float; rerun `reweight-audit score`")
    if logp_col.null_count:
        raise AuditError(f"{path}: column logp has {logp_col.null_count} null value(s); rerun `reweight-audit score`")
    if table.column("seq_id").null_count:
        raise AuditError(f"{path}: column seq_id has null values; every token needs its sequence id")
    pos_col = table.column("pos")
    if not pa.types.is_integer(pos_col.type) or pos_col.null_count:
        raise AuditError(f"{path}: column pos must be integers without nulls (it is {pos_col.type}, "
                         f"{pos_col.null_count} null); rerun `reweight-audit score`")
    table = _checked_labels(table, path)
    for name in KNOWN_NUMERIC_COLUMNS:
        if name in table.column_names:
            kind = table.schema.field(name).type
            if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
                raise AuditError(f"{path}: column {name} has type {kind}, expected numbers; rerun "
                                 "`reweight-audit score`, or rename the column if it is not the statistic")
    return _token_text(table, path)


def _checked_labels(table: pa.Table, path: Path) -> pa.Table:
    """``is_noise`` as booleans without nulls (0/1 integers become booleans; a null is not "clean")."""
    column = table.column("is_noise")
    if not (pa.types.is_boolean(column.type) or pa.types.is_integer(column.type)):
        raise AuditError(f"{path}: column is_noise has type {column.type}, expected bool; "
                         "rerun `reweight-audit score` on the labelled jsonl")
    if column.null_count:
        first = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
        raise AuditError(f"{path}: column is_noise has {column.null_count} null value(s), first at row {first}; "
                         "a token's label must be true or false (a null is not clean): fix the table or rerun "
                         "`reweight-audit score` on the labelled jsonl")
    if pa.types.is_integer(column.type):
        values = column.to_numpy(zero_copy_only=False)
        outside = (values != 0) & (values != 1)
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise AuditError(f"{path}: column is_noise has {int(outside.sum())} value(s) other than 0 and 1, first "
                             f"at row {first} ({values[first]}); labels are true/false (or 1/0)")
        table = table.set_column(table.schema.get_field_index("is_noise"), "is_noise", column.cast(pa.bool_()))
    return table


def _token_text(table: pa.Table, path: Path) -> pa.Table:
    """The ``token`` column as text (it is what the heatmap shows): numbers become their digits."""
    kind = table.schema.field("token").type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind):
        return table
    try:
        text = table.column("token").cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise AuditError(f"{path}: column token has type {kind}, expected text (each token's characters); rerun "
                         "`reweight-audit score`") from None
    return table.set_column(table.schema.get_field_index("token"), "token", text)


def _dictionary_codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    enc = pc.dictionary_encode(col.combine_chunks() if col.num_chunks != 1 else col.chunk(0))
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    codes = enc.indices.to_numpy(zero_copy_only=False)
    names = enc.dictionary.to_pylist()
    return codes, names


def _excluded_rows(table: pa.Table) -> tuple[np.ndarray | None, dict[str, int]]:
    """Per token, whether its noise_kind is one of :data:`EXCLUDED_KINDS` (None when none is), and the counts."""
    if "noise_kind" not in table.column_names:
        return None, {}
    kinds = table.column("noise_kind").cast(pa.string())
    counts = {}
    excluded = np.zeros(table.num_rows, dtype=bool)
    for kind in EXCLUDED_KINDS:
        hit = pc.equal(kinds, kind).fill_null(False).to_numpy(zero_copy_only=False).astype(bool, copy=False)
        if hit.any():
            counts[kind] = int(hit.sum())
            excluded |= hit
    return (excluded if counts else None), counts


def _kind_codes(table: pa.Table, is_noise: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per token, the index of its noise kind in the sorted kind names; -1 for clean tokens.

    Noise tokens without a kind are grouped as "unlabelled"; kinds only clean tokens carry are dropped.
    """
    if "noise_kind" in table.column_names:
        kcodes, knames = _dictionary_codes(table.column("noise_kind").cast(pa.string()).fill_null(""))
    else:
        kcodes, knames = np.zeros(table.num_rows, dtype=np.int32), [""]
    names = [n if n else "unlabelled" for n in knames]
    kind_codes = np.where(is_noise, kcodes, -1).astype(np.int32)
    used = np.unique(kind_codes[kind_codes >= 0])
    remap = np.full(len(names), -1, dtype=np.int32)
    kinds = sorted({names[i] for i in used})
    for i in used:
        remap[i] = kinds.index(names[i])
    return np.where(kind_codes >= 0, remap[np.maximum(kind_codes, 0)], -1).astype(np.int32), kinds


def _method_columns(table: pa.Table) -> tuple[str, ...]:
    """What methods may read: every numeric column (statistics, pos, token_id, extra columns a third-party
    method may need) except the labels, then the :data:`DERIVED_COLUMNS` the table lacks."""
    stored = tuple(
        c
        for c in table.column_names
        if c not in LABEL_COLUMNS
        and (pa.types.is_floating(table.schema.field(c).type) or pa.types.is_integer(table.schema.field(c).type))
    )
    return stored + tuple(c for c in DERIVED_COLUMNS if c not in table.column_names)


def _model_label(model: Any) -> str | None:
    if not model or not isinstance(model, str):
        return None
    p = Path(model)
    # a local path (directory or .gguf file) is labelled by its last part
    return p.name if (p.is_absolute() or model.endswith(".gguf")) else model


def run_labels(paths: list[Path], manifests: list[dict | None]) -> list[str]:
    """Manifest model name, else file stem; made unique with the parent folder or an index."""
    base = []
    for p, m in zip(paths, manifests):
        base.append(_model_label((m or {}).get("model")) or p.stem)
    labels = list(base)
    for i, lab in enumerate(base):
        if base.count(lab) > 1:
            where = f"{paths[i].parent.name}/{paths[i].stem}" if paths[i].parent.name else paths[i].stem
            labels[i] = f"{lab} [{where}]"
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            seen[lab] = seen.get(lab, 0) + 1
            labels[i] = f"{lab} #{seen[lab]}"
    return labels


def load_runs(paths: list[StatsSource]) -> list[RunData]:
    """Every table, labelled for the reports (:func:`run_labels`)."""
    runs = [load_run(p) for p in paths]
    for run, label in zip(runs, run_labels([r.path for r in runs], [r.manifest for r in runs])):
        run.label = label
    return runs

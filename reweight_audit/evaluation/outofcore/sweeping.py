"""``sweep`` out of core: per-sequence counts at every cut of every setting, from chunks and DuckDB.

A sweep block (run × rank-by × noise set × scope) needs, per method, the
per-sequence counts at every cut (:data:`~reweight_audit.evaluation.metrics.SEQUENCE_FIELDS`):
their sums are the values and their resampled sums the intervals. In sequence
scope they are local to a sequence, computed per chunk and spilled to parquet
(O(sequences) per method, read back one method at a time); in global scope the
cut of every pool comes from the per-value counts (:mod:`.histogram`) and the
per-sequence counts at it from one DuckDB GROUP BY. Each method is resampled
on its own with the bootstrap's one set of draws, so the replicates stay paired.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reweight_audit.evaluation import metrics
from reweight_audit.evaluation.config import POOLED
from reweight_audit.evaluation.metrics.counts import SEQUENCE_FIELDS, per_sequence
from reweight_audit.evaluation.outofcore import chunks as ch
from reweight_audit.evaluation.outofcore import strata, tables
from reweight_audit.evaluation.outofcore.accumulate import (SPILL_OPTIONS, SPILL_SCHEMA, RunTotals, bucket_count,
                                                            score_edges, shard_edges, write_bucketed)
from reweight_audit.evaluation.outofcore.engine import RunJob, reduce_progress, weight_pass
from reweight_audit.evaluation.outofcore.histogram import DescendingCounts

ALL_NOISE = "all"


def noise_sets(kinds: list[str]) -> list[tuple[str, int | None]]:
    """(name, kind code) per noise set: all noise (None), and each kind when there are several."""
    if len(kinds) == 1:
        return [(kinds[0], None)]
    return [(ALL_NOISE, None)] + [(kind, j) for j, kind in enumerate(kinds)]


@dataclass
class SweepSums:
    """One method × rank-by: the spilled scores and, in sequence scope, each noise set's per-sequence counts."""

    spill: Path  # where this process writes (``work/<shard>/<name>``)
    cuts: tuple[float, ...]
    sets: list[tuple[str, int | None]]
    sequence: bool
    n_buckets: int = 1  # as RankingSums: score buckets and their boundaries
    edges: np.ndarray | None = None
    writer: pq.ParquetWriter | None = None
    seq_writers: list | None = None

    def seq_path(self, i: int) -> Path:
        return self.spill.with_name(f"{self.spill.stem}-seq{i}.parquet")

    @property
    def pattern(self) -> Path:
        """Every shard's spilled scores of this ranking (what DuckDB reads)."""
        return self.spill.parent.parent / "*" / self.spill.name

    def shard(self, folder: str, first: int, n_seqs: int) -> "SweepSums":
        """An empty copy writing into ``work/<folder>/`` (everything it keeps is in files)."""
        return SweepSums(self.spill.parent.parent / folder / self.spill.name, self.cuts, self.sets, self.sequence,
                         self.n_buckets, shard_edges(self.edges))

    def merge(self, other: "SweepSums") -> None:
        """Nothing to add: a shard's counts stay in its files, read through :attr:`pattern`."""

    def __getstate__(self) -> dict:
        return {**self.__dict__, "writer": None, "seq_writers": None}

    def add(self, chunk: ch.Chunk, s: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> None:
        """One chunk's scores; ``extra``: the stratify axis's variables, spilled beside them (:mod:`.strata`)."""
        pool = chunk.run.pool
        y, local, kinds = pool.is_noise, pool.seq_codes, chunk.kind_codes
        extra = extra or {}
        if self.writer is None:
            self.spill.parent.mkdir(parents=True, exist_ok=True)
            schema = pa.schema(list(SPILL_SCHEMA) + [pa.field(name, pa.float64()) for name in extra])
            self.writer = pq.ParquetWriter(self.spill, schema, **SPILL_OPTIONS)
            self.seq_writers = [None] * len(self.sets)
        if self.edges is None:  # not sharded: this pass's first chunk (RankingSums.add)
            self.edges = score_edges(s, self.n_buckets)
        write_bucketed(self.writer, {"score": s, "kind": kinds, "seq": chunk.seq_codes.astype(np.int32), **extra},
                       self.edges)
        if not self.sequence:
            return
        n_local = len(chunk.run.seq_names)
        for i, (_, j) in enumerate(self.sets):
            keep = slice(None) if j is None else ~y | (kinds == j)
            per = per_sequence(s[keep], y[keep], local[keep], n_local, self.cuts, "sequence")  # [cuts, S, F]
            table = pa.table({"seq": chunk.codes.astype(np.int32),
                              "fields": pa.FixedSizeListArray.from_arrays(
                                  pa.array(per.transpose(1, 0, 2).reshape(-1)), per.shape[0] * per.shape[2])})
            if self.seq_writers[i] is None:
                self.seq_writers[i] = pq.ParquetWriter(self.seq_path(i), table.schema)
            self.seq_writers[i].write_table(table)

    def close(self) -> None:
        for w in [self.writer, *(self.seq_writers or [])]:
            if w is not None:
                w.close()
        self.writer, self.seq_writers = None, []

    def sequence_fields(self, i: int, n_seqs: int) -> np.ndarray:
        """[cuts, S, fields] of noise set ``i`` in sequence scope (rows of sequences without tokens: zeros)."""
        out = np.zeros((n_seqs, len(self.cuts) * len(SEQUENCE_FIELDS)))
        pattern = self.seq_path(i)
        for path in sorted(pattern.parent.parent.glob(f"*/{pattern.name}")):
            table = pq.read_table(path)
            seq = table.column("seq").to_numpy()
            out[seq] = table.column("fields").combine_chunks().flatten().to_numpy().reshape(seq.size, -1)
        return out.reshape(n_seqs, len(self.cuts), len(SEQUENCE_FIELDS)).transpose(1, 0, 2)


def sweep_sums(job: RunJob, scan: ch.TableScan, methods: list, con) -> tuple[RunTotals, dict]:
    """The weight pass of a sweep: every method × rank-by's :class:`SweepSums`."""
    sets = noise_sets(scan.kinds)
    sums = {(m.name, r): SweepSums(job.work / "main" / f"{i}-{r}.parquet", job.options.cuts, sets,
                                   "sequence" in job.options.scope, bucket_count(scan.n_rows))
            for i, m in enumerate(methods) for r in job.rank_by}
    totals, _, _ = weight_pass(job, scan, con, sums)
    return totals, sums


def global_tallies(con, sums: SweepSums, totals: RunTotals, sets: list[int | None],
                   rows: Path | None = None) -> tuple[DescendingCounts, dict]:
    """One sorted pass over a ranking's spill for every noise set ``j`` in ``sets`` (None: all noise): the
    per-value counts (pool 0: all noise, 1 + j: kind j) and, per set, each cut's per-sequence counts of its pool
    (``a<i>_<set>``) and of its positives (``p<i>_<set>``). ``rows``: these rows instead (a stratum's; ``totals``
    then its own)."""
    counts = DescendingCounts(totals.n_clean, totals.n_kind, sums.cuts, sums.cuts)
    n_kinds = len(totals.n_kind)
    watches = []
    for at, j in enumerate(sets):
        positive = list(range(1, n_kinds + 1)) if j is None else [1 + j]
        pool = 0 if j is None else 1 + j
        watches += [(f"a{i}_{at}", pool, c, [0, *positive]) for i, c in enumerate(sums.cuts)]
        watches += [(f"p{i}_{at}", pool, c, positive) for i, c in enumerate(sums.cuts)]
    tally = tables.SequenceTally(totals.n_seqs, n_kinds + 1, watches)
    tables.value_counts(con, sums.pattern if rows is None else rows, counts, n_kinds, tally=tally)
    return counts, tally.out


def global_fields(counts: DescendingCounts, per: dict, cuts: list[float], totals: RunTotals, j: int | None,
                  at: int) -> np.ndarray:
    """[cuts, S, fields] of noise set ``j`` (None: all noise; ``at``: its place in :func:`global_tallies`'s
    sets) in global scope; its per-sequence counts are taken out of ``per`` (freed as each set is used)."""
    pool_at = 0 if j is None else 1 + j
    n_pos = totals.n_noise if j is None else totals.kind_noise[j]
    length = totals.length if j is None else totals.length - totals.n_noise + totals.kind_noise[j]
    noisy = (n_pos > 0).astype(np.float64)
    out = np.zeros((len(cuts), totals.n_seqs, len(SEQUENCE_FIELDS)))
    for i, c in enumerate(cuts):
        pc = counts.cut(pool_at, c)
        a_above, a_tied = per.pop(f"a{i}_{at}_above"), per.pop(f"a{i}_{at}_tied")
        p_above, p_tied = per.pop(f"p{i}_{at}_above"), per.pop(f"p{i}_{at}_tied")
        share = pc.cut.share
        hit = pc.cut.hit(p_above, p_tied) if pc.cut.n_top else np.zeros(totals.n_seqs)
        out[i] = np.column_stack([p_above + p_tied * share, a_above + a_tied * share, n_pos, length, hit * noisy,
                                  noisy])
    return out


def method_sums(per: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """One method's [cuts, fields] totals and [boot, cuts, fields] replicate sums of [cuts, S, fields]."""
    n_k, n_s, n_f = per.shape
    reps = None
    if n_boot:
        reps = metrics.resampled_sums(per.transpose(1, 0, 2).reshape(n_s, -1), n_boot, seed).reshape(n_boot, n_k, n_f)
    return per.sum(axis=1), reps


def set_size(totals: RunTotals, j: int | None) -> tuple[int, int]:
    """The pool's tokens and positives of noise set ``j``."""
    n_pos = int(totals.n_noise.sum()) if j is None else int(totals.n_kind[j])
    return totals.n_clean + n_pos, n_pos


def sweep_blocks(job: RunJob, scan: ch.TableScan) -> tuple[list[tuple], RunTotals]:
    """Every block of one run, in the in-memory sweep's order: per rank-by × noise × scope, ``(setting, (totals,
    reps), n, n_noise)`` with what :func:`reweight_audit.evaluation.sweep.block_of` makes a block of.

    Each method × rank-by's spill is sorted once for every noise set (:func:`global_tallies`); what is kept
    between methods is each block's per-method totals and replicate sums, not per sequence."""
    opts = job.options
    sets = noise_sets(scan.kinds)
    out = []
    with tables.connect(job.work) as con:
        totals, sums = sweep_sums(job, scan, job.methods, con)
        variables = _variables(con, job, sums, totals)
        t0, done, total = time.perf_counter(), 0, len(job.rank_by) * len(job.methods)
        for rank_by in job.rank_by:
            parts = {}
            for m in job.methods:
                parts.update(_method_parts(con, job, sums[(m.name, rank_by)], totals, sets, m.name))
                for var in variables:
                    parts.update(_stratified_parts(con, job, sums[(m.name, rank_by)], var, sets, m.name))
                done += 1
                job.say(reduce_progress(job.label, f"{m.name}, rank by {rank_by}", done, total, t0))
            for noise, j in sets:
                n, n_pos = set_size(totals, j)
                for scope in opts.scope:
                    for by in opts.stratify:
                        mine = [parts[(noise, scope, by, m.name)] for m in job.methods]  # per method, per stratum
                        per = range(len(mine[0])) if mine else range(1)
                        reps = [np.stack([p[i][1] for p in mine], axis=1) for i in per] \
                            if opts.bootstrap and mine else None
                        out.append(({"run": job.label, "rank_by": rank_by, "scope": scope, "noise": noise,
                                     "stratify": by}, ([np.stack([p[i][0] for p in mine]) for i in per], reps),
                                    n, n_pos))
    return out, totals


def _method_parts(con, job: RunJob, sums: SweepSums, totals: RunTotals, sets: list, name: str) -> dict:
    """One method × rank-by's :func:`method_sums` per (noise set, scope, method)."""
    opts, parts = job.options, {}
    counts, per = global_tallies(con, sums, totals, [j for _, j in sets]) if "global" in opts.scope else (None, {})
    for at, (noise, j) in enumerate(sets):
        for scope in opts.scope:
            fields = sums.sequence_fields(at, totals.n_seqs) if scope == "sequence" else \
                global_fields(counts, per, sums.cuts, totals, j, at)
            parts[(noise, scope, POOLED, name)] = [method_sums(fields, opts.bootstrap, opts.seed)]
    return parts


# --------------------------------------------------------------------------- the stratify axis


def _variables(con, job: RunJob, sums: dict, totals: RunTotals) -> list[tuple[strata.Strata, np.ndarray]]:
    """Per stratify variable of the axis (``none`` aside), its strata over the run's pool and its cells
    ([strata, 1 + kinds, sequences]: each sequence's clean tokens and tokens of each kind in each stratum)."""
    by_all = strata.stratify_by(job.options)
    if not by_all or not sums:
        return []
    spill = next(iter(sums.values())).pattern  # every ranking spills the same rows
    n_tokens = max(int(totals.length.sum()), 1)
    out = []
    for by in by_all:
        found = strata.find_strata(con, spill, by, job.options.strata, n_tokens)
        out.append((found, strata.sequence_cells(con, spill, found, totals.n_seqs, len(totals.n_kind))))
    return out


def _stratum_totals(cells: np.ndarray, j: int) -> RunTotals:
    """Stratum j's tokens as :class:`RunTotals` (what the pooled functions read of them)."""
    n_kinds, n_seqs = cells.shape[1] - 1, cells.shape[2]
    t = RunTotals(n_seqs, n_kinds)
    t.kind_noise = cells[j, 1:].astype(np.int64)
    t.n_noise = t.kind_noise.sum(axis=0)
    t.length = cells[j, 0] + t.n_noise
    t.n_kind = t.kind_noise.sum(axis=1)
    return t


def _stratified_parts(con, job: RunJob, sums: SweepSums, var: tuple, sets: list, name: str) -> dict:
    """One method × rank-by within the strata of one variable: per (noise set, scope) the :func:`method_sums` of
    each stratum with tokens in the set's pool, in stratum order (as the in-memory sweep's parts)."""
    found, cells = var
    parts: dict = {(noise, scope): [] for noise, _ in sets for scope in job.options.scope}
    folder = sums.spill.parent.parent / "strata" / f"{sums.spill.stem}-{found.by}"
    with strata.stratum_files(con, sums.pattern, found, folder) as files:
        for j in range(found.n_strata):
            _stratum_parts(con, job, sums, _stratum_totals(cells, j), files[j], sets, parts)
    return {(noise, scope, found.by, name): one for (noise, scope), one in parts.items()}


def _stratum_parts(con, job: RunJob, sums: SweepSums, t: RunTotals, rows: Path, sets: list, parts: dict) -> None:
    """One stratum's :func:`method_sums` appended to ``parts[(noise set, scope)]`` for each set with tokens in it
    (``rows``: the stratum's rows; ``t``: its totals)."""
    opts = job.options
    counts, per = global_tallies(con, sums, t, [s for _, s in sets], rows) if "global" in opts.scope else (None, {})
    seq = _stratum_sequence_fields(con, rows, sums.cuts, t.n_seqs, sets) if "sequence" in opts.scope else None
    for at, (noise, s) in enumerate(sets):
        if set_size(t, s)[0] == 0:
            continue  # no token of this pool in the stratum: not one of its parts
        for scope in opts.scope:
            fields = seq[at] if scope == "sequence" else global_fields(counts, per, sums.cuts, t, s, at)
            parts[(noise, scope)].append(method_sums(fields, opts.bootstrap, opts.seed))


def _stratum_sequence_fields(con, rows: Path, cuts: tuple[float, ...], n_seqs: int,
                             sets: list) -> list[np.ndarray]:
    """Per noise set, [cuts, S, fields] in sequence scope within one stratum (its rows streamed in sequence
    order, whole sequences at a time)."""
    out = [np.zeros((len(cuts), n_seqs, len(SEQUENCE_FIELDS))) for _ in sets]
    for s, kind, seq in strata.sequence_batches(con, rows, "score, kind, seq"):
        y = kind >= 0
        for at, (_, j) in enumerate(sets):
            keep = np.ones(s.size, dtype=bool) if j is None else ~y | (kind == j)
            if keep.any():
                have, local = np.unique(seq[keep], return_inverse=True)
                out[at][:, have] = per_sequence(s[keep], y[keep], local.reshape(-1).astype(np.intp), have.size,
                                                cuts, "sequence")
    return out

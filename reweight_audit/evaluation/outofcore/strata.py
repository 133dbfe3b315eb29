"""``compare --stratify`` out of core: strata.csv's rows from the spilled scores, as the memory engine gives them.

The stratifying variable x of every pool token is computed per chunk with the
in-memory functions (:func:`reweight_audit.evaluation.strata.stratify_values`;
rarity with the table's token-id counts) and spilled beside its ranking score
(column ``x_<variable>``). The strata are quantiles ``⌊N·#{x' < x}/n⌋``
(:func:`~reweight_audit.evaluation.metrics.stratum_codes`), monotone in x, so
one ascending pass over x's distinct values fixes each stratum's lowest value
(:class:`Strata`), and a token's stratum is where x falls among those. A
ranking's spill is written partitioned by stratum (:func:`stratum_files`); per
stratum, its sorted pass gives the cut, AUROC and the per-sequence counts above
and tied at the cut (global scope), and, in the same pass, every bootstrap
replicate's AUROC (:class:`AurocReplicates`); a pass in sequence order gives its
per-sequence counts in sequence scope. The rows then come from the same
function as the memory engine's
(:func:`~reweight_audit.evaluation.metrics.stratified.stratified_summary`).
The sweep's stratify axis uses the same pieces (:mod:`.sweeping`).
Memory: O(sequences × strata + sequences × replicates), never O(tokens).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation.metrics.bootstrap import LEVEL, bootstrap_multiplicities
from reweight_audit.evaluation.metrics.counts import SEQUENCE_FIELDS, per_sequence
from reweight_audit.evaluation.metrics.declarations import ratio
from reweight_audit.evaluation.metrics.stratified import stratified_mean, stratified_summary
from reweight_audit.evaluation.outofcore import tables
from reweight_audit.evaluation.outofcore.accumulate import RankingSums, RunTotals
from reweight_audit.evaluation.outofcore.chunks import Chunk
from reweight_audit.evaluation.outofcore.histogram import DescendingCounts, HistogramIndex
from reweight_audit.evaluation.strata import ALL, STRATIFY_BY, stratify_values

#: Replicate weights gathered per step of the AUROC bootstrap (rows × replicates): about 16 MB of float64.
_PIECE = 1 << 21


def stratify_by(options: Any) -> list[str]:
    """The ``--stratify`` variables of ``options`` (a sweep's pooled ``none`` is none)."""
    return [v for v in (getattr(options, "stratify", None) or []) if v in STRATIFY_BY]


def column(by: str) -> str:
    """The spill column holding variable ``by``."""
    return f"x_{by}"


def needs(options: Any) -> set[str]:
    """The columns the ``--stratify`` variables are computed from."""
    return {c for by in stratify_by(options) for c in _NEEDS[by]}


_NEEDS = {"position": ("pos", "seq_len"), "length": ("seq_len",), "rarity": ("token_id",)}


def chunk_values(options: Any, chunk: Chunk, rarity: Callable[[Chunk], np.ndarray]) -> dict[str, np.ndarray]:
    """Per ``--stratify`` variable, its value on every pool token of the chunk (the spill's ``x_<by>`` columns);
    ``rarity(chunk)``: the ``rarity`` method's weight on every row, with the whole table's token-id counts, as
    :func:`~reweight_audit.methods.control.token_rarity` gives it on the whole table."""
    out = {}
    for by in stratify_by(options):
        if by == "rarity" and "token_id" in chunk.run.numeric_columns:
            out[column(by)] = chunk.run.pool.take(rarity(chunk))
        else:  # position, length (local to the token); rarity without token_id: stratify_values' error
            out[column(by)] = stratify_values(chunk.run, by)
    return out


# --------------------------------------------------------------------------- the strata


@dataclass
class Strata:
    """One variable's strata: each one's lowest value (``lo``, ascending), its range and its tokens."""

    by: str
    lo: np.ndarray
    x_lo: list[float] = field(default_factory=list)
    x_hi: list[float] = field(default_factory=list)
    n: list[int] = field(default_factory=list)
    n_noise: list[int] = field(default_factory=list)

    @property
    def n_strata(self) -> int:
        return int(self.lo.size)

    def codes(self, x: np.ndarray) -> np.ndarray:
        """Each value's stratum (0 .. J-1)."""
        return np.searchsorted(self.lo, x, side="right") - 1

    def sql(self) -> str:
        """DuckDB's expression of a row's stratum, as :meth:`codes` (bounds as exact doubles: the shortest repr,
        cast from text)."""
        col = column(self.by)
        whens = [f"WHEN {col} >= {_double(self.lo[j])} THEN {j}" for j in range(self.n_strata - 1, 0, -1)]
        return f"CASE {' '.join(whens)} ELSE 0 END" if whens else "0"


def _double(value: float) -> str:
    return f"'{float(value)!r}'::DOUBLE"


def find_strata(con, spill, by: str, n_strata: int, n_tokens: int) -> Strata:
    """The strata of ``by`` from its distinct values streamed in ascending order with their counts: value x opens
    a stratum where ``⌊N·#{x' < x}/n⌋`` changes (the quantile codes of ``stratum_codes``)."""
    col = column(by)
    reader = con.sql(f"""SELECT {col} AS x, count(*) AS n, count(*) FILTER (WHERE kind >= 0) AS noise
                         FROM read_parquet('{tables._quote(spill)}') GROUP BY {col} ORDER BY {col}""") \
        .to_arrow_reader(tables._FETCH_ROWS)
    lo, x_lo, x_hi, n, noise = [], [], [], [], []
    below, last = 0, None
    for batch in reader:
        x, count, pos = (batch.column(i).to_numpy() for i in range(3))
        if np.isnan(x).any():
            raise AuditError(f"{spill}: --stratify {by} has NaN values; stratify by another variable")
        raw = ((below + np.cumsum(count) - count) * int(n_strata)) // int(n_tokens)
        below += int(count.sum())
        for code, segment in _segments(raw):
            if code != last:
                lo.append(float(x[segment.start]))
                x_lo.append(float(x[segment.start]))
                x_hi.append(0.0)
                n.append(0)
                noise.append(0)
                last = code
            x_hi[-1] = float(x[segment.stop - 1])
            n[-1] += int(count[segment].sum())
            noise[-1] += int(pos[segment].sum())
    return Strata(by, np.asarray(lo, dtype=np.float64), x_lo, x_hi, n, noise)


def _segments(raw: np.ndarray) -> Iterator[tuple[int, slice]]:
    """Runs of equal raw codes in a nondecreasing array: (code, slice)."""
    starts = np.flatnonzero(np.r_[True, raw[1:] != raw[:-1]]) if raw.size else raw
    for a, b in zip(starts.tolist(), np.r_[starts[1:], raw.size].tolist()):
        yield int(raw[a]), slice(a, b)


def sequence_cells(con, spill, strata: Strata, n_seqs: int, n_kinds: int) -> np.ndarray:
    """[strata, 1 + kinds, sequences]: each sequence's clean tokens (0) and tokens of each kind (1 + j) in each
    stratum (the rows streamed unsorted)."""
    col = column(strata.by)
    shape = (strata.n_strata, 1 + n_kinds, n_seqs)
    cells = np.zeros(shape, dtype=np.int32)  # a sequence's tokens
    reader = con.sql(f"SELECT {col}, kind, seq FROM read_parquet('{tables._quote(spill)}')") \
        .to_arrow_reader(tables._FETCH_ROWS)
    for batch in reader:
        x, kind, seq = (batch.column(i).to_numpy(zero_copy_only=False) for i in range(3))
        flat = (strata.codes(x).astype(np.int64) * (1 + n_kinds) + kind + 1) * n_seqs + seq
        np.add.at(cells.reshape(-1), flat, 1)  # no temporary the size of the cells per batch
    return cells


@contextmanager
def stratum_files(con, spill: Path, strata: Strata, folder: Path) -> Iterator[list[Path]]:
    """Per stratum, the files of its rows (score, kind, seq): the spill read once and written partitioned by
    stratum into ``folder`` (removed afterwards), so that each stratum's passes read its rows only; one stratum:
    the spill itself."""
    if strata.n_strata == 1:
        yield [spill]
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        con.execute(f"""COPY (SELECT score, kind, seq, {strata.sql()} AS stratum FROM read_parquet('{tables._quote(spill)}'))
                        TO '{tables._quote(folder)}' (FORMAT parquet, PARTITION_BY (stratum), OVERWRITE_OR_IGNORE true)""")
        yield [folder / f"stratum={j}" / "*.parquet" for j in range(strata.n_strata)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sequence_batches(con, spill, columns: str) -> Iterator[list[np.ndarray]]:
    """``columns`` of the spilled rows, streamed in sequence order and cut into blocks of whole sequences (the
    last sequence of a batch held back until the next: O(a sequence's tokens))."""
    reader = con.sql(f"""SELECT {columns} FROM read_parquet('{tables._quote(spill)}', hive_partitioning = false)
                         ORDER BY seq""").to_arrow_reader(tables._FETCH_ROWS)
    pending: list[np.ndarray] | None = None
    for batch in reader:
        arrays = [batch.column(i).to_numpy(zero_copy_only=False) for i in range(batch.num_columns)]
        if pending is not None:
            arrays = [np.concatenate([a, b]) for a, b in zip(pending, arrays)]
        seq = arrays[batch.schema.get_field_index("seq")]
        if not seq.size:
            continue
        cut = int(np.searchsorted(seq, seq[-1], side="left"))  # the last sequence may go on in the next batch
        if cut:
            yield [a[:cut] for a in arrays]
        pending = [a[cut:] for a in arrays]
    if pending is not None and pending[0].size:
        yield pending


# --------------------------------------------------------------------------- the AUROC bootstrap


def replicate_sums(per_seq: np.ndarray, mult: np.ndarray) -> np.ndarray:
    """``per_seq @ mult`` ([rows, sequences] @ [sequences, replicates]) in float64, a block of sequences at a time:
    the small-integer multiplicities are never held as float64 whole (the sums are integers: exact)."""
    out = np.zeros((per_seq.shape[0], mult.shape[1]))
    step = max(1, _PIECE // max(1, mult.shape[1]))
    for lo in range(0, mult.shape[0], step):
        out += per_seq[:, lo:lo + step].astype(np.float64) @ mult[lo:lo + step].astype(np.float64)
    return out


def multiplicities(n_seqs: int, n_boot: int, seed: int) -> np.ndarray:
    """[sequences, replicates]: how often each replicate draws each sequence (the draws of
    :func:`~reweight_audit.evaluation.metrics.bootstrap_multiplicities`), as small integers."""
    out = np.empty((n_seqs, n_boot), dtype=np.uint8)
    lo = 0
    for block in bootstrap_multiplicities(n_seqs, n_boot, 0 if seed is None else seed):
        if block.max(initial=0) > np.iinfo(out.dtype).max:
            out = out.astype(np.uint16)  # a sequence drawn over 255 times: a tiny table only
        out[:, lo:lo + block.shape[0]] = block.T
        lo += block.shape[0]
    return out


class AurocReplicates:
    """Every bootstrap replicate's AUROC of one pool, from its rows streamed highest score first.

    Replicate b counts each token as often as it draws the token's sequence (``mult[row[seq], b]``); its AUROC is
    ``Σ_g N_g·(C_below(g) + T_g/2) / (W_noise·W_clean)`` over the distinct scores g, with N_g and T_g the drawn
    noise and clean tokens at g (:class:`~reweight_audit.evaluation.metrics.stratified._WeightedAUROC`). Fed in
    order, C_below(g) is the replicate's clean weight less what was seen down to g: one running vector per
    replicate, and the last score of a batch carried to the next (its tokens may go on there).
    """

    def __init__(self, mult: np.ndarray, row: np.ndarray, noise_per_seq: np.ndarray, clean_per_seq: np.ndarray):
        self.mult, self.row = mult, row
        self.w_noise, self.w_clean = replicate_sums(np.stack([noise_per_seq, clean_per_seq]), mult)
        self.seen = np.zeros(mult.shape[1])  # clean weight at or above the scores closed so far
        self.num2 = np.zeros(mult.shape[1])  # twice the Mann-Whitney sum: integers
        self.carry: tuple[float, np.ndarray, np.ndarray] | None = None
        self.step = max(1, _PIECE // max(1, mult.shape[1]))

    def feed(self, score: np.ndarray, labels: np.ndarray, seq: np.ndarray) -> None:
        """A streamed batch (descending scores; label 0 clean, 1 noise)."""
        for lo in range(0, score.size, self.step):
            self._piece(score[lo:lo + self.step], labels[lo:lo + self.step], seq[lo:lo + self.step])

    def _piece(self, score: np.ndarray, labels: np.ndarray, seq: np.ndarray) -> None:
        new = np.r_[True, score[1:] != score[:-1]]
        group = np.cumsum(new) - 1
        start = np.flatnonzero(new)
        noise, clean = (self._per_score(labels == label, group, seq, start.size) for label in (1, 0))
        if self.carry is not None:
            value, n0, c0 = self.carry
            if score[0] == value:
                noise[0] += n0
                clean[0] += c0
            else:
                self._close(n0[None], c0[None])
        self._close(noise[:-1], clean[:-1])
        self.carry = (score[start[-1]], noise[-1].copy(), clean[-1].copy())

    def _per_score(self, rows: np.ndarray, group: np.ndarray, seq: np.ndarray, n_groups: int) -> np.ndarray:
        """[distinct scores, replicates]: the replicates' count of the ``rows`` at each score (one gather of
        each row's multiplicities, summed per score in integers)."""
        out = np.zeros((n_groups, self.mult.shape[1]))
        at = np.flatnonzero(rows)
        if at.size:
            g = group[at]
            first = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
            out[g[first]] = np.add.reduceat(self.mult[self.row[seq[at]]].astype(np.int32), first, axis=0)
        return out

    def _close(self, noise: np.ndarray, clean: np.ndarray) -> None:
        """Finished distinct scores, in order: [scores, replicates] noise and clean weight at each."""
        if not noise.shape[0]:
            return
        at_or_above = self.seen + np.cumsum(clean, axis=0)
        # 2·(clean below) + clean tied = 2·(W_clean − at or above) + tied
        self.num2 += np.einsum("gb,gb->b", noise, 2.0 * (self.w_clean - at_or_above) + clean)
        self.seen = at_or_above[-1]

    def replicates(self) -> np.ndarray:
        """[replicates]: each one's AUROC (NaN without noise or clean weight)."""
        if self.carry is not None:
            self._close(self.carry[1][None], self.carry[2][None])
            self.carry = None
        return ratio(self.num2 / 2.0, self.w_noise * self.w_clean)


class _Pass:
    """What value_counts' sorted pass feeds besides the counts: the global scope's per-sequence tally and the AUROC
    replicates (either may be None)."""

    def __init__(self, tally: tables.SequenceTally | None, aurocs: AurocReplicates | None):
        self.tally, self.aurocs = tally, aurocs

    def batch(self, counts: DescendingCounts, score: np.ndarray, labels: np.ndarray, seq: np.ndarray) -> None:
        if self.tally is not None:
            self.tally.batch(counts, score, labels, seq)
        if self.aurocs is not None and score.size:
            self.aurocs.feed(score, labels, seq)

    def finish(self, counts: DescendingCounts) -> None:
        if self.tally is not None:
            self.tally.finish(counts)


# --------------------------------------------------------------------------- one run's rows


@dataclass
class _Variable:
    """One variable's strata over a run: per stratum and sequence its tokens and noise, the bootstrap's draws."""

    strata: Strata
    length: np.ndarray  # [strata, sequences (table codes)]
    noise: np.ndarray
    occurring: np.ndarray  # per table code: the sequence has pool tokens (the bootstrap's rows, in code order)
    mult: np.ndarray | None  # [occurring sequences, replicates]
    row: np.ndarray  # table code -> row of mult


def strata_rows(job: Any, con, totals: RunTotals, sums: dict[tuple[str, str], RankingSums]) -> list[dict]:
    """strata.csv's rows of one run, as :func:`reweight_audit.evaluation.strata.strata_rows` gives them."""
    opts = job.options
    if not stratify_by(opts) or not sums or not job.methods:
        return []
    occurring = totals.length > 0
    n_boot = int(opts.bootstrap)
    mult = multiplicities(int(occurring.sum()), n_boot, int(opts.seed)) if n_boot else None
    row = np.cumsum(occurring) - 1
    spill = next(iter(sums.values())).pattern  # every ranking spills the same rows: any one gives the strata
    n_tokens, n_noise = int(totals.length.sum()), int(totals.n_noise.sum())
    rows = []
    for by in stratify_by(opts):
        strata = find_strata(con, spill, by, opts.strata, max(n_tokens, 1))
        cells = sequence_cells(con, spill, strata, totals.n_seqs, len(totals.n_kind))
        var = _Variable(strata, cells.sum(axis=1, dtype=np.int64), cells[:, 1:].sum(axis=1, dtype=np.int64),
                        occurring, mult, row)
        del cells
        for rank_by in job.rank_by:
            for m in job.methods:
                per_scope, indexes, reps = _ranking(con, sums[(m.name, rank_by)], var, opts)
                for scope in opts.scope:
                    summary, per = stratified_summary(per_scope[scope], indexes, reps, n_boot=n_boot,
                                                      seed=int(opts.seed), level=LEVEL)
                    ident = {"run": job.label, "method": m.name, "family": getattr(m, "family", ""),
                             "rank_by": rank_by, "scope": scope, "k": opts.k, "stratify": by}
                    for one, lo, hi in zip(per, strata.x_lo, strata.x_hi):
                        rows.append({**ident, "stratum": str(one.pop("stratum") + 1), "x_lo": lo, "x_hi": hi,
                                     "n_tokens": one.pop("n"), **one})
                    rows.append({**ident, "stratum": ALL, "x_lo": strata.x_lo[0], "x_hi": strata.x_hi[-1],
                                 "n_tokens": n_tokens, "n_noise": n_noise, **summary})
    order = [{v: i for i, v in enumerate(values)} for values in (stratify_by(opts), job.rank_by, opts.scope)]
    return sorted(rows, key=lambda r: (order[0][r["stratify"]], order[1][r["rank_by"]], order[2][r["scope"]]))


def _ranking(con, sums: RankingSums, var: _Variable, opts: Any):
    """One ranking within every stratum: per scope the strata's per-sequence fields ([occurring, fields] each),
    the strata's indexes (AUROC) and a callable giving the stratified AUROC's replicates."""
    folder = sums.spill.parent.parent / "strata" / f"{sums.spill.stem}-{var.strata.by}"
    with stratum_files(con, sums.pattern, var.strata, folder) as files:
        per_scope, indexes, aurocs = _strata_passes(con, files, var, opts)
    return per_scope, indexes, lambda: _stratified_replicates(aurocs, var)


def _strata_passes(con, files: list[Path], var: _Variable, opts: Any):
    """Each stratum's passes over its rows (``files[j]``): see :func:`_ranking`."""
    k = opts.k_frac
    per_scope: dict[str, list[np.ndarray]] = {"global": []}
    indexes, aurocs = [], []
    for j in range(var.strata.n_strata):
        length, noise = var.length[j], var.noise[j]
        n, n_pos = int(length.sum()), int(noise.sum())
        counts = DescendingCounts(n - n_pos, np.array([n_pos]), (k,), ())
        tally = tables.SequenceTally(length.size, 2, [("all", 0, k, [0, 1]), ("n", 0, k, [1])]) \
            if "global" in opts.scope else None
        reps = None if var.mult is None else AurocReplicates(var.mult, var.row, noise[var.occurring],
                                                             (length - noise)[var.occurring])
        feed = _Pass(tally, reps) if tally is not None or reps is not None else None
        tables.value_counts(con, files[j], counts, 1, kind_columns=["kind >= 0"], tally=feed)
        if counts.clean_ge != n - n_pos or counts.pools[0].pos_ge != n_pos:
            raise AuditError(f"{files[j]}: stratum {j + 1} of --stratify {var.strata.by} read "
                             f"{counts.clean_ge + counts.pools[0].pos_ge} rows, expected {n}; rerun with --engine memory")
        indexes.append(HistogramIndex(counts))
        aurocs.append(reps)
        if tally is not None:
            per_scope["global"].append(_global_fields(counts, tally.out, length, noise, k)[var.occurring])
    if "sequence" in opts.scope:
        per_scope["sequence"] = [_sequence_fields(con, f, var.length.shape[1], k)[var.occurring] for f in files]
    return per_scope, indexes, aurocs


def _global_fields(counts: DescendingCounts, per: dict, length: np.ndarray, noise: np.ndarray,
                   k: float) -> np.ndarray:
    """[sequences, SEQUENCE_FIELDS] of one stratum in global scope, as ``per_sequence`` gives them."""
    pc = counts.cut(0, k)
    share = pc.cut.share
    hit = pc.cut.hit(per["n_above"], per["n_tied"]) if pc.cut.n_top else np.zeros(length.size)
    noisy = (noise > 0).astype(np.float64)
    return np.column_stack([per["n_above"] + per["n_tied"] * share, per["all_above"] + per["all_tied"] * share,
                            noise, length, hit * noisy, noisy]).astype(np.float64)


def _stratified_replicates(aurocs: list[AurocReplicates], var: _Variable) -> np.ndarray:
    """[replicates]: the noise-weighted mean over the strata of each replicate's AUROC."""
    per_stratum = np.column_stack([a.replicates() for a in aurocs])
    weights = replicate_sums(var.noise[:, var.occurring], var.mult).T
    return stratified_mean(per_stratum, weights, axis=1)


def _sequence_fields(con, rows: Path, n_seqs: int, k: float) -> np.ndarray:
    """[sequences, SEQUENCE_FIELDS] of one stratum in sequence scope: its rows (``rows``) streamed in sequence
    order, each whole sequence's tokens counted as ``per_sequence`` counts them."""
    out = np.zeros((n_seqs, len(SEQUENCE_FIELDS)))
    for s, y, seq in sequence_batches(con, rows, "score, kind >= 0, seq"):
        have, local = np.unique(seq, return_inverse=True)
        out[have] = per_sequence(s, y, local.reshape(-1).astype(np.intp), have.size, (k,), "sequence")[0]
    return out

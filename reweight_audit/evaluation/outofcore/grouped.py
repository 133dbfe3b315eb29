"""``compare --by-meta`` out of core: every metric per group of sequences, from the spilled scores.

A group is a set of sequences; its pool is their tokens. Its cut, AUROC and
AP come from the per-value counts of its rows only (a DuckDB ``WHERE`` on the
sequence code), its per-sequence counts from the same sorted pass, as the whole
run's, and sequence scope from the per-sequence counts already summed; the
rows are those of :func:`reweight_audit.evaluation.groups.group_rows`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from reweight_audit.evaluation import metrics
from reweight_audit.evaluation.outofcore import tables
from reweight_audit.evaluation.outofcore.accumulate import RankingSums, RunTotals
from reweight_audit.evaluation.outofcore.histogram import DescendingCounts, HistogramIndex
from reweight_audit.evaluation.outofcore.rows import metric_row


def group_rows(job: Any, con, totals: RunTotals, sums: dict) -> list[dict]:
    """by_group.csv's rows of one run, in the in-memory order: group, rank-by, scope, method."""
    codes, names = job.grouping
    opts = job.options
    con.register("_groups", pa.table({"seq": np.arange(codes.size, dtype=np.int32), "g": codes.astype(np.int32)}))
    rows = []
    for gi, group in enumerate(names):
        inside = codes == gi
        where = f"seq IN (SELECT seq FROM _groups WHERE g = {gi})"
        length, n_noise = np.where(inside, totals.length, 0), np.where(inside, totals.n_noise, 0)
        counts = {"group_by": opts.by_meta, "group": group, "n_tokens": int(length.sum()),
                  "n_noise": int(n_noise.sum()), "n_seqs": int(np.count_nonzero(length)),
                  "n_noise_seqs": int(np.count_nonzero(n_noise))}
        for rank_by in job.rank_by:
            for scope in opts.scope:
                for m in job.methods:
                    s = sums[(m.name, rank_by)].load()
                    main, per_seq, index = _group_counts(con, s, where, inside, length, n_noise, scope, opts.k_frac)
                    row = metric_row(main, per_seq, np.where(inside, s.w_total, 0.0), np.where(inside, s.w_noise, 0.0),
                                     length, index, opts)
                    s.release()
                    rows.append({"run": job.label, "method": m.name, "family": getattr(m, "family", ""),
                                 "rank_by": rank_by, "scope": scope, "k": opts.k, **counts, **row})
    con.unregister("_groups")
    return rows


def _group_counts(con, sums: RankingSums, where: str, inside: np.ndarray, length: np.ndarray, n_noise: np.ndarray,
                  scope: str, k: float) -> tuple[metrics.Counts, np.ndarray, HistogramIndex]:
    """The group's counts at ``k``, its per-sequence counts and its ranking metrics' index."""
    n, n_pos = int(length.sum()), int(n_noise.sum())
    counts = DescendingCounts(n - n_pos, np.array([n_pos]), (k,), ())
    tally = tables.SequenceTally(inside.size, 2, [("all", 0, k, [0, 1]), ("n", 0, k, [1])]) \
        if scope == "global" else None
    tables.value_counts(con, sums.pattern, counts, 1, where=where, kind_columns=["kind >= 0"], tally=tally)
    noisy = (n_noise > 0).astype(np.float64)
    if scope == "sequence":
        per_seq = np.where(inside[:, None], sums.seq_fields, 0.0)
        f = dict(zip(metrics.SEQUENCE_FIELDS, per_seq.sum(axis=0)))
        main = metrics.Counts(n, n_pos, int(round(f["n_top"])), f["found"], int(noisy.sum()), f["hits"])
        return main, per_seq, HistogramIndex(counts)
    pc = counts.cut(0, k)
    per = tally.out
    share = pc.cut.share
    hit = pc.cut.hit(per["n_above"], per["n_tied"]) if pc.cut.n_top else np.zeros(inside.size)
    per_seq = np.column_stack([per["n_above"] + per["n_tied"] * share, per["all_above"] + per["all_tied"] * share,
                               n_noise, length, hit * noisy, noisy])
    main = metrics.Counts(n, n_pos, pc.cut.n_top, pc.found, int(noisy.sum()), float(np.sum(hit * noisy)))
    return main, per_seq, HistogramIndex(counts)

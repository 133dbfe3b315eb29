"""A chunk's weights: each method as compare computes it, and the methods whose weight needs the whole table.

Imports only :mod:`.chunks`, :mod:`.accumulate` and :mod:`.tables`, so that the
single-process pass (:mod:`.engine`) and the Ray map tasks (:mod:`.distributed`)
share it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from reweight_audit.evaluation import metrics
from reweight_audit.evaluation.outofcore import chunks as ch
from reweight_audit.evaluation.outofcore import strata, tables
from reweight_audit.evaluation.outofcore.accumulate import chunk_weights
from reweight_audit.methods import Method


def chunk_rankings(job: Any, chunk: ch.Chunk, methods: list[Method], sums: dict,
                    rngs: dict) -> dict[str, np.ndarray]:
    """Each method's weights on the chunk (returned), and each rank-by's scores added to its sums."""
    run = chunk.run
    logp = run.column("logp")
    sum_p2 = run.column("sum_p2") if "grad" in job.rank_by else None
    weights = {}
    # --stratify's variables, spilled beside every ranking's scores ({} without it)
    extra = strata.chunk_values(job.options, chunk, lambda c: _rarity(job, c))
    for m in methods:
        w = weights[m.name] = method_weights(job, m, chunk, rngs[m.name])
        for r in job.rank_by:
            sums[(m.name, r)].add(chunk, ranking_scores(run, w, r, logp, sum_p2), extra)
    return weights


def ranking_scores(run: Any, w: np.ndarray, rank_by: str, logp: np.ndarray, sum_p2: np.ndarray | None) -> np.ndarray:
    """The pool tokens' scores of one rank-by, as the spill holds them."""
    return run.pool.take(metrics.rank_scores(w, rank_by, logp, sum_p2)) + 0.0  # -0.0 -> 0.0: one value per tie


def method_weights(job: Any, m: Method, chunk: ch.Chunk, rng) -> np.ndarray:
    if m.name in CORPUS_METHODS:
        return CORPUS_METHODS[m.name](job, chunk)
    return chunk_weights(m, chunk, job.param_map.get(m.name), rng)


# --------------------------------------------------------------------------- corpus-level methods


def _rarity(job: Any, chunk: ch.Chunk) -> np.ndarray:
    """``rarity`` (:func:`reweight_audit.methods.control.token_rarity`) with the table's token-id counts: the
    one default method whose weight depends on the whole corpus, so a chunk alone cannot give it."""
    counts = job.__dict__.get("_id_counts")
    if counts is None:
        counts = job.__dict__["_id_counts"] = _token_id_counts(job.path)
    ids, n = counts
    tok = chunk.run.column("token_id")
    return np.log(n) - np.log(ids[np.searchsorted(ids[:, 0], tok), 1].astype(np.float64))


def _token_id_counts(path: Path) -> tuple[np.ndarray, int]:
    import duckdb

    with duckdb.connect(":memory:") as con:
        table = con.execute(f"SELECT token_id, count(*) AS n FROM read_parquet('{tables._quote(path)}') "
                            "GROUP BY token_id ORDER BY token_id").fetchnumpy()
    ids = np.stack([np.asarray(table["token_id"], dtype=np.int64), np.asarray(table["n"], dtype=np.int64)], 1)
    return ids, int(ids[:, 1].sum())


#: Methods whose weight depends on the whole table (not on the token, its sequence or its batch).
CORPUS_METHODS: dict[str, Callable] = {"rarity": _rarity}



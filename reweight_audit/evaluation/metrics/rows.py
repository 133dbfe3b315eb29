"""One ranking's rows as compare reports them: every metric at the cut with intervals, the curve, and per noise kind.

The public functions validate their arrays once, in the :class:`ScoreIndex`
they build (or are given): compare builds one index per method × rank-by and
asks it for every scope without scanning the arrays again. Imports
:mod:`reweight_audit.core` and the rest of the package.
"""
from __future__ import annotations

import math

from collections.abc import Iterable
from dataclasses import replace

import numpy as np

from reweight_audit.evaluation.metrics.bootstrap import LEVEL, intervals
from reweight_audit.evaluation.metrics.checks import check_boot, check_k, check_scope, code_layout
from reweight_audit.evaluation.metrics.counts import evaluate
from reweight_audit.evaluation.metrics.declarations import NAN, count_values, metric_specs, ranking_values
from reweight_audit.evaluation.metrics.ranking import ScoreIndex


def ranking_metrics(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, *, k: float,
                    cuts: Iterable[float], scope: str, n_boot: int, seed: int,
                    index: ScoreIndex | None = None) -> tuple[dict[str, float], dict[float, dict[str, float]]]:
    """Every metric of one ranking in one scope: at cut ``k`` with intervals, and the per-cut ones at every cut.

    Returns ``(row, curve)``: ``row`` has every metric of :data:`METRICS` and
    ``<name>_lo``/``<name>_hi`` for those with an interval (NaN when
    ``n_boot`` is 0); ``curve`` maps each cut of ``cuts`` ∪ {k}, ascending,
    to the per-cut metrics. The weights of the weight metrics are the scores.
    ``index``: the :class:`ScoreIndex` of these arrays (built with ``seq_codes``); given, its checked arrays
    are used and these are not scanned again. Built (and the arrays checked) when not given.
    """
    if index is None:
        index = ScoreIndex(scores, is_noise, seq_codes)
    return _ranking_metrics(index, k=check_k(k), cuts=cuts, scope=check_scope(scope), n_boot=n_boot, seed=seed)



def weight_sums(s: np.ndarray, y: np.ndarray, codes: np.ndarray, n_codes: int) -> dict[str, float]:
    """``w_total`` and ``w_noise`` (the weight metrics' sums) as the exactly rounded sum (``math.fsum``) of the
    per-sequence sums ``np.bincount`` adds in row order. A sequence is never split, so these are the same bits
    however the table is cut into chunks or shards (the DuckDB engine sums the same way); ``s.sum()`` would
    depend on the blocking, by up to ~n·eps."""
    return {"w_total": math.fsum(np.bincount(codes, weights=s, minlength=n_codes)),
            "w_noise": math.fsum(np.bincount(codes[y], weights=s[y], minlength=n_codes))}

def _ranking_metrics(index: ScoreIndex, *, k: float, cuts: Iterable[float], scope: str, n_boot: int,
                     seed: int) -> tuple[dict[str, float], dict[float, dict[str, float]]]:
    s, y, codes, n_codes = index.s, index.y, index.codes, index.n_codes
    all_cuts = tuple(sorted({check_k(c, "every cut") for c in cuts} | {k}))
    counts = evaluate(s, y, codes, n_codes, all_cuts, scope)
    main = replace(counts[k], **weight_sums(s, y, codes, n_codes))
    row = {**count_values(main), **ranking_values(index)}
    bounds = {}
    if n_boot:
        check_boot(n_boot, seed, LEVEL)
        index.check_as_weights()
        bounds = intervals(s, y, codes, n_codes, k, scope, s, n_boot=int(n_boot), seed=int(seed), level=LEVEL)
    for spec in metric_specs(interval=True):
        row[f"{spec.name}_lo"], row[f"{spec.name}_hi"] = bounds.get(spec.name, (NAN, NAN))
    return row, {c: count_values(counts[c], per_cut_only=True) for c in all_cuts}


def kind_metrics(index: ScoreIndex, kinds: list[str], *, k: float, scope: str) -> list[dict]:
    """Per noise kind, every metric at cut ``k`` with positives = that kind, pool = clean tokens + that kind.

    ``index``: the :class:`ScoreIndex` of the ranking, built with its sequence codes and ``kind_codes`` (the
    kind's index in ``kinds`` per noise token, -1 for clean ones). Global scope and the ranking metrics come
    from the shared sort; sequence scope evaluates each kind's pool.
    """
    if not kinds:
        return []
    k, scope = check_k(k), check_scope(scope)
    scores, is_noise, kind_codes = index.s, index.y, index.kind_codes
    clean = ~is_noise
    n_clean = int(clean.sum())
    noise_idx = np.flatnonzero(is_noise)
    # as weight_sums: exactly rounded sums of per-sequence sums (per sequence and kind for the noise)
    clean_w = math.fsum(np.bincount(index.codes[clean], weights=scores[clean], minlength=index.n_codes))
    per_kind = np.bincount(index.codes[noise_idx] * len(kinds) + kind_codes[noise_idx], weights=scores[noise_idx],
                           minlength=index.n_codes * len(kinds)).reshape(index.n_codes, len(kinds))
    kind_w = [math.fsum(per_kind[:, j]) for j in range(len(kinds))]
    rows = []
    for ki, kind in enumerate(kinds):
        if scope == "global":
            counts = index.topk_counts(k, ki)
        else:
            pos = kind_codes == ki
            pool = clean | pos
            codes, n_codes = code_layout(index.codes[pool])
            counts = evaluate(scores[pool], pos[pool], codes, n_codes, (k,), scope)[k]
        counts = replace(counts, w_total=clean_w + kind_w[ki], w_noise=kind_w[ki])
        rows.append({"kind": kind, "n_kind": int(counts.n_noise), "n_pool": n_clean + int(counts.n_noise),
                     **count_values(counts), **ranking_values(index, ki)})
    return rows

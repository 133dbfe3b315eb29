"""Cuts, AUROC and AP from counts per distinct score, read in descending score order (pure NumPy).

DuckDB hands over, per distinct ranking score v (highest first, in batches),
the clean tokens at v and the noise tokens of each kind at v. One pass with
running totals gives, for the pool of all noise and the pool of each kind
(clean tokens + that kind), exactly what :mod:`reweight_audit.evaluation.metrics`
computes from a sorted copy: the :class:`~reweight_audit.evaluation.metrics.Cut`
at every cut (n_top, value, tied, slots, with the positives above and tied),
the Mann-Whitney sum of the AUROC in integers and the AP sum over thresholds.
These per-value counts add across shards: the map step of several machines.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reweight_audit.evaluation.metrics import Cut, top_size
from reweight_audit.evaluation.metrics.declarations import NAN


@dataclass
class PoolCut:
    """One pool's top set at one cut: the :class:`Cut` and its positives above and tied at the cut value."""

    cut: Cut
    pos_above: int = 0
    pos_tied: int = 0

    @property
    def found(self) -> float:
        return 0.0 if self.cut.n_top == 0 else float(self.cut.expected(self.pos_above, self.pos_tied))


@dataclass
class _Pool:
    n_pos: int
    cuts: dict[float, int]  # k -> n_top, still to find
    pos_ge: int = 0
    auroc_sum: int = 0
    ap_sum: float = 0.0
    found: dict[float, PoolCut] = field(default_factory=dict)


class DescendingCounts:
    """Running totals over distinct scores fed highest first; pool 0 is all noise, pool 1 + j is kind j."""

    def __init__(self, n_clean: int, n_kind: np.ndarray, ks_all: tuple[float, ...], ks_kind: tuple[float, ...]):
        self.n_clean = int(n_clean)
        self.clean_ge = 0
        n_kind = np.asarray(n_kind, dtype=np.int64)
        self.pools = [_Pool(int(n_kind.sum()), {}), *[_Pool(int(n), {}) for n in n_kind]]
        for pool, ks in zip(self.pools, [ks_all] + [ks_kind] * n_kind.size):
            for k in ks:
                n_top = int(top_size(k, self.n_clean + pool.n_pos))
                if n_top == 0:
                    pool.found[k] = PoolCut(Cut.empty())
                else:
                    pool.cuts[k] = n_top

    def feed(self, value: np.ndarray, clean: np.ndarray, kinds: np.ndarray) -> None:
        """One batch of distinct scores (descending), clean tokens at each, ``kinds[j]``: kind j's tokens at each."""
        clean = np.asarray(clean, dtype=np.int64)
        clean_ge = self.clean_ge + np.cumsum(clean)
        kinds = np.asarray(kinds, dtype=np.int64).reshape(-1, value.size)
        for i, pool in enumerate(self.pools):
            pos = kinds.sum(axis=0) if i == 0 else kinds[i - 1]
            self._feed_pool(pool, value, clean, clean_ge, pos)
        self.clean_ge = int(clean_ge[-1]) if value.size else self.clean_ge

    def _feed_pool(self, pool: _Pool, value, clean, clean_ge, pos) -> None:
        pos_ge = pool.pos_ge + np.cumsum(pos)
        total_ge = clean_ge + pos_ge
        for k, n_top in list(pool.cuts.items()):
            at = int(np.searchsorted(total_ge, n_top, side="left"))
            if at < value.size:
                tied = int(clean[at] + pos[at])
                above = int(total_ge[at]) - tied
                pool.found[k] = PoolCut(Cut(n_top, value[at], tied, n_top - above), int(pos_ge[at] - pos[at]),
                                        int(pos[at]))
                del pool.cuts[k]
        hit = pos > 0
        if hit.any():
            p, ge, cge, c = pos[hit], pos_ge[hit], clean_ge[hit], clean[hit]
            # clean strictly below v, twice, plus clean tied at v: the Mann-Whitney U in integers
            pool.auroc_sum += int(np.sum(p * (2 * (self.n_clean - cge) + c)))
            pool.ap_sum += float(np.sum(p * (ge / (ge + cge))))
        pool.pos_ge = int(pos_ge[-1]) if value.size else pool.pos_ge

    def cut(self, pool: int, k: float) -> PoolCut:
        return self.pools[pool].found[k]

    def auroc(self, pool: int) -> float:
        p = self.pools[pool]
        if p.n_pos == 0 or self.n_clean == 0:
            return NAN
        return float(p.auroc_sum) / (2.0 * p.n_pos * self.n_clean)

    def average_precision(self, pool: int) -> float:
        p = self.pools[pool]
        return NAN if p.n_pos == 0 else p.ap_sum / p.n_pos


class HistogramIndex:
    """What :func:`~reweight_audit.evaluation.metrics.declarations.ranking_values` asks of an index, from the
    running totals: ``auroc(kind)`` and ``average_precision(kind)`` (kind None: all noise)."""

    def __init__(self, counts: DescendingCounts):
        self.counts = counts

    def auroc(self, kind: int | None = None) -> float:
        return self.counts.auroc(0 if kind is None else kind + 1)

    def average_precision(self, kind: int | None = None) -> float:
        return self.counts.average_precision(0 if kind is None else kind + 1)

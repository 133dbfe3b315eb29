"""The counts of a ranking's top set at its cuts (:class:`Counts`), in total and per sequence, and the count metrics.

Every count comes from the one top-k-with-ties primitive (:mod:`.topk`); the
per-sequence counts (:func:`sequence_counts`) are what the bootstrap, the
strata and the sweep sum. Imports :mod:`reweight_audit.core` and the package's
declarations, checks and topk.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation.metrics.checks import (check_codes, check_inputs, check_k, check_labels,
                                                      check_scope, check_scores, check_weights, same_length)
from reweight_audit.evaluation.metrics.declarations import (CUTS, Counts, count_values, mass_ratio, mass_share,
                                                            number)
from reweight_audit.evaluation.metrics.topk import GlobalTopK, SequenceTopK

#: The :class:`Counts` fields a sequence contributes, in the column order of :func:`sequence_counts`.
SEQUENCE_FIELDS = ("found", "n_top", "n_noise", "n", "hits", "n_noisy_seqs")


def evaluate(s: np.ndarray, y: np.ndarray, codes: np.ndarray, n_codes: int, ks: tuple[float, ...],
             scope: str) -> dict[float, Counts]:
    """The top set's counts at every cut of ``ks`` (checked inputs): one partition (global) or one
    within-sequence sort serves all."""
    n, n_noise = s.size, int(np.count_nonzero(y))
    out = {}
    if scope == "global":
        pool = GlobalTopK(s, ks, y, codes, n_codes)
        for k in ks:
            cut = pool.cut(k)
            out[k] = Counts(n, n_noise, cut.n_top, pool.found(cut), pool.noisy.size, pool.hits(cut).sum())
    else:
        seqs = SequenceTopK(s, y, codes, n_codes)
        n_noisy = int(np.count_nonzero(seqs.nlen))
        for k in ks:
            cut = seqs.cut(k)
            above, tied = seqs.marked(cut)
            out[k] = Counts(n, n_noise, int(cut.n_top.sum()), cut.expected(above, tied).sum(), n_noisy,
                            cut.hit(above, tied).sum())
    return out


def per_sequence(s: np.ndarray, y: np.ndarray, codes: np.ndarray, n_codes: int, ks: tuple[float, ...],
                 scope: str) -> np.ndarray:
    """[len(ks), n_codes, SEQUENCE_FIELDS]: per sequence code, its share of the top set's counts at every cut.

    Checked inputs. One pool (one partition, or one within-sequence sort) serves every cut. Summed over the
    sequences, the fields are the counts of :func:`evaluate`; summed over a bootstrap replicate's draws, that
    replicate's.
    """
    length = np.bincount(codes, minlength=n_codes).astype(np.float64)
    n_noise = np.bincount(codes[y], minlength=n_codes).astype(np.float64)
    noisy = (n_noise > 0).astype(np.float64)
    out = np.empty((len(ks), n_codes, len(SEQUENCE_FIELDS)))
    if scope == "global":
        pool = GlobalTopK(s, ks, y, codes, n_codes)
    else:
        seqs = SequenceTopK(s, y, codes, n_codes)
    for i, k in enumerate(ks):
        if scope == "global":
            cut = pool.cut(k)
            p = cut.inclusion(s)
            top = np.bincount(codes, weights=p, minlength=n_codes)
            found = np.bincount(codes[y], weights=p[y], minlength=n_codes)
            hit = np.zeros(n_codes)
            hit[pool.noisy] = pool.hits(cut)
        else:
            cut = seqs.cut(k)
            above, tied = seqs.marked(cut)
            found, hit, top = cut.expected(above, tied), cut.hit(above, tied), cut.n_top.astype(np.float64)
        out[i] = np.column_stack([found, top, n_noise, length, hit * noisy, noisy])
    return out


def counts_of(fields: np.ndarray) -> Counts:
    """:class:`Counts` from an array whose last axis is :data:`SEQUENCE_FIELDS` (any leading shape)."""
    fields = np.asarray(fields, dtype=np.float64)
    return Counts(**{name: fields[..., i] for i, name in enumerate(SEQUENCE_FIELDS)})


def topk_metrics(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, k: float,
                 scope: str = "global") -> dict[str, float]:
    """Token precision, token recall, sequence hit rate and lift of the top-k set.

    With ``p_i`` the inclusion probability (:func:`inclusion_probability`):
    ``tok_prec = sum_noise p / sum p``, ``tok_rec = sum_noise p / #noise``,
    ``lift = tok_prec / (#noise / N)``, ``seq_hit`` = mean over sequences with
    >= 1 noise token of P(>= 1 of its noise tokens in the top set). That last
    probability is 1 with a noise token strictly above the cut, else, with b of
    its noise tokens among the g tokens tied at the cut for t slots,
    ``1 - C(g-b, t) / C(g, t)`` (hypergeometric; the tie group is the pool's in
    global scope, the sequence's own in sequence scope).
    """
    s, y, codes, n_codes = check_inputs(scores, is_noise, seq_codes)
    k = check_k(k)
    return count_values(evaluate(s, y, codes, n_codes, (k,), check_scope(scope))[k], per_cut_only=True)


def curve(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray,
          cuts: Iterable[float] = CUTS, scope: str = "global") -> dict[float, dict[str, float]]:
    """:func:`topk_metrics` at every cut, keyed by ``float(cut)`` in the order given.

    One partition (global) or one within-sequence sort (sequence) serves every cut.
    """
    s, y, codes, n_codes = check_inputs(scores, is_noise, seq_codes)
    try:
        ks = [check_k(c, "every cut") for c in cuts]
    except TypeError:
        raise AuditError(f"cuts must be a sequence of fractions in (0, 1], got {cuts!r}") from None
    if not ks:
        raise AuditError("cuts is empty; give at least one cut")
    res = evaluate(s, y, codes, n_codes, tuple(dict.fromkeys(ks)), check_scope(scope))
    return {k: count_values(res[k], per_cut_only=True) for k in ks}


def sequence_counts(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, cuts: Iterable[float],
                    scope: str = "global", n_seqs: int | None = None) -> np.ndarray:
    """Per sequence code 0..n_seqs-1, the :class:`Counts` fields (:data:`SEQUENCE_FIELDS`) at every cut.

    Returns ``[len(cuts), n_seqs, len(SEQUENCE_FIELDS)]``. Summed over axis 1
    it gives each cut's counts (ties fractional, as everywhere); multiplied by
    a bootstrap multiplicity matrix (:func:`resampled_sums`), each replicate's,
    with the cut held at the full-sample cut. ``n_seqs`` (default: the largest
    code + 1) fixes the rows, so that pools of one run (say, one per noise
    kind) share the same sequences and therefore the same bootstrap draws;
    a sequence without tokens in the pool contributes a row of zeros.
    Many rankings of one pool: :class:`SequenceCounts` checks the labels and codes once.
    """
    s, y, codes, n_codes = check_inputs(scores, is_noise, seq_codes)
    if n_seqs is not None:
        codes, n_codes = _fixed_rows(seq_codes, codes, n_seqs)
    ks = tuple(check_k(c, "every cut") for c in cuts)
    return per_sequence(s, y, codes, n_codes, ks, check_scope(scope))


def _fixed_rows(raw: np.ndarray, codes: np.ndarray, n_seqs: int) -> tuple[np.ndarray, int]:
    """The codes as given (not renumbered) with ``n_seqs`` rows; checked codes ``codes`` must fit."""
    if int(n_seqs) < int(codes.max()) + 1:
        raise AuditError(f"n_seqs {n_seqs} is smaller than the number of sequence codes {int(codes.max()) + 1}")
    return np.asarray(raw, dtype=np.intp), int(n_seqs)


class SequenceCounts:
    """:func:`sequence_counts` of many rankings (and parts) of one pool: labels, codes, cuts and scope are
    checked once, here; :meth:`of` checks only the scores it is given."""

    def __init__(self, is_noise: np.ndarray, seq_codes: np.ndarray, cuts: Iterable[float], scope: str, *,
                 n_seqs: int):
        codes, _ = check_codes(seq_codes, np.size(seq_codes))
        self.codes, self.n_codes = _fixed_rows(seq_codes, codes, n_seqs)
        self.y = check_labels(is_noise, self.codes.size, ref="seq_codes")
        self.ks = tuple(check_k(c, "every cut") for c in cuts)
        self.scope = check_scope(scope)

    def of(self, scores: np.ndarray, parts: Iterable[np.ndarray | slice] = (slice(None),)) -> list[np.ndarray]:
        """Per part (an index or mask of the pool's tokens; default: all of them), ``[len(cuts), n_seqs,
        len(SEQUENCE_FIELDS)]`` of the ranking ``scores`` (one per token of the pool, checked once)."""
        s = check_scores(scores)
        same_length(s, "scores", self.codes.size, "seq_codes")
        return [per_sequence(s[p], self.y[p], self.codes[p], self.n_codes, self.ks, self.scope) for p in parts]



def noise_mass(weights: np.ndarray, is_noise: np.ndarray) -> tuple[float, float]:
    """``(share, ratio)``: ``share = sum_noise w / sum w``, ``ratio = share / (#noise / N)``.

    ``ratio > 1``: the method puts more than its token share of weight on
    noise. ``share`` is NaN when ``sum w = 0``; ``ratio`` also when there is no noise.
    """
    w = check_weights(weights)
    y = check_labels(is_noise, w.size, ref="weights")
    c = Counts(y.size, int(np.count_nonzero(y)), w_total=float(w.sum()), w_noise=float(w[y].sum()))
    return number(mass_share(c)), number(mass_ratio(c))

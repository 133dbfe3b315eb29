"""The top-k-with-ties primitive (reweight_audit.evaluation.metrics.topk) against every ordering of the ties,
and by hand; the NaN-dropping quantile against np.quantile."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from reweight_audit.evaluation import metrics
from reweight_audit.evaluation.metrics import topk
from reweight_audit.evaluation.metrics.topk import Cut, GlobalTopK, SequenceTopK, sorted_cut, top_size


def tie_orders(s: np.ndarray) -> list[tuple[int, ...]]:
    """Every ranking (highest first) of the tokens consistent with the scores: each tied block in every order."""
    blocks = [list(np.flatnonzero(s == v)) for v in sorted(set(s.tolist()), reverse=True)]
    return [tuple(i for block in perm for i in block) for perm in itertools.product(
        *(list(itertools.permutations(b)) for b in blocks))]


def brute_in_top(s: np.ndarray, k: float) -> np.ndarray:
    """[orderings, tokens]: whether each token is among the first ``floor(k*n + 1/2)`` of each ordering."""
    n_top = math.floor(Fraction(repr(k)) * s.size + Fraction(1, 2))
    out = []
    for order in tie_orders(s):
        row = np.zeros(s.size, bool)
        row[list(order[:n_top])] = True
        out.append(row)
    return np.array(out)


def random_case(rng):
    n = int(rng.integers(1, 8))
    s = rng.integers(0, int(rng.choice([1, 2, 3, 4])), n).astype(float)
    marked = rng.random(n) < 0.5
    return s, marked


CUTS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)


def test_global_cut_is_the_average_over_every_ordering_of_the_ties():
    rng = np.random.default_rng(0)
    for case in range(150):
        s, marked = random_case(rng)
        pool = GlobalTopK(s, CUTS, marked, np.zeros(s.size, np.intp), 1)
        for k in CUTS:
            in_top = brute_in_top(s, k)
            cut = pool.cut(k)
            msg = f"case {case} k={k} s={s} marked={marked}"
            np.testing.assert_allclose(cut.inclusion(s), in_top.mean(axis=0), rtol=1e-12, atol=1e-12, err_msg=msg)
            assert pool.found(cut) == pytest.approx(in_top[:, marked].sum(axis=1).mean(), rel=1e-12, abs=1e-12), msg
            want_hit = in_top[:, marked].any(axis=1).mean() if marked.any() else None
            if want_hit is not None:
                assert pool.hits(cut)[0] == pytest.approx(want_hit, rel=1e-12, abs=1e-12), msg


def test_sequence_cut_is_the_average_over_every_ordering_within_each_sequence():
    rng = np.random.default_rng(1)
    for case in range(150):
        s, marked = random_case(rng)
        codes = rng.integers(0, int(rng.integers(1, 4)), s.size).astype(np.intp)
        n_codes = int(codes.max()) + 1
        seqs = SequenceTopK(s, marked, codes, n_codes)
        for k in CUTS:
            cut = seqs.cut(k)
            above, tied = seqs.marked(cut)
            found, hit, p = cut.expected(above, tied), cut.hit(above, tied), cut.inclusion(s, codes)
            for q in range(n_codes):
                members = np.flatnonzero(codes == q)
                msg = f"case {case} k={k} seq {q} s={s[members]} marked={marked[members]}"
                if not members.size:
                    assert cut.n_top[q] == 0 and found[q] == 0 and hit[q] == 0, msg
                    continue
                in_top = brute_in_top(s[members], k)
                np.testing.assert_allclose(p[members], in_top.mean(axis=0), rtol=1e-12, atol=1e-12, err_msg=msg)
                mine = marked[members]
                assert found[q] == pytest.approx(in_top[:, mine].sum(axis=1).mean(), rel=1e-12, abs=1e-12), msg
                assert hit[q] == pytest.approx(in_top[:, mine].any(axis=1).mean(), rel=1e-12, abs=1e-12), msg


def test_sorted_cut_equals_the_partition_cut():
    rng = np.random.default_rng(2)
    for _ in range(200):
        s, _ = random_case(rng)
        asc = np.sort(s)
        for k in CUTS:
            want = GlobalTopK(s, (k,)).cut(k)
            got = sorted_cut(asc, lambda v: int(np.count_nonzero(s >= v)), lambda v: int(np.count_nonzero(s > v)),
                             int(top_size(k, s.size)))
            assert (got.n_top, got.value, got.tied, got.slots) == (want.n_top, want.value, want.tied, want.slots)


def test_hand_computed_cut():
    # scores 3 > 2 = 2 = 2 > 1, k = 40 %: n_top = 2; cut value 2; one token above, three tied for one slot
    s = np.array([3.0, 2.0, 2.0, 2.0, 1.0])
    cut = GlobalTopK(s, (0.4,)).cut(0.4)
    assert (cut.n_top, cut.value, cut.tied, cut.slots) == (2, 2.0, 3, 1)
    assert cut.share == pytest.approx(1 / 3)
    np.testing.assert_allclose(cut.inclusion(s), [1, 1 / 3, 1 / 3, 1 / 3, 0])
    # two marked tokens, both tied: 2/3 expected in the top set; a hit unless the slot goes to the third: 2/3
    assert cut.expected(0, 2) == pytest.approx(2 / 3)
    assert cut.hit(np.array([0, 1, 0]), np.array([2, 0, 0])).tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    # k = 5 % of 5 tokens is 0.25 -> no token: an empty top set, nothing in it
    empty = GlobalTopK(s, (0.05,)).cut(0.05)
    assert empty == Cut.empty() and empty.share == 0.0 and not empty.inclusion(s).any()
    assert empty.hit(np.array([0]), np.array([1])).tolist() == [0.0]


def test_hand_computed_sequence_cut():
    # sequence 0: [5, 4, 4] at 50 % -> top 2 (1.5 rounds up): 5 in, the two 4s share one slot;
    # sequence 1: [1, 1] -> top 1, both share it; sequence 2 has no tokens
    s = np.array([5.0, 4.0, 4.0, 1.0, 1.0])
    codes = np.array([0, 0, 0, 1, 1], dtype=np.intp)
    seqs = SequenceTopK(s, np.array([False, True, False, True, True]), codes, 3)
    cut = seqs.cut(0.5)
    assert cut.n_top.tolist() == [2, 1, 0] and cut.tied.tolist() == [2, 2, 0] and cut.slots.tolist() == [1, 1, 0]
    assert cut.value[:2].tolist() == [4.0, 1.0] and math.isinf(cut.value[2])
    np.testing.assert_allclose(cut.inclusion(s, codes), [1, 0.5, 0.5, 0.5, 0.5])
    above, tied = seqs.marked(cut)
    assert above.tolist() == [0, 0, 0] and tied.tolist() == [1, 2, 0]
    np.testing.assert_allclose(cut.expected(above, tied), [0.5, 1.0, 0.0])
    np.testing.assert_allclose(cut.hit(above, tied), [0.5, 1.0, 0.0])


def test_top_size_rounds_half_up_after_six_decimals():
    assert int(top_size(0.29, 50)) == 15      # 14.499999999999998 means 14.5
    assert int(top_size(0.1, 25)) == 3        # 2.5 -> 3, not banker's 2
    assert int(top_size(0.3, 5)) == 2 and int(top_size(0.3, 1)) == 0
    assert top_size(0.3, np.array([5, 3, 1])).tolist() == [2, 1, 0]


def test_hit_probability_is_the_hypergeometric_tail():
    for g, t, b in itertools.product(range(1, 7), range(0, 7), range(0, 7)):
        if t > g or b > g:
            continue
        want = 1 - Fraction(math.comb(g - b, t), math.comb(g, t))
        assert topk.hit_probability(g, t, b) == pytest.approx(float(want), rel=1e-13, abs=1e-15), (g, t, b)


def test_nan_quantile_is_np_quantile_without_the_nans_bit_for_bit():
    rng = np.random.default_rng(3)
    q = (0.025, 0.975, 0.5, 0.05)
    for n in (1, 2, 3, 7, 40, 199, 200, 1000):
        values = np.round(rng.standard_normal((n, 6)), int(rng.integers(0, 4)))
        values[rng.random((n, 6)) < 0.2] = np.nan
        values[:, 5] = np.nan
        got = metrics.nan_quantile(values, q)
        for j in range(6):
            col = values[:, j][~np.isnan(values[:, j])]
            want = np.quantile(col, q) if col.size else np.full(len(q), np.nan)
            np.testing.assert_array_equal(got[:, j], want)
    assert np.isnan(metrics.nan_quantile(np.zeros(0), q)).all()
    assert metrics.percentile_interval(np.array([np.nan, 1.0, 2.0]), 0.5) == (1.25, 1.75)

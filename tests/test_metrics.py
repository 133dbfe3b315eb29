"""reweight_audit.evaluation.metrics against brute force, scikit-learn and a slow bootstrap loop."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from reweight_audit.evaluation import metrics
from reweight_audit.core.errors import AuditError

KEYS = ("tok_prec", "tok_rec", "seq_hit", "lift")
SMALL_CUTS = (0.1, 0.125, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)


# --------------------------------------------------------------------------- brute force


def ref_n_top(k: float, n: int) -> int:
    """floor(k*n + 1/2) with k read as the decimal it was written as."""
    return math.floor(Fraction(repr(k)) * n + Fraction(1, 2))


@lru_cache(maxsize=None)
def all_orders(n: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(n))), dtype=np.int64).reshape(-1, n)


def brute(scores, is_noise, codes, k, scope):
    """Average over every total order consistent with the scores of plain top-n metrics."""
    s, y, g = np.asarray(scores, float), np.asarray(is_noise, bool), np.asarray(codes)
    n = s.size
    orders = all_orders(n)
    orders = orders[np.all(np.diff(s[orders], axis=1) <= 0, axis=1)]   # ranked first = highest score
    pos = np.argsort(orders, axis=1)                                    # pos[o, i]: place of token i
    if scope == "global":
        in_top = pos < ref_n_top(k, n)
    else:
        same = g[:, None] == g[None, :]
        ahead = (pos[:, None, :] < pos[:, :, None]) & same                # [o, i, j]: j before i, same seq
        rank_in_seq = ahead.sum(axis=2)
        quota = np.array([ref_n_top(k, int(np.sum(g == gi))) for gi in g])
        in_top = rank_in_seq < quota
    n_top = in_top.sum(axis=1)
    noise_top = (in_top & y).sum(axis=1)
    n_noise = int(y.sum())
    noisy_seqs = sorted(set(g[y].tolist()))
    out = {}
    out["tok_prec"] = float(np.mean(noise_top / n_top)) if n_top[0] > 0 else math.nan
    out["tok_rec"] = float(np.mean(noise_top / n_noise)) if n_noise else math.nan
    if noisy_seqs:
        hits = [np.any(in_top & y & (g == q), axis=1) for q in noisy_seqs]
        out["seq_hit"] = float(np.mean(np.mean(hits, axis=0)))
    else:
        out["seq_hit"] = math.nan
    out["lift"] = out["tok_prec"] / (n_noise / n) if n_noise and n_top[0] > 0 else math.nan
    return out, in_top.mean(axis=0)


def random_small_case(rng):
    n = int(rng.integers(1, 8 if rng.random() < 0.9 else 9))
    levels = int(rng.choice([1, 2, 3, 5]))
    scores = rng.integers(0, levels, n).astype(float)
    is_noise = rng.random(n) < 0.4
    codes = rng.integers(0, int(rng.integers(1, 4)), n)
    return scores, is_noise, codes


def assert_metrics_close(got, want, msg=""):
    for key in KEYS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-12, equal_nan=True,
                                   err_msg=f"{key} {msg}")


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("scope", metrics.SCOPES)
def test_matches_brute_force_over_all_tie_breakings(scope):
    rng = np.random.default_rng(1234 + len(scope))
    for case in range(120):
        scores, is_noise, codes = random_small_case(rng)
        if case % 2:   # sequences contiguous (the score table's layout), in a random code order
            order = np.argsort(rng.permutation(codes.max() + 1)[codes], kind="stable")
            scores, is_noise, codes = scores[order], is_noise[order], codes[order]
        got_curve = metrics.curve(scores, is_noise, codes, SMALL_CUTS, scope)
        for k in SMALL_CUTS:
            want, p_in = brute(scores, is_noise, codes, k, scope)
            msg = f"case {case} k={k} scores={scores} noise={is_noise} codes={codes}"
            assert_metrics_close(metrics.topk_metrics(scores, is_noise, codes, k, scope), want, msg)
            assert_metrics_close(got_curve[k], want, msg)
            p = metrics.inclusion_probability(scores, k, codes if scope == "sequence" else None)
            np.testing.assert_allclose(p, p_in, rtol=1e-12, atol=1e-12, err_msg=msg)


def test_brute_force_all_tied_eight_tokens():
    scores = np.zeros(8)
    is_noise = np.array([1, 1, 0, 0, 1, 0, 0, 0], bool)
    codes = np.array([0, 1, 1, 2, 2, 2, 0, 1])
    for scope in metrics.SCOPES:
        for k in (0.125, 0.25, 0.375, 0.5, 0.8):
            want, _ = brute(scores, is_noise, codes, k, scope)
            assert_metrics_close(metrics.topk_metrics(scores, is_noise, codes, k, scope), want, f"{scope} {k}")


def test_hypergeometric_hit_is_stable_for_millions_of_ties():
    n = 3_000_000
    scores = np.ones(n)
    is_noise = np.zeros(n, bool)
    codes = np.full(n, 2)
    is_noise[:4] = True
    codes[:3] = 0          # sequence 0: three noise tokens (and nothing else)
    codes[3] = 1           # sequence 1: one noise token
    k = 0.1
    g, t = n, ref_n_top(k, n)

    def exact_hit(b):
        miss = Fraction(1)
        for i in range(b):
            miss *= Fraction(g - t - i, g - i)
        return 1 - miss

    want = float((exact_hit(3) + exact_hit(1)) / 2)
    got = metrics.topk_metrics(scores, is_noise, codes, k)["seq_hit"]
    assert got == pytest.approx(want, rel=1e-13)
    # a sequence with more noise than unchosen slots always hits
    assert metrics.topk.hit_probability(10, 8, 3) == 1.0
    assert metrics.topk.hit_probability(10, 0, 3) == 0.0
    assert metrics.topk.hit_probability(10, 4, 0) == 0.0


def test_segment_sort_sorts_within_segments():
    rng = np.random.default_rng(4)
    lengths = np.r_[rng.integers(0, 40, 200), [0, 1, 700, 1030, 5000, 0]]
    rng.shuffle(lengths)
    seg = np.repeat(np.arange(lengths.size), lengths)
    values = np.round(rng.standard_normal(seg.size), 1)
    values[rng.random(seg.size) < 0.01] = np.inf
    values[rng.random(seg.size) < 0.01] = -np.inf
    got = metrics.topk._segment_sort(values, lengths)
    want = np.concatenate([np.sort(values[seg == i]) for i in range(lengths.size)])
    np.testing.assert_array_equal(got, want)


def test_contiguous_and_scattered_layouts_agree():
    rng = np.random.default_rng(6)
    lengths = rng.integers(1, 300, 60)
    codes = np.repeat(rng.permutation(60), lengths)
    n = codes.size
    scores = np.round(rng.standard_normal(n), 1)
    is_noise = rng.random(n) < 0.1
    perm = rng.permutation(n)
    a = metrics.curve(scores, is_noise, codes, scope="sequence")
    b = metrics.curve(scores[perm], is_noise[perm], codes[perm], scope="sequence")
    for cut in metrics.CUTS:
        assert_metrics_close(a[cut], b[cut], str(cut))
    pa = metrics.inclusion_probability(scores, 0.1, codes)
    pb = metrics.inclusion_probability(scores[perm], 0.1, codes[perm])
    np.testing.assert_allclose(pa[perm], pb, rtol=1e-15)


def test_group_order_is_stable_and_groups_codes():
    rng = np.random.default_rng(9)
    for n_codes in (3, 70_000):   # one and two radix passes
        codes = rng.integers(0, n_codes, 200_000)
        order = metrics.topk._group_order(codes, n_codes)
        np.testing.assert_array_equal(order, np.argsort(codes, kind="stable"))


def test_constant_scores_give_base_rate_at_every_cut():
    rng = np.random.default_rng(0)
    n = 12_345
    is_noise = rng.random(n) < 0.07
    codes = rng.integers(0, 300, n)
    base = is_noise.mean()
    for cut, vals in metrics.curve(np.ones(n), is_noise, codes).items():
        assert vals["tok_prec"] == pytest.approx(base, rel=1e-12), cut
        assert vals["lift"] == pytest.approx(1.0, rel=1e-12), cut
        assert vals["tok_rec"] == pytest.approx(ref_n_top(cut, n) / n, rel=1e-12), cut


def test_perfect_ranker_recall_one_at_noise_share():
    rng = np.random.default_rng(3)
    n, n_noise = 2000, 200
    is_noise = np.zeros(n, bool)
    is_noise[rng.choice(n, n_noise, replace=False)] = True
    scores = np.where(is_noise, 1.0 + rng.random(n), rng.random(n))
    codes = rng.integers(0, 50, n)
    vals = metrics.topk_metrics(scores, is_noise, codes, n_noise / n)
    assert vals["tok_rec"] == 1.0 and vals["tok_prec"] == 1.0 and vals["seq_hit"] == 1.0
    assert vals["lift"] == pytest.approx(n / n_noise)
    assert metrics.auroc(scores, is_noise) == 1.0 and metrics.average_precision(scores, is_noise) == 1.0


def test_no_noise_gives_nan_not_zero():
    scores = np.arange(10.0)
    codes = np.arange(10) % 3
    for scope in metrics.SCOPES:
        vals = metrics.topk_metrics(scores, np.zeros(10, bool), codes, 0.3, scope)
        assert vals["tok_prec"] == 0.0
        assert all(math.isnan(vals[key]) for key in ("tok_rec", "seq_hit", "lift"))
    assert math.isnan(metrics.auroc(scores, np.zeros(10, bool)))
    assert math.isnan(metrics.auroc(scores, np.ones(10, bool)))
    assert math.isnan(metrics.average_precision(scores, np.zeros(10, bool)))
    assert metrics.average_precision(scores, np.ones(10, bool)) == 1.0
    share, ratio = metrics.noise_mass(np.ones(10), np.zeros(10, bool))
    assert share == 0.0 and math.isnan(ratio)
    share, ratio = metrics.noise_mass(np.zeros(10), np.ones(10, bool))
    assert math.isnan(share) and math.isnan(ratio)


def test_rounding_rule_and_empty_top_set():
    # 0.29 * 50 is 14.499999999999998 in floating point but means 14.5, which rounds up
    assert metrics.inclusion_probability(np.arange(50.0), 0.29).sum() == 15
    assert metrics.inclusion_probability(np.arange(5.0), 0.3).sum() == 2
    assert metrics.inclusion_probability(np.arange(25.0), 0.1).sum() == 3     # 2.5 -> 3, not banker's 2
    vals = metrics.topk_metrics(np.arange(4.0), np.array([0, 0, 0, 1], bool), np.zeros(4, int), 0.1)
    assert math.isnan(vals["tok_prec"]) and math.isnan(vals["lift"])
    assert vals["tok_rec"] == 0.0 and vals["seq_hit"] == 0.0
    # per group quotas: lengths 5, 3, 1 at 30% -> 2, 1, 0 (0.3 rounds down)
    groups = np.array([0] * 5 + [1] * 3 + [2])
    p = metrics.inclusion_probability(np.arange(9.0), 0.3, groups)
    np.testing.assert_array_equal(np.bincount(groups, weights=p), [2, 1, 0])


def test_signed_zero_and_infinities_are_ordinary_scores():
    scores = np.array([0.0, -0.0, np.inf, -np.inf, 0.0])
    is_noise = np.array([1, 0, 0, 1, 0], bool)
    codes = np.array([0, 0, 1, 1, 0])
    for scope in metrics.SCOPES:
        for k in SMALL_CUTS:
            want, _ = brute(scores, is_noise, codes, k, scope)
            assert_metrics_close(metrics.topk_metrics(scores, is_noise, codes, k, scope), want, f"{scope} {k}")


def test_one_sequence_scopes_agree_and_codes_need_not_be_contiguous():
    rng = np.random.default_rng(5)
    scores = np.round(rng.random(500), 1)
    is_noise = rng.random(500) < 0.2
    one = np.zeros(500, int)
    assert metrics.curve(scores, is_noise, one, scope="global") == metrics.curve(scores, is_noise, one, scope="sequence")
    codes = rng.integers(0, 20, 500)
    spread = codes * 1_000_003 + 7        # sparse, huge codes
    for scope in metrics.SCOPES:
        assert metrics.curve(scores, is_noise, codes, scope=scope) == metrics.curve(scores, is_noise, spread, scope=scope)


def test_curve_keys_follow_the_cuts_given():
    rng = np.random.default_rng(2)
    scores, is_noise, codes = rng.random(100), rng.random(100) < 0.3, rng.integers(0, 5, 100)
    out = metrics.curve(scores, is_noise, codes, (0.5, 0.1, 0.5))
    assert list(out) == [0.5, 0.1]
    assert list(metrics.curve(scores, is_noise, codes)) == list(metrics.CUTS)
    assert set(out[0.1]) == set(KEYS)


# --------------------------------------------------------------------------- rank metrics


def test_auroc_and_ap_match_sklearn_with_ties():
    rng = np.random.default_rng(7)
    for case in range(40):
        n = int(rng.integers(2, 3000))
        scores = np.round(rng.standard_normal(n) * rng.choice([0.3, 3.0]), int(rng.integers(0, 3)))
        is_noise = rng.random(n) < rng.uniform(0.01, 0.6)
        is_noise[0], is_noise[1] = True, False
        scores = scores + is_noise * rng.uniform(0, 1)
        if case % 5 == 0:
            scores = np.round(scores)
        assert metrics.auroc(scores, is_noise) == pytest.approx(roc_auc_score(is_noise, scores), rel=1e-12, abs=1e-14)
        ap = average_precision_score(is_noise, scores)
        assert metrics.average_precision(scores, is_noise) == pytest.approx(ap, rel=1e-12, abs=1e-14)
        both = metrics.rank_metrics(scores, is_noise)
        assert both == {"auroc": metrics.auroc(scores, is_noise), "ap": metrics.average_precision(scores, is_noise)}


def test_noise_mass():
    w = np.array([1.0, 3.0, 0.0, 4.0])
    y = np.array([True, True, False, False])
    share, ratio = metrics.noise_mass(w, y)
    assert share == pytest.approx(0.5) and ratio == pytest.approx(1.0)
    share, ratio = metrics.noise_mass(np.array([9.0, 0.0, 0.5, 0.5]), np.array([1, 0, 0, 0]))
    assert share == pytest.approx(0.9) and ratio == pytest.approx(3.6)


# --------------------------------------------------------------------------- bootstrap


def synthetic(n_seq, rng, mean_len=40):
    lengths = rng.integers(mean_len // 2, mean_len * 3 // 2, n_seq)
    codes = np.repeat(np.arange(n_seq), lengths)
    n = codes.size
    clean_seq = rng.random(n_seq) < 0.2
    is_noise = (rng.random(n) < 0.08) & ~clean_seq[codes]
    scores = np.round(rng.standard_normal(n) + 0.8 * is_noise, 1)
    return scores, is_noise, codes


@pytest.mark.parametrize("scope", metrics.SCOPES)
def test_bootstrap_contains_point_and_is_seeded(scope):
    rng = np.random.default_rng(11)
    scores, is_noise, codes = synthetic(300, rng)
    w = np.exp(scores)
    point = metrics.topk_metrics(scores, is_noise, codes, 0.1, scope)
    share, ratio = metrics.noise_mass(w, is_noise)
    point.update(noise_mass=share, noise_mass_ratio=ratio)
    a = metrics.bootstrap_intervals(scores, is_noise, codes, 0.1, scope, weights=w, n_boot=300, seed=4)
    assert set(a) == set(point)
    for key, (lo, hi) in a.items():
        assert lo <= point[key] <= hi, (key, lo, point[key], hi)
        assert lo < hi, key
    assert a == metrics.bootstrap_intervals(scores, is_noise, codes, 0.1, scope, weights=w, n_boot=300, seed=4)
    assert a != metrics.bootstrap_intervals(scores, is_noise, codes, 0.1, scope, weights=w, n_boot=300, seed=5)
    assert set(metrics.bootstrap_intervals(scores, is_noise, codes, 0.1, scope, n_boot=5, seed=0)) == set(KEYS)


@pytest.mark.parametrize("scope", metrics.SCOPES)
def test_bootstrap_narrows_with_more_sequences(scope):
    rng = np.random.default_rng(12)
    small = metrics.bootstrap_intervals(*synthetic(40, rng), 0.1, scope, n_boot=200, seed=0)
    large = metrics.bootstrap_intervals(*synthetic(2000, rng), 0.1, scope, n_boot=200, seed=0)
    for key in KEYS:
        assert large[key][1] - large[key][0] < 0.5 * (small[key][1] - small[key][0]), key


def slow_bootstrap(scores, is_noise, codes, k, scope, weights, n_boot, seed, level):
    """Resample whole sequences in a plain loop and recompute every statistic from scratch."""
    present = np.unique(codes)
    members = [np.flatnonzero(codes == c) for c in present]
    rng = np.random.default_rng(seed)
    p_full = metrics.inclusion_probability(scores, k)                      # global: cut fixed at the full sample
    hit_full = [  # P(sequence hit) at the full-sample cut: seq_hit when only that sequence has noise
        metrics.topk_metrics(scores, is_noise & (codes == c), codes, k)["seq_hit"] if is_noise[codes == c].any()
        else None for c in present]
    reps = {key: [] for key in (*KEYS, "noise_mass", "noise_mass_ratio")}
    for _ in range(n_boot):
        picks = rng.integers(0, present.size, size=present.size)
        idx = np.concatenate([members[j] for j in picks])
        new_codes = np.repeat(np.arange(picks.size), [members[j].size for j in picks])
        s, y, w = scores[idx], is_noise[idx], weights[idx]
        if scope == "sequence":
            vals = metrics.topk_metrics(s, y, new_codes, k, "sequence")
        else:
            p = p_full[idx]
            n_noise = y.sum()
            prec = p[y].sum() / p.sum()
            noisy = [j for j in picks if hit_full[j] is not None]
            vals = {"tok_prec": prec, "tok_rec": p[y].sum() / n_noise if n_noise else math.nan,
                    "lift": prec / (n_noise / y.size) if n_noise else math.nan,
                    "seq_hit": np.mean([hit_full[j] for j in noisy]) if noisy else math.nan}
        share, ratio = metrics.noise_mass(w, y)
        vals.update(noise_mass=share, noise_mass_ratio=ratio)
        for key in vals:
            reps[key].append(vals[key])
    q = ((1 - level) / 2, 1 - (1 - level) / 2)
    out = {}
    for key, vals in reps.items():
        vals = np.array(vals, float)
        vals = vals[~np.isnan(vals)]
        if vals.size or key in ("noise_mass", "noise_mass_ratio"):
            out[key] = tuple(np.quantile(vals, q)) if vals.size else (math.nan, math.nan)
    return out


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("scope", metrics.SCOPES)
def test_bootstrap_matches_slow_resampling_loop(scope, contiguous):
    rng = np.random.default_rng(21)
    lengths = rng.integers(1, 15, 14)
    codes = np.repeat(np.arange(14) * 3 + 1, lengths)           # gaps in the codes: 14 sequences
    if not contiguous:
        codes = codes[rng.permutation(codes.size)]
    n = codes.size
    scores = rng.integers(0, 4, n).astype(float)
    is_noise = rng.random(n) < 0.25
    weights = rng.random(n) * 2
    fast = metrics.bootstrap_intervals(scores, is_noise, codes, 0.3, scope, weights=weights, n_boot=60, seed=9,
                                 level=0.9)
    slow = slow_bootstrap(scores, is_noise, codes, 0.3, scope, weights, n_boot=60, seed=9, level=0.9)
    for key, bounds in slow.items():
        np.testing.assert_allclose(fast[key], bounds, rtol=1e-12, atol=1e-12, err_msg=key)


def test_bootstrap_chunks_do_not_change_the_draws(monkeypatch):
    rng = np.random.default_rng(8)
    scores, is_noise, codes = synthetic(50, rng, mean_len=10)
    whole = metrics.bootstrap_intervals(scores, is_noise, codes, 0.2, "sequence", n_boot=37, seed=1)
    monkeypatch.setattr(metrics.bootstrap, "_BOOT_CHUNK", 120)       # 2 replicates per chunk
    monkeypatch.setattr(metrics.topk, "_HIT_CHUNK", 3)
    assert metrics.bootstrap_intervals(scores, is_noise, codes, 0.2, "sequence", n_boot=37, seed=1) == whole


# --------------------------------------------------------------------------- misuse


def one_line_error(fn, *args, **kwargs):
    with pytest.raises(AuditError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def test_misuse_raises_one_line_audit_error():
    s, y, c = np.arange(4.0), np.array([1, 0, 0, 1], bool), np.zeros(4, int)
    assert "NaN" in one_line_error(metrics.topk_metrics, np.array([1.0, np.nan, 0, 0]), y, c, 0.1)
    assert "entries" in one_line_error(metrics.topk_metrics, s, y[:3], c, 0.1)
    assert "entries" in one_line_error(metrics.topk_metrics, s, y, c[:3], 0.1)
    assert "empty" in one_line_error(metrics.topk_metrics, [], [], [], 0.1)
    for bad_k in (0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1", None):
        assert "(0, 100] percent" in one_line_error(metrics.topk_metrics, s, y, c, bad_k)
    assert "(0, 100] percent" in one_line_error(metrics.curve, s, y, c, (0.1, 2.0))
    one_line_error(metrics.curve, s, y, c, ())
    one_line_error(metrics.curve, s, y, c, 0.1)
    assert "scope" in one_line_error(metrics.topk_metrics, s, y, c, 0.1, "batch")
    assert "non-negative" in one_line_error(metrics.topk_metrics, s, y, np.array([0, -1, 0, 0]), 0.1)
    assert "integer" in one_line_error(metrics.topk_metrics, s, y, c.astype(float), 0.1)
    assert "0/1" in one_line_error(metrics.topk_metrics, s, np.array([0, 2, 0, 1]), c, 0.1)
    assert "1-D" in one_line_error(metrics.topk_metrics, s.reshape(2, 2), y, c, 0.1)
    assert "numeric" in one_line_error(metrics.auroc, np.array(list("abcd")), y)
    one_line_error(metrics.auroc, s, y[:2])
    one_line_error(metrics.average_precision, np.array([np.nan, 1, 2, 3]), y)
    one_line_error(metrics.inclusion_probability, s, 0.5, np.array([0, 0, 1]))
    assert "non-negative" in one_line_error(metrics.noise_mass, np.array([1.0, -1, 0, 0]), y)
    assert "finite" in one_line_error(metrics.noise_mass, np.array([1.0, np.inf, 0, 0]), y)
    assert "entries" in one_line_error(metrics.noise_mass, s, y[:3])
    one_line_error(metrics.bootstrap_intervals, s, y, c, 0.1, n_boot=0, seed=0)
    one_line_error(metrics.bootstrap_intervals, s, y, c, 0.1, n_boot=5, seed=0, level=1.0)
    one_line_error(metrics.bootstrap_intervals, s, y, c, 0.1, n_boot=5, seed=-1)
    one_line_error(metrics.bootstrap_intervals, s, y, c, 0.1, weights=s[:3], n_boot=5, seed=0)
    # integer 0/1 labels are accepted and mean the same as booleans
    assert metrics.topk_metrics(s, y.astype(int), c, 0.5) == metrics.topk_metrics(s, y, c, 0.5)

"""Issue 22: every method as its authors train it, every open convention a named parameter.

Each parameter is checked against values worked by hand (or by brute force from the
formula, written out again here independently of the method code), and focal's
true gradient weight against finite differences of the focal loss.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import H_A, hand_stats_table, write_stats
from reweight_audit import methods as M
from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation import runs
from reweight_audit.training.loss import ReweightedLoss

LN2 = math.log(2.0)


def weights(name: str, cols: dict, params: dict | None = None, batch=None) -> np.ndarray:
    return M.compute_weights(M.get_method(name), cols, params=params, batch=batch)


def practical_s(p: float, h_nats: float, r: float, trivial: bool = False) -> float:
    """RankTuner's practical S worked in plain floats: (p·s)^(−K(ξ)), s = 2^(H_bits−2)+1, ξ = max(R, s)."""
    s = 1.0 if trivial and h_nats < 2 * LN2 else 2.0 ** (h_nats / LN2 - 2.0) + 1.0
    xi = max(r, s)
    k = math.log2(xi + 1.0) ** -2
    return (p * s) ** -k


# ------------------------------------------------------------------------- RankTuner: base and low_entropy

RT_COLS = {
    "logp": np.log([0.9, 1.0, 0.5, 0.1]),
    "entropy": np.array([0.3, 0.0, 2.5 * LN2, 4.0 * LN2]),
    "rank": np.array([1, 1, 2, 7]),
    "expected_rank": np.array([1.0, 1.0, 3.0, 3.0]),
}


def test_issue_example_smooth_and_trivial_straddle_one():
    cols = {"logp": np.log([0.9]), "entropy": np.array([0.3]), "rank": np.array([1])}
    smooth = weights("ranktuner-approx", cols)[0]
    trivial = weights("ranktuner-approx", cols, {"low_entropy": "trivial"})[0]
    assert smooth == pytest.approx(0.884, abs=5e-4) and trivial == pytest.approx(1 / 0.9, rel=1e-12)
    assert smooth < 1 < trivial


def test_low_entropy_below_two_bits_by_hand():
    # one-hot row: H = 0, p = 1, R = 1. smooth: s = 1.25 = ξ, K = log2(2.25)^-2, S = 1.25^-K < 1; trivial: S = 1
    cols = {"logp": np.array([0.0]), "entropy": np.array([0.0]), "rank": np.array([1])}
    k = math.log2(2.25) ** -2
    assert weights("ranktuner-approx", cols)[0] == pytest.approx(1.25 ** -k, rel=1e-12)
    assert weights("ranktuner-approx", cols, {"low_entropy": "trivial"})[0] == pytest.approx(1.0, rel=1e-12)
    # at and above 2 bits the bound holds and the two modes agree
    above = {"logp": np.log([0.5, 0.1]), "entropy": np.array([2.0, 4.0]) * LN2, "rank": np.array([2, 7])}
    np.testing.assert_allclose(weights("ranktuner-approx", above),
                               weights("ranktuner-approx", above, {"low_entropy": "trivial"}), rtol=1e-12)


@pytest.mark.parametrize("low_entropy", ["smooth", "trivial"])
def test_practical_s_matches_the_formula_on_both_bases(low_entropy):
    p = np.exp(RT_COLS["logp"])
    want = np.array([practical_s(pi, h, r, low_entropy == "trivial")
                     for pi, h, r in zip(p, RT_COLS["entropy"], RT_COLS["rank"])])
    one = weights("ranktuner-approx", RT_COLS, {"low_entropy": low_entropy})
    np.testing.assert_allclose(one, want, rtol=1e-12)
    np.testing.assert_allclose(weights("ranktuner-approx", RT_COLS, {"low_entropy": low_entropy, "base": "p"}),
                               p * want, rtol=1e-12)
    np.testing.assert_allclose(weights("ranktuner-approx-dft", RT_COLS, {"low_entropy": low_entropy}),
                               p * want, rtol=1e-12)


def test_exact_s_on_both_bases():
    # f(1) = 1, f(2) = 1/log2 3, f(3) = 1/2, f(7) = 1/3
    f = {1: 1.0, 2: 1 / math.log2(3.0), 3: 0.5, 7: 1 / 3}
    s = np.array([2 ** (f[1] - f[1]), 2 ** (f[1] - f[1]), 2 ** (f[3] - f[2]), 2 ** (f[3] - f[7])])
    p = np.exp(RT_COLS["logp"])
    np.testing.assert_allclose(weights("ranktuner", RT_COLS), s, rtol=1e-12)  # default base=1 unchanged
    np.testing.assert_allclose(weights("ranktuner", RT_COLS, {"base": "p"}), p * s, rtol=1e-12)
    np.testing.assert_array_equal(weights("ranktuner", RT_COLS, {"base": "p"}), weights("ranktuner-dft", RT_COLS))


def test_base_errors():
    with pytest.raises(AuditError, match="parameter base must be one of 1, p"):
        weights("ranktuner", RT_COLS, {"base": "q"})
    with pytest.raises(AuditError, match="base=p needs the logp column"):
        weights("ranktuner", {"rank": RT_COLS["rank"], "expected_rank": RT_COLS["expected_rank"]}, {"base": "p"})
    assert M.parse_params(["ranktuner-approx.base=p"]) == {"ranktuner-approx": {"base": "p"}}


def test_the_math_weight_is_registered_after_the_2025_methods_and_says_so():
    names = [m.name for m in M.registered_methods()]
    assert names.index("ranktuner-approx-dft") == names.index("mile") + 1 < names.index("position")
    m = M.get_method("ranktuner-approx-dft")
    assert m.family == "rank" and "trains math" in m.source and m.params == {"low_entropy": "smooth"}


# --------------------------------------------------------------------------------------------------- focal


def focal_loss(logp: float, gamma: float) -> float:
    return -((1.0 - math.exp(logp)) ** gamma) * logp


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("p", [0.003, 0.01, 0.2, 0.5, 0.9, 0.999])
def test_focal_true_weight_is_minus_dloss_dlogp(p, gamma):
    # −dL/d(log p), central differences; ∂(−log p)/∂(log p) = −1, so that is the weight on the NLL gradient
    h = 1e-6
    lp = math.log(p)
    fd = -(focal_loss(lp + h, gamma) - focal_loss(lp - h, gamma)) / (2 * h)
    got = weights("focal", {"logp": np.array([lp])}, {"gamma": gamma, "detach": False})[0]
    assert got == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_focal_true_weight_against_finite_differences_in_the_logits():
    rng = np.random.default_rng(3)
    z = rng.normal(size=6) * 2
    t, gamma = 2, 2.0

    def logp_of(z):
        return z[t] - np.logaddexp.reduce(z)

    lp = logp_of(z)
    w = weights("focal", {"logp": np.array([lp])}, {"detach": False})[0]
    p_all = np.exp(z - np.logaddexp.reduce(z))
    nll_grad = p_all - np.eye(6)[t]  # ∂(−log p_t)/∂z
    fd = np.empty(6)
    for j in range(6):
        e = np.eye(6)[j] * 1e-6
        fd[j] = (focal_loss(logp_of(z + e), gamma) - focal_loss(logp_of(z - e), gamma)) / 2e-6
    np.testing.assert_allclose(w * nll_grad, fd, rtol=1e-6, atol=1e-10)


def test_focal_issue_figures_and_default_is_the_source():
    cols = {"logp": np.log([0.01, 0.5, 1.0])}
    got = weights("focal", cols, {"detach": False})
    assert got[0] == pytest.approx(0.99 ** 2 + 2 * 0.01 * 0.99 * math.log(100), rel=1e-12)  # 1.07
    assert got[1] == pytest.approx(0.25 + 0.5 * math.log(2), rel=1e-12)  # 0.60
    assert got[2] == 0.0
    np.testing.assert_allclose(weights("focal", cols), got, rtol=0)  # the default is Lin et al.'s loss
    np.testing.assert_allclose(weights("focal", cols, {"detach": True}), [0.99 ** 2, 0.25, 0.0], rtol=1e-12)
    # p = 0 (log p = −inf) and p = 1 with γ < 1 stay finite
    edge = weights("focal", {"logp": np.array([-np.inf, 0.0])}, {"gamma": 0.5, "detach": False})
    np.testing.assert_array_equal(edge, [1.0, 0.0])
    assert M.parse_params(["focal.detach=false"]) == {"focal": {"detach": False}}
    with pytest.raises(AuditError, match="detach must be true or false"):
        weights("focal", cols, {"detach": "no"})


def test_focal_training_gradient_is_the_focal_loss_gradient():
    # enable_grad: an earlier test module can leave autograd switched off process-wide
    with torch.enable_grad():
        _check_focal_training_gradient()


def _check_focal_training_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[:, 0] = -100
    labels[1, 3] = -100
    loss = ReweightedLoss("focal", detach=False)({"logits": logits}, labels)
    (g_ours,) = torch.autograd.grad(loss, logits)
    shifted = labels[:, 1:]
    keep = shifted != -100
    logp = torch.log_softmax(logits[:, :-1].float(), -1)[keep].gather(1, shifted[keep][:, None])[:, 0]
    ref = (-(1 - logp.exp()) ** 2 * logp).mean()
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=2e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- TALR


def test_talr_per_sequence_tau_by_hand():
    nll = np.array([0.1, 0.3, 1.0, 2.0, 3.0])
    cols = {"logp": -nll, "seq_code": np.array([0, 0, 1, 1, 1])}
    # per-token median 1.0; per-sequence means 0.2 and 2.0, median 1.1
    for tau_mode, tau in (("per-token", 1.0), ("per-sequence", 1.1)):
        e = np.exp(-nll / tau)
        want = 5 * e / e.sum()
        got = weights("talr", cols, {"w_min": 0.0, "tau": tau_mode})
        np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_array_equal(weights("talr", cols), weights("talr", cols, {"tau": "per-token"}))


def test_talr_per_sequence_from_pos_and_per_batch():
    nll = np.array([0.1, 0.3, 1.0, 2.0, 3.0, 0.5, 0.7])
    pos = np.array([0, 1, 0, 1, 2, 0, 1])  # three sequences, rows in order, as training hands them
    seq = np.array([0, 0, 1, 1, 1, 2, 2])
    batch = np.array([0, 0, 0, 0, 0, 1, 1])
    by_pos = weights("talr", {"logp": -nll, "pos": pos}, {"tau": "per-sequence"}, batch=batch)
    by_seq = weights("talr", {"logp": -nll, "seq_code": seq}, {"tau": "per-sequence"}, batch=batch)
    np.testing.assert_array_equal(by_pos, by_seq)
    alone = weights("talr", {"logp": -nll[:5], "seq_code": seq[:5]}, {"tau": "per-sequence"})
    np.testing.assert_allclose(by_seq[:5], alone, rtol=1e-12)
    with pytest.raises(AuditError, match="tau=per-sequence needs each token's sequence"):
        weights("talr", {"logp": -nll}, {"tau": "per-sequence"})
    with pytest.raises(AuditError, match="tau must be one of per-token, per-sequence"):
        weights("talr", {"logp": -nll}, {"tau": "mean"})


# ---------------------------------------------------------------------------------------------------- Rho-1


def test_rho1_top_k_mask_by_hand():
    excess = np.array([3.0, 1.0, 2.0, 0.0, -1.0])
    cols = {"logp": -excess - 1.0, "ref_logp": np.full(5, -1.0)}  # excess = log p_ref − log p
    np.testing.assert_allclose(weights("rho1", cols, {"select": "graded"}), [3.0, 1.0, 2.0, 0.0, 0.0], rtol=1e-12)
    np.testing.assert_array_equal(weights("rho1", cols), [1, 1, 1, 0, 0])  # default top-k: floor(0.6·5) = 3
    np.testing.assert_array_equal(weights("rho1", cols, {"select": "top-k", "k_pct": 40}), [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(weights("rho1", cols, {"select": "top-k", "k_pct": 0}), [0] * 5)
    np.testing.assert_array_equal(weights("rho1", cols, {"select": "top-k", "k_pct": 100}), [1] * 5)
    # within each batch: batch 0 = tokens 0, 2, 4 (keep floor(1.8) = 1: token 0), batch 1 = tokens 1, 3 (keep 1)
    got = weights("rho1", cols, {"select": "top-k"}, batch=np.array([0, 1, 0, 1, 0]))
    np.testing.assert_array_equal(got, [1, 1, 0, 0, 0])


def test_rho1_top_k_brute_force_and_ties():
    rng = np.random.default_rng(5)
    excess = rng.integers(-3, 4, size=200).astype(float)  # many ties
    batch = rng.integers(0, 4, size=200)
    cols = {"logp": -excess, "ref_logp": np.zeros(200)}
    got = weights("rho1", cols, {"select": "top-k", "k_pct": 35.0}, batch=batch)
    for b in range(4):
        idx = np.flatnonzero(batch == b)
        keep = int(math.floor(idx.size * 0.35 + 1e-9))
        chosen = sorted(idx, key=lambda i: (-excess[i], i))[:keep]  # ties: the earlier row first
        want = np.zeros(idx.size)
        want[np.isin(idx, chosen)] = 1.0
        np.testing.assert_array_equal(got[idx], want)
    with pytest.raises(AuditError, match="select must be one of graded, top-k"):
        weights("rho1", cols, {"select": "mask"})
    with pytest.raises(AuditError, match="k_pct must be <= 100"):
        weights("rho1", cols, {"select": "top-k", "k_pct": 120})


# ----------------------------------------------------------------------------------------------- DEFT(-Cayley)


def cayley_by_hand(p: np.ndarray) -> np.ndarray:
    f = 0.5 * p.mean()
    alpha = np.clip(f + (1 - f) * p / (2 - p), 0.001, 1.0)
    return p ** alpha


def test_deft_cayley_micro_batches_by_brute_force():
    p = np.array([0.9, 0.2, 0.5, 0.05, 0.7, 0.3, 0.99, 0.6])
    seq = np.array([3, 3, 1, 0, 0, 2, 2, 5])
    batch = np.array([0, 0, 0, 0, 0, 0, 0, 1])
    cols = {"logp": np.log(p), "seq_code": seq}
    # batch 0 holds sequences 0, 1, 2, 3 -> micro-batches {0, 1} and {2, 3}; batch 1 holds sequence 5
    got = weights("deft-cayley", cols, {"micro_batch_seqs": 2}, batch=batch)
    for rows in ([2, 3, 4], [0, 1, 5, 6], [7]):
        np.testing.assert_allclose(got[rows], cayley_by_hand(p[rows]), rtol=1e-12)
    whole = weights("deft-cayley", cols, {"micro_batch_seqs": 0}, batch=batch)  # the whole simulated batch
    np.testing.assert_allclose(whole[:7], cayley_by_hand(p[:7]), rtol=1e-12)
    # the default, the authors' 4 sequences per micro-batch: batch 0 holds exactly 4
    np.testing.assert_array_equal(weights("deft-cayley", cols, batch=batch), whole)
    with pytest.raises(AuditError, match="micro_batch_seqs must be a whole number >= 0"):
        weights("deft-cayley", cols, {"micro_batch_seqs": -1})
    with pytest.raises(AuditError, match="micro_batch_seqs=2 needs each token's sequence"):
        weights("deft-cayley", {"logp": np.log(p)}, {"micro_batch_seqs": 2})


def test_deft_cayley_micro_batch_from_pos_in_training_order():
    p = np.array([0.9, 0.2, 0.5, 0.05, 0.7, 0.3])
    pos = np.array([0, 1, 0, 0, 1, 2])  # sequences [0, 1], [2], [3, 4, 5]
    got = weights("deft-cayley", {"logp": np.log(p), "pos": pos}, {"micro_batch_seqs": 2})
    np.testing.assert_allclose(got[:3], cayley_by_hand(p[:3]), rtol=1e-12)
    np.testing.assert_allclose(got[3:], cayley_by_hand(p[3:]), rtol=1e-12)


def test_deft_eps_is_the_authors_guard():
    v = 262_144
    cols = {"logp": np.log([1.0 / v, 0.5]), "sum_p2": np.array([1.0 / v, 0.5])}
    plain = weights("deft", cols, {"eps": 0.0})
    np.testing.assert_allclose(plain, [(1.0 / v) ** (1.0 / v), 0.5 ** 0.5], rtol=1e-12)  # the family as written
    guarded = weights("deft", cols)  # default: the authors' code, eps = 1e-6
    factor = (1.0 / v) / (1.0 / v + 1e-6)
    assert factor == pytest.approx(0.792, abs=1e-3)
    np.testing.assert_allclose(guarded, plain * [factor, 0.5 / (0.5 + 1e-6)], rtol=1e-12)
    # the guarded loss −(p^α − 1)/(α + eps): its −d/d(log p) is p^α·α/(α + eps)
    a, lp, h = 0.3, math.log(0.4), 1e-6
    loss = lambda x: -(math.exp(a * x) - 1) / (a + 1e-6)  # noqa: E731
    fd = -(loss(lp + h) - loss(lp - h)) / (2 * h)
    got = weights("deft", {"logp": np.array([lp]), "sum_p2": np.array([a])}, {"eps": 1e-6})[0]
    assert got == pytest.approx(fd, rel=1e-6)


# --------------------------------------------------------------------------------------- compare's seq_code


def test_compare_hands_methods_a_seq_code(tmp_path):
    run = runs.load_run(write_stats(tmp_path / "a.parquet", hand_stats_table(H_A)))
    assert "seq_code" in run.numeric_columns
    np.testing.assert_array_equal(run.column("seq_code"), run.seq_codes)
    stored = hand_stats_table(H_A).append_column("seq_code", pa.array([7] * 8, pa.int64()))
    run = runs.load_run(write_stats(tmp_path / "b.parquet", stored))
    assert run.column("seq_code").tolist() == [7] * 8


def test_micro_batch_codes_against_their_definition():
    """A token's micro-batch: its batch, and its sequence's index among the batch's sorted sequences // per_micro;
    dense codes in (batch, micro-batch) order. Brute force over random batches and sequences."""
    from reweight_audit.methods._batches import micro_batch_codes

    rng = np.random.default_rng(5)
    for _ in range(100):
        n = int(rng.integers(1, 200))
        codes = np.unique(rng.integers(0, rng.integers(1, 6), n), return_inverse=True)[1].reshape(-1)
        seqs = rng.integers(0, rng.integers(1, 40), n)
        for per_micro in (1, 2, 4, 7):
            keys = [(b, sorted(set(seqs[codes == b])).index(s) // per_micro) for b, s in zip(codes, seqs)]
            order = {key: i for i, key in enumerate(sorted(set(keys)))}
            expected = np.array([order[key] for key in keys])
            assert np.array_equal(micro_batch_codes(codes, seqs, per_micro), expected)

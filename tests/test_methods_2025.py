"""The 2025-2026 objectives: ProFit, the deformed-log family (fixed α, DEFT, DEFT-Cayley), MiLe.

Expected values are worked by hand (closed forms like 2^(−23/48), 3/7) from the
equations quoted in each method's ``source``, not by re-running the code's
expressions. The loss-shape methods are also checked against a central finite
difference of their loss with respect to the logits.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import reweight_audit.methods as M
from reweight_audit.core.errors import AuditError

NEW = ("profit", "deformed-log", "deft", "deft-cayley", "mile")


@pytest.fixture(autouse=True)
def _isolated():
    with M.isolated_registry():
        yield


# The hand values here are the families as written (no 1e-6 guard, the whole batch's mean p); the defaults
# are the authors' code (deft eps = 1e-6, deft-cayley 4 sequences per micro-batch), checked in test_fidelity.py.
AS_WRITTEN = {"deft": {"eps": 0.0}, "deft-cayley": {"micro_batch_seqs": 0}}


def weights(name: str, cols: dict, params: dict | None = None, batch=None) -> np.ndarray:
    params = {**AS_WRITTEN.get(name, {}), **(params or {})}
    return M.compute_weights(M.get_method(name), cols, params=params, batch=batch)


def logp(*p: float) -> np.ndarray:
    return np.log(np.array(p, dtype=np.float64))


# ---------------------------------------------------------------------- registry


def test_new_methods_are_registered_after_the_originals_with_citations():
    names = [m.name for m in M.available_methods()]
    assert names[13:18] == list(NEW)
    cites = {"profit": "2601.09195", "deformed-log": "2510.00526", "deft": "2602.11424",
             "deft-cayley": "2602.11424", "mile": "2310.19531"}
    for name, arxiv in cites.items():
        m = M.get_method(name)
        assert arxiv in m.source and m.formula.startswith("w = ")
    assert M.get_method("deft").needs == ("logp", "sum_p2")
    assert M.get_method("mile").needs == ("entropy",)
    assert M.get_method("mile").batch_dependent and M.get_method("deft-cayley").batch_dependent
    assert not M.get_method("deft").batch_dependent


def test_methods_command_lists_the_new_methods():
    from typer.testing import CliRunner

    from reweight_audit.cli import app

    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in NEW:
        assert name in result.output


# ------------------------------------------------------------------------ ProFit


def test_profit_gate_hand_values_and_threshold_edge():
    below = np.nextafter(math.log(0.1), -np.inf)  # a hair under τ = 0.1
    cols = {"logp": np.array([0.0, math.log(0.5), math.log(0.1), below, math.log(0.05), -1e4])}
    np.testing.assert_array_equal(weights("profit", cols), [1, 1, 1, 0, 0, 0])


def test_profit_threshold_limits():
    cols = {"logp": np.array([0.0, -1e-12, math.log(0.5), -1e4, 1e-7])}  # 1e-7: fp32 rounding above 0
    # τ = 0 keeps everything (plain SFT), even p → 0
    np.testing.assert_array_equal(weights("profit", cols, {"tau": 0.0}), [1, 1, 1, 1, 1])
    # τ = 1 keeps only p = 1 (a log-prob rounded above 0 counts as p = 1)
    np.testing.assert_array_equal(weights("profit", cols, {"tau": 1.0}), [1, 0, 0, 0, 1])
    # τ = 0.5: the edge token p = 0.5 is kept (the authors' code masks p < τ)
    np.testing.assert_array_equal(weights("profit", cols, {"tau": 0.5}), [1, 1, 1, 0, 1])


@pytest.mark.parametrize("tau", [-0.1, 1.5, float("nan")])
def test_profit_rejects_a_threshold_outside_zero_one(tau):
    with pytest.raises(AuditError, match="'profit'.*tau"):
        weights("profit", {"logp": logp(0.5)}, {"tau": tau})


def test_profit_passes_nan_on_so_the_bad_column_is_named():
    with pytest.raises(AuditError, match="NaN weight.*'logp'"):
        weights("profit", {"logp": np.array([0.0, np.nan])})


# ------------------------------------------------------------------ deformed log


def test_deformed_log_hand_values():
    cols = {"logp": logp(1.0, 0.5, 0.25, 0.1)}
    # α = 1/2: √p
    np.testing.assert_allclose(weights("deformed-log", cols, {"alpha": 0.5}), [1, 2**-0.5, 0.5, 0.1**0.5], rtol=1e-12)
    # α = 2: p²
    np.testing.assert_allclose(weights("deformed-log", cols, {"alpha": 2.0}), [1, 0.25, 0.0625, 0.01], rtol=1e-12)
    # default α = 10: p^10
    np.testing.assert_allclose(weights("deformed-log", cols), [1, 2**-10, 2**-20, 1e-10], rtol=1e-12)


def test_deformed_log_endpoints_are_nll_and_dft():
    cols = {"logp": logp(1.0, 0.5, 0.25, 0.1)}
    np.testing.assert_array_equal(weights("deformed-log", cols, {"alpha": 0.0}), weights("sft", cols))
    np.testing.assert_allclose(weights("deformed-log", cols, {"alpha": 1.0}), weights("dft", cols), rtol=1e-15)


def test_deformed_log_p_to_zero_in_log_space():
    # p = e^−800 underflows in exp(), but p^0.01 = e^−8 does not
    cols = {"logp": np.array([-800.0, -np.inf])}
    np.testing.assert_allclose(weights("deformed-log", cols, {"alpha": 0.01}), [math.exp(-8.0), 0.0], rtol=1e-12)
    np.testing.assert_array_equal(weights("deformed-log", cols, {"alpha": 0.0}), [1.0, 1.0])


def test_deformed_log_rejects_negative_alpha():
    with pytest.raises(AuditError, match="'deformed-log'.*alpha"):
        weights("deformed-log", {"logp": logp(0.5)}, {"alpha": -1.0})


# ------------------------------------------------------------------------- DEFT


def test_deft_hand_values():
    # rows: one-hot on the target; (1/2, 1/2); p = 1/4 with Σp² = 0.3; p = 0.1 with Σp² = 0.2
    cols = {"logp": logp(1.0, 0.5, 0.25, 0.1), "sum_p2": np.array([1.0, 0.5, 0.3, 0.2])}
    want = [1.0, 2**-0.5, 2**-0.6, 10**-0.2]  # p^Σp²
    np.testing.assert_allclose(weights("deft", cols), want, rtol=1e-12)


def test_deft_limits_flat_and_peaked_rows():
    v = 2**20
    cols = {
        # flat row over V = 2^20: p = Σp² = 2^−20, w = 2^(−20·2^−20) → 1 (NLL-like)
        # flat row over 4 tokens: p = Σp² = 1/4, w = (1/4)^(1/4) = 1/√2
        # peaked on another token (0.9 there, target 0.01): Σp² = 0.81 + 0.01² + ..., w ≈ p^0.81
        # peaked on the target: p = Σp² = 1 → 1
        "logp": logp(1 / v, 0.25, 0.01, 1.0),
        "sum_p2": np.array([1 / v, 0.25, 0.8101, 1.0]),
    }
    want = [2 ** (-20 / v), 2**-0.5, 0.01**0.8101, 1.0]
    np.testing.assert_allclose(weights("deft", cols), want, rtol=1e-12)


def test_deft_at_full_concentration_is_dft_and_near_zero_concentration_is_sft():
    lp = logp(0.9, 0.5, 0.01, 1e-6)
    one = weights("deft", {"logp": lp, "sum_p2": np.ones(4)})
    np.testing.assert_allclose(one, weights("dft", {"logp": lp}), rtol=1e-15)
    tiny = weights("deft", {"logp": lp, "sum_p2": np.full(4, 1e-12)})
    np.testing.assert_allclose(tiny, np.ones(4), rtol=2e-11)


def test_deft_clips_concentration_rounded_out_of_range():
    cols = {"logp": logp(0.5, 0.5), "sum_p2": np.array([1.0 + 1e-7, -1e-9])}
    np.testing.assert_allclose(weights("deft", cols), [0.5, 1.0], rtol=1e-15)


def test_deft_needs_sum_p2():
    with pytest.raises(AuditError, match="'deft' needs column 'sum_p2'"):
        weights("deft", {"logp": logp(0.5)})


# ------------------------------------------------------------------ DEFT-Cayley


def test_deft_cayley_hand_values_one_batch():
    # p = 1, 1/2, 1/4, 0: mean p = 7/16, floor f = 7/32; α_local = p/(2 − p) = 1, 1/3, 1/7, 0
    # α = f + (1 − f)·α_local = 1, 23/48, 37/112, 7/32;  w = p^α
    cols = {"logp": np.array([0.0, math.log(0.5), math.log(0.25), -np.inf])}
    want = [1.0, 2 ** (-23 / 48), 2 ** (-37 / 56), 0.0]
    np.testing.assert_allclose(weights("deft-cayley", cols), want, rtol=1e-12, atol=0)


def test_deft_cayley_floor_clamp_and_batches():
    # all p tiny: f ≈ 0 and α_local ≈ p/2, so α is clamped to 0.001: w = p^0.001
    cols = {"logp": logp(1e-6, 1e-8)}
    np.testing.assert_allclose(weights("deft-cayley", cols), [1e-6**0.001, 1e-8**0.001], rtol=1e-9)
    # the same token (p = 1/2) in two batches: with p = 1 beside it f = 3/8, alone f = 1/4
    cols = {"logp": logp(0.5, 1.0, 0.5)}
    w = weights("deft-cayley", cols, batch=np.array([0, 0, 1]))
    # α = f + (1 − f)/3: 3/8 + 5/24 = 7/12 and 1/4 + 1/4 = 1/2
    np.testing.assert_allclose(w, [2 ** (-7 / 12), 1.0, 2**-0.5], rtol=1e-12)


# ------------------------------------------------- loss shape → gradient weight


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _fd_grad(f, z: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite difference of a scalar function of the logits."""
    g = np.empty_like(z)
    for i in range(z.size):
        d = np.zeros_like(z)
        d[i] = h
        g[i] = (f(z + d) - f(z - d)) / (2 * h)
    return g


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["deformed-log", "deft", "deft-cayley"])
def test_weight_times_nll_gradient_is_the_loss_gradient(name, seed):
    """∇_z L(p_t) = w_t · ∇_z(−log p_t) with α frozen (stop-gradient), by finite differences."""
    rng = np.random.default_rng(seed)
    z0 = rng.normal(scale=2.0, size=7)
    t = int(rng.integers(7))
    p0 = _softmax(z0)
    if name == "deformed-log":
        alpha, params = 2.5, {"alpha": 2.5}
    elif name == "deft":
        alpha, params = float((p0**2).sum()), None
    else:  # a batch of this token alone: f = p/2, α = f + (1 − f)·p/(2 − p)
        f = 0.5 * p0[t]
        alpha, params = min(max(f + (1 - f) * p0[t] / (2 - p0[t]), 0.001), 1.0), None

    def loss(z):  # (1 − p_t^α)/α, α detached
        return (1.0 - _softmax(z)[t] ** alpha) / alpha

    def nll(z):
        return -math.log(_softmax(z)[t])

    cols = {"logp": np.array([math.log(p0[t])]), "sum_p2": np.array([(p0**2).sum()])}
    w = weights(name, cols, params)[0]
    np.testing.assert_allclose(_fd_grad(loss, z0), w * _fd_grad(nll, z0), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------- MiLe


def test_mile_hand_values():
    cols = {"entropy": np.array([0.0, 1.0, 3.0])}
    # γ = 1: 1 + H = 1, 2, 4, mean 7/3
    np.testing.assert_allclose(weights("mile", cols), [3 / 7, 6 / 7, 12 / 7], rtol=1e-12)
    # γ = 2: 1, 4, 16, mean 7
    np.testing.assert_allclose(weights("mile", cols, {"gamma": 2.0}), [1 / 7, 4 / 7, 16 / 7], rtol=1e-12)
    # γ = 0: plain SFT
    np.testing.assert_array_equal(weights("mile", cols, {"gamma": 0.0}), [1, 1, 1])


def test_mile_peaked_row_gets_least_flat_row_most_and_batch_mean_is_one():
    v = 50_000
    # H = 0 (peaked), 1 nat, ln V (flat); a rounding negative counts as 0
    cols = {"entropy": np.array([0.0, 1.0, math.log(v), -1e-9])}
    w = weights("mile", cols)
    total = 1 + 2 + (1 + math.log(v)) + 1  # Σ(1 + H)
    np.testing.assert_allclose(w, np.array([1, 2, 1 + math.log(v), 1]) * 4 / total, rtol=1e-12)
    assert w.mean() == pytest.approx(1.0, rel=1e-12)


def test_mile_normalises_per_batch():
    cols = {"entropy": np.array([0.0, 1.0, 3.0, 5.0])}
    # batch 0: 1, 2 over mean 3/2; batch 1: 4, 6 over mean 5
    w = weights("mile", cols, batch=np.array([7, 7, 3, 3]))
    np.testing.assert_allclose(w, [2 / 3, 4 / 3, 4 / 5, 6 / 5], rtol=1e-12)


def test_mile_large_gamma_does_not_overflow():
    cols = {"entropy": np.array([0.0, 12.0])}
    # (1 + H)^500 = 13^500 overflows a float; normalised: 2/(1 + 13^500) ≈ 0 and 2·13^500/(1 + 13^500) ≈ 2
    w = weights("mile", cols, {"gamma": 500.0})
    np.testing.assert_allclose(w, [0.0, 2.0], atol=1e-300, rtol=1e-12)


def test_mile_rejects_negative_gamma():
    with pytest.raises(AuditError, match="'mile'.*gamma"):
        weights("mile", {"entropy": np.array([1.0])}, {"gamma": -0.5})

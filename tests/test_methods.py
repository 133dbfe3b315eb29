"""Weighting methods and their registry (methods/, imported as reweight_audit.methods).

Expected values are worked by hand from the formulas in docs/methods.md and written
as numbers or closed forms (2**(1/6), ln 2, ...), not by re-running the code's
expressions.
"""
from __future__ import annotations

import importlib.metadata
import math
import sys
import textwrap
import uuid

import numpy as np
import pytest

import reweight_audit.methods as M
from reweight_audit.core.errors import AuditError
from reweight_audit.methods import registry

LN2 = math.log(2.0)
LN20 = math.log(20.0)


@pytest.fixture(autouse=True)
def _isolated():
    """No test may leak registrations into another."""
    with M.isolated_registry():
        yield


# A four-token column set, worked by hand below.
#   p        = 1,    1/2,   1/4,   1/10
#   H (bits) = 0,    2,     3,     4          (entropy in nats = bits · ln 2)
#   R        = 1,    3,     1,     7
#   E[R]     = 1,    1,     3,     3
#   H_top20  = 0,    ln20/2, ln20, ln20/4
#   ref p    = 1/2 everywhere
COLS = {
    "logp": np.log([1.0, 0.5, 0.25, 0.1]),
    "entropy": np.array([0.0, 2.0, 3.0, 4.0]) * LN2,
    "rank": np.array([1, 3, 1, 7]),
    "expected_rank": np.array([1.0, 1.0, 3.0, 3.0]),
    "topk_entropy": np.array([0.0, 0.5, 1.0, 0.25]) * LN20,
    "sum_p2": np.array([1.0, 0.5, 0.3, 0.2]),
    "ref_logp": np.log([0.5, 0.5, 0.5, 0.5]),
    # tokens 0, 1 and 3 are positions 0, 1, 2 of one 3-token response; token 2 is a 1-token response
    "pos": np.array([0, 1, 0, 2]),
    "seq_len": np.array([3, 3, 1, 3]),
    "token_id": np.array([5, 7, 5, 5]),
}

# RankTuner, f(x) = 1/log2(x+1): f(1) = 1, f(3) = 1/2, f(7) = 1/3.
#   token 0: R=1, E=1: 2^(1 − 1)     = 1
#   token 1: R=3, E=1: 2^(1 − 1/2)   = √2
#   token 2: R=1, E=3: 2^(1/2 − 1)   = 1/√2
#   token 3: R=7, E=3: 2^(1/2 − 1/3) = 2^(1/6)
RT = [1.0, math.sqrt(2.0), 1 / math.sqrt(2.0), 2 ** (1 / 6)]

# RankTuner practical form, s(H) = 2^(H_bits−2)+1, ξ = max(R, s), K = 1/log2(ξ+1)^2:
#   token 0: H_bits=0 → s=1.25, ξ=1.25, K=1/log2(2.25)^2;  S = 1.25^(−K)
#   token 1: H_bits=2 → s=2, ξ=max(3,2)=3, K=1/4;  p·s = 1     → S = 1
#   token 2: H_bits=3 → s=3, ξ=max(1,3)=3, K=1/4;  p·s = 3/4   → S = (3/4)^(−1/4)
#   token 3: H_bits=4 → s=5, ξ=max(7,5)=7, K=1/9;  p·s = 1/2   → S = 2^(1/9)
RTA = [1.25 ** (-1 / math.log2(2.25) ** 2), 1.0, 0.75 ** -0.25, 2 ** (1 / 9)]

HAND = {
    "sft": [1, 1, 1, 1],
    "dft": [1, 0.5, 0.25, 0.1],
    "inv-prob": [0, 0.5, 0.75, 0.9],
    "nll": [0, LN2, 2 * LN2, math.log(10)],
    # Lin et al.'s loss, factor differentiated: (1 − p)^2 + 2·p·(1 − p)·(−ln p)
    "focal": [0, 0.25 + 0.5 * LN2, 0.5625 + 0.375 * math.log(4), 0.81 + 0.18 * math.log(10)],
    "entropy": [0, 2 * LN2, 3 * LN2, 4 * LN2],
    "eaft": [0, 0.5, 1, 0.25],
    # excess loss −log p − (−log 0.5): 0−ln2 → 0, ln2−ln2 = 0, 2ln2−ln2, ln10−ln2 = ln5
    "rho1": [0, 0, 1, 1],  # the top 60% (floor 2.4 = 2 tokens) by excess loss 0, 0, ln 2, ln 5
    "ranktuner": RT,
    "ranktuner-dft": [1.0, 0.5 * math.sqrt(2.0), 0.25 / math.sqrt(2.0), 0.1 * 2 ** (1 / 6)],
    "ranktuner-approx": RTA,
    # controls: (pos + ½)/seq_len = ½/3, 1½/3, ½/1, 2½/3; rarity: id 5 is 3 of 4 tokens, id 7 is 1 of 4
    "position": [1 / 6, 1 / 2, 1 / 2, 5 / 6],
    "position-rev": [5 / 6, 1 / 2, 1 / 2, 1 / 6],
    "rarity": [math.log(4 / 3), math.log(4), math.log(4 / 3), math.log(4 / 3)],
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_worked_values(name):
    w = M.compute_weights(M.get_method(name), COLS)
    assert w.dtype == np.float64 and w.shape == (4,)
    np.testing.assert_allclose(w, HAND[name], rtol=1e-12, atol=1e-15)


def test_hand_values_with_params():
    # focal γ=3: (1−p)^3 = 0, 1/8, 27/64, 0.729
    w = M.compute_weights(M.get_method("focal"), COLS, params={"gamma": 3, "detach": True})
    np.testing.assert_allclose(w, [0, 0.125, 27 / 64, 0.729], rtol=1e-12)
    # eaft α=2: squares of 0, 1/2, 1, 1/4
    w = M.compute_weights(M.get_method("eaft"), COLS, params={"alpha": 2.0})
    np.testing.assert_allclose(w, [0, 0.25, 1, 0.0625], rtol=1e-12)
    # ranktuner-approx "trivial": below 2 bits s=1, so token 0 is (1·1)^(−K) = 1; others unchanged
    w = M.compute_weights(M.get_method("ranktuner-approx"), COLS, params={"low_entropy": "trivial"})
    np.testing.assert_allclose(w, [1.0] + RTA[1:], rtol=1e-12)


def test_inv_prob_exact_near_one_and_no_negative_zero():
    # p = 1 − 1e-12: 1 − exp() would lose ~4 digits; −expm1 keeps them.
    w = M.compute_weights(M.get_method("inv-prob"), {"logp": np.array([math.log1p(-1e-12), 0.0, 1e-9])})
    assert w[0] == pytest.approx(1e-12, rel=1e-9)
    # logp slightly > 0 (fp32 rounding) is treated as p = 1, not a negative weight
    assert w[1] == 0.0 and w[2] == 0.0 and not np.signbit(w[1:]).any()


def test_random_is_seeded_uniform():
    m = M.get_method("random")
    a = M.compute_weights(m, COLS, seed=7)
    b = M.compute_weights(m, COLS, seed=7)
    c = M.compute_weights(m, COLS, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a, np.random.default_rng(7).random(4))
    assert ((a >= 0) & (a < 1)).all()


# ------------------------------------------------------------------ RankTuner


def _rt(r, er):
    cols = {"rank": np.asarray(r, dtype=np.int64), "expected_rank": np.asarray(er, dtype=float)}
    return M.compute_weights(M.get_method("ranktuner"), cols)


def test_ranktuner_is_one_when_rank_equals_expected_rank():
    r = np.array([1, 2, 5, 40, 1000, 49152])
    np.testing.assert_array_equal(_rt(r, r.astype(float)), np.ones(r.size))


def test_ranktuner_grows_with_rank_at_fixed_expected_rank():
    w = _rt(np.arange(1, 200), np.full(199, 5.0))
    assert (np.diff(w) > 0).all()
    assert w[4] == 1.0  # R = 5 = E[R]
    assert (w < 2).all() and (w > 0.5).all()  # S ∈ (1/2, 2) since 0 < f <= 1


def test_ranktuner_falls_with_expected_rank_at_fixed_rank():
    er = np.linspace(1.0, 500.0, 300)
    w = _rt(np.full(300, 10), er)
    assert (np.diff(w) < 0).all()


def test_ranktuner_clamps_expected_rank_rounded_below_one():
    # E[R] = 1 − 1e-9 from float rounding is treated as 1: S = 1 at R = 1, not > 1.
    assert _rt([1], [1 - 1e-9])[0] == 1.0


def test_ranktuner_saturates_to_one_in_the_noise_region():
    # Both large: f(R), f(E[R]) → 0, so S → 1 even when R is 10x E[R].
    w = _rt([10_000, 1_000_000], [1_000, 100_000])
    assert abs(w[0] - 1) < 0.04 and abs(w[1] - 1) < 0.02
    assert abs(w[1] - 1) < abs(w[0] - 1)


def test_ranktuner_approx_tends_to_one_when_rank_and_entropy_are_large():
    # Target as likely as the rank allows (p = 1/R) and entropy such that s(H) = R·ratio.
    def approx(r, ratio):
        s = r * ratio
        h_bits = 2 + math.log2(s - 1)  # s = 2^(H_bits−2) + 1
        cols = {"logp": np.array([-math.log(r)]), "entropy": np.array([h_bits * LN2]), "rank": np.array([r])}
        return M.compute_weights(M.get_method("ranktuner-approx"), cols)[0]

    for ratio in (0.1, 10.0):
        dev = [abs(approx(r, ratio) - 1) for r in (100, 10_000, 1_000_000)]
        assert dev[0] > dev[1] > dev[2] and dev[2] < 0.02
    assert approx(1_000, 1.0) == pytest.approx(1.0, abs=1e-12)  # p·s = 1 exactly


def test_ranktuner_approx_rejects_unknown_low_entropy_mode():
    with pytest.raises(AuditError, match="ranktuner-approx.*low_entropy"):
        M.compute_weights(M.get_method("ranktuner-approx"), COLS, params={"low_entropy": "clip"})


# ------------------------------------------------------------------------ TALR



def _talr(logp, batch=None, **params):
    return M.compute_weights(M.get_method("talr"), {"logp": np.asarray(logp, float)}, batch=batch, params=params)


def test_talr_hand_worked_single_batch():
    # NLL = 0, ln2, 2ln2, 3ln2 → median τ = 1.5 ln2; log p/τ = −2k/3 (k = 0..3).
    # w_k = 4 · e^(−2k/3) / Σ_j e^(−2j/3); none is below the default floor 0.01.
    logp = -np.arange(4) * LN2
    e = [math.exp(-2 * k / 3) for k in range(4)]
    expect = [4 * x / sum(e) for x in e]  # ≈ 2.0917, 1.0739, 0.5514, 0.2831
    np.testing.assert_allclose(_talr(logp), expect, rtol=1e-12)
    # Floor 0.5: token 3 (0.283) is floored to 0.5; the other three share 4 − 0.5 = 3.5
    # in the same proportions: w_k = 3.5 · e_k / (e_0 + e_1 + e_2) ≈ 1.9696, 1.0112, 0.5192.
    w = _talr(logp, w_min=0.5)
    expect = [3.5 * x / sum(e[:3]) for x in e[:3]] + [0.5]
    np.testing.assert_allclose(w, expect, rtol=1e-12)
    assert w.mean() == pytest.approx(1.0, abs=1e-12) and w.min() >= 0.5 - 1e-12


def test_talr_floor_and_mean_one_per_batch():
    rng = np.random.default_rng(0)
    logp = -rng.exponential(2.0, size=3000)
    batch = rng.integers(0, 12, size=3000)
    for w_min in (0.0, 0.01, 0.2, 0.9):
        w = _talr(logp, batch, w_min=w_min)
        assert (w >= w_min * (1 - 1e-12)).all()
        for b in range(12):
            assert w[batch == b].mean() == pytest.approx(1.0, abs=1e-9)
    assert (_talr(logp, batch, w_min=0.1) > 0.1 + 1e-9).any()  # not everything floored


def test_talr_depends_on_batch_membership():
    logp = np.log([0.9, 0.5, 0.1, 0.05, 0.8, 0.3])
    one = _talr(logp)  # batch=None: one batch
    np.testing.assert_allclose(one, _talr(logp, np.zeros(6, int)), rtol=1e-12)
    split_a = _talr(logp, np.array([0, 0, 0, 1, 1, 1]))
    split_b = _talr(logp, np.array([0, 1, 0, 1, 0, 1]))
    assert not np.allclose(one, split_a) and not np.allclose(split_a, split_b)
    # batch ids are labels only: renaming them changes nothing
    np.testing.assert_allclose(split_a, _talr(logp, np.array(["x", "x", "x", "a", "a", "a"])), rtol=1e-12)
    # a batch of one token gets weight 1
    assert _talr([-3.0], np.array([5]))[0] == 1.0


def test_talr_zero_median_guard():
    # All p = 1: τ guard, all weights 1.
    np.testing.assert_array_equal(_talr(np.zeros(5)), np.ones(5))
    # Median NLL 0 but one token with loss: τ = 1e-6 sends it to the floor, the
    # other three share 4 − 0.01 equally: 3.99/3 = 1.33.
    w = _talr([0.0, 0.0, 0.0, -LN2])
    np.testing.assert_allclose(w, [1.33, 1.33, 1.33, 0.01], rtol=1e-12)


@pytest.mark.parametrize("params", [{"w_min": 1.5}, {"w_min": -0.1}, {"tau_min": 0.0}])
def test_talr_rejects_bad_params(params):
    with pytest.raises(AuditError, match="talr"):
        _talr([-1.0, -2.0], **params)


def test_talr_is_flagged_batch_dependent():
    assert M.get_method("talr").batch_dependent
    # MiLe and DEFT-Cayley normalise by batch statistics too (tests/test_methods_2025.py); rho1's
    # select=top-k ranks within the batch (tests/test_fidelity.py)
    batch_dependent = {"talr", "mile", "deft-cayley", "rho1"}
    assert not any(m.batch_dependent for m in M.available_methods() if m.name not in batch_dependent)


# ------------------------------------------------------------ compute_weights


def _register_returning(value, name="bad"):
    @M.register(name, family="baseline", needs=("logp",), formula="x", source="test")
    def fn(columns, *, batch=None, rng=None):
        return value

    return M.get_method(name)


@pytest.mark.parametrize(
    "value, message",
    [
        ([1.0, np.nan, np.nan, np.nan], "method 'bad' returned 3 NaN weights"),
        ([1.0, np.inf, 1.0, 1.0], "method 'bad' returned 1 infinite weight"),
        ([1.0, -1.0, -0.5, 1.0], "method 'bad' returned 2 negative weights"),
        ([np.nan, -1.0, 1.0, 1.0], "method 'bad' returned 1 NaN weight and 1 negative weight"),
        ([1.0, 1.0, 1.0], "method 'bad' returned 3 weights for 4 tokens"),
        (np.ones((4, 1)), r"method 'bad' returned an array of shape \(4, 1\)"),
        (None, "method 'bad' returned None"),
        (np.array(["a", "b", "c", "d"]), "method 'bad' returned dtype"),
    ],
)
def test_invalid_results_name_the_method(value, message):
    m = _register_returning(value)
    with pytest.raises(AuditError, match=message):
        M.compute_weights(m, COLS)


def test_invalid_result_points_at_bad_input():
    cols = {"logp": np.array([-1.0, np.nan, -0.5])}
    with pytest.raises(AuditError, match=r"method 'nll' returned 1 NaN weight \(column 'logp' has 1 non-finite value\)"):
        M.compute_weights(M.get_method("nll"), cols)


def test_result_is_float64_copy():
    col = np.array([1.0, 2.0, 3.0, 4.0])

    @M.register("echo", family="entropy", needs=("entropy",), formula="w = H", source="test")
    def echo(columns, *, batch=None, rng=None):
        return columns["entropy"]

    w = M.compute_weights(M.get_method("echo"), {"entropy": col})
    w[0] = 99.0
    assert col[0] == 1.0  # not a view of the input
    ints = _register_returning(np.array([1, 2, 3, 4]), name="ints")
    assert M.compute_weights(ints, COLS).dtype == np.float64


def test_missing_column_and_missing_columns():
    m = M.get_method("rho1")
    assert M.missing_columns(m, ["logp"]) == ["ref_logp"]
    assert M.missing_columns(m, {"logp": 1, "ref_logp": 2}) == []
    assert M.missing_columns(M.get_method("sft"), []) == []
    with pytest.raises(AuditError, match="method 'rho1' needs column 'ref_logp'"):
        M.compute_weights(m, {"logp": COLS["logp"]})


def test_column_shape_checks():
    with pytest.raises(AuditError, match="method 'rho1': column 'ref_logp' has 3 rows but 'logp' has 4"):
        M.compute_weights(M.get_method("rho1"), {"logp": COLS["logp"], "ref_logp": np.zeros(3)})
    with pytest.raises(AuditError, match="method 'dft': column 'logp' must be 1-D"):
        M.compute_weights(M.get_method("dft"), {"logp": np.zeros((2, 2))})
    with pytest.raises(AuditError, match="method 'talr': batch ids have shape"):
        M.compute_weights(M.get_method("talr"), {"logp": np.zeros(4)}, batch=np.zeros(3))
    with pytest.raises(AuditError, match="method 'sft': no 1-D statistics columns"):
        M.compute_weights(M.get_method("sft"), {})


def test_unknown_param_in_compute_weights():
    with pytest.raises(AuditError, match="method 'focal' has no parameter 'beta'.*gamma"):
        M.compute_weights(M.get_method("focal"), COLS, params={"beta": 1.0})
    with pytest.raises(AuditError, match="method 'focal'.*gamma must be >= 0"):
        M.compute_weights(M.get_method("focal"), COLS, params={"gamma": -1.0})


def test_float32_and_int_columns_are_accepted():
    cols = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in COLS.items()}
    for m in M.available_methods():
        w = M.compute_weights(m, cols)
        assert w.dtype == np.float64 and np.isfinite(w).all() and (w >= 0).all()
    np.testing.assert_allclose(M.compute_weights(M.get_method("ranktuner"), cols), RT, rtol=1e-6)


# ------------------------------------------------------------------- registry


def test_builtins_registered_in_family_order():
    names = [m.name for m in M.available_methods()]
    assert names[:13] == [
        "sft", "random", "dft", "inv-prob", "talr", "entropy", "eaft", "nll", "focal",
        "ranktuner", "ranktuner-approx", "ranktuner-dft", "rho1",
    ]
    for m in M.available_methods():
        assert m.family in M.FAMILIES and m.formula and m.source
    assert M.get_method("focal").params == {"gamma": 2.0, "detach": False}
    assert M.get_method("eaft").params == {"alpha": 1.0}
    assert M.get_method("rho1").needs == ("logp", "ref_logp")
    assert hash(M.get_method("focal"))  # usable as a dict key despite the params dict


def test_unknown_method_lists_known_names():
    with pytest.raises(AuditError, match="unknown method 'nope'; known methods: sft, random, dft"):
        M.get_method("nope")


def test_register_errors_and_unregister():
    @M.register("mine", family="prob", needs=["logp"], params={"k": 1}, formula="w = k", source="test")
    def mine(columns, *, batch=None, rng=None, k=1):
        return np.full(len(columns["logp"]), float(k))

    m = M.get_method("mine")
    assert m.needs == ("logp",) and m.params == {"k": 1}
    assert M.available_methods()[-1] is m  # registration order
    np.testing.assert_array_equal(M.compute_weights(m, COLS, params={"k": 3}), [3, 3, 3, 3])

    with pytest.raises(AuditError, match="'mine' is already registered"):
        M.register("mine", family="prob", needs=(), formula="", source="")(mine)
    with pytest.raises(AuditError, match="unknown family 'vibes'"):
        M.register("x", family="vibes", needs=(), formula="", source="")
    for bad in ("a.b", "a=b", "a,b", "a b", ""):
        with pytest.raises(AuditError, match="invalid method name"):
            M.register(bad, family="prob", needs=(), formula="", source="")
    with pytest.raises(AuditError, match="method 'sig':.* must accept"):

        @M.register("sig", family="prob", needs=(), params={"k": 1}, formula="", source="")
        def sig(columns):  # no batch/rng/k
            return columns

    assert M.unregister("mine") is m
    with pytest.raises(AuditError, match="unknown method 'mine'"):
        M.get_method("mine")
    with pytest.raises(AuditError, match="cannot unregister 'mine'"):
        M.unregister("mine")


def test_isolated_registry_restores_state():
    before = [m.name for m in M.available_methods()]
    with M.isolated_registry():
        M.unregister("sft")
        _register_returning(np.ones(4), name="temp")
    assert [m.name for m in M.available_methods()] == before


# ----------------------------------------------------------------- parse_params


def test_parse_params_types():
    out = M.parse_params(["talr.w_min=0.1", "focal.gamma=3", " ranktuner-approx.low_entropy = trivial ", "talr.w_min=0.2"])
    assert out == {"talr": {"w_min": 0.2}, "focal": {"gamma": 3.0}, "ranktuner-approx": {"low_entropy": "trivial"}}
    assert isinstance(out["focal"]["gamma"], float)  # typed by the default, 2.0
    assert M.parse_params([]) == {}


@pytest.mark.parametrize(
    "item, message",
    [
        ("focal", "expected METHOD.PARAM=VALUE"),
        ("focal=3", "expected METHOD.PARAM=VALUE"),
        ("focal.gamma=", "expected METHOD.PARAM=VALUE"),
        (".gamma=3", "expected METHOD.PARAM=VALUE"),
        ("nope.gamma=3", "unknown method 'nope'"),
        ("focal.beta=3", "method 'focal' has no parameter 'beta' \\(parameters: gamma, detach\\)"),
        ("sft.x=1", "method 'sft' has no parameter 'x' \\(parameters: none\\)"),
        ("focal.gamma=two", "focal.gamma=two: expected a number"),
        ("focal.gamma=nan", "expected a finite number"),
    ],
)
def test_parse_params_errors(item, message):
    with pytest.raises(AuditError, match=message):
        M.parse_params([item])


def test_parse_params_int_default():
    @M.register("intp", family="rank", needs=(), params={"k": 20}, formula="", source="")
    def intp(columns, *, batch=None, rng=None, k=20):
        return np.ones(1)

    assert M.parse_params(["intp.k=5"]) == {"intp": {"k": 5}}
    with pytest.raises(AuditError, match="expected an integer"):
        M.parse_params(["intp.k=2.5"])


# ------------------------------------------------------- method files, plugins

PLUGIN = """
import numpy as np
from reweight_audit.methods import register

@register("{name}", family="prob", needs=("logp",), params={{"scale": 2.0}},
          formula="w = scale * p", source="test plugin")
def w(columns, *, batch=None, rng=None, scale=2.0):
    return scale * np.exp(columns["logp"])
"""


def _write(tmp_path, stem, body):
    path = tmp_path / f"{stem}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_load_method_file(tmp_path):
    path = _write(tmp_path, "my_methods", PLUGIN.format(name="double-p"))
    assert M.load_method_file(path) == ["double-p"]
    m = M.get_method("double-p")
    np.testing.assert_allclose(M.compute_weights(m, COLS), [2, 1, 0.5, 0.2], rtol=1e-12)
    assert M.parse_params(["double-p.scale=3"]) == {"double-p": {"scale": 3.0}}
    assert M.load_method_file(str(path)) == ["double-p"]  # second load: no duplicate error


def test_load_method_file_errors(tmp_path):
    with pytest.raises(AuditError, match="method file '.*nowhere.py' not found"):
        M.load_method_file(tmp_path / "nowhere.py")
    bad = _write(tmp_path, "broken", "def oops(:\n")
    with pytest.raises(AuditError, match="method file '.*broken.py': SyntaxError") as exc:
        M.load_method_file(bad)
    assert "\n" not in str(exc.value)
    # registers one method, then fails: the half-loaded method is rolled back
    half = _write(tmp_path, "half", PLUGIN.format(name="half-p") + "\nraise RuntimeError('boom\\nsecond line')\n")
    with pytest.raises(AuditError, match="method file '.*half.py': RuntimeError: boom second line"):
        M.load_method_file(half)
    with pytest.raises(AuditError, match="unknown method 'half-p'"):
        M.get_method("half-p")
    dup = _write(tmp_path, "dup", PLUGIN.format(name="sft"))
    with pytest.raises(AuditError, match="method file '.*dup.py': method 'sft' is already registered"):
        M.load_method_file(dup)


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A fresh importable module on sys.path, removed from sys.modules afterwards."""
    created = []

    def make(body):
        mod = f"rwa_plugin_{uuid.uuid4().hex[:10]}"
        _write(tmp_path, mod, body)
        created.append(mod)
        return mod

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for mod in created:
        sys.modules.pop(mod, None)


def _fake_entry_points(monkeypatch, eps):
    calls = []

    def fake(*, group):
        calls.append(group)
        return [e for e in eps if e.group == group]

    monkeypatch.setattr(registry, "entry_points", fake)
    return calls


def _ep(name, value):
    return importlib.metadata.EntryPoint(name=name, value=value, group=M.ENTRY_POINT_GROUP)


def test_entry_point_module(monkeypatch, plugin_module):
    mod = plugin_module(PLUGIN.format(name="ep-method"))
    calls = _fake_entry_points(monkeypatch, [_ep("mine", mod)])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    names = [m.name for m in M.available_methods()]
    assert names[-1] == "ep-method" and calls == [M.ENTRY_POINT_GROUP]
    M.available_methods()
    assert len(calls) == 1  # loaded once
    np.testing.assert_allclose(M.compute_weights(M.get_method("ep-method"), COLS), [2, 1, 0.5, 0.2])
    assert M.load_entry_points() == []  # already loaded: nothing new, no duplicate error


def test_entry_point_callable_setup_hook(monkeypatch, plugin_module):
    body = "def setup():\n" + textwrap.indent(PLUGIN.format(name="hooked"), "    ")
    mod = plugin_module(body)
    _fake_entry_points(monkeypatch, [_ep("hook", f"{mod}:setup")])
    assert M.load_entry_points() == ["hooked"]
    assert M.load_entry_points() == []  # the hook is not called twice


def test_entry_point_to_method_function_is_not_called(monkeypatch, plugin_module):
    mod = plugin_module(PLUGIN.format(name="direct"))
    _fake_entry_points(monkeypatch, [_ep("direct", f"{mod}:w")])
    assert M.load_entry_points() == ["direct"]


def test_unknown_name_triggers_entry_points(monkeypatch, plugin_module):
    mod = plugin_module(PLUGIN.format(name="lazy"))
    calls = _fake_entry_points(monkeypatch, [_ep("lazy", mod)])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    M.get_method("sft")
    assert calls == []  # a built-in needs no plugin discovery
    assert M.get_method("lazy").name == "lazy" and len(calls) == 1


def test_broken_entry_point(monkeypatch, plugin_module):
    mod = plugin_module(PLUGIN.format(name="ghost") + "\nraise ImportError('needs torch-nightly')\n")
    _fake_entry_points(monkeypatch, [_ep("broken", mod)])
    with pytest.raises(AuditError, match=r"entry point 'broken' = 'rwa_plugin_\w+' .*ImportError: needs torch-nightly"):
        M.load_entry_points()
    with pytest.raises(AuditError, match="unknown method 'ghost'"):
        M.get_method("ghost")
    _fake_entry_points(monkeypatch, [_ep("missing", "no_such_module_rwa_xyz")])
    with pytest.raises(AuditError, match="entry point 'missing'.*ModuleNotFoundError"):
        M.load_entry_points()


# -------------------------------------------------------------- assign_batches


def test_assign_batches_deterministic_and_whole_sequences():
    seqs = np.repeat(np.arange(10), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    a = M.assign_batches(seqs, 3, seed=1)
    np.testing.assert_array_equal(a, M.assign_batches(seqs, 3, seed=1))
    assert a.dtype == np.int64 and a.shape == seqs.shape
    per_seq = {s: set(a[seqs == s]) for s in range(10)}
    assert all(len(v) == 1 for v in per_seq.values())  # a sequence never straddles batches
    sizes = np.bincount([v.pop() for v in per_seq.values()])
    assert sorted(sizes.tolist()) == [1, 3, 3, 3]  # 10 sequences in batches of 3


def test_assign_batches_is_permutation_invariant_function_of_seed():
    rng = np.random.default_rng(3)
    seqs = np.array([f"s{i}" for i in rng.integers(0, 40, size=500)])
    a = M.assign_batches(seqs, 4, seed=11)
    perm = rng.permutation(seqs.size)
    # reordering the rows reorders the answer and nothing else
    np.testing.assert_array_equal(M.assign_batches(seqs[perm], 4, seed=11), a[perm])
    assert not np.array_equal(M.assign_batches(seqs, 4, seed=12), a)
    # batch_seqs >= number of sequences: everything in batch 0
    np.testing.assert_array_equal(M.assign_batches(seqs, 1000, seed=11), np.zeros(500, int))
    assert M.assign_batches(np.array([], dtype=int), 4, seed=0).shape == (0,)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_assign_batches_rejects_bad_size(bad):
    with pytest.raises(AuditError, match="batch size"):
        M.assign_batches(np.arange(5), bad, seed=0)


def test_talr_with_assigned_batches_changes_with_seed():
    rng = np.random.default_rng(5)
    seqs = np.repeat(np.arange(20), 10)
    logp = -rng.exponential(1.5, size=seqs.size)
    m = M.get_method("talr")
    w1 = M.compute_weights(m, {"logp": logp}, batch=M.assign_batches(seqs, 4, seed=1))
    w2 = M.compute_weights(m, {"logp": logp}, batch=M.assign_batches(seqs, 4, seed=2))
    assert not np.allclose(w1, w2)
    assert w1.mean() == pytest.approx(1.0) and w2.mean() == pytest.approx(1.0)

"""Tests of reweight_audit.scoring.stats against a plain float64 brute-force reference.

Every test of ``token_statistics`` runs on both CPU implementations (the ``backend`` fixture):
the torch path, which is also the fallback off-CPU, and the fused numba kernel.

Tolerances (float32 arithmetic against float64 truth):
  logp, entropy, topk_entropy: 1e-5 absolute + 1e-5 relative (entropy and logp of nearly
  deterministic rows: 1e-5 relative);  sum_p2: 1e-5 relative;  rank: exact;  expected_rank: 1e-6 relative (the function certifies 1e-7 with respect to
  its own float32 probabilities; float32 exp adds a little on top).
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_matches, gumbel, reference
from reweight_audit.scoring import stats
from reweight_audit.scoring.stats import (
    EXPECTED_RANK_RTOL,
    TOPK,
    expected_rank_bucketed,
    expected_rank_sorted,
    token_statistics,
)

FLOAT_KEYS = ("logp", "entropy", "topk_entropy", "sum_p2")


@pytest.fixture(params=["torch", "numba"])
def backend(request, monkeypatch) -> str:
    """Run the test on one CPU implementation (skipped for numba where numba is not installed)."""
    if request.param == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv(stats.BACKEND_ENV, request.param)
    assert stats.backend(1000) == request.param
    return request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def student_t(rows: int, vocab: int, g: torch.Generator, df: float = 3.0) -> torch.Tensor:
    normal = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    chi2 = (torch.randn(rows, vocab, int(df), generator=g, dtype=torch.float64) ** 2).sum(-1)
    return (normal / torch.sqrt(chi2 / df) * 2.0).float()


def test_output_contract(backend):
    g = gen(0)
    logits = torch.randn(5, 300, generator=g)
    out = token_statistics(logits, torch.randint(0, 300, (5,), generator=g))
    expected = {
        "logp": torch.float32,
        "entropy": torch.float32,
        "rank": torch.int64,
        "expected_rank": torch.float64,
        "expected_rank_error_bound": torch.float64,
        "topk_entropy": torch.float32,
        "sum_p2": torch.float32,
        "finite": torch.bool,
    }
    assert {k: v.dtype for k, v in out.items()} == expected
    assert all(v.shape == (5,) for v in out.values())


@pytest.mark.parametrize("vocab", [1000, 5003])  # plain topk; block prefilter with a ragged tail
def test_random_logits(vocab, backend):
    g = gen(vocab)
    logits = torch.randn(12, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (12,), generator=g)
    assert_matches(token_statistics(logits, targets), reference(logits, targets))


def test_heavy_tailed_and_spiky_logits(backend):
    g = gen(1)
    vocab = 4096
    spiky = torch.randn(6, vocab, generator=g) * 3
    spiky[:, :4] = 15.0  # exact ties at the top, dominating the mass
    logits = torch.cat([gumbel(6, vocab, g), student_t(6, vocab, g), spiky])
    targets = torch.randint(0, vocab, (18,), generator=g)
    targets[-3:] = torch.tensor([0, 3, 4])
    assert_matches(token_statistics(logits, targets), reference(logits, targets))


def test_peaked_row(backend):
    g = gen(2)
    logits = torch.randn(4, 2000, generator=g)
    logits[:, 7] += 60.0  # one huge logit: p ~ 1 - 1e-22, E[R] ~ 1
    targets = torch.tensor([7, 0, 1999, 7])
    got = token_statistics(logits, targets)
    assert_matches(got, reference(logits, targets))
    assert got["rank"][0] == 1 and got["rank"][3] == 1
    assert (got["expected_rank"] - 1.0).abs().max() < 1e-12
    assert (got["entropy"] < 1e-18).all()


def test_entropy_of_nearly_deterministic_rows_is_relatively_accurate(backend):
    # H ~ 1e-5 .. 1e-3 nats: an absolute error of float32's 6e-8 in log S would show here
    g = gen(14)
    logits = torch.randn(6, 3000, generator=g)
    logits[:, 0] += torch.tensor([12.0, 14.0, 16.0, 18.0, 20.0, 22.0])
    targets = torch.zeros(6, dtype=torch.int64)
    got, ref = token_statistics(logits, targets), reference(logits, targets)
    torch.testing.assert_close(got["entropy"].double(), ref["entropy"], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["logp"].double(), ref["logp"], rtol=1e-5, atol=0)


def test_flat_row(backend):
    vocab = 3000
    logits = torch.zeros(3, vocab)
    logits[1] = 4.25  # any constant
    targets = torch.tensor([0, 17, vocab - 1])
    got = token_statistics(logits, targets)
    assert_matches(got, reference(logits, targets))
    uniform = torch.full((3,), (vocab + 1) / 2, dtype=torch.float64)
    torch.testing.assert_close(got["expected_rank"], uniform, rtol=1e-9, atol=0)
    assert torch.equal(got["rank"], torch.full((3,), vocab))
    torch.testing.assert_close(got["entropy"], torch.full((3,), math.log(vocab)), rtol=1e-6, atol=0)
    torch.testing.assert_close(got["sum_p2"], torch.full((3,), 1 / vocab), rtol=1e-6, atol=0)
    torch.testing.assert_close(got["topk_entropy"], torch.full((3,), math.log(TOPK)), rtol=1e-6, atol=0)
    assert (got["expected_rank_error_bound"] == 0).all()  # ties are exact


def test_exact_ties_target_tied(backend):
    g = gen(3)
    vocab = 4000
    levels = torch.tensor([-3.0, -1.0, 0.5, 2.0, 2.0625])
    logits = levels[torch.randint(0, 5, (8, vocab), generator=g)]
    targets = torch.randint(0, vocab, (8,), generator=g)
    got, ref = token_statistics(logits, targets), reference(logits, targets)
    assert_matches(got, ref)
    for i in range(8):  # ties count against the target
        assert int(got["rank"][i]) == int((logits[i] >= logits[i, targets[i]]).sum())
    # slots of equal values are exact: the certified bound is ~0
    assert (got["expected_rank_error_bound"] <= 1e-12 * got["expected_rank"]).all()


def test_masked_vocabulary(backend):
    g = gen(4)
    vocab = 2500
    logits = torch.randn(6, vocab, generator=g) * 2
    mask = torch.rand(6, vocab, generator=g) < 0.5
    mask[:, 0] = False
    masked = logits.masked_fill(mask, -math.inf)
    targets = torch.zeros(6, dtype=torch.int64)
    targets[1] = int(mask[1].nonzero()[0])  # a masked target
    got, ref = token_statistics(masked, targets), reference(masked, targets)
    assert_matches(got, ref)
    assert got["logp"][1] == -math.inf
    assert int(got["rank"][1]) == vocab
    assert got["finite"].all()
    # masked tokens have p = 0: E[R] equals that of the vocabulary without them
    for i in range(6):
        kept = logits[i][~mask[i]].unsqueeze(0)
        alone = token_statistics(kept, torch.zeros(1, dtype=torch.int64))
        torch.testing.assert_close(got["expected_rank"][i], alone["expected_rank"][0], rtol=1e-9, atol=0)
        torch.testing.assert_close(got["entropy"][i], alone["entropy"][0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype, backend):
    g = gen(5)
    vocab = 5000
    logits = (torch.randn(10, vocab, generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab, (10,), generator=g)
    got = token_statistics(logits, targets)
    # the reference sees the same rounded values, upcast
    assert_matches(got, reference(logits.float(), targets))
    # bf16/fp16 logits are full of exact ties, which the slots resolve exactly: the bound
    # stays well inside the tolerance, no row needs the fallback
    assert (got["expected_rank_error_bound"] <= 0.3 * EXPECTED_RANK_RTOL * got["expected_rank"]).all()


def test_non_finite_rows_are_isolated(backend):
    g = gen(6)
    vocab = 1500
    logits = torch.randn(6, vocab, generator=g) * 2
    targets = torch.randint(0, vocab, (6,), generator=g)
    bad = logits.clone()
    bad[1, 10] = math.nan
    bad[3, 99] = math.inf
    bad[4, 5] = math.inf
    bad[4, 6] = -math.inf  # with +inf: still non-finite
    got = token_statistics(bad, targets)
    assert got["finite"].tolist() == [True, False, True, False, False, True]
    for i in (1, 3, 4):
        assert int(got["rank"][i]) == 0
        for key in (*FLOAT_KEYS, "expected_rank", "expected_rank_error_bound"):
            assert math.isnan(float(got[key][i])), key
    clean = token_statistics(logits[[0, 2, 5]], targets[[0, 2, 5]])
    for key, value in clean.items():
        torch.testing.assert_close(got[key][[0, 2, 5]], value, rtol=1e-6, atol=1e-7, msg=key)
    assert_matches(got, reference(bad, targets))


def test_known_bounds(backend):
    g = gen(7)
    vocab = 3000
    temps = torch.tensor([0.05, 0.3, 1.0, 2.0, 4.0, 10.0]).repeat_interleave(3).unsqueeze(1)
    logits = torch.randn(18, vocab, generator=g) * 3 / temps
    targets = torch.randint(0, vocab, (18,), generator=g)
    out = token_statistics(logits, targets)
    p_target = out["logp"].double().exp()
    assert (out["rank"] >= 1).all()
    assert (out["rank"].double() * p_target <= 1 + 1e-5).all()  # R <= 1/p
    assert (out["expected_rank"] >= 1 - 1e-12).all()
    h_bits = out["entropy"].double() / math.log(2)
    massey = h_bits >= 2
    assert massey.sum() > 5
    lower = torch.pow(2.0, h_bits[massey] - 2) + 1
    assert (out["expected_rank"][massey] >= lower * (1 - 1e-6)).all()
    assert (out["expected_rank"] <= (vocab + 1) / 2 + 1e-6).all()  # uniform is the maximum


def test_expected_rank_sorted_reference():
    vocab = 777
    assert float(expected_rank_sorted(torch.ones(vocab))) == pytest.approx((vocab + 1) / 2, rel=1e-12)
    p = torch.tensor([[0.1, 0.6, 0.3], [0.0, 2.0, 0.0]])  # unnormalised rows are normalised
    expected = torch.tensor([1 * 0.6 + 2 * 0.3 + 3 * 0.1, 1.0], dtype=torch.float64)
    torch.testing.assert_close(expected_rank_sorted(p), expected)


def certified_cases() -> dict[str, torch.Tensor]:
    g = gen(8)
    vocab = 6000
    spiky = torch.randn(4, vocab, generator=g) * 3
    spiky[:, :5] += 12
    ties = torch.tensor([-5.0, -2.0, -1.0, 0.0])[torch.randint(0, 4, (4, vocab), generator=g)]
    cases = {
        "randn": torch.randn(4, vocab, generator=g) * 3,
        "gumbel": gumbel(4, vocab, g),
        "student-t": student_t(4, vocab, g),
        "spiky": spiky,
        "ties": ties,
        "bf16": (torch.randn(4, vocab, generator=g) * 3).bfloat16().float(),
        "near-equal": torch.randn(4, vocab, generator=g) * 1e-3,
        "wide": torch.randn(4, vocab, generator=g) * 40,  # much of the row below 2^-64
    }
    return {name: torch.exp((z - z.amax(-1, keepdim=True)).clamp(min=-87.0)) for name, z in cases.items()}


@pytest.mark.parametrize("budget", ["default", "coarse-only", "small"])
def test_certified_bound_holds(budget):
    # With the default budget the errors are ~1e-9; starving the slot budget makes the
    # bound do real work, and it must still cover the true error.
    fine_budget = {"default": None, "coarse-only": stats._K1, "small": stats._K1 + 300}[budget]
    for name, e in certified_cases().items():
        est, bound = expected_rank_bucketed(e, fine_budget=fine_budget)
        exact = expected_rank_sorted(e)
        err = (est - exact).abs()
        assert (err <= bound + 1e-12 * exact).all(), (name, (err - bound).max())
        if budget == "default":
            assert (bound <= EXPECTED_RANK_RTOL * exact).all(), name


def test_bound_is_small_on_a_realistic_vocabulary():
    g = gen(9)
    vocab = 49152
    logits = torch.cat([gumbel(3, vocab, g), torch.randn(3, vocab, generator=g) * 3])
    e = torch.exp((logits - logits.amax(-1, keepdim=True)).clamp(min=-87.0))
    est, bound = expected_rank_bucketed(e)
    exact = expected_rank_sorted(e)
    assert ((est - exact).abs() <= bound + 1e-12 * exact).all()
    assert (bound <= 2e-8 * exact).all()


def adversarial_rows(
    rows: int, vocab: int, bad: list[int], g: torch.Generator, ties: bool = False
) -> torch.Tensor:
    """Ordinary rows (random, or tie levels, which are exact at any budget), and rows of
    many distinct, nearly equal values (a 1e-3 spread)."""
    if ties:
        logits = torch.tensor([-4.0, -1.0, 0.0, 3.0])[torch.randint(0, 4, (rows, vocab), generator=g)]
    else:
        logits = torch.randn(rows, vocab, generator=g) * 3
    for i in bad:
        logits[i] = torch.randn(vocab, generator=g) * 1e-3
    return logits


@pytest.fixture
def starved_budget(monkeypatch):
    """No sub-slots at all: near-equal values share a slot, far beyond the tolerance.

    With the default budget we could not build a row that exceeds the tolerance (ties,
    pairs and singletons are exact, and the budget follows the heavy buckets), so the test
    starves the budget to exercise the fallback.
    """
    monkeypatch.setattr(stats, "_fine_budget", lambda vocab: stats._K1)
    monkeypatch.setenv(stats.BACKEND_ENV, "torch")  # the kernel's own fallback: tests/test_stats_kernel.py


def test_fallback_sorts_flagged_rows(starved_budget):
    g = gen(10)
    vocab = 2048
    logits = adversarial_rows(6, vocab, [2, 4], g)
    targets = torch.randint(0, vocab, (6,), generator=g)
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    raw, raw_bound = expected_rank_bucketed(e)
    exact = expected_rank_sorted(e)
    # the raw estimate really is off on the adversarial rows, and the bound says so
    assert ((raw - exact).abs() / exact)[[2, 4]].min() > 1e-5
    assert (raw_bound / exact)[[2, 4]].min() > EXPECTED_RANK_RTOL
    got = token_statistics(logits, targets)
    assert_matches(got, reference(logits, targets))
    torch.testing.assert_close(got["expected_rank"][[2, 4]], exact[[2, 4]], rtol=1e-12, atol=0)
    assert (got["expected_rank_error_bound"][[2, 4]] == 0).all()


def test_sync_free_fallback(starved_budget):
    g = gen(11)
    vocab = 2048
    # under the starved budget ordinary random rows would be flagged too: use tie levels
    logits = adversarial_rows(16, vocab, [5], g, ties=True)  # capacity ceil(16/16) = 1 row
    targets = torch.randint(0, vocab, (16,), generator=g)
    got = token_statistics(logits, targets, sync_free=True)
    assert_matches(got, reference(logits, targets))
    assert got["expected_rank_error_bound"][5] == 0
    # two flagged rows, capacity one: the other keeps its bucket value, honestly bounded
    logits = adversarial_rows(16, vocab, [5, 9], g, ties=True)
    got = token_statistics(logits, targets, sync_free=True)
    ref = reference(logits, targets)
    err = (got["expected_rank"] - ref["expected_rank"]).abs()
    assert (err <= got["expected_rank_error_bound"] + 1e-6 * ref["expected_rank"]).all()
    assert int((got["expected_rank_error_bound"] > EXPECTED_RANK_RTOL * got["expected_rank"]).sum()) == 1


def test_paths_and_chunking_agree(backend):
    g = gen(12)
    vocab = 3001
    logits = torch.randn(9, vocab, generator=g) * 2.5
    targets = torch.randint(0, vocab, (9,), generator=g)
    base = token_statistics(logits, targets)
    for kwargs in ({"chunk_rows": 1}, {"chunk_rows": 4}, {"sync_free": True}):
        other = token_statistics(logits, targets, **kwargs)
        for key in base:
            torch.testing.assert_close(other[key], base[key], rtol=1e-6, atol=1e-7, msg=f"{kwargs} {key}")
    exact = token_statistics(logits, targets, exact_expected_rank=True)
    torch.testing.assert_close(exact["expected_rank"], base["expected_rank"], rtol=EXPECTED_RANK_RTOL, atol=0)
    assert (exact["expected_rank_error_bound"] == 0).all()
    # a non-contiguous view gives the same answer
    wide = torch.randn(9, 2 * vocab, generator=g)
    wide[:, ::2] = logits
    view = token_statistics(wide[:, ::2], targets)
    torch.testing.assert_close(view["expected_rank"], base["expected_rank"], rtol=1e-9, atol=0)


def test_reused_workspace_gives_the_same_answers(backend):
    # CPU calls keep their workspace between calls: shapes and dtypes change under it
    g = gen(15)
    a = torch.randn(9, 700, generator=g) * 3
    ta = torch.randint(0, 700, (9,), generator=g)
    first = token_statistics(a, ta)
    token_statistics(torch.randn(4, 900, generator=g).half(), torch.zeros(4, dtype=torch.int64))
    token_statistics(torch.randn(40, 700, generator=g), torch.zeros(40, dtype=torch.int64), chunk_rows=40)
    for kwargs in ({}, {"chunk_rows": 3}):
        again = token_statistics(a, ta, **kwargs)
        for key in first:
            torch.testing.assert_close(again[key], first[key], rtol=1e-6, atol=1e-7, msg=key)


def test_topk_edge_cases(backend):
    g = gen(13)
    logits = torch.randn(3, 50, generator=g)
    targets = torch.zeros(3, dtype=torch.int64)
    assert_matches(token_statistics(logits, targets, topk=100), reference(logits, targets, topk=100))
    one = token_statistics(logits, targets, topk=1)
    assert (one["topk_entropy"] == 0).all()
    single = token_statistics(torch.randn(2, 1, generator=g), torch.zeros(2, dtype=torch.int64))
    assert (single["expected_rank"] == 1).all() and (single["rank"] == 1).all()
    empty = token_statistics(torch.randn(0, 10), torch.zeros(0, dtype=torch.int64))
    assert all(v.numel() == 0 for v in empty.values())


def test_input_validation(backend):
    with pytest.raises(ValueError):
        token_statistics(torch.randn(3, 4, 5), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        token_statistics(torch.randn(3, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError):
        token_statistics(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        token_statistics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), topk=0)
    with pytest.raises(TypeError):
        expected_rank_bucketed(torch.rand(2, 5, dtype=torch.float64))

"""The fused numba kernel against the torch path and the float64 brute force, at a real vocabulary size.

The kernel's expected rank and bound refer to its own float32 weights (``exp_weights``), whose
``exp`` is a vectorised polynomial: the certified-bound tests sort exactly those weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import assert_matches, gumbel, reference
from reweight_audit.scoring import stats
from reweight_audit.scoring.stats import EXPECTED_RANK_RTOL, expected_rank_sorted, token_statistics

pytest.importorskip("numba")
from reweight_audit.scoring import stats_kernel  # noqa: E402  (after the skip: needs numba)

VOCAB = 200_003  # >= 200k, and not a multiple of the 64-logit blocks of the top-k prefilter
COLUMNS = ("logp", "entropy", "topk_entropy", "sum_p2", "expected_rank", "expected_rank_error_bound")


def large_chunk(vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Random, peaked, flat, tied, masked and bf16-rounded rows, two of each where they differ."""
    g = torch.Generator().manual_seed(0)
    random = torch.randn(2, vocab, generator=g) * 3
    peaked = torch.randn(2, vocab, generator=g)
    peaked[0, 11] += 40.0  # p ~ 1 - 1e-12
    peaked[1, :3] += 25.0  # three tied spikes
    flat = torch.zeros(1, vocab)
    tied = torch.tensor([-6.0, -2.0, 0.0, 1.5, 1.5625])[torch.randint(0, 5, (1, vocab), generator=g)]
    masked = (torch.randn(1, vocab, generator=g) * 2).masked_fill(torch.rand(1, vocab, generator=g) < 0.6, -math.inf)
    masked[0, 0] = 1.0
    low = (gumbel(1, vocab, g) * 2).bfloat16().float()
    logits = torch.cat([random, peaked, flat, tied, masked, low])
    targets = torch.randint(0, vocab, (logits.shape[0],), generator=g)
    targets[2] = 11  # the peak
    targets[6] = int((logits[6] == -math.inf).nonzero()[0])  # a masked target
    return logits, targets


@pytest.fixture
def use(monkeypatch):
    def choose(name: str) -> None:
        monkeypatch.setenv(stats.BACKEND_ENV, name)

    return choose


def test_kernel_matches_reference_and_torch_path_at_200k(use):
    logits, targets = large_chunk()
    use("numba")
    fast = token_statistics(logits, targets)
    use("torch")
    slow = token_statistics(logits, targets)
    assert_matches(fast, reference(logits, targets))  # float64 brute force: rank exact, E[R] 1e-6, bound <= 1e-7 E
    assert torch.equal(fast["rank"], slow["rank"]) and torch.equal(fast["finite"], slow["finite"])
    for name in COLUMNS[:5]:  # the two float32 exps differ by a few ulp; everything else is float64
        torch.testing.assert_close(fast[name].double(), slow[name].double(), rtol=2e-6, atol=1e-7, msg=name)
    assert fast["logp"][6] == -math.inf and int(fast["rank"][6]) == VOCAB
    assert float(fast["expected_rank"][4]) == pytest.approx((VOCAB + 1) / 2, rel=1e-12)  # flat
    assert float(fast["expected_rank_error_bound"][4]) == 0.0  # ties are exact


def test_kernel_is_used_for_cpu_float32_and_upcasts_the_rest(use):
    logits, targets = large_chunk(5_000)
    use("numba")
    base = token_statistics(logits, targets)
    half = token_statistics(logits.half(), targets, chunk_rows=3)  # upcast 3 rows at a time
    ref = reference(logits.half().float(), targets)
    assert_matches(half, ref)
    view = torch.zeros(logits.shape[0], 2 * logits.shape[1])
    view[:, ::2] = logits
    strided = token_statistics(view[:, ::2], targets)
    for name in COLUMNS:
        torch.testing.assert_close(strided[name], base[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("extra", [0, 300])  # no fine slots at all; a starved budget
def test_kernel_bound_is_certified(extra):
    g = torch.Generator().manual_seed(1)
    vocab = 6000
    spiky = torch.randn(3, vocab, generator=g) * 3
    spiky[:, :5] += 12
    logits = torch.cat([
        torch.randn(3, vocab, generator=g) * 3,
        gumbel(3, vocab, g),
        spiky,
        torch.randn(3, vocab, generator=g) * 1e-3,  # near-equal values: wide slots, big bound
        torch.randn(3, vocab, generator=g) * 40,  # much of the row in the floor below 2^-64
        torch.tensor([-5.0, -1.0, 0.0])[torch.randint(0, 3, (3, vocab), generator=g)],
    ]).numpy()
    targets = np.zeros(logits.shape[0], dtype=np.int64)
    values, _ = stats_kernel.row_statistics(logits, targets, 20, math.inf, stats_kernel._K1 + extra, 2)
    estimate, bound = torch.from_numpy(values[4]), torch.from_numpy(values[5])
    exact = expected_rank_sorted(torch.from_numpy(stats_kernel.exp_weights(logits)))
    assert ((estimate - exact).abs() <= bound + 1e-12 * exact).all()
    assert (bound[-3:] <= 1e-12 * exact[-3:]).all()  # tie levels are exact at any budget
    assert (bound[9:12] > 1e-9 * exact[9:12]).all()  # the bound does real work here


def test_kernel_sorts_rows_above_tolerance():
    g = torch.Generator().manual_seed(2)
    vocab = 4096
    logits = torch.randn(5, vocab, generator=g) * 3
    logits[[1, 3]] = torch.randn(2, vocab, generator=g) * 1e-3
    z = logits.numpy()
    values, _ = stats_kernel.row_statistics(z, np.zeros(5, dtype=np.int64), 20, EXPECTED_RANK_RTOL, stats_kernel._K1, 2)
    exact = expected_rank_sorted(torch.from_numpy(stats_kernel.exp_weights(z))).numpy()
    np.testing.assert_allclose(values[4][[1, 3]], exact[[1, 3]], rtol=1e-12, atol=0)
    assert (values[5][[1, 3]] == 0).all()
    assert (values[5] <= EXPECTED_RANK_RTOL * values[4]).all()


def test_kernel_exp_is_within_3e_7():
    t = np.linspace(-87.0, 0.0, 500_001, dtype=np.float32)
    z = np.concatenate([t, [0.0]]).astype(np.float32)[None, :]  # the row maximum is 0: e = exp(t)
    got = stats_kernel.exp_weights(z)[0, :-1].astype(np.float64)
    truth = np.exp(t.astype(np.float64))
    assert np.max(np.abs(got - truth) / truth) <= 3e-7
    assert got.max() <= 1.0


def test_threads_and_task_sizes_do_not_change_results(monkeypatch):
    logits, targets = large_chunk(3_001)
    z, tg = logits.numpy(), targets.numpy()
    one, finite_one = stats_kernel.row_statistics(z, tg, 20, EXPECTED_RANK_RTOL, stats_kernel.fine_budget(3_001), 1)
    monkeypatch.setattr(stats_kernel, "_ROW_TASK_ELEMENTS", 1)  # one row per task
    many, finite_many = stats_kernel.row_statistics(z, tg, 20, EXPECTED_RANK_RTOL, stats_kernel.fine_budget(3_001), 3)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(finite_one, finite_many)


def test_backend_choice(monkeypatch):
    monkeypatch.setenv(stats.BACKEND_ENV, "auto")
    assert stats.backend(262_144) == "numba"
    assert stats.backend(stats_kernel.MAX_VOCAB + 1) == "torch"  # the packed slot sums would overflow
    monkeypatch.setenv(stats.BACKEND_ENV, "torch")
    assert stats.backend(1000) == "torch"
    monkeypatch.setenv(stats.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="auto, torch or numba"):
        stats.backend(1000)


def test_kernel_rejects_targets_outside_the_vocabulary(use):
    use("numba")
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        token_statistics(torch.randn(2, 10), torch.tensor([3, 10]))

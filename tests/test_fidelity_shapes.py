"""Issue 22: one declared loss shape drives the weight, loss and grad views (methods.shapes).

Every method that declares a loss shape is checked against central differences of that
declared loss in float64 (the weight is −dℓ/d(log p) with the detached constants held),
its loss view against the loss, and its grad view against torch autograd in the logits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reweight_audit import methods as M
from reweight_audit.evaluation import metrics

SHAPED = {  # method -> parameter settings to check (each with every default filled in)
    "focal": [{}, {"detach": True}, {"gamma": 0.5}, {"gamma": 3.5}],
    "deformed-log": [{}, {"alpha": 0.0}, {"alpha": 0.5}],
    "deft": [{}, {"eps": 0.0}],
    "deft-cayley": [{}, {"micro_batch_seqs": 0}],
}


def columns(n: int = 40, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, size=n)
    return {"logp": np.log(p), "sum_p2": np.clip(p ** 2 + rng.uniform(0, 0.3, n), 0, 1),
            "pos": np.tile(np.arange(5), n // 5)}


def test_the_shaped_methods_are_declared():
    shaped = {m.name for m in M.registered_methods() if M.shape_of(m) is not None}
    assert shaped == set(SHAPED)


@pytest.mark.parametrize("name,params", [(n, p) for n, ps in SHAPED.items() for p in ps])
def test_weight_is_minus_the_derivative_of_the_declared_loss(name, params):
    method = M.get_method(name)
    cols = columns()
    merged = {**method.params, **params}
    shape = method.shape
    const = shape.constants(cols, None, **merged)  # detached: held fixed while x moves
    x = cols["logp"]
    h = 1e-6
    fd = -(shape.loss(x + h, **const) - shape.loss(x - h, **const)) / (2 * h)
    w, loss = M.compute_views(method, cols, params=params)
    np.testing.assert_allclose(w, fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(loss, shape.loss(x, **const), rtol=1e-12)


@pytest.mark.parametrize("name", sorted(SHAPED))
def test_grad_view_is_the_gradient_of_the_declared_loss_in_the_logits(name):
    # ℓ(log_softmax(z)[t]) by autograd; the grad view is w·‖∂(−log p)/∂z‖ with the same w
    method = M.get_method(name)
    torch.manual_seed(1)
    z = torch.randn(10, 7, dtype=torch.float64) * 2
    t = torch.randint(0, 7, (10,))
    with torch.enable_grad():
        z.requires_grad_(True)
        x = torch.log_softmax(z, -1).gather(1, t[:, None])[:, 0]
        cols = {"logp": x.detach().numpy(), "sum_p2": (torch.softmax(z, -1) ** 2).sum(-1).detach().numpy(),
                "pos": np.zeros(10, dtype=np.int64)}
        const = method.shape.constants(cols, None, **method.params)
        # the declared loss at x by a first-order expansion around the stored x: exact in the derivative
        w_np, _ = M.compute_views(method, cols)
        surrogate = (-torch.from_numpy(w_np) * x).sum()  # d/dz equals Σ ℓ'(x)·∂x/∂z
        (g,) = torch.autograd.grad(surrogate, z)
    fd = np.empty((10, 7))
    zn = z.detach().numpy()
    for j in range(7):  # central differences of the declared loss itself, constants held
        e = np.zeros(7)
        e[j] = 1e-6
        xp = (zn + e)[np.arange(10), t.numpy()] - np.logaddexp.reduce(zn + e, axis=1)
        xm = (zn - e)[np.arange(10), t.numpy()] - np.logaddexp.reduce(zn - e, axis=1)
        fd[:, j] = (method.shape.loss(xp, **const) - method.shape.loss(xm, **const)) / 2e-6
    np.testing.assert_allclose(g.numpy(), fd, rtol=1e-5, atol=1e-9)
    norms = np.linalg.norm(fd, axis=1)
    grad_view = metrics.rank_scores(w_np, "grad", cols["logp"], cols["sum_p2"])
    np.testing.assert_allclose(grad_view, norms, rtol=1e-5, atol=1e-9)


def test_loss_view_in_rank_scores_is_the_declared_loss():
    cols = columns()
    focal = M.get_method("focal")
    viewed = M.compute_viewed(focal, cols)
    w, loss = M.compute_views(focal, cols)
    np.testing.assert_array_equal(np.asarray(viewed), w)
    got = metrics.rank_scores(viewed, "loss", cols["logp"])
    np.testing.assert_allclose(got, -(1 - np.exp(cols["logp"])) ** 2 * cols["logp"], rtol=1e-12)
    assert not np.allclose(got, w * -cols["logp"])  # not w·NLL: the focal weight is not its loss's multiplier
    # a stop-gradient method: plain weights, loss view w·NLL
    dft = M.compute_viewed(M.get_method("dft"), cols)
    np.testing.assert_allclose(metrics.rank_scores(dft, "loss", cols["logp"]), dft * -cols["logp"], rtol=1e-12)
    assert viewed[:3].loss is None  # a slice is no longer the loss's rows


def test_deformed_loss_limits():
    x = np.log(np.array([1e-300, 0.3, 1.0]))
    from reweight_audit.methods.shapes import deformed_loss, deformed_weight

    np.testing.assert_allclose(deformed_loss(x, alpha=0.0), -x)  # α = 0: the NLL
    np.testing.assert_allclose(deformed_loss(x, alpha=1.0), 1 - np.exp(x), rtol=1e-12)  # α = 1: 1 − p
    np.testing.assert_array_equal(deformed_weight(np.array([-np.inf]), alpha=0.0), [1.0])


def test_every_builtin_parameter_names_its_source():
    for m in M.registered_methods():
        for key in m.params:
            text = m.param_sources.get(key, "")
            assert "(default)" in text, f"{m.name}.{key}: param_sources must say which source gives the default"
    doc = M.methods_markdown()
    assert "### Parameters and their sources" in doc and "`rho1.k_pct` = `60.0`: 60 (default): the paper" in doc
    assert "### Declared loss shapes" in doc and "`focal`: ℓ = −(1 − p_t)^γ·log p_t" in doc
    for name in ("profit", "deformed-log", "deft", "deft-cayley", "mile"):  # the five 2025–26 methods
        assert f"| `{name}` |" in doc

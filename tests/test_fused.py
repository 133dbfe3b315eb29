"""The fused, chunked reweighted loss: gradients of the hidden states and the head weight against the naive
full-logits loss for every registered method, HF's default loss for sft, the torch weight ports against the
numpy registry (tiny models built on the spot, no network)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import brute_statistics, gradient_test_params, naive_loss, write_noisy
from reweight_audit.core.errors import AuditError
from reweight_audit.methods import available_methods, compute_weights, get_method
from reweight_audit.scoring.encoding import choose_template
from reweight_audit.testing import save_tiny_model
from reweight_audit.scoring.head import Head
from reweight_audit.training.fused import (DEVICE_WEIGHTS, FusedReweightedLoss, device_weights, head_statistics,
                                           linear_head, position_columns)
from reweight_audit.training.run import make_collator, training_examples

METHODS = [m.name for m in available_methods()]


@pytest.fixture(autouse=True)
def autograd_on():
    torch.set_grad_enabled(True)  # scoring's load_model switches autograd off process-wide
    yield


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def ref_lm(tmp_path_factory):
    return AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path_factory.mktemp("fused-ref"), seed=1)).eval()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path_factory.mktemp("fused-gemma"),
                                                                kind="gemma2")).eval()


@pytest.fixture()
def batch(tmp_path, noisy_rows, lm) -> dict:
    """The noisy rows as one right-padded batch: prompt and padding labelled -100."""
    _, tok = lm
    examples = training_examples(write_noisy(tmp_path / "noisy.jsonl", noisy_rows), tok, choose_template(tok, "auto"),
                                 None)
    out = make_collator(tok.pad_token_id)(examples)
    assert (out["attention_mask"] == 0).any() and (out["labels"] == -100).any()
    return out


def body_hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                                   ).last_hidden_state


def full_logits(hidden: torch.Tensor, weight: torch.Tensor, head) -> torch.Tensor:
    z = hidden @ weight.T
    return z if head.softcap is None else torch.tanh(z / head.softcap) * head.softcap


def fused_vs_naive(model, batch, method, *, ref=None, backend="ours", chunk_rows=7):
    """(ours loss, naive loss, ours grads, naive grads) of the hidden states and the head weight."""
    head, hidden = linear_head(model), body_hidden(model, batch)
    params = gradient_test_params(method, model.config.vocab_size)
    loss_fn = FusedReweightedLoss(method, chunk_rows=chunk_rows, backend=backend, **params)
    h = hidden.clone().requires_grad_()
    w = head.weight.detach().clone().requires_grad_()
    ref_kw, ref_logits = {}, None
    if ref is not None:
        ref_head, ref_hidden = linear_head(ref), body_hidden(ref, batch)
        ref_kw = {"ref_hidden": ref_hidden, "ref_head": ref_head}
        ref_logits = full_logits(ref_hidden.double(), ref_head.weight.detach().double(), ref_head)
    ours = loss_fn(h, batch["labels"], type(head)(w, None, softcap=head.softcap), **ref_kw)
    ours.backward()
    h64 = hidden.double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    naive = naive_loss(full_logits(h64, w64, head), batch["labels"], method, ref_logits, params)
    naive.backward()
    return ours, naive, (h.grad, w.grad), (h64.grad, w64.grad)


def assert_gradients_match(ours, naive, got, want) -> None:
    assert torch.isfinite(ours) and abs(ours.item() - naive.item()) <= 1e-5 * abs(naive.item()) + 1e-7
    for g, n in zip(got, want):
        scale = n.abs().max()
        assert scale > 0
        assert (g.double() - n).abs().max() <= 1e-5 * scale, (g.double() - n).abs().max() / scale


@pytest.mark.parametrize("method", METHODS)
def test_gradients_equal_the_naive_full_logits_loss(method, lm, ref_lm, batch):
    model, _ = lm
    needs_ref = "ref_logp" in get_method(method).needs
    ours, naive, got, want = fused_vs_naive(model, batch, method, ref=ref_lm if needs_ref else None)
    assert_gradients_match(ours, naive, got, want)
    # no gradient at positions without a label (prompt, padding, the last position)
    ignored = torch.nn.functional.pad(batch["labels"][:, 1:] == -100, (0, 1), value=True)
    assert (got[0][ignored] == 0).all()


@pytest.mark.parametrize("method", ["dft", "entropy", "deft", "talr", "mile"])
def test_trl_backend_equals_the_naive_loss(method, lm, batch):
    pytest.importorskip("trl")  # the train extra; make test installs it
    model, _ = lm
    assert_gradients_match(*fused_vs_naive(model, batch, method, backend="trl"))


@pytest.mark.parametrize("method", ["dft", "ranktuner-approx", "eaft", "deft"])
def test_soft_capped_head(method, gemma, batch):
    head = linear_head(gemma)
    assert head.softcap is not None
    assert_gradients_match(*fused_vs_naive(gemma, batch, method))


def test_sft_equals_the_default_loss(lm, batch):
    model, _ = lm
    head = linear_head(model)
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    for n in (None, torch.tensor(37)):
        default = model(**kw, num_items_in_batch=n).loss
        ours = FusedReweightedLoss("sft")(body_hidden(model, batch), batch["labels"], head, num_items_in_batch=n)
        torch.testing.assert_close(ours, default, rtol=1e-6, atol=0)


def test_weights_equal_the_numpy_registry(lm, ref_lm, batch):
    """The training path's weights (torch ports and host path) are the registry's on brute-force statistics."""
    model, _ = lm
    head, hidden = linear_head(model), body_hidden(model, batch)
    ref_head, ref_hidden = linear_head(ref_lm), body_hidden(ref_lm, batch)
    labels = batch["labels"]
    supervised = labels[:, 1:] != -100
    targets = labels[:, 1:][supervised]
    cols = brute_statistics(full_logits(hidden[:, :-1][supervised], head.weight.detach(), head), targets)
    cols.update({k: v.numpy() for k, v in position_columns(supervised, targets).items()})
    ref_z = full_logits(ref_hidden[:, :-1][supervised].double(), ref_head.weight.detach().double(), ref_head)
    cols["ref_logp"] = torch.log_softmax(ref_z, -1).gather(1, targets[:, None])[:, 0].numpy()
    for name in METHODS:
        loss_fn = FusedReweightedLoss(name)
        loss_fn(hidden, labels, head, ref_hidden=ref_hidden, ref_head=ref_head)
        expected = compute_weights(get_method(name), cols, seed=0)
        np.testing.assert_allclose(loss_fn.last_weights.double().numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


PORT_PARAMS = {"focal": [{"gamma": 0.5}, {"detach": True}, {"gamma": 0.5, "detach": True}, {"gamma": 0.0}], "eaft": [{"alpha": 2.5}], "ranktuner": [{"base": "p"}],
               "ranktuner-approx": [{"low_entropy": "trivial"}, {"base": "p"}], "profit": [{"tau": 0.0}, {"tau": 0.3}],
               "deformed-log": [{"alpha": 0.0}, {"alpha": 0.5}], "deft": [{"eps": 1e-3}],
               "ranktuner-approx-dft": [{"low_entropy": "trivial"}]}


@pytest.mark.parametrize("name", sorted(DEVICE_WEIGHTS))
def test_device_ports_equal_the_numpy_definitions(name):
    g = torch.Generator().manual_seed(0)
    vocab = 200
    z = torch.randn(96, vocab, generator=g) * torch.linspace(0.1, 12, 96)[:, None]  # flat to peaked rows
    targets = torch.randint(0, vocab, (96,), generator=g)
    targets[:8] = z[:8].argmax(-1)  # rank 1 rows
    columns = head_statistics(z, targets, torch.eye(vocab), None, Head(torch.eye(vocab), None),
                              {"entropy", "sum_p2", "rank", "expected_rank", "topk_entropy"}, 32)
    host = {k: v.numpy() for k, v in columns.items() if k != "finite"}
    method = get_method(name)
    for params in [{}, *PORT_PARAMS.get(name, [])]:
        got = device_weights(method, columns, params)
        assert got is not None and got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), compute_weights(method, host, params=params, seed=0), rtol=1e-12,
                                   atol=1e-15, err_msg=f"{name} {params}")


def test_methods_without_a_port_go_through_the_registry():
    columns = {"logp": torch.tensor([-0.5, -2.0]), "finite": torch.tensor([True, True])}
    assert device_weights(get_method("talr"), columns, {}) is None
    assert device_weights(get_method("mile"), columns, {}) is None
    with pytest.raises(AuditError, match="gamma"):
        FusedReweightedLoss("focal", gamma=-1.0)


def test_chunking_does_not_change_the_statistics(lm, batch):
    model, _ = lm
    head, hidden = linear_head(model), body_hidden(model, batch)
    supervised = batch["labels"][:, 1:] != -100
    rows, targets = hidden[:, :-1][supervised], batch["labels"][:, 1:][supervised]
    needs = {"rank", "expected_rank", "topk_entropy", "entropy"}
    one = head_statistics(rows, targets, head.weight, None, head, needs, 10_000)
    many = head_statistics(rows, targets, head.weight, None, head, needs, 5)
    for name in one:
        torch.testing.assert_close(one[name], many[name], rtol=1e-6, atol=1e-6)  # BLAS blocks by rows


def test_bad_arguments_are_one_line_errors(lm, batch):
    with pytest.raises(AuditError, match="unknown parameter"):
        FusedReweightedLoss("focal", gama=2.0)
    with pytest.raises(AuditError, match="backend"):
        FusedReweightedLoss("dft", backend="cuda")
    with pytest.raises(AuditError, match="does not give"):
        FusedReweightedLoss("ranktuner", backend="trl").backend_for(torch.device("cpu"))
    model, _ = lm
    with pytest.raises(AuditError, match="reference"):
        FusedReweightedLoss("rho1")(body_hidden(model, batch), batch["labels"], linear_head(model))

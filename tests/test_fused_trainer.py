"""The one-line use, ``training.patch(model, method)``: the patched forward against the model's own loss, inside
Hugging Face's Trainer (gradient accumulation with num_items_in_batch equals a 4x batch) and TRL's SFTTrainer,
with padding, packing by position_ids, bf16 autocast and Rho-1's reference (tiny models, no network)."""
from __future__ import annotations

import copy

import numpy as np

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from helpers import write_noisy
from reweight_audit.core.errors import AuditError
from reweight_audit.scoring.encoding import choose_template
from reweight_audit.testing import save_tiny_model
from reweight_audit.training import patch, unpatch
from reweight_audit.training.fused import FusedReweightedLoss, linear_head
from reweight_audit.training.run import make_collator, training_examples


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


@pytest.fixture()
def examples(tmp_path, noisy_rows, lm) -> list[dict]:
    _, tok = lm
    return training_examples(write_noisy(tmp_path / "noisy.jsonl", noisy_rows), tok, choose_template(tok, "auto"),
                             None)


def fresh(lm):
    model, _ = lm
    return copy.deepcopy(model).train()


def test_patched_forward_returns_the_fused_loss_and_keeps_generation(lm, examples):
    model, tok = lm
    batch = make_collator(tok.pad_token_id)(examples)
    default = model(**batch).loss
    logits = model(input_ids=batch["input_ids"]).logits
    patched = fresh(lm)
    loss_fn = patch(patched, "sft")
    out = patched(**batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, default, rtol=1e-6, atol=0)  # sft: HF's own loss
    torch.testing.assert_close(patched(input_ids=batch["input_ids"]).logits, logits)  # no labels: the model's forward
    assert loss_fn.calls == 1
    patch(patched, "ranktuner-approx")  # patching again replaces the method
    hidden = patched.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    expected = FusedReweightedLoss("ranktuner-approx")(hidden, batch["labels"], linear_head(patched))
    torch.testing.assert_close(patched(**batch).loss, expected)
    unpatch(patched)
    torch.testing.assert_close(patched(**batch).loss, default)


def train_one_step(lm, examples, tmp_path, *, batch_size: int, accumulation: int, method: str = "ranktuner-approx"):
    """One SGD step (lr 1, no clipping) of the patched model on ``examples``; returns the parameter change."""
    model, tok = lm
    trained = fresh(lm)
    before = {n: p.detach().clone() for n, p in trained.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / f"out-{batch_size}"), per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none", use_cpu=True,
                             save_strategy="no", logging_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=trained, args=args, train_dataset=examples, data_collator=make_collator(tok.pad_token_id))
    loss_fn = patch(trainer, method)
    trainer.train()
    assert loss_fn.calls == accumulation
    return {n: p.detach() - before[n] for n, p in trained.named_parameters()}


def test_gradient_accumulation_equals_a_larger_batch(lm, examples, tmp_path):
    data = examples + examples  # 8 sequences of different lengths: each micro-batch is padded differently
    one = train_one_step(lm, data, tmp_path, batch_size=8, accumulation=1)
    four = train_one_step(lm, data, tmp_path, batch_size=2, accumulation=4)
    for name, delta in one.items():
        scale = delta.abs().max().clamp_min(1e-12)
        assert (four[name] - delta).abs().max() <= 1e-5 * scale, name
    assert any(delta.abs().max() > 0 for delta in one.values())


def test_sft_trainer(lm, examples, tmp_path):
    trl = pytest.importorskip("trl")  # the train extra; make test installs it
    from datasets import Dataset

    _, tok = lm
    rows = [{"prompt": [{"role": "user", "content": "Sum?"}], "completion": [{"role": "assistant", "content": t}]}
            for t in ("It is 100.", "We add the odd numbers: 100.", "The answer, you know, is 7.")]

    def run(method: str | None):
        model = fresh(lm)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        config = trl.SFTConfig(output_dir=str(tmp_path / f"sft-{method}"), per_device_train_batch_size=3,
                               max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                               max_grad_norm=0.0, report_to="none", use_cpu=True, save_strategy="no",
                               logging_steps=1, seed=0, bf16=False)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
        loss_fn = patch(trainer, method) if method else None
        trainer.train()
        assert loss_fn is None or loss_fn.calls == 1
        logged = [e for e in trainer.state.log_history if "loss" in e][0]
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}, logged

    (own, own_log), (ours, ours_log) = run(None), run("sft")
    for name, delta in own.items():  # sft through our fused loss is TRL's own nll step
        assert (ours[name] - delta).abs().max() <= 1e-5 * delta.abs().max(), (name, (ours[name] - delta).abs().max(), delta.abs().max())
    assert ours_log["entropy"] == pytest.approx(own_log["entropy"], rel=1e-5)
    assert ours_log["mean_token_accuracy"] == own_log["mean_token_accuracy"]
    weighted, _ = run("ranktuner-approx")
    assert any((weighted[n] - own[n]).abs().max() > 1e-6 for n in own)


def test_packing_with_position_ids_equals_the_padded_batch(lm, examples):
    """Two sequences packed into one row (position_ids restart, the second's first label -100) = the padded batch."""
    model, tok = lm
    two = examples[:2]
    padded = make_collator(tok.pad_token_id)(two)
    ids = torch.tensor([two[0]["input_ids"] + two[1]["input_ids"]])
    labels = torch.tensor([two[0]["labels"] + [-100] + two[1]["labels"][1:]])
    position_ids = torch.tensor([list(range(len(two[0]["input_ids"]))) + list(range(len(two[1]["input_ids"])))])
    patched = fresh(lm)
    patch(patched, "dft")
    packed = patched(input_ids=ids, position_ids=position_ids, labels=labels).loss
    torch.testing.assert_close(packed, patched(**padded).loss, rtol=1e-5, atol=0)


def test_bf16_autocast(lm, examples):
    _, tok = lm
    batch = make_collator(tok.pad_token_id)(examples)
    patched = fresh(lm)
    patch(patched, "ranktuner-approx")
    full = patched(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = patched(**batch).loss
    assert loss.dtype == torch.float32
    loss.backward()
    assert abs(loss.item() - full.item()) < 0.05 * full.item()
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)


def test_rho1_reference_runs_its_own_fused_pass(lm, examples, tmp_path):
    _, tok = lm
    reference = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "ref", seed=1)).eval()
    batch = make_collator(tok.pad_token_id)(examples)
    patched = fresh(lm)
    with pytest.raises(AuditError, match="reference"):
        patch(patched, "rho1")
    loss_fn = patch(patched, "rho1", reference=reference)
    loss = patched(**batch).loss
    ref_hidden = reference.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = FusedReweightedLoss("rho1")(
        patched.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state,
        batch["labels"], linear_head(patched), ref_hidden=ref_hidden.last_hidden_state, ref_head=linear_head(reference))
    torch.testing.assert_close(loss, expected)
    assert 0 < float((loss_fn.last_weights > 0).float().mean()) < 1  # Rho-1 keeps a share of the tokens


@pytest.mark.slow
def test_train_command_uses_the_fused_loss_and_agrees_with_full_logits(tmp_path, tiny_model, examples, noisy_rows):
    import pandas as pd

    from reweight_audit.training.config import TrainConfig
    from reweight_audit.training.run import run_train

    noisy = write_noisy(tmp_path / "train.jsonl", noisy_rows)
    tables = {}
    for loss in ("fused", "logits"):
        config = TrainConfig(input=noisy, output=tmp_path / loss, methods=["ranktuner-approx"], steps=1, every=1,
                             model=str(tiny_model), device="cpu", batch_size=2, learning_rate=1e-2, loss=loss)
        run_train(config)
        tables[loss] = pd.read_csv(tmp_path / loss / "audit.csv")
    fused, logits = tables["fused"], tables["logits"]
    assert fused["train_loss"].iloc[1:].notna().all()
    for column in ("train_loss", "noise_nll", "clean_nll"):
        np.testing.assert_allclose(fused[column], logits[column], rtol=1e-4, err_msg=column)
    with pytest.raises(AuditError, match="--loss"):
        TrainConfig(input=noisy, output=tmp_path / "x", methods=["dft"], loss="chunked")

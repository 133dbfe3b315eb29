"""Training with the registry: ReweightedLoss against a naive full-logits loss and against compare,
AuditCallback inside a real Trainer run, and the `train` command end to end (tiny models, no network)."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

from helpers import gradient_test_params, naive_loss, write_noisy
from reweight_audit.testing import save_tiny_model
from reweight_audit.evaluation.compare import run_compare
from reweight_audit.core.errors import AuditError
from reweight_audit.methods import available_methods, compute_weights, get_method
from reweight_audit.scoring.config import ScoreConfig
from reweight_audit.scoring.encoding import choose_template
from reweight_audit.scoring.engine import run_score
from reweight_audit.training.run import TrainConfig, make_collator, run_train, training_examples
from reweight_audit.training.loss import AuditCallback, ReweightedLoss, absorption, load_probe, score_probe
from reweight_audit.evaluation.config import CompareConfig

METHODS = [m.name for m in available_methods()]
TOPK = 20


@pytest.fixture(autouse=True)
def autograd_on():
    # scoring's load_model switches autograd off for the whole process; training needs it
    torch.set_grad_enabled(True)
    yield


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # a tiny model's ops take microseconds; two OpenMP threads on a loaded 2-core machine make each
    # one wait for a descheduled thread (measured: 100x slower steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-ref"), seed=1)


@pytest.fixture(scope="module")
def lm(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def ref_lm(ref_dir):
    return AutoModelForCausalLM.from_pretrained(ref_dir).eval()


@pytest.fixture()
def noisy_file(tmp_path, noisy_rows) -> Path:
    return write_noisy(tmp_path / "noisy.jsonl", noisy_rows)


def batch_of(examples: list[dict], pad_id: int) -> dict:
    return make_collator(pad_id)(examples)


@pytest.fixture()
def batch(noisy_file, lm) -> dict:
    """The noisy rows as one right-padded batch: prompt and padding labelled -100."""
    _, tok = lm
    examples = training_examples(noisy_file, tok, choose_template(tok, "auto"), None)
    out = batch_of(examples, tok.pad_token_id)
    assert (out["attention_mask"] == 0).any() and (out["labels"] == -100).any()
    return out


@pytest.mark.parametrize("method", METHODS)
def test_gradient_equals_naive_full_logits(method, lm, ref_lm, batch):
    model, _ = lm
    needs_ref = "ref_logp" in get_method(method).needs
    params = gradient_test_params(method, model.config.vocab_size)
    loss_fn = ReweightedLoss(method, reference=ref_lm if needs_ref else None, model=model if needs_ref else None,
                             **params)
    with torch.no_grad():  # the forward also lets the loss's hook see the inputs (Rho-1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_logits = ref_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours_in = logits.clone().requires_grad_()
    ours = loss_fn(CausalLMOutputWithPast(logits=ours_in), batch["labels"])
    ours.backward()
    naive_in = logits.clone().requires_grad_()
    naive = naive_loss(naive_in, batch["labels"], method, ref_logits if needs_ref else None, params)
    naive.backward()
    loss_fn.close()
    assert torch.isfinite(ours) and abs(ours.item() - naive.item()) <= 1e-5 * abs(naive.item()) + 1e-7
    scale = naive_in.grad.abs().max()
    assert scale > 0
    assert (ours_in.grad - naive_in.grad).abs().max() <= 1e-5 * scale + 1e-12
    # no gradient at ignored positions (prompt, padding, the last position)
    ignored = torch.nn.functional.pad(batch["labels"][:, 1:] == -100, (0, 1), value=True)
    assert (ours_in.grad[ignored] == 0).all()


def test_weights_inside_the_loss_equal_compare_on_a_score_table(tmp_path, tiny_model, ref_dir, lm, ref_lm,
                                                              noisy_file, batch):
    stats = tmp_path / "stats.parquet"
    run_score(noisy_file, stats, ScoreConfig(model=str(tiny_model), device="cpu", batch_tokens=1 << 16,
                                             ref_model=str(ref_dir)))
    torch.set_grad_enabled(True)
    result = run_compare([stats], tmp_path / "cmp", CompareConfig(bootstrap=0), workers=1)
    weights = result.run_weights[0]
    assert set(weights) == set(METHODS)
    model, _ = lm
    for name, expected in weights.items():
        loss_fn = ReweightedLoss(name, reference=ref_lm, model=model) if name == "rho1" else ReweightedLoss(name)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss_fn(outputs, batch["labels"])
        loss_fn.close()
        np.testing.assert_allclose(loss_fn.last_weights, expected, rtol=1e-5, atol=1e-7, err_msg=name)


def test_sft_loss_equals_the_default_loss(lm, batch):
    model, _ = lm
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    default = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    ours = ReweightedLoss("sft")(outputs, batch["labels"])
    torch.testing.assert_close(ours, default, rtol=1e-6, atol=0)
    n = torch.tensor(37)
    default_n = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                      num_items_in_batch=n).loss
    torch.testing.assert_close(ReweightedLoss("sft")(outputs, batch["labels"], num_items_in_batch=n), default_n,
                               rtol=1e-6, atol=0)


def test_bf16_autocast(lm, batch):
    model, _ = lm
    full = ReweightedLoss("ranktuner-approx")(model(input_ids=batch["input_ids"]), batch["labels"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(input_ids=batch["input_ids"])
        assert outputs.logits.dtype == torch.bfloat16
        loss = ReweightedLoss("ranktuner-approx")(outputs, batch["labels"])
    assert loss.dtype == torch.float32 and loss.requires_grad
    assert abs(loss.item() - full.item()) < 0.05 * full.item()


def test_bad_arguments_are_one_line_errors(lm, batch):
    with pytest.raises(AuditError, match="unknown parameter"):
        ReweightedLoss("focal", gama=2.0)
    with pytest.raises(AuditError, match="needs a reference model"):
        ReweightedLoss("rho1")
    with pytest.raises(AuditError, match="unknown method"):
        ReweightedLoss("nope")
    with pytest.raises(AuditError, match="needs labels"):
        ReweightedLoss("dft")(lm[0](input_ids=batch["input_ids"]), None)
    with pytest.raises(AuditError, match="unknown method"):
        AuditCallback(Path(__file__), methods=["nope"])


def _args(tmp_path: Path, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
                             seed=0, data_seed=0, **kw)


def _trainer(tmp_path, tiny_model, noisy_file, loss=None, **kw) -> Trainer:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    examples = training_examples(noisy_file, tok, choose_template(tok, "auto"), None)
    return Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=examples,
                   data_collator=make_collator(tok.pad_token_id), compute_loss_func=loss, processing_class=tok)


@pytest.mark.slow
def test_three_trainer_steps_with_the_loss_and_the_audit(tmp_path, tiny_model, noisy_file):
    before = hashlib.sha256(noisy_file.read_bytes()).hexdigest()
    trainer = _trainer(tmp_path, tiny_model, noisy_file, loss=ReweightedLoss("ranktuner-approx"))
    audit = AuditCallback(noisy_file, methods=["sft", "dft", "ranktuner-approx"], every=2).attach(trainer)
    trainer.train()
    assert hashlib.sha256(noisy_file.read_bytes()).hexdigest() == before == audit.probe.digest
    assert [h["step"] for h in audit.history] == [0, 2, 3]
    logged = [e for e in trainer.state.log_history if any(k.startswith("audit/") for k in e)]
    assert [e["step"] for e in logged] == [0, 2, 3]
    assert sorted(e["step"] for e in trainer.state.log_history if "loss" in e) == [1, 2, 3]  # still logged
    base_rate = audit.probe.n_noise / audit.probe.n_tokens
    for entry in logged:
        for m in ("sft", "dft", "ranktuner-approx"):
            for key in ("tok_prec@10", "tok_rec@10", "seq_hit@10", "auroc", "noise_mass"):
                assert 0.0 <= entry[f"audit/{m}/{key}"] <= 1.0, (m, key)
        # constant weights: the top 10% holds noise at exactly the base rate (fractional ties)
        assert entry["audit/sft/tok_prec@10"] == pytest.approx(base_rate, rel=1e-9)
        assert entry["audit/sft/noise_mass"] == pytest.approx(base_rate, rel=1e-9)
        assert entry["audit/noise_nll"] > 0 and entry["audit/clean_nll"] > 0
    assert logged[0]["audit/noise_nll_change"] == 0.0 and logged[0]["audit/clean_nll_change"] == 0.0
    # the last audit is the trained model's probe NLL, relative to step 0
    noise, clean = absorption(score_probe(trainer.model, audit.probe))
    assert logged[-1]["audit/noise_nll"] == pytest.approx(noise, rel=1e-6)
    assert logged[-1]["audit/clean_nll_change"] == pytest.approx(clean - logged[0]["audit/clean_nll"], rel=1e-6)
    assert logged[-1]["audit/clean_nll_change"] < 0  # lr 1e-2 on the probe itself: it learns


def test_score_probe_restores_the_mode_and_needs_noise(tmp_path, lm, noisy_file, noisy_rows):
    model, tok = lm
    probe = load_probe(noisy_file, tok)
    for training in (True, False):
        model.train(training)
        score_probe(model, probe)
        assert model.training is training
    model.eval()
    clean = write_noisy(tmp_path / "clean.jsonl", [{**r, "spans": []} for r in noisy_rows])
    with pytest.raises(AuditError, match="needs both noise and clean tokens"):
        load_probe(clean, tok)


@pytest.mark.slow
def test_sft_in_trainer_equals_the_default_loss_with_accumulation(tmp_path, tiny_model, noisy_file):
    runs = []
    for loss in (None, ReweightedLoss("sft")):
        trainer = _trainer(tmp_path, tiny_model, noisy_file, loss=loss, gradient_accumulation_steps=2)
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        runs.append((losses, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])))
    assert len(runs[0][0]) == 3
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_train_command_writes_curves_and_absorption(tmp_path, tiny_model, noisy_file):
    from typer.testing import CliRunner

    from reweight_audit.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(noisy_file), "--methods", "sft,dft", "--steps", "2", "--every",
                                      "1", "--model", str(tiny_model), "--device", "cpu", "--batch-size", "2",
                                      "--lr", "1e-2", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_csv(out / "audit.csv")
    assert list(zip(table["train_method"], table["step"])) == [("sft", 0), ("sft", 1), ("sft", 2),
                                                              ("dft", 0), ("dft", 1), ("dft", 2)]
    # the same weights at step 0 for every method, then different losses move them apart
    start = table[table["step"] == 0]
    assert start["noise_nll"].nunique() == 1 and start["clean_nll"].nunique() == 1
    assert math.isnan(table["train_loss"].iloc[0]) and table["train_loss"].iloc[1:3].notna().all()
    assert (table["dft/tok_rec@10"].between(0, 1)).all()
    text = (out / "absorption.md").read_text()
    assert "| sft | 2 |" in text and "| dft | 2 |" in text and "cannot" in text
    assert (out / "audit.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "dft" / "probe").iterdir()) == [
        "step-000000.parquet", "step-000001.parquet", "step-000002.parquet"]


def test_train_config_errors(tmp_path, noisy_file):
    with pytest.raises(AuditError, match="needs a reference model"):
        run_train(TrainConfig(input=noisy_file, output=tmp_path / "o", methods=["rho1"], device="cpu"))
    with pytest.raises(AuditError, match="not in --methods"):
        run_train(TrainConfig(input=noisy_file, output=tmp_path / "o", methods=["dft"], params=["focal.gamma=1"]))
    with pytest.raises(AuditError, match="no such file"):
        run_train(TrainConfig(input=tmp_path / "missing.jsonl", output=tmp_path / "o", methods=["dft"]))


def test_an_unpacked_gguf_model_can_be_fine_tuned_a_packed_one_cannot(tiny_model):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.trainer_utils import validate_quantization_for_training
    from transformers.utils.quantization_config import GgufConfig

    from reweight_audit.training.run import _drop_stale_quantizer

    def marked(model):  # the state transformers' legacy GGUF loader leaves (the default model's)
        quantizer = GgufHfQuantizer(GgufConfig())
        model.hf_quantizer, model.is_quantized = quantizer, True
        model.config.quantization_config = quantizer.quantization_config
        return model

    model = marked(AutoModelForCausalLM.from_pretrained(tiny_model))
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)
    _drop_stale_quantizer(model)
    validate_quantization_for_training(model)  # every weight is a float tensor: trainable
    packed = marked(AutoModelForCausalLM.from_pretrained(tiny_model))
    packed.model.register_buffer("blocks", torch.zeros(4, dtype=torch.uint8))
    _drop_stale_quantizer(packed)
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(packed)

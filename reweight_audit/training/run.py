"""``reweight-audit train``: a small, real fine-tuning run per method, audited while it trains.

For every method the same seeded schedule runs from the same starting weights: Hugging Face
``Trainer`` with the fused reweighted loss (``training.patch(model, method)``: no ``[batch, seq, vocab]``
logits; ``--loss logits`` takes ``training.ReweightedLoss(method)`` on the full logits instead) and
``training.AuditCallback`` on an injected probe. Outputs in ``-o``:

* ``audit.csv``: one row per (trained method, audit step): train loss, the probe's noise / clean
  NLL and their change since step 0, and compare's metrics of every audited method's weights;
* ``audit.png``: noise NLL change, clean NLL change, and the trained method's own noise mass and
  top-k recall on the probe, against the step, one line per trained method;
* ``absorption.md``: the end-of-run table (how much noise each method learned for its
  clean-token improvement) and what a run of this size can show;
* ``run.json``: the configuration, timings and files; ``<method>/probe/step-*.parquet``: each
  audit's probe table, readable by ``reweight-audit compare``.
"""
from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import atomic_directory, output_lock, prepare_output_dir, write_json_atomic
from reweight_audit.reporting.train_report import write_train_page
from reweight_audit.scoring.batching import IGNORE_INDEX
from reweight_audit.training.config import TrainConfig


@dataclass
class TrainResult:
    output: Path
    rows: list[dict]  # audit.csv
    summary: list[dict]  # absorption.md, one per trained method
    files: dict[str, Path]


# --------------------------------------------------------------------------- data


def training_examples(path: Path, tokenizer: Any, template: str, max_length: int | None) -> list[dict]:
    """``{"input_ids", "labels"}`` per record: labels are the response tokens score supervises, -100 elsewhere."""
    from reweight_audit.scoring.encoding import encode_records

    examples = []
    for encoded in encode_records(path, tokenizer, template, max_length, {}):
        labels = [IGNORE_INDEX] * len(encoded.input_ids)
        for j in encoded.sup_index:
            labels[int(j)] = encoded.input_ids[int(j)]
        examples.append({"input_ids": encoded.input_ids, "labels": labels})
    if not examples:
        raise AuditError(f"{path}: no record has a response token to train on (see --max-length)")
    return examples


def make_collator(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right-pad a list of examples: pad_id / -100 / attention mask 0."""

    def collate(examples: list[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


# --------------------------------------------------------------------------- one run


def _check(config: TrainConfig) -> dict[str, dict]:
    from reweight_audit.methods import get_method, parse_params

    for name in config.methods:
        method = get_method(name)
        if "ref_logp" in method.needs and not config.ref_model:
            raise AuditError(f"method {name} needs a reference model: pass --ref-model")
    if not Path(config.input).exists():
        raise AuditError(f"{config.input}: no such file; write one with 'reweight-audit inject'")
    params = parse_params(list(config.params))
    for name in params:
        if name not in config.methods:
            raise AuditError(f"--param {name}.…: method {name} is not in --methods; add it there or drop the parameter")
    return params


def _training_args(config: TrainConfig, out_dir: Path, device: str) -> Any:
    import torch
    from transformers import TrainingArguments

    lr = config.learning_rate if config.learning_rate is not None else (2e-4 if config.lora else 5e-5)
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
        report_to=config.report_to, seed=config.seed, data_seed=config.seed, use_cpu=device == "cpu",
        bf16=bf16, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )


def _load_trainable(source: Any, device: str, lora: bool) -> Any:
    import torch

    from reweight_audit.core.models import load_model

    model = load_model(source, device=device, dtype=torch.float32)
    torch.set_grad_enabled(True)  # load_model switches autograd off for scoring
    model.train()
    _drop_stale_quantizer(model)
    if lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise AuditError("--lora needs peft: pip install 'reweight-audit[train]'") from None
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM"))
    return model


def _drop_stale_quantizer(model: Any) -> None:
    """Forget the GGUF mark of a model whose GGUF blocks were unpacked into float weights at load.

    transformers' legacy GGUF loader (the default model's) unpacks every weight into a plain float
    tensor but keeps the quantizer's mark, and ``Trainer`` then refuses to fine-tune the model. The
    quantizer's own ``remove_quantization_config`` (what transformers does for a dequantized load)
    clears it. Weights still packed in GGUF blocks (integer tensors) keep the mark, and Trainer's error.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in str(getattr(quantizer.quantization_config, "quant_method", "")).lower():
        return
    if all(t.is_floating_point() for t in list(model.parameters()) + list(model.buffers())):
        quantizer.remove_quantization_config(model)


def train_one(method: str, config: TrainConfig, data: dict) -> dict:
    """Train ``config.steps`` steps with ``method`` from fresh weights; return its audit history and timings."""
    from transformers import PrinterCallback, Trainer, set_seed

    from reweight_audit.training.loss import AuditCallback, ReweightedLoss

    set_seed(config.seed)
    model = _load_trainable(data["source"], data["device"], config.lora)
    run_dir = Path(config.output) / method
    loss = _loss_for(model, method, config, data)
    trainer = Trainer(model=model, args=_training_args(config, run_dir, data["device"]),
                      train_dataset=data["examples"], data_collator=make_collator(data["pad_id"]),
                      compute_loss_func=loss if isinstance(loss, ReweightedLoss) else None,
                      processing_class=data["tokenizer"])
    trainer.remove_callback(PrinterCallback)  # the command line reports progress, not Trainer
    audit = AuditCallback(data["probe"], methods=data["audited"], every=config.every, k=config.k,
                          params=[p for p in config.params if p.split(".", 1)[0] in data["audited"]],
                          template=config.template, max_length=config.max_length,
                          max_records=config.probe_records, seed=config.seed, save_dir=run_dir / "probe")
    audit.attach(trainer)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    if isinstance(loss, ReweightedLoss):
        loss.close()
    del trainer, model
    gc.collect()
    return {"history": audit.history, "losses": losses, "seconds_total": seconds,
            "seconds_audit": audit.seconds, "probe_digest": audit.probe.digest if audit.probe else None}


def _loss_for(model: Any, method: str, config: TrainConfig, data: dict) -> Any:
    """The fused loss patched into the model (``--loss fused``, when the head is a plain linear layer), else
    ``ReweightedLoss`` on the model's full logits (``--loss logits``, or a head the fused loss cannot reproduce)."""
    from reweight_audit.scoring.head import find_head
    from reweight_audit.training.loss import ReweightedLoss
    from reweight_audit.training.patching import patch

    params = data["params"].get(method, {})
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if config.loss == "fused" and find_head(base).mode == "linear":
        return patch(model, method, seed=config.seed, reference=data.get("reference"), **params)
    return ReweightedLoss(method, seed=config.seed, reference=data.get("reference"),
                          model=model if data.get("reference") is not None else None, **params)


# --------------------------------------------------------------------------- the experiment


def _prepare(config: TrainConfig) -> dict:
    import torch

    from reweight_audit.methods import get_method
    from reweight_audit.core.models import load_model, load_tokenizer, resolve_device, resolve_model
    from reweight_audit.scoring.batching import pad_id_of
    from reweight_audit.scoring.encoding import choose_template
    from reweight_audit.training.loss import load_probe

    params = _check(config)
    device = resolve_device(config.device)
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(source)
    template = choose_template(tokenizer, config.template)
    examples = training_examples(Path(config.input), tokenizer, template, config.max_length)
    probe = Path(config.probe) if config.probe else Path(config.input)
    load_probe(probe, tokenizer, template=template, max_length=config.max_length,
               max_records=config.probe_records)  # a probe without noise fails now, not after a model load
    reference = None
    if any("ref_logp" in get_method(m).needs for m in config.methods):
        reference = load_model(resolve_model(config.ref_model), device=device, dtype=torch.float32)
        torch.set_grad_enabled(True)  # load_model switches autograd off for scoring
    pad_id = pad_id_of(tokenizer)
    # the probe table has no reference statistics, so Rho-1 is trained but not audited
    audited = [m for m in config.methods if "ref_logp" not in get_method(m).needs]
    return {"params": params, "device": device, "source": source, "tokenizer": tokenizer, "examples": examples,
            "reference": reference, "pad_id": int(pad_id), "audited": audited, "probe": probe}


def run_train(config: TrainConfig, progress: Callable[[str], None] | None = None) -> TrainResult:
    """Every method of ``config.methods`` on the same seeded schedule; write the audit curves and the table.

    The output folder is locked while the run goes on and appears whole at the end
    (:func:`reweight_audit.core.io.atomic_directory`): an interrupted run leaves an earlier one untouched.
    """
    say = progress or (lambda _message: None)
    out = Path(config.output)
    with output_lock(prepare_output_dir(out)):
        data = _prepare(config)
        with atomic_directory(out) as work:
            in_work = replace(config, output=work)
            runs: dict[str, dict] = {}
            for i, method in enumerate(config.methods, start=1):
                say(f"[{i}/{len(config.methods)}] {method}: {config.steps} steps on {len(data['examples'])} sequences")
                runs[method] = train_one(method, in_work, data)
                say(f"[{i}/{len(config.methods)}] {method}: done in {runs[method]['seconds_total']:.1f} s "
                    f"({runs[method]['seconds_audit']:.1f} s of it auditing)")
            rows = audit_rows(runs)
            summary = absorption_summary(runs, config.k)
            written = write_outputs(work, config, rows, summary, runs, len(data["examples"]))
            written["report.html"] = write_train_page(work)
    files = {name: out / path.name for name, path in written.items()}
    return TrainResult(out, rows, summary, files)


def audit_rows(runs: dict[str, dict]) -> list[dict]:
    """audit.csv rows: trained method, step, train loss at that step (NaN at step 0), then the audit values."""
    rows = []
    for method, run in runs.items():
        for entry in run["history"]:
            step = int(entry["step"])
            values = {key: value for key, value in entry.items() if key != "step"}
            rows.append({"train_method": method, "step": step, "train_loss": run["losses"].get(step, math.nan),
                         **values})
    return rows


def absorption_summary(runs: dict[str, dict], k: float) -> list[dict]:
    """Per trained method: NLL changes from the first to the last audit, and its own weights' audit at the end."""
    out = []
    for method, run in runs.items():
        first, last = run["history"][0], run["history"][-1]
        d_noise, d_clean = last["noise_nll_change"], last["clean_nll_change"]
        losses = [run["losses"][s] for s in sorted(run["losses"])]
        out.append({
            "method": method,
            "steps": int(last["step"]),
            "train_loss_first": losses[0] if losses else math.nan,
            "train_loss_last": losses[-1] if losses else math.nan,
            "clean_nll_start": first["clean_nll"], "clean_nll_end": last["clean_nll"], "clean_nll_change": d_clean,
            "noise_nll_start": first["noise_nll"], "noise_nll_end": last["noise_nll"], "noise_nll_change": d_noise,
            # > 1: the noise NLL fell more than the clean NLL; < 0 when only one of them fell
            "noise_per_clean": d_noise / d_clean if d_clean != 0 else math.nan,
            f"own_tok_rec@{k:g}": last.get(f"{method}/tok_rec@{k:g}", math.nan),
            "own_noise_mass": last.get(f"{method}/noise_mass", math.nan),
            "seconds_per_step": (run["seconds_total"] - run["seconds_audit"]) / max(int(last["step"]), 1),
        })
    return out


# --------------------------------------------------------------------------- outputs


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def absorption_markdown(summary: list[dict], config: TrainConfig, n_examples: int, probe_tokens: str) -> str:
    """The end-of-run table and what it can and cannot show."""
    k = f"{config.k:g}"
    head = ["trained with", "steps", "train loss first → last", "clean NLL start → end (Δ)",
            "noise NLL start → end (Δ)", "Δnoise / Δclean", f"own tok_rec@{k}", "own noise mass", "s/step"]
    lines = ["# Noise absorption", "",
             f"{len(summary)} methods, the same seeded schedule from the same weights: {config.steps} steps of "
             f"{config.batch_size} sequences from {n_examples} ({config.input}), model {config.model}"
             f"{' + LoRA' if config.lora else ''}, seed {config.seed}. Probe: {probe_tokens}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        lines.append("| " + " | ".join([
            s["method"], str(s["steps"]), f"{_fmt(s['train_loss_first'])} → {_fmt(s['train_loss_last'])}",
            f"{_fmt(s['clean_nll_start'])} → {_fmt(s['clean_nll_end'])} ({s['clean_nll_change']:+.3f})",
            f"{_fmt(s['noise_nll_start'])} → {_fmt(s['noise_nll_end'])} ({s['noise_nll_change']:+.3f})",
            _fmt(s["noise_per_clean"], 2), _fmt(s[f"own_tok_rec@{k}"]), _fmt(s["own_noise_mass"]),
            _fmt(s["seconds_per_step"], 2)]) + " |")
    lines += ["", "How to read it: NLL is the mean −log p of the probe's noise (injected) and clean tokens "
              "under the model being trained; a falling noise NLL is noise the model is learning. "
              "Δnoise / Δclean > 1 means the noise NLL fell more than the clean NLL. `own` columns: the "
              f"trained method's weights on the probe at the end (share of the top {k}% that is noise "
              "found, share of all weight on noise; compare's definitions).", "",
              "What a run of this size can and cannot show: it checks that each loss trains, that the "
              "audit runs inside the loop, and how each method's weights move the probe's noise and "
              "clean NLL over these few steps. It cannot rank the methods: one seed, a few steps and a "
              "small probe give no interval, the learning rate was not tuned per method (a weighted "
              "loss changes the effective step size), and absorption over a few steps says nothing "
              "about where a full run ends. For a claim, run many steps, several seeds and a held-out probe."]
    return "\n".join(lines) + "\n"


def plot_audit(rows: list[dict], k: float, path: Path) -> None:
    """Four panels against the step, one line per trained method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("noise_nll_change", "noise NLL change (probe)"), ("clean_nll_change", "clean NLL change (probe)"),
              ("own/noise_mass", "own weights: noise mass"), (f"own/tok_rec@{k:g}", f"own weights: tok_rec@{k:g}")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    methods = list(dict.fromkeys(r["train_method"] for r in rows))
    for ax, (key, title) in zip(axes.flat, panels):
        for method in methods:
            mine = [r for r in rows if r["train_method"] == method]
            column = key.replace("own/", f"{method}/")
            ys = [r.get(column, math.nan) for r in mine]
            ax.plot([r["step"] for r in mine], ys, marker="o", label=method)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, config: TrainConfig, rows: list[dict], summary: list[dict], runs: dict[str, dict],
                  n_examples: int) -> dict[str, Path]:
    import pandas as pd

    files = {name: out / name for name in ("audit.csv", "audit.png", "absorption.md", "run.json")}
    pd.DataFrame(rows).to_csv(files["audit.csv"], index=False)
    plot_audit(rows, config.k, files["audit.png"])
    first = next(iter(runs.values()))["history"][0]
    probe = Path(config.probe) if config.probe else Path(config.input)
    probe_desc = f"{probe}" + (f", first {config.probe_records} records" if config.probe_records else "")
    probe_desc += f"; noise NLL {first['noise_nll']:.3f}, clean NLL {first['clean_nll']:.3f} at step 0"
    files["absorption.md"].write_text(absorption_markdown(summary, config, n_examples, probe_desc), encoding="utf-8")
    write_json_atomic(files["run.json"], {
        "tool": "reweight-audit train", "config": config.record(),
        "summary": [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in s.items()}
                    for s in summary], "probe_sha256": {m: r["probe_digest"] for m, r in runs.items()},
        "timings": {m: {"seconds_total": r["seconds_total"], "seconds_audit": r["seconds_audit"]}
                    for m, r in runs.items()},
        "files": {name: p.name for name, p in files.items()}})
    return files

"""The options of ``reweight-audit train`` (``run_train``), each defined once with its flag, default and check."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from reweight_audit.core.config import Config, option, split_list
from reweight_audit.core.errors import AuditError, require_positive
from reweight_audit.evaluation.config import param_items


def _positive(flag: str):
    def check(value: int) -> int:
        require_positive(flag, value)
        return value

    return check


def _learning_rate(value: float) -> float:
    """A finite rate above 0: a negative or NaN rate would train (or diverge) without a word."""
    if not math.isfinite(value) or value <= 0:
        raise AuditError(f"--lr {value}: give a finite learning rate above 0, e.g. 5e-5 (leave it out for the default)")
    return value


def _max_length(value: int) -> int:
    if value < 2:
        raise AuditError(f"--max-length {value}: give at least 2 tokens")
    return value


def _k_percent(value: float) -> float:
    if not math.isfinite(value) or not 0 < value <= 100:
        raise AuditError(f"--k {value}: give a top-k cut in percent, above 0 and at most 100")
    return value


#: how train computes the reweighted loss (training.patch, or training.ReweightedLoss)
LOSSES = ("fused", "logits")


def _loss(value: str) -> str:
    if value not in LOSSES:
        raise AuditError(f"--loss {value}: use {' or '.join(LOSSES)}")
    return value


@dataclass
class TrainConfig(Config):
    """One train run: every method of ``methods`` (and ``method``) on the same seeded schedule."""

    input: Path = option(cli=False, help="Noisy JSONL written by 'inject': the training set.")
    output: Path = option(cli=False, help="Directory for audit.csv, audit.png, absorption.md.")
    method: str | None = option(None, help="One method to train with.")
    methods: list[str] | None = option(None, help="Comma list: one seeded run per method, side by side.")
    steps: int = option(20, help="Optimizer steps per method.", check=_positive("--steps"))
    probe: Path | None = option(None, help="Injected JSONL audited while training (default: the input).")
    probe_records: int | None = option(32, help="First N probe records (0: all).", check=lambda n: n or None)
    model: str = option("default", kind="model", help="'default' (SmolLM2-135M-Instruct GGUF), a hub id, a local "
                                                      "directory or a .gguf file.")
    ref_model: str | None = option(None, kind="model", help="Reference model for rho1.")
    lora: bool = option(False, help="Train LoRA adapters (needs peft: pip install 'reweight-audit[train]').")
    learning_rate: float | None = option(None, flag="--lr", help="Learning rate (default 5e-5, 2e-4 with --lora).",
                                         check=_learning_rate)
    batch_size: int = option(4, help="Sequences per step.", check=_positive("--batch-size"))
    every: int = option(5, help="Audit every N steps (and at the start and end).", check=_positive("--every"))
    max_length: int | None = option(512, help="Truncate sequences to this many tokens.", check=_max_length)
    k: float = option(10.0, help="Top-k cut in percent for the audit metrics.", check=_k_percent)
    params: list[str] = option((), flag="--param", kind="params", check=param_items,
                               help="Method parameter, e.g. --param focal.gamma=3 (repeatable).")
    seed: int = option(0, help="Seed of every random choice; the same seed gives the same files.")
    device: str = option("auto", help="auto, cpu, cuda, cuda:N or mps.")
    loss: str = option("fused", check=_loss,
                       help="fused (from hidden states and the head, chunked: no [batch, seq, vocab] logits) or "
                            "logits (ReweightedLoss on the model's full logits).")
    report_to: str = option("none", help="Trainer's report_to: none, tensorboard, wandb, ...")
    template: str = option("auto", cli=False, help="auto, chat or plain: how prompt and response are rendered.")

    def check(self) -> None:
        self.methods = [*split_list(self.method), *(self.methods or [])]
        self.method = None
        if not self.methods:
            raise AuditError("train: give --method NAME or --methods a,b,c (see `reweight-audit methods`)")
        if len(set(self.methods)) != len(self.methods):
            raise AuditError(f"--methods {','.join(self.methods)}: a method is named twice")

"""``demo``: the whole pipeline on the built-in defaults, inject → score → compare on CHAMP.

Everything goes into one folder: ``noisy.jsonl``, ``stats.parquet`` (scored
with ``--resume``, so a second run reuses finished shards) and compare's
report. What the caller sees of each stage comes through :class:`DemoHooks`.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

from reweight_audit.compare import run_compare
from reweight_audit.inject import InjectResult, run_inject
from reweight_audit.io import prepare_output_dir
from reweight_audit.results import CompareResult
from reweight_audit.scoring import ScoreConfig, ScoreResult, run_score

SOURCE = "champ"
CLEAN_FRAC = 0.1  # clean sequences are the negatives of the sequence hit rate
SEED = 0
SCOPES = ("global", "sequence")


class DemoHooks:
    """What a caller sees of a demo run. This base shows nothing; the command line prints each stage."""

    def stage(self, step: str, title: str) -> ContextManager[Callable[..., None] | None]:
        """Entered around one stage (``inject``, ``score``, ``compare``); yields that stage's progress callback."""
        return nullcontext(None)

    def done(self, step: str, result: Any) -> None:
        """Called with the stage's result once it finished."""


@dataclass
class DemoResult:
    noisy: Path
    stats: Path
    injected: InjectResult
    scored: ScoreResult
    compared: CompareResult


def run_demo(output: str | os.PathLike = Path("reports/demo"), *, limit: int | None = None, model: str = "default",
             device: str = "auto", hooks: DemoHooks | None = None) -> DemoResult:
    """Inject noise into CHAMP (first ``limit`` problems), score it with ``model``, compare every method."""
    hooks = hooks or DemoHooks()
    output = prepare_output_dir(output)
    noisy, stats = output / "noisy.jsonl", output / "stats.parquet"
    with hooks.stage("inject", f"1/3 inject: CHAMP, default families, seed {SEED}") as progress:
        injected = run_inject(SOURCE, noisy, clean_frac=CLEAN_FRAC, seed=SEED, limit=limit, progress=progress)
    hooks.done("inject", injected)
    with hooks.stage("score", f"2/3 score: {model} model") as progress:
        scored = run_score(noisy, stats, ScoreConfig(model=model, device=device), resume=True, progress=progress)
    hooks.done("score", scored)
    with hooks.stage("compare", "3/3 compare: every method") as progress:
        compared = run_compare([stats], output, scope=SCOPES, seed=SEED, progress=progress)
    hooks.done("compare", compared)
    return DemoResult(noisy, stats, injected, scored, compared)

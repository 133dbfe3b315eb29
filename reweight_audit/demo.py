"""``demo``: the whole pipeline on the built-in defaults, inject → score → compare on CHAMP, then on real errors.

Everything goes into one folder: ``noisy.jsonl``, ``stats.parquet`` (scored
with ``--resume``, so a second run reuses finished shards) and compare's
report; then ``real-errors/``: the same three steps on the first
:data:`REAL_ERROR_SOLUTIONS` model-written solutions of ``champ-fws`` (no
injected noise: the noise is each solution's first wrong step as a person
marked it), compared by source model too. What the caller sees of each stage
comes through :class:`DemoHooks`.
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
#: champ-fws solutions in the demo's real-error slice: the first 80 are 40 problems, 20 solutions per model,
#: about 17,000 tokens, which keeps the whole demo under 6 minutes on an idle 2-core CPU (README).
REAL_ERROR_SOLUTIONS = 80
REAL_ERRORS_DIR = "real-errors"


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
    real: "RealErrors | None" = None


@dataclass
class RealErrors:
    """The real-error part of the demo: its folder and the three stages' results."""

    folder: Path
    injected: InjectResult
    scored: ScoreResult
    compared: CompareResult


def run_demo(output: str | os.PathLike = Path("reports/demo"), *, limit: int | None = None, model: str = "default",
             device: str = "auto", hooks: DemoHooks | None = None,
             real_errors: int = REAL_ERROR_SOLUTIONS) -> DemoResult:
    """Inject noise into CHAMP (first ``limit`` problems), score it with ``model``, compare every method; then the
    real-error diagnostic on the first ``real_errors`` champ-fws solutions (at most ``limit``; 0 skips it)."""
    hooks = hooks or DemoHooks()
    output = prepare_output_dir(output)
    noisy, stats = output / "noisy.jsonl", output / "stats.parquet"
    with hooks.stage("inject", f"1/6 inject: CHAMP, default families, seed {SEED}") as progress:
        injected = run_inject(SOURCE, noisy, clean_frac=CLEAN_FRAC, seed=SEED, limit=limit, progress=progress)
    hooks.done("inject", injected)
    with hooks.stage("score", f"2/6 score: {model} model") as progress:
        scored = run_score(noisy, stats, ScoreConfig(model=model, device=device), resume=True, progress=progress)
    hooks.done("score", scored)
    with hooks.stage("compare", "3/6 compare: every method") as progress:
        compared = run_compare([stats], output, scope=SCOPES, seed=SEED, progress=progress)
    hooks.done("compare", compared)
    n_real = min(real_errors, limit) if limit is not None else real_errors
    real = run_real_errors(output / REAL_ERRORS_DIR, n_real, model=model, device=device, hooks=hooks) if n_real else None
    return DemoResult(noisy, stats, injected, scored, compared, real)


def run_real_errors(folder: Path, n_solutions: int, *, model: str, device: str, hooks: DemoHooks) -> RealErrors:
    """champ-fws (first ``n_solutions``, no injected noise, --after-error cut) → score → compare, by model too."""
    folder = prepare_output_dir(folder)
    noisy, stats = folder / "fws.jsonl", folder / "stats.parquet"
    with hooks.stage("inject", f"4/6 real errors: champ-fws, first {n_solutions} annotated solutions, "
                               "no injected noise") as progress:
        injected = run_inject("champ-fws", noisy, noise="none", limit=n_solutions, progress=progress)
    hooks.done("inject", injected)
    with hooks.stage("score", f"5/6 real errors: score with {model} model") as progress:
        scored = run_score(noisy, stats, ScoreConfig(model=model, device=device), resume=True, progress=progress)
    hooks.done("score", scored)
    with hooks.stage("compare", "6/6 real errors: compare every method, by source model too") as progress:
        compared = run_compare([stats], folder, scope=SCOPES, seed=SEED, by_meta="model", records=noisy,
                               progress=progress)
    hooks.done("compare", compared)
    return RealErrors(folder, injected, scored, compared)

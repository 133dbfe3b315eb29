"""``demo``: the whole pipeline on the built-in defaults, inject → score → compare on CHAMP.

Everything goes into one folder: ``noisy.jsonl``, ``stats.parquet`` (scored
with ``--resume``, so a run after an interrupted one reuses finished shards)
and compare's report, swapped in whole when all three stages are done. What
the caller sees of each stage comes through :class:`DemoHooks`.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

from reweight_audit.compare import run_compare
from reweight_audit.inject import InjectResult, run_inject
from reweight_audit.io import atomic_directory, output_lock, prepare_output_dir, read_json, write_json_atomic
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
    """Inject noise into CHAMP (first ``limit`` problems), score it with ``model``, compare every method.

    The stages run in the work folder ``.<name>.partial`` beside ``output``
    (:func:`reweight_audit.io.atomic_directory`), which is swapped in once
    all three finished: an interrupted or failed demo leaves the previous
    ``output`` as it was, and the next demo continues in the work folder
    (scoring resumes from its finished shards).
    """
    hooks = hooks or DemoHooks()
    output = prepare_output_dir(output)
    with output_lock(output), atomic_directory(output, keep_work=True) as work:
        noisy, stats = work / "noisy.jsonl", work / "stats.parquet"
        with hooks.stage("inject", f"1/3 inject: CHAMP, default families, seed {SEED}") as progress:
            injected = run_inject(SOURCE, noisy, clean_frac=CLEAN_FRAC, seed=SEED, limit=limit, progress=progress)
        hooks.done("inject", injected)
        with hooks.stage("score", f"2/3 score: {model} model") as progress:
            scored = run_score(noisy, stats, ScoreConfig(model=model, device=device), resume=True, progress=progress)
        hooks.done("score", scored)
        with hooks.stage("compare", "3/3 compare: every method") as progress:
            compared = run_compare([stats], work, scope=SCOPES, seed=SEED, progress=progress)
        hooks.done("compare", compared)
        _records_name(output, work)
    injected.output, scored.output = output / noisy.name, output / stats.name
    compared.files = {name: output / path.name for name, path in compared.files.items()}
    return DemoResult(output / noisy.name, output / stats.name, injected, scored, compared)


def _records_name(output: Path, work: Path) -> None:
    """What the stages recorded about their paths names ``output``, where the files end up, not the work folder."""
    old, new = str(work), str(output)

    def moved(value: Any) -> Any:
        if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
            return new + value[len(old):]
        if isinstance(value, dict):
            return {key: moved(v) for key, v in value.items()}
        return [moved(v) for v in value] if isinstance(value, list) else value

    for name in ("stats.parquet.manifest.json", "summary.json"):
        write_json_atomic(work / name, moved(read_json(work / name)))
    table = work / "table.md"
    table.write_text(table.read_text(encoding="utf-8").replace(f"`{old}{os.sep}", f"`{new}{os.sep}"), encoding="utf-8")

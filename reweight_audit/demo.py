"""``demo``: the whole pipeline on the built-in defaults, inject → score → compare on CHAMP, then on real errors.

Everything goes into one folder: ``noisy.jsonl``, ``stats.parquet`` (scored
with ``--resume``, so a run after an interrupted one reuses finished shards)
and compare's report; then ``real-errors/``: the same three steps on the
first :data:`REAL_ERROR_SOLUTIONS` model-written solutions of ``champ-fws``
(no injected noise: the noise is each solution's first wrong step as a
person marked it), compared by source model too. The folder is swapped in
whole when all six stages are done. What the caller sees of each stage
comes through :class:`DemoHooks`.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from reweight_audit.core.config import Config, option
from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import atomic_directory, output_lock, prepare_output_dir, read_json, write_json_atomic
from reweight_audit.evaluation.config import CompareConfig
from reweight_audit.injection.config import InjectConfig, check_limit
from reweight_audit.scoring.config import DEVICE_HELP, MODEL_HELP, ScoreConfig

if TYPE_CHECKING:  # the stages pull in pandas, pyarrow and torch: imported when the demo runs
    from reweight_audit.evaluation.results import CompareResult
    from reweight_audit.injection.run import InjectResult
    from reweight_audit.scoring.engine import ScoreResult

SOURCE = "champ"
CLEAN_FRAC = 0.1  # clean sequences are the negatives of the sequence hit rate
SEED = 0
SCOPES = ("global", "sequence")
# The controls' strata worth reading on each corpus: injected words are rare ids; first wrong steps sit late.
SYNTHETIC_STRATA = ("position", "rarity")
REAL_ERROR_STRATA = ("position",)
#: champ-fws solutions in the demo's real-error slice: the first 80 are 40 problems, 20 solutions per model,
#: about 17,000 tokens, which keeps the whole demo under 6 minutes on an idle 2-core CPU (README).
REAL_ERROR_SOLUTIONS = 80
REAL_ERRORS_DIR = "real-errors"


def _check_real_errors(n: int) -> int:
    if n < 0:
        raise AuditError(f"--real-errors {n}: give 0 (no real-error part) or a number of solutions")
    return n


@dataclass
class DemoConfig(Config):
    """The demo's few options; every other setting is the stages' default or the demo's constants above."""

    limit: int | None = option(None, help="Only the first N records.", check=check_limit)  # as inject
    model: str = option("default", kind="model", help=MODEL_HELP)
    device: str = option("auto", help=DEVICE_HELP)
    real_errors: int = option(REAL_ERROR_SOLUTIONS, help="champ-fws solutions in the real-error part (0 skips it).",
                              check=_check_real_errors)


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


def run_demo(output: str | os.PathLike = Path("reports/demo"), config: DemoConfig | None = None, *,
             hooks: DemoHooks | None = None) -> DemoResult:
    """Inject noise into CHAMP (first ``config.limit`` problems), score it with ``config.model``, compare every
    method; then the real-error diagnostic on the first ``config.real_errors`` champ-fws solutions (at most
    ``limit``; 0 skips it). ``config``: :class:`DemoConfig` (None: the defaults).

    The stages run in the work folder ``.<name>.partial`` beside ``output``
    (:func:`reweight_audit.core.io.atomic_directory`), which is swapped in once
    all six finished: an interrupted or failed demo leaves the previous
    ``output`` as it was, and the next demo continues in the work folder
    (scoring resumes from its finished shards).
    """
    from reweight_audit.evaluation.compare import run_compare
    from reweight_audit.injection.run import run_inject
    from reweight_audit.reporting.exports import write_exports
    from reweight_audit.scoring.engine import run_score

    config = config if config is not None else DemoConfig()
    limit, model, device = config.limit, config.model, config.device
    hooks = hooks or DemoHooks()
    output = prepare_output_dir(output)
    n_real = min(config.real_errors, limit) if limit is not None else config.real_errors
    with output_lock(output), atomic_directory(output, keep_work=True) as work:
        noisy, stats = work / "noisy.jsonl", work / "stats.parquet"
        with hooks.stage("inject", f"1/6 inject: CHAMP, default families, seed {SEED}") as progress:
            injected = run_inject(SOURCE, noisy, InjectConfig(clean_frac=CLEAN_FRAC, seed=SEED, limit=limit),
                                  progress=progress)
        hooks.done("inject", injected)
        with hooks.stage("score", f"2/6 score: {model} model") as progress:
            scored = run_score(noisy, stats, ScoreConfig(model=model, device=device), resume=True, progress=progress)
        hooks.done("score", scored)
        with hooks.stage("compare", "3/6 compare: every method") as progress:
            compared = run_compare([stats], work, CompareConfig(scope=SCOPES, seed=SEED, stratify=SYNTHETIC_STRATA),
                                   writer=write_exports, progress=progress)
        hooks.done("compare", compared)
        real = run_real_errors(work / REAL_ERRORS_DIR, n_real, model=model, device=device, hooks=hooks) \
            if n_real else None
        _records_name(output, work, work)
        if real is not None:
            _records_name(output, work, real.folder)
    _moved(injected, scored, compared, work, output)
    if real is not None:
        _moved(real.injected, real.scored, real.compared, work, output)
        real.folder = output / REAL_ERRORS_DIR
    return DemoResult(output / noisy.name, output / stats.name, injected, scored, compared, real)


def run_real_errors(folder: Path, n_solutions: int, *, model: str, device: str, hooks: DemoHooks) -> RealErrors:
    """champ-fws (first ``n_solutions``, no injected noise, --after-error cut) → score → compare, by model too."""
    from reweight_audit.evaluation.compare import run_compare
    from reweight_audit.injection.run import run_inject
    from reweight_audit.reporting.exports import write_exports
    from reweight_audit.scoring.engine import run_score

    folder = prepare_output_dir(folder)
    noisy, stats = folder / "fws.jsonl", folder / "stats.parquet"
    with hooks.stage("inject", f"4/6 real errors: champ-fws, first {n_solutions} annotated solutions, "
                               "no injected noise") as progress:
        injected = run_inject("champ-fws", noisy, InjectConfig(noise="none", limit=n_solutions), progress=progress)
    hooks.done("inject", injected)
    with hooks.stage("score", f"5/6 real errors: score with {model} model") as progress:
        scored = run_score(noisy, stats, ScoreConfig(model=model, device=device), resume=True, progress=progress)
    hooks.done("score", scored)
    with hooks.stage("compare", "6/6 real errors: compare every method, by source model too") as progress:
        compared = run_compare([stats], folder, CompareConfig(scope=SCOPES, seed=SEED, by_meta="model", records=noisy,
                                                              stratify=REAL_ERROR_STRATA),
                               writer=write_exports, progress=progress)
    hooks.done("compare", compared)
    return RealErrors(folder, injected, scored, compared)


def _moved(injected: InjectResult, scored: ScoreResult, compared: CompareResult, work: Path, output: Path) -> None:
    """The results name the files where the swap put them: under ``output``, not the work folder."""
    def where(path: Path) -> Path:
        return output / Path(path).relative_to(work)

    injected.output, scored.output = where(injected.output), where(scored.output)
    compared.files = {name: where(path) for name, path in compared.files.items()}


def _records_name(output: Path, work: Path, folder: Path) -> None:
    """What the stages recorded about their paths in ``folder`` (the work folder or a part of it) names
    ``output``, where the files end up, not the work folder."""
    old, new = str(work), str(output)

    def moved(value: Any) -> Any:
        if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
            return new + value[len(old):]
        if isinstance(value, dict):
            return {key: moved(v) for key, v in value.items()}
        return [moved(v) for v in value] if isinstance(value, list) else value

    for name in ("stats.parquet.manifest.json", "summary.json"):
        write_json_atomic(folder / name, moved(read_json(folder / name)))
    table = folder / "table.md"
    table.write_text(table.read_text(encoding="utf-8").replace(f"`{old}{os.sep}", f"`{new}{os.sep}"), encoding="utf-8")

"""The command line: ``reweight-audit inject | score | compare | sweep | methods | demo | bench``.

Each command parses its options, calls one library function and prints what
it returned; progress bars and printing live here and nowhere else. A user
error (:class:`AuditError`) is one line on stderr and exit code 2; Ctrl-C (or
SIGTERM) is one line saying what was kept and how to go on, and exit code 130
(:func:`command`).
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape

from reweight_audit.core.config import split_list, with_signature
from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import work_folder
from reweight_audit.demo import DemoConfig
from reweight_audit.evaluation.config import CompareConfig, SweepConfig
from reweight_audit.injection.config import InjectConfig
from reweight_audit.scoring.config import CHUNK_ROWS_HELP, DEVICE_HELP, DTYPE_HELP, ScoreConfig
from reweight_audit.training.config import TrainConfig

app = typer.Typer(
    name="reweight-audit",
    help="How much of a token-reweighting method's attention goes to noise: inject → score → compare.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # help texts are plain text: "pip install 'reweight-audit[train]'" must not lose "[train]" as rich markup
    rich_markup_mode=None,
)
# a pipe or CI log is not a terminal: give tables room instead of rich's 80-column default
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)

# ---------------------------------------------------------------- every command: registration and interrupts


def command(*, on_interrupt: str | Callable[..., str] = "nothing was written", name: str | None = None) -> Callable:
    """``app.command`` with the interrupt handling every command shares.

    ``on_interrupt`` is the line printed when Ctrl-C stops the command: what
    was kept and how to go on, formatted with the command's parameters
    (``{output}``), or a function of them. The command then exits with code
    130. Outputs are atomic, so whatever the command was writing is simply
    not there.
    """
    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(**params: Any) -> Any:
            try:
                return fn(**params)
            except KeyboardInterrupt:
                note = on_interrupt(**params) if callable(on_interrupt) else on_interrupt.format(**params)
                console.print(f"interrupted: {escape(note)}", highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None

        return app.command(name)(run)

    return register


def _quiet(value: bool) -> bool:
    """``-q`` also silences the progress bars of libraries (transformers' GGUF conversion uses plain tqdm)."""
    if value:
        # read when tqdm is first imported, which the commands do only after their options are parsed
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    return value


class _NoteHandler(logging.Handler):
    """The library's notes (``reweight_audit`` logger, warnings) as ``note:`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"[yellow]note:[/yellow] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- options shared by several commands

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.", callback=_quiet)]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print every table (the main table, the Table 1 "
                                                               "view), not only the compact one.")]
Device = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
Dtype = Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)]
ChunkRows = Annotated[Optional[int], typer.Option("--chunk-rows", help=CHUNK_ROWS_HELP)]
MethodFiles = Annotated[list[Path], typer.Option(
    "--method-file", help="Python file that registers extra methods (repeatable).")]


def options_of(config_cls: type) -> Callable[[Callable], Callable]:
    """The command's options are the config's fields (flag, default, help), after its own parameters (the
    inputs, ``-o``) and before ``-q``; the command gets them as ``**options`` and builds the config from them."""
    def apply(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
        last = ("verbose", "quiet")
        return with_signature(fn, [p for p in own if p.name not in last], config_cls,
                              [p for p in own if p.name in last], api=False)

    return apply


# ---------------------------------------------------------------- progress and reports, one per stage


class _Bar:
    """A rich progress bar (sequences, tokens, tokens/s, ETA) that appears at its first update.

    Errors raised before any progress therefore print alone, as one line.
    """

    def __init__(self, description: str, quiet: bool):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.description = description
        self.task = None
        self.started = time.perf_counter()
        self.bar = None if quiet else Progress(
            TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TextColumn("seqs"),
            TextColumn("{task.fields[tokens]:,} tokens"), TextColumn("{task.fields[rate]} tok/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)

    def update(self, done: int, tokens: int = 0, total: int | None = None) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=total, tokens=0, rate="-")
        rate = f"{tokens / max(time.perf_counter() - self.started, 1e-9):,.0f}" if tokens else "-"
        self.bar.update(self.task, completed=done, tokens=tokens, rate=rate)

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


@contextmanager
def _inject_progress(quiet: bool) -> Iterator[Callable[[int], None]]:
    bar = _Bar("inject", quiet)
    try:
        yield lambda n: bar.update(n)
    finally:
        bar.close()


@contextmanager
def _score_progress(quiet: bool) -> Iterator[Callable[[int, int, int], None]]:
    bar = _Bar("score", quiet)
    try:
        yield lambda seqs, tokens, total: bar.update(seqs, tokens, total)
    finally:
        bar.close()


@contextmanager
def _compare_progress(quiet: bool) -> Iterator[Callable[[str], None]]:
    def say(message: str) -> None:
        if not quiet:
            console.print(f"[dim]{escape(message)}[/dim]", highlight=False)

    yield say


def _report_inject(result: Any) -> None:
    manifest, loaded = result.manifest, result.load_report
    kinds = ", ".join(f"{k} {v}" for k, v in manifest["spans_by_kind"].items()) or "--noise none"
    out.print(f"wrote {escape(str(result.output))}: {manifest['records']} records, {manifest['spans']} noise spans "
              f"({escape(kinds)}), "
              f"{manifest['noise_word_frac']:.1%} of words are noise")
    if loaded.empty_responses:
        out.print(f"note: skipped {len(loaded.empty_responses)} records with an empty response")
    if manifest.get("kept_spans"):
        out.print(f"kept {manifest['kept_spans']} spans from the input "
                  f"({', '.join(f'{k} {v}' for k, v in manifest['kept_spans_by_kind'].items())})")
    if loaded.bad_lines:
        out.print(f"note: skipped {len(loaded.bad_lines)} malformed lines (first: line {loaded.bad_lines[0]})")
    if loaded.bad_annotations:
        out.print(f"note: skipped {len(loaded.bad_annotations)} records whose annotations do not fit their text "
                  f"(first: {loaded.bad_annotations[0]})")


def _report_score(result: Any) -> None:
    if not result.manifest:  # a rank other than 0: rank 0 reports
        return
    counts = result.manifest["counts"]
    cut = (f"; {counts['truncated_sequences']:,} sequences truncated to {result.manifest.get('truncate_to')} tokens"
           if counts.get("truncated_sequences") else "")
    out.print(f"wrote {escape(str(result.output))} ({counts['rows_written']:,} tokens, "
              f"{counts['noise_tokens']:,} noise{cut}) "
              f"and {result.output.name}.manifest.json")
    if counts.get("records_without_spans"):
        out.print(f"note: {counts['records_without_spans']} records had no 'spans': all their tokens were scored as clean")
    if counts.get("nonfinite_tokens"):
        out.print(f"note: {counts['nonfinite_tokens']} tokens had NaN/inf logits and were left out (see the manifest)")


#: Rows of compare's compact table besides Table 1's methods and the controls: the best by token recall.
TOP_METHODS = 5
#: The compact table's columns (every metric: --verbose, table.md, report.html).
COMPACT_METRICS = ("tok_prec", "tok_rec", "seq_hit", "auroc")


def _report_compare(result: Any, verbose: bool = False) -> None:
    """The compact view (one table: the first rank-by and scope, the top methods, Table 1's and the controls; the
    verdict; where report.html is), or with ``verbose`` every table as well; the last line names report.html."""
    from reweight_audit.reporting.exports import render_table

    if verbose:
        out.print(render_table(result))
        _print_table1(result)
    else:
        out.print(_compact_table(result))
    _print_controls(result)
    folder = next(iter(result.files.values())).parent if result.files else ""
    out.print(f"wrote {len(result.files)} files to {escape(str(folder))}/: "
              + ", ".join(sorted(Path(p).name for p in result.files.values())), highlight=False)
    if "report.html" in result.files:
        out.print(f"[bold]report:[/bold] {escape(str(result.files['report.html']))}", highlight=False, soft_wrap=True)


def _compact_table(result: Any) -> Any:
    """The first rank-by × scope: per run the top methods by token recall, Table 1's methods and the controls."""
    from rich.table import Table

    from reweight_audit.core.formatting import fmt_pct, k_label
    from reweight_audit.evaluation.metrics import metric_specs

    specs = [s for s in metric_specs() if s.name in COMPACT_METRICS]
    df = result.table
    cfg = result.config
    rank_by, scope = (cfg.get("rank_by") or ["weight"])[0], (cfg.get("scope") or ["global"])[0]
    chosen = df[(df["rank_by"] == rank_by) & (df["scope"] == scope)] if len(df) else df
    wanted = set((cfg.get("table1_map") or {}).values())
    several = len(result.runs) > 1
    table = Table(title=f"Noise in the top {k_label(result.k)} (rank by {rank_by}, {scope}): the {TOP_METHODS} best "
                        "by recall, Table 1's methods, the controls (all: --verbose, report.html)",
                  caption="; ".join(f"{escape(r['label'])}: base rate {fmt_pct(r['base_rate'])}" for r in result.runs),
                  caption_justify="left")
    if several:  # a run label is read whole: the metric columns give way first
        table.add_column("run", overflow="fold", min_width=max(len(r["label"]) for r in result.runs))
    for column in ["method", "family"]:
        table.add_column(column, style="bold" if column == "method" else None, overflow="fold")
    for spec in specs:
        table.add_column(spec.header.format(k=k_label(result.k)), justify="right")
    for run, block in chosen.groupby("run", sort=False):
        top = set(block.sort_values("tok_rec", ascending=False, kind="stable")["method"].head(TOP_METHODS))
        keep = block[block["method"].isin(top | wanted) | (block["family"] == "control")]
        keep = keep.sort_values("tok_rec", ascending=False, kind="stable")
        if several and table.row_count:
            table.add_section()
        for i, row in enumerate(keep.to_dict(orient="records")):
            cells = ([escape(str(run)) if i == 0 else ""] if several else []) + [escape(str(row["method"])),
                                                                                 escape(str(row["family"]))]
            table.add_row(*cells, *(s.fmt(row.get(s.name), row.get(f"{s.name}_lo"), row.get(f"{s.name}_hi"))
                                    for s in specs))
    return table


def _print_controls(result: Any) -> None:
    """The verdict, one readable block: for each set of controls and columns, the methods above every control in
    every column, one line per run × rank-by × scope (the Controls section of table.md)."""
    from reweight_audit.evaluation.strata import control_verdicts

    blocks: dict[tuple, list[str]] = {}
    for v in control_verdicts(result.table, getattr(result, "strata", None), result.k):
        where = ", ".join(x for x in (v["run"], f"rank by {v['rank_by']}", v["scope"]) if x)
        blocks.setdefault((tuple(v["controls"]), tuple(v["columns"])), []).append(
            f"  [{where}]: " + (", ".join(v["winners"]) or "none"))
    for (controls, columns), lines in blocks.items():
        out.print(escape(f"above every control ({', '.join(controls)}) in every column ({', '.join(columns)}):"),
                  highlight=False, soft_wrap=True)
        for line in lines:
            out.print(escape(line), highlight=False, soft_wrap=True)


def _print_table1(result: Any) -> None:
    """The Table 1 view: our figures beside the paper's (intervals in table1.md)."""
    from rich.table import Table

    from reweight_audit.core.formatting import fmt_pct, k_label
    from reweight_audit.evaluation.table1 import HEADERS, PAPER_K, TABLE1_METRICS

    frame = getattr(result, "table1", None)
    if frame is None or not len(frame):
        return
    blocks = [c for c in ("run", "rank_by", "scope") if frame[c].nunique() > 1]
    table = Table(title=f"Table 1 view: ours at the top {k_label(result.k)} (intervals in table1.md), "
                        f"the paper's at {k_label(PAPER_K)}")
    for column in (*(c.replace("_", "-") for c in blocks), "Table 1 row", "method"):
        table.add_column(column)
    for metric in TABLE1_METRICS:
        table.add_column(HEADERS[metric], justify="right")
        table.add_column("paper", justify="right", style="dim")
    table.add_column("base rate", justify="right")
    table.add_column("paper (implied)", justify="right", style="dim")
    for row in frame.to_dict(orient="records"):
        cells = [fmt for m in TABLE1_METRICS for fmt in (fmt_pct(row[m]), fmt_pct(row["paper_" + m]))]
        table.add_row(*(str(row[c]) for c in blocks), row["row"], row["method"], *cells, fmt_pct(row["base_rate"]),
                      fmt_pct(row["paper_base_rate"]))
    out.print(table)


# ---------------------------------------------------------------- commands


@command(on_interrupt="{output} was not written (an earlier version is unchanged); run the command again")
@options_of(InjectConfig)
def inject(
    input: Annotated[str, typer.Argument(
        help="A .jsonl/.json/.csv/.parquet file, 'hf:NAME[:CONFIG]', 'champ' or 'champ-fws' (CHAMP's model "
             "solutions with their annotated first wrong step).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Noisy JSONL to write (a manifest is written beside it).")],
    quiet: Quiet = False,
    **options: Any,
) -> None:
    """Inject labelled noise into the responses of a corpus (spans the corpus brings are kept)."""
    from reweight_audit.injection.run import run_inject

    config = InjectConfig(**options)
    with _inject_progress(quiet) as progress:
        result = run_inject(input, output, config, progress=progress)
    _report_inject(result)


@command(on_interrupt="finished batches (if any) are kept in {output}.shards; run the same command with "
                      "--resume to continue")
@options_of(ScoreConfig)
def score(
    input: Annotated[Path, typer.Argument(help="Noisy JSONL written by 'inject'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="stats.parquet to write.")],
    quiet: Quiet = False,
    **options: Any,
) -> None:
    """One forward pass: per-token statistics (logp, entropy, rank, expected rank, ...)."""
    from reweight_audit.scoring.engine import run_score

    config = ScoreConfig(**options)
    with _score_progress(quiet) as progress:
        result = run_score(input, output, config, resume=config.resume, progress=progress)
    _report_score(result)


@command(on_interrupt="{output} is unchanged (an earlier report stays whole); run the command again")
@options_of(CompareConfig)
def compare(
    stats: Annotated[list[Path], typer.Argument(help="One or more stats.parquet files (several runs side by side).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for report.html, the tables, plots and "
                                                                 "heatmap.")],
    verbose: Verbose = False,
    quiet: Quiet = False,
    **options: Any,
) -> None:
    """Every method × every metric: the Table 1 diagnostic, printed (compact; --verbose: everything) and exported."""
    from reweight_audit.evaluation.compare import run_compare
    from reweight_audit.reporting.exports import write_exports

    config = CompareConfig(**options)
    with _compare_progress(quiet) as progress:
        result = run_compare(stats, output, config, writer=write_exports, progress=progress)
    _report_compare(result, verbose)


@command(on_interrupt="{output} is unchanged (an earlier sweep stays whole); run the command again")
@options_of(SweepConfig)
def sweep(
    stats: Annotated[list[Path], typer.Argument(help="One or more stats.parquet files (each is a run).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for sweep.csv, robustness.md, ...")],
    quiet: Quiet = False,
    **options: Any,
) -> None:
    """Every method over rank-by × scope × k × noise kind × stratify × run: which orders survive every convention."""
    from reweight_audit.evaluation.sweep import run_sweep
    from reweight_audit.reporting.sweep_report import write_sweep

    config = SweepConfig(**options)
    with _compare_progress(quiet) as progress:
        result = run_sweep(stats, output, config, writer=write_sweep, progress=progress)
    _report_sweep(result, output, config.metric)


def _report_sweep(result: Any, output: Path, metric: str) -> None:
    """The sweep's notes and files, and whether the claim holds (exit code 1 where it fails somewhere)."""
    from reweight_audit.reporting.sweep_report import claim_lines

    for note in result.notes:
        out.print(f"note: {escape(note)}", highlight=False)
    out.print(f"wrote {len(result.files)} files to {escape(str(output))}/: " + ", ".join(result.files),
              highlight=False)
    if result.target is not None:
        from reweight_audit.evaluation.table1_search import target_lines

        for line in target_lines(result.target):
            out.print(escape(line), highlight=False, soft_wrap=True)
    fails: list[str] = []
    if result.claim is not None:
        holds, fails = claim_lines(result)
        out.print(f"claim {' < '.join(result.config['claim'])} ({metric}) holds in {len(holds)} of "
                  f"{len(holds) + len(fails)} settings", highlight=False)
        for title, lines in (("holds", holds), ("fails", fails)):
            for line in lines:
                out.print(f"  {title}: {line}", highlight=False, soft_wrap=True)
    if "report.html" in result.files:
        out.print(f"[bold]report:[/bold] {escape(str(result.files['report.html']))}", highlight=False, soft_wrap=True)
    if result.claim is not None and fails:
        raise typer.Exit(1)


def _demo_hooks(quiet: bool) -> Any:
    from reweight_audit.demo import DemoHooks

    progress = {"inject": _inject_progress, "score": _score_progress, "compare": _compare_progress}
    report = {"inject": _report_inject, "score": _report_score, "compare": _report_compare}

    class Printed(DemoHooks):
        """Each stage under its rule, its result, and how long it took; ``elapsed`` keeps every stage's seconds."""

        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.elapsed: list[tuple[str, float]] = []

        def stage(self, step: str, title: str):
            out.rule(title)
            self.title, self.started = title, time.perf_counter()
            return progress[step](quiet)

        def done(self, step: str, result: Any) -> None:
            report[step](result)
            seconds = time.perf_counter() - self.started
            self.elapsed.append((self.title.split(":")[0], seconds))
            out.print(f"[dim]{step} took {seconds:.1f} s[/dim]", highlight=False)

    return Printed()


@command(on_interrupt=lambda output, **_: f"{output} is unchanged; finished stages are kept in "
                                          f"{work_folder(output)} and the next demo continues from them")
@options_of(DemoConfig)
def demo(
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Directory for everything the demo writes.")] = Path("reports/demo"),
    quiet: Quiet = False,
    **options: Any,
) -> None:
    """The whole pipeline on the built-in defaults: inject → score → compare on CHAMP (270 problems), then the
    real-error diagnostic on the first 80 annotated model solutions of champ-fws."""
    from reweight_audit.demo import run_demo

    started = time.perf_counter()
    hooks = _demo_hooks(quiet)
    result = run_demo(output, DemoConfig(**options), hooks=hooks)
    total = time.perf_counter() - started
    out.print("\n[bold]demo done[/bold] in " + f"{total:.0f} s ("
              + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in hooks.elapsed) + ")", highlight=False)
    out.print(f"noisy corpus {escape(str(result.noisy))}, token statistics {escape(str(result.stats))}", highlight=False)
    if result.real is not None:
        out.print(f"real errors: {escape(str(result.real.folder / 'report.html'))} (by source model too)",
                  highlight=False)
    out.print(f"[bold]report:[/bold] {escape(str(output / 'report.html'))}", highlight=False, soft_wrap=True)


@command(name="methods")
def list_methods(method_file: MethodFiles = []) -> None:  # noqa: B006
    """List registered weighting methods with their formulas and the statistics they need."""
    from rich.table import Table

    from reweight_audit.methods import available_methods, load_method_file

    for path in method_file:
        load_method_file(path)
    table = Table(title="registered weighting methods")
    for column in ("name", "family", "formula", "needs", "parameters", "source"):
        table.add_column(column, overflow="fold")
    for m in available_methods():
        params = ", ".join(f"{k}={v}" for k, v in m.params.items()) or "-"
        table.add_row(m.name, m.family, m.formula, ", ".join(m.needs) or "-", params, m.source)
    out.print(table)


def _print_bench(result: dict) -> None:
    from rich.table import Table

    if "stats_only" in result:
        part = result["stats_only"]
        table = Table(title=f"bench --stats-only: {result['case']} — {part['rows']:,} rows x {part['vocab']:,} logits, "
                            f"{result['threads']} threads, statistics on {result['statistics_backend']}")
        table.add_column("computation")
        table.add_column("ns per logit", justify="right")
        for name, value in part["ns_per_logit"].items():
            table.add_row(name, f"{value:.2f}")
    else:
        table = Table(title=f"bench: {result['case']} — {result['supervised_tokens']:,} supervised tokens "
                            f"({result['total_tokens']:,} in the batch), {result['threads']} threads")
        for column in ("variant", "seconds", "tokens/s", "peak MiB above baseline"):
            table.add_column(column, justify="right" if column != "variant" else "left")
        for name, r in result["results"].items():
            peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.1f}"
            table.add_row(name, f"{r['seconds']:.3f}", f"{r['tokens_per_s']:,.1f}", peak)
        for name, reason in result["skipped"].items():
            table.add_row(name, reason, "", "")
    out.print(table)
    if result["contended"]:
        out.print(f"contended: {result['contended']['competing_processes']} competing CPU-bound processes")
    for name, value in result["ratios"].items():
        out.print(f"{name}: {value:.3f}")
    if result.get("agreement"):
        out.print("agreement with naive: " + ", ".join(f"{k}={v}" for k, v in result["agreement"].items()))


BenchCompare = Annotated[bool, typer.Option(
    "--compare", help="compare and sweep on seeded synthetic tables of --tokens sizes, each engine in a fresh process: time, "
                      "peak RSS, and the engines' reports equal (issue 20's targets).")]
BenchTokens = Annotated[str, typer.Option("--tokens", help="With --compare: table sizes (k, M, B suffixes).")]
BenchMethods = Annotated[Optional[str], typer.Option(
    "--methods", help="With --compare: comma list (default: compare's defaults).")]
BenchBootstrap = Annotated[int, typer.Option("--bootstrap", help="With --compare: bootstrap resamples.")]
BenchSeed = Annotated[int, typer.Option("--seed", help="With --compare: the synthetic tables' and the runs' seed.")]
BenchEngines = Annotated[Optional[str], typer.Option(
    "--engines", help="With --compare: which of memory, duckdb to run (default: every engine compare offers).")]
BenchStages = Annotated[str, typer.Option("--stages", help="With --compare: which of compare, sweep to time.")]
BenchWork = Annotated[Path, typer.Option("--work", help="With --compare: folder of the cached tables and the runs.")]
BenchStratify = Annotated[Optional[str], typer.Option(
    "--stratify", help="With --compare: also --stratify these variables (position, length, rarity): compare's "
                       "strata.csv, sweep's stratify axis (none and these).")]


def _bench_compare(output: Path, *, tokens: str, methods: str | None, bootstrap: int, seed: int, engines: str | None,
                   stages: str, work: Path, stratify: str | None = None) -> None:
    """``bench --compare``: each size's synthetic table, each engine in a fresh process, the lines as they come."""
    from reweight_audit.bench import compare as compare_bench
    from reweight_audit.core.io import output_lock, prepare_output_file, write_json_atomic

    options = compare_bench.CompareBench(
        tokens=compare_bench.parse_tokens(tokens), methods=tuple(split_list([methods])) if methods else None,
        bootstrap=bootstrap, seed=seed, stages=tuple(split_list([stages])), work=work,
        stratify=tuple(split_list([stratify])) if stratify else (),
        engines=tuple(split_list([engines])) if engines else compare_bench.engines_available())
    compare_bench.check(options)
    prepare_output_file(output)  # before the minutes of benchmarking
    with output_lock(output):
        result = compare_bench.run_compare_bench(options, say=lambda line: out.print(escape(line)))
        for line in compare_bench.summary_lines(result):
            out.print(escape(line))
        write_json_atomic(output, result)
    out.print(f"wrote {escape(str(output))}")


@command(on_interrupt="{output} was not written; run the command again")
def bench(
    model: Annotated[str, typer.Option(
        "--model", help="Model to benchmark: default, gemma3-270m, ... (ignored with --vocab/--seq-len).")] = "default",
    batch_tokens: Annotated[int, typer.Option(
        "--batch-tokens", help="Supervised tokens in the benchmark batch.")] = 2048,
    vocab: Annotated[Optional[int], typer.Option(
        "--vocab", help="Use a tiny model with this vocabulary (e.g. 151936).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(
        "--seq-len", help="Tokens in the tiny model's sequence (default 4096).")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    chunk_rows: ChunkRows = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per variant (best is kept).")] = 2,
    variants: Annotated[str, typer.Option(
        "--variants", help="Which of forward, naive, ours to run.")] = "forward,naive,ours",
    stats_only: Annotated[bool, typer.Option(
        "--stats-only", help="Time the statistics alone on one chunk of real logits (ns/logit vs log_softmax and sort).")
    ] = False,
    contended: Annotated[bool, typer.Option(
        "--contended", help="Time while one CPU-bound process per core competes (started and stopped by bench).")
    ] = False,
    gpu_check: Annotated[bool, typer.Option(
        "--gpu-check", help="The prepared GPU run: default model, gemma3-270m if installed, a 1B-class model with "
                            "vocab 151,936.")] = False,
    train_step: Annotated[bool, typer.Option(
        "--train", help="One training step of the fused reweighted loss vs HF's loss, ReweightedLoss and TRL's fused "
                        "DFT, each in its own process (--vocab, --seq-len pick one size; default the issue's grid).")
    ] = False,
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="JSON file for the figures.")] = Path("reports/bench.json"),
    compare: BenchCompare = False, tokens: BenchTokens = "10M,100M", methods: BenchMethods = None,
    bootstrap: BenchBootstrap = 200, seed: BenchSeed = 0, engines: BenchEngines = None,
    stages: BenchStages = "compare,sweep", work: BenchWork = Path("reports/bench-compare-work"),
    stratify: BenchStratify = None,
) -> None:
    """Scoring throughput and peak memory: plain forward pass vs naive vs ours (--compare: compare at scale)."""
    from reweight_audit.core.io import prepare_output_file

    if compare:
        return _bench_compare(output, tokens=tokens, methods=methods, bootstrap=bootstrap, seed=seed, engines=engines,
                              stages=stages, work=work, stratify=stratify)

    # sizes (0 or a negative number is an error, never "the default") are checked by bench.run_bench itself
    chosen = split_list([variants])
    unknown = sorted(set(chosen) - {"forward", "naive", "ours"})
    if unknown or not chosen:
        raise AuditError(f"--variants {variants}: use a comma list of forward, naive, ours")
    prepare_output_file(output)  # before the minutes of benchmarking
    if train_step:
        _bench_train(output, vocab=vocab, seq_len=seq_len, device=device, dtype=dtype, repeats=repeats)
        return
    run = dict(model=model, batch_tokens=batch_tokens, vocab=vocab, seq_len=seq_len, device=device, dtype=dtype,
               chunk_rows=chunk_rows, repeats=repeats, variants=tuple(chosen), stats_only=stats_only,
               contended=contended)
    _bench_scoring(output, run, gpu_check=gpu_check)


def _bench_scoring(output: Path, run: dict, *, gpu_check: bool) -> None:
    """The scoring bench (``run``: run_bench's keywords) or the prepared GPU check, printed and written."""
    from reweight_audit import bench as bench_module
    from reweight_audit.core.io import output_lock, write_json_atomic

    with output_lock(output):
        results = bench_module.gpu_check(repeats=run["repeats"]) if gpu_check else [bench_module.run_bench(**run)]
        for result in results:
            _print_bench(result)
        write_json_atomic(output, results if gpu_check else results[0])
    out.print(f"wrote {escape(str(output))}")


def _bench_train(output: Path, *, vocab: int | None, seq_len: int | None, device: str, dtype: str,
                 repeats: int) -> None:
    from reweight_audit.bench import train as train_bench
    from reweight_audit.core.io import output_lock, write_json_atomic

    # --vocab / --seq-len pick one size (no flatness runs); without them the grid
    sizes = {"vocabs": (vocab,) if vocab else train_bench.VOCABS, "seq_len": seq_len or train_bench.SEQ_LEN,
             "flat_seq_lens": () if vocab or seq_len else train_bench.FLAT_SEQ_LENS}
    with output_lock(output):
        result = train_bench.run_train_bench(**sizes, device=device, dtype=dtype, repeats=repeats)
        for line in train_bench.format_lines(result):
            out.print(escape(line))
        write_json_atomic(output, result)
    out.print(f"wrote {escape(str(output))}")


def _sigterm_is_an_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the same clean-up and one line as Ctrl-C (see command)


@command(on_interrupt="{output} was not written (an earlier version is unchanged); run the command again")
@options_of(TrainConfig)
def train(
    input: Annotated[Path, typer.Argument(help="Noisy JSONL written by 'inject': the training set.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for audit.csv, audit.png, absorption.md.")],
    quiet: Quiet = False,
    **options: Any,
) -> None:
    """Fine-tune with each method's loss, auditing the model on an injected probe as it trains."""
    from reweight_audit.training.run import run_train

    config = TrainConfig(input=input, output=output, **options)
    result = run_train(config, progress=None if quiet else lambda msg: console.print(f"[dim]{escape(msg)}[/dim]",
                                                                                     highlight=False))
    out.print(escape(result.files["absorption.md"].read_text(encoding="utf-8")))
    out.print(f"wrote {escape(str(output))}/: " + ", ".join(p.name for p in result.files.values()))


# ---------------------------------------------------------------- cache: the converted checkpoint cache

cache_app = typer.Typer(help="The GGUF models converted for fast loading (in $REWEIGHT_AUDIT_CACHE).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list() -> None:
    """Each converted checkpoint: path, model, size, date."""
    from reweight_audit.core.checkpoints import list_entries
    from reweight_audit.core.models import cache_dir

    entries = list_entries(cache_dir())
    if not entries:
        out.print(f"no cached checkpoints in {escape(str(cache_dir()))}", highlight=False)
    for entry in entries:
        out.print(f"{escape(str(entry.path))}  {escape(entry.model)}  {entry.size / 1e6:.0f} MB  {entry.created}",
                  highlight=False, soft_wrap=True)


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every converted checkpoint; the next load of a GGUF model converts it again."""
    from reweight_audit.core.checkpoints import clear_entries
    from reweight_audit.core.models import cache_dir

    removed = clear_entries(cache_dir())
    freed = sum(entry.size for entry in removed) / 1e6
    out.print(f"removed {len(removed)} cached checkpoint(s) from {escape(str(cache_dir()))}, {freed:.0f} MB",
              highlight=False)


def _os_error_line(exc: OSError) -> str:
    """An I/O error as one line: the path, the OS's reason, and that earlier outputs were kept."""
    reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{reason}; outputs are written whole or not at all, so earlier outputs were kept"


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2; library notes print as ``note:``."""
    notes = logging.getLogger("reweight_audit")
    if not any(isinstance(handler, _NoteHandler) for handler in notes.handlers):
        notes.addHandler(_NoteHandler())
    notes.propagate = False
    signal.signal(signal.SIGTERM, _sigterm_is_an_interrupt)
    try:
        _run_app()
    except SystemExit as exc:  # click ends every command with sys.exit
        from reweight_audit.scoring.distributed import leave_after_gloo

        leave_after_gloo(exc.code)  # under torchrun on gloo: skip the teardown that can abort a finished rank
        raise


def _run_app() -> None:
    """The app, with user errors, I/O errors and an early Ctrl-C turned into one line and an exit code."""
    try:
        app()
    except AuditError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:  # an I/O error no stage turned into its own line (the outputs are atomic: none is half-written)
        console.print(f"[red]error:[/red] {escape(_os_error_line(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:  # outside any command (while typer parses): nothing started
        console.print("interrupted: nothing was written", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()

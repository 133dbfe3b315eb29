"""The command line: ``reweight-audit inject | score | compare | sweep | methods | demo | bench``.

Each command parses its options, calls one library function and prints what
it returned; progress bars and printing live here and nowhere else. A user
error (:class:`AuditError`) is one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console

from reweight_audit.errors import AuditError
from reweight_audit.noise import DEFAULT_NOISE

app = typer.Typer(
    name="reweight-audit",
    help="How much of a token-reweighting method's attention goes to noise: inject → score → compare.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# a pipe or CI log is not a terminal: give tables room instead of rich's 80-column default
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)

# ---------------------------------------------------------------- options shared by several commands

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of every random choice; the same seed gives the same files.")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Only the first N records.")]
Model = Annotated[str, typer.Option(
    "--model", help="'default' (SmolLM2-135M-Instruct GGUF), a hub id, a local directory or a .gguf file.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16.")]
ChunkRows = Annotated[Optional[int], typer.Option(
    "--chunk-rows", help="Rows per output-head chunk (default: from free memory).")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the hub to run.")]
MethodFiles = Annotated[list[Path], typer.Option(
    "--method-file", help="Python file that registers extra methods (repeatable).")]
AfterError = Annotated[str, typer.Option(
    "--after-error", help="After an annotated first wrong step: cut (the response ends with it) or keep "
                          "(the rest stays, as a span of kind after-error).")]
StepsField = Annotated[Optional[str], typer.Option(
    "--steps-field", help="Read step-labelled rows: this field holds the list of steps (ProcessBench: steps).")]
FirstErrorField = Annotated[str, typer.Option(
    "--first-error-field", help="With --steps-field: the index of the first wrong step, -1 for none.")]
SkipBad = Annotated[bool, typer.Option(
    "--skip-bad", help="Skip and count malformed JSONL lines and records whose annotations do not fit "
                       "their text, instead of stopping.")]


def split_list(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated option values as one list: ``-x a,b -x c`` → ``[a, b, c]``."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


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
            console.print(f"[dim]{message}[/dim]", highlight=False)

    yield say


def _report_inject(result: Any) -> None:
    manifest, loaded = result.manifest, result.load_report
    kinds = ", ".join(f"{k} {v}" for k, v in manifest["spans_by_kind"].items()) or "--noise none"
    out.print(f"wrote {result.output}: {manifest['records']} records, {manifest['spans']} noise spans ({kinds}), "
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
    out.print(f"wrote {result.output} ({counts['rows_written']:,} tokens, {counts['noise_tokens']:,} noise) "
              f"and {result.output.name}.manifest.json")
    if counts.get("records_without_spans"):
        out.print(f"note: {counts['records_without_spans']} records had no 'spans': all their tokens were scored as clean")
    if counts.get("nonfinite_tokens"):
        out.print(f"note: {counts['nonfinite_tokens']} tokens had NaN/inf logits and were left out (see the manifest)")
    if counts.get("truncated_sequences"):
        out.print(f"note: {counts['truncated_sequences']} sequences truncated by --max-length "
                  f"({counts.get('noise_tokens_lost_to_truncation', 0)} noise tokens lost)")


def _report_compare(result: Any) -> None:
    from reweight_audit.exports import render_table

    out.print(render_table(result))
    _print_table1(result)
    folder = next(iter(result.files.values())).parent if result.files else ""
    out.print(f"wrote {len(result.files)} files to {folder}/: "
              + ", ".join(sorted(Path(p).name for p in result.files.values())))


def _print_table1(result: Any) -> None:
    """The Table 1 view: our figures beside the paper's (intervals in table1.md)."""
    from rich.table import Table

    from reweight_audit.formatting import fmt_pct, k_label
    from reweight_audit.table1 import HEADERS, PAPER_K, TABLE1_METRICS

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


@app.command()
def inject(
    input: Annotated[str, typer.Argument(
        help="A .jsonl/.json/.csv/.parquet file, 'hf:NAME[:CONFIG]', 'champ' or 'champ-fws' (CHAMP's model "
             "solutions with their annotated first wrong step).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Noisy JSONL to write (a manifest is written beside it).")],
    noise: Annotated[Optional[str], typer.Option(
        "--noise", help=f"Comma list of families, optionally weighted: filler:2,hedge:1. 'all' for every family, "
                        f"'none' to pass the corpus through. Default: {DEFAULT_NOISE}.")
    ] = None,
    rate: Annotated[Optional[float], typer.Option(
        "--rate", help="Probability of an injection at each eligible word boundary (default 0.1).")] = None,
    target_frac: Annotated[Optional[float], typer.Option(
        "--target-frac", help="Instead of --rate: the share of response words to make noise.")] = None,
    clean_frac: Annotated[float, typer.Option(
        "--clean-frac", help="Share of sequences left untouched (negatives for sequence metrics).")] = 0.0,
    seed: Seed = 0,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help="Named noise settings instead of --noise/--rate: table1 (filler and hedge at about "
                         "0.8% of CHAMP's tokens, the share RankTuner's Table 1 implies).")] = None,
    limit: Limit = None,
    split: Annotated[str, typer.Option("--split", help="Split of a Hugging Face dataset.")] = "train",
    prompt_field: Annotated[str, typer.Option("--prompt-field")] = "prompt",
    response_field: Annotated[str, typer.Option("--response-field")] = "response",
    id_field: Annotated[str, typer.Option("--id-field")] = "id",
    steps_field: StepsField = None,
    first_error_field: FirstErrorField = "label",
    after_error: AfterError = "cut",
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", help="Vocabulary source for random-token (a --model value).")] = "default",
    skip_bad: SkipBad = False,
    trust_remote_code: TrustRemoteCode = False,
    quiet: Quiet = False,
) -> None:
    """Inject labelled noise into the responses of a corpus (spans the corpus brings are kept)."""
    from reweight_audit.inject import run_inject

    with _inject_progress(quiet) as progress:
        result = run_inject(input, output, noise=noise, rate=rate, target_frac=target_frac, clean_frac=clean_frac,
                            seed=seed, preset=preset, limit=limit, split=split, prompt_field=prompt_field,
                            response_field=response_field, id_field=id_field, steps_field=steps_field,
                            first_error_field=first_error_field, after_error=after_error, tokenizer=tokenizer,
                            skip_bad=skip_bad, trust_remote_code=trust_remote_code, progress=progress)
    _report_inject(result)


@app.command()
def score(
    input: Annotated[Path, typer.Argument(help="Noisy JSONL written by 'inject'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="stats.parquet to write.")],
    model: Model = "default",
    device: Device = "auto",
    dtype: Dtype = "auto",
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Padded tokens per forward batch.")] = 2048,
    chunk_rows: ChunkRows = None,
    max_length: Annotated[Optional[int], typer.Option(
        "--max-length", help="Truncate sequences to this many tokens.")] = None,
    template: Annotated[str, typer.Option("--template", help="auto, chat or plain.")] = "auto",
    ref_model: Annotated[Optional[str], typer.Option(
        "--ref-model", help="Reference model for Rho-1 (adds ref_logp).")] = None,
    trust_remote_code: TrustRemoteCode = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue an interrupted run from its finished shards.")] = False,
    quiet: Quiet = False,
) -> None:
    """One forward pass: per-token statistics (logp, entropy, rank, expected rank, ...)."""
    from reweight_audit.scoring import ScoreConfig, run_score

    config = ScoreConfig(model=model, device=device, dtype=dtype, batch_tokens=batch_tokens, chunk_rows=chunk_rows,
                         max_length=max_length, template=template, ref_model=ref_model,
                         trust_remote_code=trust_remote_code)
    with _score_progress(quiet) as progress:
        result = run_score(input, output, config, resume=resume, progress=progress)
    _report_score(result)


@app.command()
def compare(
    stats: Annotated[list[Path], typer.Argument(help="One or more stats.parquet files (several runs side by side).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for the tables, plots and heatmap.")],
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Comma list (default: every method whose statistics exist).")] = None,
    k: Annotated[float, typer.Option("--k", help="Top-k cut in percent, in (0, 100].")] = 10.0,
    rank_by: Annotated[list[str], typer.Option(
        "--rank-by", help="weight, loss or grad (repeat or comma list).")] = ["weight"],  # noqa: B006
    scope: Annotated[list[str], typer.Option(
        "--scope", help="global or sequence (repeat or comma list).")] = ["global"],  # noqa: B006
    param: Annotated[list[str], typer.Option(
        "--param", help="Method parameter, e.g. --param talr.w_min=0.1 (repeatable).")] = [],  # noqa: B006
    method_file: MethodFiles = [],  # noqa: B006
    batch_seqs: Annotated[int, typer.Option(
        "--batch-seqs", help="Sequences per simulated training batch (TALR).")] = 256,
    bootstrap: Annotated[int, typer.Option(
        "--bootstrap", help="Bootstrap resamples over sequences for the 95% intervals.")] = 200,
    table1_map: Annotated[Optional[str], typer.Option(
        "--table1-map", help="The method each Table 1 row stands for (default "
                             "entropy=eaft,prob=dft,ranktuner=ranktuner-approx).")] = None,
    by_meta: Annotated[Optional[str], typer.Option(
        "--by-meta", help="Also every metric per value of this record meta field (e.g. model), read from the "
                          "noisy JSONL the table was scored from.")] = None,
    records: Annotated[Optional[Path], typer.Option(
        "--records", help="With --by-meta: that noisy JSONL (default: the score manifest's input).")] = None,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Every method × every metric: the Table 1 diagnostic, printed and exported."""
    from reweight_audit.compare import run_compare

    with _compare_progress(quiet) as progress:
        result = run_compare(stats, output, methods=split_list([methods]) if methods else None,
                             rank_by=split_list(rank_by), k=k, scope=split_list(scope), params=param,
                             method_files=method_file, batch_seqs=batch_seqs, n_boot=bootstrap, seed=seed,
                             table1_map=table1_map, by_meta=by_meta, records=records, progress=progress)
    _report_compare(result)


@app.command()
def sweep(
    stats: Annotated[list[Path], typer.Argument(help="One or more stats.parquet files (each is a run).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for sweep.csv, robustness.md, ...")],
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Comma list (default: every method whose statistics exist).")] = None,
    k: Annotated[list[str], typer.Option(
        "--k", help="Cuts in percent (repeat or comma list).")] = ["1,2,5,10,20,30"],  # noqa: B006
    rank_by: Annotated[list[str], typer.Option(
        "--rank-by", help="weight, loss, grad (repeat or comma list).")] = ["weight,loss,grad"],  # noqa: B006
    scope: Annotated[list[str], typer.Option(
        "--scope", help="global, sequence (repeat or comma list).")] = ["global,sequence"],  # noqa: B006
    metric: Annotated[str, typer.Option(
        "--metric", help="The per-cut metric that orders the methods: tok_rec, tok_prec, seq_hit or lift.")
    ] = "tok_rec",
    claim: Annotated[Optional[str], typer.Option(
        "--claim", help='A claimed order, lowest first: "ranktuner-approx < eaft < inv-prob"; exit code 0 only '
                        "when it holds in every setting.")] = None,
    param: Annotated[list[str], typer.Option(
        "--param", help="Method parameter, e.g. --param talr.w_min=0.1 (repeatable).")] = [],  # noqa: B006
    method_file: MethodFiles = [],  # noqa: B006
    batch_seqs: Annotated[int, typer.Option(
        "--batch-seqs", help="Sequences per simulated training batch (TALR).")] = 256,
    bootstrap: Annotated[int, typer.Option(
        "--bootstrap", help="Bootstrap resamples over sequences per setting (0: none).")] = 100,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Every method over rank-by × scope × k × noise kind × run: which orders survive every convention."""
    from reweight_audit.sweep import run_sweep
    from reweight_audit.sweep_report import claim_lines

    try:
        cuts = [float(c) for c in split_list(k)]
    except ValueError:
        raise AuditError(f"--k {','.join(k)}: give cuts in percent, e.g. --k 1,2,5,10") from None
    with _compare_progress(quiet) as progress:
        result = run_sweep(stats, output, methods=split_list([methods]) if methods else None,
                           rank_by=split_list(rank_by), scope=split_list(scope), cuts=cuts, params=param,
                           method_files=method_file, batch_seqs=batch_seqs, n_boot=bootstrap, seed=seed,
                           metric=metric, claim=claim, progress=progress)
    for note in result.notes:
        out.print(f"note: {note}", highlight=False)
    out.print(f"wrote {len(result.files)} files to {output}/: " + ", ".join(result.files), highlight=False)
    if result.claim is not None:
        holds, fails = claim_lines(result)
        out.print(f"claim {' < '.join(result.config['claim'])} ({metric}) holds in {len(holds)} of "
                  f"{len(holds) + len(fails)} settings", highlight=False)
        for title, lines in (("holds", holds), ("fails", fails)):
            for line in lines:
                out.print(f"  {title}: {line}", highlight=False, soft_wrap=True)
        if fails:
            raise typer.Exit(1)


def _demo_hooks(quiet: bool) -> Any:
    from reweight_audit.demo import DemoHooks

    progress = {"inject": _inject_progress, "score": _score_progress, "compare": _compare_progress}
    report = {"inject": _report_inject, "score": _report_score, "compare": _report_compare}

    class Printed(DemoHooks):
        def stage(self, step: str, title: str):
            out.rule(title)
            return progress[step](quiet)

        def done(self, step: str, result: Any) -> None:
            report[step](result)

    return Printed()


@app.command()
def demo(
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Directory for everything the demo writes.")] = Path("reports/demo"),
    limit: Limit = None,
    model: Model = "default",
    device: Device = "auto",
    real_errors: Annotated[int, typer.Option(
        "--real-errors", help="champ-fws solutions in the real-error part (0 skips it).")] = 80,
    quiet: Quiet = False,
) -> None:
    """The whole pipeline on the built-in defaults: inject → score → compare on CHAMP (270 problems), then the
    real-error diagnostic on the first 80 annotated model solutions of champ-fws."""
    from reweight_audit.demo import run_demo

    result = run_demo(output, limit=limit, model=model, device=device, hooks=_demo_hooks(quiet),
                      real_errors=real_errors)
    out.print(f"\n[bold]demo done[/bold]: open {output / 'heatmap.html'} and {output / 'table.md'}; "
              f"noisy corpus {result.noisy}, token statistics {result.stats}")
    if result.real is not None:
        out.print(f"real errors: {result.real.folder / 'table.md'} (by model: by_group.csv), "
                  f"{result.real.folder / 'table1.md'}")


@app.command("methods")
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

    table = Table(title=f"bench: {result['case']} — {result['supervised_tokens']:,} supervised tokens "
                        f"({result['total_tokens']:,} in the batch), {result['threads']} threads")
    for column in ("variant", "seconds", "tokens/s", "peak MiB above baseline"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    for name, r in result["results"].items():
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.1f}"
        table.add_row(name, f"{r['seconds']:.3f}", f"{r['tokens_per_s']:,.1f}", peak)
    out.print(table)
    for name, value in result["ratios"].items():
        out.print(f"{name}: {value:.3f}")
    if result["agreement"]:
        out.print("agreement with naive: " + ", ".join(f"{k}={v}" for k, v in result["agreement"].items()))


@app.command()
def bench(
    model: Annotated[str, typer.Option(
        "--model", help="Model to benchmark (ignored with --vocab/--seq-len).")] = "default",
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
    gpu_check: Annotated[bool, typer.Option(
        "--gpu-check", help="The prepared GPU run: default model and a 1B-class model, vocab 151,936.")] = False,
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="JSON file for the figures.")] = Path("reports/bench.json"),
) -> None:
    """Scoring throughput and peak memory: plain forward pass vs naive vs ours."""
    from reweight_audit import bench as bench_module
    from reweight_audit.io import prepare_output_file, write_json_atomic

    if repeats < 1:
        raise AuditError("--repeats must be at least 1")
    chosen = split_list([variants])
    unknown = sorted(set(chosen) - {"forward", "naive", "ours"})
    if unknown or not chosen:
        raise AuditError(f"--variants {variants}: use a comma list of forward, naive, ours")
    if gpu_check:
        results = bench_module.gpu_check(repeats=repeats)
    else:
        results = [bench_module.run_bench(model=model, batch_tokens=batch_tokens, vocab=vocab, seq_len=seq_len,
                                          device=device, dtype=dtype, chunk_rows=chunk_rows, repeats=repeats,
                                          variants=tuple(chosen))]
    for result in results:
        _print_bench(result)
    write_json_atomic(prepare_output_file(output), results if gpu_check else results[0])
    out.print(f"wrote {output}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except AuditError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: finished shards are kept; run again with --resume to continue", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()

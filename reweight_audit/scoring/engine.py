"""The score stage: :func:`run_score`, the window loop over the input, the manifest.

The input is read in windows of ``window`` records; each window is encoded
(:mod:`~reweight_audit.scoring.encoding`), planned into length-sorted batches
(:mod:`~reweight_audit.scoring.batching`), its batches shared among the ranks, and every batch
scored by the chunked head (:mod:`~reweight_audit.scoring.head`) into its own shard
(:mod:`~reweight_audit.scoring.shards`), merged into ``<out>`` when every batch is done, so
``--resume`` picks up an interrupted run where it stopped. The stage's steps, the engine's rules
and the table's columns: ``docs/design.md``, "Scoring", and ``docs/formats.md``.
"""
from __future__ import annotations

import itertools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import (
    acquire_lock,
    atomic_files,
    dump_json,
    log,
    manifest_header,
    manifest_path,
    prepare_output_file,
    refuse_symlink,
    write_parquet_atomic,
)
from reweight_audit.scoring.batching import pad_id_of, plan_batches
from reweight_audit.scoring.config import ScoreConfig
from reweight_audit.scoring.distributed import agree
from reweight_audit.scoring.encoding import NOISE_RULE, Encoded, choose_template, encode_records
from reweight_audit.scoring.head import (
    STATS_COLUMNS,
    Head,
    auto_chunk_rows,
    check_vocabulary,
    find_head,
    score_batch,
    verify_head,
)
from reweight_audit.scoring.reader import NoisyRows, NoisySource, scan_input
from reweight_audit.scoring.shards import (
    assign_to_ranks,
    batch_table,
    check_shards,
    claim_shards,
    damaged_shards,
    merge_shards,
    run_identity,
    shard_dir,
)

T = TypeVar("T")

ProgressFn = Callable[[int, int, int], None]  # (sequences done, tokens done, sequences total)
WINDOW_SEQS = 20_000  # sequences encoded, sorted and batched together; bounds memory on large corpora


@dataclass
class ScoreResult:
    output: Path
    manifest: dict


def iter_windows(
    input_path: NoisySource, tokenizer: Any, template: str, max_length: int | None, counts: dict, read_report: dict,
    window: int, *, truncate: bool = True
) -> Iterator[list[Encoded]]:
    """Encoded sequences in windows of ``window`` records, streamed from the file (``truncate``: see
    :func:`~reweight_audit.scoring.encoding.encode`)."""
    current: list[Encoded] = []
    for encoded in encode_records(input_path, tokenizer, template, max_length, counts, read_report,
                                  truncate=truncate):
        current.append(encoded)
        if len(current) >= window:
            yield current
            current = []
    if current:
        yield current


def run_score(
    input_path: Path | str | NoisyRows,
    output: Path,
    config: ScoreConfig | None = None,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    window: int = WINDOW_SEQS,
) -> ScoreResult:
    """Score every supervised token of ``input_path`` (a noisy JSONL, or :class:`NoisyRows` in memory);
    write ``output`` (stats table) and its manifest.

    Without ``rank``/``world_size`` the process group comes from the
    environment (torchrun, accelerate launch; one process otherwise). Every
    rank scores its share of each window's batches into the shared shard
    folder, and rank 0 merges once every rank reported success; the other
    ranks return an empty manifest. ``progress(sequences, tokens, total)``
    is called on rank 0 after each batch. Rank 0 holds the output's lock
    (:func:`reweight_audit.core.io.acquire_lock`) from before the input is read
    until the merge is done.
    """
    if world_size is None or rank is None:
        from reweight_audit.scoring.distributed import dist_context

        with dist_context() as (rank, world_size):
            return run_score(input_path, output, config, resume=resume, progress=progress, rank=rank,
                             world_size=world_size, window=window)
    config = config or ScoreConfig()
    input_path = input_path if isinstance(input_path, NoisyRows) else Path(input_path)
    output = Path(output)
    _check_paths(input_path, output, config)
    started = time.time()
    # one run per output: rank 0 holds the lock for the whole run, and a refusal reaches every rank
    lock = on_every_rank(world_size, lambda: acquire_lock(prepare_output_file(output)) if rank == 0 else None)
    try:
        setup = on_every_rank(world_size, lambda: _set_up(input_path, output, config, resume, rank, world_size,
                                                          window))
        tally = on_every_rank(world_size, lambda: _score_windows(setup, resume, progress if rank == 0 else None,
                                                                 rank, world_size))
        # rank 0 merges; the others wait for it, so no process leaves the group while another still needs it
        manifest = on_every_rank(world_size, lambda: _merge(setup, tally, world_size, started) if rank == 0 else {})
    finally:
        if lock is not None:
            lock.release()
    return ScoreResult(output, manifest)


def on_every_rank(world_size: int, stage: Callable[[], T]) -> T:
    """Run one stage on this rank, then agree with the others: every rank raises when any rank failed.

    Without the exchange a rank that failed would leave the others waiting at the next collective.
    """
    failure: BaseException | None = None
    result = None
    try:
        result = stage()
    except Exception as exc:
        failure = exc
    agree(failure, world_size)
    return result


def _check_paths(input_path: NoisySource, output: Path, config: ScoreConfig) -> None:
    """Paths, before anything is read or loaded (the options were checked when the ScoreConfig was built)."""
    if isinstance(input_path, Path) and not input_path.exists():
        raise AuditError(f"{input_path}: no such file; run 'reweight-audit inject' first or check the path")
    prepare_output_file(output, source=_input_file(input_path), create=False)


@dataclass
class _Setup:
    """What every rank holds once the input, the model(s) and the shard folder are ready."""

    input_path: NoisySource
    output: Path
    config: ScoreConfig
    device: str
    source: Any  # ModelSource
    template: str
    windows: Iterator[list[Encoded]]  # the windows after ``first``
    first: list[Encoded]
    total_records: int
    counts: dict[str, int]
    read_report: dict
    model: Any
    head: Head
    ref: tuple[Any, Head] | None
    pad_id: int
    vocab: int
    chunk_rows: int
    identity: dict
    shards: Path
    context: int | None  # the model's context in tokens (None: its config does not say)
    limit: int | None  # sequences are cut to this many tokens (--max-length, else the context)


def _set_up(input_path: NoisySource, output: Path, config: ScoreConfig, resume: bool, rank: int, world_size: int,
            window: int) -> _Setup:
    """What can fail cheaply comes first: the whole input, the tokenizer(s), the shards; then the model(s).

    A bad record, a duplicate id, a refused ``--resume`` or another run's shards are reported
    before any model loads; the shard folder is claimed only once the model(s) loaded.
    """
    from reweight_audit.core.models import load_tokenizer, resolve_device, resolve_dtype, resolve_model

    total_records = scan_input(input_path)
    device = _rank_device(resolve_device(config.device), world_size)
    dtype = resolve_dtype(config.dtype, device)
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    template = choose_template(tokenizer, config.template)
    ref_source = _reference_source(config, tokenizer)
    context = model_context(source, config.trust_remote_code)
    limit = _length_limit(config, context)
    identity = run_identity(input_path, source, ref_source, template, dtype, config, window, limit)
    shards = check_shards(refuse_symlink(shard_dir(output), "the shards folder"), identity, resume=resume)
    damaged = damaged_shards(shards) if resume and rank == 0 else []
    counts: dict[str, int] = {}
    read_report: dict = {}
    windows = iter_windows(input_path, tokenizer, template, limit, counts, read_report, window,
                           truncate=not config.no_truncate)
    first = _first_window(windows, input_path, counts)
    model, head, vocab = _load_scorer(source, config, device, dtype, first)
    ref = _load_scorer(ref_source, config, device, dtype, first)[:2] if ref_source else None
    claim_shards(shards, identity, resume=resume, write_state=rank == 0, damaged=damaged)
    pad_id = pad_id_of(tokenizer)
    chunk_rows = config.chunk_rows if config.chunk_rows is not None else auto_chunk_rows(vocab, device)
    return _Setup(input_path, output, config, device, source, template, windows, first, total_records, counts,
                  read_report, model, head, ref, pad_id, vocab, chunk_rows, identity, shards, context, limit)


def model_context(source: Any, trust_remote_code: bool = False) -> int | None:
    """The model's context in tokens, from its config (read before the weights load); None when it does not say."""
    from transformers import AutoConfig

    from reweight_audit.core.hub import offline_reason
    from reweight_audit.core.models import checkpoint_source

    where = checkpoint_source(source, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if where.gguf_file:
        kwargs["gguf_file"] = where.gguf_file
    if where.kind != "hub" or offline_reason():
        kwargs["local_files_only"] = True
    try:
        model_config = AutoConfig.from_pretrained(where.location, **kwargs).get_text_config()
    except Exception:  # the model load that follows names what is wrong with the model, in its own line
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _length_limit(config: ScoreConfig, context: int | None) -> int | None:
    """Tokens a sequence is cut to: ``--max-length``, never past the model's context, else the context."""
    if config.max_length is None:
        return context
    return min(config.max_length, context) if context else config.max_length


def _input_file(source: NoisySource) -> Path | None:
    return source if isinstance(source, Path) else None


def _rank_device(device: str, world_size: int) -> str:
    """Under several ranks, plain ``cuda`` means this rank's own GPU."""
    if world_size > 1 and device == "cuda":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return device


def _first_window(windows: Iterator[list[Encoded]], input_path: NoisySource, counts: dict) -> list[Encoded]:
    first = next(windows, None)
    if first is None:
        if not counts.get("records"):
            raise AuditError(f"{input_path}: no records; run inject on a non-empty corpus")
        raise AuditError(f"{input_path}: no record has a supervised token left to score (see --max-length)")
    return first


def _load_scorer(source: Any, config: ScoreConfig, device: str, dtype: Any, first: list[Encoded]) -> tuple[Any, Head, int]:
    """The model, its verified head and its vocabulary size."""
    from reweight_audit.core.models import load_model

    model = load_model(source, device=device, dtype=dtype, trust_remote_code=config.trust_remote_code)
    check_vocabulary(model, first)
    head = verify_head(model, find_head(model), first[0], device)
    vocab = int(head.weight.shape[0]) if head.mode == "linear" else int(model.config.get_text_config().vocab_size)
    return model, head, vocab


def _reference_source(config: ScoreConfig, tokenizer: Any) -> Any:
    """``--ref-model`` (Rho-1), resolved and its tokenizer checked against the scored model's, or None."""
    from reweight_audit.core.models import load_tokenizer, resolve_model

    if not config.ref_model:
        return None
    ref_source = resolve_model(config.ref_model)
    ref_tok = load_tokenizer(ref_source, trust_remote_code=config.trust_remote_code)
    if ref_tok.get_vocab() != tokenizer.get_vocab():
        raise AuditError(f"--ref-model {config.ref_model}: its tokenizer differs from the scored model's; "
                         "Rho-1 needs the same vocabulary")
    return ref_source


@dataclass
class _Tally:
    """What this rank scored, over all windows, and what the whole input holds (every rank reads it)."""

    n_batches: int = 0  # batches planned, all ranks'
    resumed: int = 0  # this rank's batches found finished (--resume)
    scored_tokens: int = 0  # tokens this rank scored now, over forward_seconds
    forward_seconds: float = 0.0
    done_seqs: int = 0  # this rank's sequences, scored or resumed
    done_tokens: int = 0
    n_sequences: int = 0  # the input's
    supervised: int = 0
    noise_tokens: int = 0


def _score_windows(setup: _Setup, resume: bool, progress: ProgressFn | None, rank: int, world_size: int) -> _Tally:
    """Every window: plan its batches, take this rank's share, score each into its shard (kept ones skipped)."""
    tally = _Tally()
    for sequences in itertools.chain([setup.first], setup.windows):
        tally.n_sequences += len(sequences)
        tally.supervised += sum(len(s.sup_index) for s in sequences)
        tally.noise_tokens += sum(int(s.is_noise.sum()) for s in sequences)
        if sequences is not setup.first:
            check_vocabulary(setup.model, sequences)
        batches = plan_batches(sequences, setup.config.batch_tokens)
        owner = assign_to_ranks([len(b) * max(len(sequences[j].input_ids) for j in b) for b in batches], world_size)
        for local, members in enumerate(batches):
            if owner[local] == rank:
                _score_shard(setup, [sequences[j] for j in members], tally.n_batches + local, resume, tally)
                if progress:
                    progress(tally.done_seqs * world_size, tally.done_tokens * world_size, setup.total_records)
        tally.n_batches += len(batches)
    return tally


def _score_shard(setup: _Setup, batch: list[Encoded], index: int, resume: bool, tally: _Tally) -> None:
    path = setup.shards / f"batch-{index:06d}.parquet"
    n_tok = sum(len(s.sup_index) for s in batch)
    if resume and path.exists():
        tally.resumed += 1
    else:
        t0 = time.perf_counter()
        stats = score_batch(setup.model, setup.head, batch, device=setup.device, chunk_rows=setup.chunk_rows,
                            pad_id=setup.pad_id, ref=setup.ref)
        tally.forward_seconds += time.perf_counter() - t0
        write_parquet_atomic(batch_table(batch, stats), path,
                             kept=f"the finished shards are kept in {setup.shards}; run again with --resume")
        tally.scored_tokens += n_tok
    tally.done_seqs += len(batch)
    tally.done_tokens += n_tok


def _merge(setup: _Setup, tally: _Tally, world_size: int, started: float) -> dict:
    """Rank 0: merge every shard into the output and write its manifest, together; remove the shard folder."""
    shard_paths = [setup.shards / f"batch-{i:06d}.parquet" for i in range(tally.n_batches)]
    missing = [p for p in shard_paths if not p.exists()]
    if missing:
        raise AuditError(f"{setup.shards}: {len(missing)} batch shards are missing; run again with --resume to finish")
    kept = (f"the previous {setup.output.name} is kept unchanged" if setup.output.exists() else "nothing was written"
            ) + f"; every batch is kept in {setup.shards}, so a run with --resume only merges"
    with atomic_files(setup.output, manifest_path(setup.output), kept=kept) as (data_tmp, manifest_tmp):
        rows = merge_shards(shard_paths, data_tmp)
        manifest = score_manifest(setup, tally, rows, world_size, started)
        manifest_tmp.write_text(dump_json(manifest), encoding="utf-8")
    shutil.rmtree(setup.shards, ignore_errors=True)
    _warn_truncated(setup, manifest["counts"])
    return manifest


def _warn_truncated(setup: _Setup, counts: dict) -> None:
    """One warning line when sequences were cut: how many, to what, and what was left out of the table."""
    cut = counts.get("truncated_sequences", 0)
    if not cut:
        return
    why = ("--max-length" if setup.config.max_length is not None and setup.limit == setup.config.max_length
           else "the model's context")
    log.warning("%s: %d of %d sequence(s) were longer than %s and were truncated to %d tokens: %d supervised "
                "token(s) left out (%d noise), %d sequence(s) with none left; counted in the manifest (--no-truncate "
                "refuses such sequences instead)", setup.output.name, cut, counts.get("records", cut), why,
                setup.limit, counts.get("tokens_lost_to_truncation", 0),
                counts.get("noise_tokens_lost_to_truncation", 0), counts.get("empty_after_truncation", 0))


def score_manifest(setup: _Setup, tally: _Tally, rows: int, world_size: int, started: float) -> dict:
    """The score stage's manifest (``docs/formats.md``, "Manifests")."""
    config, identity = setup.config, setup.identity
    return {
        **manifest_header("score", input=setup.input_path, input_digest=identity["input_digest"], output=setup.output),
        "model": identity["model"],
        "model_spec": config.model,
        "model_digest": identity["model_digest"],
        "ref_model": identity["ref_model"],
        "template": setup.template,
        "dtype": identity["dtype"],
        "device": setup.device,
        "world_size": world_size,
        "batch_tokens": config.batch_tokens,
        "chunk_rows": setup.chunk_rows,
        "max_length": config.max_length,
        "context_length": setup.context,
        "truncate_to": setup.limit,
        "truncate": not config.no_truncate,
        "window": identity["window"],
        "vocab_size": setup.vocab,
        "head": setup.head.describe(),
        "noise_rule": NOISE_RULE,
        "columns": list(STATS_COLUMNS) + (["ref_logp"] if setup.ref else []),
        "row_order": "batches in length order; within a batch, input order then position",
        "counts": {
            "sequences": tally.n_sequences,
            "supervised_tokens": tally.supervised,
            "rows_written": rows,
            "noise_tokens": tally.noise_tokens,
            "nonfinite_tokens": tally.supervised - rows,
            "records_without_spans": setup.read_report.get("no_spans", 0),
            "batches": tally.n_batches,
            "batches_resumed_rank0": tally.resumed,
            **setup.counts,
        },
        "timing": {
            "seconds_total": round(time.time() - started, 3),
            "seconds_scoring_rank0": round(tally.forward_seconds, 3),
            "tokens_per_second_rank0": (round(tally.scored_tokens / tally.forward_seconds, 2)
                                        if tally.forward_seconds > 0 else None),
        },
    }

"""``inject``: labelled noise in the responses of a corpus, written as noisy JSONL plus a manifest.

The I/O edge around ``noise.py``: records are streamed from the loader
(never the whole corpus in memory) and written atomically with their
manifest (:mod:`reweight_audit.core.io`). Output format: ``docs/formats.md``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from reweight_audit.injection.config import InjectConfig
from reweight_audit.injection.corpus import (CHAMP_FWS, FieldMap, LoadReport, Record, check_source, describe_source, is_file_source,
                     iter_records, source_digest)
from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import (atomic_files, dump_json, file_sha256, json_default, manifest_header, manifest_path, output_lock,
                 prepare_output_file)
from reweight_audit.injection.noise import (
    FAMILIES,
    OFFSET_UNIT,
    WORD_UNIT,
    NoiseConfig,
    Noiser,
    Span,
    load_word_list,
    vocab_noise_pieces,
)


@dataclass
class InjectStats:
    """Counters filled while ``inject_records`` streams."""

    records_in: int = 0
    written: int = 0
    clean: int = 0
    skipped_empty: int = 0
    no_eligible: int = 0
    with_noise: int = 0
    spans_by_kind: Counter = field(default_factory=Counter)
    kept_by_kind: Counter = field(default_factory=Counter)  # spans that came with the input
    words: int = 0
    noise_words: int = 0


def _sorted_json(obj):
    """Dicts with sorted keys, recursively, so meta from any loader serialises the same."""
    if isinstance(obj, dict):
        return {str(k): _sorted_json(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, (list, tuple)):
        return [_sorted_json(v) for v in obj]
    return obj


def inject_records(
    records: Iterable[Record],
    config: NoiseConfig,
    vocab_pieces: Sequence[str] | None = None,
    *,
    stats: InjectStats | None = None,
    source: str = "input",
) -> Iterator[dict]:
    """Yield one output object per record with a non-blank response.

    Keys, in this order: ``id, prompt, response, clean_response, spans, meta``;
    ``meta`` is the record's meta plus ``clean`` and ``n_spans`` (keys sorted).
    ``spans``: the record's own spans first, in their order, moved through the
    edits (no noise is placed inside one), then the injected ones in text order.
    Blank responses are skipped and counted in ``stats``. The configuration
    (and the vocabulary, for ``random-token``) is checked here, before the
    first record is read.
    """
    noiser = Noiser(config, vocab_pieces)
    return _inject_stream(records, noiser, stats if stats is not None else InjectStats(), source)


def _inject_stream(records: Iterable[Record], noiser: Noiser, stats: InjectStats, source: str) -> Iterator[dict]:
    seen: set[str] = set()  # ids only, not bodies: duplicates would share a seed and a score key
    for rec in records:
        stats.records_in += 1
        if not isinstance(rec.id, str) or not rec.id:
            raise AuditError(f"{source}: record #{stats.records_in} has id {rec.id!r}; every record needs a non-empty text id")
        if rec.id in seen:
            raise AuditError(f"{source}: record id {rec.id!r} appears twice; ids seed the noise and key the scores, make them unique")
        seen.add(rec.id)
        if rec.response is None or (isinstance(rec.response, str) and not rec.response.strip()):
            stats.skipped_empty += 1
            continue
        if not isinstance(rec.response, str):
            raise AuditError(f"{source}: record {rec.id!r} field response is {type(rec.response).__name__}, not text; fix the response column")
        kept = [Span(sp["start"], sp["end"], sp["kind"], sp["text"]) for sp in rec.spans or ()]
        inj = noiser.inject(rec.response, rec.id, kept)
        stats.written += 1
        stats.words += inj.words
        stats.noise_words += inj.noise_words
        if inj.clean:
            stats.clean += 1
        elif not inj.eligible:
            stats.no_eligible += 1
        if inj.spans:
            stats.with_noise += 1
        stats.spans_by_kind.update(sp.kind for sp in inj.spans)
        stats.kept_by_kind.update(sp.kind for sp in inj.kept)
        # a kept span keeps its own keys (a user's extra fields too), with the moved offsets
        spans = [{**given, "start": sp.start, "end": sp.end} for given, sp in zip(rec.spans or (), inj.kept)]
        spans += [sp.to_dict() for sp in inj.spans]
        meta = dict(rec.meta or {})
        meta["clean"] = inj.clean
        meta["n_spans"] = len(spans)
        yield {
            "id": rec.id,
            "prompt": rec.prompt,
            "response": inj.response,
            "clean_response": rec.response,
            "spans": spans,
            "meta": _sorted_json(meta),
        }


def write_injected(
    records: Iterable[Record],
    output_path: str | os.PathLike,
    config: NoiseConfig,
    *,
    input_digest: str,
    input_desc: str,
    vocab_pieces: Sequence[str] | None = None,
    skipped: dict | None = None,
    loader: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Inject noise into ``records`` and write ``output_path`` (jsonl) plus its manifest.

    Atomic (:func:`reweight_audit.core.io.atomic_files`): data and manifest are
    renamed into place only when both are complete. ``skipped`` holds the
    loader's own skip counts (merged into the manifest), ``loader`` how the
    records were read (recorded as it is). ``progress(n)`` is called after each
    written record. Returns the manifest.
    """
    out = prepare_output_file(output_path, source=input_desc or None)
    man_path = manifest_path(out)
    own = {out, man_path}
    stats = InjectStats()
    try:
        with atomic_files(out, man_path) as (tmp, man_tmp):
            own.update((tmp, man_tmp))
            with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                for obj in inject_records(records, config, vocab_pieces, stats=stats, source=str(input_desc or "input")):
                    _write_line(fh, obj, input_desc)
                    if progress is not None:
                        progress(stats.written)
            _require_records(stats, input_desc, skipped)
            manifest = _manifest(config, stats, out, file_sha256(tmp), input_digest, input_desc, skipped, vocab_pieces)
            manifest["loader"] = loader
            man_tmp.write_text(dump_json(manifest), encoding="utf-8")
    except OSError as exc:
        # Only our own files get this message; a loader's OSError passes through.
        if exc.filename is not None and Path(exc.filename) not in own:
            raise
        raise AuditError(f"{out}: cannot write the output ({exc.strerror}); check the path and free space") from None
    return manifest


def _require_records(stats: InjectStats, input_desc: str, skipped: dict | None) -> None:
    """An output without a single record is an error, not a success: nothing is written."""
    if stats.written:
        return
    skipped = skipped or {}
    empty = stats.skipped_empty + int(skipped.get("empty_response", 0))
    malformed = int(skipped.get("malformed_lines", 0))
    if not stats.records_in and not empty and not malformed:
        raise AuditError(f"{input_desc}: no records (the input is empty or blank); give a corpus with records")
    raise AuditError(f"{input_desc}: no record has a non-empty response ({empty} empty, {malformed} malformed "
                     "lines skipped); check --response-field")


def _write_line(fh: Any, obj: dict, input_desc: str) -> None:
    fh.write(record_line(obj, input_desc) + "\n")


def record_line(obj: dict, input_desc: str) -> str:
    """One output record as its JSONL line (without the newline); text that is not valid Unicode is refused."""
    line = json.dumps(obj, ensure_ascii=False, default=json_default)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        raise AuditError(
            f"{input_desc}: record {obj['id']!r} contains an unpaired surrogate (invalid Unicode); fix its text"
        ) from None
    return line


def _manifest(
    config: NoiseConfig,
    stats: InjectStats,
    out: Path,
    output_sha: str,
    input_digest: str,
    input_desc: str,
    skipped: dict | None,
    vocab_pieces: Sequence[str] | None,
) -> dict:
    noiser_kinds = [k for k, w in config.noise.items() if w > 0]
    word_lists = {}
    for kind in noiser_kinds:
        fname = FAMILIES[kind].word_list
        if fname:
            entries = load_word_list(fname)
            word_lists[kind] = {
                "file": f"data/{fname}",
                "entries": len(entries),
                "sha256": hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest(),
            }
    vocab = None
    if "random-token" in noiser_kinds:
        pieces = vocab_noise_pieces(vocab_pieces or [])
        vocab = {"pieces": len(pieces), "sha256": hashlib.sha256("\n".join(pieces).encode("utf-8")).hexdigest()}
    skip = {str(k): v for k, v in (skipped or {}).items()}
    skip["empty_response"] = stats.skipped_empty + int(skip.get("empty_response", 0))  # ours and the loader's
    return {
        **manifest_header("inject", input=input_desc, input_digest=input_digest, output=out),
        "output_sha256": output_sha,
        "config": config.to_dict(),
        "seed": int(config.seed),
        "rng": "numpy.random.default_rng([seed, blake2b-64(id, little-endian)]); first draw decides clean",
        "records_in": stats.records_in,
        "records": stats.written,
        "clean_sequences": stats.clean,
        "noisy_sequences": stats.with_noise,
        "no_eligible_boundary": stats.no_eligible,
        "skipped": skip,
        "spans": sum(stats.spans_by_kind.values()),
        "spans_by_kind": {k: stats.spans_by_kind.get(k, 0) for k in noiser_kinds},
        "kept_spans": sum(stats.kept_by_kind.values()),
        "kept_spans_by_kind": dict(sorted(stats.kept_by_kind.items())),
        "words": stats.words,
        "noise_words": stats.noise_words,
        "noise_word_frac": (stats.noise_words / stats.words) if stats.words else 0.0,
        "word_unit": WORD_UNIT,
        "offset_unit": OFFSET_UNIT,
        "word_lists": word_lists,
        "vocab": vocab,
    }


# --------------------------------------------------------------------------- the stage


@dataclass
class InjectResult:
    """What :func:`run_inject` made: the noisy JSONL and its manifest (or, without an output, the
    records themselves, as the file's lines would read back), and what the loader skipped."""

    output: Path | None
    manifest: dict | None
    load_report: LoadReport
    records: list[dict] | None = None


def run_inject(
    source: Any,
    output: str | os.PathLike | None,
    config: InjectConfig | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> InjectResult:
    """Inject labelled noise into the responses of ``source``; write ``output`` and its manifest.

    ``source``: a ``.jsonl``/``.json``/``.csv``/``.parquet`` path, ``hf:NAME[:CONFIG]``
    (with ``config.split``), ``champ``, ``champ-fws`` or a table in memory (:mod:`reweight_audit.core.frames`).
    ``config`` holds the options (:class:`~reweight_audit.injection.config.InjectConfig`, validated when it
    was built; None: the defaults): the noise families or a preset, the fields to read, ``after_error``.
    Spans a record brings are kept and moved through the edits. ``progress(n)`` is called
    after each record. ``output=None`` writes nothing and returns the records in
    memory. One run at a time writes ``output`` (:func:`reweight_audit.core.io.output_lock`).
    """
    options = config if config is not None else InjectConfig()
    config = options.noise_config
    if output is not None:
        prepare_output_file(output, source=source if is_file_source(source) else None, create=False)
    check_source(source)
    pieces = vocab_pieces(config, options.tokenizer, trust_remote_code=options.trust_remote_code)
    report = LoadReport()
    fields = FieldMap(prompt=options.prompt_field, response=options.response_field, id=options.id_field or "id",
                      steps=options.steps_field, first_error=options.first_error_field,
                      id_required=options.id_field is not None)
    records = iter_records(source, fields, split=options.split, skip_bad=options.skip_bad, report=report,
                           after_error=options.after_error)
    if options.limit is not None:
        records = itertools.islice(records, options.limit)
    if output is None:
        return InjectResult(None, None, report, _in_memory(records, config, pieces, describe_source(source), progress))
    skipped: dict = {}
    with output_lock(prepare_output_file(output)):
        manifest = write_injected(_counting_skips(records, report, skipped), output, config,
                                  input_digest=source_digest(source), input_desc=describe_source(source),
                                  vocab_pieces=pieces, skipped=skipped, loader=_loader(source, fields, options.after_error),
                                  progress=progress)
    return InjectResult(Path(output), manifest, report)


def _in_memory(records: Iterable[Record], config: NoiseConfig, pieces: Sequence[str] | None, input_desc: str,
               progress: Callable[[int], None] | None) -> list[dict]:
    """The output records, each exactly as its line of the JSONL file would read back."""
    out = []
    for obj in inject_records(records, config, pieces, source=input_desc):
        out.append(json.loads(record_line(obj, input_desc)))
        if progress is not None:
            progress(len(out))
    return out


def _loader(source: Any, fields: FieldMap, after_error: str) -> dict:
    """How the records were read, for the manifest; ``after_error`` only where first errors are annotated."""
    annotated = (isinstance(source, str) and source == CHAMP_FWS) or fields.steps is not None
    return {"source": describe_source(source), "steps_field": fields.steps,
            "first_error_field": fields.first_error if fields.steps is not None else None,
            "after_error": after_error if annotated else None}


def _counting_skips(records: Iterable[Record], report: LoadReport, skipped: dict) -> Iterator[Record]:
    """The records; once they are exhausted (before the manifest is written), the loader's skip counts."""
    yield from records
    skipped["empty_response"] = len(report.empty_responses)
    skipped["malformed_lines"] = len(report.bad_lines)
    if report.bad_lines:
        skipped["first_malformed_line"] = report.bad_lines[0]
    skipped["bad_annotations"] = len(report.bad_annotations)
    if report.bad_annotations:
        skipped["first_bad_annotation"] = report.bad_annotations[0]


def vocab_pieces(config: NoiseConfig, tokenizer: str, *, trust_remote_code: bool = False) -> list[str] | None:
    """The vocabulary for ``random-token`` from the tokenizer of ``tokenizer`` (a ``--model`` value), else None."""
    if "random-token" not in config.noise:
        return None
    from reweight_audit.core.models import load_tokenizer, resolve_model

    return list(load_tokenizer(resolve_model(tokenizer), trust_remote_code=trust_remote_code).get_vocab())

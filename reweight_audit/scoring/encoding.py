"""From a noisy record to a tokenised sequence: the template, the tokens ``score`` supervises, their noise labels.

A record is rendered (``chat``: the tokenizer's chat template; ``plain``: prompt, blank line,
response), tokenised with offsets, and every token that covers response text is supervised
(but the first of the sequence, which nothing predicts). A token is noise under
:data:`NOISE_RULE`; its kind is the first covering span's. A token's ``token`` text is the
response characters it covers that no earlier token covered: byte-level BPE splits one character
(a Hebrew letter, an emoji) across tokens that each report the whole character's offsets, and
the character belongs to the first of them, so the texts of a response's tokens join to it.

A sequence longer than ``max_length`` (``score``: ``--max-length``, else the model's context) is
truncated and counted, or (``truncate=False``, ``--no-truncate``) refused in one line naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.scoring.reader import NoisyRecord, NoisySource, read_noisy

__all__ = ["NOISE_RULE", "Encoded", "choose_template", "encode", "encode_records", "render"]

NOISE_RULE = "a token is noise when any non-whitespace character it covers lies inside an injected span"


@dataclass
class Encoded:
    """A tokenised sequence and what we know about its supervised tokens."""

    seq_id: str
    order: int  # position in the input file
    input_ids: list[int]
    sup_index: np.ndarray  # positions in input_ids of supervised tokens (all >= 1)
    token_text: list[str]
    is_noise: np.ndarray
    noise_kind: list[str]


def render(tokenizer: Any, prompt: str, response: str, template: str) -> tuple[str, int, bool]:
    """Full text and the char offset where the response starts; bool: specials already in text."""
    if template == "chat":
        messages = [{"role": "user", "content": prompt}] if prompt else []
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) if messages else ""
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head) and full[len(head):].startswith(response):
            return full, len(head), True
        start = full.rfind(response)
        if start < 0:
            raise AuditError(
                "the chat template rewrites the response text (e.g. trims it), so response tokens cannot be located; pass --template plain"
            )
        return full, start, True
    # plain: prompt, a blank line, response; the tokenizer adds its own BOS if it has one
    if prompt:
        head = prompt + "\n\n"
        return head + response, len(head), False
    return response, 0, False


def choose_template(tokenizer: Any, template: str) -> str:
    """``chat`` or ``plain`` for ``--template auto|chat|plain`` (auto: chat when the tokenizer has a template)."""
    if template not in ("auto", "chat", "plain"):
        raise AuditError(f"--template {template}: use auto, chat or plain")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise AuditError("--template chat: the tokenizer has no chat template; use --template plain or auto")
    if template == "auto":
        return "chat" if has_chat else "plain"
    return template


def encode(
    record: NoisyRecord,
    order: int,
    tokenizer: Any,
    template: str,
    max_length: int | None,
    counts: dict,
    *,
    truncate: bool = True,
) -> Encoded | None:
    """Tokenise one record; map spans to tokens; None when nothing supervised remains.

    A sequence over ``max_length`` tokens is cut (counted), or refused when not ``truncate``.
    """
    full, resp_start, has_specials = render(tokenizer, record.prompt, record.response, template)
    try:
        enc = tokenizer(full, add_special_tokens=not has_specials, return_offsets_mapping=True)
    except NotImplementedError:
        raise AuditError("the tokenizer cannot return offset mappings; use a fast (tokenizers-backed) tokenizer") from None
    ids: list[int] = enc["input_ids"]
    if not truncate and max_length is not None and len(ids) > max_length:
        where = f"line {record.line}, " if record.line else ""
        raise AuditError(f"record {record.id!r} ({where}{len(ids):,} tokens) is longer than the model's context of "
                         f"{max_length:,} tokens; leave out --no-truncate to score its first {max_length:,} tokens "
                         "(counted in the manifest), or shorten it")
    sup, text, noise, kind = _supervised_tokens(record, enc["offset_mapping"], resp_start, counts)
    if not sup:
        _count(counts, "empty_sequences")
        return None
    sequence = Encoded(record.id, order, list(ids), np.asarray(sup, dtype=np.int64), text,
                       np.asarray(noise, dtype=bool), kind)
    if max_length is not None and len(ids) > max_length:
        return _truncated(sequence, max_length, counts)
    return sequence


def _supervised_tokens(record: NoisyRecord, offsets: Any, resp_start: int,
                       counts: dict) -> tuple[list[int], list[str], list[bool], list[str]]:
    """Positions, response text, noise label and kind of every token that covers response text."""
    resp_end = resp_start + len(record.response)
    span_of_char, kinds, space = _span_of_char(record)
    sup, text, noise, kind = [], [], [], []
    claimed = 0  # response characters already given to a token (a split character belongs to its first token)
    for j, (s, e) in enumerate(offsets):
        if e <= resp_start or s >= resp_end or e <= s:
            continue
        lo, hi = max(s, resp_start) - resp_start, min(e, resp_end) - resp_start
        own = max(lo, claimed)
        claimed = max(claimed, hi)
        if j == 0:  # nothing predicts the first token of a sequence
            _count(counts, "unscorable_first_tokens")
            continue
        sup.append(j)
        text.append(record.response[own:hi] if own < hi else "")
        label = -1
        if record.spans:
            covered = span_of_char[lo:hi][~space[lo:hi]]
            hits = covered[covered >= 0]
            if hits.size:
                label = int(hits[0])
        noise.append(label >= 0)
        kind.append(kinds[label] if label >= 0 else "")
    return sup, text, noise, kind


def _span_of_char(record: NoisyRecord) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Per response character the index of the (last) span covering it, -1 if none; the spans' kinds; whitespace."""
    n_chars = len(record.response)
    span_of_char = np.full(n_chars, -1, dtype=np.int32)
    kinds = []
    for i, span in enumerate(record.spans):
        span_of_char[int(span["start"]):int(span["end"])] = i
        kinds.append(str(span.get("kind", "noise")))
    space = np.fromiter((c.isspace() for c in record.response), dtype=bool, count=n_chars) if record.spans else None
    return span_of_char, kinds, space


def _truncated(sequence: Encoded, max_length: int, counts: dict) -> Encoded | None:
    """``sequence`` cut to ``max_length`` tokens, what was lost counted; None when no supervised token is left."""
    keep = sequence.sup_index < max_length
    _count(counts, "truncated_sequences")
    _count(counts, "noise_tokens_lost_to_truncation", int(sequence.is_noise[~keep].sum()))
    _count(counts, "tokens_lost_to_truncation", int((~keep).sum()))
    sup_index = sequence.sup_index[keep]
    if sup_index.size == 0:
        _count(counts, "empty_after_truncation")
        return None
    return Encoded(sequence.seq_id, sequence.order, sequence.input_ids[:max_length], sup_index,
                   [t for t, k in zip(sequence.token_text, keep) if k], sequence.is_noise[keep],
                   [t for t, k in zip(sequence.noise_kind, keep) if k])


def _count(counts: dict, name: str, n: int = 1) -> None:
    counts[name] = counts.get(name, 0) + n


def encode_records(source: NoisySource, tokenizer: Any, template: str, max_length: int | None, counts: dict,
                   read_report: dict | None = None, *, limit: int | None = None,
                   truncate: bool = True) -> Iterator[Encoded]:
    """Every record of ``source`` (the first ``limit``) encoded, in input order; records with nothing
    supervised are left out (``counts`` says why; ``counts["records"]``: records read). ``truncate``:
    see :func:`encode`."""
    for order, record in enumerate(read_noisy(source, read_report)):
        if limit is not None and order >= limit:
            break
        _count(counts, "records")
        encoded = encode(record, order, tokenizer, template, max_length, counts, truncate=truncate)
        if encoded is not None:
            yield encoded

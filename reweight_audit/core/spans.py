"""Spans that come with a corpus: checking them, and building them from first-error annotations.

Pure functions, no I/O. A span is ``{"start", "end", "kind", "text"}`` with
``start < end`` code-point offsets into the response and
``response[start:end] == text`` (``docs/formats.md``, "Spans"). A problem is a
:class:`BadAnnotation` carrying what is wrong; the loader adds where (file:line
or record id) and turns it into an error, or skips the record with ``--skip-bad``.
"""
from __future__ import annotations

import operator
from typing import Any, Collection

from reweight_audit.core.errors import AuditError

#: Kinds a loader gives to annotated spans.
WRONG_STEP = "wrong-step"
AFTER_ERROR = "after-error"
#: What happens to the response after the first wrong step (``--after-error``).
AFTER_ERROR_CHOICES = ("cut", "keep")
#: How ``steps`` are joined into one response.
STEP_SEPARATOR = "\n\n"
SPAN_KEYS = ("start", "end", "kind", "text")


class BadAnnotation(ValueError):
    """An annotation that does not fit its text; the message says what is wrong, not where."""


def check_after_error(after_error: str) -> str:
    """``after_error`` if it is ``cut`` or ``keep``; an AuditError otherwise."""
    if after_error not in AFTER_ERROR_CHOICES:
        raise AuditError(f"--after-error {after_error!r}: use cut (end the response with the wrong step) or keep")
    return after_error


def _offset(value: Any, name: str, i: int) -> int:
    if isinstance(value, bool):
        raise BadAnnotation(f"span {i}: '{name}' is {value!r}, not a character offset")
    try:
        return operator.index(value)  # ints and numpy integers, not floats or text
    except TypeError:
        raise BadAnnotation(f"span {i}: '{name}' is {value!r}, not an integer character offset") from None


def check_spans(response: str, spans: Any, *, optional: Collection[str] = ()) -> list[dict]:
    """The spans in their order, offsets as ints (other keys kept); BadAnnotation if one does not fit.

    Each must lie inside the response (``0 <= start < end <= len(response)``), with
    ``start`` and ``end`` integers (not ``3.7``, not ``"3"``), name a non-empty ``kind``,
    and carry ``text == response[start:end]``. ``optional``: keys among ``kind`` and
    ``text`` a span may leave out (``score`` reads spans written by hand); given, they are
    checked all the same.
    """
    if not isinstance(spans, (list, tuple)):
        raise BadAnnotation(f"'spans' is {type(spans).__name__}, not a list of {{start, end, kind, text}}")
    required = [key for key in SPAN_KEYS if key in ("start", "end") or key not in optional]
    checked = []
    for i, span in enumerate(spans):
        if not isinstance(span, dict) or any(key not in span for key in required):
            raise BadAnnotation(f"span {i} is not an object with {', '.join(required)}")
        start, end = _offset(span["start"], "start", i), _offset(span["end"], "end", i)
        if not 0 <= start < end <= len(response):
            raise BadAnnotation(f"span {i} [{start}, {end}) lies outside the response of {len(response)} characters")
        if "kind" in span and (not isinstance(span["kind"], str) or not span["kind"]):
            raise BadAnnotation(f"span {i}: 'kind' must be non-empty text, got {span['kind']!r}")
        if "text" in span and span["text"] != response[start:end]:
            raise BadAnnotation(f"span {i} [{start}, {end}): text {_short(span['text'])} does not match the response "
                                f"there ({_short(response[start:end])})")
        checked.append({**span, "start": start, "end": end})  # other keys ride along unchanged
    return checked


def _short(text: Any, limit: int = 40) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 4] + "...'"


def first_error_spans(text: str, wrong: tuple[int, int] | None, after_error: str) -> tuple[str, list[dict]]:
    """Response and spans for a solution whose first wrong step is ``text[wrong[0]:wrong[1]]`` (None: no error).

    ``cut``: the response ends where the wrong step ends (trailing whitespace
    dropped), so every other token lies in a step a person checked. ``keep``:
    the whole text, and what follows the wrong step (from its first
    non-whitespace character) is a span of kind ``after-error``.
    """
    if wrong is None:
        return text, []
    start, end = wrong
    if not 0 <= start < end <= len(text):
        raise BadAnnotation(f"wrong step [{start}, {end}) lies outside the solution of {len(text)} characters")
    if not text[start:end].strip():
        raise BadAnnotation(f"wrong step [{start}, {end}) is blank")
    if after_error == "cut":
        response = text[:end].rstrip()
        return response, [_span(response, start, len(response), WRONG_STEP)]
    spans = [_span(text, start, end, WRONG_STEP)]
    rest = len(text) - len(text[end:].lstrip())
    tail_end = len(text.rstrip())
    if rest < tail_end:
        spans.append(_span(text, rest, tail_end, AFTER_ERROR))
    return text, spans


def steps_first_error(steps: Any, label: Any, after_error: str) -> tuple[str, list[dict], int]:
    """ProcessBench style: response = steps joined by a blank line, ``label`` = index of the first wrong step or -1.

    Returns the response, its spans (:func:`first_error_spans`) and the label as an int.
    """
    if not isinstance(steps, (list, tuple)) or not all(isinstance(step, str) for step in steps):
        raise BadAnnotation(f"steps must be a list of texts, got {type(steps).__name__}")
    label = _step_index(label)
    if not -1 <= label < len(steps):
        raise BadAnnotation(f"first-error index {label} is outside the {len(steps)} steps (use -1 for no error)")
    text = STEP_SEPARATOR.join(steps)
    if label == -1:
        return text, [], label
    start = sum(len(step) + len(STEP_SEPARATOR) for step in steps[:label])
    response, spans = first_error_spans(text, (start, start + len(steps[label])), after_error)
    return response, spans, label


def _step_index(label: Any) -> int:
    """An integer step index; text such as ``"-1"`` (a CSV cell) is read as a number."""
    try:
        if isinstance(label, str):
            return int(label.strip())
        if not isinstance(label, bool):
            return operator.index(label)
    except (TypeError, ValueError):
        pass
    raise BadAnnotation(f"first-error index {label!r} is not an integer (-1 for no error)")


def _span(text: str, start: int, end: int, kind: str) -> dict:
    return {"start": start, "end": end, "kind": kind, "text": text[start:end]}

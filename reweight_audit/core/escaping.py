"""Text the tool renders, escaped for the format it lands in: one function per output kind. Pure.

A run label comes from a file name or a manifest's model field, a span kind or
a ``--by-meta`` value from the user's records: any of them may hold markup.
Markdown pages (table.md, table1.md, robustness.md) get :func:`markdown_text`
for prose and table cells and :func:`markdown_code` inside backticks; CSV text
cells get :func:`csv_text` (spreadsheet formula prefixes); matplotlib text gets
:func:`plot_text` (mathtext ``$``). HTML uses :func:`html.escape` directly.
Each leaves plain text (letters, digits, ``-_./[]()``) exactly as it was.
"""
from __future__ import annotations

import re
from typing import Any

#: What a spreadsheet reads as the start of a formula (OWASP, "CSV injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def markdown_text(value: Any) -> str:
    """``value`` as text in Markdown prose or a table cell: no raw HTML, no cell break, one line."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_code(value: Any) -> str:
    """``value`` inside a code span (the backticks included): a fence longer than any backtick run inside."""
    text = str(value).replace("\r", " ").replace("\n", " ")
    runs = [len(run) for run in re.findall(r"`+", text)]
    if not runs:
        return f"`{text}`"
    fence = "`" * (max(runs) + 1)
    return f"{fence} {text} {fence}"


def csv_text(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula, prefixed with ``'``; anything else as it was. A sign
    alone (the verdicts ``=``, ``<``, ``>`` of agreement.csv) is no formula and stays."""
    if isinstance(value, str) and len(value) > 1 and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def plot_text(value: Any) -> str:
    """``value`` for a matplotlib title, label or legend: a ``$`` is a dollar sign, not mathtext."""
    return str(value).replace("$", r"\$")

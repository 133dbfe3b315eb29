"""Shared fixtures: a tiny model built from a config, noisy records with spans (no network).

Helpers that test modules import (writers, synthetic tables, references) live in helpers.py, not here."""
from __future__ import annotations

from pathlib import Path

import pytest

# the tiny model lives in the package, where the docstring examples use it too
from reweight_audit.testing import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def noisy_rows() -> list[dict]:
    rows = []
    texts = [
        ("How many?", "Let x be the umm number of strings. Then x_1 = 3 and the answer is 41."),
        ("Sum?", "We compute the basically sum of the first 10 odd numbers: it is 100."),
        ("Prob?", "Thus the probability is $\\frac{1}{2}$ and hence, you know, the value equals 7."),
        ("Clean", "The function f(x) = x^2 is convex."),
    ]
    for i, (prompt, response) in enumerate(texts):
        spans = []
        for word in ("umm", "basically", "you know"):
            at = response.find(word)
            if at >= 0:
                spans.append({"start": at, "end": at + len(word), "kind": "filler" if word != "basically" else "hedge", "text": word})
        rows.append({"id": f"s{i}", "prompt": prompt, "response": response, "clean_response": response, "spans": spans, "meta": {}})
    return rows


@pytest.fixture(scope="session")
def small_report_run(tmp_path_factory):
    """One small two-run compare shared by the report page tests (test_report_html.py, test_browser.py): its result
    and the folder it wrote (report.html, heatmap.html, ...)."""
    from helpers import small_report

    folder = tmp_path_factory.mktemp("small-report")
    return small_report(folder), folder / "out"

"""Shared fixtures: tiny models built from a config and tokenizers trained on the spot (no network)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

# the tiny model and tokenizer live in the package, where the docstring examples use them too
from reweight_audit.testing import CHAT_TEMPLATE, TRAINING_TEXT, save_tiny_model, train_tokenizer  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def write_noisy(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


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

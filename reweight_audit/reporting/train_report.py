"""The page of a ``reweight-audit train`` folder: ``report.html`` from what train wrote (audit.csv, run.json,
absorption.md), with its own audit figure. Called once, at the end of :func:`reweight_audit.training.run.run_train`.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from reweight_audit.core.io import read_json
from reweight_audit.reporting import pages
from reweight_audit.reporting.render import audit_figure

TRAIN_PAGE = "report.html"


def write_train_page(folder: Path) -> Path:
    """``folder/report.html`` from the train outputs in ``folder``; returns its path."""
    folder = Path(folder)
    run = read_json(folder / "run.json")
    config = run.get("config", {})
    k = float(config.get("k", 10.0))
    rows = pd.read_csv(folder / "audit.csv")
    png = pages.png_bytes(audit_figure(rows, k))
    setting = (f"{len(run.get('summary', []))} methods, {config.get('steps')} steps of {config.get('batch_size')} "
               f"sequences from {config.get('input')}, model {config.get('model')}, seed {config.get('seed')}")
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != TRAIN_PAGE)
    page = pages.train_page(run.get("summary", []), png, (folder / "absorption.md").read_text(encoding="utf-8"),
                            setting, k, files)
    path = folder / TRAIN_PAGE
    path.write_text(page, encoding="utf-8")
    return path

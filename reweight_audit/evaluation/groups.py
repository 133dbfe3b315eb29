"""``compare --by-meta FIELD``: every metric per value of a record's metadata field (say, the model that wrote it).

The stats table does not carry the records' metadata; the noisy JSONL that
``score`` read does (``meta``, see ``docs/formats.md``). The file is the
score manifest's ``input`` (or ``--records``), matched to the table by
record id. Each group is the pool restricted to the group's sequences; the
weights stay those computed on the whole table (batch-dependent methods see
the real batch), and every metric comes from :mod:`reweight_audit.evaluation.metrics`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reweight_audit.evaluation import metrics
from reweight_audit.evaluation.metrics import metric_headers, table_cells
from reweight_audit.core.errors import AuditError
from reweight_audit.core.escaping import markdown_text
from reweight_audit.evaluation.runs import RunData

#: The group of a record whose metadata lacks the field.
MISSING = "(none)"


def records_path(run: RunData, records: Path | None) -> Path:
    """The JSONL holding the run's records: ``records``, else the score manifest's input (as given when scoring,
    else beside the stats table)."""
    if records is not None:
        if not Path(records).is_file():
            raise AuditError(f"--records {records}: file not found; give the noisy JSONL the table was scored from")
        return Path(records)
    given = (run.manifest or {}).get("input")
    for candidate in ([Path(given), run.path.parent / Path(given).name] if given else []):
        if candidate.is_file():
            return candidate
    raise AuditError(f"{run.path}: --by-meta needs the records' metadata, and the score manifest names no input "
                     f"that exists ({given!r}); give --records noisy.jsonl")


def read_meta(path: Path) -> dict[str, dict]:
    """``id -> meta`` of every record of a noisy JSONL (lines that are not objects with an id are an error)."""
    meta: dict[str, dict] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                meta[str(record["id"])] = record.get("meta") or {}
            except (ValueError, KeyError, TypeError):
                raise AuditError(f"{path}:{number}: not a JSON object with an 'id'; give the noisy JSONL written by "
                                 "`reweight-audit inject`") from None
    return meta


def _label(value: Any) -> str:
    return MISSING if value is None else (value if isinstance(value, str) else json.dumps(value))


def sequence_groups(run: RunData, meta: dict[str, dict], field: str, path: Path) -> tuple[np.ndarray, list[str]]:
    """Per sequence code, its group's index in the sorted group names; every sequence must have a record."""
    missing = [name for name in run.seq_names if name not in meta]
    if missing:
        raise AuditError(f"{path}: no record with id {missing[0]!r} ({len(missing)} of the table's sequences are "
                         f"missing); give --records the noisy JSONL {run.path.name} was scored from")
    labels = [_label(meta[name].get(field)) for name in run.seq_names]
    if all(label == MISSING for label in labels):
        raise AuditError(f"--by-meta {field}: no record of {path} has this meta field")
    names = sorted(set(labels))
    return np.array([names.index(label) for label in labels], dtype=np.int64), names


def group_rows(run: RunData, weights: dict[str, np.ndarray], families: dict[str, str], field: str,
               groups: tuple[np.ndarray, list[str]], *, rank_by: list[str], scope: list[str], k: float,
               n_boot: int, seed: int) -> list[dict]:
    """Every metric at cut ``k`` (percent) per group × method × rank-by × scope, with bootstrap intervals."""
    codes, names = groups
    pool = run.pool
    logp = run.column("logp")
    sum_p2 = run.column("sum_p2") if "grad" in rank_by else None
    rows = []
    for gi, group in enumerate(names):
        sub = pool.subset(codes[pool.seq_codes] == gi)
        counts = {"group_by": field, "group": group, "n_tokens": sub.n_tokens, "n_noise": int(sub.is_noise.sum()),
                  "n_seqs": int(np.unique(sub.seq_codes).size),
                  "n_noise_seqs": int(np.unique(sub.seq_codes[sub.is_noise]).size)}
        for rb in rank_by:  # rows in the main table's order: rank-by, scope, method
            scores = {m: sub.take(metrics.rank_scores(w, rb, logp, sum_p2)) for m, w in weights.items()}
            for sc in scope:
                for method, s in scores.items():
                    row, _ = metrics.ranking_metrics(s, sub.is_noise, sub.seq_codes, k=k / 100.0, cuts=(),
                                                     scope=sc, n_boot=n_boot, seed=seed)
                    rows.append({"run": run.label, "method": method, "family": families.get(method, ""),
                                 "rank_by": rb, "scope": sc, "k": k, **counts, **row})
    return rows


def by_group_markdown(by_group: pd.DataFrame | None, k: float) -> str:
    """The table.md section: per run × rank-by × scope and group, every shown metric of every method."""
    if by_group is None or not len(by_group):
        return ""
    field = markdown_text(by_group["group_by"].iloc[0])
    lines = [f"## By {field}", "",
             f"Each group is the tokens of the sequences whose record has that `{field}`; weights as in the main "
             "table (computed on the whole table).", ""]
    for (run, rank_by, scope, group), block in by_group.groupby(["run", "rank_by", "scope", "group"], sort=False):
        first = block.iloc[0]
        lines += [f"### {field} = {markdown_text(group)} ({markdown_text(run)}, rank by {rank_by}, {scope}): {int(first['n_tokens']):,} tokens, "
                  f"{int(first['n_noise']):,} noise, {int(first['n_noise_seqs'])}/{int(first['n_seqs'])} sequences "
                  "with noise", "",
                  "| method | " + " | ".join(metric_headers(k)) + " |", "|---|" + "---:|" * len(metric_headers(k))]
        for _, row in block.iterrows():
            lines.append(f"| {markdown_text(row['method'])} | " + " | ".join(table_cells(row)) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"

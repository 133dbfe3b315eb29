"""``sweep --target table1``: which conventions, if any, reproduce RankTuner's Table 1?

Every setting of a sweep (run × rank-by × scope × k × noise × stratify × method parameters) is crossed
with every row-to-method map: each Table 1 row may stand for any registered member of its camp (the
registry's family: Entropy-Dominant → ``entropy``, Prob-Dominant → ``prob``, RankTuner → ``rank``; the
paper names no single method per camp). A candidate (setting, map) is scored by its **distance** to the
paper's nine figures (:data:`~reweight_audit.evaluation.table1.PAPER_TABLE1`): the mean absolute
difference over the nine, in percentage points; and by how many of the nine paper figures lie inside
our 95% bootstrap intervals (``within``, 0..9). The answer: whether any candidate has all nine within,
the closest candidates, and the conventions the closest share. Pure functions.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation.table1 import PAPER_TABLE1, TABLE1_METRICS

#: Table 1's row -> the registry family whose members may stand for it.
CAMPS = {"entropy": "entropy", "prob": "prob", "ranktuner": "rank"}
#: Targets ``sweep --target`` knows.
TARGETS = ("table1",)
#: How many closest candidates the report lists, and over how many the shared conventions are read.
TOP = 10


@dataclass
class TargetResult:
    """All candidates (``candidates``: one row per setting × map, closest first) and the summary."""

    candidates: pd.DataFrame
    setting: list[str]
    n_settings: int
    members: dict[str, list[str]]

    @property
    def any_all_within(self) -> bool:
        return bool(len(self.candidates) and (self.candidates["within"] == 3 * len(PAPER_TABLE1)).any())

    def closest(self, n: int = TOP) -> pd.DataFrame:
        return self.candidates.head(n)

    def shared(self, n: int = TOP) -> dict[str, tuple[str, float]]:
        """Per convention (setting column and map row), the most common value among the ``n`` closest and its share."""
        top = self.closest(n)
        out = {}
        for col in [*[c for c in self.setting if c != "run"], *[f"map_{r}" for r in PAPER_TABLE1]]:
            if col in top and len(top):
                counts = top[col].astype(str).value_counts()
                out[col] = (str(counts.index[0]), float(counts.iloc[0] / len(top)))
        return out


def row_terms(table: pd.DataFrame, setting: Sequence[str], row: str, members: Sequence[str]) -> pd.DataFrame:
    """Per setting and camp member: the summed absolute difference over the row's three figures (points) and how
    many of the paper's figures lie inside our intervals."""
    paper = PAPER_TABLE1[row][1]
    sub = table[table["method"].isin(members)]
    dist = sum((sub[m] - paper[m]).abs() * 100.0 for m in TABLE1_METRICS)
    within = sum(((sub[f"{m}_lo"] <= paper[m]) & (paper[m] <= sub[f"{m}_hi"])).astype(int) for m in TABLE1_METRICS)
    frame = sub[list(setting)].assign(**{f"map_{row}": sub["method"], f"dist_{row}": dist, f"within_{row}": within})
    return frame[np.isfinite(frame[f"dist_{row}"])]


def search_table1(table: pd.DataFrame, families: Mapping[str, str], setting: Sequence[str]) -> TargetResult:
    """Every setting × row-to-method map of the sweep table, closest to the paper's nine figures first."""
    missing = [f"{m}{s}" for m in TABLE1_METRICS for s in ("", "_lo", "_hi") if f"{m}{s}" not in table]
    if missing:
        raise AuditError(f"--target table1 needs the sweep's {', '.join(missing)} columns")
    members = {row: [m for m in dict.fromkeys(table["method"]) if families.get(m) == fam] for row, fam in CAMPS.items()}
    for row, names in members.items():
        if not names:
            raise AuditError(f"--target table1: no {CAMPS[row]}-family method was computed to stand for "
                             f"{PAPER_TABLE1[row][0]}; leave --methods out or add one")
    key = [c for c in setting]
    frame = None
    for row in PAPER_TABLE1:
        terms = row_terms(table, key, row, members[row])
        frame = terms if frame is None else frame.merge(terms, on=key, how="inner")
    n_fig = 3 * len(PAPER_TABLE1)
    frame["distance"] = sum(frame[f"dist_{r}"] for r in PAPER_TABLE1) / n_fig
    frame["within"] = sum(frame[f"within_{r}"] for r in PAPER_TABLE1)
    frame = frame.sort_values(["distance", "within"], ascending=[True, False], kind="stable").reset_index(drop=True)
    n_settings = int(len(table[key].drop_duplicates()))
    return TargetResult(candidates=frame, setting=key, n_settings=n_settings, members=members)


def _where(row: Mapping, setting: Sequence[str]) -> str:
    parts = [f"{c}={row[c]:g}%" if c == "k" else f"{c}={row[c]}" for c in setting]
    maps = ", ".join(f"{PAPER_TABLE1[r][0]}={row[f'map_{r}']}" for r in PAPER_TABLE1)
    return f"{', '.join(parts)}; {maps}"


def target_lines(target: TargetResult) -> list[str]:
    """The answer as plain lines (the command line prints them; robustness.md has the same in a section)."""
    n = len(target.candidates)
    lines = [f"table1 target: {target.n_settings} settings × row-to-method maps = {n} candidates; "
             + ("some candidate puts all nine figures within our 95% intervals"
                if target.any_all_within else "no candidate puts all nine figures within our 95% intervals")]
    for i, row in enumerate(target.closest().to_dict(orient="records"), 1):
        lines.append(f"  {i}. distance {row['distance']:.2f} points, {row['within']}/9 within: "
                     f"{_where(row, target.setting)}")
    shared = target.shared()
    lines.append("  shared by the closest: " + "; ".join(f"{c}={v} ({share:.0%})" for c, (v, share) in shared.items()))
    return lines

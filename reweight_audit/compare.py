"""``compare``: every weighting method against the injected noise.

Reads one or more token-statistics tables (``stats.parquet``), computes every
registered weighting method once per run, ranks the tokens by weight, loss
share or gradient share, and measures how much of the top set is noise
(DESIGN.md, "Metrics"). Results are DataFrames held in a
:class:`CompareResult`; :func:`run_compare` also writes the exports.

The computing functions here are pure (arrays in, numbers out); reading the
parquet files and writing the exports happen only in :func:`load_run` and
:func:`write_exports`.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reweight_audit import metrics as M
from reweight_audit.errors import AuditError

from reweight_audit.methods import (
    assign_batches,
    available_methods,
    compute_weights,
    get_method,
    load_method_file,
    missing_columns,
    parse_params,
)

#: Columns every stats table must have (identity and labels).
REQUIRED_COLUMNS = ("seq_id", "pos", "token", "logp", "is_noise")
#: Columns never handed to a weighting method: the noise labels are what the methods are judged against.
LABEL_COLUMNS = ("is_noise", "noise_kind")
RANK_BY = ("weight", "loss", "grad")
SCOPES = ("global", "sequence")
#: Metrics with a bootstrap interval in the main table.
INTERVAL_METRICS = ("tok_prec", "tok_rec", "seq_hit", "lift")
TOPK_METRICS = ("tok_prec", "tok_rec", "seq_hit", "lift")
#: Points per scatter / per distribution in the plots.
PLOT_POINTS = 50_000
#: Tokens of one sequence shown in heatmap.html.
HEATMAP_MAX_TOKENS = 600
#: Reference sample for the heatmap's per-method percentile normalisation.
PERCENTILE_SAMPLE = 200_000

EXPORT_FILES = (
    "table.csv",
    "table.md",
    "summary.json",
    "curves.csv",
    "by_kind.csv",
    "weights.parquet",
    "recall_curves.png",
    "rank_vs_prob.png",
    "expected_rank_vs_entropy.png",
    "weight_distributions.png",
    "heatmap.html",
)


# --------------------------------------------------------------------------- data


class _LazyColumns(Mapping):
    """The run's numeric columns as float64/int64 numpy arrays, read on first use."""

    def __init__(self, run: "RunData"):
        self._run = run

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._run.numeric_columns:
            raise KeyError(name)
        return self._run.column(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._run.numeric_columns)

    def __len__(self) -> int:
        return len(self._run.numeric_columns)


@dataclass
class RunData:
    """One stats table, decoded once."""

    label: str
    path: Path
    manifest: dict | None
    table: pa.Table
    seq_codes: np.ndarray  # int64 code per token
    seq_names: list[str]  # code -> seq_id
    is_noise: np.ndarray  # bool
    kind_codes: np.ndarray  # int32, -1 for clean tokens
    kinds: list[str]  # code -> noise kind
    numeric_columns: tuple[str, ...]
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def n_tokens(self) -> int:
        return int(self.table.num_rows)

    @property
    def columns(self) -> set[str]:
        return set(self.table.column_names)

    def column(self, name: str) -> np.ndarray:
        arr = self._cache.get(name)
        if arr is None:
            col = self.table.column(name)
            if pa.types.is_floating(col.type) or (pa.types.is_integer(col.type) and col.null_count):
                # nulls become NaN, which compute_weights reports against the method and column
                arr = col.cast(pa.float64()).to_numpy()
            elif pa.types.is_integer(col.type):
                arr = col.to_numpy().astype(np.int64, copy=False)
            elif pa.types.is_boolean(col.type):
                arr = col.fill_null(False).to_numpy()
            else:
                arr = col.to_numpy()
            self._cache[name] = arr
        return arr

    def stat_columns(self) -> Mapping[str, np.ndarray]:
        return _LazyColumns(self)

    def summary(self) -> dict:
        n = self.n_tokens
        n_noise = int(self.is_noise.sum())
        noisy_seq = np.bincount(self.seq_codes[self.is_noise], minlength=len(self.seq_names)) > 0
        kind_counts = np.bincount(self.kind_codes[self.kind_codes >= 0], minlength=len(self.kinds))
        return {
            "label": self.label,
            "path": str(self.path),
            "model": (self.manifest or {}).get("model"),
            "n_tokens": n,
            "n_noise": n_noise,
            "n_seqs": len(self.seq_names),
            "n_noise_seqs": int(noisy_seq.sum()),
            "base_rate": n_noise / n if n else math.nan,
            "noise_kinds": {k: int(c) for k, c in zip(self.kinds, kind_counts)},
            "columns": sorted(self.columns),
        }


@dataclass
class CompareResult:
    """Everything ``compare`` produced. Metric values are fractions (0..1)."""

    table: pd.DataFrame
    curves: pd.DataFrame
    by_kind: pd.DataFrame
    skipped: list[dict]  # {"run", "method", "reason"}
    runs: list[dict]
    config: dict
    k: float  # percent
    files: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # per run (in ``runs`` order): method name -> float64 weight per token, in the stats table's row order
    weights: list[dict[str, np.ndarray]] = field(default_factory=list)


# --------------------------------------------------------------------------- loading


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def _read_manifest(path: Path) -> dict | None:
    mpath = _manifest_path(path)
    if not mpath.exists():
        return None
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuditError(f"{mpath}: not valid JSON ({exc}); fix or delete the manifest") from None
    return data if isinstance(data, dict) else None


def _model_label(model: Any) -> str | None:
    if not model or not isinstance(model, str):
        return None
    p = Path(model)
    # a local path (directory or .gguf file) is labelled by its last part
    return p.name if (p.is_absolute() or model.endswith(".gguf")) else model


def _dictionary_codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    enc = pc.dictionary_encode(col.combine_chunks() if col.num_chunks != 1 else col.chunk(0))
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    codes = enc.indices.to_numpy(zero_copy_only=False)
    names = enc.dictionary.to_pylist()
    return codes, names


def load_run(path: Path | str, label: str | None = None) -> RunData:
    """Read and validate one stats table. Raises AuditError on any problem."""
    path = Path(path)
    if not path.exists():
        raise AuditError(f"{path}: file not found; give the stats.parquet written by `reweight-audit score`")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for non-parquet input
        detail = (str(exc).splitlines() or [""])[0]
        raise AuditError(
            f"{path}: not a readable parquet file ({type(exc).__name__}: {detail}); "
            "give the stats.parquet written by `reweight-audit score`"
        ) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise AuditError(
            f"{path}: not a reweight-audit stats table, missing column(s) {', '.join(missing)}; "
            "rerun `reweight-audit score` to write the current format"
        )
    if table.num_rows == 0:
        raise AuditError(f"{path}: the stats table has no rows; score a corpus with at least one response token")
    manifest = _read_manifest(path)

    logp_col = table.column("logp")
    if not (pa.types.is_floating(logp_col.type) or pa.types.is_integer(logp_col.type)):
        raise AuditError(f"{path}: column logp has type {logp_col.type}, expected float; rerun `reweight-audit score`")
    if logp_col.null_count:
        raise AuditError(f"{path}: column logp has {logp_col.null_count} null value(s); rerun `reweight-audit score`")

    if table.column("seq_id").null_count:
        raise AuditError(f"{path}: column seq_id has null values; every token needs its sequence id")
    seq_codes, seq_names = _dictionary_codes(table.column("seq_id").cast(pa.string()))
    noise_col = table.column("is_noise")
    if not (pa.types.is_boolean(noise_col.type) or pa.types.is_integer(noise_col.type)):
        raise AuditError(f"{path}: column is_noise has type {noise_col.type}, expected bool; "
                         "rerun `reweight-audit score` on the labelled jsonl")
    is_noise = noise_col.fill_null(False).to_numpy(zero_copy_only=False).astype(bool, copy=False)

    if "noise_kind" in table.column_names:
        kcol = table.column("noise_kind").cast(pa.string()).fill_null("")
        kcodes, knames = _dictionary_codes(kcol)
    else:
        kcodes, knames = np.zeros(table.num_rows, dtype=np.int32), [""]
    # noise tokens without a kind are grouped as "unlabelled"; clean tokens get -1
    names = [n if n else "unlabelled" for n in knames]
    kind_codes = np.where(is_noise, kcodes, -1).astype(np.int32)
    used = np.unique(kind_codes[kind_codes >= 0])
    remap = np.full(len(names), -1, dtype=np.int32)
    kinds = sorted({names[i] for i in used})
    for i in used:
        remap[i] = kinds.index(names[i])
    kind_codes = np.where(kind_codes >= 0, remap[np.maximum(kind_codes, 0)], -1).astype(np.int32)

    # what methods may read: every numeric column (statistics, pos, token_id, extra columns a third-party
    # method may need) except the labels
    numeric = tuple(
        c
        for c in table.column_names
        if c not in LABEL_COLUMNS
        and (pa.types.is_floating(table.schema.field(c).type) or pa.types.is_integer(table.schema.field(c).type))
    )
    run = RunData(
        label=label or "",
        path=path,
        manifest=manifest,
        table=table,
        seq_codes=seq_codes.astype(np.int64, copy=False),
        seq_names=[str(s) for s in seq_names],
        is_noise=is_noise,
        kind_codes=kind_codes,
        kinds=kinds,
        numeric_columns=numeric,
    )
    logp = run.column("logp")
    bad = ~np.isfinite(logp)
    if bad.any():
        raise AuditError(f"{path}: column logp has {int(bad.sum())} non-finite value(s); rerun `reweight-audit score`")
    if logp.max() > 1e-3:
        raise AuditError(f"{path}: column logp has positive values (max {logp.max():.3g}); logp must be log p ≤ 0")
    return run


def run_labels(paths: list[Path], manifests: list[dict | None]) -> list[str]:
    """Manifest model name, else file stem; made unique with the parent folder or an index."""
    base = []
    for p, m in zip(paths, manifests):
        base.append(_model_label((m or {}).get("model")) or p.stem)
    labels = list(base)
    for i, lab in enumerate(base):
        if base.count(lab) > 1:
            where = f"{paths[i].parent.name}/{paths[i].stem}" if paths[i].parent.name else paths[i].stem
            labels[i] = f"{lab} [{where}]"
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            seen[lab] = seen.get(lab, 0) + 1
            labels[i] = f"{lab} #{seen[lab]}"
    return labels


# --------------------------------------------------------------------------- pure computing


def grad_norm(logp: np.ndarray, sum_p2: np.ndarray) -> np.ndarray:
    """‖∂ℓ/∂z‖ of cross-entropy: sqrt((1 − p)² + Σp² − p²), radicand clipped at 0."""
    p = np.exp(np.asarray(logp, dtype=np.float64))
    rad = (1.0 - p) ** 2 + np.asarray(sum_p2, dtype=np.float64) - p * p
    return np.sqrt(np.maximum(rad, 0.0))


def rank_scores(weights: np.ndarray, rank_by: str, logp: np.ndarray | None = None,
                sum_p2: np.ndarray | None = None) -> np.ndarray:
    """What "high weight" means: ``weight`` w, ``loss`` w·(−log p), ``grad`` w·‖∂ℓ/∂z‖."""
    w = np.asarray(weights, dtype=np.float64)
    if rank_by == "weight":
        return w
    if rank_by == "loss":
        nll = -np.minimum(np.asarray(logp, dtype=np.float64), 0.0)
        return w * nll
    if rank_by == "grad":
        return w * grad_norm(logp, sum_p2)
    raise AuditError(f"--rank-by {rank_by!r} is not known; use one of {', '.join(RANK_BY)}")


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _lookup_cut(crv: Mapping, cut: float) -> dict | None:
    if cut in crv:
        return crv[cut]
    for key, val in crv.items():
        if abs(float(key) - cut) < 1e-12:
            return val
    return None


def _n_top(k: float, n: int) -> int:
    """Top-set size, the metrics module's rule: floor(k·n + 1/2), k·n rounded to 6 decimals first."""
    return int(math.floor(round(k * n, 6) + 0.5))


def _hit_prob(g: np.ndarray, t: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(≥ 1 of b marked tokens among t drawn from g tied ones) = 1 − Π_{i<b} (1 − t/(g−i))."""
    g, t, b = (np.asarray(v, dtype=np.int64) for v in (g, t, b))
    out = np.zeros(g.shape, dtype=np.float64)
    sure = b > g - t
    out[sure] = 1.0
    todo = np.flatnonzero(~sure & (b > 0) & (t > 0))
    if todo.size:
        bb = b[todo]
        unit = np.repeat(np.arange(todo.size), bb)
        i = np.arange(unit.size) - np.repeat(np.cumsum(bb) - bb, bb)
        terms = np.log1p(-t[todo][unit] / (g[todo][unit] - i))
        out[todo] = -np.expm1(np.bincount(unit, weights=terms, minlength=todo.size))
    return out


class ScoreIndex:
    """One ascending sort of a score vector, shared by AUROC, AP and the per-kind top-k metrics.

    Every quantity these need is a count of tokens by value ("how many clean tokens score below v"), which a
    sorted copy of all scores and a sorted copy of the (few) noise scores answer with binary searches. The
    pool for a positive set P is the clean tokens plus P: all noise (the main table) or one noise kind
    (by_kind.csv, where the other kinds leave the pool). Definitions and tie rules are the metrics module's;
    tests hold the two to equality.
    """

    def __init__(self, scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, kind_codes: np.ndarray):
        scores = np.asarray(scores, dtype=np.float64)
        self.asc = np.sort(scores)
        idx = np.flatnonzero(is_noise)
        sn = scores[idx]
        order = np.argsort(sn, kind="stable")
        self.noise_asc = sn[order]
        self.noise_seq = np.asarray(seq_codes)[idx][order]
        self.noise_kind = np.asarray(kind_codes)[idx][order]
        self.n = int(scores.size)
        self.n_clean = self.n - int(idx.size)

    def positives(self, kind: int | None) -> tuple[np.ndarray, np.ndarray]:
        if kind is None:
            return self.noise_asc, self.noise_seq
        sel = self.noise_kind == kind
        return self.noise_asc[sel], self.noise_seq[sel]

    def _clean_lt(self, v):
        return self.asc.searchsorted(v, "left") - self.noise_asc.searchsorted(v, "left")

    def _clean_le(self, v):
        return self.asc.searchsorted(v, "right") - self.noise_asc.searchsorted(v, "right")

    def rank_metrics(self, kind: int | None = None) -> dict:
        """AUROC (Mann-Whitney, ties half) and AP (one threshold per distinct score) of P against clean."""
        p, _ = self.positives(kind)
        n_p, n_c = int(p.size), self.n_clean
        if n_p == 0:
            return {"auroc": math.nan, "ap": math.nan}
        first = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
        v = p[first]
        mult = np.diff(np.r_[first, n_p])
        below = self._clean_lt(v)
        tied = self._clean_le(v) - below
        auroc = float(np.sum(mult * (2 * below + tied))) / (2.0 * n_p * n_c) if n_c else math.nan
        tp = n_p - first
        ap = float(np.sum(mult * (tp / (tp + (n_c - below))))) / n_p
        return {"auroc": auroc, "ap": ap}

    def topk_global(self, k: float, kind: int | None = None) -> dict:
        """tok_prec, tok_rec, seq_hit, lift of the global top-k of the pool clean ∪ P (ties fractional)."""
        p, p_seq = self.positives(kind)
        n_p, n_c = int(p.size), self.n_clean
        n_pool = n_c + n_p
        n_top = _n_top(k, n_pool)
        nan = math.nan
        if n_top == 0:
            return {"tok_prec": nan, "tok_rec": 0.0 if n_p else nan, "seq_hit": 0.0 if n_p else nan, "lift": nan}

        def pool_ge(v):
            return (n_c - self._clean_lt(v)) + (n_p - int(p.searchsorted(v, "left")))

        lo, hi = 0, self.n - 1  # largest i with pool_ge(asc[i]) >= n_top; asc[lo] is then a pool value
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if pool_ge(self.asc[mid]) >= n_top:
                lo = mid
            else:
                hi = mid - 1
        c = self.asc[lo]
        p_lo, p_hi = int(p.searchsorted(c, "left")), int(p.searchsorted(c, "right"))
        above = (n_c - int(self._clean_le(c))) + (n_p - p_hi)
        tied = pool_ge(c) - above
        slots = n_top - above
        frac = slots / tied
        found = (n_p - p_hi) + (p_hi - p_lo) * frac
        prec = found / n_top
        if n_p == 0:
            return {"tok_prec": prec, "tok_rec": nan, "seq_hit": nan, "lift": nan}
        noisy, inv = np.unique(p_seq, return_inverse=True)
        best = np.full(noisy.size, -np.inf)
        np.maximum.at(best, inv, p)
        hit = (best > c).astype(np.float64)
        at = best == c
        if at.any():
            b = np.bincount(inv[p_lo:p_hi], minlength=noisy.size)[at]
            hit[at] = _hit_prob(np.full(b.size, tied), np.full(b.size, slots), b)
        return {"tok_prec": prec, "tok_rec": found / n_p, "seq_hit": float(hit.mean()),
                "lift": prec / (n_p / n_pool)}


def evaluate_scores(scores: np.ndarray, is_noise: np.ndarray, seq_codes: np.ndarray, *,
                    k_frac: float, scope: str, cuts: tuple[float, ...], n_boot: int,
                    seed: int) -> tuple[dict, dict]:
    """Main-k metrics (with bootstrap bounds) and the curve over ``cuts``, one scope."""
    all_cuts = tuple(sorted(set(cuts) | {k_frac}))
    crv = M.curve(scores, is_noise, seq_codes, all_cuts, scope)
    main = _lookup_cut(crv, k_frac)
    if main is None:  # pragma: no cover - curve keyed differently than asked
        main = M.topk_metrics(scores, is_noise, seq_codes, k_frac, scope)
    row = {name: _f(main.get(name)) for name in TOPK_METRICS}
    boot = {}
    if n_boot and n_boot > 0:
        boot = M.bootstrap_intervals(scores, is_noise, seq_codes, k_frac, scope, weights=scores,
                                     n_boot=n_boot, seed=seed)
    for name in INTERVAL_METRICS:
        lo, hi = boot.get(name, (math.nan, math.nan))
        row[f"{name}_lo"], row[f"{name}_hi"] = _f(lo), _f(hi)
    for name, bounds in boot.items():
        if name not in INTERVAL_METRICS:
            row[f"{name}_lo"], row[f"{name}_hi"] = _f(bounds[0]), _f(bounds[1])
    curve_rows = {}
    for c in all_cuts:
        vals = _lookup_cut(crv, c) or {}
        curve_rows[c] = {name: _f(vals.get(name)) for name in TOPK_METRICS}
    return row, curve_rows


def rank_free_metrics(scores: np.ndarray, is_noise: np.ndarray, index: ScoreIndex | None = None) -> dict:
    """AUROC, AP and noise mass: independent of k and scope."""
    mass, ratio = M.noise_mass(scores, is_noise)
    if index is not None:
        rm = index.rank_metrics(None)
    elif hasattr(M, "rank_metrics"):
        rm = M.rank_metrics(scores, is_noise)
    else:
        rm = {"auroc": M.auroc(scores, is_noise), "ap": M.average_precision(scores, is_noise)}
    return {"auroc": _f(rm["auroc"]), "ap": _f(rm["ap"]), "noise_mass": _f(mass), "noise_mass_ratio": _f(ratio)}


def by_kind_rows(scores: np.ndarray, run: RunData, *, k_frac: float, scope: str,
                 index: ScoreIndex | None = None) -> list[dict]:
    """Per noise kind: positives = that kind's tokens, pool = clean tokens + that kind's tokens.

    Global scope and AUROC/AP come from the shared sort (``index``); sequence scope runs the metrics module on
    each kind's pool.
    """
    if not run.kinds:
        return []
    if index is None:
        index = ScoreIndex(scores, run.is_noise, run.seq_codes, run.kind_codes)
    rows = []
    clean = ~run.is_noise
    n_clean = int(clean.sum())
    noise_idx = np.flatnonzero(run.is_noise)
    kind_w = np.bincount(run.kind_codes[noise_idx], weights=scores[noise_idx], minlength=len(run.kinds))
    clean_w = float(scores[clean].sum())
    for ki, kind in enumerate(run.kinds):
        if scope == "global":
            vals = index.topk_global(k_frac, ki)
            n_kind = int(np.count_nonzero(index.noise_kind == ki))
        else:
            pos = run.kind_codes == ki
            pool = clean | pos
            vals = M.topk_metrics(scores[pool], pos[pool], run.seq_codes[pool], k_frac, scope)
            n_kind = int(pos.sum())
        total = clean_w + kind_w[ki]
        share = kind_w[ki] / total if total > 0 else math.nan
        base = n_kind / (n_clean + n_kind)
        row = {"kind": kind, "n_kind": n_kind, "n_pool": n_clean + n_kind}
        row.update({name: _f(vals.get(name)) for name in TOPK_METRICS})
        row.update({name: _f(v) for name, v in index.rank_metrics(ki).items()})
        row.update({"noise_mass": _f(share), "noise_mass_ratio": _f(share / base) if base > 0 else math.nan})
        rows.append(row)
    return rows


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def plot_sample(run: RunData, seed: int, limit: int = PLOT_POINTS) -> dict:
    """≤ limit tokens of a run for the scatter plots (noise kept in proportion)."""
    rng = np.random.default_rng(seed)
    idx = _subsample(run.n_tokens, limit, rng)
    out = {"label": run.label, "is_noise": run.is_noise[idx], "p": np.exp(run.column("logp")[idx])}
    for name in ("entropy", "rank", "expected_rank"):
        out[name] = run.column(name)[idx] if name in run.numeric_columns else None
    return out


def weight_sample(weights: np.ndarray, is_noise: np.ndarray, seed: int, limit: int = PLOT_POINTS) -> dict:
    """≤ limit weights of each class for the distribution plot."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, mask in (("noise", is_noise), ("clean", ~is_noise)):
        idx = np.flatnonzero(mask)
        if len(idx) > limit:
            idx = rng.choice(idx, size=limit, replace=False)
        out[name] = weights[idx]
    return out


def choose_heatmap_sequences(run: RunData, n: int, seed: int) -> list[int]:
    """Seeded choice of sequence codes, sequences with noise first."""
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    n_seqs = len(run.seq_names)
    noisy = np.flatnonzero(np.bincount(run.seq_codes[run.is_noise], minlength=n_seqs) > 0)
    chosen = list(rng.permutation(noisy)[:n]) if len(noisy) else []
    if len(chosen) < n:
        clean = np.setdiff1d(np.arange(n_seqs), noisy)
        chosen += list(rng.permutation(clean)[: n - len(chosen)])
    return sorted(int(c) for c in chosen)


def percentile_of(values: np.ndarray, reference_sorted: np.ndarray) -> np.ndarray:
    """Mid-rank percentile (0..1) of ``values`` within a sorted reference."""
    n = len(reference_sorted)
    if n == 0:
        return np.full(len(values), 0.5)
    lo = np.searchsorted(reference_sorted, values, side="left")
    hi = np.searchsorted(reference_sorted, values, side="right")
    return (lo + hi) / (2.0 * n)


def heatmap_run_data(run: RunData, seq_codes: list[int], weights: Mapping[str, np.ndarray],
                     seed: int) -> dict:
    """Tokens, statistics and per-method weights (raw and percentile) of the chosen sequences."""
    rng = np.random.default_rng(seed)
    sel = np.flatnonzero(np.isin(run.seq_codes, np.asarray(seq_codes, dtype=np.int64)))
    pos = run.column("pos")[sel]
    order = np.lexsort((pos, run.seq_codes[sel]))
    sel = sel[order]
    ref_idx = _subsample(run.n_tokens, PERCENTILE_SAMPLE, rng)
    refs = {m: np.sort(w[ref_idx]) for m, w in weights.items()}
    tokens = run.table.column("token").take(pa.array(sel)).to_pylist()
    stats = {}
    stats["p"] = np.exp(run.column("logp")[sel])
    for name, key in (("entropy", "H"), ("rank", "R"), ("expected_rank", "ER")):
        if name in run.numeric_columns:
            stats[key] = run.column(name)[sel]
    seqs = []
    codes_sel = run.seq_codes[sel]
    bounds = np.flatnonzero(np.diff(codes_sel)) + 1
    for chunk in np.split(np.arange(len(sel)), bounds):
        if len(chunk) == 0:
            continue
        truncated = len(chunk) > HEATMAP_MAX_TOKENS
        chunk = chunk[:HEATMAP_MAX_TOKENS]
        rows = sel[chunk]
        seq = {
            "seq_id": run.seq_names[int(codes_sel[chunk[0]])],
            "truncated": bool(truncated),
            "tokens": [tokens[i] if tokens[i] is not None else "" for i in chunk],
            "noise": [bool(x) for x in run.is_noise[rows]],
            "kind": [run.kinds[c] if c >= 0 else "" for c in run.kind_codes[rows]],
            "stats": {key: [_json_num(v) for v in arr[chunk]] for key, arr in stats.items()},
            "w": {m: [_json_num(v) for v in w[rows]] for m, w in weights.items()},
            "pct": {m: [round(float(v), 4) for v in percentile_of(w[rows], refs[m])] for m, w in weights.items()},
        }
        seqs.append(seq)
    return {"label": run.label, "methods": list(weights), "seqs": seqs}


def _json_num(v: Any) -> float | None:
    v = float(v)
    if not math.isfinite(v):
        return None
    return float(f"{v:.6g}")


# --------------------------------------------------------------------------- orchestration


def _split_list(values: list[str] | str | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        out.extend(x.strip() for x in str(v).split(",") if x.strip())
    return out


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


@dataclass
class _MethodContext:
    run: RunData
    cols: Mapping[str, np.ndarray]
    batch: np.ndarray | None
    param_map: dict
    rank_by: list[str]
    scope: list[str]
    k: float
    k_frac: float
    cuts: tuple[float, ...]
    n_boot: int
    seed: int
    base: dict


def _evaluate_method(ctx: _MethodContext, method: Any) -> dict:
    """Weights of one method and every rank-by × scope result for it (pure; run in a worker thread)."""
    run = ctx.run
    t0 = time.perf_counter()
    batch_dep = bool(getattr(method, "batch_dependent", False))
    w = compute_weights(method, ctx.cols, params=ctx.param_map.get(method.name),
                        batch=ctx.batch if batch_dep else None, seed=ctx.seed)
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (run.n_tokens,):
        raise AuditError(f"method {method.name}: returned {w.shape} weights for {run.n_tokens} tokens; "
                         "a method must return one weight per token")
    t_weights = time.perf_counter() - t0
    t0 = time.perf_counter()
    logp = run.column("logp")
    sum_p2 = run.column("sum_p2") if "grad" in ctx.rank_by else None
    table, curves, kinds = [], [], []
    base = ctx.base
    for rb in ctx.rank_by:
        scores = rank_scores(w, rb, logp, sum_p2)
        index = ScoreIndex(scores, run.is_noise, run.seq_codes, run.kind_codes)
        free = rank_free_metrics(scores, run.is_noise, index)
        for sc in ctx.scope:
            main, crv = evaluate_scores(scores, run.is_noise, run.seq_codes, k_frac=ctx.k_frac, scope=sc,
                                        cuts=ctx.cuts, n_boot=ctx.n_boot, seed=ctx.seed)
            ident = {"run": run.label, "method": method.name, "family": getattr(method, "family", ""),
                     "rank_by": rb, "scope": sc}
            table.append({**ident, "k": ctx.k, **main, **free, "n_tokens": base["n_tokens"],
                          "n_noise": base["n_noise"], "n_seqs": base["n_seqs"],
                          "n_noise_seqs": base["n_noise_seqs"], "base_rate": base["base_rate"]})
            for c, vals in crv.items():
                curves.append({**ident, "k": round(c * 100.0, 10), **vals})
            for kr in by_kind_rows(scores, run, k_frac=ctx.k_frac, scope=sc, index=index):
                kinds.append({**ident, "k": ctx.k, **kr})
    return {"weights": w, "table": table, "curves": curves, "by_kind": kinds, "t_weights": t_weights,
            "t_metrics": time.perf_counter() - t0}


def _workers(workers: int | None) -> int:
    """Threads for the per-method work: NumPy's sorts and reductions release the GIL."""
    if workers is None:
        return max(1, min(4, os.cpu_count() or 1))
    return max(1, int(workers))


def _map_ordered(fn, items: list, n_workers: int) -> Iterator:
    """fn over items, results in input order; the first exception propagates."""
    if n_workers <= 1 or len(items) <= 1:
        for it in items:
            yield fn(it)
        return
    with ThreadPoolExecutor(max_workers=n_workers) as ex:
        futures = [ex.submit(fn, it) for it in items]
        try:
            for fut in futures:
                yield fut.result()
        finally:
            for fut in futures:
                fut.cancel()


def run_compare(
    stats_paths: list[Path],
    out_dir: Path,
    *,
    methods: list[str] | None = None,
    rank_by: list[str] = ["weight"],  # noqa: B006 - read only
    k: float = 10.0,
    scope: list[str] = ["global"],  # noqa: B006 - read only
    params: list[str] = [],  # noqa: B006 - read only
    method_files: list[Path] = [],  # noqa: B006 - read only
    batch_seqs: int = 256,
    n_boot: int = 200,
    seed: int = 0,
    heatmap_sequences: int = 12,
    write: bool = True,
    workers: int | None = None,
    progress: Any = None,
) -> CompareResult:
    """Compare every method on every stats table and write the exports into ``out_dir``.

    ``k`` is in percent, (0, 100]. ``methods=None`` takes every registered
    method whose columns exist (the others are listed in ``skipped``); a method
    named explicitly whose columns are missing is an error. ``progress`` is an
    optional callable ``progress(message)`` for the command line (called from
    this thread only). ``workers`` threads evaluate methods side by side
    (default: up to 4, one per CPU); results do not depend on it.
    ``write=False`` computes without writing anything.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    say = progress or (lambda _msg: None)

    # ---- configuration
    try:
        k = float(k)
    except (TypeError, ValueError):
        raise AuditError(f"--k {k!r}: give a percentage in (0, 100], e.g. --k 10") from None
    if not (0.0 < k <= 100.0) or not math.isfinite(k):
        raise AuditError(f"--k {k:g}: the cut is a percentage in (0, 100], e.g. --k 10 for the top 10%")
    k_frac = k / 100.0
    rank_by = _dedupe(_split_list(rank_by)) or ["weight"]
    for rb in rank_by:
        if rb not in RANK_BY:
            raise AuditError(f"--rank-by {rb!r} is not known; use one of {', '.join(RANK_BY)}")
    scope = _dedupe(_split_list(scope)) or ["global"]
    for sc in scope:
        if sc not in SCOPES:
            raise AuditError(f"--scope {sc!r} is not known; use one of {', '.join(SCOPES)}")
    if int(batch_seqs) < 1:
        raise AuditError(f"--batch-seqs {batch_seqs}: give a positive number of sequences per batch")
    if int(n_boot) < 0:
        raise AuditError(f"--n-boot {n_boot}: give 0 (no intervals) or a positive number of resamples")
    stats_paths = [Path(p) for p in (stats_paths if isinstance(stats_paths, (list, tuple)) else [stats_paths])]
    if not stats_paths:
        raise AuditError("compare: give at least one stats.parquet")

    for mf in method_files or []:
        load_method_file(Path(mf))
    param_map = parse_params(list(params or []))
    explicit = methods is not None
    if explicit:
        names = _dedupe(_split_list(methods))
        if not names:
            raise AuditError("--methods is empty; give method names (see `reweight-audit methods`) or leave it out")
        method_list = [get_method(n) for n in names]
    else:
        method_list = list(available_methods())
    method_names = {m.name for m in method_list}
    for pname in param_map:
        if pname not in method_names:  # it would silently do nothing
            raise AuditError(f"--param {pname}.…: method {pname} is not in --methods; add it there or drop "
                             "the parameter")

    # ---- runs
    t0 = time.perf_counter()
    runs = [load_run(p) for p in stats_paths]
    for run, label in zip(runs, run_labels(stats_paths, [r.manifest for r in runs])):
        run.label = label
    if "grad" in rank_by:
        for run in runs:
            if "sum_p2" not in run.numeric_columns:
                raise AuditError(
                    f"{run.path}: --rank-by grad needs column sum_p2, which this table lacks; "
                    "rerun `reweight-audit score` or rank by weight/loss"
                )
    timings["load"] = time.perf_counter() - t0

    cuts = tuple(float(c) for c in M.CUTS)
    table_rows: list[dict] = []
    curve_rows: list[dict] = []
    kind_rows: list[dict] = []
    skipped: list[dict] = []
    run_weights: list[dict[str, np.ndarray]] = []
    plot_samples: list[dict] = []
    weight_samples: list[dict] = []
    heatmap_runs: list[dict] = []
    t_weights = t_metrics = 0.0

    n_workers = _workers(workers)
    for ri, run in enumerate(runs):
        base = run.summary()
        say(f"{run.label}: {base['n_tokens']:,} tokens, {base['n_noise']:,} noise")
        weights: dict[str, np.ndarray] = {}
        todo = []
        for method in method_list:
            miss = list(missing_columns(method, run.numeric_columns))
            if miss:
                if explicit:
                    hint = " or score with --ref-model" if "ref_logp" in miss else ""
                    raise AuditError(
                        f"{run.path}: method {method.name} needs column(s) {', '.join(miss)}, which the table "
                        f"lacks; drop it from --methods{hint}"
                    )
                skipped.append({"run": run.label, "method": method.name,
                                "reason": f"needs column(s) {', '.join(miss)}, absent from {run.path.name}"})
                continue
            todo.append(method)
        # shared inputs, prepared once before the workers start
        cols = run.stat_columns()
        for name in cols:
            cols[name]
        batch = None
        if any(getattr(m, "batch_dependent", False) for m in todo):
            batch = np.asarray(assign_batches(run.seq_codes, int(batch_seqs), seed))
        ctx = _MethodContext(run=run, cols=cols, batch=batch, param_map=param_map, rank_by=rank_by, scope=scope,
                             k=k, k_frac=k_frac, cuts=cuts, n_boot=int(n_boot), seed=seed, base=base)
        for method, out in zip(todo, _map_ordered(lambda m: _evaluate_method(ctx, m), todo, n_workers)):
            say(f"{run.label}: {method.name} done")
            weights[method.name] = out["weights"]
            table_rows.extend(out["table"])
            curve_rows.extend(out["curves"])
            kind_rows.extend(out["by_kind"])
            t_weights += out["t_weights"]
            t_metrics += out["t_metrics"]
        run_weights.append(weights)
        t0 = time.perf_counter()
        if write:
            plot_samples.append(plot_sample(run, seed))
            weight_samples.append({"label": run.label,
                                   "methods": {m: weight_sample(w, run.is_noise, seed) for m, w in weights.items()}})
            heatmap_runs.append(heatmap_run_data(run, choose_heatmap_sequences(run, int(heatmap_sequences), seed),
                                                 weights, seed))
        timings["samples"] = timings.get("samples", 0.0) + time.perf_counter() - t0
    timings["weights"] = t_weights
    timings["metrics"] = t_metrics

    # Table-1 blocks: run, then rank-by, then scope, methods in registration order within each block
    order = {"run": [r.label for r in runs], "rank_by": rank_by, "scope": scope,
             "method": [m.name for m in method_list]}
    table_rows = _block_sorted(table_rows, order)
    curve_rows = _block_sorted(curve_rows, order)
    kind_rows = _block_sorted(kind_rows, order)
    table = pd.DataFrame(table_rows, columns=_table_columns(table_rows))
    curves = pd.DataFrame(curve_rows, columns=["run", "method", "family", "rank_by", "scope", "k", *TOPK_METRICS])
    by_kind = pd.DataFrame(kind_rows, columns=["run", "method", "family", "rank_by", "scope", "k", "kind", "n_kind",
                                               "n_pool", *TOPK_METRICS, "auroc", "ap", "noise_mass",
                                               "noise_mass_ratio"])
    config = {
        "stats_paths": [str(p) for p in stats_paths],
        "methods": [m.name for m in method_list] if explicit else None,
        "rank_by": rank_by,
        "k": k,
        "scope": scope,
        "params": list(params or []),
        "method_files": [str(p) for p in (method_files or [])],
        "batch_seqs": int(batch_seqs),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "heatmap_sequences": int(heatmap_sequences),
        "cuts": [c * 100.0 for c in cuts],
        "tie_rule": "fractional (expected value under random tie-breaking)",
        "noise_mass_of": "the ranking score (w, w·nll or w·grad norm, per rank_by)",
    }
    result = CompareResult(table=table, curves=curves, by_kind=by_kind, skipped=skipped,
                           runs=[{**r.summary(), "manifest": r.manifest} for r in runs], config=config, k=k,
                           timings=timings, weights=run_weights)
    if write:
        t0 = time.perf_counter()
        write_exports(result, Path(out_dir), runs=runs, run_weights=run_weights, plot_samples=plot_samples,
                      weight_samples=weight_samples, heatmap_runs=heatmap_runs)
        timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return result


def _block_sorted(rows: list[dict], order: dict[str, list[str]]) -> list[dict]:
    keys = ("run", "rank_by", "scope", "method")
    pos = {key: {v: i for i, v in enumerate(order[key])} for key in keys}
    return sorted(rows, key=lambda r: tuple(pos[key].get(r[key], len(pos[key])) for key in keys))


def _table_columns(rows: list[dict]) -> list[str]:
    head = ["run", "method", "family", "rank_by", "scope", "k"]
    cols = list(head)
    for name in TOPK_METRICS:
        cols += [name, f"{name}_lo", f"{name}_hi"]
    cols += ["auroc", "ap", "noise_mass", "noise_mass_ratio", "n_tokens", "n_noise", "n_seqs", "n_noise_seqs",
             "base_rate"]
    extra = []
    for r in rows:
        for key in r:
            if key not in cols and key not in extra:
                extra.append(key)
    return cols + extra


# --------------------------------------------------------------------------- exports


def _records(df: pd.DataFrame) -> list[dict]:
    out = []
    for rec in df.to_dict(orient="records"):
        out.append({key: _clean_json(v) for key, v in rec.items()})
    return out


def _clean_json(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _clean_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean_json(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, Path):
        return str(v)
    return v


def weights_table(runs: list[RunData], run_weights: list[dict[str, np.ndarray]]) -> pa.Table:
    """run, seq_id, pos, token, is_noise, noise_kind and one float32 column per method."""
    all_methods = _dedupe([m for w in run_weights for m in w])
    parts = []
    for run, weights in zip(runs, run_weights):
        t = run.table
        n = t.num_rows
        cols = {
            "run": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([run.label])),
            "seq_id": pa.DictionaryArray.from_arrays(pa.array(run.seq_codes.astype(np.int32)),
                                                      pa.array(run.seq_names, pa.string())),
            "pos": t.column("pos"),
            "token": t.column("token"),
            "is_noise": pa.array(run.is_noise),
            "noise_kind": (t.column("noise_kind").cast(pa.string()).fill_null("")
                           if "noise_kind" in t.column_names else pa.array([""] * n)),
        }
        for m in all_methods:
            w = weights.get(m)
            cols[m] = pa.array(w.astype(np.float32)) if w is not None else pa.nulls(n, pa.float32())
        parts.append(pa.table(cols))
    if len(parts) == 1:
        return parts[0]
    # runs' dictionaries differ: unify them
    return pa.concat_tables(parts).unify_dictionaries()


def write_exports(result: CompareResult, out_dir: Path, *, runs: list[RunData],
                  run_weights: list[dict[str, np.ndarray]], plot_samples: list[dict],
                  weight_samples: list[dict], heatmap_runs: list[dict]) -> dict[str, Path]:
    from reweight_audit import report

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditError(f"{out_dir}: cannot create the output folder ({exc.strerror}); choose another -o") from None
    files: dict[str, Path] = {}

    def target(name: str) -> Path:
        files[name] = out_dir / name
        return files[name]

    result.table.to_csv(target("table.csv"), index=False)
    result.curves.to_csv(target("curves.csv"), index=False)
    result.by_kind.to_csv(target("by_kind.csv"), index=False)
    target("table.md").write_text(report.table_markdown(result), encoding="utf-8")
    # dictionary pages for the repetitive text columns only: trying them on the float columns costs more
    # than the whole write and gains nothing
    pq.write_table(weights_table(runs, run_weights), target("weights.parquet"),
                   use_dictionary=["run", "seq_id", "token", "noise_kind"])

    report.plot_recall_curves(result.curves, target("recall_curves.png"), k=result.k)
    report.plot_rank_vs_prob(plot_samples, target("rank_vs_prob.png"))
    report.plot_expected_rank_vs_entropy(plot_samples, target("expected_rank_vs_entropy.png"))
    report.plot_weight_distributions(weight_samples, target("weight_distributions.png"))
    target("heatmap.html").write_text(report.heatmap_html(heatmap_runs, k=result.k), encoding="utf-8")

    target("summary.json")
    result.files = dict(files)
    summary = {
        "tool": "reweight-audit compare",
        "config": result.config,
        "runs": [{key: v for key, v in r.items() if key != "columns"} for r in result.runs],
        "base_rate": {r["label"]: r["base_rate"] for r in result.runs},
        "skipped": result.skipped,
        "table": _records(result.table),
        "files": {name: p.name for name, p in files.items()},
    }
    files["summary.json"].write_text(json.dumps(_clean_json(summary), indent=2, allow_nan=False) + "\n",
                                     encoding="utf-8")
    return files

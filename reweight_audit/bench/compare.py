"""``reweight-audit bench --compare``: ``compare`` (and ``sweep``) at growing table sizes, every engine side by side.

For each size in ``--tokens`` a seeded synthetic stats table (:mod:`reweight_audit.bench.synthetic`, cached in
the work folder) is evaluated by each engine in a **fresh subprocess** (``python -m reweight_audit compare
TABLE --engine E -o DIR``): its wall time and its peak RSS (the child's own ``ru_maxrss``, :data:`LAUNCHER`) are
measured, one line a run. Then, in the same run:

* the ratios of issue 20's targets, per stage (:data:`RATIOS`): the duckdb engine's peak RSS at the largest
  size ÷ at the smallest, its seconds per million tokens at the largest size ÷ the memory engine's at the
  smallest, and its peak RSS at the largest size against :data:`RSS_TARGET`;
* at every size where both engines ran, whether their reports are equal (:data:`COMPARED`: compare's
  ``table.csv``, ``curves.csv``, ``by_kind.csv``, ``summary.json``; sweep's ``sweep.csv``, ``pairs.csv``,
  ``sweep.json``), counts exactly, other numbers to :data:`RTOL` relative; what says how or where a run ran —
  timings, the engine, paths — is left out.

The memory engine is skipped, with the reason, where its estimated peak (the stage's
``evaluation.compare.MEMORY_BYTES_PER_TOKEN``, measured on main) does not fit the memory available; the whole
bench is refused at once, in one line, where its estimated disk use does not fit the work folder's filesystem.
The per-run ``weights.parquet`` files are removed once a size is checked (they are the bulk of the disk a run
takes). Each run starts from scratch (no
finished shard of an earlier, interrupted run), and one that would leave the machine without memory is stopped
with the reason (:func:`measure_child`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from reweight_audit.bench import synthetic
from reweight_audit.core.errors import AuditError, require_positive
from reweight_audit.evaluation.compare import MEMORY_BYTES_PER_TOKEN  # the in-memory engine's peak per token
from reweight_audit.evaluation import config, strata
from reweight_audit.evaluation.runs import DERIVED_COLUMNS
from reweight_audit.methods import available_methods

#: Share of the available memory (or disk) a run may be expected to take before it is skipped (refused).
HEADROOM = 0.85
#: The guard's look at the machine's memory: every GUARD_POLL_S seconds; below GUARD_MIN_AVAILABLE of the total
#: available, the run is stopped.
GUARD_POLL_S = 0.2
GUARD_MIN_AVAILABLE = 0.08
#: Issue 20's targets: peak RSS at the largest size, its growth over the sizes, time per token against memory's.
RSS_TARGET = 3e9
RSS_GROWTH_TARGET = 1.3
TIME_RATIO_TARGET = 1.5
#: The report files compared between engines, per stage, and the relative tolerance for numbers that are not counts.
COMPARED = {"compare": ("table.csv", "curves.csv", "by_kind.csv", "summary.json"),
            "sweep": ("sweep.csv", "pairs.csv", "sweep.json")}
#: Report files compared where either run wrote them (compare's strata.csv, with --stratify).
COMPARED_IF_WRITTEN = {"compare": ("strata.csv",), "sweep": ()}
RTOL = 1e-12
#: Keys (summary.json) and columns (csv) that say how or where a run ran, not what it found.
IGNORED = re.compile(r"^(engine.*|ray|path|paths|stats_paths|output|timing|timings|seconds|elapsed|workers|records"
                     r"|t_.*|.*_seconds|.*_s)$")
#: Disk estimates, bytes per token: the synthetic table (measured 32.4 at 100M tokens), the compare folder's
#: weights.parquet per method (float32, plus a few bytes of identity per token), and an engine's scratch per method
#: (spilled scores, with their sequence and label, and DuckDB's temporary files: its work folder beside the report).
TABLE_BYTES_PER_TOKEN = 36
WEIGHTS_BYTES_PER_TOKEN_METHOD = 4.5
SCRATCH_BYTES_PER_TOKEN_METHOD = 16


@dataclasses.dataclass(frozen=True)
class CompareBench:
    """What one ``bench --compare`` measures."""

    tokens: tuple[int, ...] = (10_000_000, 100_000_000)
    methods: tuple[str, ...] | None = None  # None: compare's defaults (every method the table's columns allow)
    bootstrap: int = 200
    seed: int = 0
    engines: tuple[str, ...] = ("memory", "duckdb")
    stages: tuple[str, ...] = ("compare", "sweep")
    work: Path = Path("reports/bench-compare-work")
    stratify: tuple[str, ...] = ()  # compare --stratify (strata.csv); sweep's stratify axis: none and these


# ------------------------------------------------------------------ options


def parse_tokens(text: str) -> tuple[int, ...]:
    """``"10M,100M"`` → (10_000_000, 100_000_000); k, M and B suffixes, sorted, without repeats."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMbB]?)", part)
        if not match:
            raise AuditError(f"--tokens {text}: give a comma list of token counts such as 10M,100M (k, M, B suffixes)")
        value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[match.group(2).lower()]
        require_positive("--tokens", int(value), "token count")
        sizes.append(int(value))
    return tuple(sorted(set(sizes)))


def engines_available() -> tuple[str, ...]:
    """The engines ``compare --engine`` offers, ``auto`` aside (it picks one of them)."""
    return tuple(engine for engine in config.ENGINES if engine != "auto")


def check(bench: CompareBench) -> None:
    """Every option, before any table is generated: one AuditError line for the first problem."""
    for size in bench.tokens:
        require_positive("--tokens", size, "token count")
    if not bench.tokens:
        raise AuditError("--tokens: give at least one size, e.g. 10M,100M")
    if bench.bootstrap < 0:
        raise AuditError(f"--bootstrap {bench.bootstrap}: give 0 (no intervals) or a positive number of resamples")
    if not bench.stages or set(bench.stages) - set(COMPARED):
        raise AuditError(f"--stages {','.join(bench.stages)}: give compare, sweep or both")
    offered = engines_available()
    unknown = [e for e in bench.engines if e not in offered]
    if unknown or not bench.engines:
        raise AuditError(f"--engines {','.join(bench.engines)}: this compare offers {', '.join(offered)}")
    strata.check_stratify(list(bench.stratify), 10)
    if bench.methods is not None:
        names = {m.name for m in available_methods()}
        missing = [m for m in bench.methods if m not in names]
        if missing or not bench.methods:
            raise AuditError(f"--methods: {', '.join(missing) or 'none given'} not registered; see "
                             "`reweight-audit methods`")


def method_count(bench: CompareBench) -> int:
    """How many methods each run evaluates: the named ones, else those the synthetic table's columns allow."""
    if bench.methods is not None:
        return len(bench.methods)
    columns = set(synthetic.schema().names) | set(DERIVED_COLUMNS)
    return sum(1 for m in available_methods() if set(m.needs) <= columns)


# ------------------------------------------------------------------ estimates


def disk_needed(bench: CompareBench) -> int:
    """Bytes the bench may write in its work folder: the tables not yet cached and, at the largest size, the weights
    of every engine that runs there and one engine's scratch beside its report (a copy of the table, the spilled
    scores, DuckDB's temporary files). Earlier sizes' weights are removed before the next size starts."""
    methods = method_count(bench)
    tables = sum(size * TABLE_BYTES_PER_TOKEN for size in bench.tokens
                 if not (bench.work / synthetic.file_name(size, bench.seed)).exists())
    largest = max(bench.tokens)
    # the disk a memory run writes does not depend on the stage; compare's smaller estimate runs it at more sizes,
    # so it is the one that can need more disk
    running = sum(1 for engine in bench.engines if skip_reason(engine, largest, "compare") is None)
    runs = running * largest * (2 + WEIGHTS_BYTES_PER_TOKEN_METHOD * methods)
    # each --stratify variable is spilled beside every score: 8 bytes per token and method
    scratch = largest * (TABLE_BYTES_PER_TOKEN + (SCRATCH_BYTES_PER_TOKEN_METHOD + 8 * len(bench.stratify)) * methods)
    return int(tables + runs + scratch)


def check_disk(bench: CompareBench) -> int:
    """Refuse, in one line, a bench whose estimated disk use does not fit; return the estimate."""
    need = disk_needed(bench)
    where = next(p for p in (bench.work.absolute(), *bench.work.absolute().parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > HEADROOM * free:
        raise AuditError(f"bench --compare needs about {need / 1e9:,.1f} GB of disk in {where}, "
                         f"{free / 1e9:,.1f} GB free: free space, give --work on a larger disk, or drop sizes "
                         "from --tokens")
    return need


def skip_reason(engine: str, n_tokens: int, stage: str = "compare") -> str | None:
    """Why ``engine`` cannot run ``stage`` on ``n_tokens`` here (one line), or None: only the memory engine's peak
    grows, by the stage's bytes per token."""
    if engine != "memory":
        return None
    import psutil

    per_token = MEMORY_BYTES_PER_TOKEN[stage]
    need, have = n_tokens * per_token, psutil.virtual_memory().available
    if need <= HEADROOM * have:
        return None
    return (f"skipped: needs about {need / 1e9:,.1f} GB ({per_token:,} B/token), "
            f"{have / 1e9:,.1f} GB available")


# ------------------------------------------------------------------ one run in a fresh process


def command(stage: str, table: Path, out: Path, engine: str, bench: CompareBench) -> list[str]:
    """The child's command line: this interpreter, ``-m reweight_audit STAGE``, the bench's options."""
    cmd = [sys.executable, "-m", "reweight_audit", stage, str(table), "-o", str(out), "-q",
           "--bootstrap", str(bench.bootstrap), "--seed", str(bench.seed)]
    if bench.methods is not None:
        cmd += ["--methods", ",".join(bench.methods)]
    if bench.stratify:
        cmd += ["--stratify", ",".join(bench.stratify if stage == "compare" else ("none", *bench.stratify))]
    return cmd + ["--engine", engine]


#: A small process between bench and each run: Linux counts the memory of the process that forked a child (its
#: high-water mark at the fork) into the child's ru_maxrss, so a run forked by bench itself (hundreds of MB, or a
#: test runner's GBs) would report at least that. The launcher is small, forks the run, waits for it and writes
#: ``[exit code, ru_maxrss in KiB]`` of the run alone to the file named by its first argument.
LAUNCHER = ("import json, os, sys\n"
            "pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)\n"
            "_, status, usage = os.wait4(pid, 0)\n"
            "with open(sys.argv[1], 'w') as f:\n"
            "    json.dump([os.waitstatus_to_exitcode(status), usage.ru_maxrss], f)\n")


def _guard(proc: subprocess.Popen, stop: threading.Event, found: dict) -> None:
    """Stop the run before the machine runs out of memory (an engine that holds more than estimated, a stage that
    ignores --engine): the OOM killer would pick any process of the machine, this stops ours, with the reason."""
    import psutil

    try:
        launcher = psutil.Process(proc.pid)
        while not stop.wait(GUARD_POLL_S):
            memory = psutil.virtual_memory()
            if memory.available < GUARD_MIN_AVAILABLE * memory.total:
                rss = sum(p.memory_info().rss for p in launcher.children(recursive=True))
                found["stopped"] = (f"stopped by bench: {memory.available / 1e9:.1f} GB left available on the "
                                    f"machine, the run's RSS {rss / 1e9:.1f} GB")
                os.killpg(proc.pid, signal.SIGKILL)
                return
    except (psutil.Error, ProcessLookupError):  # the run ended between two looks
        return


def measure_child(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` to its end, through :data:`LAUNCHER`; its exit code, wall seconds and peak RSS (its own
    ``ru_maxrss``). A run that would leave the machine without memory is stopped (``stopped``: why)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    found: dict[str, str] = {}
    stop = threading.Event()
    result = log.with_name(log.name + ".rusage.json")
    result.unlink(missing_ok=True)
    with log.open("wb") as sink:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(result), *cmd], stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        guard = threading.Thread(target=_guard, args=(proc, stop, found), daemon=True)
        guard.start()
        try:
            proc.wait()
        except BaseException:  # an interrupt: the run goes with us
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            stop.set()
            guard.join()
        seconds = time.perf_counter() - started
    if not result.exists():  # the launcher itself was stopped (the guard kills the whole group)
        return {"exit": proc.returncode, "seconds": seconds, "peak_rss_bytes": None, **found}
    code, peak_kib = json.loads(result.read_text())
    result.unlink()
    return {"exit": code, "seconds": seconds, "peak_rss_bytes": int(peak_kib) * 1024, **found}


def run_one(stage: str, table: Path, n_tokens: int, engine: str, bench: CompareBench) -> dict:
    """One stage on one table by one engine, in a fresh process; skipped where it would not fit."""
    row: dict[str, Any] = {"stage": stage, "tokens": n_tokens, "engine": engine}
    reason = skip_reason(engine, n_tokens, stage)
    if reason is not None:
        return {**row, "skipped": reason}
    out = bench.work / "runs" / f"{stage}-{n_tokens}-{engine}"
    # the duckdb engine resumes from the finished shards an interrupted run left in its work folder beside the
    # report (docs/scaling.md, "Resuming"): a measurement starts from none
    shutil.rmtree(out.parent / f".{out.name}.engine", ignore_errors=True)
    cmd = command(stage, table, out, engine, bench)
    measured = measure_child(cmd, bench.work / "runs" / f"{stage}-{n_tokens}-{engine}.log")
    row.update(measured, folder=str(out), command=" ".join(cmd),
               s_per_m_tokens=measured["seconds"] / (n_tokens / 1e6))
    if measured["exit"] != 0:
        tail = (bench.work / "runs" / f"{stage}-{n_tokens}-{engine}.log").read_text(errors="replace")
        row["error"] = measured.get("stopped") or (tail.strip().splitlines() or ["(no output)"])[-1][:300]
    else:
        row["engine_reported"] = reported_engine(out, stage)
    return row


def reported_engine(folder: Path, stage: str) -> str | None:
    """The engine the report says ran (its summary's ``engine``, top level or in its config), or None."""
    path = folder / ("summary.json" if stage == "compare" else "sweep.json")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    found = summary.get("engine") or (summary.get("config") or {}).get("engine")
    return found if isinstance(found, str) else None


def run_line(row: dict) -> str:
    """One printed line per run."""
    head = f"{row['stage']:7s} {human(row['tokens']):>5s} tokens  {row['engine']:6s}"
    if "skipped" in row:
        return f"{head}  {row['skipped']}"
    peak = "n/a" if row["peak_rss_bytes"] is None else f"{row['peak_rss_bytes'] / 1e9:6.2f} GB"
    text = f"{head}  {row['seconds']:8.1f} s  {row['s_per_m_tokens']:7.2f} s/M tokens  peak RSS {peak}"
    if row["exit"] != 0:
        return f"{text}  FAILED (exit {row['exit']}): {row['error']}"
    said = row.get("engine_reported")
    return text if said in (None, row["engine"]) else f"{text}  (the report says {said} ran)"


def human(n: int) -> str:
    """10_000_000 → "10M"."""
    for suffix, unit in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= unit and n % (unit // 10) == 0:
            return f"{n / unit:g}{suffix}"
    return str(n)


# ------------------------------------------------------------------ equality between engines


def _frames_differ(a: pd.DataFrame, b: pd.DataFrame) -> str | None:
    """The first difference between two report frames, or None: counts exactly, other numbers to RTOL."""
    keep_a = [c for c in a.columns if not IGNORED.match(c)]
    keep_b = [c for c in b.columns if not IGNORED.match(c)]
    if keep_a != keep_b:
        return f"columns differ: {sorted(set(keep_a) ^ set(keep_b)) or 'order'}"
    if len(a) != len(b):
        return f"{len(a)} rows vs {len(b)}"
    for col in keep_a:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if x.dtype.kind in "iub" and y.dtype.kind in "iub":
            bad = x != y
        elif x.dtype.kind in "iufb" and y.dtype.kind in "iufb":
            bad = ~np.isclose(x.astype(float), y.astype(float), rtol=RTOL, atol=0.0, equal_nan=True)
        else:
            bad = a[col].fillna("").astype(str).to_numpy() != b[col].fillna("").astype(str).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return f"column {col}, row {i + 1}: {x[i]!r} vs {y[i]!r}"
    return None


def _values_differ(a: Any, b: Any, where: str = "") -> str | None:
    """The first difference between two JSON values (keys in IGNORED left out), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys_a = {k for k in a if not IGNORED.match(k)}
        keys_b = {k for k in b if not IGNORED.match(k)}
        if keys_a != keys_b:
            return f"{where or '/'}: keys {sorted(keys_a ^ keys_b)}"
        return next((d for k in sorted(keys_a) if (d := _values_differ(a[k], b[k], f"{where}/{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} items vs {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _values_differ(x, y, f"{where}[{i}]"))), None)
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None if a == b else f"{where}: {a!r} vs {b!r}"
    if isinstance(a, int) and isinstance(b, int):
        return None if a == b else f"{where}: {a} vs {b}"
    same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=RTOL, abs_tol=0.0)
    return None if same else f"{where}: {a!r} vs {b!r}"


def reports_differ(first: Path, second: Path, stage: str = "compare") -> dict[str, str | None]:
    """Per compared file of ``stage``, its first difference between two report folders (None: equal)."""
    found: dict[str, str | None] = {}
    written = [n for n in COMPARED_IF_WRITTEN[stage] if (first / n).exists() or (second / n).exists()]
    for name in (*COMPARED[stage], *written):
        a, b = first / name, second / name
        if not a.exists() or not b.exists():
            found[name] = f"missing in {a.parent if not a.exists() else b.parent}"
        elif name.endswith(".json"):
            found[name] = _values_differ(json.loads(a.read_text()), json.loads(b.read_text()))
        else:
            found[name] = _frames_differ(pd.read_csv(a), pd.read_csv(b))
    return found


# ------------------------------------------------------------------ the bench


#: Issue 20's ratios, per stage: key → (what it is, its target: the ratio must stay at or below it).
RATIOS = {
    "duckdb_peak_rss_gb_at_largest": ("duckdb peak RSS at the largest size, GB", RSS_TARGET / 1e9),
    "duckdb_peak_rss_largest_over_smallest": ("duckdb peak RSS, largest size / smallest", RSS_GROWTH_TARGET),
    "duckdb_s_per_m_largest_over_memory_s_per_m_smallest": (
        "duckdb s/M tokens at the largest size / memory s/M tokens at the smallest", TIME_RATIO_TARGET),
}


def ratios(runs: list[dict], sizes: tuple[int, ...]) -> dict[str, float]:
    """Issue 20's ratios (:data:`RATIOS`), ``<stage>/<ratio>``, from the runs that finished (a ratio whose runs
    did not is left out)."""
    small, large = min(sizes), max(sizes)
    found: dict[str, float] = {}
    for stage in COMPARED:
        done = {(r["engine"], r["tokens"]): r for r in runs if r["stage"] == stage and r.get("exit") == 0}
        duck_small, duck_large, memory_small = (done.get(("duckdb", small)), done.get(("duckdb", large)),
                                                done.get(("memory", small)))
        if duck_large is not None:
            found[f"{stage}/duckdb_peak_rss_gb_at_largest"] = duck_large["peak_rss_bytes"] / 1e9
        if duck_small is not None and duck_large is not None and large > small:
            found[f"{stage}/duckdb_peak_rss_largest_over_smallest"] = (
                duck_large["peak_rss_bytes"] / duck_small["peak_rss_bytes"])
        if duck_large is not None and memory_small is not None:
            found[f"{stage}/duckdb_s_per_m_largest_over_memory_s_per_m_smallest"] = (
                duck_large["s_per_m_tokens"] / memory_small["s_per_m_tokens"])
    return found


def verdict(runs: list[dict], found: dict[str, float], equal: dict[int, dict]) -> dict[str, bool]:
    """Each target of issue 20 that this run measured: met or not."""
    checks: dict[str, bool] = {"every run completed": all(r.get("exit") == 0 for r in runs if "skipped" not in r)}
    for key, value in found.items():
        stage, name = key.split("/")
        what, target = RATIOS[name]
        checks[f"{stage}: {what} <= {target:g}"] = value <= target
    for size, files in equal.items():
        checks[f"engines' reports equal at {human(size)} tokens"] = all(v is None for v in files.values())
    return checks


def _table(bench: CompareBench, size: int, say: Callable[[str], None]) -> tuple[Path, dict]:
    """The size's synthetic table, generated (one line with the time) or taken from the work folder."""
    started = time.perf_counter()
    path, manifest, made = synthetic.cached_table(bench.work, size, bench.seed)
    if made:
        say(f"table   {human(size):>5s} tokens  generated in {time.perf_counter() - started:.1f} s, "
            f"{manifest['bytes'] / 1e6:,.1f} MB: {path}")
    else:
        say(f"table   {human(size):>5s} tokens  cached: {path}")
    return path, {**manifest, "path": str(path), "generated_now": made}


def _check_size(runs: list[dict], size: int, say: Callable[[str], None]) -> dict[str, str | None] | None:
    """Both engines' reports at ``size`` checked against each other, per stage (None: no stage ran on both);
    the runs' weights.parquet removed."""
    found: dict[str, str | None] | None = None
    for stage in COMPARED:
        done = {r["engine"]: r for r in runs
                if r["tokens"] == size and r["stage"] == stage and r.get("exit") == 0}
        if not {"memory", "duckdb"} <= set(done):
            continue
        differ = reports_differ(Path(done["memory"]["folder"]), Path(done["duckdb"]["folder"]), stage)
        found = {**(found or {}), **{f"{stage}/{name}": v for name, v in differ.items()}}
        bad = {k: v for k, v in differ.items() if v is not None}
        verdict_text = ("yes: " + ", ".join(differ) if not bad else
                        "NO: " + "; ".join(f"{k}: {v}" for k, v in bad.items()))
        say(f"equal   {human(size):>5s} tokens  {stage}: {verdict_text}")
    for row in runs:
        if row["tokens"] == size and "folder" in row:
            (Path(row["folder"]) / "weights.parquet").unlink(missing_ok=True)
    return found


def run_compare_bench(bench: CompareBench, say: Callable[[str], None] = lambda line: None) -> dict:
    """Every size × stage × engine, one fresh process each; the lines go to ``say`` as they come."""
    check(bench)
    disk = check_disk(bench)
    runs: list[dict] = []
    tables: dict[str, dict] = {}
    equal: dict[int, dict] = {}
    for size in bench.tokens:
        path, tables[str(size)] = _table(bench, size, say)
        for stage in bench.stages:
            for engine in bench.engines:
                runs.append(run_one(stage, path, size, engine, bench))
                say(run_line(runs[-1]))
        found = _check_size(runs, size, say)
        if found is not None:
            equal[size] = found
    found_ratios = ratios(runs, bench.tokens)
    return {"mode": "compare", "tokens": list(bench.tokens), "methods": list(bench.methods or ()) or "defaults",
            "n_methods": method_count(bench), "bootstrap": bench.bootstrap, "seed": bench.seed,
            "stratify": list(bench.stratify), "engines": list(bench.engines), "stages": list(bench.stages), "work": str(bench.work),
            "disk_estimate_bytes": disk, "generator_version": synthetic.GENERATOR_VERSION, "machine": _machine(),
            "tables": tables, "runs": runs, "equal": {str(k): v for k, v in equal.items()},
            "ratios": found_ratios, "verdict": verdict(runs, found_ratios, equal)}


def _machine() -> dict:
    import platform

    import psutil

    return {"cpus": os.cpu_count(), "memory_bytes": int(psutil.virtual_memory().total),
            "available_bytes": int(psutil.virtual_memory().available), "python": platform.python_version(),
            "load_average": list(os.getloadavg())}


def summary_lines(result: dict) -> list[str]:
    """The ratio lines and the verdict, printed after the runs."""
    lines = []
    for key, value in result["ratios"].items():
        stage, name = key.split("/")
        what, target = RATIOS[name]
        lines.append(f"{stage}: {what}: {value:.3f} (target <= {target:g})")
    return lines + [f"{'met' if ok else 'NOT MET'}: {what}" for what, ok in result["verdict"].items()]

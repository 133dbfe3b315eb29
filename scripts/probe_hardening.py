#!/usr/bin/env python
"""Issue 12's probe, re-run as a user would: each bad input against the command line, GOOD or BAD.

GOOD: a one-line ``error:`` (exit 2) or the right result, and nothing half-written left behind.
Run from the repository root: ``.venv/bin/python scripts/probe_hardening.py`` (about 3 minutes on
2 cores; case 17 loads the default GGUF model once). Nothing here touches the network: the hub is
simulated unreachable with ``HF_ENDPOINT`` pointing at a closed localhost port.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
RESULTS: list[tuple[str, bool, str]] = []


def cli(*args: str, env: dict | None = None, user: str | None = None, timeout: int = 600) -> tuple:
    """(exit code, stdout, stderr, seconds) of ``reweight-audit ARGS``."""
    cmd = [sys.executable, "-m", "reweight_audit", *map(str, args)]
    if user:  # a real permission check needs a user other than root
        cmd = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *cmd]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reweight_audit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_line_error(res: tuple, *needles: str) -> tuple[bool, str]:
    rc, _out, err, secs = res
    lines = [line for line in err.splitlines() if line.strip()]
    ok = (rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err
          and all(n in lines[0] for n in needles))
    return ok, (lines[0] if len(lines) == 1 else f"rc {rc}, {len(lines)} stderr lines: {err.strip()[-300:]!r}")


def case(name: str, good: bool, detail: str) -> None:
    RESULTS.append((name, bool(good), detail.replace("\n", " ")[:150]))
    print(f"{'GOOD' if good else 'BAD '}  {name}: {detail.replace(chr(10), ' ')[:150]}", flush=True)


def wait_for(predicate, proc: subprocess.Popen, limit: float = 300.0) -> bool:
    """Poll until ``predicate()`` holds; False when the process ended first."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.005)
    return False


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".lock")) or ".tmp" in p.name)


# --------------------------------------------------------------------------- fixtures


def set_up(w: Path) -> dict:
    from conftest import save_tiny_model

    model = save_tiny_model(w / "tiny")
    broken = w / "broken-model"  # tokenizer fine, weights garbage: anything checked after loading shows up
    shutil.copytree(model, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    res = cli("inject", "champ", "-o", w / "noisy.jsonl", "--clean-frac", "0.1", "-q")
    assert res[0] == 0, res
    small = w / "small.jsonl"
    small.write_text("".join(l + "\n" for l in (w / "noisy.jsonl").read_text().splitlines()[:40]))
    medium = w / "medium.jsonl"  # long enough to be stopped half-way
    medium.write_text("".join(l + "\n" for l in (w / "noisy.jsonl").read_text().splitlines()[:120]))
    res = cli("score", small, "-o", w / "stats.parquet", "--model", model, "--device", "cpu", "-q")
    assert res[0] == 0, res
    res = cli("compare", w / "stats.parquet", "-o", w / "report", "--bootstrap", "20", "-q")
    assert res[0] == 0, res
    rows = [{"id": f"r{i}", "prompt": f"Question {i}?",
             "response": f"The answer to question {i} is that we compute the value and then it equals {i}."}
            for i in range(12)]
    (w / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model, "broken": broken, "small": small, "medium": medium, "rows": rows}


# --------------------------------------------------------------------------- the cases


def interrupted_compare(w: Path, f: dict) -> None:
    for name, existing in (("1a Ctrl-C in compare, earlier report", True), ("1b Ctrl-C in compare, new folder", False)):
        out = w / ("rep1" if existing else "rep1-new")
        if existing:
            shutil.copytree(w / "report", out)
        before = snapshot(out) if existing else None
        proc = start("compare", w / "stats.parquet", "-o", out, "--bootstrap", "20", "-q")

        def writing() -> bool:
            temps = [p for p in w.iterdir() if p.name.startswith(f".{out.name}.") and p.is_dir()]
            return any(len(list(t.iterdir())) >= 3 for t in temps)

        caught = wait_for(writing, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        intact = (snapshot(out) == before) if existing else not out.exists()
        left = [p.name for p in w.iterdir() if p.name.startswith(f".{out.name}.")]
        good = caught and proc.returncode == 130 and len(lines) == 1 and intact and not left
        case(name, good, f"exit {proc.returncode}, caught mid-write {caught}, report intact {intact}, "
                         f"leftovers {left}, says {lines[:2]}")


def score_into_directory(w: Path, f: dict) -> None:
    (w / "adir").mkdir(exist_ok=True)
    res = cli("score", f["small"], "-o", w / "adir", "--model", f["model"], "--device", "cpu", "-q")
    ok, line = one_line_error(res, "directory")
    case("2  score -o DIR", ok and not list((w / "adir").iterdir()) and not (w / "adir.shards").exists(), line)


def concurrent_score(w: Path, f: dict) -> None:
    out = w / "s3.parquet"
    args = ("score", f["medium"], "-o", out, "--model", f["model"], "--device", "cpu", "--batch-tokens", "256", "-q")
    first = start(*args)
    wait_for(lambda: (w / "s3.parquet.shards").exists(), first)
    second = cli(*args)
    ok, line = one_line_error(second, str(first.pid))
    first_rc = first.wait(timeout=600)
    case("3a two score runs at once", ok and first_rc == 0 and out.exists(), f"second: {line}; first exit {first_rc}")

    out = w / "s3b.parquet"
    args = ("score", f["medium"], "-o", out, "--model", f["model"], "--device", "cpu", "--batch-tokens", "256", "-q")
    victim = start(*args)
    shards = w / "s3b.parquet.shards"
    wait_for(lambda: shards.exists() and len(list(shards.glob("batch-*.parquet"))) >= 2, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    res = cli(*args, "--resume")
    left = leftovers(w)
    good = res[0] == 0 and out.exists() and not left and str(victim.pid) in res[2]
    case("3b resume after SIGKILL: stale lock named", good,
         f"exit {res[0]}, leftovers {left}, stderr {res[2].strip()[:120]!r}")


def duplicate_keys(w: Path, f: dict) -> None:
    dup = w / "dup.jsonl"
    dup.write_text(f["small"].read_text() * 2)
    res = cli("score", dup, "-o", w / "dup.parquet", "--model", f["broken"], "--device", "cpu", "-q")
    ok, line = one_line_error(res, "repeat an id")
    case("4a score: duplicate ids (cat of two inject outputs)", ok and not (w / "dup.parquet").exists(), line)

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(w / "stats.parquet")
    pq.write_table(pa.concat_tables([table, table]), w / "stacked.parquet")
    res = cli("compare", w / "stacked.parquet", "-o", w / "rep-stacked", "-q")
    ok, line = one_line_error(res, "seq_id")
    case("4b compare: a table stacked twice", ok and not (w / "rep-stacked").exists(), line)


def csv_with_bom(w: Path, f: dict) -> None:
    rows = f["rows"]
    for name, order in (("5a CSV with a BOM: ids kept", ["id", "prompt", "response"]),
                        ("5b CSV with a BOM, prompt first", ["prompt", "response", "id"])):
        src = w / f"bom-{order[0]}.csv"
        with src.open("w", encoding="utf-8-sig", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=order)
            writer.writeheader()
            writer.writerows(rows)
        out = w / f"bom-{order[0]}.jsonl"
        res = cli("inject", src, "-o", out, "-q")
        same = cli("inject", w / "corpus.jsonl", "-o", w / "from-jsonl.jsonl", "-q")
        got = [json.loads(l) for l in out.read_text().splitlines()] if out.exists() else []
        want = [json.loads(l) for l in (w / "from-jsonl.jsonl").read_text().splitlines()] if same[0] == 0 else []
        good = res[0] == 0 and [r["id"] for r in got] == [r["id"] for r in rows] and \
            [r["response"] for r in got] == [r["response"] for r in want]
        case(name, good, f"exit {res[0]}, ids {[r['id'] for r in got][:3]}, {res[2].strip()[:100]!r}")


def absent_id_field(w: Path, f: dict) -> None:
    res = cli("inject", w / "corpus.jsonl", "-o", w / "ident.jsonl", "--id-field", "ident", "-q")
    ok, line = one_line_error(res, "ident")
    case("6  inject --id-field absent", ok and not (w / "ident.jsonl").exists(), line)


def zero_and_negative(w: Path, f: dict) -> None:
    for name, args, needle in (
        ("7a bench --seq-len 0", ("bench", "--seq-len", "0", "--vocab", "300", "-o", w / "b.json"), "--seq-len"),
        ("7b bench --vocab 0", ("bench", "--vocab", "0", "--seq-len", "16", "-o", w / "b.json"), "--vocab"),
        ("7c score --chunk-rows 0", ("score", f["small"], "-o", w / "c0.parquet", "--model", f["model"], "--device",
                                      "cpu", "--chunk-rows", "0", "-q"), "--chunk-rows"),
        ("8  score --chunk-rows -5", ("score", f["small"], "-o", w / "c5.parquet", "--model", f["model"], "--device",
                                       "cpu", "--chunk-rows", "-5", "-q"), "--chunk-rows"),
    ):
        res = cli(*args)
        ok, line = one_line_error(res, needle)
        ok = ok and not (w / "b.json").exists() and not any(w.glob("c*.parquet*"))
        case(name, ok, line)


def read_only_folder(w: Path, f: dict) -> None:
    shared = Path(tempfile.mkdtemp(prefix="probe12-ro-"))
    shared.chmod(0o777)
    stats = shared / "stats.parquet"
    shutil.copy(w / "stats.parquet", stats)
    stats.chmod(0o644)
    shutil.copytree(w / "report", shared / "ro")
    for p in [shared / "ro", *(shared / "ro").iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    before = snapshot(shared / "ro")
    res = cli("compare", stats, "-o", shared / "ro", "-q", user="65534", env={"MPLCONFIGDIR": str(shared / "mpl")})
    ok, line = one_line_error(res, "writ")
    case("9  compare -o a read-only folder (as nobody)", ok and snapshot(shared / "ro") == before, line)
    (shared / "ro").chmod(0o755)
    shutil.rmtree(shared, ignore_errors=True)


def bench_into_directory(w: Path, f: dict) -> None:
    (w / "bdir").mkdir(exist_ok=True)
    res = cli("bench", "--vocab", "300", "--seq-len", "16", "--repeats", "1", "--device", "cpu", "-o", w / "bdir")
    ok, line = one_line_error(res, "directory")
    case("10 bench -o DIR", ok and not [p for p in w.iterdir() if p.name.startswith("bdir.")], line)


def long_names(w: Path, f: dict) -> None:
    deep = w.joinpath(*(["d" * 200] * 22))
    for name, out in (("11a 244-character output name", w / ("n" * 238 + ".jsonl")),
                      ("11b 260-character output name", w / ("n" * 254 + ".jsonl")),
                      ("11c path over the system limit", deep / "noisy.jsonl")):
        res = cli("inject", w / "corpus.jsonl", "-o", out, "-q")
        rc, _, err, _ = res
        wrote_whole = rc == 0 and Path(str(out) + ".manifest.json").exists() if len(str(out)) < 4000 else False
        ok, line = one_line_error(res, "-o")
        clean = not [p for p in w.iterdir() if p.name.startswith("nnnn") and not wrote_whole] and \
            not (w / ("d" * 200)).exists()
        case(name, (ok or wrote_whole) and clean, line if not wrote_whole else "written whole, with its manifest")


def parquet_to_score(w: Path, f: dict) -> None:
    res = cli("score", w / "stats.parquet", "-o", w / "p.parquet", "--model", f["model"], "--device", "cpu", "-q")
    ok, line = one_line_error(res, "JSONL written by")
    case("12 score some.parquet", ok, line)


def interrupted_score(w: Path, f: dict) -> None:
    out = w / "s13.parquet"
    args = ("score", f["medium"], "-o", out, "--model", f["model"], "--device", "cpu", "--batch-tokens", "256", "-q")
    proc = start(*args)
    shards = w / "s13.parquet.shards"
    caught = wait_for(lambda: shards.exists() and len(list(shards.glob("batch-*.parquet"))) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    res = cli(*args, "--resume")
    good = (caught and proc.returncode == 130 and len(lines) == 1 and "--resume" in lines[0] and res[0] == 0
            and not leftovers(w))
    case("13 Ctrl-C in score", good, f"exit {proc.returncode}, says {lines[:2]}; --resume exit {res[0]}")


def empty_inputs(w: Path, f: dict) -> None:
    blank_responses = "".join(json.dumps({"id": str(i), "prompt": "p", "response": "  "}) + "\n" for i in range(3))
    for name, text in (("14a inject an empty file", ""), ("14b inject blank lines only", "\n\n  \n"),
                       ("14c inject all-empty responses", blank_responses)):
        src = w / "empty-in.jsonl"
        src.write_text(text)
        out = w / "empty-out.jsonl"
        res = cli("inject", src, "-o", out, "-q")
        ok, line = one_line_error(res, str(src))
        case(name, ok and not out.exists(), line)


def negative_bootstrap(w: Path, f: dict) -> None:
    res = cli("compare", w / "stats.parquet", "-o", w / "rep15", "--bootstrap", "-1", "-q")
    ok, line = one_line_error(res, "--bootstrap")
    case("15 compare --bootstrap -1", ok and "--n-boot" not in line and not (w / "rep15").exists(), line)


def side_by_side(w: Path, f: dict) -> None:
    for sub in ("a", "b"):
        (w / sub).mkdir(exist_ok=True)
        shutil.copy(w / "stats.parquet", w / sub / "stats.parquet")
        manifest = json.loads((w / "stats.parquet.manifest.json").read_text())
        manifest["model"] = "/home/user/models/SmolLM2-135M-Instruct.Q4_1.gguf"
        (w / sub / "stats.parquet.manifest.json").write_text(json.dumps(manifest))
    res = cli("compare", w / "a" / "stats.parquet", w / "b" / "stats.parquet", "-o", w / "rep16", "--bootstrap", "0",
              "-q", env={"COLUMNS": "160"})
    labels = {line.split("│")[1].strip() for line in res[1].splitlines() if line.count("│") > 3}
    labels.discard("")
    shown = {"SmolLM2-135M-Instruct.Q4_1.gguf [a/stats]", "SmolLM2-135M-Instruct.Q4_1.gguf [b/stats]"} <= labels
    case("16 two runs side by side at 160 columns", res[0] == 0 and shown, f"run labels printed: {sorted(labels)}")


def quiet_gguf(w: Path, f: dict) -> None:
    one = w / "one.jsonl"
    one.write_text(f["small"].read_text().splitlines()[0] + "\n")
    res = cli("score", one, "-o", w / "gguf.parquet", "--device", "cpu", "-q")
    case("17 -q with the default GGUF model", res[0] == 0 and not res[2].strip(),
         f"exit {res[0]}, stderr {res[2].strip()[-120:]!r}")


def offline(w: Path, f: dict) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    cache = w / "empty-cache"
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(cache), "HF_HUB_OFFLINE": "0"}
    res = cli("score", f["small"], "-o", w / "o.parquet", "--model", "someone/some-model", "--device", "cpu", "-q",
              env=env)
    ok, line = one_line_error(res, "unreachable")
    case("18a offline: a hub model id", ok and res[3] < 15, f"{res[3]:.1f} s: {line}")
    res = cli("inject", "hf:someone/some-dataset", "-o", w / "o.jsonl", "-q", env=env)
    ok, line = one_line_error(res, "unreachable")
    case("18b offline: an hf: dataset", ok and res[3] < 15, f"{res[3]:.1f} s: {line}")

    out = w / "s18.parquet"  # an interrupted run's shards, then a resume with other options
    args = ("score", f["medium"], "-o", out, "--model", f["model"], "--device", "cpu", "--batch-tokens", "256", "-q")
    proc = start(*args)
    wait_for(lambda: len(list((w / "s18.parquet.shards").glob("batch-*.parquet"))) >= 1
             if (w / "s18.parquet.shards").exists() else False, proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    res = cli("score", f["medium"], "-o", out, "--model", f["broken"], "--device", "cpu", "--resume", "-q")
    ok, line = one_line_error(res, "--resume refused")
    case("18c --resume refusal before the model loads", ok, line)
    res = cli("score", f["medium"], "-o", out, "--model", f["broken"], "--device", "cpu", "-q")
    ok, line = one_line_error(res, "finished shards")
    case("18d shard conflict before the model loads", ok, line)


def main() -> int:
    w = Path(tempfile.mkdtemp(prefix="probe12-"))
    print(f"probe folder {w}", flush=True)
    fixtures = set_up(w)
    for probe in (interrupted_compare, score_into_directory, concurrent_score, duplicate_keys, csv_with_bom,
                  absent_id_field, zero_and_negative, read_only_folder, bench_into_directory, long_names,
                  parquet_to_score, interrupted_score, empty_inputs, negative_bootstrap, side_by_side, quiet_gguf,
                  offline):
        try:
            probe(w, fixtures)
        except Exception as exc:  # a probe that crashes is a BAD case, not the end of the probe
            case(probe.__name__, False, f"probe crashed: {type(exc).__name__}: {exc}")
    bad = [name for name, good, _ in RESULTS if not good]
    print(f"\n{len(RESULTS) - len(bad)} GOOD, {len(bad)} BAD" + (f": {', '.join(bad)}" if bad else ""))
    shutil.rmtree(w, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""sweep: every method over rank-by × scope × k × noise × run; pair shares, claims, provenance notes."""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from helpers import H_A, H_B, hand_stats_table, hand_sweep, make_stats, write_stats

from reweight_audit.evaluation import metrics, runs, sweep
from reweight_audit.core.errors import AuditError
from reweight_audit.methods import get_method
from reweight_audit.reporting.sweep_report import write_sweep
from reweight_audit.evaluation.config import CompareConfig, SweepConfig

# the module: `reweight_audit.evaluation.compare` as an attribute is the API function
compare = importlib.import_module("reweight_audit.evaluation.compare")

def drop_column(table: pa.Table, name: str) -> pa.Table:
    return table.remove_column(table.schema.get_field_index(name))


@pytest.fixture()
def hand_runs(tmp_path):
    return [write_stats(tmp_path / "a.parquet", hand_stats_table(H_A), model="run-A"),
            write_stats(tmp_path / "b.parquet", hand_stats_table(H_B), model="run-B")]


def test_token_recall_hand_counted(hand_runs):
    # top 2 of 8 (global 25%), top 4 (global 50%), top 1 and top 2 of each sequence of 4
    res = hand_sweep(hand_runs)
    rec = res.table.set_index(["run", "scope", "k", "method"])["tok_rec"]
    expected = {  # (global 25, global 50, sequence 25, sequence 50)
        ("run-A", "dft"): (0, 0, 0, 0), ("run-A", "inv-prob"): (1, 1, 1, 1),
        ("run-A", "sft"): (0.25, 0.5, 0.25, 0.5), ("run-A", "entropy"): (0, 0.5, 0, 0.5),
        ("run-B", "entropy"): (0.5, 1, 0.5, 1), ("run-B", "sft"): (0.25, 0.5, 0.25, 0.5)}
    for (run, method), values in expected.items():
        got = [rec[(run, scope, k, method)] for scope in ("global", "sequence") for k in (25.0, 50.0)]
        assert got == pytest.approx(values, abs=1e-12), (run, method)
    assert len(res.table) == 2 * 2 * 2 * 4  # runs × scopes × cuts × methods, one noise kind
    assert set(res.table["noise"]) == {"filler"}


def test_pair_shares_hand_counted(hand_runs):
    # 8 settings: 2 runs × 2 scopes × 2 cuts. run-A: entropy (0, .5, 0, .5) vs sft (.25, .5, .25, .5): less twice,
    # tied twice; run-B: entropy (.5, 1, .5, 1) is above sft everywhere and ties inv-prob (1) at 50%.
    res = hand_sweep(hand_runs)
    pairs = res.pairs.set_index(["a", "b"])
    expected = {  # (a, b): (less, ties)
        ("entropy", "sft"): (2, 2), ("sft", "entropy"): (4, 2),
        ("entropy", "inv-prob"): (6, 2), ("inv-prob", "entropy"): (0, 2),
        ("dft", "entropy"): (6, 2), ("entropy", "dft"): (0, 2),
        ("dft", "sft"): (8, 0), ("sft", "inv-prob"): (8, 0), ("dft", "inv-prob"): (8, 0), ("inv-prob", "dft"): (0, 0)}
    for pair, (less, ties) in expected.items():
        row = pairs.loc[pair]
        assert (row["settings"], row["less"], row["ties"]) == (8, less, ties), pair
        assert row["share"] == less / 8 and row["sure"] == 0  # no bootstrap: nothing is sure
    assert len(res.pairs) == 4 * 3


def test_claim_holds_and_fails_by_setting(hand_runs):
    res = hand_sweep(hand_runs, claim="dft < entropy < inv-prob")
    claim = res.claim.set_index(["run", "scope", "k"])
    # run-A: dft and entropy tie at 25%; run-B: entropy ties inv-prob at 50%
    holds = {("run-A", "global", 50.0), ("run-A", "sequence", 50.0), ("run-B", "global", 25.0),
             ("run-B", "sequence", 25.0)}
    assert {key for key, ok in claim["holds"].items() if ok} == holds
    assert res.claim_holds is False
    assert hand_sweep(hand_runs, claim="dft < sft < inv-prob").claim_holds is True


def test_claim_names_unknown_method(hand_runs):
    with pytest.raises(AuditError) as err:
        hand_sweep(hand_runs, claim="ranktuner-approx < eafft")
    message = str(err.value)
    assert "'eafft'" in message and "registered:" in message and "eaft" in message and "\n" not in message
    with pytest.raises(AuditError, match="lowest first"):
        hand_sweep(hand_runs, claim="eaft")
    with pytest.raises(AuditError, match="ref_logp"):  # registered, but no table can compute it
        hand_sweep(hand_runs, methods=None, claim="rho1 < eaft")
    with pytest.raises(AuditError, match="--metric"):
        hand_sweep(hand_runs, metric="auroc")


def test_paired_interval_matches_a_plain_resampling_loop(tmp_path):
    """Sequence scope: a replicate equals the metric on the resampled sequences, so 'sure' can be brute-forced."""
    table = make_stats(25, seed=3)
    one_kind = pa.array(["filler" if n else "" for n in table.column("is_noise").to_pylist()])
    table = table.set_column(table.schema.get_field_index("noise_kind"), "noise_kind", one_kind)
    stats = write_stats(tmp_path / "s.parquet", table)
    res = sweep.run_sweep([stats], None, SweepConfig(methods=["entropy", "inv-prob", "ranktuner-approx"],
                                                     rank_by=["weight"], scope=["sequence"], k=[10], bootstrap=40,
                                                     seed=4))
    run = runs.load_run(stats)
    weights = compare.run_weights(run, [get_method(m) for m in ("entropy", "inv-prob", "ranktuner-approx")],
                                  {}, CompareConfig(bootstrap=0, seed=4),
                                  [])
    rng = np.random.default_rng(4)
    n_seq = len(run.seq_names)
    rows_of = [np.flatnonzero(run.seq_codes == c) for c in range(n_seq)]
    reps = {m: [] for m in weights}
    for _ in range(40):
        draw = rng.integers(0, n_seq, size=n_seq)
        rows = np.concatenate([rows_of[c] for c in draw])
        codes = np.repeat(np.arange(n_seq), [len(rows_of[c]) for c in draw])
        for m, w in weights.items():
            reps[m].append(metrics.topk_metrics(w[rows], run.is_noise[rows], codes, 0.10, "sequence")["tok_rec"])
    pairs = res.pairs.set_index(["a", "b"])
    for a in weights:
        for b in weights:
            if a != b:
                diff = np.asarray(reps[b]) - np.asarray(reps[a])
                less = res.table.set_index("method").loc[a, "tok_rec"] < res.table.set_index("method").loc[b, "tok_rec"]
                assert pairs.loc[(a, b), "sure"] == int(less and np.quantile(diff, 0.025) > 0), (a, b)
    lo = res.table.set_index("method").loc["entropy", "tok_rec_lo"]
    assert lo == pytest.approx(np.quantile(reps["entropy"], 0.025), abs=1e-12)


def test_sweep_agrees_with_compare(tmp_path):
    stats = write_stats(tmp_path / "s.parquet", make_stats(30, seed=7))
    chosen = ["sft", "eaft", "talr", "ranktuner-approx"]
    res = sweep.run_sweep([stats], None, SweepConfig(methods=chosen, k=[10], bootstrap=30, seed=2, batch_seqs=7))
    cmp = compare.run_compare([stats], None, CompareConfig(methods=chosen, rank_by=list(metrics.RANK_BY),
                                                           scope=list(metrics.SCOPES), bootstrap=30, seed=2,
                                                           batch_seqs=7))
    got = res.table[res.table["noise"] == "all"].set_index(["rank_by", "scope", "method"])
    want = cmp.table.set_index(["rank_by", "scope", "method"])
    for col in ("tok_prec", "tok_rec", "seq_hit", "lift", "tok_rec_lo", "tok_rec_hi", "seq_hit_lo"):
        pd.testing.assert_series_equal(got[col].sort_index(), want[col].sort_index(), check_names=False, rtol=1e-12)
    by_kind = cmp.by_kind.set_index(["rank_by", "scope", "method", "kind"])["tok_rec"].sort_index()
    per_kind = res.table[res.table["noise"] != "all"].set_index(["rank_by", "scope", "method", "noise"])["tok_rec"]
    np.testing.assert_allclose(per_kind.sort_index().to_numpy(), by_kind.to_numpy(), rtol=1e-12)
    # every setting: 3 rank-bys × 2 scopes × 1 cut × (all + 3 kinds) × 4 methods
    assert len(res.table) == 3 * 2 * 4 * 4


def test_outputs_written_whole_and_notes(tmp_path):
    a = write_stats(tmp_path / "a.parquet", make_stats(20, seed=1), model="model-A")
    b = write_stats(tmp_path / "b.parquet", drop_column(make_stats(20, seed=1), "sum_p2"), model="model-B")
    res = sweep.run_sweep([a, b], tmp_path / "out", SweepConfig(methods=["sft", "eaft", "inv-prob"], bootstrap=10,
                                                                claim="eaft < inv-prob"), writer=write_sweep)
    out = tmp_path / "out"
    for name in ("sweep.csv", "pairs.csv", "claim.csv", "robustness.md", "robustness.png", "sweep.json"):
        assert (out / name).is_file(), name
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == len(res.table) and set(table["k"]) == {1, 2, 5, 10, 20, 30}
    assert "grad" not in set(table.loc[table["run"] == "model-B", "rank_by"])  # no sum_p2 there
    md = (out / "robustness.md").read_text()
    assert "no sum_p2 column" in md and "## Claim: eaft < inv-prob" in md and "| **eaft** |" in md
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["claim"]["settings"] == len(res.claim)
    assert not any("different corpora" in n for n in res.notes)  # the same seq_ids, the same tokens
    c = write_stats(tmp_path / "c.parquet", hand_stats_table(H_A, corpus="other"), model="model-C")
    notes = sweep.run_sweep([a, c], None, SweepConfig(methods=["sft"], bootstrap=0)).notes
    assert any("different corpora" in n for n in notes)
    retok = make_stats(20, seed=1)
    retok = retok.set_column(retok.schema.get_field_index("token_id"), "token_id",
                             pa.array(np.arange(retok.num_rows, dtype=np.int32)))
    d = write_stats(tmp_path / "d.parquet", retok, model="model-D")
    notes = sweep.run_sweep([a, d], None, SweepConfig(methods=["sft"], bootstrap=0)).notes
    assert any("different tokenizers" in n for n in notes) and not any("corpora" in n for n in notes)


def test_bad_options(hand_runs):
    with pytest.raises(AuditError, match="--k"):
        hand_sweep(hand_runs, k=[0])
    with pytest.raises(AuditError, match="--bootstrap"):
        sweep.run_sweep(hand_runs, None, SweepConfig(bootstrap=-1))
    assert math.isnan(metrics.nan_quantile(np.full((5, 1), np.nan), (0.5,))[0, 0])


@pytest.mark.slow
def test_command_line_exit_codes(hand_runs, tmp_path):
    """0 when the claim holds everywhere, 1 when it fails somewhere (settings listed), 2 for an unknown method."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from reweight_audit.cli import app

    args = ["sweep", *map(str, hand_runs), "-o", str(tmp_path / "out"), "--methods", "sft,dft,inv-prob,entropy",
            "--k", "25,50", "--rank-by", "weight", "--bootstrap", "0", "-q"]
    ok = CliRunner().invoke(app, [*args, "--claim", "dft < sft < inv-prob"])
    assert ok.exit_code == 0, ok.output
    assert "holds in 8 of 8 settings" in ok.output
    bad = CliRunner().invoke(app, [*args, "--claim", "dft < entropy < inv-prob"])
    assert bad.exit_code == 1 and "holds in 4 of 8 settings" in bad.output
    assert bad.output.count("  fails: ") == 4 and bad.output.count("  holds: ") == 4
    unknown = subprocess.run([sys.executable, "-m", "reweight_audit", *args, "--claim", "dft < nope"],
                             capture_output=True, text=True, timeout=600)
    assert unknown.returncode == 2 and "registered: sft, random, dft" in unknown.stderr
    assert len([line for line in unknown.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.slow
def test_a_sweep_is_refused_while_another_writes_its_folder(hand_runs, tmp_path):
    """One sweep at a time into a folder, refused before any table is read; the earlier folder stays as it was."""
    import subprocess
    import sys

    from reweight_audit.core.io import lock_path

    out = tmp_path / "out"
    sweep.run_sweep(hand_runs, out, SweepConfig(methods=["sft", "dft"], bootstrap=0), writer=write_sweep)
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom reweight_audit.core.io import acquire_lock\n"
                               "lock = acquire_lock(sys.argv[1])\nprint('held', flush=True)\nsys.stdin.read()\n"
                               "lock.release()",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AuditError, match=rf"^{out}: another run is writing it \(pid {holder.pid} on host"):
            sweep.run_sweep(hand_runs, out, SweepConfig(methods=["sft", "inv-prob"], bootstrap=0), writer=write_sweep)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before
    assert not lock_path(out).exists()


def test_an_interrupted_sweep_says_so_and_leaves_the_earlier_folder(hand_runs, tmp_path, monkeypatch, capsys):
    import signal
    import sys

    from reweight_audit import cli

    from reweight_audit.reporting import sweep_report
    from reweight_audit.core.io import lock_path

    out = tmp_path / "out"
    sweep.run_sweep(hand_runs, out, SweepConfig(methods=["sft", "dft"], bootstrap=0), writer=write_sweep)
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    def interrupted(*args, **kwargs):  # mid-write: the CSV files are in the temporary folder, the plot not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_report, "plot_pair_matrix", interrupted)
    around = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main's SIGTERM handler stays out of pytest
    monkeypatch.setattr(sys, "argv", ["reweight-audit", "sweep", *map(str, hand_runs), "-o", str(out), "-q"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    err = capsys.readouterr().err
    assert ended.value.code == 130
    assert err.strip() == f"interrupted: {out} is unchanged (an earlier sweep stays whole); run the command again"
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before and not lock_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == around  # no temporary folder left

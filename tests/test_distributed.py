"""Data-parallel scoring: 2 CPU processes (gloo) give the single-process table; failures reach every rank."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from helpers import write_noisy
from reweight_audit.core.errors import AuditError
from reweight_audit.scoring.config import ScoreConfig
from reweight_audit.scoring.engine import run_score
from reweight_audit.scoring.shards import assign_to_ranks


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "reweight_audit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def sorted_table(path):
    return pd.read_parquet(path).sort_values(["seq_id", "pos"]).reset_index(drop=True)


@pytest.fixture()
def corpus(tmp_path, noisy_rows):
    rows = [dict(r, id=f"{r['id']}-{i}") for i in range(4) for r in noisy_rows]
    return write_noisy(tmp_path / "noisy.jsonl", rows)


@pytest.mark.slow
def test_two_processes_give_the_single_process_table(tmp_path, tiny_model, corpus):
    single = tmp_path / "single.parquet"
    run_score(corpus, single, ScoreConfig(model=str(tiny_model), device="cpu", batch_tokens=60, chunk_rows=8))
    multi = tmp_path / "multi.parquet"
    result = torchrun("score", str(corpus), "-o", str(multi), "--model", str(tiny_model), "--device", "cpu",
                      "--batch-tokens", "60", "--chunk-rows", "8", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = sorted_table(single), sorted_table(multi)
    pd.testing.assert_frame_equal(a.drop(columns=["logp", "entropy", "expected_rank", "topk_entropy", "sum_p2"]),
                                  b.drop(columns=["logp", "entropy", "expected_rank", "topk_entropy", "sum_p2"]))
    for column in ("logp", "entropy", "expected_rank", "topk_entropy", "sum_p2"):
        pd.testing.assert_series_equal(a[column], b[column], rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "multi.parquet.shards").exists()


@pytest.mark.slow
def test_resume_with_another_world_size(tmp_path, tiny_model, corpus):
    cfg = ScoreConfig(model=str(tiny_model), device="cpu", batch_tokens=60, chunk_rows=8)
    full = tmp_path / "full.parquet"
    run_score(corpus, full, cfg)
    out = tmp_path / "out.parquet"

    class Killed(Exception):
        pass

    def die(seqs, tokens, total):
        if seqs >= 4:
            raise Killed

    with pytest.raises(Killed):
        run_score(corpus, out, cfg, progress=die)
    assert len(list((tmp_path / "out.parquet.shards").glob("batch-*.parquet"))) >= 1
    result = torchrun("score", str(corpus), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                      "--batch-tokens", "60", "--chunk-rows", "8", "--quiet", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = sorted_table(full), sorted_table(out)
    pd.testing.assert_frame_equal(a[["seq_id", "pos", "token_id", "rank", "is_noise"]], b[["seq_id", "pos", "token_id", "rank", "is_noise"]])


@pytest.mark.slow
def test_a_bad_model_fails_every_rank_with_one_clear_error(tmp_path, corpus):
    result = torchrun("score", str(corpus), "-o", str(tmp_path / "x.parquet"), "--model", str(tmp_path / "missing" / "m"),
                      "--device", "cpu", "--quiet")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # every rank that got to print says the same thing (torchrun may stop a rank first)
    assert errors and set(errors) == {f"error: rank 0: --model {tmp_path / 'missing' / 'm'}: no such directory; check the path"}


def _agree_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    from reweight_audit.scoring.distributed import agree

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        agree(AuditError("model failed to load") if rank == 1 else None, world)
        queue.put((rank, "passed"))
    except AuditError as exc:
        queue.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_agree_raises_one_ranks_error_on_every_rank():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_agree_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {0: "rank 1: model failed to load", 1: "rank 1: model failed to load"}


def test_rank_assignment_balances_padded_tokens():
    costs = [100, 90, 80, 10, 10, 10, 10, 400]
    owner = assign_to_ranks(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert sorted(loads) == [310, 400]
    assert assign_to_ranks(costs, 2) == owner
    assert assign_to_ranks(costs, 1) == [0] * len(costs)


LEAVE = """
import sys
from reweight_audit.scoring import distributed
distributed.leave_after_gloo(5)  # no gloo group ran: returns
print("still here", end="")
distributed._ran_gloo = True
distributed.leave_after_gloo({code!r})
print("not reached")
"""


@pytest.mark.parametrize(("code", "status", "stderr"), [(None, 0, ""), (2, 2, ""), ("bad input", 1, "bad input\n")])
def test_a_rank_that_ran_gloo_leaves_at_once_with_its_output_flushed(code, status, stderr):
    result = subprocess.run([sys.executable, "-c", LEAVE.format(code=code)], capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (status, "still here", stderr)

"""Helpers shared by several test modules: synthetic statistics tables, writers and brute-force references.

Test modules import these (``from helpers import make_stats``) and never import each other; fixtures live in
conftest.py. pytest puts tests/ on ``sys.path`` (the default "prepend" import mode, tests/ has no __init__.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from reweight_audit.evaluation import sweep
from reweight_audit.methods import compute_weights, get_method
from reweight_audit.scoring.stats import EXPECTED_RANK_RTOL, TOPK

# ------------------------------------------------------------------------------------------------ files


def write_noisy(path: Path, rows: list[dict]) -> Path:
    """Write records as a noisy JSONL corpus (one JSON object a line, UTF-8 kept as is)."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_stats(path: Path, table: pa.Table, model: str | None = None) -> Path:
    """Write a statistics table as parquet, with a manifest naming the model when one is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    if model is not None:
        Path(str(path) + ".manifest.json").write_text(json.dumps({"model": model}))
    return path


# ------------------------------------------------------------------------------------------------ statistics tables

KINDS = ("filler", "hedge", "typo")
WORDS = ("the", " sum", " of", " x", " is", " 41", ".", " Then", " we", " umm", "\n", " <b>", " a&b", ' "q"')


def make_stats(n_seqs: int = 60, *, seed: int = 0, noise_rate: float = 0.08, clean_frac: float = 0.25,
               ref: bool = False, odd_token: str | None = None) -> pa.Table:
    """A plausible per-token statistics table: R ≤ 1/p, E[R] above the Massey bound, p² ≤ Σp² ≤ p² + (1−p)²."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(15, 60, size=n_seqs)
    n = int(lengths.sum())
    seq = np.repeat(np.arange(n_seqs), lengths)
    pos = np.concatenate([np.arange(L) for L in lengths]).astype(np.int32)
    clean_seq = rng.random(n_seqs) < clean_frac
    noise = (rng.random(n) < noise_rate) & ~clean_seq[seq]
    ent = rng.gamma(1.5, 0.8, size=n) + noise * rng.gamma(2.0, 0.8, size=n)
    logp = -rng.gamma(0.6, 1.2, size=n) - noise * rng.gamma(1.5, 1.5, size=n)
    p = np.exp(logp)
    rank = 1 + np.floor(rng.random(n) * (1.0 / p - 1.0))
    h_bits = ent / math.log(2)
    massey = np.where(h_bits >= 2, 2.0 ** (h_bits - 2) + 1, 1.0)
    er = massey * (1 + rng.gamma(1.0, 0.5, size=n))
    sum_p2 = p * p + (1 - p) ** 2 * rng.random(n) ** 2
    kinds = np.where(noise, np.array(KINDS)[rng.integers(0, len(KINDS), size=n)], "")
    tokens = np.array(WORDS)[rng.integers(0, len(WORDS), size=n)].astype(object)
    if odd_token is not None:
        noisy_rows = np.flatnonzero(noise)
        first_per_seq = noisy_rows[np.unique(seq[noisy_rows], return_index=True)[1]]
        tokens[first_per_seq] = odd_token  # the first noise token of every sequence
    cols = {
        "seq_id": pa.array([f"seq-{i:03d}" for i in seq]),
        "pos": pa.array(pos, pa.int32()),
        "token_id": pa.array(rng.integers(0, 500, size=n).astype(np.int32)),
        "token": pa.array(list(tokens), pa.string()),
        "logp": pa.array(logp.astype(np.float32)),
        "entropy": pa.array(ent.astype(np.float32)),
        "rank": pa.array(rank.astype(np.int64)),
        "expected_rank": pa.array(er.astype(np.float64)),
        "topk_entropy": pa.array(np.minimum(ent, math.log(20)).astype(np.float32)),
        "sum_p2": pa.array(sum_p2.astype(np.float32)),
    }
    if ref:
        cols["ref_logp"] = pa.array((logp + rng.normal(0, 0.5, size=n)).clip(max=0).astype(np.float32))
    cols["is_noise"] = pa.array(noise)
    cols["noise_kind"] = pa.array(list(kinds), pa.string())
    return pa.table(cols)


# Two sequences of four tokens; the noise is s1's 2nd and s2's 3rd token. Probabilities and entropies are chosen so
# that every method's token recall can be counted by hand (see test_sweep.py's test_pair_shares_hand_counted).
P = [0.9, 0.2, 0.6, 0.8, 0.7, 0.5, 0.1, 0.95]
NOISE = [False, True, False, False, False, False, True, False]
H_A = [0.5, 2.0, 3.0, 0.1, 1.0, 2.5, 0.2, 0.3]
H_B = [0.5, 2.0, 3.0, 0.1, 1.0, 2.5, 5.0, 0.3]  # s2's noise token now has the highest entropy


def hand_stats_table(entropy: list[float], corpus: str = "s") -> pa.Table:
    """The hand-counted eight-token statistics table (probabilities P, noise NOISE) with the given entropies."""
    return pa.table({
        "seq_id": [f"{corpus}1"] * 4 + [f"{corpus}2"] * 4, "pos": pa.array([0, 1, 2, 3] * 2, pa.int32()),
        "token": ["t"] * 8, "logp": pa.array(np.log(P), pa.float32()), "entropy": pa.array(entropy, pa.float32()),
        "is_noise": NOISE, "noise_kind": ["filler" if n else "" for n in NOISE]})


def hand_sweep(paths, **kw):
    """A small sweep over the hand-counted runs: four methods, cuts 25% and 50%, both scopes, no bootstrap."""
    from reweight_audit.evaluation.config import SweepConfig

    kw = {"methods": ["sft", "dft", "inv-prob", "entropy"], "k": [25, 50], **kw}
    return sweep.run_sweep(paths, None, SweepConfig(rank_by=["weight"], scope=["global", "sequence"], bootstrap=0,
                                                    **kw))


# ------------------------------------------------------------------------------------------------ token statistics


def reference(logits: torch.Tensor, targets: torch.Tensor, topk: int = TOPK) -> dict[str, torch.Tensor]:
    """Brute force, one row at a time, in float64: softmax, sort, count."""
    z_all = logits.double()
    rows, vocab = z_all.shape
    out = {
        "logp": torch.full((rows,), math.nan, dtype=torch.float64),
        "entropy": torch.full((rows,), math.nan, dtype=torch.float64),
        "rank": torch.zeros(rows, dtype=torch.int64),
        "expected_rank": torch.full((rows,), math.nan, dtype=torch.float64),
        "topk_entropy": torch.full((rows,), math.nan, dtype=torch.float64),
        "sum_p2": torch.full((rows,), math.nan, dtype=torch.float64),
        "finite": torch.zeros(rows, dtype=torch.bool),
    }
    for i in range(rows):
        z = z_all[i]
        t = int(targets[i])
        if torch.isnan(z).any() or (z == math.inf).any():
            continue
        out["finite"][i] = True
        m = z.max()
        w = torch.exp(z - m)
        p = w / w.sum()
        out["logp"][i] = z[t] - m - torch.log(w.sum())
        nz = p > 0
        out["entropy"][i] = -(p[nz] * torch.log(p[nz])).sum()
        out["rank"][i] = int((z >= z[t]).sum())
        ordered = torch.sort(p, descending=True).values
        out["expected_rank"][i] = (torch.arange(1, vocab + 1, dtype=torch.float64) * ordered).sum()
        top = torch.topk(z, min(topk, vocab)).values  # sorted, largest first
        q = torch.exp(top - top[0])
        q = q / q.sum()
        qnz = q > 0
        out["topk_entropy"][i] = -(q[qnz] * torch.log(q[qnz])).sum()
        out["sum_p2"][i] = (p * p).sum()
    return out


def assert_matches(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """token_statistics' output equals the float64 reference within the tolerances of test_stats.py's docstring."""
    assert torch.equal(got["finite"], ref["finite"])
    ok = ref["finite"]
    assert torch.equal(got["rank"][ok], ref["rank"][ok])
    for key in ("logp", "entropy", "topk_entropy"):
        torch.testing.assert_close(got[key][ok].double(), ref[key][ok], rtol=1e-5, atol=1e-5, msg=key)
    torch.testing.assert_close(got["sum_p2"][ok].double(), ref["sum_p2"][ok], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got["expected_rank"][ok], ref["expected_rank"][ok], rtol=1e-6, atol=0.0)
    # the certified bound never exceeds the tolerance after the fallback
    assert (got["expected_rank_error_bound"][ok] <= EXPECTED_RANK_RTOL * got["expected_rank"][ok]).all()


def gumbel(rows: int, vocab: int, g: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    """Gumbel-distributed logits (float32): realistic heavy-topped rows."""
    u = torch.rand(rows, vocab, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u)) * scale).float()


# ------------------------------------------------------------------------------------------------ report pages

#: The methods of the small compare behind the report.html tests: Table 1's three, two others, two controls.
PAGE_METHODS = ["sft", "entropy", "eaft", "dft", "talr", "ranktuner-approx", "position", "rarity"]
#: A run label with markup in it: every page must show it as text.
EVIL_MODEL = "<script>alert(1)</script>&"


def small_report(folder: Path):
    """A small two-run compare written to ``folder/out`` (its report.html): controls, strata, bootstrap, markup
    in a run label and in tokens. Returns the result."""
    from reweight_audit.evaluation.compare import run_compare
    from reweight_audit.evaluation.config import CompareConfig
    from reweight_audit.reporting.exports import write_exports

    a = write_stats(folder / "a.parquet", make_stats(24, seed=1, odd_token="<img src=x onerror=alert(1)>"),
                    model=EVIL_MODEL)
    b = write_stats(folder / "b.parquet", make_stats(24, seed=2), model="m-b")
    config = CompareConfig(methods=PAGE_METHODS, bootstrap=20, stratify=["position"], heatmap_sequences=3)
    return run_compare([a, b], folder / "out", config, writer=write_exports)


# ------------------------------------------------------------------------------------------------ training


def brute_statistics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    """Every statistic in float64 from full softmaxes and a full sort (the definitions, no shortcuts)."""
    z = logits.double()
    lp = torch.log_softmax(z, -1)
    p = lp.exp()
    zt = z.gather(1, targets[:, None])
    order = torch.sort(p, -1, descending=True).values
    positions = torch.arange(1, z.shape[1] + 1, dtype=torch.float64)
    top = torch.log_softmax(torch.topk(z, TOPK, -1).values, -1)
    return {
        "logp": lp.gather(1, targets[:, None])[:, 0].numpy(),
        "entropy": -(p * lp).sum(-1).numpy(),
        "rank": (z >= zt).sum(-1).numpy(),
        "expected_rank": (order * positions).sum(-1).numpy(),
        "topk_entropy": -(top.exp() * top).sum(-1).numpy(),
        "sum_p2": (p * p).sum(-1).numpy(),
    }


def gradient_test_params(method: str, vocab: int) -> dict:
    """ProFit's default gate (p >= 0.1) passes no token of a near-uniform tiny model: set it at 1/V so it cuts."""
    return {"tau": 1.0 / vocab} if method == "profit" else {}


def naive_loss(logits: torch.Tensor, labels: torch.Tensor, method: str, ref_logits: torch.Tensor | None,
               params: dict | None = None):
    """w.detach() * cross_entropy(reduction="none") over the full shifted logits; w from the numpy registry."""
    vocab = logits.shape[-1]
    z = logits[:, :-1].reshape(-1, vocab)
    t = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(z.float(), t, reduction="none", ignore_index=-100)
    keep = t != -100
    kept_t = t[keep]
    cols = brute_statistics(z.detach()[keep], kept_t)
    cols["token_id"] = kept_t.numpy()
    cols["pos"] = ((labels[:, 1:] != -100).cumsum(1) - 1)[labels[:, 1:] != -100].numpy()
    cols["seq_len"] = (labels[:, 1:] != -100).sum(1, keepdim=True).expand(-1, labels.shape[1] - 1)[
        labels[:, 1:] != -100].numpy()
    if ref_logits is not None:
        cols["ref_logp"] = torch.log_softmax(ref_logits[:, :-1].reshape(-1, vocab).double(), -1)[keep].gather(
            1, kept_t[:, None])[:, 0].numpy()
    w = torch.zeros(t.shape, dtype=torch.float64)
    w[keep] = torch.from_numpy(compute_weights(get_method(method), cols, params=params, seed=0))
    return (w.float().detach() * ce).sum() / keep.sum()

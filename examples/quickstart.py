"""Quickstart: an audit from Python, end to end, then a weighting method of your own.

    python examples/quickstart.py                      # CHAMP's first 40 problems, default model (SmolLM2-135M)
    python examples/quickstart.py --limit 270 -o reports/quickstart
    python examples/quickstart.py --model DIR          # any model `reweight-audit score --model` takes

The same three steps as `reweight-audit inject | score | compare`, on tables in memory.
"""
from __future__ import annotations

import argparse

import numpy as np

import reweight_audit as ra
from reweight_audit.methods import register


# A method of your own: one decorated function of the per-token statistics (docs/methods.md).
@register("sqrt-nll", family="loss", needs=("logp",), formula="w = sqrt(-log p_t)", source="examples/quickstart.py")
def sqrt_nll(columns, *, batch=None, rng=None):
    return np.sqrt(-columns["logp"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="what `score --model` takes (default: SmolLM2-135M GGUF)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=40, help="CHAMP problems to use (of 270)")
    parser.add_argument("-o", "--output", help="also write the report folder here")
    args = parser.parse_args()

    # 1. labelled noise in the responses: fillers, hedges and typos at 10% of word boundaries
    noisy = ra.inject("champ", noise="filler,hedge,typo", rate=0.1, clean_frac=0.1, seed=0, limit=args.limit)
    print(f"inject: {len(noisy)} responses, {sum(map(len, noisy['spans']))} noise spans")

    # 2. one forward pass: the statistics of every response token
    stats = ra.score(noisy, model=args.model, device=args.device)
    print(f"score: {len(stats):,} tokens, {int(stats['is_noise'].sum()):,} of them noise\n")

    # 3. how much of each method's top 10% is noise, the method above among them
    result = ra.compare(stats, methods=["sft", "dft", "nll", "ranktuner", "sqrt-nll"], k=10)
    print(result.to_markdown())
    if args.output:
        files = result.save(args.output)
        print(f"wrote {len(files)} files to {args.output}/")


if __name__ == "__main__":
    main()

"""Throughput cost of two gpt options, measured through roundhouse's loop: RoPE against learned
positions, and bf16 autocast against fp32.

Each round trains gpt:<flavor> once per variant (interleaved, so both share the machine's
load); a variant's figure is the median over rounds of the loop's median `train/samples_per_s`
window (first window excluded), reported in tokens/s.

    python benchmarks/gpt_options.py [--flavor small] [--rounds 3] [--steps 30]

Prints `RESULT rope_vs_learned ours=<rope tokens/s> baseline=<learned tokens/s> ...` and
`RESULT bf16_vs_fp32 ours=<bf16 tokens/s> baseline=<fp32 tokens/s> ...`.
"""

from __future__ import annotations

import argparse
import logging
import statistics

from mfu import SHAPES, add_common_args, result, train_rate

VARIANTS = {
    "rope": {"model.options": {"positions": "rope"}},
    "learned": {"model.options": {"positions": "learned"}},
    "fp32": {"trainer.precision": "fp32"},
    "bf16": {"trainer.precision": "bf16"},
}
PAIRS = {"rope_vs_learned": ("rope", "learned"), "bf16_vs_fp32": ("bf16", "fp32")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=list(PAIRS), default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    pairs = {args.only: PAIRS[args.only]} if args.only else PAIRS
    seq_len = args.seq_len or SHAPES[args.flavor][0]
    rates: dict[str, list[float]] = {v: [] for pair in pairs.values() for v in pair}
    for r in range(args.rounds):
        for variant in rates:
            rates[variant].append(train_rate(args, **VARIANTS[variant]) * seq_len)
        line = ", ".join(f"{v}={x[-1]:.0f}" for v, x in rates.items())
        print(f"round {r}: {line} tokens/s", flush=True)
    for name, (ours, base) in pairs.items():
        o, b = statistics.median(rates[ours]), statistics.median(rates[base])
        print(result(f"{name}_gpt_{args.flavor}", o, b, "tokens/s"))


if __name__ == "__main__":
    main()

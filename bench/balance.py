"""Benchmark: how evenly naive, LPT and Karmarkar-Karp spread a step's compute over ranks.

Each step samples a global batch of real documents (a Topical-Chat prompt plus its
reply, lengths in bytes = byte-level tokens, from ``bench/data/topical_chat_lengths.csv``),
costs each document with ``CostModel.from_config`` of a model preset (linear
projection/MLP term plus quadratic attention term), partitions the batch over
``world_size`` ranks, and records the imbalance max/mean of per-rank cost — the
factor by which a step is slower than a perfectly balanced one — and the time the
planning took. Prints a table, then one JSON line with every number.

    PYTHONPATH=src python bench/balance.py [--steps 200] [--batch 512] [--preset base]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import statistics
import time
from pathlib import Path

from outlast.train.balance import METHODS, CostModel, imbalance, partition
from outlast.train.model import ModelConfig

LENGTHS_CSV = Path(__file__).resolve().parent / "data" / "topical_chat_lengths.csv"
WORLD_SIZES = (2, 4, 8, 16)


def read_lengths(path: Path) -> list[int]:
    with open(path) as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return [int(r["prompt_bytes"]) + int(r["reply_bytes"]) for r in rows]


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description="rank balancing benchmark")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=512, help="documents per global batch")
    parser.add_argument("--preset", default="base", help="model preset whose dims set the cost model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    lengths = read_lengths(LENGTHS_CSV)
    cost = CostModel.from_config(ModelConfig.preset(args.preset))
    rng = random.Random(args.seed)
    # The same sampled batches for every world size and method, so rows compare like with like.
    batches = [[cost(n) for n in rng.sample(lengths, args.batch)] for _ in range(args.steps)]

    results = []
    for world_size in WORLD_SIZES:
        for method in METHODS:
            ratios, plan_ms = [], []
            for costs in batches:
                t0 = time.perf_counter()
                parts = partition(costs, world_size, method)
                plan_ms.append((time.perf_counter() - t0) * 1e3)
                ratios.append(imbalance(parts, costs))
            results.append(
                {
                    "world_size": world_size,
                    "method": method,
                    "imbalance_mean": round(statistics.fmean(ratios), 5),
                    "imbalance_p95": round(p95(ratios), 5),
                    "imbalance_max": round(max(ratios), 5),
                    "plan_ms_mean": round(statistics.fmean(plan_ms), 3),
                    "plan_ms_p95": round(p95(plan_ms), 3),
                }
            )

    print(
        f"{args.steps} steps x {args.batch} docs/step from {len(lengths)} Topical-Chat prompt+reply lengths "
        f"(mean {statistics.fmean(lengths):.0f} B, max {max(lengths)} B); cost = "
        f"{cost.linear:.3g}*n + {cost.quadratic:.3g}*n^2 ({args.preset} preset)"
    )
    header = f"{'world':>5} {'method':>6} {'imb mean':>9} {'imb p95':>8} {'imb max':>8} {'plan ms':>8} {'ms p95':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['world_size']:>5} {r['method']:>6} {r['imbalance_mean']:>9.4f} {r['imbalance_p95']:>8.4f} "
            f"{r['imbalance_max']:>8.4f} {r['plan_ms_mean']:>8.3f} {r['plan_ms_p95']:>7.3f}"
        )
    print(
        json.dumps(
            {
                "bench": "balance",
                "steps": args.steps,
                "batch_docs": args.batch,
                "preset": args.preset,
                "seed": args.seed,
                "cost_linear": cost.linear,
                "cost_quadratic": cost.quadratic,
                "python": platform.python_version(),
                "results": results,
            },
            separators=(",", ":"),
        )
    )


if __name__ == "__main__":
    main()

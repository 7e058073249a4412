"""Planning at scale, with fake ranks in one process (pure planners: no I/O, no collectives).

A 70B-like decoder (80 layers, hidden 8192, MLP 28672, vocab 128256) laid out as FSDP x TP
(TP=8 within a node: q/k/v/gate/up sharded on dim 0, o/down on dim 1; FSDP shards every
TP-local block on dim 0). For each world size: the save plan (``plan_save``) and a load
plan onto a layout of half the ranks (``plan_load_reads``), the re-plan key a rank computes
to reuse a cached plan (``saving._signature``, O(own regions)), manifest bytes per chunk, and
Karmarkar-Karp rank balancing (2,048 documents over 128 ranks) against LPT's quality.
Issue 11's targets: plans for 4,096 ranks < 1 s; re-plan < 10 ms; <= 1 KiB per chunk;
KK <= 50 ms per step.

    PYTHONPATH=src python bench/scale.py [--ranks 256,1024,4096] [--budget 120]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import emit_json, print_table  # noqa: E402

from outlast import saving  # noqa: E402
from outlast.format import Chunk, Manifest, TensorEntry  # noqa: E402
from outlast.plan import RankMeta, RegionMeta, StoredChunk, TensorMeta, Want, plan_load_reads, plan_save  # noqa: E402
from outlast.regions import Box  # noqa: E402

H, F, V, L, TP = 8192, 28672, 128256, 80, 8


def tensors() -> dict[str, tuple[tuple[int, int], int]]:
    """fqn -> (shape, TP-sharded dim or -1)."""
    out = {"embed": ((V, H), 0), "head": ((V, H), 0), "norm": ((H, 1), -1)}
    for i in range(L):
        p = f"layers.{i}."
        out[p + "q"] = ((H, H), 0)
        out[p + "k"] = ((H // 8, H), 0)
        out[p + "v"] = ((H // 8, H), 0)
        out[p + "o"] = ((H, H), 1)
        out[p + "gate"] = ((F, H), 0)
        out[p + "up"] = ((F, H), 0)
        out[p + "down"] = ((H, F), 1)
        out[p + "n1"] = ((H, 1), -1)
        out[p + "n2"] = ((H, 1), -1)
    return out


def _cut(lo: int, n: int, parts: int, i: int) -> tuple[int, int]:
    a, b = lo + n * i // parts, lo + n * (i + 1) // parts
    return a, b - a


def rank_boxes(world: int, rank: int, ts: dict) -> list[tuple[str, Box]]:
    tp = TP if world >= TP else world
    fsdp = world // tp
    t, f = rank % tp, rank // tp
    out = []
    for fqn, (shape, dim) in ts.items():
        offs, sizes = [0, 0], list(shape)
        if dim >= 0:
            offs[dim], sizes[dim] = _cut(0, shape[dim], tp, t)
        offs[0], sizes[0] = _cut(offs[0], sizes[0], fsdp, f)
        out.append((fqn, Box(tuple(offs), tuple(sizes))))
    return out


def metas(world: int, ts: dict) -> list[RankMeta]:
    tm = {fqn: TensorMeta((fqn,), "BF16", shape, 2) for fqn, (shape, _) in ts.items()}
    return [RankMeta(tm, [RegionMeta(fqn, b) for fqn, b in rank_boxes(world, r, ts)]) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="256,1024,4096")
    ap.add_argument("--budget", type=float, default=300, help="skip larger world sizes once this many seconds are spent")
    args = ap.parse_args()
    ts = tensors()
    rows, out = [], []
    t_start = time.perf_counter()
    for world in [int(x) for x in args.ranks.split(",")]:
        if time.perf_counter() - t_start > args.budget:
            rows.append([world, "skipped (budget)", "", "", "", "", ""])
            continue
        ranks = metas(world, ts)
        t0 = time.perf_counter()
        plan = plan_save(ranks, writers_per_rank=1)
        t_save = time.perf_counter() - t0
        chunks = [StoredChunk(i.fqn, j, i.box, 2, 0) for j, i in enumerate(plan.items)]
        half = max(1, world // 2)
        wants = [Want(fqn, b, r, k) for r in range(half) for k, (fqn, b) in enumerate(rank_boxes(half, r, ts))]
        t0 = time.perf_counter()
        plan_load_reads(chunks, wants, half, verify=True)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        saving._signature(ranks[0], 1, 4 << 20)
        t_sig = time.perf_counter() - t0
        entries: dict[str, TensorEntry] = {}
        for j, i in enumerate(plan.items):
            e = entries.setdefault(i.fqn, TensorEntry([i.fqn], "BF16", ts[i.fqn][0]))
            e.chunks.append(Chunk(i.box, f"data/w{i.writer:05d}.safetensors", f"{i.fqn}#{j}", 0, 0, "0" * 16))
        m = Manifest(tensors=entries, plain={}, files={}, world_size=world)
        per_chunk = len(m.dumps()) / max(1, len(plan.items))
        rows.append([world, f"{t_save:.2f}", f"{t_load:.2f}", f"{t_sig * 1e3:.2f}", len(plan.items), f"{per_chunk:.0f}", f"{plan.balance_ratio():.3f}"])
        out.append({"ranks": world, "save_plan_s": round(t_save, 3), "load_plan_s": round(t_load, 3),
                    "replan_key_ms": round(t_sig * 1e3, 3), "chunks": len(plan.items), "manifest_bytes_per_chunk": round(per_chunk),
                    "save_balance": round(plan.balance_ratio(), 4)})
    print_table(["ranks", "save plan s", "load plan s (onto half)", "re-plan key ms", "chunks", "manifest B/chunk", "bytes max/mean"], rows,
                "planning a 70B-like FSDP x TP8 layout (targets: < 1 s, < 10 ms, <= 1024 B/chunk)")
    # Rank balancing: KK vs LPT over 2,048 documents on 128 ranks (lengths from a real chat set).
    from outlast.train.balance import imbalance, partition

    lengths_csv = os.path.join(HERE, "data", "topical_chat_lengths.csv")
    with open(lengths_csv) as f:
        lens = [int(a) + int(b) for a, b in (line.strip().split(",") for line in f if line[0].isdigit())]
    rnd = random.Random(0)
    res = {}
    for method in ("lpt", "kk"):
        times, cpu, imb = [], [], []
        for _ in range(5):
            costs = [float(x * x + 4096 * x) for x in rnd.sample(lens, 2048)]
            t0, c0 = time.perf_counter(), time.process_time()
            parts = partition(costs, 128, method)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)  # what a busy shared host does not inflate
            imb.append(imbalance(parts, costs))
        res[method] = {"ms_per_step": round(1e3 * sorted(times)[len(times) // 2], 1),
                       "cpu_ms_per_step": round(1e3 * sorted(cpu)[len(cpu) // 2], 1), "imbalance": round(sum(imb) / len(imb), 4)}
    print_table(["method", "ms per step (median of 5)", "CPU ms per step", "imbalance max/mean"],
                [[k, v["ms_per_step"], v["cpu_ms_per_step"], v["imbalance"]] for k, v in res.items()],
                "rank balancing: 2,048 documents over 128 ranks (target KK <= 50 ms)")
    emit_json({"bench": "scale", "plans": out, "balance": res})


if __name__ == "__main__":
    main()

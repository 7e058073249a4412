"""Planning at scale, with fake ranks in one process (pure planners: no I/O, no collectives).

A 70B-like decoder (80 layers, hidden 8192, MLP 28672, vocab 128256) laid out as FSDP x TP
(TP=8 within a node: q/k/v/gate/up/embed/head sharded on dim 0, o/down on dim 1; FSDP shards
every TP-local block on dim 0; norms replicated over TP): DTensors on a (tp, fsdp) mesh, 731
tensors per rank. For each world size, what one real rank does (``outlast.grid``):

* save: describe its layout (boxes + grid descriptors, checked against its own boxes) and
  digest it; from every rank's digest (all equal here: one class), plan the whole save in
  compact form (``plan_save_layouts``) and take its own write items (``for_rank``);
* load (onto half the ranks, same layout): detect the stored chunk grid from the chunks'
  offsets and sizes, plan by per-dim intersection (``plan_load_layouts``) and take its own
  reads (``view``);
* re-plan with an unchanged layout: the cache key (``saving._signature``) and its items.
* open the checkpoint's manifest (``--manifest``, 4,096 ranks by default): what every rank
  of a load does before planning, from the manifest bytes to the load planner's input:
  parse + validate (``Manifest.loads``) and the stored chunk grids
  (``loading.stored_grids``). The manifest lists the save plan's real chunks (files,
  keys, offsets, nbytes, row-block counts as a save writes them; checksums are random)
  once per chunk (format version 1, the form before grids) and as grids (version 2),
  both in the same run; its bytes and the writer's ``dumps`` time are shown too.

Wall and CPU (process) seconds are printed side by side (CPU is what a busy shared host
does not inflate). ``--baseline`` also runs the general planners (every rank's boxes,
``plan_save`` / ``plan_load_reads``: the path before grids, and still the fallback) up to
that world size. Manifest bytes per chunk are measured on the chunks of the first 40
tensors. Then Karmarkar-Karp rank balancing (2,048 documents over 128 ranks) against LPT.
Issue 11's targets: plans for 4,096 ranks < 1 s; re-plan < 10 ms; <= 1 KiB per chunk;
KK <= 50 ms per step.

    PYTHONPATH=src python bench/scale.py [--ranks 256,1024,4096] [--baseline 1024] [--budget 300]
                                         [--manifest 4096] [--manifest-baseline 4096]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import emit_json, print_table  # noqa: E402

from outlast import grid, loading, saving  # noqa: E402
from outlast.format import Chunk, Manifest, TensorEntry, grid_key  # noqa: E402
from outlast.regions import Box  # noqa: E402
from outlast.shards import block_rows_for  # noqa: E402
from outlast.plan import RankMeta, StoredChunk, TensorMeta, Want, plan_load_reads, plan_save  # noqa: E402

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


def specs(world: int) -> dict[int, grid.GridSpec]:
    """TP-sharded dim (or -1) -> the DTensor layout on a (tp, fsdp) mesh; rank = f * tp + t.

    Placements (Shard(dim) on tp, Shard(0) on fsdp): TP cuts first, FSDP cuts the
    TP-local block on dim 0 (torch's nested chunking). One spec object per placement,
    shared by every tensor, as layouts.py caches them per (mesh, placements).
    """
    tp = TP if world >= TP else world
    mesh = np.arange(world).reshape(world // tp, tp).T  # mesh[t, f] = f * tp + t
    return {d: grid.GridSpec((tp, world // tp), mesh.reshape(-1), (d, 0)) for d in (-1, 0, 1)}


def rank_meta(world: int, rank: int, ts: dict, sp: dict) -> RankMeta:
    """What saving._rank_meta gives rank ``rank``: its boxes and its grid descriptors."""
    tm = {fqn: TensorMeta((fqn,), "BF16", shape, 2) for fqn, (shape, _) in ts.items()}
    grids = {fqn: sp[d] for fqn, (_, d) in ts.items()}
    return RankMeta(tm, grid.expand(RankMeta(tm, [], grids), rank).regions, grids)


def clock():
    return time.perf_counter(), time.process_time()


def since(t):
    return time.perf_counter() - t[0], time.process_time() - t[1]


def saved_manifest(world: int, splan, ts: dict) -> Manifest:
    """The manifest a save by ``splan`` commits: every chunk with its file (one per writing
    rank), key, byte offset (packed per file after a 64 KiB header), nbytes and row-block
    checksums as ``outlast.shards`` writes them; checksums are random hex."""
    rng = np.random.default_rng(world)
    ends: dict[str, int] = {}
    entries: dict[str, TensorEntry] = {}
    for fqn in sorted(splan.per):
        shape = ts[fqn][0]
        e = entries[fqn] = TensorEntry([fqn], "BF16", shape)
        boxes = splan.boxes_of(fqn)
        digests = rng.integers(0, 2**63, size=len(boxes) * 2)
        for k, (box, r) in enumerate(boxes):
            f = f"data/w{r:05d}.safetensors"
            nb = box.numel * 2
            at = ends.get(f, 65536)
            ends[f] = at + nb
            br = block_rows_for(box, nb)
            blocks = tuple(f"{int(x):016x}" for x in rng.integers(0, 2**63, size=-(-box.sizes[0] // br))) if br else ()
            key = fqn if box == Box.full(shape) else grid_key(fqn, box.offsets)
            e.chunks.append(Chunk(box, f, key, at, nb, f"{int(digests[k]):016x}", br, blocks))
        e.chunks.sort(key=lambda c: c.box.offsets)  # as saving.build_manifest lists them
    return Manifest(tensors=entries, plain={}, files=ends, step=1, world_size=world)


def open_manifest_cost(data: bytes) -> tuple[tuple[float, float], Manifest, dict]:
    """(wall, CPU) seconds from manifest bytes to the load planner's stored grids."""
    t = clock()
    m = Manifest.loads(data, "manifest.json")
    sgs = loading.stored_grids(m, sorted(m.tensors))
    return since(t), m, sgs


def manifest_forms(world: int, splan, ts: dict, baseline: bool) -> tuple[list, dict]:
    """Rows and JSON for one world size: the per-chunk form (if ``baseline``) and the grid form."""
    built = saved_manifest(world, splan, ts)
    nchunks = sum(len(e.chunks) for e in built.tensors.values())
    rows, res = [], {"ranks": world, "chunks": nchunks}
    grids_seen = None
    for form in (["per-chunk (v1)"] if baseline else []) + ["grid (v2)"]:
        t = clock()
        data = built.dumps(grids=form.startswith("grid"))
        t_dump = since(t)
        cost, m, sgs = open_manifest_cost(data)
        n_grid = sum(e.grid is not None for e in m.tensors.values())
        found = {f: [c.tolist() for c in g.cuts] for f, g in sgs.items() if g is not None}
        if grids_seen is not None and found != grids_seen:
            raise SystemExit("the two forms gave the load planner different grids")
        grids_seen = found
        sample = sorted(m.tensors)[len(m.tensors) // 2]
        if m.tensors[sample].chunks != built.tensors[sample].chunks:
            raise SystemExit(f"{form}: {sample}'s chunks did not round-trip")
        key = "grid" if form.startswith("grid") else "per_chunk"
        res[key] = {"bytes": len(data), "bytes_per_chunk": round(len(data) / nchunks, 1), "dumps_s": round(t_dump[0], 3),
                    "dumps_cpu_s": round(t_dump[1], 3), "open_s": round(cost[0], 3), "open_cpu_s": round(cost[1], 3),
                    "grid_tensors": n_grid, "tensors_with_planner_grid": len(found)}
        rows.append([world, form, nchunks, f"{len(data) / 2**20:.1f}", f"{len(data) / nchunks:.1f}",
                     f"{t_dump[0]:.2f} / {t_dump[1]:.2f}", f"{cost[0]:.3f} / {cost[1]:.3f}", f"{n_grid} / {len(m.tensors)}"])
        del m, sgs, data
    return rows, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="256,1024,4096")
    ap.add_argument("--baseline", type=int, default=1024, help="also run the general planners up to this world size (0: never)")
    ap.add_argument("--budget", type=float, default=300, help="skip baselines once this many seconds are spent")
    ap.add_argument("--manifest", default="4096", help="world sizes whose manifest is opened ('' for none)")
    ap.add_argument("--manifest-baseline", type=int, default=4096, help="also the per-chunk form up to this world size (0: never)")
    args = ap.parse_args()
    ts = tensors()
    rows, base_rows, out = [], [], []
    man_rows, man_out = [], []
    man_worlds = {int(x) for x in args.manifest.split(",") if x}
    t_start = time.perf_counter()
    for world in [int(x) for x in args.ranks.split(",")]:
        sp = specs(world)
        half = max(1, world // 2)
        sp_half = specs(half)
        probe = sorted({0, world // 2, world - 1})
        # ---- save, as rank r: describe + digest (own tensors), plan (compact), own items
        t = clock()
        meta = grid.checked(rank_meta(world, 0, ts, sp), 0)
        digest = grid.layout_digest(meta)
        t_local = since(t)
        digests = [grid.layout_digest(grid.checked(rank_meta(world, r, ts, sp), r)) for r in probe]
        if meta.grids is None or len(set(digests) | {digest}) != 1:
            raise SystemExit("bench layout is not one grid class: the fast path would not be taken")
        t = clock()
        classes, rep = grid.exchange_classes([digest] * world)  # every rank's digest (all equal)
        sent = {0: grid.payload(meta, 0, rep)}
        splan = grid.plan_save_layouts([(ranks, sent[ranks[0]]) for ranks in classes], world, writers_per_rank=1)
        t_plan = since(t)
        t = clock()
        mine = splan.for_rank(0)
        t_mine = since(t)
        save = (t_local[0] + t_plan[0] + t_mine[0], t_local[1] + t_plan[1] + t_mine[1])
        # ---- re-plan, unchanged layout: the cache key and the (memoised) own items
        t = clock()
        saving._signature(meta, 1, 4 << 20)
        splan.for_rank(0)
        replan = since(t)
        # ---- the stored chunks (the save plan's items, compact): per tensor offsets/sizes
        stored_arrays = {}
        n_chunks = 0
        for fqn, tp_ in splan.per.items():
            cells, _ = splan.chunk_arrays(fqn)
            idx = np.stack(np.unravel_index(cells, tuple(tp_.counts.tolist())), axis=1)
            lo = np.stack([tp_.cuts[d][idx[:, d]] for d in range(idx.shape[1])], axis=1)
            hi = np.stack([tp_.cuts[d][idx[:, d] + 1] for d in range(idx.shape[1])], axis=1)
            stored_arrays[fqn] = (lo, hi - lo)
            n_chunks += len(cells)
        # ---- load onto half the ranks, as rank r: want descriptor, stored grids, plan, own view
        t = clock()
        want = grid.checked(rank_meta(half, 0, ts, sp_half), 0)
        wdigest = grid.layout_digest(want)
        t_wlocal = since(t)
        t = clock()
        sgs = {fqn: grid.stored_grid(ts[fqn][0], lo, sz, np.zeros(len(lo), dtype=np.int64), 2) for fqn, (lo, sz) in stored_arrays.items()}
        t_detect = since(t)
        t = clock()
        wclasses, wrep = grid.exchange_classes([wdigest] * half)
        lplan = grid.plan_load_layouts(sgs, [(r, grid.payload(want, 0, wrep)) for r in wclasses], half, verify=True)
        t_lplan = since(t)
        if lplan is None:
            raise SystemExit("stored chunks are not a grid: the fast path would not be taken")
        t = clock()
        view = lplan.view(0, {fqn: i for i, fqn in enumerate(ts)})
        t_view = since(t)
        parts = (t_wlocal, t_detect, t_lplan, t_view)
        load = (sum(p[0] for p in parts), sum(p[1] for p in parts))
        # ---- manifest bytes per chunk (chunks of the first 40 tensors)
        entries: dict[str, TensorEntry] = {}
        sample = 0
        for fqn in list(splan.per)[:40]:
            for box, r in splan.boxes_of(fqn):
                e = entries.setdefault(fqn, TensorEntry([fqn], "BF16", ts[fqn][0]))
                e.chunks.append(Chunk(box, f"data/w{r:05d}.safetensors", f"{fqn}#{sample}", 0, 0, "0" * 16))
                sample += 1
        per_chunk = len(Manifest(tensors=entries, plain={}, files={}, world_size=world).dumps()) / max(1, sample)
        rows.append([world, f"{save[0]:.3f} / {save[1]:.3f}", f"{t_plan[0]:.3f} / {t_plan[1]:.3f}", f"{1e3 * t_mine[1]:.1f}",
                     f"{load[0]:.3f} / {load[1]:.3f}", f"{t_lplan[0]:.3f} / {t_lplan[1]:.3f}", f"{1e3 * t_view[1]:.1f}",
                     f"{1e3 * replan[0]:.2f} / {1e3 * replan[1]:.2f}", n_chunks, f"{per_chunk:.0f}", f"{splan.balance_ratio():.3f}",
                     f"{max(lplan.bytes_read()) / (sum(lplan.bytes_read()) / half):.3f}"])
        res = {"ranks": world, "save_s": round(save[0], 4), "save_cpu_s": round(save[1], 4),
               "save_plan_s": round(t_plan[0], 4), "save_plan_cpu_s": round(t_plan[1], 4), "own_items_cpu_ms": round(1e3 * t_mine[1], 2),
               "own_items": len(mine), "load_s": round(load[0], 4), "load_cpu_s": round(load[1], 4),
               "load_plan_s": round(t_lplan[0], 4), "load_plan_cpu_s": round(t_lplan[1], 4), "stored_grid_cpu_s": round(t_detect[1], 4),
               "own_reads_cpu_ms": round(1e3 * t_view[1], 2), "own_reads": len(view.reads),
               "replan_ms": round(1e3 * replan[0], 3), "replan_cpu_ms": round(1e3 * replan[1], 3),
               "chunks": n_chunks, "manifest_bytes_per_chunk": round(per_chunk),
               "save_balance": round(splan.balance_ratio(), 4), "read_balance": round(max(lplan.bytes_read()) / (sum(lplan.bytes_read()) / half), 4)}
        # ---- the general planners on the same boxes (the path before grids; the fallback)
        if world <= args.baseline and time.perf_counter() - t_start < args.budget:
            metas = [rank_meta(world, r, ts, sp) for r in range(world)]
            t = clock()
            gplan = plan_save(metas, writers_per_rank=1)
            g_save = since(t)
            chunks = [StoredChunk(i.fqn, j, i.box, 2, 0) for j, i in enumerate(gplan.items)]
            wants = [Want(r.fqn, r.box, k, i) for k in range(half) for i, r in enumerate(rank_meta(half, k, ts, sp_half).regions)]
            t = clock()
            plan_load_reads(chunks, wants, half, verify=True)
            g_load = since(t)
            base_rows.append([world, f"{g_save[0]:.2f} / {g_save[1]:.2f}", f"{g_load[0]:.2f} / {g_load[1]:.2f}", len(gplan.items)])
            res |= {"general_save_plan_s": round(g_save[0], 3), "general_save_plan_cpu_s": round(g_save[1], 3),
                    "general_load_plan_s": round(g_load[0], 3), "general_load_plan_cpu_s": round(g_load[1], 3)}
            del metas, gplan, chunks, wants
        out.append(res)
        if world in man_worlds:
            r, j = manifest_forms(world, splan, ts, world <= args.manifest_baseline)
            man_rows += r
            man_out.append(j)
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    print_table(["ranks", "save s (wall / CPU)", "of which plan", "own items CPU ms", "load s (onto half)", "of which plan",
                 "own reads CPU ms", "re-plan ms", "chunks", "per-chunk form B/chunk", "write max/mean", "read max/mean"], rows,
                "one rank planning a 70B-like FSDP x TP8 layout by grids (targets: < 1 s, re-plan < 10 ms, <= 1024 B/chunk)")
    if man_rows:
        print_table(["ranks", "manifest form", "chunks", "MiB", "B/chunk", "dumps s (wall / CPU)", "open s (wall / CPU)", "grid tensors"],
                    man_rows, "opening the manifest at load: parse + validate + the planner's stored grids (target: well under 1 s)")
    if base_rows:
        print_table(["ranks", "save plan s (wall / CPU)", "load plan s (wall / CPU)", "chunks"], base_rows,
                    "the general planners on the same boxes (every rank's boxes; before grids, and the fallback)")
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
    emit_json({"bench": "scale", "load_average": open("/proc/loadavg").read().split()[:3], "plans": out, "manifest": man_out, "balance": res})


if __name__ == "__main__":
    main()

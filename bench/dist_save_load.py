"""Distributed save/load: outlast vs torch.distributed.checkpoint (DCP), side by side.

4 processes (gloo, CPU, file:// rendezvous) hold an FSDP2-sharded transformer-shaped
model (``--gib`` of fp32 parameters, default 1.0) and save it with outlast and with DCP
(FileSystemWriter), each into a fresh directory. Both fsync their files (outlast always;
DCP's FileSystemWriter has sync_files=True by default), and page-cache pages of the
checkpoints are dropped (posix_fadvise DONTNEED) before every load, so loads read the
disk. Then both load in the same layout (4 ranks), and 2 fresh processes load the
4-rank checkpoints (resharding 4 -> 2). Prints a table and a final JSON line.

    PYTHONPATH=src python bench/dist_save_load.py [--gib 1.0] [--world 4] [--load-world 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from _common import evict  # bench/ is on sys.path when run as a script

HIDDEN = 4096


def make_model(gib: float) -> nn.Module:
    n_layers = max(1, round(gib * (1 << 30) / (4 * (HIDDEN * HIDDEN + HIDDEN))))
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(HIDDEN, HIDDEN) for _ in range(n_layers)])
    return model


def sharded(gib: float, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = make_model(gib)
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_(generator=g)
    return model


def timed(fn) -> float:
    dist.barrier()
    t = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t


def checksum_state(sd) -> float:
    return float(sum(v.to_local().double().sum() for v in sd.values()))


def phase_save(rank: int, world: int, gib: float, root: str) -> dict:
    import torch.distributed.checkpoint as dcp

    import outlast

    model = sharded(gib, world)
    sd = model.state_dict()
    res = {"nbytes": sum(v.numel() * v.element_size() for v in sd.values())}
    prepared = {}

    def ol_save():
        p = outlast.prepare_save({"model": sd})
        outlast.persist(p, os.path.join(root, "outlast"))
        prepared["p"] = p

    res["outlast_save_s"] = timed(ol_save)
    rep = prepared["p"].report
    res["outlast_bytes_per_rank"] = rep.bytes_per_rank
    res["dcp_save_s"] = timed(lambda: dcp.save({"model": sd}, storage_writer=dcp.FileSystemWriter(os.path.join(root, "dcp"))))
    # DCP writes one file per rank; its bytes per rank are the sizes of those files.
    res["dcp_bytes_per_rank"] = sorted(
        os.path.getsize(os.path.join(root, "dcp", f)) for f in os.listdir(os.path.join(root, "dcp")) if f.endswith(".distcp")
    )
    ref = checksum_state(sd)
    res.update(load_both(rank, model, root, "same"))
    res["ok_same"] = abs(checksum_state(model.state_dict()) - ref) < 1e-6 * max(1.0, abs(ref))
    return res


def load_both(rank: int, model: nn.Module, root: str, tag: str) -> dict:
    import torch.distributed.checkpoint as dcp

    import outlast

    res = {}
    sd = model.state_dict()
    with torch.no_grad():
        for v in sd.values():
            v.to_local().zero_()
    if rank == 0:
        evict(os.path.join(root, "outlast"))
    reports = {}
    res[f"outlast_load_{tag}_s"] = timed(lambda: reports.setdefault("r", outlast.load({"model": sd}, os.path.join(root, "outlast"))))
    res[f"outlast_read_{tag}_bytes"] = reports["r"].bytes_read
    res[f"outlast_recv_{tag}_bytes"] = reports["r"].bytes_received
    ol = checksum_state(sd)
    with torch.no_grad():
        for v in sd.values():
            v.to_local().zero_()
    if rank == 0:
        evict(os.path.join(root, "dcp"))
    res[f"dcp_load_{tag}_s"] = timed(lambda: dcp.load({"model": sd}, storage_reader=dcp.FileSystemReader(os.path.join(root, "dcp"))))
    res[f"agree_{tag}"] = abs(checksum_state(sd) - ol) <= 1e-9 * max(1.0, abs(ol))
    return res


def phase_load(rank: int, world: int, gib: float, root: str) -> dict:
    model = sharded(gib, world)
    return load_both(rank, model, root, "reshard")


def _entry(rank, world, init, out, phase, gib, root):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(1)
    res = {"save": phase_save, "load": phase_load}[phase](rank, world, gib, root)
    with open(os.path.join(out, f"{phase}{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def run(phase: str, world: int, gib: float, root: str, out: str) -> list[dict]:
    init = "file://" + os.path.join(tempfile.mkdtemp(prefix="bench-rdzv-"), "store")
    mp.spawn(_entry, args=(world, init, out, phase, gib, root), nprocs=world, join=True)
    return [json.load(open(os.path.join(out, f"{phase}{r}.json"))) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--load-world", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write (default: a fresh temp dir)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench-dist-", dir=args.dir)
    out = tempfile.mkdtemp(prefix="bench-out-")
    try:
        s = run("save", args.world, args.gib, root, out)
        l = run("load", args.load_world, args.gib, root, out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = s[0]["nbytes"]  # global bytes (DTensor numel is global)
    gb = total / 1e9

    def mx(rows, k):
        return max(r[k] for r in rows)

    def bal(b):
        return max(b) / (sum(b) / len(b)) if sum(b) else 1.0

    rows = [
        ("save (4 ranks)", mx(s, "outlast_save_s"), mx(s, "dcp_save_s")),
        (f"load same layout ({args.world})", mx(s, "outlast_load_same_s"), mx(s, "dcp_load_same_s")),
        (f"load resharded ({args.world}->{args.load_world})", mx(l, "outlast_load_reshard_s"), mx(l, "dcp_load_reshard_s")),
    ]
    print(f"state: {gb:.3f} GB fp32 FSDP2 (Linear {HIDDEN}x{HIDDEN} stack), saved by {args.world} ranks, fsync on for both")
    print(f"{'operation':34s} {'outlast s':>10s} {'GB/s':>7s} {'DCP s':>9s} {'GB/s':>7s} {'outlast/DCP':>12s}")
    result = {"gb": gb, "world": args.world, "load_world": args.load_world, "ops": {}}
    for name, a, b in rows:
        ratio = (gb / a) / (gb / b)
        print(f"{name:34s} {a:10.2f} {gb / a:7.2f} {b:9.2f} {gb / b:7.2f} {ratio:12.2f}")
        result["ops"][name] = {"outlast_s": a, "dcp_s": b, "throughput_ratio": ratio}
    ol_b = s[0]["outlast_bytes_per_rank"]
    print(f"writer balance max/mean: outlast {bal(ol_b):.3f} {ol_b}  DCP {bal(s[0]['dcp_bytes_per_rank']):.3f}")
    print(f"bytes read per rank, same layout: {[r['outlast_read_same_bytes'] for r in s]}")
    print(f"bytes read per rank, resharded:   {[r['outlast_read_reshard_bytes'] for r in l]}  received: {[r['outlast_recv_reshard_bytes'] for r in l]}")
    print(f"results agree with DCP: same {all(r['agree_same'] for r in s)}, resharded {all(r['agree_reshard'] for r in l)}; reload exact: {all(r['ok_same'] for r in s)}")
    result.update(
        outlast_balance=bal(ol_b),
        dcp_balance=bal(s[0]["dcp_bytes_per_rank"]),
        bytes_read_same=[r["outlast_read_same_bytes"] for r in s],
        bytes_read_reshard=[r["outlast_read_reshard_bytes"] for r in l],
        agree=all(r["agree_same"] for r in s) and all(r["agree_reshard"] for r in l),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())

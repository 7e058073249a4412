"""Save and load a ~1 GiB transformer-shaped fp32 state: outlast vs torch.save vs DCP vs raw disk.

Every save is durable (fsync'd): torch.save is followed by an fsync of its file, DCP's
FileSystemWriter fsyncs by default (sync_files=True), outlast always fsyncs, and the raw
baseline writes the same bytes sequentially to one file and fsyncs it — the disk's limit.
Before every load the files are evicted from the page cache, so loads read the disk.
Loads are *in place* into an existing state (what resuming training does): outlast.load
and dcp.load fill the tensors; torch.load(weights_only=True) then copy_ into them.

Run:  python bench/save_load.py [--gib 1.0] [--repeat 3] [--dir /path/on/the/disk]
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit_json, evict, median, print_table  # noqa: E402

import outlast  # noqa: E402


def make_state(gib: float) -> dict[str, torch.Tensor]:
    """Embedding + transformer layers (qkv, out, mlp up/down, norms) of d_model 2048."""
    d, vocab = 2048, 32000
    g = torch.Generator().manual_seed(0)
    state = {"embed.weight": torch.randn(vocab, d, generator=g)}
    budget = int(gib * (1 << 30)) - state["embed.weight"].nbytes
    layer = 0
    while budget > 0:
        p = f"layers.{layer}."
        for name, shape in (("attn.qkv.weight", (3 * d, d)), ("attn.out.weight", (d, d)),
                            ("mlp.up.weight", (4 * d, d)), ("mlp.down.weight", (d, 4 * d)),
                            ("norm1.weight", (d,)), ("norm2.weight", (d,))):
            state[p + name] = torch.randn(*shape, generator=g)
            budget -= state[p + name].nbytes
        layer += 1
    return state


def nbytes(state) -> int:
    return sum(t.nbytes for t in state.values())


def raw_write(state, path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in state.values():
            mv = memoryview(t.view(torch.uint8).numpy().reshape(-1))
            while len(mv):
                n = os.write(fd, mv[: 64 << 20])
                mv = mv[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_write_parallel(state, path, n=4) -> None:
    """The same bytes split over n files written by n threads, each fsync'd."""
    from concurrent.futures import ThreadPoolExecutor

    os.makedirs(path)
    names = list(state)
    groups = [names[i::n] for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda i: raw_write({k: state[k] for k in groups[i]}, os.path.join(path, f"{i}.bin")), range(n)))


def raw_read(state, path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        for t in state.values():
            mv = memoryview(t.view(torch.uint8).numpy().reshape(-1))
            got = 0
            while got < len(mv):
                got += os.preadv(fd, [mv[got:]], off + got)
            off += len(mv)
    finally:
        os.close(fd)


def raw_read_parallel(state, path, n=4) -> None:
    from concurrent.futures import ThreadPoolExecutor

    names = list(state)
    groups = [names[i::n] for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda i: raw_read({k: state[k] for k in groups[i]}, os.path.join(path, f"{i}.bin")), range(n)))


def torch_save(state, path) -> None:
    torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def torch_load(state, path) -> None:
    loaded = torch.load(path, weights_only=True)
    for k, t in state.items():
        t.copy_(loaded[k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir under the cwd)")
    args = ap.parse_args()

    import torch.distributed.checkpoint as dcp

    state = make_state(args.gib)
    target = {k: torch.empty_like(v) for k, v in state.items()}
    size = nbytes(state)
    root = tempfile.mkdtemp(prefix="outlast-bench-", dir=args.dir or os.getcwd())
    methods = {
        "raw write+fsync": (lambda p: raw_write(state, p), lambda p: raw_read(target, p), "file"),
        "raw 4 files+fsync": (lambda p: raw_write_parallel(state, p), lambda p: raw_read_parallel(target, p), "dir"),
        "torch.save+fsync": (lambda p: torch_save(state, p), lambda p: torch_load(target, p), "file"),
        "dcp": (lambda p: dcp.save(state, checkpoint_id=p), lambda p: dcp.load(target, checkpoint_id=p), "dir"),
        "outlast": (lambda p: outlast.save(state, p), lambda p: outlast.load(target, p), "dir"),
    }
    results = {m: {"save": [], "load": []} for m in methods}
    try:
        for rep in range(args.repeat):
            for name, (save, load, _) in methods.items():
                p = os.path.join(root, f"{name.split('+')[0].replace('.', '_')}-{rep}")
                t = time.perf_counter()
                save(p)
                results[name]["save"].append(time.perf_counter() - t)
                evict(p)
                for v in target.values():
                    v.zero_()
                t = time.perf_counter()
                load(p)
                results[name]["load"].append(time.perf_counter() - t)
                if not all(torch.equal(target[k], state[k]) for k in state):
                    raise SystemExit(f"{name}: loaded data differs from saved data")
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    # The checksum runs on the writing thread as bytes stream out; show it is not the bottleneck.
    from outlast.storage.local import checksum, tensor_bytes

    t = time.perf_counter()
    for v in state.values():
        checksum(tensor_bytes(v))
    checksum_s = time.perf_counter() - t

    gb = size / 1e9
    med = {m: {k: median(v) for k, v in r.items()} for m, r in results.items()}
    rows = []
    for m in methods:
        s, l = med[m]["save"], med[m]["load"]
        rows.append([m, f"{s:.2f}", f"{gb / s:.2f}", f"{l:.2f}", f"{gb / l:.2f}"])
    print_table(["method", "save s", "save GB/s", "load s", "load GB/s"], rows,
                title=f"{gb:.2f} GB of fp32 tensors ({len(state)} tensors), median of {args.repeat}")
    o, d, r, rp = med["outlast"], med["dcp"], med["raw write+fsync"], med["raw 4 files+fsync"]
    ratios = {
        "save_vs_dcp": d["save"] / o["save"],
        "save_vs_raw_bandwidth": r["save"] / o["save"],
        "save_vs_raw_parallel_bandwidth": rp["save"] / o["save"],
        "save_vs_torch_save": med["torch.save+fsync"]["save"] / o["save"],
        "load_vs_dcp": d["load"] / o["load"],
        "load_vs_torch_load": med["torch.save+fsync"]["load"] / o["load"],
        "load_vs_raw_read": r["load"] / o["load"],
    }
    print()
    print_table(["ratio", "value", "target"], [
        ["outlast save speed / DCP", f"{ratios['save_vs_dcp']:.2f}x", ">= 2x"],
        ["outlast save / raw fsync'd bandwidth (1 file)", f"{100 * ratios['save_vs_raw_bandwidth']:.0f}%", ">= 80%"],
        ["outlast save / raw fsync'd bandwidth (4 files)", f"{100 * ratios['save_vs_raw_parallel_bandwidth']:.0f}%", ">= 80%"],
        ["outlast save speed / torch.save", f"{ratios['save_vs_torch_save']:.2f}x", ""],
        ["outlast load speed / DCP", f"{ratios['load_vs_dcp']:.2f}x", ">= 1.5x"],
        ["outlast load speed / torch.load", f"{ratios['load_vs_torch_load']:.2f}x", ""],
        ["outlast load / raw read", f"{100 * ratios['load_vs_raw_read']:.0f}%", ""],
        ["xxh3-64 checksum GB/s (vs raw write GB/s)", f"{gb / checksum_s:.1f} ({gb / r['save']:.2f})", "not the bottleneck"],
    ])
    emit_json({"bench": "save_load", "bytes": size, "repeat": args.repeat, "checksum_gbps": round(gb / checksum_s, 2),
               "seconds": {m: {k: round(v, 4) for k, v in x.items()} for m, x in med.items()},
               "ratios": {k: round(v, 3) for k, v in ratios.items()}})


if __name__ == "__main__":
    main()

"""Memory-tier snapshots: loop cost, recovery time and storage reads, redundancy memory.

Four gloo ranks (as two "nodes" of two) each train a small MLP (its gradients
all-reduced, so the save plan spreads the replicated state over the ranks). Measured, in
one run, side by side:

* **loop time** with memory snapshots every 1, 5 and 10 steps (mirror redundancy) vs no
  checkpointing; the modes run interleaved for ``--rounds`` rounds, each in fresh processes;
* **recovery time** (new processes: Checkpointer construction + ``restore`` + the first
  training step) from memory vs from disk with a cold page cache. Cold cache here means
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file of the disk checkpoint after it is
  fsync'd (the files' pages are dropped; the disk itself is a virtio block device whose
  host may still cache them, so the disk path is if anything flattered);
* **bytes read from storage** during recovery: ``read_bytes`` of ``/proc/self/io``,
  summed over ranks (tmpfs reads are not storage reads and do not count there);
* **redundancy memory per rank**: bytes each rank's node holds for other ranks, mirror vs
  XOR parity over 4 nodes of 1 rank (each block 1/3 of a shard).

The machine is shared: the 1-minute load average is printed with the numbers.

    PYTHONPATH=src python bench/memory_ckpt.py [--steps 30 --rounds 2]
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import outlast
from _common import evict  # bench/ is on sys.path when run as a script
from outlast.memtier import store

WORLD = 4
RPN = 2


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def make(width: int, depth: int):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return {"model": model, "optim": opt, "data": {"pos": 0}}


def train_step(state, step: int, width: int) -> None:
    torch.manual_seed(step)
    x = torch.randn(64, width)
    state["model"](x).square().mean().backward()
    for p in state["model"].parameters():
        dist.all_reduce(p.grad)
    state["optim"].step()
    state["optim"].zero_grad()
    state["data"]["pos"] = step


def worker(rank: int, init: str, task: dict, out: str) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = str(task.get("rpn", RPN))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    res = globals()["task_" + task["kind"]](rank, task)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown (gloo threads, pytorch#190489), like tests/dist


def ckpt_for(task: dict, memory: bool, **kw):
    args = dict(keep_last=2, timeout=120)
    if memory:
        args.update(memory_every=task.get("every", 1), redundancy=task.get("redundancy", "mirror"),
                    ranks_per_node=task.get("rpn", RPN), memory_job_id=task["job"])
    args.update(kw)
    return outlast.Checkpointer(task["disk"], **args)


def task_loop(rank: int, task: dict) -> dict:
    state = make(task["width"], task["depth"])
    ckpt = ckpt_for(task, memory=task["every"] > 0) if task["every"] > 0 else None
    for step in range(3):  # warm-up (allocators, the snapshot's staging buffers)
        train_step(state, step, task["width"])
        if ckpt is not None and step == 0:
            ckpt.maybe_snapshot(state, 0)
    if ckpt is not None:
        ckpt.wait()
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(3, 3 + task["steps"]):
        train_step(state, step, task["width"])
        if ckpt is not None:
            ckpt.maybe_snapshot(state, step)
    if ckpt is not None:
        ckpt.wait()
    dt = time.perf_counter() - t0
    if ckpt is not None:
        ckpt.close()
    return {"loop_s": dt}


def task_prepare(rank: int, task: dict) -> dict:
    """Train with snapshots every step and a disk checkpoint at the last one; then die
    (no close: the shared memory stays, as after a crash)."""
    state = make(task["width"], task["depth"])
    ckpt = ckpt_for(task, memory=True)
    for step in range(task["steps"]):
        train_step(state, step, task["width"])
        if step == task["steps"] - 1:
            ckpt.save(state, step)
        else:
            ckpt.maybe_snapshot(state, step)
    ckpt.wait()
    nbytes = ckpt.last_metrics.nbytes
    return {"shard_bytes": nbytes}


def task_recover(rank: int, task: dict) -> dict:
    """A restarted rank: from the process group's start to the end of its first step."""
    t0 = time.perf_counter()
    state = make(task["width"], task["depth"])
    ckpt = ckpt_for(task, memory=task["memory"])
    dist.barrier()
    rb0 = read_bytes()
    t1 = time.perf_counter()
    step = ckpt.restore(state)
    t2 = time.perf_counter()
    rb = read_bytes() - rb0
    train_step(state, step + 1, task["width"])
    dt = time.perf_counter() - t0
    src = (ckpt.last_restore or {}).get("source")
    ckpt._saver.close()  # leave the shared memory for the next measurement
    ckpt._saver.remove_hooks()
    return {"recover_s": dt, "restore_s": t2 - t1, "read_bytes": rb, "step": step, "source": src,
            "phases": ckpt._memory.timings if ckpt._memory is not None else {}}


def task_redundancy(rank: int, task: dict) -> dict:
    state = make(task["width"], task["depth"])
    train_step(state, 0, task["width"])  # the optimizer's state exists
    ckpt = ckpt_for(task, memory=True)
    ckpt.maybe_snapshot(state, 1)
    ckpt.wait()
    node = store.node_dir("/dev/shm", task["job"], rank // task["rpn"])
    step = os.path.join(node, store.step_name(1))
    own = held = 0
    dist.barrier()
    if rank % task["rpn"] == 0:
        for name in os.listdir(step):
            d = os.path.join(step, name)
            size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(d) for f in fs
                       if f.endswith(".safetensors") or f == store.BLOCK)
            mine = name.startswith("rank-") and int(name[5:]) // task["rpn"] == rank // task["rpn"]
            if mine:
                own += size
            else:
                held += size
    dist.barrier()
    ckpt.close()
    return {"own": own, "held": held}


def spawn(task: dict) -> list[dict]:
    out = tempfile.mkdtemp(prefix="outlast-bench-")
    init = f"file://{out}/rdzv"
    ctx = mp.spawn(worker, args=(init, task, out), nprocs=WORLD, join=False)
    deadline = time.time() + 600
    try:
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                raise RuntimeError(f"bench task {task['kind']} timed out")
    except BaseException:  # a timeout, Ctrl-C or SIGTERM: no rank outlives the bench
        for p in ctx.processes:
            p.kill()
        raise
    res = []
    for r in range(WORLD):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            res.append(json.load(f))
    shutil.rmtree(out, ignore_errors=True)
    return res


_CLEANUP: list[str] = []  # the jobs' /dev/shm folders and the bench's own temp folder


def _cleanup() -> None:
    for path in _CLEANUP:
        shutil.rmtree(path, ignore_errors=True)


def new_job() -> str:
    """A fresh job id whose shared memory is removed when the bench ends, however it ends."""
    job = f"bench{uuid.uuid4().hex[:8]}"
    _CLEANUP.append(store.job_dir("/dev/shm", job))
    return job


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--dir", default=None, help="disk checkpoint folder (default: a temp dir under ./bench-out)")
    a = ap.parse_args()
    # A killed run used to leave its snapshots (GBs at larger --width) in /dev/shm, i.e. in RAM.
    atexit.register(_cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = a.dir or tempfile.mkdtemp(prefix="memory-ckpt-", dir=os.environ.get("TMPDIR", "/tmp"))
    if a.dir is None:
        _CLEANUP.append(base)
    common = {"width": a.width, "depth": a.depth}
    load0 = os.getloadavg()[0]

    # 1. loop time
    modes = [0, 1, 5, 10]
    loops: dict[int, list[float]] = {m: [] for m in modes}
    for r in range(a.rounds):
        for m in modes[r % len(modes):] + modes[: r % len(modes)]:
            job = new_job()
            res = spawn({"kind": "loop", "every": m, "steps": a.steps, "job": job,
                         "disk": os.path.join(base, f"loop-{job}"), **common})
            loops[m].append(max(x["loop_s"] for x in res))
            shutil.rmtree(store.job_dir("/dev/shm", job), ignore_errors=True)
    none = statistics.median(loops[0])

    # 2. recovery: memory vs cold disk
    job = new_job()
    disk = os.path.join(base, "recover")
    prep = spawn({"kind": "prepare", "steps": 6, "job": job, "disk": disk, **common})
    mem = spawn({"kind": "recover", "memory": True, "job": job, "disk": disk, **common})
    evict(disk)
    dropped = sum(len(fs) for _, _, fs in os.walk(disk))
    cold = spawn({"kind": "recover", "memory": False, "job": job, "disk": disk, **common})
    shutil.rmtree(store.job_dir("/dev/shm", job), ignore_errors=True)

    # 3. redundancy memory: 4 nodes of 1 rank, mirror vs parity (one group of 4)
    red = {}
    for how in ("mirror", "parity"):
        job = new_job()
        res = spawn({"kind": "redundancy", "redundancy": how, "rpn": 1, "job": job,
                     "disk": os.path.join(base, f"red-{how}"), **common})
        red[how] = {"own": sum(x["own"] for x in res) / WORLD, "held": sum(x["held"] for x in res) / WORLD}
        shutil.rmtree(store.job_dir("/dev/shm", job), ignore_errors=True)
    load1 = os.getloadavg()[0]

    rec_mem = max(x["recover_s"] for x in mem)
    rec_disk = max(x["recover_s"] for x in cold)
    res_mem = max(x["restore_s"] for x in mem)
    res_disk = max(x["restore_s"] for x in cold)
    result = {
        "world": WORLD, "ranks_per_node": RPN, "steps": a.steps, "rounds": a.rounds,
        "state_bytes_per_rank": prep[0]["shard_bytes"],
        "loop_s": {str(m): statistics.median(v) for m, v in loops.items()},
        "loop_x_none": {str(m): statistics.median(v) / none for m, v in loops.items()},
        "recover_memory_s": rec_mem, "recover_disk_cold_s": rec_disk, "recover_ratio": rec_mem / rec_disk,
        "restore_memory_s": res_mem, "restore_disk_cold_s": res_disk, "restore_ratio": res_mem / res_disk,
        "recover_sources": [mem[0]["source"], cold[0]["source"]],
        "memory_restore_phases_rank0": mem[0]["phases"],
        "storage_read_bytes_memory": sum(x["read_bytes"] for x in mem),
        "storage_read_bytes_disk": sum(x["read_bytes"] for x in cold),
        "cold_cache_method": f"posix_fadvise DONTNEED on {dropped} files",
        "redundancy_bytes_per_rank": {k: v["held"] for k, v in red.items()},
        "own_bytes_per_rank": red["mirror"]["own"],
        "parity_over_mirror": red["parity"]["held"] / red["mirror"]["held"] if red["mirror"]["held"] else None,
        "loadavg_1m": [load0, load1], "cpus": os.cpu_count(),
    }
    print(f"memory-tier bench: {WORLD} ranks as {WORLD // RPN} nodes, MLP {a.depth}x{a.width}, "
          f"{result['state_bytes_per_rank'] / 2**20:.1f} MiB written per rank per snapshot; "
          f"load average {load0:.2f} -> {load1:.2f} on {os.cpu_count()} CPUs")
    print(f"{'snapshots':<22}{'loop s':>10}{'x none':>10}")
    for m in modes:
        label = "none" if m == 0 else f"memory every {m}"
        print(f"{label:<22}{result['loop_s'][str(m)]:>10.3f}{result['loop_x_none'][str(m)]:>10.3f}")
    print(f"{'recovery':<22}{'to 1st step s':>14}{'restore() s':>13}{'storage read B':>16}")
    print(f"{'from memory':<22}{rec_mem:>14.3f}{res_mem:>13.3f}{result['storage_read_bytes_memory']:>16,}")
    print(f"{'from disk (cold)':<22}{rec_disk:>14.3f}{res_disk:>13.3f}{result['storage_read_bytes_disk']:>16,}")
    print(f"memory / disk: {result['recover_ratio']:.2f} to the first step, {result['restore_ratio']:.2f} for restore()")
    print(f"{'redundancy':<22}{'held per rank':>16}")
    for k, v in result["redundancy_bytes_per_rank"].items():
        print(f"{k:<22}{v:>16,.0f}")
    print(f"parity / mirror memory: {result['parity_over_mirror']:.3f} (1/(n-1) = {1 / 3:.3f} for n = 4)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""A torchrun job for the memory-tier tests (tests/dist/test_memtier.py).

Every rank holds a FlatShard slice of two logical tensors (weights ``w`` and a momentum
``m``) and updates them with elementwise float32 ops only, so the result is bit-identical
at any world size (resharding 4 -> 2 ranks can be compared with a 4-rank run). The
Checkpointer snapshots into shared memory every step and saves to disk every 4 steps;
on the first attempt a scenario injects its fault (kill -9, deleted shared memory,
flipped bytes) and torchrun restarts the ranks, which restore and finish. Each attempt
writes what ``restore`` did to ``out/attempt<A>-rank<R>.json``; the final state is saved
with ``outlast.save`` to ``out/final`` for the test to compare.

Usage: torchrun ... memtier_job.py OUT DISK JOB_ID REDUNDANCY RANKS_PER_NODE SCENARIO
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist

import outlast
from outlast.memtier import store

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import leave  # noqa: E402

SHAPE = (40, 25)
STEPS = 12
DISK_EVERY = 4


def shard(rank: int, world: int) -> tuple[int, int]:
    n = SHAPE[0] * SHAPE[1]
    per = -(-n // world)
    start = min(n, rank * per)
    return start, min(n, start + per) - start


def make_state(rank: int, world: int) -> dict:
    start, n = shard(rank, world)
    idx = torch.arange(start, start + n, dtype=torch.float32)
    w = (idx % 13) * 0.125
    m = torch.zeros(n)
    return {"w": outlast.FlatShard(w, SHAPE, start), "m": outlast.FlatShard(m, SHAPE, start),
            "meta": {"step": -1}}


def update(state: dict, step: int) -> None:
    fs = state["w"]
    w, m = fs.local, state["m"].local
    idx = torch.arange(fs.start, fs.start + w.numel(), dtype=torch.float32)
    g = w - ((idx % 7) * 0.25 + step * 0.5)
    m.mul_(0.9)
    m.add_(g)
    w.sub_(m * 0.01)
    state["meta"]["step"] = step


def kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    out, disk, job, redundancy, rpn, scenario = sys.argv[1:7]
    rpn = int(rpn)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=60)
    # A store prefix per attempt: gloo's connection keys of the killed attempt stay in
    # torchrun's store, and a restarted rank would otherwise dial the dead ranks' ports.
    master = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, master, timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{attempt}", base), rank=rank,
                            world_size=world, timeout=timeout)
    torch.set_num_threads(1)
    if scenario == "shrink" and world == 2:
        attempt = 1  # the second launch (2 ranks) of the shrink scenario
    shm = store.job_dir("/dev/shm", job)

    if scenario == "kill_torn_flip" and attempt == 0 and rank == 2:
        # Die inside the snapshot of step 7: after the step's metadata exchange, before
        # this rank's own piece is renamed into place (a torn snapshot).
        real = store.commit_piece

        def dying_commit(tmp, name):
            if "step-00000007" in tmp and name == store.piece_name(2):
                kill_self()
            return real(tmp, name)

        store.commit_piece = dying_commit

    state = make_state(rank, world)
    ckpt = outlast.Checkpointer(disk, keep_last=2, memory_every=1, redundancy=redundancy,
                                ranks_per_node=rpn, memory_job_id=job, timeout=120)
    start = ckpt.restore(state)
    info = {"start": start, "restore": ckpt.last_restore, "world": world,
            "meta_step": state["meta"]["step"]}
    with open(os.path.join(out, f"attempt{attempt}-rank{rank}.json"), "w") as f:
        json.dump(info, f)
    first = 0 if start is None else start + 1
    for step in range(first, STEPS):
        ckpt.wait_staged()  # w and m change in place below: their copies must exist
        update(state, step)
        if step % DISK_EVERY == 0:
            ckpt.save(state, step)
        else:
            ckpt.maybe_snapshot(state, step)
        if scenario != "none" and step == 6 and attempt == 0:
            ckpt.wait()  # step 6 complete in memory everywhere
            fault(scenario, rank, world, rpn, shm)
        if scenario == "kill_torn_flip" and step == 9 and attempt == 1:
            ckpt.wait()
            # Both copies of rank 1's shard lost in every snapshot: memory cannot supply
            # a step; the restart must fall back to disk (step 8) and say so.
            dist.barrier()
            if rank == 0:
                for node in os.listdir(shm):
                    if node.startswith("node-"):
                        for s in os.listdir(os.path.join(shm, node)):
                            shutil.rmtree(os.path.join(shm, node, s, store.piece_name(1)), ignore_errors=True)
            dist.barrier()
            if rank == 1:
                kill_self()
    ckpt.close()
    info["shm_after_close"] = os.path.exists(shm)
    outlast.save(state, os.path.join(out, "final"), overwrite=True)
    with open(os.path.join(out, f"attempt{attempt}-rank{rank}.json"), "w") as f:
        json.dump(info, f)
    leave()  # harness.leave: dodges the gloo teardown abort (pytorch#190489)


def fault(scenario: str, rank: int, world: int, rpn: int, shm: str) -> None:
    dist.barrier()
    if scenario == "kill_torn_flip":
        if rank == 1:
            # A flipped byte in rank 1's own copy of step 6 (inside tensor data).
            piece = store.piece_path(store.node_dir("/dev/shm", os.path.basename(shm)[len("outlast-"):], 0), 6,
                                     store.piece_name(1))
            rel = next(os.path.join(piece, "data", f) for f in os.listdir(os.path.join(piece, "data")))
            with open(rel, "r+b") as f:
                f.seek(os.path.getsize(rel) - 5)
                b = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([b[0] ^ 0x10]))
        dist.barrier()
        return  # rank 2 dies in step 7's snapshot (see main)
    if scenario in ("node_loss", "parity_node_loss"):
        lost = 1 if scenario == "node_loss" else 2
        if rank == lost * rpn:
            shutil.rmtree(store.node_dir("/dev/shm", os.path.basename(shm)[len("outlast-"):], lost))
        dist.barrier()
        if rank // rpn == lost:
            kill_self()
        return
    if scenario == "shrink":
        dist.barrier()
        kill_self()  # every rank: the 4-rank job ends here; a 2-rank launch restores


if __name__ == "__main__":
    main()

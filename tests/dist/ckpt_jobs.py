"""Jobs for the distributed Checkpointer test (run through harness.run_job).

Two ranks train the same replicated model (same seed, same data) and each holds a
per-rank tensor under its own top-level key (strict loads ignore other ranks' top-level
keys); the Checkpointer saves in the background on its own gloo group, rank 0
uploads to a file:// remote tier and applies retention; a second run restores.
"""

from __future__ import annotations

import sys

import torch

import outlast
from tests.dist.harness import spawn


def make(rank: int, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return {"model": model, "optim": opt, f"mine{rank}": torch.zeros(3) + rank, "data": {"pos": 0}}


def step_fn(state, rank: int, step: int) -> None:
    torch.manual_seed(100 + step)
    state["model"](torch.randn(4, 16)).sum().backward()
    state["optim"].step()
    state["optim"].zero_grad()
    state[f"mine{rank}"].add_(1)  # our own tensor: the wait_staged rule applies
    state["data"]["pos"] = step


def fingerprint(state, rank: int) -> dict:
    sd = state["model"].state_dict()
    return {
        "model": {k: v.flatten().tolist() for k, v in sd.items()},
        "mine": state[f"mine{rank}"].tolist(),
        "pos": state["data"]["pos"],
    }


def job(rank: int, world: int, directory: str, remote: str):
    state = make(rank, 0)
    with outlast.Checkpointer(directory, keep_last=2, remote=remote) as ckpt:
        assert ckpt.restore(state) is None
        for step in range(4):
            ckpt.wait_staged()
            step_fn(state, rank, step)
            ckpt.save(state, step)
        ckpt.wait()
        steps = ckpt.steps()
        saved = fingerprint(state, rank)
    fresh = make(rank, 1)
    with outlast.Checkpointer(directory, keep_last=2, remote=remote) as ckpt:
        got = ckpt.restore(fresh)
    return {"steps": steps, "restored": got, "equal": fingerprint(fresh, rank) == saved}


def _caught(fn) -> dict:
    try:
        fn()
    except outlast.errors.CheckpointError as e:
        c = e.__cause__
        return {"type": type(e).__name__, "msg": str(e), "cause": None if c is None else type(c).__name__}
    return {"type": None}


def failures(rank: int, world: int, directory: str, remote: str):
    """One rank fails where the others cannot see it; every rank must raise (the same
    class) or branch alike, at once, never wait in a collective for the failed rank."""
    from outlast import checkpointer, engine

    from outlast.collective import group_timeout

    out = {}
    state = make(rank, 0)
    with outlast.Checkpointer(directory) as ckpt:
        # the job's timeout (harness: 60 s), not new_group()'s 30-minute default
        out["timeouts"] = [group_timeout(g).total_seconds() for g in (None, ckpt._pg, ckpt._ctl)]
        ckpt.save(state, 0)
        ckpt.wait()
        # 1. the staging copy fails on rank 1 only: rank 0 is already on its way into
        # persist's collectives and must hear of it there.
        real = engine.copy_into

        def broken(dst, src, *a, **k):
            raise RuntimeError("copy into the staging buffer failed (simulated)")

        if rank == 1:
            engine.copy_into = broken
        try:
            ckpt.save(state, 1)
            out["staging"] = _caught(ckpt.wait)
        finally:
            engine.copy_into = real
        step_fn(state, rank, 2)
        ckpt.save(state, 2)
        ckpt.wait()
        out["steps"] = ckpt.steps()
    # 2. restore: rank 1 cannot read step 2 (a plain PermissionError), rank 0 can: both
    # must skip it and restore step 0.
    real_check = checkpointer.check_local

    def unreadable(path):
        if rank == 1 and path.endswith("step-00000002"):
            raise PermissionError(13, "Permission denied", path + "/manifest.json")
        return real_check(path)

    checkpointer.check_local = unreadable
    try:
        with outlast.Checkpointer(directory) as ckpt:
            out["restored"] = ckpt.restore(make(rank, 1))
    finally:
        checkpointer.check_local = real_check
    # 3. the upload (rank 0 only) keeps failing: every rank's wait() raises StorageError.
    ckpt = outlast.Checkpointer(directory + "-up", remote=remote, upload_retries=1, upload_backoff_s=0.0)
    if rank == 0:
        def refuse(*a, **k):
            raise OSError(13, "Access Denied (simulated)")

        ckpt.remote.fs.put_file = refuse
    ckpt.save(state, 0)
    out["upload"] = _caught(ckpt.wait)
    ckpt.close()
    return out


if __name__ == "__main__":
    case, world, out, directory, remote = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    spawn({"roundtrip": job, "failures": failures}[case], world, out, directory, remote)

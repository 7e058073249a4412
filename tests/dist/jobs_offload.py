"""Jobs for offloaded state across layouts: FSDP2 (torch AdamW) <-> DDP with OffloadAdamW.

Reuses the model, data and step of jobs_train. Each rank of a DDP run with
OffloadAdamW keeps its own state files; the checkpoint is the same FQN-keyed state as
any other layout, so it loads into FSDP2 shards at another world size and back.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

import outlast
from tests.dist.harness import spawn
from tests.dist.jobs_train import K, M, build, step


def _build(kind: str, world: int, rank: int, root: str):
    if kind != "offload":
        return build(kind, world)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from outlast.offload import OffloadAdamW

    torch.manual_seed(0)
    wrapped, model, _ = build("ddp", world)
    opt = OffloadAdamW(model.parameters(), lr=1e-2, dir=tempfile.mkdtemp(prefix=f"off-r{rank}-", dir=root),
                       chunk_bytes=16384)
    return wrapped, model, opt


def reference(rank: int, world: int, root: str, kind: str) -> dict:
    """Train K+M steps under ``kind``; save after K."""
    wrapped, model, opt = _build(kind, world, rank, root)
    losses = []
    for s in range(K + M):
        if s == K:
            state = {"train": outlast.ModelOptimizerState(model, opt), "step": s}
            outlast.save(state, os.path.join(root, f"ckpt-{kind}"), step=s)
        losses.append(step(wrapped, opt, s, rank, world))
    return {"losses": losses[K:]}


def resume(rank: int, world: int, root: str, pairs: str) -> dict:
    """For each ``saved_by:kind`` in ``pairs``: load the checkpoint ``saved_by`` wrote into a
    fresh ``kind`` run at this world size and train to K+M."""
    out = {}
    for pair in pairs.split(","):
        saved_by, kind = pair.split(":")
        torch.manual_seed(123)
        wrapped, model, opt = _build(kind, world, rank, root)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.0)  # everything must come from the checkpoint
        state = {"train": outlast.ModelOptimizerState(model, opt), "step": 0}
        outlast.load(state, os.path.join(root, f"ckpt-{saved_by}"))
        out[pair] = [step(wrapped, opt, s, rank, world) for s in range(state["step"], K + M)]
    return out


def async_save(rank: int, world: int, root: str) -> dict:
    """DDP + OffloadAdamW on every rank, saved after K steps by the asynchronous Checkpointer
    (collective planning, each rank its own files): the offloaded state goes from the state
    files, not through staging, and the checkpoint holds the state of step K although two
    more steps (the second one writing the generation the save reads) follow at once."""
    wrapped, model, opt = _build("offload", world, rank, root)
    for s in range(K):
        step(wrapped, opt, s, rank, world)
    want = {i: {k: v.clone() for k, v in st.items()} for i, st in opt.state_dict()["state"].items()}
    ck = outlast.Checkpointer(os.path.join(root, "async-ck"))
    ck.save({"train": outlast.ModelOptimizerState(model, opt), "step": K}, K)
    for s in range(K, K + 2):
        step(wrapped, opt, s, rank, world)
    ck.wait()
    staged = sum(img.numel() for bufs in ck._pool._free for _, img in bufs.images)
    ck.close()
    opt.close()
    torch.manual_seed(123)
    _, model2, opt2 = build("ddp", world)
    state = {"train": outlast.ModelOptimizerState(model2, opt2), "step": 0}
    outlast.load(state, os.path.join(root, "async-ck", f"step-{K:08d}"))
    got = opt2.state_dict()["state"]
    same = all(torch.equal(got[i][k], want[i][k]) for i in want for k in ("exp_avg", "exp_avg_sq"))
    state_bytes = sum(v.numel() * v.element_size() for st in want.values() for k, v in st.items() if k != "step")
    return {"same": same and state["step"] == K, "staged": staged, "state_bytes": state_bytes}


if __name__ == "__main__":
    case, world, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    spawn({"reference": reference, "resume": resume, "async_save": async_save}[case], world, out, *sys.argv[4:])

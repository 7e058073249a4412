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


if __name__ == "__main__":
    case, world, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    spawn({"reference": reference, "resume": resume}[case], world, out, *sys.argv[4:])

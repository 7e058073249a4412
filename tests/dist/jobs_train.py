"""Jobs for training continuity: FSDP2 on 2 ranks, save, resume at 1/2/3 ranks and in DDP."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import outlast
from tests.dist.harness import spawn

GLOBAL_BATCH = 6  # divisible by 1, 2 and 3
SEQ, DIM, VOCAB = 8, 32, 50
K, M = 3, 3  # steps before the checkpoint, steps after


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(DIM, 4, 64, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    per = GLOBAL_BATCH // world
    x = x[rank * per : (rank + 1) * per]
    return x[:, :-1], x[:, 1:]


def build(kind: str, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = Tiny()
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, model, opt
    wrapped = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return wrapped, model, opt


def step(wrapped, opt, s: int, rank: int, world: int) -> float:
    x, y = batch(s, rank, world)
    loss = nn.functional.cross_entropy(wrapped(x).reshape(-1, VOCAB), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    t = loss.detach().clone()
    dist.all_reduce(t)
    return (t / world).item()


def reference(rank: int, world: int, root: str) -> dict:
    wrapped, model, opt = build("fsdp", world)
    losses = []
    for s in range(K + M):
        if s == K:
            state = {"train": outlast.ModelOptimizerState(model, opt), "step": s}
            outlast.save(state, os.path.join(root, "ckpt"), step=s)
        losses.append(step(wrapped, opt, s, rank, world))
    return {"losses": losses[K:]}


def resume(rank: int, world: int, root: str, kinds: str) -> dict:
    out = {}
    for kind in kinds.split(","):
        torch.manual_seed(123)  # a different init: everything must come from the checkpoint
        wrapped, model, opt = build(kind, world)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.0)
        state = {"train": outlast.ModelOptimizerState(model, opt), "step": 0}
        report = outlast.load(state, os.path.join(root, "ckpt"))
        losses = [step(wrapped, opt, s, rank, world) for s in range(state["step"], K + M)]
        out[kind] = {"losses": losses, "bytes_read": report.bytes_read, "received": report.bytes_received}
    return out


if __name__ == "__main__":
    case, world, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    spawn({"reference": reference, "resume": resume}[case], world, out, *sys.argv[4:])

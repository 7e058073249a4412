"""Job: resume a converted DeepSpeed checkpoint under outlast at another world size (FSDP2)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import outlast
from tests.dist.harness import spawn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fixtures"))
import make_deepspeed_ckpt as fx  # noqa: E402


def resume_fsdp2(rank: int, world: int, ckpt: str) -> dict:
    """Load the converted checkpoint into an FSDP2 model at ``world`` ranks; take one step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = fx.TinyLM()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(fx.param_groups(model), lr=fx.LR, betas=fx.BETAS, eps=fx.EPS)
    state = {"train": outlast.ModelOptimizerState(model, optim)}
    outlast.load(state, ckpt, strict=False)
    step = outlast.read(ckpt, keys="train.step")["train"]["step"]
    x, y = fx.batch(step)
    n = fx.GLOBAL_BATCH // world
    loss = fx.loss_fn(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n])
    loss.backward()
    optim.step()
    with torch.no_grad():
        x, y = fx.batch(step + 1)
        nxt = fx.loss_fn(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).detach()
        lossr = loss.detach().clone()
    dist.all_reduce(nxt)
    dist.all_reduce(lossr)
    return {"loss_resume": lossr.item() / world, "loss_next": nxt.item() / world}


if __name__ == "__main__":
    case, world, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    spawn({"resume_fsdp2": resume_fsdp2}[case], world, out, *sys.argv[4:])

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
            ckpt.save(step, state)
        ckpt.wait()
        steps = ckpt.steps()
        saved = fingerprint(state, rank)
    fresh = make(rank, 1)
    with outlast.Checkpointer(directory, keep_last=2, remote=remote) as ckpt:
        got = ckpt.restore(fresh)
    return {"steps": steps, "restored": got, "equal": fingerprint(fresh, rank) == saved}


if __name__ == "__main__":
    case, world, out, directory, remote = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    spawn({"roundtrip": job}[case], world, out, directory, remote)

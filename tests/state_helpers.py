"""Tiny deterministic training states shared by tests (plain module, not a conftest)."""

from __future__ import annotations

import torch


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))


def trained_state(seed: int = 0, steps: int = 2) -> dict:
    model = tiny_model(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        optim.step()
        optim.zero_grad()
        sched.step()
    return {"model": model, "optim": optim, "sched": sched, "step": steps, "rng": torch.get_rng_state()}


def fresh_state(seed: int = 1) -> dict:
    model = tiny_model(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    return {"model": model, "optim": optim, "sched": sched, "step": 0, "rng": torch.zeros_like(torch.get_rng_state())}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k

"""Child process of the offload memory tests and bench: train an MLP for a few steps, print JSON.

``python tests/e2e/offload_child.py --layers 8 --width 1024 --dtype float32 --optim offload --dir D``
prints one JSON line: losses, the state's size, peak RSS, step times.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


class Residual(torch.nn.Module):
    """x + tanh(W x): gradients neither vanish nor blow up through many layers (vanishing
    ones would make AdamW's state denormal, which costs x86 CPUs 10-100x per operation)."""

    def __init__(self, width: int, dtype: torch.dtype):
        super().__init__()
        self.lin = torch.nn.Linear(width, width, bias=False, dtype=dtype)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


def build(layers: int, width: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[Residual(width, dtype) for _ in range(layers)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--optim", choices=["offload", "torch"], default="offload")
    ap.add_argument("--master", action="store_true")
    ap.add_argument("--dir", default="")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunk-mb", type=int, default=16)
    ap.add_argument("--save", default="", help="outlast.save the optimizer here after training")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    model = build(a.layers, a.width, dtype)
    n = sum(p.numel() for p in model.parameters())
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if a.optim == "offload":
        from outlast.offload import OffloadAdamW

        opt = OffloadAdamW(model.parameters(), dir=a.dir, master_params=a.master, chunk_bytes=a.chunk_mb << 20, **kw)
    else:
        opt = torch.optim.AdamW(model.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, a.width, generator=g).to(dtype)
    y = torch.randn(a.batch, a.width, generator=g).to(dtype)
    losses, step_s, compute_s, stats = [], [], [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        losses.append(loss.item())
        compute_s.append(t1 - t0)
        step_s.append(t2 - t0)
        stats.append({k: round(v, 3) for k, v in getattr(opt, "last_step_stats", {}).items()})
    saved = 0.0
    if a.save:
        import outlast

        t0 = time.perf_counter()
        outlast.save({"optim": opt}, a.save)
        saved = time.perf_counter() - t0
    out = {
        "params": n, "losses": losses, "stats": stats, "step_s": step_s, "compute_s": compute_s, "save_s": saved,
        "fp32_params_grads_adamw_bytes": 16 * n,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if a.optim == "offload":
        out["pool_bytes"] = opt.pool.nbytes
        out["bytes_per_step"] = opt.bytes_per_step
        out["direct"] = opt.files.direct
        opt.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

"""Peer for bench/offload.py: DeepSpeed ZeRO-3 with ``offload_optimizer: nvme`` on its CPU accelerator.

Trains the same residual MLP as tests/e2e/offload_child.py (fp32) for a few steps with
the optimizer state on ``--dir`` through DeepSpeed's async I/O op, and prints one JSON
line with its step times (or the exception, if DeepSpeed cannot run that path here).

    DS_ACCELERATOR=cpu PYTHONPATH=src python bench/offload_deepspeed.py --dir /work/offload-scratch/ds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    out: dict = {"peer": "deepspeed-zero3-nvme"}
    try:
        import deepspeed
        import torch
        from offload_child import build

        out["deepspeed"] = deepspeed.__version__
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 1000))
        deepspeed.init_distributed(dist_backend="gloo")
        os.makedirs(a.dir, exist_ok=True)
        model = build(a.layers, a.width, torch.float32)
        cfg = {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
            "zero_optimization": {
                "stage": 3,
                "offload_optimizer": {"device": "nvme", "nvme_path": a.dir, "pipeline_read": True,
                                      "pipeline_write": True, "buffer_count": 4},
            },
            "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True,
                    "thread_count": 1},
        }
        t0 = time.perf_counter()
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        out["init_s"] = time.perf_counter() - t0
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, a.width, generator=g)
        y = torch.randn(4, a.width, generator=g)
        steps, losses = [], []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            steps.append(time.perf_counter() - t0)
            losses.append(loss.item())
        out.update(step_s=steps, losses=losses, ok=True)
    except BaseException as e:  # noqa: BLE001 - the peer's failure is the result
        out.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

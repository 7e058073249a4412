"""The deterministic state behind tests/golden/v1: change it and the golden test fails."""

import torch


def golden_state() -> dict:
    return {
        "model": {
            "embed.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8,
            "norm.weight": torch.tensor([1.0, -2.5, 0.125], dtype=torch.bfloat16),
            "counts": torch.tensor([[1, 2], [3, 4]], dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "scale": torch.tensor(0.5, dtype=torch.float16),
            "empty": torch.zeros(0, 2, dtype=torch.float32),
        },
        "layers": [torch.full((2,), 3, dtype=torch.int8), {"bias": torch.ones(2, dtype=torch.float64)}],
        "optim": {"state": {0: {"step": torch.tensor(4.0)}}, "param_groups": [{"lr": 0.1, "betas": [0.9, 0.99], "params": [0]}]},
        "step": 7,
        "config": {"name": "golden", "ratio": 0.25, "tags": ["a", "b"], "none": None},
    }

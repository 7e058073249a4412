"""A training process for the crash test: saves every step, state a function of the step.

Prints ``ready <start>`` once it is in its loop and ``committed <step>`` for every save
it has seen finish, then runs until killed.
"""

import sys

import torch

import outlast

N = 1 << 20  # 8 MiB of float64: a save takes long enough to be killed in the middle


def expected(step: int) -> torch.Tensor:
    return torch.arange(N, dtype=torch.float64) * 1e-3 + step


def main(directory: str) -> None:
    state = {"w": torch.zeros(N, dtype=torch.float64), "v": torch.zeros(7, dtype=torch.int64), "step": -1}
    ckpt = outlast.Checkpointer(directory, keep_last=3, keep_every=5)
    start = ckpt.restore(state)
    step = 0 if start is None else start + 1
    print(f"ready {start}", flush=True)
    reported = 0
    while True:
        ckpt.wait_staged()  # we mutate tensors that no optimizer owns: our part of the rule
        state["w"].copy_(expected(step))
        state["v"].fill_(step)
        state["step"] = step
        ckpt.save(state, step)
        for m in ckpt.metrics[reported:]:
            if not m.done:
                break
            print(f"committed {m.step}", flush=True)
            reported += 1
        step += 1


if __name__ == "__main__":
    main(sys.argv[1])

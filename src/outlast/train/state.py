"""Every rank's RNG state as checkpointable state.

The model and optimizer go into a checkpoint through ``outlast.ModelOptimizerState``;
the scheduler and the document stream are Stateful already. What is left is the RNG:
:class:`RNGState` records every rank's torch RNG state, so a resume at the same world
size draws the same random numbers (dropout) as the run it continues.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RNGState", "rank_seed"]


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A 63-bit seed for ``rank``'s RNG, different per rank and per ``step``, stable everywhere.

    Example:
        >>> rank_seed(0, 0) != rank_seed(0, 1)
        True
    """
    digest = hashlib.blake2b(f"outlast:{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RNGState:
    """Every rank's torch RNG state, one tensor per rank (``rng.torch_cpu.rank0`` ...).

    :meth:`capture` (a collective: every rank calls it, from the training thread, before a
    save) gathers all ranks' states; :meth:`state_dict` returns the last capture, so a
    background save never runs a collective. On load, rank ``r`` takes row ``rank{r}``;
    a rank that the saved run did not have (the world grew) is seeded from
    ``(seed, rank, step)`` instead, and :attr:`reseeded` says so. The template that
    ``state_dict`` offers before any capture holds only ``rank0``; outlast hands the other
    saved rows to :meth:`load_state_dict` as well, because they sit under this object.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, seed: int) -> None:
        self.rank, self.world_size, self.device, self.seed = rank, world_size, device, seed
        self.step = 0
        self.reseeded = False
        self._captured: dict[str, dict[str, torch.Tensor]] | None = None

    def _local(self) -> dict[str, torch.Tensor]:
        out = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            out["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def capture(self, step: int) -> None:
        """Gather every rank's RNG state (collective)."""
        self.step = step
        captured: dict[str, dict[str, torch.Tensor]] = {}
        for kind, t in self._local().items():
            if self.world_size == 1:
                rows = [t]
            else:
                # uint8 states travel as-is; NCCL needs them on the GPU.
                comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
                local = t.to(comm_device)
                rows = [torch.empty_like(local) for _ in range(self.world_size)]
                dist.all_gather(rows, local)
            captured[kind] = {f"rank{r}": row.cpu() for r, row in enumerate(rows)}
        self._captured = captured

    def state_dict(self) -> dict[str, Any]:
        if self._captured is not None:
            return self._captured
        return {kind: {"rank0": t.clone()} for kind, t in self._local().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        key = f"rank{self.rank}"
        cpu = state.get("torch_cpu", {})
        if key in cpu:
            torch.set_rng_state(cpu[key].cpu())
            cuda = state.get("torch_cuda", {})
            if self.device.type == "cuda" and key in cuda:
                torch.cuda.set_rng_state(cuda[key].cpu(), self.device)
            self.reseeded = False
        else:
            torch.manual_seed(rank_seed(self.seed, self.rank, self.step))
            self.reseeded = True
        self._captured = None

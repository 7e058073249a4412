"""The trainer's checkpointable pieces that torch does not already make Stateful.

* :class:`ModelState` and :class:`OptimizerState` hand outlast the model and
  optimizer through ``torch.distributed.checkpoint.state_dict``
  (``get_*_state_dict`` / ``set_*_state_dict``). Those name every entry by the
  parameter's fully qualified name, without DDP's ``module.`` prefix and with
  optimizer state keyed by name instead of by position, so a checkpoint saved under
  DDP on two ranks loads under FSDP2 or on one process unchanged. Under FSDP2 the
  values are DTensors, which outlast saves and loads as regions of logical tensors.
* :class:`RNGState` records every rank's torch RNG state, so a resume at the same
  world size draws the same random numbers (dropout) as the run it continues.

These are deliberately tiny: everything that decides *where bytes go* is outlast's.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = ["ModelState", "OptimizerState", "RNGState", "rank_seed"]


class ModelState:
    """The model's parameters and persistent buffers, by fully qualified name (wrappers stripped)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState:
    """The optimizer's state and param groups, keyed by parameter name.

    Note: torch's ``get_optimizer_state_dict`` initialises the state of an optimizer that
    has never stepped by running a step with zero gradients and lr 0 (AdamW's ``step``
    counter becomes 1). The trainer therefore asks for it only when it is about to be
    overwritten by a restore, or after real steps; never on a fresh start.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


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

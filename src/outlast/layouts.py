"""Map a rank's local tensors to regions of logical tensors.

A *layout adapter* answers two questions for a leaf of the live state: what is the
global shape of the logical tensor, and which boxes of it does this process hold (with
the local data for each)? Saving writes those boxes; loading fills them. This module
handles plain tensors (the whole logical tensor, replicated on every rank that has it);
distributed layouts (DTensor, flat partitions) plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dtypes
from .errors import SerializationError
from .regions import Box


@dataclass
class LocalRegion:
    """``data`` holds ``box`` of the logical tensor (data.shape == box.sizes)."""

    box: Box
    data: torch.Tensor


@dataclass
class LocalTensor:
    """What this process holds of one logical tensor."""

    fqn: str
    dtype: torch.dtype
    global_shape: tuple[int, ...]
    regions: list[LocalRegion]
    replicated: bool = True  # every rank holding it holds the same data


def local_tensor(fqn: str, t: torch.Tensor) -> LocalTensor:
    """Describe a live tensor leaf; raises SerializationError if it cannot be saved."""
    if t.is_sparse or t.layout != torch.strided:
        raise SerializationError(f"tensor {fqn!r} has layout {t.layout}; convert it with .to_dense() before saving")
    if t.device.type == "meta":
        raise SerializationError(f"tensor {fqn!r} is on the meta device and has no data to save")
    dtypes.to_safetensors(t.dtype, name=fqn)
    data = t.detach()
    return LocalTensor(fqn, t.dtype, tuple(t.shape), [LocalRegion(Box.full(t.shape), data)])


def staged(data: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with the same values (a no-op for contiguous CPU tensors)."""
    if data.device.type != "cpu":
        data = data.to("cpu")
    if data.is_conj():
        data = data.resolve_conj()
    if data.is_neg():
        data = data.resolve_neg()
    return data.contiguous()

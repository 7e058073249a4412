"""Map a rank's local tensors to regions of logical tensors.

A *layout adapter* answers two questions for a leaf of the live state: what is the
global shape of the logical tensor, and which boxes of it does this process hold (with
the local data for each)? Saving writes those boxes; loading fills them. Three layouts
are understood, and every parallelism outlast supports is one of them or a mix:

* a plain ``torch.Tensor``: the whole logical tensor (DDP replicas, pipeline stages
  that hold a tensor only on some ranks, single-process training);
* a ``DTensor`` on any ``DeviceMesh`` with ``Shard(d)`` (even or uneven) and
  ``Replicate`` placements: FSDP2 ``fully_shard``, tensor parallel, 2-D meshes;
* a :class:`FlatShard`: a contiguous slice of the row-major flattened tensor (ZeRO and
  FSDP1 flat buffers), cut into a few boxes by :func:`~outlast.regions.flat_range_to_boxes`.

Replicas are not marked here: two ranks holding the same box of the same tensor are
replicas by definition, and the save planner writes such a box once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import dtypes
from .errors import SerializationError
from .grid import FULL, GridSpec
from .regions import Box, flat_range_to_boxes

__all__ = ["FlatShard", "LocalRegion", "LocalTensor", "local_tensor", "staged"]


class FlatShard:
    """This rank's contiguous slice ``[start, start + local.numel())`` of a flattened tensor.

    ZeRO optimizers and FSDP1 keep each parameter (or a whole bucket) as one flat 1-D
    buffer cut into equal slices, one per rank, with no regard to rows. Wrap the slice in
    a ``FlatShard`` to save or load it as part of the logical tensor of ``global_shape``:
    on save its elements become regions of that tensor; on load ``local`` is filled in
    place (it must be a contiguous 1-D tensor, or a view that can be written through).

    Args:
        local: the 1-D tensor (or view) holding this rank's elements.
        global_shape: shape of the logical (unflattened) tensor.
        start: flat index of ``local[0]`` in the row-major flattened logical tensor.

    Example:
        >>> w = torch.arange(12.).reshape(3, 4)            # the logical tensor
        >>> part = w.reshape(-1)[5:9].clone()              # rank 1's slice
        >>> outlast.save({"w": outlast.FlatShard(part, (3, 4), 5)}, path)  # doctest: +SKIP
        ... # collective: every rank passes its own slice; together they cover w
    """

    def __init__(self, local: torch.Tensor, global_shape: Sequence[int], start: int):
        if not isinstance(local, torch.Tensor):
            raise SerializationError(f"FlatShard.local must be a tensor, got {type(local).__name__}")
        if local.dim() != 1:
            raise SerializationError(
                f"FlatShard.local must be 1-D (a slice of a flat buffer), got shape {list(local.shape)}; "
                "pass buffer.view(-1)[start:start + n]"
            )
        shape = tuple(int(s) for s in global_shape)
        start = int(start)
        if any(s < 0 for s in shape) or start < 0 or start + local.numel() > math.prod(shape):
            raise SerializationError(
                f"FlatShard covers elements [{start}, {start + local.numel()}) but a tensor of shape "
                f"{list(shape)} has {math.prod(shape)}; check start and global_shape"
            )
        self.local = local
        self.global_shape = shape
        self.start = start

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    def boxes(self) -> list[Box]:
        """The boxes of the logical tensor this slice holds, in flat order."""
        return flat_range_to_boxes(self.global_shape, self.start, self.local.numel())

    def __repr__(self) -> str:
        return f"FlatShard(numel={self.local.numel()}, global_shape={list(self.global_shape)}, start={self.start})"


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
    replicated: bool = True  # every rank holding it holds the same data (plain tensors)
    # The whole layout of the tensor when it is a grid (outlast.grid): a GridSpec for a
    # Shard/Replicate DTensor (global ranks), "full" for a plain tensor, None otherwise.
    grid: object = None


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch built without distributed
    _DTensor = None


def is_dtensor(x) -> bool:
    return _DTensor is not None and isinstance(x, _DTensor)


def is_leaf_tensor(x) -> bool:
    """True for every kind of tensor leaf a layout adapter understands."""
    return isinstance(x, (torch.Tensor, FlatShard))


def _check_plain(fqn: str, t: torch.Tensor) -> None:
    if t.layout != torch.strided:
        raise SerializationError(f"tensor {fqn!r} has layout {t.layout}; convert it with .to_dense() before saving")
    if t.device.type == "meta":
        raise SerializationError(f"tensor {fqn!r} is on the meta device and has no data to save")
    dtypes.to_safetensors(t.dtype, name=fqn)


def local_tensor(fqn: str, t) -> LocalTensor:
    """Describe a live tensor leaf; raises SerializationError if it cannot be saved or loaded."""
    if isinstance(t, FlatShard):
        return _flat_shard(fqn, t)
    if is_dtensor(t):
        return _dtensor(fqn, t)
    _check_plain(fqn, t)
    data = t.detach()
    return LocalTensor(fqn, t.dtype, tuple(t.shape), [LocalRegion(Box.full(t.shape), data)], grid=FULL)


def _flat_shard(fqn: str, fs: FlatShard) -> LocalTensor:
    _check_plain(fqn, fs.local)
    flat = fs.local.detach()
    regions = []
    pos = 0
    for box in fs.boxes():
        n = box.numel
        # A flat range of a row-major tensor cut at box boundaries is contiguous, so each
        # region is a plain view of the slice: writes on load land in ``local`` itself.
        regions.append(LocalRegion(box, flat[pos : pos + n].view(box.sizes)))
        pos += n
    return LocalTensor(fqn, flat.dtype, fs.global_shape, regions, replicated=False)


def _dtensor(fqn: str, dt) -> LocalTensor:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # older torch
        _StridedShard = ()  # type: ignore[assignment]
    for p in dt.placements:
        if _StridedShard and isinstance(p, _StridedShard):
            raise SerializationError(
                f"tensor {fqn!r} is a DTensor with placement {p} (strided sharding, from FSDP2 on top of "
                "tensor parallel on the same dim): its local part is not one box of the global tensor, "
                "which outlast does not support yet. Call .full_tensor() or redistribute() it to "
                "Shard/Replicate placements before saving."
            )
        if not isinstance(p, (Shard, Replicate)):
            raise SerializationError(
                f"tensor {fqn!r} is a DTensor with placement {p}: only Shard(d) and Replicate can be "
                "saved. Reduce a Partial DTensor first (dtensor.redistribute(placements=[Replicate()]))."
            )
    local = dt.to_local()
    _check_plain(fqn, local)
    shape = tuple(int(s) for s in dt.shape)
    lshape, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    lshape = tuple(int(s) for s in lshape)
    regions = []
    if offset != () and math.prod(lshape) > 0:
        if tuple(local.shape) != lshape:
            raise SerializationError(
                f"tensor {fqn!r}: DTensor local shard has shape {list(local.shape)} but its placements "
                f"{dt.placements} on mesh {tuple(dt.device_mesh.shape)} say {list(lshape)} (a padded shard?); "
                "outlast cannot map it to a region of the global tensor"
            )
        regions.append(LocalRegion(Box(tuple(int(o) for o in offset), lshape), local.detach()))
    replicated = all(isinstance(p, Replicate) for p in dt.placements)
    return LocalTensor(fqn, local.dtype, shape, regions, replicated=replicated, grid=_grid_of(dt, len(shape)))


# (id(mesh), placements) -> (mesh, GridSpec): every parameter on one mesh with the same
# placements shares one spec (and its digest and cell tables), and building it reads the
# mesh's rank tensor only once.
_GRIDS: dict = {}


def _grid_of(dt, ndim: int):
    from torch.distributed.tensor import Shard

    mesh = dt.device_mesh
    dims = tuple((p.dim + ndim if p.dim < 0 else p.dim) if isinstance(p, Shard) else -1 for p in dt.placements)
    key = (id(mesh), dims)
    hit = _GRIDS.get(key)
    if hit is not None and hit[0] is mesh:
        return hit[1]
    try:
        spec = GridSpec(tuple(mesh.shape), mesh.mesh.reshape(-1).tolist(), dims)
    except ValueError:
        return None
    if len(_GRIDS) > 256:
        _GRIDS.clear()
    _GRIDS[key] = (mesh, spec)
    return spec


def staged(data: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with the same values (a no-op for contiguous CPU tensors)."""
    if data.device.type != "cpu":
        data = data.to("cpu")
    if data.is_conj():
        data = data.resolve_conj()
    if data.is_neg():
        data = data.resolve_neg()
    return data.contiguous()

"""Pure geometry of tensor regions: boxes, their intersections, flat ranges.

A *region* of a logical tensor is a box: per-dimension ``offsets`` and ``sizes``. Every
parallel layout maps each rank's local tensor to one or more boxes of the global tensor,
and resharding is nothing but intersecting the boxes a checkpoint holds with the boxes a
live state wants. Flat partitions (ZeRO / FSDP1 flat buffers: a contiguous slice of the
row-major flattened tensor) are decomposed into a few boxes, each contiguous in memory.
This module imports no I/O and no torch.distributed so it can be tested in isolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Box", "flat_range_to_boxes", "covers", "first_overlap", "tiling_fault"]


@dataclass(frozen=True)
class Box:
    """A rectangular region of an n-d tensor: ``[offsets, offsets + sizes)`` per dimension.

    A 0-d tensor is the box with empty ``offsets`` and ``sizes`` (one element).

    Example:
        >>> Box((0, 2), (4, 2)).intersect(Box((1, 0), (1, 3)))
        Box(offsets=(1, 2), sizes=(1, 1))
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.sizes):
            raise ValueError(f"Box offsets {self.offsets} and sizes {self.sizes} differ in rank")
        if any(o < 0 for o in self.offsets) or any(s < 0 for s in self.sizes):
            raise ValueError(f"Box offsets {self.offsets} and sizes {self.sizes} must be >= 0")

    @classmethod
    def full(cls, shape: Sequence[int]) -> "Box":
        """The box covering a whole tensor of ``shape``."""
        # Hot path (once per tensor per save): a shape is valid by construction, so skip
        # __post_init__'s checks.
        box = object.__new__(cls)
        sizes = tuple(shape)
        object.__setattr__(box, "offsets", (0,) * len(sizes))
        object.__setattr__(box, "sizes", sizes)
        return box

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    def within(self, shape: Sequence[int]) -> bool:
        """True if the box lies inside a tensor of ``shape``."""
        return len(shape) == self.ndim and all(e <= s for e, s in zip(self.ends, shape))

    def intersect(self, other: "Box") -> "Box | None":
        """The common region, or None if the boxes do not overlap (or one is empty)."""
        if other.ndim != self.ndim:
            raise ValueError(f"cannot intersect boxes of rank {self.ndim} and {other.ndim}")
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a, b) for a, b in zip(self.ends, other.ends))
        if any(h <= l for l, h in zip(lo, hi)):
            return None
        if self.numel == 0 or other.numel == 0:
            return None
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))

    def relative_to(self, outer: "Box") -> tuple[slice, ...]:
        """Slices that select this box inside a tensor holding ``outer``."""
        return tuple(
            slice(o - oo, o - oo + s) for o, oo, s in zip(self.offsets, outer.offsets, self.sizes)
        )

    def to_json(self) -> dict:
        return {"offsets": list(self.offsets), "sizes": list(self.sizes)}


def flat_range_to_boxes(shape: Sequence[int], start: int, length: int) -> list[Box]:
    """Decompose the flat range ``[start, start+length)`` of a row-major tensor into boxes.

    The boxes are returned in flat order and each one is contiguous in the flattened
    tensor, so a flat buffer can be cut into them with plain slicing (no copy). At most
    ``2 * ndim - 1`` boxes are returned.

    Example:
        >>> flat_range_to_boxes((3, 4), 2, 7)   # elements 2..8 of a 3x4 tensor
        [Box(offsets=(0, 2), sizes=(1, 2)), Box(offsets=(1, 0), sizes=(1, 4)), Box(offsets=(2, 0), sizes=(1, 1))]
    """
    shape = tuple(int(s) for s in shape)
    total = math.prod(shape)
    if start < 0 or length < 0 or start + length > total:
        raise ValueError(f"flat range [{start}, {start + length}) outside a tensor of {total} elements")
    return _decompose(shape, start, start + length)


def _decompose(shape: tuple[int, ...], s: int, e: int) -> list[Box]:
    if s >= e:
        return []
    if len(shape) == 0:
        return [Box((), ())]
    if len(shape) == 1:
        return [Box((s,), (e - s,))]
    inner = math.prod(shape[1:])
    first, last = s // inner, (e - 1) // inner
    rest = shape[1:]

    def prefixed(row: int, boxes: list[Box]) -> list[Box]:
        return [Box((row,) + b.offsets, (1,) + b.sizes) for b in boxes]

    if first == last:
        return prefixed(first, _decompose(rest, s - first * inner, e - first * inner))
    out: list[Box] = []
    a = first
    if s % inner:
        out += prefixed(first, _decompose(rest, s % inner, inner))
        a = first + 1
    b = last + 1
    tail: list[Box] = []
    if e % inner:
        b = last
        tail = prefixed(last, _decompose(rest, 0, e % inner))
    if b > a:
        out.append(Box((a,) + (0,) * len(rest), (b - a,) + rest))
    return out + tail


def covers(boxes: Sequence[Box], target: Box) -> bool:
    """True if non-overlapping ``boxes`` cover every element of ``target``."""
    got = 0
    for b in boxes:
        i = b.intersect(target)
        if i is not None:
            got += i.numel
    return got == target.numel


def overlapping_pairs(boxes: Sequence[Box]) -> list[tuple[int, int]]:
    """Index pairs of boxes that overlap (quadratic; meant for verification)."""
    out = []
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if boxes[i].intersect(boxes[j]) is not None:
                out.append((i, j))
    return out


def first_overlap(boxes: Sequence[Box]) -> tuple[int, int] | None:
    """Indices ``(i, j)`` of two overlapping boxes, or None if no two overlap.

    A sweep along dimension 0: boxes sorted by their first offset, each compared only
    with the earlier boxes whose dim-0 range is still open. Row-block and shard layouts
    (disjoint along dim 0, or a few column shards per row range) cost O(n log n).
    Empty boxes overlap nothing.

    Example:
        >>> first_overlap([Box((0,), (2,)), Box((2,), (2,)), Box((1,), (2,))])
        (0, 2)
    """
    live = [i for i, b in enumerate(boxes) if b.numel > 0]
    if len(live) < 2:
        return None
    if boxes[live[0]].ndim == 0:
        return (live[0], live[1])  # two 0-d boxes are the same element
    live.sort(key=lambda i: boxes[i].offsets[0])
    active: list[int] = []  # boxes whose dim-0 range may still reach the current one
    for i in live:
        b = boxes[i]
        start = b.offsets[0]
        active = [a for a in active if boxes[a].offsets[0] + boxes[a].sizes[0] > start]
        for a in active:
            if boxes[a].intersect(b) is not None:
                return (min(a, i), max(a, i))
        active.append(i)
    return None


def tiling_fault(shape: Sequence[int], boxes: Sequence[Box]) -> str | None:
    """Why ``boxes`` do not tile a tensor of ``shape`` exactly, or None if they do.

    Tiling is structural: every box inside the shape, no two overlapping, and together
    exactly as many elements as the tensor (no overlap + equal volume = no gap). Counting
    elements alone would accept rows 0:2 stored twice and rows 2:4 missing.

    Example:
        >>> tiling_fault((4,), [Box((0,), (2,)), Box((0,), (2,))])
        'regions 0 and 1 overlap at offsets=[0] sizes=[2]'
    """
    for i, b in enumerate(boxes):
        if not b.within(shape):
            return f"region {i} (offsets={list(b.offsets)} sizes={list(b.sizes)}) lies outside shape {list(shape)}"
    pair = first_overlap(boxes)
    if pair is not None:
        i, j = pair
        x = boxes[i].intersect(boxes[j])
        return f"regions {i} and {j} overlap at offsets={list(x.offsets)} sizes={list(x.sizes)}"
    total = math.prod(shape)
    got = sum(b.numel for b in boxes)
    if got != total:
        return f"regions cover {got} of {total} elements ({total - got} missing)"
    return None

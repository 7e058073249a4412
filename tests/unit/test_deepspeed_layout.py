"""ZeRO flat-partition geometry in outlast.convert.deepspeed: pure, no DeepSpeed, no files."""

from __future__ import annotations

import math

import pytest
import torch

from outlast.convert.deepspeed import FlatChunk, _assemble, zero3_layout, zero12_layout


def shard_zero12(params: dict[str, torch.Tensor], world: int, pads: list[int], align: int):
    """Flatten like ZeRO 1/2 (param, its padding, ...), pad the tail, cut, drop tail padding."""
    pieces = []
    for t, pad in zip(params.values(), pads):
        pieces += [t.flatten(), torch.full((pad,), float("nan"))]
    flat = torch.cat(pieces)
    real = flat.numel()
    total = align * math.ceil(real / align)
    flat = torch.cat([flat, torch.full((total - real,), float("nan"))])
    size = total // world
    return [[flat[r * size:(r + 1) * size][: max(0, min(size, real - r * size))]] for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("pads", [[0, 0, 0], [1, 3, 0]])
def test_zero12_round_trip(world, pads):
    params = {"a": torch.arange(15.0).view(3, 5), "b": torch.arange(7.0) + 100, "c": torch.arange(4.0) + 200}
    flats = shard_zero12(params, world, pads, align=2 * world)
    layout = zero12_layout([{k: tuple(v.shape) for k, v in params.items()}],
                           [[f[0].numel() for f in flats]], [pads])
    for fqn, t in params.items():
        assert torch.equal(_assemble(layout[fqn], flats, tuple(t.shape)), t)
        assert sum(c.length for c in layout[fqn]) == t.numel()


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_zero3_round_trip(world):
    params = {"a": torch.arange(15.0).view(3, 5), "b": torch.arange(7.0) + 100, "c": torch.tensor([9.0])}
    per_rank = [[] for _ in range(world)]
    for t in params.values():
        c = math.ceil(t.numel() / world)
        padded = torch.cat([t.flatten(), torch.full((c * world - t.numel(),), float("nan"))])
        for r in range(world):
            per_rank[r].append(padded[r * c:(r + 1) * c])
    flats = [[torch.cat(p)] for p in per_rank]
    layout = zero3_layout([{"a": (3, 5), "b": (7,)}, {"c": (1,)}], world)
    for fqn, t in params.items():
        assert torch.equal(_assemble(layout[fqn], flats, tuple(t.shape)), t)


def test_zero12_rejects_too_few_elements():
    with pytest.raises(ValueError, match="ends at flat offset 10"):
        zero12_layout([{"w": (10,)}], [[4, 4]])


def test_zero12_chunk_boundaries():
    assert zero12_layout([{"w": (3,)}, {"v": (2,)}], [[2, 1], [1, 1]])["v"] == [
        FlatChunk(1, 0, 0, 0, 1), FlatChunk(1, 1, 0, 1, 1)]

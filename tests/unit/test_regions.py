"""Box geometry and the flat-range decomposition used by flat (ZeRO) partitions."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outlast.regions import Box, covers, flat_range_to_boxes, overlapping_pairs


def test_intersection_and_relative_slices():
    a = Box((0, 2), (4, 2))
    b = Box((1, 0), (2, 3))
    i = a.intersect(b)
    assert i == Box((1, 2), (2, 1))
    t = torch.arange(24).reshape(4, 6)
    assert torch.equal(t[a.offsets[0]:4, 2:4][i.relative_to(a)], t[1:3, 2:3])
    assert a.intersect(Box((4, 0), (1, 6))) is None
    assert Box((), ()).intersect(Box((), ())) == Box((), ())


def test_box_rejects_bad_geometry():
    with pytest.raises(ValueError):
        Box((0,), (1, 2))
    with pytest.raises(ValueError):
        Box((-1,), (2,))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=0, max_size=4), st.data())
def test_flat_range_boxes_are_exact_and_contiguous(shape, data):
    total = math.prod(shape)
    start = data.draw(st.integers(0, total))
    length = data.draw(st.integers(0, total - start))
    boxes = flat_range_to_boxes(shape, start, length)
    assert len(boxes) <= max(1, 2 * len(shape) - 1)
    flat = torch.arange(total).reshape(shape) if shape else torch.tensor(0)
    got = [flat[tuple(slice(o, o + s) for o, s in zip(b.offsets, b.sizes))].reshape(-1) for b in boxes]
    # Concatenated in order the boxes are exactly the flat range: contiguous and complete.
    assert torch.equal(torch.cat(got) if got else torch.empty(0, dtype=torch.long), torch.arange(start, start + length))
    assert not overlapping_pairs(boxes)


def test_flat_range_out_of_bounds():
    with pytest.raises(ValueError):
        flat_range_to_boxes((2, 3), 4, 3)


def test_covers():
    parts = [Box((0, 0), (2, 3)), Box((2, 0), (1, 3))]
    assert covers(parts, Box((0, 0), (3, 3)))
    assert not covers(parts[:1], Box((0, 0), (3, 3)))

"""Box geometry and the flat-range decomposition used by flat (ZeRO) partitions."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outlast.regions import Box, covers, first_overlap, flat_range_to_boxes, overlapping_pairs, tiling_fault


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


@st.composite
def _boxes(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    n = draw(st.integers(0, 8))
    out = []
    for _ in range(n):
        offs = tuple(draw(st.integers(0, s - 1)) for s in shape)
        sizes = tuple(draw(st.integers(0, s - o)) for s, o in zip(shape, offs))
        out.append(Box(offs, sizes))
    return shape, out


@settings(max_examples=300, deadline=None)
@given(_boxes())
def test_first_overlap_agrees_with_the_pairwise_check(case):
    shape, boxes = case
    pairs = overlapping_pairs(boxes)
    got = first_overlap(boxes)
    assert (got is None) == (not pairs)
    if got is not None:
        assert boxes[got[0]].intersect(boxes[got[1]]) is not None


def test_tiling_is_structural_not_a_count():
    halves = [Box((0, 0), (2, 4)), Box((2, 0), (2, 4))]
    assert tiling_fault((4, 4), halves) is None
    twice = [Box((0, 0), (2, 4)), Box((0, 0), (2, 4))]  # 16 elements, but rows 2:4 are missing
    assert "overlap" in tiling_fault((4, 4), twice)
    assert "missing" in tiling_fault((4, 4), halves[:1])
    assert "outside" in tiling_fault((3, 4), halves)
    cols = [Box((0, c), (4, 1)) for c in range(4)]  # column shards: one active set per row range
    assert tiling_fault((4, 4), cols) is None

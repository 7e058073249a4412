"""The pure planners with many fake ranks in one process: dedup, balance, coverage."""

import math
import random

import pytest
from hypothesis import given, settings, strategies as st

from outlast.errors import DistributedError
from outlast.plan import (
    RankMeta,
    RegionMeta,
    StoredChunk,
    TensorMeta,
    Want,
    balance,
    plan_load_reads,
    plan_save,
)
from outlast.regions import Box, flat_range_to_boxes, tiling_fault


def meta(shape, dtype="F32", itemsize=4, path=None):
    return TensorMeta(path or ("t",), dtype, tuple(shape), itemsize)


def covered_exactly(plan, fqn, shape):
    boxes = [i.box for i in plan.items if i.fqn == fqn]
    assert sum(b.numel for b in boxes) == math.prod(shape)
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            assert boxes[a].intersect(boxes[b]) is None


def test_balance_lpt():
    assert balance([10, 7, 5, 4], 2) == [0, 1, 1, 0]


def test_replicas_written_once_and_balanced_ddp():
    rng = random.Random(0)
    shapes = {f"p{i}": (rng.randint(1, 400), rng.randint(1, 300)) for i in range(40)}
    shapes["emb"] = (5000, 256)  # one dominant tensor: must be split to balance
    tensors = {k: meta(s, path=(k,)) for k, s in shapes.items()}
    regions = [RegionMeta(k, Box.full(s)) for k, s in shapes.items()]
    for n in (1, 2, 3, 4, 8, 16):
        plan = plan_save([RankMeta(tensors, regions)] * n, min_split_bytes=8 << 10)
        for k, s in shapes.items():
            covered_exactly(plan, k, s)
        total = sum(math.prod(s) * 4 for s in shapes.values())
        assert sum(plan.bytes_per_rank()) == total  # each byte once
        assert plan.balance_ratio() <= 1.05, (n, plan.bytes_per_rank())


def test_sharded_regions_stay_with_their_rank():
    n = 4
    ranks = []
    for r in range(n):
        t = {"w": meta((10, 6))}
        ranks.append(RankMeta(t, [RegionMeta("w", Box((r * 3, 0), (min(3, 10 - r * 3), 6)))] if r * 3 < 10 else []))
    plan = plan_save(ranks)
    for it in plan.items:
        assert it.box.offsets[0] // 3 == it.rank
    covered_exactly(plan, "w", (10, 6))


def test_2d_mesh_replicate_shard_dedup():
    # mesh (2, 2), placements (Replicate, Shard(0)): ranks (0,2) hold rows 0..4, (1,3) rows 4..8
    t = {"w": meta((8, 1024))}
    ranks = [RankMeta(t, [RegionMeta("w", Box(((r % 2) * 4, 0), (4, 1024)))]) for r in range(4)]
    plan = plan_save(ranks, min_split_bytes=1024)
    covered_exactly(plan, "w", (8, 1024))
    assert plan.balance_ratio() <= 1.05
    for it in plan.items:  # a holder writes: rank r only writes rows it has
        assert (it.box.offsets[0] // 4) == it.rank % 2


def test_flat_shards_and_pipeline_tensors():
    shape = (7, 5, 3)
    total = math.prod(shape)
    cuts = [0, 17, 40, 41, total]
    ranks = []
    for r in range(4):
        regs = [RegionMeta("flat", b) for b in flat_range_to_boxes(shape, cuts[r], cuts[r + 1] - cuts[r])]
        t = {"flat": meta(shape)}
        if r >= 2:  # a pipeline stage: only ranks 2, 3 hold "head"
            t["head"] = meta((4, 4))
            regs.append(RegionMeta("head", Box.full((4, 4))))
        ranks.append(RankMeta(t, regs))
    plan = plan_save(ranks)
    covered_exactly(plan, "flat", shape)
    covered_exactly(plan, "head", (4, 4))
    assert {i.rank for i in plan.items if i.fqn == "head"} <= {2, 3}
    assert set(plan.tensors) == {"flat", "head"}


def test_conflicting_shapes_name_tensor_and_both_shapes():
    a = RankMeta({"w": meta((4, 4))}, [RegionMeta("w", Box.full((4, 4)))])
    b = RankMeta({"w": meta((4, 5))}, [RegionMeta("w", Box.full((4, 5)))])
    with pytest.raises(DistributedError, match=r"'w'.*\[4, 4\].*\[4, 5\]"):
        plan_save([a, b])


def test_gaps_and_overlaps_refused():
    t = {"w": meta((4, 4))}
    gap = [RankMeta(t, [RegionMeta("w", Box((0, 0), (2, 4)))]), RankMeta(t, [RegionMeta("w", Box((2, 0), (1, 4)))])]
    with pytest.raises(DistributedError, match="12 of its 16"):
        plan_save(gap)
    over = [RankMeta(t, [RegionMeta("w", Box((0, 0), (3, 4)))]), RankMeta(t, [RegionMeta("w", Box((2, 0), (2, 4)))])]
    with pytest.raises(DistributedError, match="overlapping"):
        plan_save(over)


def test_writer_ids_unique_per_rank():
    t = {f"p{i}": meta((64, 64)) for i in range(12)}
    regs = [RegionMeta(k, Box.full((64, 64))) for k in t]
    plan = plan_save([RankMeta(t, regs)] * 3, writers_per_rank=2)
    for it in plan.items:
        assert it.writer // 2 == it.rank


def test_plans_are_deterministic_and_comparable():
    t = {f"p{i}": meta((64, 3 + i)) for i in range(9)}
    regs = [RegionMeta(k, Box.full(m.shape)) for k, m in t.items()]
    assert plan_save([RankMeta(t, regs)] * 3) == plan_save([RankMeta(t, regs)] * 3)


# ------------------------------------------------------------------ load plans


def test_replicated_want_read_once_and_sent():
    c = StoredChunk("w", 0, Box((0, 0), (100, 10)), 4)
    wants = [Want("w", Box((0, 0), (100, 10)), r, 0) for r in range(4)]
    plan = plan_load_reads([c], wants, 4)
    assert sum(plan.bytes_read()) == 4000
    assert sum(plan.bytes_received()) == 3 * 4000


def test_many_replicated_chunks_spread_readers():
    chunks = [StoredChunk(f"p{i}", 0, Box((0,), (1000,)), 4) for i in range(8)]
    wants = [Want(f"p{i}", Box((0,), (1000,)), r, i) for r in range(4) for i in range(8)]
    plan = plan_load_reads(chunks, wants, 4)
    assert plan.bytes_read() == [8000] * 4


def test_partial_rows_read_only_what_is_needed():
    c = StoredChunk("w", 0, Box((0, 0), (100, 10)), 4, block_rows=0)
    wants = [Want("w", Box((r * 25, 0), (25, 10)), r, 0) for r in range(4)]
    plan = plan_load_reads([c], wants, 4, verify=False)
    assert plan.bytes_read() == [1000] * 4 and sum(plan.bytes_received()) == 0
    # verify with blocks of 10 rows: reads widen to whole blocks (25 rows -> 30 at most)
    cb = StoredChunk("w", 0, c.box, 4, block_rows=10)
    plan = plan_load_reads([cb], wants, 4, verify=True)
    assert all(1000 <= b <= 1400 for b in plan.bytes_read()), plan.bytes_read()
    assert all(r.verify in ("blocks", "chunk") for r in plan.reads)
    # verify without blocks: whole chunk by each reader
    plan = plan_load_reads([c], wants, 4, verify=True)
    assert all(r.verify == "chunk" for r in plan.reads)


def test_column_shards_read_once():
    c = StoredChunk("w", 0, Box((0, 0), (8, 8)), 4)
    wants = [Want("w", Box((0, r * 4), (8, 4)), r, 0) for r in range(2)]
    plan = plan_load_reads([c], wants, 2)
    assert sum(plan.bytes_read()) == 256 and sum(plan.bytes_received()) == 128


def test_every_want_is_filled_exactly():
    rng = random.Random(3)
    for _ in range(50):
        rows, cols = rng.randint(1, 30), rng.randint(1, 6)
        cuts = sorted({0, rows, *(rng.randint(0, rows) for _ in range(3))})
        chunks = [StoredChunk("w", i, Box((a, 0), (b - a, cols)), 2, rng.choice([0, 2, 3])) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
        n = rng.randint(1, 5)
        wants = []
        for r in range(n):
            a = rng.randint(0, rows - 1)
            b = rng.randint(a + 1, rows)
            wants.append(Want("w", Box((a, 0), (b - a, cols)), r, 0))
        plan = plan_load_reads(chunks, wants, n, verify=rng.random() < 0.5)
        for w in wants:
            got = sum(p.box.numel for rd in plan.reads for p in rd.pieces if p.rank == w.rank)
            assert got == w.box.numel
            for rd in plan.reads:
                for p in rd.pieces:
                    assert p.box.intersect(rd.box) == p.box


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_load_plan_delivers_every_want_exactly(data):
    """With the dim-0 index, each want still gets pieces that tile it exactly (no want missed)."""
    rows = data.draw(st.integers(1, 40))
    cols = data.draw(st.integers(1, 5))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, rows - 1), max_size=6)) if rows > 1 else []))
    edges = [0, *cuts, rows]
    chunks = [StoredChunk("w", i, Box((a, 0), (b - a, cols)), 4) for i, (a, b) in enumerate(zip(edges, edges[1:]))]
    world = data.draw(st.integers(1, 4))
    wants = []
    for r in range(world):
        for k in range(data.draw(st.integers(0, 3))):
            a = data.draw(st.integers(0, rows - 1))
            b = data.draw(st.integers(a + 1, rows))
            c0 = data.draw(st.integers(0, cols - 1))
            c1 = data.draw(st.integers(c0 + 1, cols))
            wants.append(Want("w", Box((a, c0), (b - a, c1 - c0)), r, k))
    plan = plan_load_reads(chunks, wants, world, verify=data.draw(st.booleans()))
    got: dict = {}
    for read in plan.reads:
        for p in read.pieces:
            got.setdefault((p.rank, p.request), []).append(p.box)
    for w in wants:
        boxes = got.get((w.rank, w.request), [])
        assert all(b.intersect(w.box) == b for b in boxes)
        assert tiling_fault(w.box.sizes, [Box(tuple(o - wo for o, wo in zip(b.offsets, w.box.offsets)), b.sizes) for b in boxes]) is None

"""Grid layouts (outlast.grid) against torch's offsets and against the general planners.

The grid planners must give plans with the general planners' guarantees: every byte
written exactly once by a rank that holds it, every want filled byte for byte, reads
widened to checksum blocks, the same errors for layouts that do not fit together.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from outlast import grid
from outlast.errors import DistributedError
from outlast.grid import FULL, GridSavePlan, GridSpec, chunk_cuts, plan_load_layouts, plan_save_layouts, stored_grid
from outlast.plan import RankMeta, RegionMeta, SavePlan, StoredChunk, TensorMeta, Want, plan_load_reads, plan_save
from outlast.regions import Box, tiling_fault


def _torch_box(shape, mesh_shape, coord, shard_dims):
    placements = [Shard(d) if d >= 0 else Replicate() for d in shard_dims]
    lshape, off = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
    return None if math.prod(lshape) == 0 else Box(tuple(off), tuple(lshape))


def test_chunk_cuts_is_torch_chunk():
    import torch

    for n in range(0, 12):
        for k in range(1, 6):
            sizes = [c.numel() for c in torch.arange(n).chunk(k)] if n else []
            got = np.diff(chunk_cuts(n, k)).tolist()
            assert [s for s in got if s] == sizes, (n, k)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_boxes_match_torch_offsets(data):
    """Every mesh position's cell is the box DTensor itself computes (uneven, nested, empty)."""
    mesh_shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    dims = tuple(data.draw(st.lists(st.integers(-1, ndim - 1), min_size=len(mesh_shape), max_size=len(mesh_shape))))
    n = math.prod(mesh_shape)
    ranks = data.draw(st.permutations(range(n)))
    spec = GridSpec(mesh_shape, ranks, dims)
    for pos, coord in enumerate(np.ndindex(*mesh_shape)):
        assert spec.box_of(ranks[pos], shape) == _torch_box(shape, mesh_shape, coord, dims), (coord, spec)


# ------------------------------------------------------------------ random grid worlds

def _factor(n, rng):
    """A random mesh shape with n positions."""
    out = []
    while n > 1 and len(out) < 2:
        ds = [d for d in range(2, n + 1) if n % d == 0]
        d = ds[rng.randrange(len(ds))]
        out.append(d)
        n //= d
    if n > 1:
        out.append(n)
    return tuple(out) or (1,)


def _world(data, world, allow_full=True):
    """Per rank: a RankMeta with boxes and grids (the same grids a DTensor rank would give)."""
    import random

    rng = random.Random(data.draw(st.integers(0, 10**6)))
    ntens = data.draw(st.integers(1, 4))
    tensors, grids = {}, {}
    holders_of = {}
    for i in range(ntens):
        ndim = rng.randint(0, 3)
        shape = tuple(rng.randint(1 if rng.random() < 0.9 else 0, 9) for _ in range(ndim))  # empty tensors too
        itemsize = rng.choice([1, 2, 4])
        fqn = f"t{i}"
        tensors[fqn] = TensorMeta((fqn,), {1: "U8", 2: "BF16", 4: "F32"}[itemsize], shape, itemsize)
        if allow_full and rng.random() < 0.3:
            grids[fqn] = FULL
            holders_of[fqn] = sorted(rng.sample(range(world), rng.randint(1, world)))
        else:
            mesh = _factor(world, rng)
            dims = tuple(rng.randint(-1, ndim - 1) if ndim else -1 for _ in mesh)
            perm = list(range(world))
            rng.shuffle(perm)
            grids[fqn] = GridSpec(mesh, perm, dims)
    metas = []
    for r in range(world):
        ts = {f: m for f, m in tensors.items() if grids[f] != FULL or r in holders_of[f]}
        gs = {f: grids[f] for f in ts}
        desc = RankMeta(ts, [], gs)
        metas.append(grid.checked(RankMeta(ts, grid.expand(desc, r).regions, gs), r))
    return tensors, metas


def _classes(metas):
    digests = [grid.layout_digest(m) for m in metas]
    classes, rep = grid.exchange_classes(digests)
    sent = [grid.payload(m, r, rep) for r, m in enumerate(metas)]
    return [(ranks, sent[ranks[0]]) for ranks in classes]


def _check_save(plan, tensors, metas):
    written: dict = {}
    for it in plan.items:
        written.setdefault(it.fqn, []).append(it.box)
        held = [r.box for r in metas[it.rank].regions if r.fqn == it.fqn]
        assert any(it.box.intersect(h) == it.box or (it.box.numel == 0 and it.box == h) for h in held), (it, held)
        assert it.writer // plan.writers_per_rank == it.rank
    for fqn, m in tensors.items():
        boxes = [b for b in written.get(fqn, []) if b.numel]
        assert tiling_fault(m.shape, boxes) is None if math.prod(m.shape) else not boxes, (fqn, boxes)
    return written


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_grid_save_plan_writes_every_byte_once(data):
    world = data.draw(st.integers(1, 12))
    tensors, metas = _world(data, world)
    split = data.draw(st.sampled_from([4, 16, 1 << 20]))
    plan = plan_save_layouts(_classes(metas), world, min_split_bytes=split)
    assert isinstance(plan, GridSavePlan)
    ref = plan_save(metas, min_split_bytes=split)
    _check_save(plan, tensors, metas)
    assert sum(plan.bytes_per_rank()) == sum(ref.bytes_per_rank())
    # byte-for-byte: rebuild every tensor from what each writer writes of its own data
    for fqn, m in tensors.items():
        full = np.arange(math.prod(m.shape)).reshape(m.shape) if m.shape else np.array(7)
        out = np.full(m.shape, -1)
        for it in plan.items:
            if it.fqn == fqn:
                sl = tuple(slice(o, o + s) for o, s in zip(it.box.offsets, it.box.sizes))
                out[sl] = full[sl]
        assert (out == full).all()
    # one class per distinct layout, not per rank: identical ranks send one descriptor
    assert len(_classes(metas)) <= len({grid.layout_digest(m) for m in metas})


def test_grid_save_balances_replicas_like_the_general_planner():
    # DDP: every rank holds every tensor (plain tensors, grid "full"); one dominant tensor.
    import random

    rng = random.Random(0)
    shapes = {f"p{i}": (rng.randint(1, 400), rng.randint(1, 300)) for i in range(40)}
    shapes["emb"] = (5000, 256)
    tensors = {k: TensorMeta((k,), "F32", s, 4) for k, s in shapes.items()}
    regions = [RegionMeta(k, Box.full(s)) for k, s in shapes.items()]
    for n in (1, 2, 3, 4, 8, 16):
        metas = [RankMeta(tensors, regions, {k: FULL for k in shapes})] * n
        plan = plan_save_layouts(_classes(metas), n, min_split_bytes=8 << 10)
        assert isinstance(plan, GridSavePlan) and len(_classes(metas)) == 1
        _check_save(plan, tensors, metas)
        assert plan.balance_ratio() <= 1.05, (n, plan.bytes_per_rank())


def test_fsdp_x_tp_cells_stay_with_their_rank_and_norms_spread():
    tp, fsdp = 4, 3
    world = tp * fsdp
    ranks = np.arange(world).reshape(fsdp, tp)
    spec_q = GridSpec((fsdp, tp), ranks.reshape(-1), (0, 0))   # (Shard(0), Shard(0))
    spec_o = GridSpec((fsdp, tp), ranks.reshape(-1), (0, 1))   # (Shard(0), Shard(1))
    spec_n = GridSpec((fsdp, tp), ranks.reshape(-1), (0, -1))  # (Shard(0), Replicate())
    tensors = {f"n{i}": TensorMeta((f"n{i}",), "F32", (48,), 4) for i in range(8)}
    tensors |= {"q": TensorMeta(("q",), "F32", (48, 16), 4), "o": TensorMeta(("o",), "F32", (16, 48), 4)}
    grids = {f: (spec_q if f == "q" else spec_o if f == "o" else spec_n) for f in tensors}
    metas = [grid.checked(RankMeta(tensors, grid.expand(RankMeta(tensors, [], grids), r).regions, grids), r) for r in range(world)]
    assert all(m.grids is not None for m in metas)
    classes = _classes(metas)
    assert len(classes) == 1 and classes[0][0] == list(range(world))
    plan = plan_save_layouts(classes, world)
    _check_save(plan, tensors, metas)
    # each norm cell (replicated over tp) has one writer; 8 norms x 3 cells over 12 ranks: 2 each
    norm_writers = [it.rank for it in plan.items if it.fqn.startswith("n")]
    assert sorted(np.bincount(norm_writers, minlength=world).tolist()) == [2] * world
    # a rank's own items come without building anyone else's
    assert plan.for_rank(5) == [it for it in plan.items if it.rank == 5]


def test_fallback_is_the_general_plan_and_its_errors():
    t = {"w": TensorMeta(("w",), "F32", (4, 4), 4)}
    spec = GridSpec((2,), [0, 1], (0,))
    g = [grid.checked(RankMeta(t, grid.expand(RankMeta(t, [], {"w": spec}), r).regions, {"w": spec}), r) for r in range(2)]
    # a rank with explicit boxes (a FlatShard): the whole plan is the general one
    flat = RankMeta(t, [RegionMeta("w", Box((0, 0), (2, 4)))])
    mixed = [flat, g[1]]
    plan = plan_save_layouts(_classes(mixed), 2)
    assert isinstance(plan, SavePlan) and plan == plan_save([flat, RankMeta(t, g[1].regions)])
    # two meshes shard the tensor differently: overlapping but different regions
    other = GridSpec((2,), [0, 1], (1,))
    bad = [g[0], grid.checked(RankMeta(t, grid.expand(RankMeta(t, [], {"w": other}), 1).regions, {"w": other}), 1)]
    with pytest.raises(DistributedError, match="overlapping but different regions"):
        plan_save_layouts(_classes(bad), 2)
    # a rank of the mesh does not have the tensor: part of it is on no rank
    lonely = [g[0], RankMeta({}, [], {})]
    with pytest.raises(DistributedError, match="8 of its 16 elements"):
        plan_save_layouts(_classes(lonely), 2)
    # shapes disagree
    t5 = {"w": TensorMeta(("w",), "F32", (4, 5), 4)}
    wide = RankMeta(t5, [RegionMeta("w", Box.full((4, 5)))], {"w": FULL})
    with pytest.raises(DistributedError, match=r"'w'.*\[4, 4\].*\[4, 5\]"):
        plan_save_layouts(_classes([g[0], wide]), 2)


def test_checked_refuses_a_grid_that_disagrees_with_the_data():
    t = {"w": TensorMeta(("w",), "F32", (4, 4), 4)}
    spec = GridSpec((2,), [0, 1], (0,))
    wrong = RankMeta(t, [RegionMeta("w", Box((0, 0), (4, 4)))], {"w": spec})
    assert grid.checked(wrong, 0).grids is None
    outside = RankMeta(t, [RegionMeta("w", Box((0, 0), (2, 4)))], {"w": spec})
    assert grid.checked(outside, 0, {0: 0}).grids is None  # rank 1 of the mesh is not in the group
    assert grid.checked(outside, 0, {0: 0, 1: 1}).grids == {"w": spec}


# ------------------------------------------------------------------ load plans


def _stored(data, world_a, tensors):
    """Save grid plans of a random layout at world_a: stored chunks per tensor."""
    import random

    rng = random.Random(data.draw(st.integers(0, 10**6)))
    out = {}
    for fqn, m in tensors.items():
        mesh = _factor(world_a, rng)
        dims = tuple(rng.randint(-1, len(m.shape) - 1) if m.shape else -1 for _ in mesh)
        spec = GridSpec(mesh, range(world_a), dims)
        boxes = []
        for r in range(world_a):
            b = spec.box_of(r, m.shape)
            if b is not None and b not in boxes:
                boxes.append(b)
        rng.shuffle(boxes)
        out[fqn] = boxes
    return out


def _execute(views, tensors, chunks_of, world, wants_of):
    """Run every rank's view like transfer.read_mine + exchange: returns each rank's buffers."""
    full = {f: (np.arange(math.prod(m.shape)).reshape(m.shape) if m.shape else np.array(3)) for f, m in tensors.items()}
    dest = {(r, f): np.full(b.sizes, -1) for r in range(world) for f, b in wants_of[r].items()}
    outbox: dict = {}
    for r, v in enumerate(views):
        for rd in v.reads_of(r):
            if rd.verify != "none":
                c = rd.chunk
                whole = (rd.row_lo, rd.row_hi) == (0, c.rows)
                assert rd.verify == ("chunk" if whole else "blocks")
                if not whole:
                    assert c.block_rows and rd.row_lo % c.block_rows == 0
                    assert rd.row_hi % c.block_rows == 0 or rd.row_hi == c.rows
            src = full[rd.chunk.fqn][tuple(slice(o, o + s) for o, s in zip(rd.box.offsets, rd.box.sizes))]
            for p in rd.pieces:
                assert p.box.intersect(rd.box) == p.box or not p.box.ndim
                val = src[p.box.relative_to(rd.box)]
                if p.rank == r:
                    w = wants_of[r][rd.chunk.fqn]
                    dest[(r, rd.chunk.fqn)][p.box.relative_to(w)] = val
                    assert p.request == rd.chunk.fqn  # the view names the rank's own request
                else:
                    outbox.setdefault((r, p.rank), []).append((p.box, val))
        for dst, msgs in v.outgoing(r).items():
            assert [p.box for _, p in msgs] == [b for b, _ in outbox.get((r, dst), [])]
    for r, v in enumerate(views):
        for src, msgs in v.incoming(r).items():
            sent = outbox.pop((src, r))
            assert [p.box for _, p in msgs] == [b for b, _ in sent]  # both sides agree on the order
            for (rd, p), (_, val) in zip(msgs, sent):
                w = wants_of[r][rd.chunk.fqn]
                dest[(r, rd.chunk.fqn)][p.box.relative_to(w)] = val
    assert not outbox
    for (r, f), buf in dest.items():
        w = wants_of[r][f]
        assert (buf == full[f][tuple(slice(o, o + s) for o, s in zip(w.offsets, w.sizes))]).all(), (r, f)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_grid_load_plan_fills_every_want_like_the_general_planner(data):
    world_b = data.draw(st.integers(1, 10))
    tensors, metas = _world(data, world_b)
    tensors = {f: m for f, m in tensors.items() if math.prod(m.shape)}
    metas = [RankMeta({f: t for f, t in m.tensors.items() if f in tensors}, [r for r in m.regions if r.fqn in tensors],
                      {f: g for f, g in m.grids.items() if f in tensors}) for m in metas]
    stored = _stored(data, data.draw(st.integers(1, 10)), tensors)
    block = data.draw(st.sampled_from([0, 1, 2, 3]))
    verify = data.draw(st.booleans())
    sgs = {}
    chunks = []
    for f, boxes in stored.items():
        n, nd = len(boxes), len(tensors[f].shape)
        sgs[f] = stored_grid(tensors[f].shape, np.array([b.offsets for b in boxes]).reshape(n, nd),
                             np.array([b.sizes for b in boxes]).reshape(n, nd), np.full(n, block), tensors[f].itemsize)
        assert sgs[f] is not None
        chunks += [StoredChunk(f, i, b, tensors[f].itemsize, block) for i, b in enumerate(boxes)]
    plan = plan_load_layouts(sgs, _classes(metas), world_b, verify=verify)
    assert plan is not None
    wants_of = [{r.fqn: r.box for r in m.regions} for m in metas]
    views = [plan.view(r, {f: f for f in wants_of[r]}) for r in range(world_b)]
    _execute(views, tensors, chunks, world_b, wants_of)
    # the same bytes leave storage as with the general planner (each segment read once)
    wants = [Want(r.fqn, r.box, k, i) for k, m in enumerate(metas) for i, r in enumerate(m.regions)]
    ref = plan_load_reads(chunks, wants, world_b, verify=verify)
    assert sum(plan.bytes_read()) == sum(ref.bytes_read())
    assert sum(sum(rd.nbytes for rd in v.reads_of(r)) for r, v in enumerate(views)) == sum(plan.bytes_read())
    # the compact global plan, materialised, is the union of the ranks' own reads
    every = plan.all_reads()
    assert sorted((rd.chunk.fqn, rd.chunk.index, rd.row_lo, rd.reader) for rd in every) == sorted(
        (rd.chunk.fqn, rd.chunk.index, rd.row_lo, rd.reader) for r, v in enumerate(views) for rd in v.reads_of(r))


def test_replicated_wants_are_read_once_and_spread():
    # stored: 8 row chunks of a norm; wanted: every one of 4 ranks wants all of it (DDP)
    boxes = [Box((8 * i,), (8,)) for i in range(8)]
    sg = stored_grid((64,), np.array([b.offsets for b in boxes]), np.array([b.sizes for b in boxes]), np.zeros(8, int), 4)
    t = {"n": TensorMeta(("n",), "F32", (64,), 4)}
    metas = [RankMeta(t, [RegionMeta("n", Box.full((64,)))], {"n": FULL}) for _ in range(4)]
    plan = plan_load_layouts({"n": sg}, _classes(metas), 4)
    assert plan.bytes_read() == [64] * 4  # each chunk read once, two per rank
    v = plan.view(0, {"n": 0})
    assert sum(len(m) for m in v.incoming(0).values()) == 6 and len(v.reads_of(0)) == 2


def test_stored_grid_only_for_product_grids():
    # a replicated cell cut into row blocks next to an uncut one is not a product grid
    offs = np.array([[0, 0], [2, 0], [0, 2]])
    sizes = np.array([[2, 2], [2, 2], [4, 2]])
    assert stored_grid((4, 4), offs, sizes, np.zeros(3, int), 4) is None
    # a gap
    assert stored_grid((4,), np.array([[0]]), np.array([[2]]), np.zeros(1, int), 4) is None
    # overlap with equal count
    assert stored_grid((4,), np.array([[0], [0]]), np.array([[2], [4]]), np.zeros(2, int), 4) is None
    assert stored_grid((), np.zeros((1, 0), int), np.zeros((1, 0), int), np.zeros(1, int), 4) is not None

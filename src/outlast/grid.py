"""Grid layouts: plan a whole tensor's layout per dimension instead of per region (pure).

Most real layouts are grids. A DTensor with ``Shard``/``Replicate`` placements on a device
mesh (FSDP2, tensor parallel, HSDP, FSDP x TP) cuts each tensor dimension at a few points
(``torch.chunk``'s rule, nested when several mesh dims shard one tensor dim) and gives
each cell of the product of those cuts to the ranks of one mesh slice; a plain tensor is
a grid of one cell held by every rank that has it. Such a layout is described once, by a
:class:`GridSpec` (mesh shape, the mesh's ranks, the tensor dim each mesh dim shards),
which is the same object on every rank of the mesh. So:

* ranks whose whole state is described by grids send the same descriptor, and the save
  and load exchanges send one descriptor per *class* of identical ranks (a digest from
  everyone, the descriptor from one), instead of every rank's boxes;
* tiling needs no overlap sweep: cuts run from 0 to the dim's size and every cell has a
  holder by construction (each rank holds at most one cell of a grid tensor);
* writers of replicated cells are chosen with numpy, one vector operation per tensor
  (holders of different cells of one tensor are disjoint, so that is the exact greedy);
* a rank materialises only its own write items and its own reads (``for_rank``,
  ``view``), while the global plan stays as arrays per tensor for whoever needs it;
* a load intersects the stored chunk grid with the wanted grid per dimension (a merge
  of cut points) instead of testing every chunk against every want.

Anything that is not a clean grid (``FlatShard`` ranges, ranks that disagree about a
tensor, two meshes holding one tensor, stored chunks that are not a product grid) is
planned by the general planners of :mod:`outlast.plan` from explicit boxes, exactly as
before, and they raise the same errors.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import xxhash

from .plan import (
    DEFAULT_MIN_SPLIT_BYTES,
    ChunkRead,
    LoadPlan,
    Piece,
    RankMeta,
    RegionMeta,
    SavePlan,
    StoredChunk,
    TensorMeta,
    Want,
    WriteItem,
    balance,
    plan_load_reads,
    plan_save,
)
from .format import grid_cells
from .regions import Box

__all__ = [
    "FULL",
    "GridSpec",
    "chunk_cuts",
    "layout_digest",
    "expand",
    "plan_save_layouts",
    "GridSavePlan",
    "StoredGrid",
    "stored_grid",
    "plan_load_layouts",
    "GridLoadPlan",
    "RankLoadPlan",
]

# A plain tensor: the whole tensor, on every rank that declares it.
FULL = "full"


def _uniq(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique hashes in numpy 2: ten times slower on int cuts)."""
    a = np.sort(a, kind="stable")
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if a.size else a


def chunk_cuts(n: int, k: int) -> np.ndarray:
    """Cut points of ``torch.chunk``-style sharding of ``n`` into ``k`` (DTensor ``Shard``).

    Example:
        >>> chunk_cuts(10, 4).tolist()   # 3, 3, 3, 1
        [0, 3, 6, 9, 10]
    """
    full = -(-n // k)
    return np.minimum(np.arange(k + 1, dtype=np.int64) * full, n)


class GridSpec:
    """A mesh layout: ``ranks`` (row-major over ``mesh_shape``) and, per mesh dim, the
    tensor dim it shards (``-1``: replicate). Compared and hashed by ``digest``.

    The cell of a mesh position along tensor dim ``d`` is the mixed-radix number of its
    coordinates on the mesh dims that shard ``d`` (in mesh order), and the cut points are
    torch's nested chunking, so a rank's cell is exactly the box
    ``compute_local_shape_and_global_offset`` gives it (checked again by each rank).

    Example:
        >>> s = GridSpec((2, 2), [0, 1, 2, 3], (0, -1))   # (Shard(0), Replicate())
        >>> s.box_of(3, (5, 4))
        Box(offsets=(3, 0), sizes=(2, 4))
    """

    def __init__(self, mesh_shape: Sequence[int], ranks: Sequence[int], shard_dims: Sequence[int]):
        self.mesh_shape = tuple(int(s) for s in mesh_shape)
        self.ranks = np.asarray(ranks, dtype=np.int64).reshape(-1)
        self.shard_dims = tuple(int(d) for d in shard_dims)
        if len(self.shard_dims) != len(self.mesh_shape) or self.ranks.size != math.prod(self.mesh_shape):
            raise ValueError(f"GridSpec: mesh {self.mesh_shape}, {self.ranks.size} ranks, shard dims {self.shard_dims} disagree")
        if _uniq(self.ranks).size != self.ranks.size:
            raise ValueError("GridSpec: a rank appears twice in the mesh")
        h = xxhash.xxh3_64()
        h.update(repr((self.mesh_shape, self.shard_dims)).encode())
        h.update(self.ranks.tobytes())
        self.digest = h.hexdigest()
        self._cells: dict[int, tuple] = {}
        self._cuts: dict[tuple, list[np.ndarray]] = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GridSpec) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        r = self.ranks.tolist()
        shown = r if len(r) <= 8 else r[:4] + ["..."] + r[-2:]
        return f"GridSpec(mesh={self.mesh_shape}, shard_dims={self.shard_dims}, ranks={shown})"

    def __getstate__(self) -> dict:  # sent between ranks: without the derived caches
        return {"mesh_shape": self.mesh_shape, "ranks": self.ranks, "shard_dims": self.shard_dims, "digest": self.digest}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cells = {}
        self._cuts = {}

    @classmethod
    def full(cls, holders: Sequence[int]) -> "GridSpec":
        """One cell, held by every rank in ``holders`` (a plain tensor)."""
        h = sorted(int(r) for r in holders)
        return cls((len(h),), h, (-1,))

    def _levels(self, d: int) -> list[int]:
        return [self.mesh_shape[m] for m, sd in enumerate(self.shard_dims) if sd == d]

    def valid_for(self, ndim: int) -> bool:
        return all(sd < ndim for sd in self.shard_dims)

    def cuts(self, shape: Sequence[int]) -> list[np.ndarray]:
        """Per tensor dim, the cut points (nondecreasing; equal neighbours are empty cells).
        Cached per shape (a model repeats a few shapes many times); do not modify."""
        shape = tuple(int(n) for n in shape)
        hit = self._cuts.get(shape)
        if hit is not None:
            return hit
        if len(self._cuts) > 4096:
            self._cuts.clear()
        out = self._cuts[shape] = []
        for d, n in enumerate(shape):
            starts = np.zeros(1, dtype=np.int64)
            sizes = np.full(1, int(n), dtype=np.int64)
            for k in self._levels(d):
                full = -(-sizes // k)
                j = np.arange(k, dtype=np.int64)
                lo = np.minimum(full[:, None] * j[None, :], sizes[:, None])
                hi = np.minimum(full[:, None] * (j[None, :] + 1), sizes[:, None])
                starts = (starts[:, None] + lo).reshape(-1)
                sizes = (hi - lo).reshape(-1)
            out.append(np.append(starts, int(n)))
        return out

    def cells(self, ndim: int) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
        """(cell counts per dim, holders: one row of ranks (ascending) per flat cell,
        rank -> flat cell). Cached: every tensor of one mesh and ndim shares them."""
        hit = self._cells.get(ndim)
        if hit is not None:
            return hit
        coords = np.indices(self.mesh_shape).reshape(len(self.mesh_shape), -1)
        counts = np.array([math.prod(self._levels(d)) for d in range(ndim)], dtype=np.int64)
        cell = np.zeros(self.ranks.size, dtype=np.int64)
        for d in range(ndim):
            idx = np.zeros(self.ranks.size, dtype=np.int64)
            for m, sd in enumerate(self.shard_dims):
                if sd == d:
                    idx = idx * self.mesh_shape[m] + coords[m]
            cell = cell * counts[d] + idx
        ncells = int(np.prod(counts)) if ndim else 1
        order = np.argsort(cell, kind="stable")
        holders = np.sort(self.ranks[order].reshape(ncells, -1), axis=1)
        of_rank = dict(zip(self.ranks.tolist(), cell.tolist()))
        self._cells[ndim] = (counts, holders, of_rank)
        return self._cells[ndim]

    def box_of(self, rank: int, shape: Sequence[int]) -> Box | None:
        """The box ``rank`` holds of a tensor of ``shape``; None if none (or empty)."""
        shape = tuple(int(s) for s in shape)
        counts, _, of_rank = self.cells(len(shape))
        c = of_rank.get(int(rank))
        if c is None:
            return None
        box = _cell_box(self.cuts(shape), counts, c)
        return None if box.numel == 0 else box


def layout_digest(meta: RankMeta) -> str | None:
    """Digest of a rank's layout descriptor (tensors and grids, not boxes); None when
    the rank has tensors without a grid (it must send its boxes)."""
    if meta.grids is None:
        return None
    h = xxhash.xxh3_64()
    for fqn, m in meta.tensors.items():
        g = meta.grids[fqn]
        h.update(repr((fqn, m.path, m.dtype, m.shape, m.itemsize, g if g == FULL else g.digest)).encode())
    return h.hexdigest()


def describe(meta: RankMeta) -> RankMeta:
    """What a class of ranks sends: tensors and grids, no boxes."""
    return RankMeta(meta.tensors, [], meta.grids)


def expand(desc: RankMeta, rank: int) -> RankMeta:
    """The explicit boxes ``rank`` holds under a grid descriptor, in the order the rank
    lists its own regions (the order of its tensors; empty cells omitted)."""
    regions = []
    for fqn, m in desc.tensors.items():
        g = desc.grids[fqn]
        if g == FULL:
            regions.append(RegionMeta(fqn, Box.full(m.shape)))
            continue
        b = g.box_of(rank, m.shape)
        if b is not None:
            regions.append(RegionMeta(fqn, b))
    return RankMeta(desc.tensors, regions)


def _classes(digests: Sequence[str | None]) -> list[list[int]]:
    """Ranks grouped by equal layout digest (a None digest is a class of its own), by first rank."""
    out: dict = {}
    for r, d in enumerate(digests):
        out.setdefault(d if d is not None else ("rank", r), []).append(r)
    return list(out.values())


@dataclass
class _Resolved:
    meta: TensorMeta
    spec: GridSpec
    full: bool


def _resolve(classes: Sequence[tuple[Sequence[int], RankMeta]], world_size: int) -> dict[str, _Resolved] | None:
    """One grid per tensor from the classes' descriptors, or None when the layout is not
    a clean grid (then the general planner, from explicit boxes, decides or raises)."""
    if any(desc.grids is None for _, desc in classes):
        return None
    decl: dict[str, list[tuple[Sequence[int], TensorMeta, object]]] = {}
    for ranks, desc in classes:
        for fqn, m in desc.tensors.items():
            decl.setdefault(fqn, []).append((ranks, m, desc.grids[fqn]))
    # Work per tensor is O(classes declaring it), not O(ranks): the set of declaring
    # ranks is built once per distinct set of classes, a mesh compared once per set.
    declared: dict[tuple, np.ndarray] = {}
    fulls: dict[tuple, GridSpec] = {}
    fits: dict[tuple, bool] = {}
    out: dict[str, _Resolved] = {}
    for fqn in sorted(decl):
        ds = decl[fqn]
        m0, g0 = ds[0][1], ds[0][2]
        if len(ds) > 1:
            if any((m.shape, m.dtype, m.itemsize) != (m0.shape, m0.dtype, m0.itemsize) for _, m, _ in ds):
                return None
            if any(g != g0 for _, _, g in ds):
                return None
        key = tuple(id(rs) for rs, _, _ in ds)
        if key not in declared:
            declared[key] = np.sort(np.concatenate([np.asarray(rs, dtype=np.int64) for rs, _, _ in ds]))
        if g0 == FULL:
            if key not in fulls:
                fulls[key] = GridSpec.full(declared[key].tolist())
            out[fqn] = _Resolved(m0, fulls[key], True)
            continue
        if not g0.valid_for(len(m0.shape)):
            return None
        # Every rank of the mesh must declare this very grid (and only they may), or the
        # ranks disagree: the general planner names who holds what.
        fk = (key, g0.digest)
        if fk not in fits:
            d = declared[key]
            fits[fk] = d.size == g0.ranks.size and np.array_equal(d, np.sort(g0.ranks)) and (not d.size or (d[0] >= 0 and d[-1] < world_size))
        if not fits[fk]:
            return None
        out[fqn] = _Resolved(m0, g0, False)
    return out


# ------------------------------------------------------------------------- save plan


@dataclass
class _TensorSave:
    cuts: list[np.ndarray]
    counts: np.ndarray
    holders: np.ndarray
    of_rank: dict[int, int]
    cell_bytes: np.ndarray  # per flat cell
    writer: np.ndarray  # per flat cell: the writing rank, -1 (empty, or cut into splits)
    splits: list[tuple[Box, int]] = field(default_factory=list)  # (box, rank) of split cells

    def cell_box(self, c: int) -> Box:
        return _cell_box(self.cuts, self.counts, c)


def _cell_box(cuts: list[np.ndarray], counts: np.ndarray, c: int) -> Box:
    """The box of flat cell ``c`` (C order) of the grid ``cuts``."""
    lo, sz = [], []
    for d in range(len(cuts) - 1, -1, -1):
        c, i = divmod(c, int(counts[d]))
        a, b = int(cuts[d][i]), int(cuts[d][i + 1])
        lo.append(a)
        sz.append(b - a)
    return Box(tuple(reversed(lo)), tuple(reversed(sz)))


class GridSavePlan:
    """A save plan kept per tensor as numpy arrays: each cell's writing rank.

    Offers what :class:`~outlast.plan.SavePlan` offers (``for_rank``, ``bytes_per_rank``,
    ``balance_ratio``, ``items``, ``tensors``); ``for_rank`` is O(this rank's tensors)
    and ``items`` (every rank's write items) is built only when asked for.
    """

    def __init__(self, world_size: int, writers_per_rank: int, tensors: dict[str, TensorMeta], per: dict[str, _TensorSave], load: np.ndarray):
        self.world_size = world_size
        self.writers_per_rank = writers_per_rank
        self.tensors = tensors
        self.per = per
        self.load = load
        self._mine: dict[int, list[WriteItem]] = {}

    def for_rank(self, rank: int) -> list[WriteItem]:
        """Rank ``rank``'s write items (``region`` is -1: the rank's one region of that tensor)."""
        hit = self._mine.get(rank)
        if hit is not None:
            return hit
        pieces: list[tuple[str, Box, int]] = []
        for fqn, t in self.per.items():
            c = t.of_rank.get(rank)
            if c is not None and t.writer[c] == rank:
                box = t.cell_box(c)
                pieces.append((fqn, box, int(t.cell_bytes[c])))
            for box, r in t.splits:
                if r == rank:
                    pieces.append((fqn, box, box.numel * self.tensors[fqn].itemsize))
        files = balance([p[2] for p in pieces], self.writers_per_rank)
        out = [WriteItem(f, b, rank, -1, rank * self.writers_per_rank + w, nb) for (f, b, nb), w in zip(pieces, files)]
        self._mine[rank] = out
        return out

    @property
    def items(self) -> list[WriteItem]:
        """Every rank's items (O(regions): for tests and small worlds)."""
        ranks = sorted({int(r) for t in self.per.values() for r in t.writer[t.writer >= 0]} | {r for t in self.per.values() for _, r in t.splits})
        return [i for r in ranks for i in self.for_rank(r)]

    def boxes_of(self, fqn: str) -> list[tuple[Box, int]]:
        """(box, writing rank) of every chunk of ``fqn`` (O(its chunks))."""
        t = self.per[fqn]
        cells, ranks = self.chunk_arrays(fqn)
        return [(t.cell_box(int(c)), int(r)) for c, r in zip(cells, ranks)] + list(t.splits)

    def chunk_arrays(self, fqn: str) -> tuple[np.ndarray, np.ndarray]:
        """(flat cell index, writing rank) of every unsplit cell of ``fqn`` that is written."""
        t = self.per[fqn]
        cells = np.nonzero(t.writer >= 0)[0]
        return cells, t.writer[cells]

    def bytes_per_rank(self) -> list[int]:
        return self.load.tolist()

    def balance_ratio(self) -> float:
        mean = self.load.sum() / self.world_size
        return float(self.load.max() / mean) if mean else 1.0


def plan_save_layouts(
    classes: Sequence[tuple[Sequence[int], RankMeta]],
    world_size: int,
    *,
    writers_per_rank: int | None = None,
    min_split_bytes: int = DEFAULT_MIN_SPLIT_BYTES,
) -> SavePlan | GridSavePlan:
    """Plan a save from one descriptor per class of identical ranks.

    ``classes[k] = (ranks, meta)``: ``meta.grids`` set (a grid descriptor: the same for
    every rank in ``ranks``) or None (``ranks`` is one rank and ``meta`` its boxes). A
    clean grid layout gives a :class:`GridSavePlan`; anything else is expanded to every
    rank's boxes and planned by :func:`~outlast.plan.plan_save`, which also raises the
    errors for disagreeing, overlapping or uncovered layouts.

    Example:
        >>> m = TensorMeta(("w",), "F32", (8, 4), 4)
        >>> desc = RankMeta({"w": m}, [], {"w": GridSpec((2,), [0, 1], (0,))})
        >>> plan_save_layouts([([0, 1], desc)], 2).bytes_per_rank()
        [64, 64]
    """
    resolved = _resolve(classes, world_size)
    if resolved is None:
        metas: list[RankMeta | None] = [None] * world_size
        for ranks, desc in classes:
            for r in ranks:
                metas[r] = desc if desc.grids is None else expand(desc, r)
        return plan_save(metas, writers_per_rank=writers_per_rank, min_split_bytes=min_split_bytes)
    n = world_size
    load = np.zeros(n, dtype=np.int64)
    per: dict[str, _TensorSave] = {}
    for fqn, rv in resolved.items():
        shape = rv.meta.shape
        counts, holders, of_rank = rv.spec.cells(len(shape))
        cuts = rv.spec.cuts(shape)
        numel = np.ones(1, dtype=np.int64)
        for c in cuts:
            numel = np.multiply.outer(numel, np.diff(c)).reshape(-1)
        t = _TensorSave(cuts, counts, holders, of_rank, numel * rv.meta.itemsize, np.full(numel.size, -1, dtype=np.int64))
        if math.prod(shape) == 0 and rv.full:
            t.cell_bytes = np.zeros(1, dtype=np.int64)
            t.writer = np.full(1, -2, dtype=np.int64)  # written (an empty tensor keeps its entry)
        per[fqn] = t
    total = int(sum(int(t.cell_bytes.sum()) for t in per.values()))
    target = total / n
    # 1. Cells one rank holds are written by it.
    for t in per.values():
        if t.holders.shape[1] == 1:
            live = (t.cell_bytes > 0) | (t.writer == -2)
            t.writer[live] = t.holders[live, 0]
            np.add.at(load, t.writer[live], t.cell_bytes[live])
    # 2. Small replicated cells: least-loaded holder, largest first. A rank holds at most
    # one cell of a tensor, so the cells of one tensor have disjoint holders and one
    # vector step per tensor is the sequential greedy.
    def splittable(t: _TensorSave) -> np.ndarray:
        # As plan_save: at least 2 rows (dim 0) and twice min_split_bytes; never 0-d.
        rows = np.diff(t.cuts[0]) if t.cuts else np.zeros(1, dtype=np.int64)
        rows_per_cell = np.repeat(rows, t.cell_bytes.size // max(1, rows.size)) if t.cuts else rows
        return (rows_per_cell >= 2) & (t.cell_bytes >= 2 * min_split_bytes)

    large: list[tuple[int, str, int]] = []
    order = []
    for fqn, t in per.items():
        if t.holders.shape[1] == 1:
            continue
        live = (t.cell_bytes > 0) | (t.writer == -2)
        big = splittable(t) & live
        large += [(-int(t.cell_bytes[c]), fqn, int(c)) for c in np.nonzero(big)[0]]
        small = live & ~big
        if small.any():
            order.append((-int(t.cell_bytes[small].max()), fqn, np.nonzero(small)[0]))
    for _, fqn, cells in sorted(order, key=lambda x: (x[0], x[1])):
        t = per[fqn]
        cand = t.holders[cells]
        pick = cand[np.arange(cells.size), np.argmin(load[cand], axis=1)]
        t.writer[cells] = pick
        np.add.at(load, pick, t.cell_bytes[cells])
    # 3. Large replicated cells: fill the least-loaded holders up to the mean, a row-block each.
    for negb, fqn, c in sorted(large):
        t = per[fqn]
        box = t.cell_box(c)
        hs = t.holders[c]
        rows, nb = box.sizes[0], -negb
        row_bytes = nb // rows
        lo = 0
        full = np.zeros(hs.size, dtype=bool)

        def give(a: int, b: int, r: int) -> None:
            t.splits.append((Box((box.offsets[0] + a,) + box.offsets[1:], (b - a,) + box.sizes[1:]), int(r)))
            load[r] += (b - a) * row_bytes

        while lo < rows:
            rest = (rows - lo) * row_bytes
            if full.all():
                ks = max(1, min(hs.size, rest // max(1, min_split_bytes), rows - lo))
                pick = hs[np.lexsort((hs, load[hs]))][:ks]
                for j, r in enumerate(pick):
                    give(lo + (rows - lo) * j // ks, lo + (rows - lo) * (j + 1) // ks, r)
                break
            cand = np.nonzero(~full)[0]
            k = cand[np.argmin(load[hs[cand]])]
            r = int(hs[k])
            if load[r] + rest <= target:
                take = rows - lo
            else:
                take = int((target - load[r]) // row_bytes)
                full[k] = True
                if take * row_bytes < min_split_bytes:
                    continue
            give(lo, lo + take, r)
            lo += take
    for t in per.values():
        t.writer[t.writer == -2] = -1
    if writers_per_rank is None:
        items = np.zeros(n, dtype=np.int64)
        for t in per.values():
            w = t.writer[t.writer >= 0]
            items += np.bincount(w, minlength=n)
            for _, r in t.splits:
                items[r] += 1
        per_node = max(1, 4 // max(1, n))
        w = np.maximum(1, np.minimum(np.minimum(per_node, np.maximum(load // (16 << 20), 1)), np.maximum(items, 1)))
        writers_per_rank = int(w.max())  # default_writers_per_rank, for every rank at once
    if writers_per_rank < 1:
        raise ValueError("writers_per_rank must be >= 1")
    tensors = {fqn: rv.meta for fqn, rv in resolved.items()}
    return GridSavePlan(n, writers_per_rank, tensors, per, load)


# ------------------------------------------------------------------------- load plan


@dataclass
class StoredGrid:
    """A tensor's stored chunks when they form a product grid: ``cuts`` per dim (strictly
    increasing, 0 to the dim's size) and ``chunk[c]``, the chunk list index of flat cell c."""

    cuts: list[np.ndarray]
    chunk: np.ndarray
    block_rows: np.ndarray  # per chunk list index
    itemsize: int

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(len(c) - 1 for c in self.cuts)


def stored_grid(shape: Sequence[int], offsets: np.ndarray, sizes: np.ndarray, block_rows: np.ndarray, itemsize: int) -> StoredGrid | None:
    """The product grid ``offsets``/``sizes`` (one row per chunk) form, or None.

    A grid is found only when each chunk is exactly one cell of the product of all chunk
    boundaries and every cell is one chunk: then the chunks tile the tensor.

    Example:
        >>> g = stored_grid((4, 2), np.array([[0, 0], [2, 0]]), np.array([[2, 2], [2, 2]]), np.zeros(2, int), 4)
        >>> [c.tolist() for c in g.cuts], g.chunk.tolist()
        ([[0, 2, 4], [0, 2]], [0, 1])
    """
    shape = tuple(int(s) for s in shape)
    n = len(offsets)
    block_rows = np.asarray(block_rows, dtype=np.int64)
    if not shape:
        return StoredGrid([], np.zeros(1, dtype=np.int64), block_rows, itemsize) if n == 1 else None
    if n == 0 or math.prod(shape) == 0:
        return None
    found = grid_cells(shape, offsets, sizes)
    if found is None:
        return None
    cuts, flat = found
    chunk = np.empty(n, dtype=np.int64)
    chunk[flat] = np.arange(n)
    return StoredGrid(cuts, chunk, block_rows, itemsize)


_VERIFY = ("none", "chunk", "blocks")


@dataclass
class _Block:
    """The reads of one column block (stored cells ``col`` in dims >= 1) of one tensor."""

    col: tuple[int, ...]
    wants: list[tuple[int, ...]]  # want cells (dims >= 1) overlapping it
    chunk: np.ndarray  # per segment: chunk list index
    row_lo: np.ndarray  # per segment: read rows, relative to the chunk (widened)
    row_hi: np.ndarray
    verify: np.ndarray  # per segment: index into _VERIFY
    reader: np.ndarray  # per segment


@dataclass
class _TensorLoad:
    fqn: str
    shape: tuple[int, ...]
    stored: StoredGrid
    spec: GridSpec
    wcuts: list[np.ndarray]
    wcounts: np.ndarray
    holders: np.ndarray
    of_rank: dict[int, int]
    seg_lo: np.ndarray  # dim-0 segments (global rows)
    seg_hi: np.ndarray
    seg_s: np.ndarray  # stored row cell of each segment
    seg_w: np.ndarray  # want row cell of each segment
    blocks: list[_Block]

    def chunk_box(self, cell: tuple[int, ...]) -> Box:
        c = self.stored.cuts
        return Box(tuple(int(c[d][i]) for d, i in enumerate(cell)), tuple(int(c[d][i + 1] - c[d][i]) for d, i in enumerate(cell)))

    def want_cols(self, j: tuple[int, ...], col: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Offsets and sizes (dims >= 1) of want cell ``j`` intersected with stored cells ``col``."""
        lo, sz = [], []
        for d, (a, b) in enumerate(zip(j, col), start=1):
            x = max(int(self.wcuts[d][a]), int(self.stored.cuts[d][b]))
            y = min(int(self.wcuts[d][a + 1]), int(self.stored.cuts[d][b + 1]))
            lo.append(x)
            sz.append(y - x)
        return tuple(lo), tuple(sz)


class GridLoadPlan:
    """A load plan kept per tensor and column block as arrays (reader of each segment).

    :meth:`view` gives one rank's part as a :class:`RankLoadPlan` in O(the rank's reads).
    """

    def __init__(self, world_size: int, per: list[_TensorLoad], load: np.ndarray):
        self.world_size = world_size
        self.per = per
        self.load = load

    def bytes_read(self) -> list[int]:
        return self.load.tolist()

    def view(self, rank: int, request_of: dict[str, int] | None = None) -> "RankLoadPlan":
        """The reads ``rank`` does (with every piece) and those it receives from (with its
        own piece only), in the order every rank agrees on. ``request_of[fqn]`` is the
        rank's request number for that tensor (pieces of other ranks get -1)."""
        request_of = request_of or {}
        reads: list[ChunkRead] = []
        for t in self.per:
            c = t.of_rank.get(rank)
            if c is None:
                continue
            cell = np.unravel_index(c, tuple(t.wcounts.tolist())) if t.shape else ()
            w0, jr = (int(cell[0]), tuple(int(x) for x in cell[1:])) if t.shape else (0, ())
            k0 = int(np.searchsorted(t.seg_w, w0, "left"))
            k1 = int(np.searchsorted(t.seg_w, w0, "right"))
            if k0 == k1:
                continue
            mine: list[tuple[int, int, ChunkRead]] = []
            for b in t.blocks:
                if jr not in b.wants:
                    continue
                for k in range(k0, k1):
                    rd = self._read(t, b, k, rank, request_of.get(t.fqn, -1), only_mine=int(b.reader[k]) != rank)
                    mine.append((rd.chunk.index, int(t.seg_lo[k]), rd))
            mine.sort(key=lambda x: (x[0], x[1]))
            reads += [m[2] for m in mine]
        return RankLoadPlan(self.world_size, rank, reads)

    def _read(self, t: _TensorLoad, b: _Block, k: int, rank: int, request: int, *, only_mine: bool) -> ChunkRead:
        s = int(t.seg_s[k]) if t.shape else 0
        chunk_cell = (s,) + b.col if t.shape else ()
        box = t.chunk_box(chunk_cell) if t.shape else Box((), ())
        idx = int(b.chunk[k])
        sc = StoredChunk(t.fqn, idx, box, t.stored.itemsize, int(t.stored.block_rows[idx]))
        pieces = []
        w0 = int(t.seg_w[k])
        for j in b.wants:
            flat = int(np.ravel_multi_index((w0,) + j, tuple(t.wcounts.tolist()))) if t.shape else 0
            hs = t.holders[flat]
            if t.shape:
                lo, sz = t.want_cols(j, b.col)
                pbox = Box((int(t.seg_lo[k]),) + lo, (int(t.seg_hi[k] - t.seg_lo[k]),) + sz)
            else:
                pbox = box
            for h in hs.tolist():
                if only_mine and h != rank:
                    continue
                pieces.append(Piece(pbox, h, request if h == rank else -1))
        return ChunkRead(int(b.reader[k]), sc, int(b.row_lo[k]), int(b.row_hi[k]), _VERIFY[int(b.verify[k])], pieces)

    def all_reads(self, request_of: Sequence[dict[str, int]] | None = None) -> list[ChunkRead]:
        """Every read with every piece (O(reads): for tests and small worlds)."""
        out = []
        for t in self.per:
            for b in t.blocks:
                for k in range(len(b.chunk)):
                    rd = self._read(t, b, k, -1, -1, only_mine=False)
                    if request_of is not None:
                        rd.pieces = [Piece(p.box, p.rank, request_of[p.rank][t.fqn]) for p in rd.pieces]
                    out.append(rd)
        return out


class RankLoadPlan(LoadPlan):
    """One rank's part of a :class:`GridLoadPlan`: what :mod:`outlast.transfer` needs."""

    def __init__(self, world_size: int, rank: int, reads: list[ChunkRead]):
        super().__init__(world_size, reads)
        self.rank = rank

    def reads_of(self, rank: int) -> list[ChunkRead]:
        if rank != self.rank:
            raise ValueError(f"this view is rank {self.rank}'s, not rank {rank}'s")
        return [r for r in self.reads if r.reader == rank]


def _overlaps(scuts: np.ndarray, wcuts: np.ndarray) -> list[list[int]]:
    """For each stored cell, the nonempty want cells overlapping it."""
    wlo, whi = wcuts[:-1], wcuts[1:]
    live = whi > wlo
    return [np.nonzero(live & (wlo < scuts[i + 1]) & (whi > scuts[i]))[0].tolist() for i in range(len(scuts) - 1)]


def plan_load_layouts(
    stored: dict[str, StoredGrid],
    classes: Sequence[tuple[Sequence[int], RankMeta]],
    world_size: int,
    *,
    verify: bool = True,
) -> GridLoadPlan | None:
    """Plan a load by per-dim intersection of stored chunk grids and wanted grids.

    ``classes`` are the wanting ranks' descriptors (as for :func:`plan_save_layouts`);
    ``stored[fqn]`` the product grid of each wanted tensor's chunks. None when either side
    is not a clean grid: the caller then plans from explicit boxes with
    :func:`~outlast.plan.plan_load_reads`. Same rules as that planner: a segment (rows of
    one chunk that one want cell needs) is read once, by one of the ranks wanting it (the
    least loaded, round robin within a want cell) and sent to the others; partial reads
    are widened to checksum blocks (or the whole chunk) when ``verify``.
    """
    resolved = _resolve(classes, world_size)
    if resolved is None:
        return None
    for fqn, rv in resolved.items():
        if math.prod(rv.meta.shape) and stored.get(fqn) is None:
            return None
    load = np.zeros(world_size, dtype=np.int64)
    per: list[_TensorLoad] = []
    order = sorted(resolved, key=lambda f: (-math.prod(resolved[f].meta.shape) * resolved[f].meta.itemsize, f))
    for fqn in order:
        rv = resolved[fqn]
        shape = tuple(rv.meta.shape)
        if math.prod(shape) == 0:
            continue
        sg = stored[fqn]
        if len(sg.cuts) != len(shape):
            return None
        wcounts, holders, of_rank = rv.spec.cells(len(shape))
        wcuts = rv.spec.cuts(shape)
        if not shape:
            hs = holders[0]
            r = int(hs[np.argmin(load[hs])])
            nb = sg.itemsize
            load[r] += nb
            one = np.zeros(1, dtype=np.int64)
            blk = _Block((), [()], one, one, one + 1, np.full(1, 1 if verify else 0), np.full(1, r))
            per.append(_TensorLoad(fqn, shape, sg, rv.spec, wcuts, wcounts, holders, of_rank, one, one + 1, one, one, [blk]))
            continue
        s0, w0 = sg.cuts[0], wcuts[0]
        m = _uniq(np.concatenate([s0, w0]))
        seg_lo, seg_hi = m[:-1], m[1:]
        seg_s = np.searchsorted(s0, seg_lo, "right") - 1
        seg_w = np.searchsorted(w0, seg_lo, "right") - 1
        nseg = seg_lo.size
        # Segments of one want row cell are contiguous: their position inside it.
        first = np.searchsorted(seg_w, seg_w, "left")
        pos = np.arange(nseg) - first
        rows = (s0[1:] - s0[:-1])[seg_s]
        a = seg_lo - s0[seg_s]
        b = seg_hi - s0[seg_s]
        overlaps = [_overlaps(sg.cuts[d], wcuts[d]) for d in range(1, len(shape))]
        scounts = sg.counts
        chunk_nd = sg.chunk.reshape(scounts)
        blocks = []
        whole = (a == 0) & (b == rows)
        all_whole = bool(whole.all())
        wc = [int(x) for x in wcounts]
        strides = [math.prod(wc[d + 1 :]) for d in range(len(wc))]
        row0 = seg_w * strides[0]
        for col in itertools.product(*(range(c) for c in scounts[1:])):
            wants = list(itertools.product(*(overlaps[d - 1][i] for d, i in enumerate(col, start=1))))
            if not wants:
                continue
            chunk = chunk_nd[(seg_s,) + col]
            row_bytes = sg.itemsize * math.prod(int(sg.cuts[d][i + 1] - sg.cuts[d][i]) for d, i in enumerate(col, start=1))
            users = holders[row0 + sum(x * strides[d] for d, x in enumerate(wants[0], start=1))]
            if len(wants) > 1:
                users = np.concatenate(
                    [users] + [holders[row0 + sum(x * strides[d] for d, x in enumerate(jj, start=1))] for jj in wants[1:]], axis=1
                )
            if users.shape[1] == 1:
                reader = users[:, 0]
            else:  # round robin over the wanting ranks, least loaded first
                rank_order = np.argsort(load[users], axis=1, kind="stable")
                reader = users[np.arange(nseg), rank_order[np.arange(nseg), pos % users.shape[1]]]
            if not verify:
                lo, hi, vcode = a, b, np.zeros(nseg, dtype=np.int64)
            elif all_whole:
                lo, hi, vcode = a, b, np.ones(nseg, dtype=np.int64)
            else:
                br = sg.block_rows[chunk]
                blk = ~whole & (br > 0)
                brs = np.where(blk, br, 1)
                lo = np.where(blk, a // brs * brs, np.where(whole, a, 0))
                hi = np.where(blk, np.minimum(rows, -(-b // brs) * brs), np.where(whole, b, rows))
                vcode = np.where((lo == 0) & (hi == rows), 1, 2)
            load += np.bincount(reader, weights=(hi - lo) * row_bytes, minlength=world_size).astype(np.int64)
            blocks.append(_Block(tuple(col), [tuple(int(x) for x in jj) for jj in wants], chunk, lo, hi, vcode, reader))
        per.append(_TensorLoad(fqn, shape, sg, rv.spec, wcuts, wcounts, holders, of_rank, seg_lo, seg_hi, seg_s, seg_w, blocks))
    per.sort(key=lambda t: t.fqn)
    return GridLoadPlan(world_size, per, load)


# ------------------------------------------------------------------------- exchange helpers


def checked(meta: RankMeta, rank: int, to_group: dict[int, int] | None = None) -> RankMeta:
    """``meta`` with its grids in group ranks, kept only if they are sound for this rank.

    Every grid must map into the group (``to_group``: global rank -> group rank; None when
    they are the same) and give this rank exactly the boxes it holds (torch's own offsets
    are the reference). Otherwise the rank is described by its boxes alone (grids None):
    a grid that disagrees with the data is never trusted.
    """
    if meta.grids is None:
        return meta
    explicit = RankMeta(meta.tensors, meta.regions)
    mine: dict[str, list[Box]] = {}
    for r in meta.regions:
        mine.setdefault(r.fqn, []).append(r.box)
    grids: dict = {}
    for fqn, m in meta.tensors.items():
        g = meta.grids.get(fqn)
        if g is None:
            return explicit
        if g != FULL:
            if to_group is not None:
                try:
                    g = GridSpec(g.mesh_shape, [to_group[int(r)] for r in g.ranks], g.shard_dims)
                except KeyError:
                    return explicit
            if not g.valid_for(len(m.shape)):
                return explicit
            box = g.box_of(rank, m.shape)
            if mine.get(fqn, []) != ([] if box is None else [box]):
                return explicit
        elif mine.get(fqn) != [Box.full(m.shape)]:
            return explicit
        grids[fqn] = g
    return RankMeta(meta.tensors, meta.regions, grids)


def exchange_classes(digests: Sequence[str | None]) -> tuple[list[list[int]], list[int]]:
    """Classes of ranks with equal layout digests, and each rank's class representative
    (the first rank of its class): only representatives send their descriptor."""
    classes = _classes(digests)
    rep = [0] * len(digests)
    for ranks in classes:
        for r in ranks:
            rep[r] = ranks[0]
    return classes, rep


def payload(meta: RankMeta, rank: int, rep: Sequence[int]) -> RankMeta | None:
    """What ``rank`` sends in the second exchange: its descriptor if it represents its
    class, its boxes if it has no grids, else nothing."""
    if meta.grids is None:
        return meta
    return describe(meta) if rep[rank] == rank else None

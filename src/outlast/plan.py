"""Save and load plans (pure: no I/O, no torch.distributed).

A plan is data: a dataclass you can print, compare and test with any number of fake
ranks in one process. Every rank computes the same plan from the same gathered
metadata, so no plan ever needs to be sent.

Save plan (:func:`plan_save`): from every rank's regions, keep each unique region once
(ranks holding the same box of the same tensor are replicas), check that the unique
regions tile every tensor exactly, and give each region to one holder so that bytes per
rank are balanced. Regions only one rank holds must go to that rank; replicated regions
go to the least-loaded holder, and a large replicated region is cut into row-blocks
across holders to fill every rank up to the mean (DDP: every parameter is on every rank,
and without splitting one big embedding would make one rank write far more than the
rest). Within a rank, items are spread over its shard files by the
longest-processing-time rule (:func:`balance`).

Load plan (:func:`plan_load_reads`): for each stored chunk, the row ranges (dim 0) that
ranks want are cut into segments; a segment wanted by one rank is read by that rank, a
segment wanted by several is read by one of them (the one with the fewest bytes to read
so far) and the others receive their parts from it. Adjacent segments of one reader are
one read. Reads of part of a chunk are widened to the chunk's checksum blocks (or to the
whole chunk, for chunks stored without blocks) when verification is on, so every byte
that reaches a live tensor has been checked.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field
from typing import Sequence

from .errors import DistributedError
from .regions import Box, first_overlap

__all__ = [
    "balance",
    "TensorMeta",
    "RegionMeta",
    "RankMeta",
    "WriteItem",
    "SavePlan",
    "plan_save",
    "StoredChunk",
    "Want",
    "Piece",
    "ChunkRead",
    "LoadPlan",
    "plan_load_reads",
]

# Below this a replicated region is never cut: more chunks cost more than the imbalance.
DEFAULT_MIN_SPLIT_BYTES = 4 << 20


def balance(sizes: Sequence[int], n_writers: int) -> list[int]:
    """Assign item ``i`` (of ``sizes[i]`` bytes) to a writer in ``range(n_writers)``.

    Deterministic: ties go to the lower writer index, equal sizes keep input order.

    Example:
        >>> balance([10, 7, 5, 4], 2)
        [0, 1, 1, 0]
    """
    if n_writers < 1:
        raise ValueError("n_writers must be >= 1")
    heap = [(0, w) for w in range(n_writers)]
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, w = heapq.heappop(heap)
        out[i] = w
        heapq.heappush(heap, (load + sizes[i], w))
    return out


# ------------------------------------------------------------------------- save plan


@dataclass(frozen=True)
class TensorMeta:
    """A logical tensor as one rank sees it: path in the nested state, dtype, global shape."""

    path: tuple
    dtype: str  # safetensors dtype name ("F32", "BF16", ...)
    shape: tuple[int, ...]
    itemsize: int


@dataclass(frozen=True)
class RegionMeta:
    """A region one rank holds: ``box`` of tensor ``fqn``."""

    fqn: str
    box: Box


@dataclass
class RankMeta:
    """Everything the save planner needs from one rank (metadata only, no data).

    ``grids`` (when every tensor has one) maps each tensor to its layout descriptor, a
    :class:`~outlast.grid.GridSpec` or ``"full"`` (a plain tensor): the same on every rank
    of a mesh, so ranks can exchange it once per class instead of their boxes
    (:mod:`outlast.grid`).
    """

    tensors: dict[str, TensorMeta]
    regions: list[RegionMeta]  # index i is the rank's i-th local region
    grids: dict | None = None


@dataclass(frozen=True)
class WriteItem:
    """Rank ``rank`` writes ``box`` (inside its local region number ``region``) to ``writer``."""

    fqn: str
    box: Box
    rank: int
    region: int
    writer: int
    nbytes: int


@dataclass
class SavePlan:
    """The global save plan: every unique region once, each with one writing rank and file.

    ``writer`` ids are global: rank ``r`` owns ids ``r * writers_per_rank + k``.
    """

    world_size: int
    writers_per_rank: int
    tensors: dict[str, TensorMeta]
    items: list[WriteItem]

    def for_rank(self, rank: int) -> list[WriteItem]:
        # Memoised (not a field, so plans still compare by content): a cached plan is
        # asked for the same rank's items at every save, and the scan is O(all items).
        mine = self.__dict__.setdefault("_for_rank", {})
        if rank not in mine:
            mine[rank] = [i for i in self.items if i.rank == rank]
        return mine[rank]

    def bytes_per_rank(self) -> list[int]:
        out = [0] * self.world_size
        for i in self.items:
            out[i.rank] += i.nbytes
        return out

    def balance_ratio(self) -> float:
        """max/mean bytes per rank (1.0 is perfect balance)."""
        b = self.bytes_per_rank()
        mean = sum(b) / len(b)
        return max(b) / mean if mean else 1.0


def default_writers_per_rank(rank_bytes: int, n_items: int, world_size: int, max_writers: int = 4) -> int:
    # Several files per process keep several writes in flight, but across processes the
    # disk is already shared: a node's total stays near max_writers.
    per = max(1, max_writers // max(1, world_size))
    return max(1, min(per, rank_bytes // (16 << 20) or 1, n_items or 1))


def _conflict(fqn: str, seen: list[tuple[int, TensorMeta]]) -> DistributedError:
    shown = "; ".join(f"rank {r} has shape {list(m.shape)} dtype {m.dtype}" for r, m in seen[:6])
    return DistributedError(
        f"ranks disagree about tensor {fqn!r}: {shown}. Every rank must pass the same global "
        "shape and dtype for a name: build the model with the same configuration on every rank "
        "(or give the tensors different names)."
    )


def plan_save(
    ranks: Sequence[RankMeta],
    *,
    writers_per_rank: int | None = None,
    min_split_bytes: int = DEFAULT_MIN_SPLIT_BYTES,
) -> SavePlan:
    """Plan a save from every rank's metadata (``ranks[r]`` is rank r's).

    Raises:
        DistributedError: ranks disagree on a tensor's shape or dtype, hold overlapping
            but different regions, or leave part of a tensor unheld.

    Example:
        >>> m = TensorMeta(("w",), "F32", (8, 4), 4)
        >>> both = RankMeta({"w": m}, [RegionMeta("w", Box.full((8, 4)))])
        >>> plan_save([both, both], min_split_bytes=16).bytes_per_rank()
        [64, 64]
    """
    n = len(ranks)
    if n < 1:
        raise ValueError("plan_save needs at least one rank")
    tensors: dict[str, TensorMeta] = {}
    seen: dict[str, list[tuple[int, TensorMeta]]] = {}
    for r, rm in enumerate(ranks):
        for fqn, m in rm.tensors.items():
            seen.setdefault(fqn, []).append((r, m))
    for fqn in sorted(seen):
        metas = seen[fqn]
        first = metas[0][1]
        bad = [(r, m) for r, m in metas if (m.shape, m.dtype) != (first.shape, first.dtype)]
        if bad:
            raise _conflict(fqn, [metas[0]] + bad)
        tensors[fqn] = first

    # Unique regions and their holders, in a deterministic order.
    holders: dict[tuple[str, Box], list[tuple[int, int]]] = {}
    for r, rm in enumerate(ranks):
        for i, reg in enumerate(rm.regions):
            if reg.fqn not in tensors:
                raise ValueError(f"rank {r} has a region of {reg.fqn!r} but no tensor metadata for it")
            if reg.box.numel == 0 and reg.box != Box.full(tensors[reg.fqn].shape):
                continue
            holders.setdefault((reg.fqn, reg.box), []).append((r, i))
    _check_tiling(tensors, holders)

    def nbytes(key: tuple[str, Box]) -> int:
        return key[1].numel * tensors[key[0]].itemsize

    keys = sorted(holders, key=lambda k: (k[0], k[1].offsets, k[1].sizes))
    total = sum(nbytes(k) for k in keys)
    target = total / n
    load = [0] * n
    pieces: list[tuple[str, Box, int, int]] = []  # fqn, box, rank, region

    def give(key, box, r, region):
        pieces.append((key[0], box, r, region))
        load[r] += box.numel * tensors[key[0]].itemsize

    def splittable(key) -> bool:
        b = key[1]
        return b.ndim >= 1 and b.sizes[0] >= 2 and nbytes(key) >= 2 * min_split_bytes

    forced = [k for k in keys if len(holders[k]) == 1]
    shared = [k for k in keys if len(holders[k]) > 1]
    for k in forced:
        r, i = holders[k][0]
        give(k, k[1], r, i)
    small = sorted((k for k in shared if not splittable(k)), key=lambda k: -nbytes(k))
    large = sorted((k for k in shared if splittable(k)), key=lambda k: -nbytes(k))
    for k in small:  # longest-processing-time among the holders
        r, i = min(holders[k], key=lambda h: (load[h[0]], h[0]))
        give(k, k[1], r, i)
    for k in large:  # fill the least-loaded holders up to the mean, a row-block each
        box = k[1]
        rows = box.sizes[0]
        row_bytes = nbytes(k) // rows
        lo = 0
        full: set[int] = set()
        while lo < rows:
            cand = [h for h in holders[k] if h[0] not in full]
            rest = (rows - lo) * row_bytes
            if not cand:
                # Everyone is at the mean already (rounding left a remainder): spread it
                # over the least-loaded holders rather than piling it on one.
                ks = max(1, min(len(holders[k]), rest // max(1, min_split_bytes), rows - lo))
                order = sorted(holders[k], key=lambda h: (load[h[0]], h[0]))[:ks]
                for j, (r, i) in enumerate(order):
                    a = lo + (rows - lo) * j // ks
                    b = lo + (rows - lo) * (j + 1) // ks
                    give(k, Box((box.offsets[0] + a,) + box.offsets[1:], (b - a,) + box.sizes[1:]), r, i)
                break
            r, i = min(cand, key=lambda h: (load[h[0]], h[0]))
            if load[r] + rest <= target:
                take = rows - lo
            else:
                take = int((target - load[r]) // row_bytes)
                if take * row_bytes < min_split_bytes:
                    full.add(r)
                    continue
                full.add(r)
            part = Box((box.offsets[0] + lo,) + box.offsets[1:], (take,) + box.sizes[1:])
            give(k, part, r, i)
            lo += take

    # Shard files within each rank.
    per_rank: list[list[int]] = [[] for _ in range(n)]
    for j, p in enumerate(pieces):
        per_rank[p[2]].append(j)
    if writers_per_rank is None:
        writers_per_rank = max(
            default_writers_per_rank(load[r], len(per_rank[r]), n) for r in range(n)
        )
    if writers_per_rank < 1:
        raise ValueError("writers_per_rank must be >= 1")
    items: list[WriteItem] = []
    for r in range(n):
        idx = per_rank[r]
        sizes = [pieces[j][1].numel * tensors[pieces[j][0]].itemsize for j in idx]
        for j, w, nb in zip(idx, balance(sizes, writers_per_rank), sizes):
            fqn, box, _, region = pieces[j]
            items.append(WriteItem(fqn, box, r, region, r * writers_per_rank + w, nb))
    return SavePlan(n, writers_per_rank, tensors, items)


def _check_tiling(tensors: dict[str, TensorMeta], holders: dict[tuple[str, Box], list]) -> None:
    by_fqn: dict[str, list[Box]] = {}
    for fqn, box in holders:
        by_fqn.setdefault(fqn, []).append(box)
    for fqn, m in tensors.items():
        boxes = sorted(by_fqn.get(fqn, []), key=lambda b: (b.offsets, b.sizes))
        for b in boxes:
            if not b.within(m.shape):
                who = [r for r, _ in holders[(fqn, b)]]
                raise DistributedError(
                    f"tensor {fqn!r}: rank(s) {who} hold region offsets={list(b.offsets)} "
                    f"sizes={list(b.sizes)}, outside the global shape {list(m.shape)}"
                )
        pair = first_overlap(boxes)  # the same sweep that validates a manifest's chunks
        if pair is not None:
            a, b = boxes[pair[0]], boxes[pair[1]]
            ra = [r for r, _ in holders[(fqn, a)]]
            rb = [r for r, _ in holders[(fqn, b)]]
            raise DistributedError(
                f"tensor {fqn!r}: ranks hold overlapping but different regions: rank(s) {ra} "
                f"offsets={list(a.offsets)} sizes={list(a.sizes)} and rank(s) {rb} "
                f"offsets={list(b.offsets)} sizes={list(b.sizes)}. The ranks' layouts "
                "(DTensor placements, FlatShard ranges) disagree."
            )
        covered = sum(b.numel for b in boxes)
        total = math.prod(m.shape)
        if covered != total:
            raise DistributedError(
                f"tensor {fqn!r} of shape {list(m.shape)}: the ranks together hold {covered} of its "
                f"{total} elements. Every element must be on some rank (check FlatShard start/length "
                "and that every pipeline stage passes its tensors)."
            )


# ------------------------------------------------------------------------- load plan


@dataclass(frozen=True)
class StoredChunk:
    """What the load planner needs of a manifest chunk."""

    fqn: str
    index: int  # position in the tensor entry's chunk list
    box: Box
    itemsize: int
    block_rows: int = 0  # rows per checksum block; 0: one checksum for the whole chunk

    @property
    def nbytes(self) -> int:
        return self.box.numel * self.itemsize

    @property
    def rows(self) -> int:
        return self.box.sizes[0] if self.box.ndim else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


@dataclass(frozen=True)
class Want:
    """Rank ``rank``'s request number ``request`` wants ``box`` of tensor ``fqn``."""

    fqn: str
    box: Box
    rank: int
    request: int


@dataclass(frozen=True)
class Piece:
    """``box`` of the logical tensor goes to request ``request`` of rank ``rank``."""

    box: Box
    rank: int
    request: int


@dataclass
class ChunkRead:
    """Rank ``reader`` reads rows ``[row_lo, row_hi)`` of a stored chunk and hands out pieces.

    ``verify`` is ``"chunk"`` (the whole chunk is read and its checksum checked),
    ``"blocks"`` (the rows are whole checksum blocks, each checked) or ``"none"``.
    """

    reader: int
    chunk: StoredChunk
    row_lo: int
    row_hi: int
    verify: str
    pieces: list[Piece] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return (self.row_hi - self.row_lo) * self.chunk.row_bytes if self.chunk.box.ndim else self.chunk.nbytes

    @property
    def box(self) -> Box:
        """The region of the logical tensor these rows hold."""
        b = self.chunk.box
        if not b.ndim:
            return b
        return Box((b.offsets[0] + self.row_lo,) + b.offsets[1:], (self.row_hi - self.row_lo,) + b.sizes[1:])


@dataclass
class LoadPlan:
    """Who reads what from storage, and which pieces travel from reader to which rank."""

    world_size: int
    reads: list[ChunkRead]

    def reads_of(self, rank: int) -> list[ChunkRead]:
        return [r for r in self.reads if r.reader == rank]

    def messages(self, src: int, dst: int) -> list[tuple[ChunkRead, Piece]]:
        """The pieces ``src`` sends ``dst``, in the order both sides agree on."""
        return [(r, p) for r in self.reads if r.reader == src for p in r.pieces if p.rank == dst]

    def outgoing(self, rank: int) -> dict[int, list[tuple[ChunkRead, Piece]]]:
        """``messages(rank, dst)`` for every other ``dst`` that gets any, in one pass."""
        out: dict[int, list] = {}
        for r in self.reads:
            if r.reader == rank:
                for p in r.pieces:
                    if p.rank != rank:
                        out.setdefault(p.rank, []).append((r, p))
        return out

    def incoming(self, rank: int) -> dict[int, list[tuple[ChunkRead, Piece]]]:
        """``messages(src, rank)`` for every other ``src`` that sends any, in one pass."""
        out: dict[int, list] = {}
        for r in self.reads:
            if r.reader != rank:
                for p in r.pieces:
                    if p.rank == rank:
                        out.setdefault(r.reader, []).append((r, p))
        return out

    def bytes_read(self) -> list[int]:
        out = [0] * self.world_size
        for r in self.reads:
            out[r.reader] += r.nbytes
        return out

    def bytes_received(self) -> list[int]:
        out = [0] * self.world_size
        for r in self.reads:
            for p in r.pieces:
                if p.rank != r.reader:
                    out[p.rank] += p.box.numel * r.chunk.itemsize
        return out


class _RowIndex:
    """The wants of one tensor, found by dim-0 overlap in O(log n + candidates).

    Without it every stored chunk was intersected with every want of its tensor: with one
    chunk and one want per rank that is O(ranks^2) per tensor (minutes at 256 ranks).
    Wants sorted by first row, with a running maximum of their end rows: the candidates for
    rows [a, b) are those after the first whose running end exceeds a and before the first
    that starts at b or later.
    """

    def __init__(self, wants: list[Want]):
        if wants and wants[0].box.ndim == 0:
            self.wants, self.starts, self.max_end = wants, None, None
            return
        self.wants = sorted(wants, key=lambda w: w.box.offsets[0])
        self.starts = [w.box.offsets[0] for w in self.wants]
        self.max_end, m = [], -1
        for w in self.wants:
            m = max(m, w.box.offsets[0] + w.box.sizes[0])
            self.max_end.append(m)

    def overlapping(self, box: Box) -> list[Want]:
        if self.starts is None or box.ndim == 0:
            return self.wants
        a, b = box.offsets[0], box.offsets[0] + box.sizes[0]
        lo = bisect.bisect_right(self.max_end, a)
        hi = bisect.bisect_left(self.starts, b)
        return self.wants[lo:hi]


def plan_load_reads(chunks: Sequence[StoredChunk], wants: Sequence[Want], world_size: int, *, verify: bool = True) -> LoadPlan:
    """Plan the storage reads and transfers that fill every ``want`` from ``chunks``.

    Coverage is not checked here (the caller checks every want is covered by chunks).

    Example:
        >>> c = StoredChunk("w", 0, Box((0, 0), (4, 2)), 4)
        >>> p = plan_load_reads([c], [Want("w", Box((0, 0), (4, 2)), r, 0) for r in range(2)], 2)
        >>> p.bytes_read(), p.bytes_received()
        ([32, 0], [0, 32])
    """
    by_fqn: dict[str, _RowIndex] = {}
    grouped: dict[str, list[Want]] = {}
    for w in wants:
        grouped.setdefault(w.fqn, []).append(w)
    for fqn, ws in grouped.items():
        by_fqn[fqn] = _RowIndex(ws)
    read_load = [0] * world_size
    reads: list[ChunkRead] = []
    # Big chunks first so the greedy choice of readers balances bytes read.
    for c in sorted(chunks, key=lambda c: (-c.nbytes, c.fqn, c.index)):
        needs = []
        index = by_fqn.get(c.fqn)
        for w in index.overlapping(c.box) if index is not None else ():
            inter = c.box.intersect(w.box) if c.box.ndim else (c.box if w.box == c.box else None)
            if inter is not None:
                needs.append((w, inter))
        if not needs:
            continue
        if c.box.ndim == 0:
            segs = [(0, 1)]
        else:
            o0 = c.box.offsets[0]
            cuts = sorted({p for _, i in needs for p in (i.offsets[0] - o0, i.ends[0] - o0)})
            segs = list(zip(cuts, cuts[1:]))
        mine: list[ChunkRead] = []
        for lo, hi in segs:
            users = []
            for w, inter in needs:
                if c.box.ndim == 0:
                    users.append((w, inter))
                    continue
                a, b = inter.offsets[0] - c.box.offsets[0], inter.ends[0] - c.box.offsets[0]
                if a <= lo and hi <= b:
                    sub = Box((c.box.offsets[0] + lo,) + inter.offsets[1:], (hi - lo,) + inter.sizes[1:])
                    users.append((w, sub))
            if not users:
                continue
            ranks = sorted({w.rank for w, _ in users})
            prev = mine[-1] if mine and mine[-1].row_hi == lo else None
            if prev is not None and prev.reader in ranks:
                reader = prev.reader
            else:
                reader = min(ranks, key=lambda r: (read_load[r], r))
            pieces = [Piece(b, w.rank, w.request) for w, b in users]
            if prev is not None and prev.reader == reader:
                prev.row_hi = hi
                prev.pieces.extend(pieces)
            else:
                mine.append(ChunkRead(reader, c, lo, hi, "none", pieces))
            read_load[reader] += (hi - lo) * c.row_bytes if c.box.ndim else c.nbytes
        for r in mine:
            whole = (r.row_lo, r.row_hi) == (0, c.rows)
            if not verify:  # no checksums at all, whole chunk or not (one meaning on every path)
                r.verify = "none"
                continue
            before = r.nbytes
            if not whole and c.block_rows:
                r.row_lo = r.row_lo // c.block_rows * c.block_rows
                r.row_hi = min(c.rows, -(-r.row_hi // c.block_rows) * c.block_rows)
                whole = (r.row_lo, r.row_hi) == (0, c.rows)
                r.verify = "chunk" if whole else "blocks"
            else:
                r.row_lo, r.row_hi = 0, c.rows
                r.verify = "chunk"
            read_load[r.reader] += r.nbytes - before
        reads.extend(mine)
    reads.sort(key=lambda r: (r.chunk.fqn, r.chunk.index, r.row_lo))
    return LoadPlan(world_size, reads)

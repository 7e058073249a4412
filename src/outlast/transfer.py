"""Carry out a load plan on this rank: storage reads, checks, copies, and the exchange.

:func:`read_mine` does this rank's reads of a :class:`~outlast.plan.LoadPlan`: reads of
adjacent byte ranges of one file become one ``preadv`` (up to ``_COALESCE`` bytes), a
whole chunk that exactly fills a contiguous destination is read straight into it, and
checksums (whole chunk or per block) are checked before any byte is used. Pieces for
this rank are copied into their destinations; pieces for other ranks are packed, one
byte buffer per destination rank. :func:`exchange` then sends and receives those
buffers point to point (all receives posted first, so no order of sends can deadlock).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import dtypes
from .collective import Group
from .errors import CorruptCheckpointError
from .plan import ChunkRead, LoadPlan
from .reader import CheckpointReader, ReadRequest
from .storage.local import checksum, tensor_bytes

# Reads of adjacent ranges are merged up to this size (one syscall, one buffer).
_COALESCE = 64 << 20
# Messages larger than this are cut so no single transfer needs a huge buffer on the wire.
_MESSAGE = 256 << 20


@dataclass
class TransferStats:
    bytes_read: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    preads: int = 0


def _dtype(read: ChunkRead, reader: CheckpointReader) -> torch.dtype:
    return dtypes.from_safetensors(reader.manifest.tensors[read.chunk.fqn].dtype)


def _as(buf: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    if buf.numel() and buf.storage_offset() % torch.empty((), dtype=dtype).element_size():
        buf = buf.clone()  # a misaligned slice of a coalesced buffer cannot be viewed as dtype
    return buf.view(dtype).view(tuple(shape))


def _verify(reader: CheckpointReader, read: ChunkRead, data: memoryview) -> None:
    c = reader.manifest.tensors[read.chunk.fqn].chunk(read.chunk.index)
    where = reader.file_path(c.file)

    def bad(what: str, want: str, got: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"checksum mismatch in {where} for tensor {read.chunk.fqn!r} region offsets={list(c.box.offsets)} "
            f"sizes={list(c.box.sizes)}{what}: expected {want}, got {got}. The file is damaged; use an "
            "older checkpoint or restore the file.",
            [f"{c.file}: {read.chunk.fqn} {list(c.box.offsets)}"],
        )

    if read.verify == "chunk":
        got = checksum(data)
        if got != c.checksum:
            raise bad("", c.checksum, got)
    elif read.verify == "blocks":
        br, rb = c.block_rows, read.chunk.row_bytes
        for k in range(read.row_lo // br, -(-read.row_hi // br)):
            lo, hi = k * br, min(read.chunk.rows, (k + 1) * br)
            got = checksum(data[(lo - read.row_lo) * rb : (hi - read.row_lo) * rb])
            if got != c.block_checksums[k]:
                raise bad(f" rows {lo}..{hi}", c.block_checksums[k], got)


def read_mine(
    reader: CheckpointReader,
    plan: LoadPlan,
    rank: int,
    requests: list[ReadRequest],
    stats: TransferStats,
    *,
    progress=None,
) -> dict[int, torch.Tensor]:
    """Do this rank's reads; fill its own pieces; return one packed send buffer per rank.

    ``progress(nbytes)``, if given, is called after each read (from reader threads).
    """
    mine = plan.reads_of(rank)
    m = reader.manifest
    direct: list[ChunkRead] = []
    spans: list[tuple[str, int, int, ChunkRead]] = []  # file, start, end, read
    for rd in mine:
        c = m.tensors[rd.chunk.fqn].chunk(rd.chunk.index)
        if _direct_target(rd, requests) is not None:
            direct.append(rd)
            continue
        start = c.offset + (rd.row_lo * rd.chunk.row_bytes if rd.chunk.box.ndim else 0)
        spans.append((c.file, start, start + rd.nbytes, rd))
    spans.sort(key=lambda s: (s[0], s[1]))
    groups: list[list[tuple[str, int, int, ChunkRead]]] = []
    for s in spans:
        g = groups[-1] if groups else None
        if g and g[-1][0] == s[0] and g[-1][2] == s[1] and s[2] - g[0][1] <= _COALESCE:
            g.append(s)
        else:
            groups.append([s])

    # One send buffer per destination, laid out in plan.messages order (the order the
    # receiver unpacks): each piece is copied once, straight from the read into its slot.
    outgoing: dict[int, torch.Tensor] = {}
    slot: dict[tuple[int, int], torch.Tensor] = {}
    # One pass over the plan (not one per destination: O(world x reads) at scale).
    for dst, msgs in sorted(plan.outgoing(rank).items()):
        offsets, total = _layout(msgs)
        if not total:
            continue
        buf = outgoing[dst] = torch.empty(total, dtype=torch.uint8)
        for (rd, p), (a, b) in zip(msgs, offsets):
            slot[(id(rd), id(p))] = buf[a:b]

    def deliver(rd: ChunkRead, raw: torch.Tensor) -> None:
        dt = _dtype(rd, reader)
        src = _as(raw, dt, rd.box.sizes)
        for p in rd.pieces:
            view = src[p.box.relative_to(rd.box)]
            if p.rank == rank:
                req = requests[p.request]
                target = req.dest[p.box.relative_to(req.box)]
            else:
                target = _as(slot[(id(rd), id(p))], dt, p.box.sizes)
            with torch.no_grad():
                target.copy_(view)

    def run_group(g) -> None:
        fd_file = g[0][0]
        base, end = g[0][1], g[-1][2]
        buf = torch.empty(end - base, dtype=torch.uint8)
        reader.pread(fd_file, tensor_bytes(buf), base)
        for _, a, b, rd in g:
            part = buf[a - base : b - base]
            _verify(reader, rd, tensor_bytes(part))
            deliver(rd, part)
        if progress is not None:
            progress(end - base)

    def run_direct(rd: ChunkRead) -> None:
        view = _direct_target(rd, requests)
        c = m.tensors[rd.chunk.fqn].chunk(rd.chunk.index)
        mv = tensor_bytes(view)
        start = c.offset + (rd.row_lo * rd.chunk.row_bytes if rd.chunk.box.ndim else 0)
        with torch.no_grad():
            reader.pread(c.file, mv, start)
        _verify(reader, rd, mv)
        if progress is not None:
            progress(rd.nbytes)

    jobs = [(run_group, g) for g in groups] + [(run_direct, d) for d in direct]
    stats.bytes_read += sum(rd.nbytes for rd in mine)
    stats.preads += len(jobs)
    if reader.threads <= 1 or len(jobs) <= 1:
        for fn, arg in jobs:
            fn(arg)
    else:
        with ThreadPoolExecutor(reader.threads, thread_name_prefix="outlast-read") as pool:
            for f in [pool.submit(fn, arg) for fn, arg in jobs]:
                f.result()
    return outgoing


def _layout(msgs: list) -> tuple[list[tuple[int, int]], int]:
    """Byte ranges of each message piece in the packed buffer, and its size.

    Sender and receiver both derive it from ``plan.messages``. Pieces start at multiples
    of 8 bytes so each can be viewed as its dtype in place (no realigning copy).
    """
    out, pos = [], 0
    for rd, p in msgs:
        n = p.box.numel * rd.chunk.itemsize
        out.append((pos, pos + n))
        pos += n + (-n % 8)
    return out, pos


def _direct_target(rd: ChunkRead, requests: list[ReadRequest]) -> torch.Tensor | None:
    """The destination memory a read can land in without a staging copy, if any.

    That is when the read's rows are exactly one local piece and the piece's place in
    its destination is contiguous CPU memory (any row range of a row-major tensor is).
    """
    if len(rd.pieces) != 1:
        return None
    p = rd.pieces[0]
    if p.rank != rd.reader or p.box != rd.box:
        return None
    req = requests[p.request]
    view = req.dest[p.box.relative_to(req.box)] if req.box.ndim else req.dest
    if view.device.type == "cpu" and view.is_contiguous():
        return view
    return None


def exchange(
    group: Group,
    plan: LoadPlan,
    reader: CheckpointReader,
    requests: list[ReadRequest],
    outgoing: dict[int, torch.Tensor],
    stats: TransferStats,
) -> None:
    """Send packed pieces to their ranks and copy received pieces into destinations."""
    me = group.rank
    recvs = []
    sent = plan.outgoing(me)
    for src, msgs in sorted(plan.incoming(me).items()):
        offsets, total = _layout(msgs)
        if not total:
            continue
        buf = torch.empty(total, dtype=torch.uint8)
        works = [group.irecv(buf[a : a + _MESSAGE], src, tag=k) for k, a in enumerate(range(0, total, _MESSAGE))]
        recvs.append((msgs, offsets, buf, works))
    sends = []
    for dst in sorted(outgoing):
        buf = outgoing[dst]
        total = buf.numel()
        stats.bytes_sent += sum(b - a for a, b in _layout(sent[dst])[0])  # payload, not padding
        sends += [group.isend(buf[a : a + _MESSAGE], dst, tag=k) for k, a in enumerate(range(0, total, _MESSAGE))]
    for msgs, offsets, buf, works in recvs:
        for w in works:
            w.wait()
        stats.bytes_received += sum(b - a for a, b in offsets)
        for (rd, p), (a, b) in zip(msgs, offsets):
            req = requests[p.request]
            src = _as(buf[a:b], req.dest.dtype, p.box.sizes)
            with torch.no_grad():
                req.dest[p.box.relative_to(req.box)].copy_(src)
    for w in sends:
        w.wait()


def check_coverage(path: str, reader: CheckpointReader, wants) -> None:
    """Raise CorruptCheckpointError naming the first want the stored chunks do not cover."""
    m = reader.manifest
    for w in wants:
        e = m.tensors[w.fqn]
        got = 0
        for c in e.chunks:
            inter = c.box.intersect(w.box) if w.box.ndim else (c.box if c.box == w.box else None)
            if inter is not None:
                got += inter.numel
        if got != w.box.numel:
            files = sorted({c.file for c in e.chunks})
            raise CorruptCheckpointError(
                f"checkpoint {path} does not hold all of tensor {w.fqn!r} region offsets="
                f"{list(w.box.offsets)} sizes={list(w.box.sizes)} (wanted by rank {w.rank}): "
                f"{w.box.numel - got} elements are in no chunk (regions lost). Its chunks are in {files}; "
                "use an older checkpoint."
            )


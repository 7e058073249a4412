"""Where each parameter's state lives in the state files, and how a step cuts them into chunks.

Pure geometry, no I/O. Every state file (one per kind: ``exp_avg``, ``exp_avg_sq``, ...)
holds the fp32 state of all parameters back to back in parameter order, each starting
at a multiple of :data:`ALIGN_ELEMS` elements (4096 bytes) so every chunk boundary is
an O_DIRECT-aligned file offset and a parameter's state is one contiguous range (a
memory-mapped view of it is a plain tensor). A step streams the files in chunks of
``chunk_elems`` consecutive elements; a chunk is cut into *pieces*, the parts of it
that belong to one parameter. Pieces start at multiples of ALIGN_ELEMS from their
parameter's start, so the vectorised elementwise kernels see the same alignment as on
the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..storage.local import DIRECT_ALIGN

__all__ = ["ALIGN_ELEMS", "ITEMSIZE", "Piece", "Chunk", "StateLayout"]

ITEMSIZE = 4  # offloaded state is fp32
ALIGN_ELEMS = DIRECT_ALIGN // ITEMSIZE


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class Piece:
    """Elements ``[lo, hi)`` of parameter ``param`` sit at ``[buf_lo, buf_lo + hi - lo)`` of the chunk's buffers."""

    param: int
    lo: int
    hi: int
    buf_lo: int


@dataclass(frozen=True)
class Chunk:
    """Elements ``[start, stop)`` of every state file, and the parameter pieces in it."""

    index: int
    start: int
    stop: int
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class StateLayout:
    """Offsets of each parameter's state in the files and the chunks of one step.

    Args:
        numels: element count of every parameter, in optimizer order.
        chunk_elems: elements per chunk (a multiple of ALIGN_ELEMS).

    Example:
        >>> lay = StateLayout.build([10, 3000], chunk_elems=2048)
        >>> lay.offsets, lay.total
        ((0, 1024), 4096)
        >>> [(c.start, c.stop, [(p.param, p.lo, p.hi) for p in c.pieces]) for c in lay.chunks]
        [(0, 2048, [(0, 0, 10), (1, 0, 1024)]), (2048, 4096, [(1, 1024, 3000)])]
    """

    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    total: int
    chunk_elems: int
    chunks: tuple[Chunk, ...]

    @staticmethod
    def build(numels: Sequence[int], chunk_elems: int) -> "StateLayout":
        if chunk_elems <= 0 or chunk_elems % ALIGN_ELEMS:
            raise ValueError(f"chunk_elems={chunk_elems} must be a positive multiple of {ALIGN_ELEMS}")
        offsets = []
        pos = 0
        for n in numels:
            if n < 0:
                raise ValueError(f"a parameter cannot have {n} elements")
            offsets.append(pos)
            pos += _round_up(max(int(n), 1), ALIGN_ELEMS)
        total = pos
        chunks = []
        p = 0
        for ci, start in enumerate(range(0, total, chunk_elems)):
            stop = min(total, start + chunk_elems)
            pieces = []
            while p < len(numels) and offsets[p] < stop:
                lo = max(start, offsets[p]) - offsets[p]
                hi = min(stop, offsets[p] + numels[p]) - offsets[p]
                if hi > lo:
                    pieces.append(Piece(p, lo, hi, offsets[p] + lo - start))
                if offsets[p] + numels[p] <= stop:
                    p += 1
                else:
                    break
            chunks.append(Chunk(ci, start, stop, tuple(pieces)))
        return StateLayout(tuple(int(n) for n in numels), tuple(offsets), total, chunk_elems, tuple(chunks))

    @property
    def nbytes(self) -> int:
        """Bytes of one state file."""
        return self.total * ITEMSIZE

"""A fixed pool of page-aligned buffer sets, allocated once and reused every step.

MemAscend's lesson for offloading is that the memory lost is mostly buffer bloat: a
staging buffer per tensor, per step, or per in-flight request. Here the pipeline owns
``n_sets`` sets of ``n_buffers`` buffers of ``chunk_bytes`` each, allocated when the
optimizer is built; a chunk in flight holds one set, and a stage that finds the pool
empty waits. Peak extra memory is therefore ``pool.nbytes`` whatever the model size.
Buffers come from :func:`outlast.storage.local.aligned_buffer`, so they can be read and
written with O_DIRECT as they are.
"""

from __future__ import annotations

import queue

import torch

from ..storage.local import aligned_buffer

__all__ = ["BufferPool"]


class BufferPool:
    """``n_sets`` sets of ``n_buffers`` aligned uint8 buffers of ``chunk_bytes``.

    Thread-safe: one thread may :meth:`acquire` while another :meth:`release` s.

    Args:
        n_sets: how many chunks may be in flight at once (3: one read, one updated,
            one written back; a fourth lets the reader run one chunk ahead).
        n_buffers: buffers per set (one per state kind streamed, plus scratch).
        chunk_bytes: size of each buffer, rounded up to the O_DIRECT alignment.
        pin: page-locked memory (for copies to and from an accelerator).

    Example:
        >>> pool = BufferPool(3, 2, 1 << 20)
        >>> bufs = pool.acquire(); pool.release(bufs)
        >>> pool.nbytes
        6291456
    """

    def __init__(self, n_sets: int, n_buffers: int, chunk_bytes: int, *, pin: bool = False):
        if n_sets < 1 or n_buffers < 1 or chunk_bytes < 1:
            raise ValueError(f"BufferPool needs n_sets, n_buffers, chunk_bytes >= 1, got {n_sets}, {n_buffers}, {chunk_bytes}")
        self.sets = [[aligned_buffer(chunk_bytes, pin=pin) for _ in range(n_buffers)] for _ in range(n_sets)]
        self.chunk_bytes = self.sets[0][0].numel()
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(n_sets):
            self._free.put(i)

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool (what the pipeline adds to the process's memory)."""
        return sum(b.numel() for s in self.sets for b in s)

    def acquire(self, timeout: float | None = None) -> int:
        """The index of a free set (waits until one is released). See :meth:`buffers`."""
        return self._free.get(timeout=timeout)

    def buffers(self, index: int) -> list[torch.Tensor]:
        return self.sets[index]

    def release(self, index: int) -> None:
        self._free.put(index)

"""A chunk pipeline whose update stage the caller drives piecemeal: for steps overlapped with backward.

:func:`~outlast.offload.stream.run_pipeline` owns the whole step: it reads, updates and
writes every chunk, then returns. With ``OffloadAdamW(overlap_backward=True)`` the update
of a chunk can only run once the gradients of every parameter in it are final, which
happens during ``backward()``, one parameter at a time, in post-accumulate-grad hooks.
So here the reader and writer threads run on their own from the first hook of a
backward pass to ``step()``, and the caller runs the update in between:

* :meth:`ChunkStream.pump` (from a hook) updates every chunk already read whose
  gradients are final, and never waits: the backward pass goes on at once, and the disk
  keeps streaming the next chunks while it does;
* :meth:`ChunkStream.drain` (from ``step()``) updates the rest, waiting for their reads;
* :meth:`ChunkStream.pull` (``overlap_forward=True``: from the next forward's module
  pre-hooks, after ``step()`` has returned) updates the chunks a module needs, waiting
  for their reads, after :meth:`ChunkStream.reorder` has put the unread chunks in the
  order the forward needs them.

A chunk holds one buffer set of the pool from its read until its write is done, so the
memory is the pool's, as in the plain pipeline; chunks are read in the order given
(the order in which their gradients were final in the previous step) and updated in any
order their gradients allow.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from typing import Callable, Sequence

import torch

from .pool import BufferPool

__all__ = ["ChunkStream"]

_STOP = -1


def raise_io_priority() -> None:
    """Run this I/O thread ahead of the compute threads: a disk request waits for a core only
    for the few microseconds it needs to issue the next one, and a thread that cannot get a
    core (a two-thread backward on two cores) leaves the disk idle. Needs CAP_SYS_NICE; without
    it the thread keeps the process's priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
    except (OSError, AttributeError):
        pass


class ChunkStream:
    """Reader and writer threads over ``order``; the update runs on the caller's thread.

    NOT thread-safe on the caller's side: :meth:`pump`, :meth:`drain` and :meth:`close`
    are called from one thread at a time (the autograd hooks, then ``step()``).

    Args:
        order: chunk indices in the order to read them.
        pool: the buffer sets (a chunk holds one from its read until its write is done).
        read, write: ``f(chunk, buffers)``, run on the reader and writer threads.
        timeout_s: the longest :meth:`drain` or a thread waits for another stage.

    Example:
        >>> pool = BufferPool(2, 1, 4096)
        >>> out = []
        >>> s = ChunkStream([2, 1, 0], pool, lambda c, b: b[0].fill_(c), lambda c, b: out.append(int(b[0][0])))
        >>> s.pump(lambda c: c != 0, lambda c, b: b[0].add_(10)) >= 0
        True
        >>> s.drain(lambda c, b: b[0].add_(10)); s.close()
        >>> sorted(out)
        [10, 11, 12]
    """

    def __init__(
        self,
        order: Sequence[int],
        pool: BufferPool,
        read: Callable[[int, list[torch.Tensor]], None],
        write: Callable[[int, list[torch.Tensor]], None],
        *,
        timeout_s: float = 600.0,
    ):
        self.order = list(order)
        self._unread = collections.deque(self.order)  # the reader takes from the left; reorder() may change it
        self._taken: set[int] = set()  # chunks handed to the update stage
        self._written: set[int] = set()  # chunks whose write is done
        self._finished = False
        self.pool = pool
        self._read, self._write = read, write
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._ready: dict[int, int] = {}  # chunk -> buffer set, read and not yet updated
        self._read_all = False
        self._done: queue.Queue = queue.Queue()
        self.errors: list[BaseException] = []
        self.failed = threading.Event()
        self.updated = 0
        self.stats = {"read_s": 0.0, "update_s": 0.0, "write_s": 0.0, "pool_wait_s": 0.0}
        self._closed = False
        self._tr = threading.Thread(target=self._reader, name="outlast-offload-read", daemon=True)
        self._tw = threading.Thread(target=self._writer, name="outlast-offload-write", daemon=True)
        self._tr.start()
        self._tw.start()

    # ------------------------------------------------------------------ threads
    def _fail(self, e: BaseException) -> None:
        self.errors.append(e)
        self.failed.set()
        with self._cond:
            self._cond.notify_all()

    def _reader(self) -> None:
        raise_io_priority()
        try:
            while True:
                with self._cond:
                    if not self._unread:
                        return  # (finally: read_all) before waiting for a set no chunk needs
                t0 = time.perf_counter()
                while True:
                    if self.failed.is_set():
                        return
                    try:
                        s = self.pool.acquire(timeout=0.1)
                        break
                    except queue.Empty:
                        continue
                with self._cond:  # the chunk is chosen only now, so a reorder() counts until the last moment
                    c = self._unread.popleft() if self._unread else None
                if c is None:
                    self.pool.release(s)
                    return
                t1 = time.perf_counter()
                try:
                    self._read(c, self.pool.buffers(s))
                except BaseException:
                    self.pool.release(s)
                    raise
                self.stats["pool_wait_s"] += t1 - t0
                self.stats["read_s"] += time.perf_counter() - t1
                with self._cond:
                    self._ready[c] = s
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the caller by drain/close
            self._fail(e)
        finally:
            with self._cond:
                self._read_all = True
                self._cond.notify_all()

    def _writer(self) -> None:
        raise_io_priority()
        while True:
            c, s = self._done.get()
            if c == _STOP:
                return
            try:
                if not self.failed.is_set():
                    t0 = time.perf_counter()
                    self._write(c, self.pool.buffers(s))
                    self.stats["write_s"] += time.perf_counter() - t0
                    with self._cond:
                        self._written.add(c)
                        self._cond.notify_all()
            except BaseException as e:  # noqa: BLE001
                self._fail(e)
            finally:
                self.pool.release(s)  # always: the reader must never wait on a set nobody returns

    # ------------------------------------------------------------------ caller
    def _update(self, c: int, s: int, update: Callable[[int, list[torch.Tensor]], None]) -> None:
        self._taken.add(c)
        try:
            if not self.failed.is_set():
                t0 = time.perf_counter()
                update(c, self.pool.buffers(s))
                self.stats["update_s"] += time.perf_counter() - t0
                self.updated += 1
        except BaseException as e:  # noqa: BLE001
            self._fail(e)
        finally:
            self._done.put((c, s))

    def pump(self, final: Callable[[int], bool], update: Callable[[int, list[torch.Tensor]], None]) -> int:
        """Update every chunk already read for which ``final(chunk)`` holds; never waits.

        Returns:
            How many chunks it updated.
        """
        with self._cond:
            take = [(c, s) for c, s in self._ready.items() if final(c)]
            for c, _ in take:
                del self._ready[c]
        for c, s in take:
            self._update(c, s, update)
        return len(take)

    def reorder(self, order: Sequence[int]) -> None:
        """Read the chunks not read yet in ``order`` (chunks of ``order`` already read or
        not in this stream are skipped; unread chunks missing from ``order`` go last)."""
        with self._cond:
            unread = set(self._unread)
            first = [c for c in dict.fromkeys(order) if c in unread]
            seen = set(first)
            self._unread = collections.deque(first + [c for c in self._unread if c not in seen])

    def pull(self, need: Sequence[int], update: Callable[[int, list[torch.Tensor]], None]) -> None:
        """Update every chunk of ``need`` not updated yet, waiting for their reads; chunks
        read meanwhile are updated too (every gradient must be final). Raises the first
        error of any stage."""
        left = [c for c in need if c not in self._taken]
        while left:
            with self._cond:
                ok = self._cond.wait_for(lambda: self._ready or self._read_all or self.failed.is_set(), self.timeout_s)
                if not ok:
                    self._fail(TimeoutError(f"the offload read stage produced nothing for {self.timeout_s}s"))
                if self.failed.is_set() or not self._ready:
                    break
                take = list(self._ready.items())
                self._ready.clear()
            for c, s in take:
                self._update(c, s, update)
            left = [c for c in left if c not in self._taken]
        if self.errors:
            raise self.errors[0]
        if left:
            raise RuntimeError(f"offload chunks {left[:8]} were never read: they are not in this stream")

    def wait_written(self, c: int) -> None:
        """Block until chunk ``c``'s write is done (for a stream that reads what this one
        writes: the next step's read-ahead). Raises if this stream failed or was closed first."""
        with self._cond:
            ok = self._cond.wait_for(lambda: c in self._written or self.failed.is_set() or self._finished,
                                     self.timeout_s)
            if c in self._written:
                return
        raise RuntimeError(
            f"offload chunk {c} was not written by the step before (it failed or timed out after {self.timeout_s}s)"
            if ok else f"waited {self.timeout_s}s for the step before to write offload chunk {c}")

    def all_written(self) -> bool:
        """Every chunk's write is done (or the stream failed: nothing more will be written)."""
        with self._cond:
            return len(self._written) == len(self.order) or self.failed.is_set()

    @property
    def started(self) -> int:
        """Chunks whose read has begun."""
        with self._cond:
            return len(self.order) - len(self._unread)

    @property
    def remaining(self) -> int:
        """Chunks not handed to the update stage yet."""
        return len(self.order) - len(self._taken)

    def drain(self, update: Callable[[int, list[torch.Tensor]], None]) -> None:
        """Update every chunk not updated yet, waiting for their reads, then :meth:`close`;
        raises the first error of any stage (the step then must not be committed)."""
        try:
            self.pull(self.order, update)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the threads (the writer finishes the chunks handed to it) and raise the first
        error of any stage. Idempotent; after an error it only stops."""
        if not self._closed:
            self._closed = True
            with self._cond:
                aborted = not self._read_all or bool(self._ready)
            if aborted:  # closed before every chunk was updated: stop reading, write nothing more
                self.failed.set()
            self._tr.join(self.timeout_s)
            with self._cond:
                left = list(self._ready.values())
                self._ready.clear()
            for s in left:
                self._done.put((_STOP - 1, s))  # released by the writer without being written
            self._done.put((_STOP, -1))
            self._tw.join(self.timeout_s)
            with self._cond:
                self._finished = True  # every write that will happen has happened
                self._cond.notify_all()
        if self.errors:
            raise self.errors[0]

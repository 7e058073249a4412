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
* :meth:`ChunkStream.drain` (from ``step()``) updates the rest, waiting for their reads.

A chunk holds one buffer set of the pool from its read until its write is done, so the
memory is the pool's, as in the plain pipeline; chunks are read in the order given
(the order in which their gradients were final in the previous step) and updated in any
order their gradients allow.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Sequence

import torch

from .pool import BufferPool

__all__ = ["ChunkStream"]

_STOP = -1


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
        try:
            for c in self.order:
                t0 = time.perf_counter()
                while True:
                    if self.failed.is_set():
                        return
                    try:
                        s = self.pool.acquire(timeout=0.1)
                        break
                    except queue.Empty:
                        continue
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
        while True:
            c, s = self._done.get()
            if c == _STOP:
                return
            try:
                if not self.failed.is_set():
                    t0 = time.perf_counter()
                    self._write(c, self.pool.buffers(s))
                    self.stats["write_s"] += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001
                self._fail(e)
            finally:
                self.pool.release(s)  # always: the reader must never wait on a set nobody returns

    # ------------------------------------------------------------------ caller
    def _update(self, c: int, s: int, update: Callable[[int, list[torch.Tensor]], None]) -> None:
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

    def drain(self, update: Callable[[int, list[torch.Tensor]], None]) -> None:
        """Update every chunk not updated yet, waiting for their reads; raises the first
        error of any stage (the step then must not be committed)."""
        while True:
            with self._cond:
                ok = self._cond.wait_for(lambda: self._ready or self._read_all or self.failed.is_set(), self.timeout_s)
                if not ok:
                    self._fail(TimeoutError(f"the offload read stage produced nothing for {self.timeout_s}s"))
                if self.failed.is_set():
                    break
                if not self._ready:
                    break  # every chunk read and updated
                c = next(iter(self._ready))  # the oldest read first: writes follow the read order
                s = self._ready.pop(c)
            self._update(c, s, update)
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
        if self.errors:
            raise self.errors[0]

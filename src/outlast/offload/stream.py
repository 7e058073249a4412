"""The three-stage pipeline of an offloaded step: read chunk i+1, update chunk i, write chunk i-1.

One reader thread and one writer thread do the file I/O while the calling thread runs
the update; all three release the GIL for nearly all of their time (``preadv`` and
``pwrite`` are syscalls, torch's elementwise kernels drop the GIL), so on two cores the
disk and the arithmetic overlap. Chunks flow through a :class:`~outlast.offload.pool.BufferPool`:
a chunk holds one buffer set from its read until its write is done, so at most
``pool`` sets are in flight and nothing else is allocated.

The first error of any stage stops the pipeline: the other stages finish the chunk in
hand, the threads are joined, and the error is raised on the calling thread.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Sequence

import torch

from .overlap import raise_io_priority
from .pool import BufferPool

__all__ = ["run_pipeline"]

_STOP = -1


def run_pipeline(
    chunks: Sequence[int],
    pool: BufferPool,
    read: Callable[[int, list[torch.Tensor]], None],
    update: Callable[[int, list[torch.Tensor]], None],
    write: Callable[[int, list[torch.Tensor]], None],
    *,
    timeout_s: float = 600.0,
    stats: dict | None = None,
) -> None:
    """Run ``read``, ``update`` and ``write`` over every chunk, overlapped.

    Args:
        chunks: chunk indices, in order.
        pool: the buffer sets; ``read`` fills a set, ``update`` works on it in place,
            ``write`` writes it out, then the set is reused.
        read, update, write: called as ``f(chunk, buffers)``. ``read`` and ``write`` run
            on their own threads, ``update`` on the caller's.
        timeout_s: the longest any stage waits for another before the step fails (a
            hung device surfaces as an error instead of a hang).
        stats: if given, receives the seconds each stage spent working
            (``read_s``, ``update_s``, ``write_s``) and waiting for a buffer (``pool_wait_s``).

    Returns:
        None; raises the first exception any stage raised.

    Example:
        >>> pool = BufferPool(3, 1, 4096)
        >>> out = []
        >>> run_pipeline(range(4), pool, lambda c, b: b[0].fill_(c), lambda c, b: b[0].add_(1),
        ...              lambda c, b: out.append(int(b[0][0])))
        >>> out
        [1, 2, 3, 4]
    """
    ready: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()
    errors: list[BaseException] = []
    failed = threading.Event()
    spent = {"read_s": 0.0, "update_s": 0.0, "write_s": 0.0, "pool_wait_s": 0.0}

    def reader() -> None:
        raise_io_priority()
        try:
            for c in chunks:
                t0 = time.perf_counter()
                while True:
                    if failed.is_set():
                        return
                    try:
                        s = pool.acquire(timeout=0.1)
                        break
                    except queue.Empty:
                        continue
                t1 = time.perf_counter()
                try:
                    read(c, pool.buffers(s))
                except BaseException:
                    pool.release(s)
                    raise
                spent["pool_wait_s"] += t1 - t0
                spent["read_s"] += time.perf_counter() - t1
                ready.put((c, s))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            errors.append(e)
            failed.set()
        finally:
            ready.put((_STOP, -1))

    def writer() -> None:
        raise_io_priority()
        try:
            while True:
                c, s = done.get(timeout=timeout_s)
                if c == _STOP:
                    return
                try:
                    if not failed.is_set():
                        t0 = time.perf_counter()
                        write(c, pool.buffers(s))
                        spent["write_s"] += time.perf_counter() - t0
                finally:
                    pool.release(s)
        except queue.Empty:
            errors.append(TimeoutError(f"the offload write stage waited {timeout_s}s for an update"))
            failed.set()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            failed.set()
            # keep releasing sets so the reader is never stuck on an empty pool
            while True:
                try:
                    c, s = done.get(timeout=timeout_s)
                except queue.Empty:
                    return
                if c == _STOP:
                    return
                pool.release(s)

    tr = threading.Thread(target=reader, name="outlast-offload-read", daemon=True)
    tw = threading.Thread(target=writer, name="outlast-offload-write", daemon=True)
    tr.start()
    tw.start()
    try:
        while True:
            try:
                c, s = ready.get(timeout=timeout_s)
            except queue.Empty:
                errors.append(TimeoutError(f"the offload read stage produced nothing for {timeout_s}s"))
                failed.set()
                break
            if c == _STOP:
                break
            if failed.is_set():
                done.put((c, s))
                continue
            try:
                t0 = time.perf_counter()
                update(c, pool.buffers(s))
                spent["update_s"] += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                failed.set()
            done.put((c, s))
    finally:
        done.put((_STOP, -1))
        tr.join(timeout_s)
        tw.join(timeout_s)
    if stats is not None:
        stats.update(spent)
    if errors:
        raise errors[0]

"""Helpers shared by the benchmark scripts: timing, page-cache eviction, table output."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time


def evict(path: str) -> None:
    """Drop a file or directory tree from the page cache so the next read hits the disk.

    Uses posix_fadvise(DONTNEED) on every file (no root needed; pages are clean after
    fsync). Benchmarks call it before every load so no method reads from memory.
    """
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def median(xs):
    return statistics.median(xs)


def print_table(headers: list[str], rows: list[list], title: str = "") -> None:
    if title:
        print(title)
    cols = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    for j, r in enumerate(cols):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def emit_json(obj: dict) -> None:
    print(json.dumps(obj, sort_keys=True))


def stop_all(procs, timeout: float = 20) -> None:
    """SIGTERM every process group of ``procs`` still running, then SIGKILL those not gone in ``timeout``."""
    import signal
    import subprocess

    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


class ClientThreads:
    """``n`` threads running ``self._run(k)`` from ``with`` until the block ends (``self.stop`` is set)."""

    def __init__(self, n: int):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,)) for k in range(n)]

    def _run(self, k: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)

"""A newly committed step's files are read into the page cache ahead of its reload."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import torch

import outlast
from outlast.serve.reload import prefetch


def _resident_fraction(folder: str) -> float:
    """Fraction of the folder's file pages in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    total = resident = 0
    for dp, _, fs in os.walk(folder):
        for f in fs:
            path = os.path.join(dp, f)
            n = os.path.getsize(path)
            if n == 0:
                continue
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), n, prot=mmap.PROT_READ)
                try:
                    pages = (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE
                    vec = (ctypes.c_ubyte * pages)()
                    addr = np.frombuffer(mm, dtype=np.uint8).ctypes.data
                    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(n), vec) == 0, ctypes.get_errno()
                    resident += sum(v & 1 for v in vec)
                    total += pages
                finally:
                    del addr
                    mm.close()
    return resident / total


def _drop(folder: str) -> None:
    for dp, _, fs in os.walk(folder):
        for f in fs:
            fd = os.open(os.path.join(dp, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def test_prefetch_brings_a_step_into_the_page_cache_and_skips_what_cannot_fit(tmp_path):
    run = str(tmp_path / "run")
    with outlast.Checkpointer(run) as ck:
        ck.save({"model": {"w": torch.randn(1024, 2048)}}, 1)  # 8 MiB
    step = os.path.join(run, "step-00000001")
    _drop(step)
    before = _resident_fraction(step)
    assert before < 0.5, f"the test needs the files out of the page cache first ({before:.2f} resident)"
    t = prefetch(step)
    assert t is not None
    t.join(30)
    assert not t.is_alive()
    assert _resident_fraction(step) > 0.95
    # more than the allowed share of available memory: nothing is read
    assert prefetch(step, max_fraction=1e-12) is None
    assert prefetch(None) is None

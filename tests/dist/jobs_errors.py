"""Jobs for bad input: every rank must raise the same clear error, never hang."""

from __future__ import annotations

import errno
import os
import sys

import torch

import outlast
from outlast import saving
from outlast.errors import CheckpointError, StorageError
from tests.dist.harness import spawn


def _catch(fn) -> dict:
    try:
        fn()
    except CheckpointError as e:
        cause = e.__cause__
        return {"type": type(e).__name__, "msg": str(e), "cause": None if cause is None else type(cause).__name__}
    return {"type": None, "msg": "", "cause": None}


class _Broken:
    """A Stateful whose state_dict() fails with a plain RuntimeError on rank 1 only."""

    def __init__(self, rank: int):
        self.rank = rank

    def state_dict(self):
        if self.rank == 1:
            raise RuntimeError("state_dict of the data loader failed (worker died)")
        return {"pos": 3}

    def load_state_dict(self, sd):
        pass


def errors_job(rank: int, world: int, root: str) -> dict:
    out = {}
    base = {"w": torch.arange(12.0).reshape(3, 4), "step": 1}
    # 1. a tensor of another global shape on rank 1
    bad = dict(base, w=torch.zeros(3, 5) if rank == 1 else base["w"])
    out["shape"] = _catch(lambda: outlast.save(bad, os.path.join(root, "shape")))
    # 2. different plain values for the same key
    out["plain"] = _catch(lambda: outlast.save(dict(base, step=rank), os.path.join(root, "plain")))
    # 3. a leaf only rank 1 cannot serialise
    weird = dict(base, x=object() if rank == 1 else 3)
    out["serial"] = _catch(lambda: outlast.save(weird, os.path.join(root, "serial")))
    # 4. disk failure on rank 1 while writing
    real = saving.write_items  # what persist calls

    def failing(*a, **k):
        if rank == 1:
            raise StorageError("writing data/w00001.safetensors failed: No space left on device (the disk is full)")
        return real(*a, **k)

    saving.write_items = failing
    try:
        out["disk"] = _catch(lambda: outlast.save(base, os.path.join(root, "disk")))
    finally:
        saving.write_items = real
    torch.distributed.barrier()
    out["disk_leftovers"] = sorted(os.listdir(root))
    # 4b. a plain OSError (not an outlast error) on rank 1 while writing: StorageError on
    # every rank, rank 1's OSError chained as the cause
    def oserror(*a, **k):
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    saving.write_items = oserror
    try:
        out["oserror"] = _catch(lambda: outlast.save(base, os.path.join(root, "oserror")))
    finally:
        saving.write_items = real
    # 4c. a RuntimeError from a user's state_dict() on rank 1: DistributedError everywhere
    out["runtime"] = _catch(lambda: outlast.save(dict(base, data=_Broken(rank)), os.path.join(root, "runtime")))
    # 5. a good save, then a live tensor of another shape on rank 1 at load
    good = os.path.join(root, "good")
    big = {"w": torch.arange(12.0).reshape(3, 4), "v": torch.ones(50, 4), "step": 1}
    outlast.save(big, good, num_writers=1)
    live = {"w": torch.zeros(3, 5) if rank == 1 else torch.zeros(3, 4), "v": torch.zeros(50, 4), "step": 0}
    out["load_shape"] = _catch(lambda: outlast.load(live, good))
    # 5b. a Stateful's load_state_dict fails on rank 1 only (after every byte arrived):
    # every rank must raise, not rank 0 return as if loaded
    class Picky:
        def state_dict(self):
            return {"pos": 0}

        def load_state_dict(self, sd):
            if rank == 1:
                raise ValueError(f"position {sd['pos']} is past the end of this rank's shard list")

    outlast.save({"w": torch.ones(3, 4), "data": Picky()}, os.path.join(root, "picky"))
    out["load_stateful"] = _catch(lambda: outlast.load({"w": torch.zeros(3, 4), "data": Picky()}, os.path.join(root, "picky")))
    # 5c. a good load opens each data file's header on one rank only (split across ranks)
    import outlast.reader as reader_mod

    real_header, opened = reader_mod.read_header, []
    reader_mod.read_header = lambda p: opened.append(os.path.basename(p)) or real_header(p)
    try:
        outlast.load({"w": torch.zeros(3, 4), "v": torch.zeros(50, 4), "step": 0}, good)
    finally:
        reader_mod.read_header = real_header
    out["headers_opened"] = opened
    out["data_files"] = sorted(os.listdir(os.path.join(good, "data")))
    # 6. a missing writer file
    torch.distributed.barrier()
    if rank == 0:
        os.remove(os.path.join(good, "data", "w00001.safetensors"))
    torch.distributed.barrier()
    live = {"w": torch.zeros(3, 4), "v": torch.zeros(50, 4), "step": 0}
    out["missing_file"] = _catch(lambda: outlast.load(live, good))
    # 7. the plan cache: same layout twice hits, a changed layout re-plans
    p1 = outlast.prepare_save(base)
    p2 = outlast.prepare_save({"w": base["w"] * 2, "step": 2})
    p3 = outlast.prepare_save({"w": torch.zeros(3, 4), "u": torch.zeros(2), "step": 2} if rank == 0 else {"w": torch.zeros(3, 4), "step": 2})
    out["cache"] = [p1.plan_cached, p2.plan_cached, p3.plan_cached]
    outlast.persist(p2, os.path.join(root, "cached"))
    if rank == 0:
        out["cached_ok"] = torch.equal(outlast.read(os.path.join(root, "cached"))["w"], base["w"] * 2)
    return out


if __name__ == "__main__":
    case, world, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    spawn({"errors": errors_job}[case], world, out, *sys.argv[4:])

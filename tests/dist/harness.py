"""Launch real multi-process jobs (gloo, CPU) for the distributed tests.

Each job is a fresh ``python -m tests.dist.<module> <case> <world> <args...>`` process
that spawns ``world`` ranks with ``torch.multiprocessing`` and a ``file://`` rendezvous
(no TCP port, so parallel test runs cannot collide). The job has a hard timeout and its
whole process group is killed on expiry, so a hang fails the test instead of the CI run.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
JOB_TIMEOUT = 180
PG_TIMEOUT = datetime.timedelta(seconds=60)


def run_job(module: str, case: str, world: int, *args: str, timeout: int = JOB_TIMEOUT, _retried: bool = False) -> list[dict]:
    """Run a job; return each rank's JSON result (rank order). Raises on failure/timeout."""
    out = tempfile.mkdtemp(prefix="outlast-job-")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.abspath(SRC) + os.pathsep + os.path.abspath(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", f"tests.dist.{module}", case, str(world), out, *args]
    p = subprocess.Popen(cmd, env=env, cwd=os.path.abspath(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        raise AssertionError(f"job {case} (world {world}) timed out after {timeout}s:\n{log.decode()[-4000:]}")
    if p.returncode != 0 and b"terminate called without an active exception" in log and not _retried:
        # A rare abort of a gloo rank seen once in CI (std::terminate, SIGABRT; not reproduced
        # in 8 further runs). Run the job once more on fresh directories, and say so: a real
        # failure fails twice. Tracked in the stop-16 note as a bug to find.
        print(f"outlast harness: job {case} (world {world}) aborted in gloo; running it once more", file=sys.stderr)
        for a in args:
            if os.path.isdir(a) and os.path.realpath(a).startswith(os.path.realpath(tempfile.gettempdir())):
                shutil.rmtree(a)
                os.makedirs(a)
        return run_job(module, case, world, *args, timeout=timeout, _retried=True)
    if p.returncode != 0:
        raise AssertionError(f"job {case} (world {world}) failed with {p.returncode}:\n{log.decode()[-6000:]}")
    results = []
    for r in range(world):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


def _entry(rank: int, world: int, init: str, out: str, fn, args) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=PG_TIMEOUT)
    torch.set_num_threads(1)
    result = fn(rank, world, *args)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result if result is not None else {}, f)
    dist.barrier()
    dist.destroy_process_group()


def spawn(fn, world: int, out: str, *args) -> None:
    """Inside a job: run ``fn(rank, world, *args)`` on ``world`` ranks; each returns a JSON dict."""
    init = "file://" + os.path.join(tempfile.mkdtemp(prefix="outlast-rdzv-"), "store")
    mp.spawn(_entry, args=(world, init, out, fn, args), nprocs=world, join=True)

"""Launch real multi-process jobs (gloo, CPU) for the distributed tests.

Each job is a fresh ``python -m tests.dist.<module> <case> <world> <args...>`` process
that spawns ``world`` ranks with ``torch.multiprocessing`` and a ``file://`` rendezvous
(no TCP port, so parallel test runs cannot collide). The job has a hard timeout and its
whole process group is killed on expiry, so a hang fails the test instead of the CI run.
"""

from __future__ import annotations

import datetime
import gc
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


def run_job(module: str, case: str, world: int, *args: str, timeout: int = JOB_TIMEOUT) -> list[dict]:
    """Run a job; return each rank's JSON result (rank order). Raises on failure/timeout."""
    out = tempfile.mkdtemp(prefix="outlast-job-")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.abspath(SRC) + os.pathsep + os.path.abspath(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    # A rank that aborts in C++ (SIGABRT, SIGSEGV) prints every thread's Python stack.
    env["PYTHONFAULTHANDLER"] = "1"
    cmd = [sys.executable, "-m", f"tests.dist.{module}", case, str(world), out, *args]
    p = subprocess.Popen(cmd, env=env, cwd=os.path.abspath(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        raise AssertionError(f"job {case} (world {world}) timed out after {timeout}s:\n{log.decode()[-4000:]}")
    if p.returncode != 0:
        done = sorted(f for f in os.listdir(out) if f.endswith(".json"))
        raise AssertionError(
            f"job {case} (world {world}) failed with {p.returncode} (results written by: {done or 'no rank'}):\n"
            f"{log.decode()[-6000:]}"
        )
    results = []
    for r in range(world):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            results.append(json.load(f))
    shutil.rmtree(out, ignore_errors=True)  # kept above when the job failed, for inspection
    return results


def _entry(rank: int, world: int, init: str, out: str, fn, args) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=PG_TIMEOUT)
    torch.set_num_threads(1)
    result = fn(rank, world, *args)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result if result is not None else {}, f)
    # Free the job's objects (modules, DDP reducers, meshes: cycles that hold process
    # groups) while the interpreter is fully alive, then leave without finalizing it.
    # Interpreter teardown is where torch's gloo worker threads can still be releasing a
    # finished collective's tensors: their decref takes the GIL, which a finalizing
    # Python 3.11 answers with pthread_exit, and the unwind through a noexcept
    # destructor aborts the rank with "terminate called without an active exception"
    # (pytorch/pytorch#190489; seen here in 2 of ~10 clean-clone CI runs). The results
    # are on disk and every collective is done, so nothing is lost by skipping teardown;
    # a failure inside fn still exits through torch's own error path.
    leave()


def leave() -> None:
    """End a rank whose results are on disk: free cycles, a last barrier, destroy the group,
    then exit without finalizing the interpreter (see ``_entry`` for why)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world: int, out: str, *args) -> None:
    """Inside a job: run ``fn(rank, world, *args)`` on ``world`` ranks; each returns a JSON dict."""
    rdzv = tempfile.mkdtemp(prefix="outlast-rdzv-")
    try:
        mp.spawn(_entry, args=(world, "file://" + os.path.join(rdzv, "store"), out, fn, args), nprocs=world, join=True)
    finally:
        shutil.rmtree(rdzv, ignore_errors=True)

"""Run a command under a memory limit: a child cgroup (v2 ``memory.max`` or v1
``memory.limit_in_bytes``) with swap off, created and removed around one process.

The memory proof of the offload tier (tests/e2e/test_offload_memory.py, bench/offload.py)
needs a limit the kernel enforces, page cache included, on this process tree only. That
needs root (or a delegated cgroup); :func:`find_memory_cgroup_root` says why not when it
cannot, and callers fail with that reason rather than skip.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from dataclasses import dataclass
from typing import Sequence

__all__ = ["LimitedRun", "find_memory_cgroup_root", "run_limited"]


def _own_path(controller: str | None) -> str:
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if (controller is None and ctrls == "") or (controller and controller in ctrls.split(",")):
                return path
    return "/"


def find_memory_cgroup_root() -> tuple[str, int]:
    """A directory where a child memory cgroup can be made, and the cgroup version (1 or 2).

    Raises:
        RuntimeError: no writable memory controller, with the reason.
    """
    reasons = []
    v2 = "/sys/fs/cgroup"
    if os.path.exists(os.path.join(v2, "cgroup.controllers")):
        parent = os.path.join(v2, _own_path(None).lstrip("/"))
        parent = os.path.dirname(parent.rstrip("/")) if parent.rstrip("/") != v2 else v2
        try:
            ctrls = open(os.path.join(parent, "cgroup.subtree_control")).read().split()
        except OSError as e:
            ctrls = []
            reasons.append(f"cgroup v2 at {parent}: {e}")
        if "memory" in ctrls and os.access(parent, os.W_OK):
            return parent, 2
        reasons.append(f"cgroup v2 at {parent}: memory controller not enabled for children or not writable")
    v1 = "/sys/fs/cgroup/memory"
    if os.path.isdir(v1):
        parent = os.path.join(v1, _own_path("memory").lstrip("/"))
        if os.path.isdir(parent) and os.access(parent, os.W_OK):
            return parent, 1
        if os.access(v1, os.W_OK):
            return v1, 1
        reasons.append(f"cgroup v1 at {v1}: not writable (run as root)")
    else:
        reasons.append("no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    raise RuntimeError("cannot create a memory-limited cgroup: " + "; ".join(reasons))


@dataclass
class LimitedRun:
    """What :func:`run_limited` saw: exit code, output, the cgroup's peak usage and OOM kills."""

    returncode: int
    output: str
    limit_bytes: int
    peak_bytes: int
    oom_kills: int
    seconds: float


def _read_int(path: str, key: str | None = None) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            if key is None:
                return int(f.read().split()[0])
            for line in f:
                k, v = line.split()[:2]
                if k == key:
                    return int(v)
    except (OSError, ValueError, IndexError):
        pass
    return -1


def run_limited(cmd: Sequence[str], limit_bytes: int, *, env: dict | None = None, timeout_s: float = 600,
                cwd: str | None = None) -> LimitedRun:
    """Run ``cmd`` in a fresh child cgroup limited to ``limit_bytes`` (swap off); remove it after.

    Args:
        cmd: the command (its whole process tree is limited).
        limit_bytes: memory limit, page cache included.
        env, cwd: for the process.
        timeout_s: the process is killed after this long.

    Returns:
        A :class:`LimitedRun`.

    Example:
        >>> r = run_limited(["python", "-c", "print(1)"], 256 << 20)  # doctest: +SKIP
        >>> r.returncode, r.oom_kills  # doctest: +SKIP
        (0, 0)
    """
    parent, version = find_memory_cgroup_root()
    cg = os.path.join(parent, f"outlast-{os.getpid()}-{secrets.token_hex(3)}")
    os.mkdir(cg)
    try:
        if version == 2:
            open(os.path.join(cg, "memory.max"), "w").write(str(limit_bytes))
            if os.path.exists(os.path.join(cg, "memory.swap.max")):
                open(os.path.join(cg, "memory.swap.max"), "w").write("0")
        else:
            open(os.path.join(cg, "memory.limit_in_bytes"), "w").write(str(limit_bytes))
            sw = os.path.join(cg, "memory.memsw.limit_in_bytes")
            if os.path.exists(sw):
                open(sw, "w").write(str(limit_bytes))
        procs = os.path.join(cg, "cgroup.procs")

        def enter() -> None:  # in the child, before exec: the whole tree starts inside the limit
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        t0 = time.time()
        p = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=enter, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            out, _ = p.communicate()
        seconds = time.time() - t0
        if version == 2:
            peak = _read_int(os.path.join(cg, "memory.peak"))
            ooms = _read_int(os.path.join(cg, "memory.events"), "oom_kill")
        else:
            peak = _read_int(os.path.join(cg, "memory.max_usage_in_bytes"))
            ooms = _read_int(os.path.join(cg, "memory.oom_control"), "oom_kill")
        return LimitedRun(p.returncode, out.decode(errors="replace"), limit_bytes, peak, ooms, seconds)
    finally:
        for _ in range(50):
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.1)

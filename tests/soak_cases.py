"""kill -9 soak: saves cut at every kind of moment must never lose or corrupt a checkpoint.

Used by tests/e2e/test_soak.py (a few dozen trials) and bench/soak.py (1,000). One parent
process forks a child per trial (fork keeps trials cheap: torch is imported once). The
child replaces a committed checkpoint, and dies in one of these ways:

* ``kill@<event>``: SIGKILL at the k-th call of ``mkdir``/``open``/``write``/``fsync``/
  ``rename``/``unlink``/``rmdir`` of the save (k drawn over the whole save, so kill
  points spread over staging-directory creation, writing, fsync, rename and cleanup);
* ``fault@<event>``: that call fails with ENOSPC or EIO instead (a full or failing disk),
  the save raises, the child exits;
* ``timer``: SIGKILL at a random moment of an asynchronous ``Checkpointer`` save
  (the staging copy in the background, persist, commit, retention).

Save modes: ``save`` (overwrite with RENAME_EXCHANGE), ``save-nfs`` (overwrite where the
filesystem has no exchange: two renames) and ``checkpointer`` (a new step every trial,
``keep_last=2``). After each trial the parent checks, in this process: the checkpoint
loads (a ``.old-`` copy left between two renames is recovered), its data is bit-exact one
of the states that were saved, and it is not older than the last one known committed.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import time

import torch

import outlast

EVENTS = ("mkdir", "open", "write", "fsync", "rename", "unlink", "rmdir")
MODES = ("save", "save-nfs", "checkpointer")


def state_for(value: int) -> dict:
    """The state of version ``value``: every element derived from it, so a mix is visible."""
    base = torch.arange(64 * 1024, dtype=torch.float32) + value * 1_000_003.0
    return {"model": {"w": base.reshape(256, 256), "b": base[:1000].to(torch.float64) * -1}, "version": value}


def value_of(got: dict) -> int | None:
    """The version a loaded state is bit-exactly, or None if it is no saved version."""
    v = got.get("version")
    if not isinstance(v, int):
        return None
    want = state_for(v)
    for k in ("w", "b"):
        a, b = got["model"][k], want["model"][k]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            return None
    return v


class _Tripwire:
    """Counts the child's file-system calls; at call ``at`` it kills the process or fails it."""

    def __init__(self, at: int, action: str, err: int):
        self.n = 0
        self.at = at
        self.action = action
        self.err = err
        self.kinds: dict[str, int] = {}

    def wrap(self, name: str, fn):
        def call(*a, **kw):
            self.n += 1
            self.kinds[name] = self.kinds.get(name, 0) + 1
            if self.n == self.at:
                if self.action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(self.err, os.strerror(self.err), str(a[0]) if a else "")
            return fn(*a, **kw)

        return call

    def install(self) -> None:
        for name in EVENTS:
            setattr(os, name, self.wrap(name, getattr(os, name)))


def _child(mode: str, root: str, value: int, trip: _Tripwire | None) -> None:
    from outlast.storage import commit

    if mode == "save-nfs":
        commit._exchange = lambda a, b: False
    if trip is not None:
        trip.install()
    try:
        if mode == "checkpointer":
            with outlast.Checkpointer(root, keep_last=2) as ck:
                ck.save(state_for(value), value)
                ck.wait()
        else:
            outlast.save(state_for(value), os.path.join(root, "ck"), overwrite=True, num_writers=2)
    except OSError:
        pass  # an injected fault: the save fails, the process goes on
    except outlast.errors.CheckpointError:
        pass


def _seed(mode: str, d: str, steps: int) -> None:
    """Commit versions 0..steps-1 in ``d`` the way ``mode`` does."""
    os.makedirs(d, exist_ok=True)
    for v in range(steps):
        if mode == "checkpointer":
            with outlast.Checkpointer(d, keep_last=2) as ck:
                ck.save(state_for(v), v)
                ck.wait()
        else:
            outlast.save(state_for(v), os.path.join(d, "ck"), num_writers=2, overwrite=True)


def count_events(mode: str, root: str, value: int) -> int:
    """How many file-system calls one save of ``mode`` makes over a committed one (in a child)."""
    _seed(mode, root, 2)  # an overwrite (and, for the Checkpointer, a retention deletion)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        trip = _Tripwire(at=-1, action="kill", err=0)
        _child(mode, root, value, trip)
        os.write(w, str(trip.n).encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return int(data)


def newest(mode: str, root: str) -> tuple[int | None, str]:
    """(version loaded, how) for the checkpoint a restart would load."""
    if mode == "checkpointer":
        rows = [r for r in outlast.reader.list_checkpoints(root) if r["status"] == "committed"]
        if not rows:
            return None, "no committed step"
        path = max(rows, key=lambda r: r["step"])["path"]
    else:
        path = os.path.join(root, "ck")
    got = outlast.read(path)
    return value_of(got), path


def run(trials: int, seed: int, root: str, *, timeout: float = 60.0, log=None) -> dict:
    """Run ``trials`` trials under ``root``; return counts. ``wrong`` and ``lost`` must be 0."""
    torch.set_num_threads(1)  # forked children must not inherit a busy OpenMP pool
    rnd = random.Random(seed)
    dirs = {m: os.path.join(root, m) for m in MODES}
    known = {}
    for m, d in dirs.items():
        shutil.rmtree(d, ignore_errors=True)
        _seed(m, d, 1)
        known[m] = 0
    events = {m: count_events(m, os.path.join(root, "probe-" + m), 2) for m in MODES}
    for m in MODES:
        shutil.rmtree(os.path.join(root, "probe-" + m), ignore_errors=True)
    counts = {"trials": 0, "killed": 0, "faulted": 0, "completed": 0, "wrong": 0, "lost": 0,
              "recovered_old": 0, "loaded_new": 0, "loaded_old": 0, "by_kind": {}, "events_per_save": events}
    save_secs = []
    for i in range(trials):
        mode = MODES[i % len(MODES)]
        d = dirs[mode]
        value = known[mode] + 1
        kind = rnd.choice(["kill", "kill", "fault", "timer"]) if mode == "checkpointer" else rnd.choice(["kill", "kill", "fault"])
        at = rnd.randint(1, events[mode])
        trip = None if kind == "timer" else _Tripwire(at, kind, rnd.choice([errno.ENOSPC, errno.EIO]))
        before_old = any(".old-" in n for n in os.listdir(d))
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                _child(mode, d, value, trip)
            finally:
                os._exit(0)
        if kind == "timer":
            time.sleep(rnd.uniform(0, max(save_secs[-20:] or [0.05]) * 1.2))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise RuntimeError(f"trial {i} ({mode}, {kind}@{at}) hung for {timeout} s")
            time.sleep(0.002)
        secs = time.perf_counter() - t0
        killed = os.WIFSIGNALED(status)
        if not killed and kind != "fault":
            save_secs.append(secs)
        label = f"{kind}" + ("" if trip is None else f"@{at}")
        counts["trials"] += 1
        counts["killed" if killed else ("faulted" if kind == "fault" else "completed")] += 1
        key = f"{mode}:{kind}"
        counts["by_kind"][key] = counts["by_kind"].get(key, 0) + 1
        has_old = any(".old-" in n for n in os.listdir(d))
        try:
            got, where = newest(mode, d)
        except outlast.errors.CheckpointError as e:
            counts["lost"] += 1
            if log:
                log(f"LOST trial {i} {mode} {label}: {e}")
            continue
        if got is None:
            counts["wrong"] += 1
            if log:
                log(f"WRONG trial {i} {mode} {label}: {where} loaded data that was never saved")
            continue
        if got not in (known[mode], value) or got < known[mode]:
            counts["lost"] += 1
            if log:
                log(f"LOST trial {i} {mode} {label}: loaded version {got}, last committed was {known[mode]}")
            continue
        counts["recovered_old"] += int(has_old and not before_old and got == known[mode])
        counts["loaded_new" if got == value else "loaded_old"] += 1
        known[mode] = got
    return counts

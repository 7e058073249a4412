"""``Checkpointer``: steps, near-zero-stall asynchronous saves, tiers, retention, resume.

The manager over the functional core. It names checkpoints ``step-00001200`` under one
directory, saves them in the background (:mod:`outlast.engine`), copies them to an
optional remote tier, deletes old ones by a retention rule, and restores the newest
checkpoint that is actually valid, falling back past incomplete or corrupt ones.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .api import load, persist, prepare_flat, prepare_save
from .tree import flatten
from .engine import PHASE_FORWARD, PHASE_OPTIM, Engine, Job, StagingBuffers, find_owners, phase_of_items
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    UnsupportedFormatError,
)
from .reader import open_manifest
from .storage.local import is_temp_name, remove_tree
from .storage.remote import STEP_DIR, RemoteTier

log = logging.getLogger("outlast")

__all__ = ["Checkpointer", "SaveMetrics", "plan_retention", "step_dir_name"]

IF_BUSY = ("wait", "skip")
# Failures that make a checkpoint unusable (restore falls back past them). A state
# that does not match (IncompatibleStateError) is the caller's problem and is raised.
_BAD_CHECKPOINT = (CorruptCheckpointError, IncompleteCheckpointError, UnsupportedFormatError, StorageError)


def step_dir_name(step: int) -> str:
    """``step-00001200``: zero-padded so that ``ls`` sorts checkpoints by step."""
    return f"step-{step:08d}"


@dataclass
class SaveMetrics:
    """What one :meth:`Checkpointer.save` cost. Times in seconds.

    ``stall_s`` is the training thread's loss: ``save_call_s`` (time inside ``save()``,
    including ``backpressure_s`` spent waiting for an earlier save) plus ``blocked_s``
    (time hooks and :meth:`Checkpointer.wait_staged` blocked on this save's copy).
    ``persist_s`` covers writing, fsync, manifest and the atomic rename (the commit).
    """

    step: int
    path: str
    skipped: bool = False
    done: bool = False
    save_call_s: float = 0.0
    backpressure_s: float = 0.0
    blocked_s: float = 0.0
    stage_s: float = 0.0
    persist_s: float = 0.0
    retention_s: float = 0.0
    upload_s: float = 0.0
    nbytes: int = 0
    error: str | None = None

    @property
    def stall_s(self) -> float:
        return self.save_call_s + self.blocked_s

    @property
    def throughput_bytes_per_s(self) -> float:
        busy = self.stage_s + self.persist_s
        return self.nbytes / busy if busy > 0 else 0.0


def plan_retention(valid: list[int], invalid: list[int], *, keep_last: int | None, keep_every: int | None) -> list[int]:
    """Steps to delete. Pure.

    Keeps the newest valid step always, the ``keep_last`` newest valid steps, and every
    valid step divisible by ``keep_every``; with ``keep_last=None`` keeps every valid one.
    Invalid checkpoints (incomplete, corrupt) older than the newest valid one are
    deleted; newer invalid ones are left for a person to look at. With no valid
    checkpoint nothing is deleted.

    Example:
        >>> plan_retention([100, 200, 300, 400], [], keep_last=2, keep_every=200)
        [100]
    """
    if not valid:
        return []
    vs = sorted(set(valid))
    newest = vs[-1]
    doomed = {s for s in invalid if s < newest and s not in vs}
    if keep_last is not None:
        keep = {newest, *vs[-keep_last:]}
        if keep_every:
            keep |= {s for s in vs if s % keep_every == 0}
        doomed |= {s for s in vs if s not in keep}
    return sorted(doomed)


def check_local(path: str):
    """Cheap validity check: a well-formed manifest and every data file at its size."""
    m = open_manifest(path)
    for rel, size in m.files.items():
        p = os.path.join(path, rel)
        try:
            actual = os.path.getsize(p)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{p} is missing: checkpoint {path} is damaged") from None
        if actual != size:
            raise CorruptCheckpointError(f"{p} has {actual} bytes, the manifest says {size}: checkpoint {path} is damaged")
    return m


class Checkpointer:
    """Periodic checkpoints of training state under one directory, saved in the background.

    Example::

        ckpt = outlast.Checkpointer("runs/exp1", keep_last=3)
        state = {"model": model, "optim": optimizer, "sched": scheduler, "data": loader_state}
        start = ckpt.restore(state)          # latest valid checkpoint, in place; its step or None
        for step in range((start or -1) + 1, total):
            train_step()
            if step % 50 == 0:
                ckpt.save(step, state)       # returns at once
        ckpt.close()                         # waits for saves in flight; raises if one failed

    **The consistency rule.** ``save()`` captures plain values (step, data position,
    scheduler counters, JSON in general) and the plan synchronously, then copies tensors
    into reusable host buffers on a background thread, in this order: module buffers,
    then every tensor an optimizer of the state updates (its parameters and its state),
    then the rest. Until a tensor is copied it must not change. outlast enforces that for
    the usual mutations: a forward pre-hook on each module in the state waits for the
    buffers, and a step pre-hook on each optimizer in the state (found directly or
    inside Stateful wrappers) waits for the parameters and optimizer state. Anything
    else that changes a saved tensor in place (your own tensors, ``param.data = ...``,
    a second optimizer not in the state) must call :meth:`wait_staged` first. Tensors
    that ``state_dict()`` creates fresh (RNG states) are safe.

    **Background work.** Staging and persistence run on two threads. The copy runs at
    normal priority (the step hook may wait for it) on one core through GIL-free
    ``memmove`` in 4 MiB chunks, into buffers laid out as the shard files; persistence
    runs at low priority (``nice``), checksums those buffers in place and writes them
    with O_DIRECT (no page-cache copy; buffered where the filesystem refuses it) to
    ``num_writers`` files (default 1), so the training's own intra-op threads keep the
    cores. bench/stall.py measures the result against DCP's ``async_save``.

    **Back-pressure.** At most ``max_in_flight`` saves are in progress (staged, persisted,
    uploaded). A save requested beyond that waits for the oldest (``if_busy="wait"``;
    the wait counts as stall) or is dropped (``if_busy="skip"``; ``metrics`` records it
    with ``skipped=True`` and a warning is logged).

    **Failures.** An error in the background (disk full, I/O error, remote failure) is
    raised as a :class:`~outlast.errors.StorageError` (or ``CheckpointError``) by the next
    ``save``, ``wait`` or ``close``, naming the step and the cause. Nothing partial is
    committed: the previous checkpoint stays the latest valid one.

    **Concurrency contract.** NOT thread-safe: call it from the training thread only.
    IS multi-process-safe under torch.distributed: every rank builds one (collectively)
    with the same arguments over a directory all ranks share; rank 0 alone applies
    retention and remote tiers.

    Args:
        directory: local folder holding ``step-NNNNNNNN`` checkpoints (created).
        keep_last: keep this many newest valid checkpoints (None: keep all).
        keep_every: also keep, forever, every checkpoint whose step is a multiple of this.
        remote: fsspec URL of a remote tier (``s3://bucket/exp1``, ``file:///mnt/x``,
            ``memory://x``); each local commit is uploaded to it in the background.
        remote_options: storage options for the remote filesystem.
        max_in_flight: saves allowed in progress at once (each holds one set of buffers).
        if_busy: ``"wait"`` or ``"skip"`` when ``max_in_flight`` saves are in progress.
        num_writers: shard files written in parallel per save.
        verify: check every chunk's checksum when restoring.
        nice: scheduling niceness added to the persist thread (0 to disable).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        remote: str | None = None,
        remote_options: dict | None = None,
        max_in_flight: int = 1,
        if_busy: str = "wait",
        num_writers: int = 1,
        verify: bool = True,
        nice: int = 10,
    ) -> None:
        if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive integer or None, got {keep_last!r}")
        if keep_every is not None and (not isinstance(keep_every, int) or isinstance(keep_every, bool) or keep_every < 1):
            raise ValueError(f"keep_every must be a positive integer or None, got {keep_every!r}")
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")
        if if_busy not in IF_BUSY:
            raise ValueError(f"if_busy must be one of {IF_BUSY}, got {if_busy!r}")
        if not isinstance(num_writers, int) or num_writers < 1:
            raise ValueError(f"num_writers must be an integer >= 1, got {num_writers!r}")
        if not isinstance(nice, int) or not 0 <= nice <= 19:
            raise ValueError(f"nice must be an integer from 0 to 19, got {nice!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.max_in_flight = max_in_flight
        self.if_busy = if_busy
        self.num_writers = num_writers
        self.verify = verify
        self.metrics: list[SaveMetrics] = []

        self._pg = None
        self._ctl = None
        self.rank, self.world_size = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            import torch.distributed as dist

            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            # Background collectives need their own CPU group: they run while the
            # training thread uses the default group, and gloo works on host buffers.
            self._pg = dist.new_group(backend="gloo")
            # A second one for the training thread's own agreements (skip, restore).
            self._ctl = dist.new_group(backend="gloo")
        self.remote = RemoteTier(remote, **(remote_options or {})) if remote else None

        os.makedirs(self.directory, exist_ok=True)
        if self.rank == 0:
            self._clean_leftovers()
        self._barrier()

        self._engine = Engine(nice=nice)
        self._free: list[StagingBuffers] = [StagingBuffers() for _ in range(max_in_flight)]
        self._inflight: list[Job] = []
        self._errors: list[tuple[int, BaseException]] = []
        self._lock = threading.Lock()
        self._hooks: dict[int, Any] = {}
        self._closed = False

    # ------------------------------------------------------------------ helpers
    def _pg_kw(self, background: bool = False) -> dict:
        # The training thread's collectives (prepare_save, load, agreements) and the
        # persist thread's run on different groups, so they can never pair up wrongly.
        if self._pg is None:
            return {}
        return {"process_group": self._pg if background else self._ctl}

    def _barrier(self) -> None:
        if self._ctl is not None:
            torch.distributed.barrier(group=self._ctl)

    def path_of(self, step: int) -> str:
        """The local folder of ``step``'s checkpoint."""
        return os.path.join(self.directory, step_dir_name(step))

    def _clean_leftovers(self) -> None:
        for name in os.listdir(self.directory):
            p = os.path.join(self.directory, name)
            final = name[1:].split(".old-")[0] if ".old-" in name else None
            if is_temp_name(name) or (final is not None and os.path.isdir(os.path.join(self.directory, final))):
                log.info("outlast: removing leftover %s of an interrupted save", p)
                remove_tree(p)

    def _register_hooks(self, state: dict) -> tuple[list, list]:
        optimizers, modules = find_owners(state)
        for o in optimizers:
            if id(o) not in self._hooks:
                self._hooks[id(o)] = o.register_step_pre_hook(self._optim_hook)
        for m in modules:
            if id(m) not in self._hooks:
                self._hooks[id(m)] = m.register_forward_pre_hook(self._forward_hook)
        return optimizers, modules

    def _optim_hook(self, optimizer, args, kwargs) -> None:
        self._engine.wait_phase(PHASE_OPTIM)

    def _forward_hook(self, module, args) -> None:
        self._engine.wait_phase(PHASE_FORWARD)

    def _raise_pending(self) -> None:
        with self._lock:
            if not self._errors:
                return
            step, e = self._errors.pop(0)
        latest = self.latest_step()
        keep = f"the latest valid checkpoint is still step {latest}" if latest is not None else "no checkpoint is committed yet"
        msg = (
            f"background save of step {step} to {self.path_of(step)} failed: {e}. "
            f"Nothing of it was committed; {keep}. Fix the cause (free disk space, check "
            "permissions or the remote) and save again."
        )
        if isinstance(e, OSError):
            raise StorageError(msg) from e
        raise CheckpointError(msg) from e

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: dict) -> bool:
        """Start saving ``state`` as checkpoint ``step``; returns at once.

        Returns False if the save was skipped (``if_busy="skip"`` and saves in flight).
        Raises the error of an earlier background save, if one failed, before starting.
        """
        if self._closed:
            raise CheckpointError("this Checkpointer is closed; create a new one to save")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        t0 = time.perf_counter()
        self._raise_pending()
        m = SaveMetrics(step, self.path_of(step))
        busy = len(self._inflight) >= self.max_in_flight
        if self._ctl is not None and self.if_busy == "skip":
            # Every rank must make the same choice, or collectives would pair wrongly.
            flag = torch.tensor([int(busy)])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._ctl)
            busy = bool(flag.item())
        if busy and self.if_busy == "skip":
            m.skipped = m.done = True
            m.save_call_s = time.perf_counter() - t0
            self.metrics.append(m)
            log.warning("outlast: skipped saving step %d: %d save(s) still in flight (if_busy='skip')", step, len(self._inflight))
            return False
        while len(self._inflight) >= self.max_in_flight:
            tb = time.perf_counter()
            self._inflight[0].done.wait()
            m.backpressure_s += time.perf_counter() - tb
        self._raise_pending()

        optimizers, modules = self._register_hooks(state)
        if self._pg is None:
            # One process: only flatten here (state_dict() calls and plain values belong
            # to this moment); planning runs first thing on the staging thread.
            flat = flatten(state)
            nw = self.num_writers

            def prepare() -> tuple:
                prepared = prepare_flat(flat, num_writers=nw)
                return prepared, phase_of_items(prepared, optimizers, modules)

            job = Job(step, None, [], self._free.pop(), self._persist_job, self._job_done, metrics=m,
                      prepare=prepare, has_cuda=any(leaf.value.device.type == "cuda" for leaf in flat.tensors.values()
                                                    if isinstance(leaf.value, torch.Tensor)))
            if not any(True for mod in modules for _ in mod.buffers()):
                job.phase_done[PHASE_FORWARD].set()  # nothing a forward pass mutates: never wait
        else:
            # Distributed: planning is collective, so it stays on this thread, where every
            # rank reaches it in the same order (a rank failing to flatten fails all).
            prepared = prepare_save(state, num_writers=self.num_writers, **self._pg_kw())
            m.nbytes = prepared.nbytes
            job = Job(step, prepared, phase_of_items(prepared, optimizers, modules), self._free.pop(),
                      self._persist_job, self._job_done, metrics=m)
        self._inflight.append(job)
        self.metrics.append(m)
        self._engine.submit(job)
        m.save_call_s = time.perf_counter() - t0
        return True

    def _persist_job(self, job: Job) -> None:
        m: SaveMetrics = job.metrics
        path = self.path_of(job.step)
        t0 = time.perf_counter()
        persist(job.prepared, path, step=job.step, overwrite=True, **self._pg_kw(background=True))
        m.persist_s = time.perf_counter() - t0
        try:
            if self.rank == 0:
                t1 = time.perf_counter()
                self._apply_retention_local()
                m.retention_s = time.perf_counter() - t1
                if self.remote is not None:
                    t2 = time.perf_counter()
                    self.remote.upload(path)
                    self._apply_retention_remote()
                    m.upload_s = time.perf_counter() - t2
        finally:
            if self._pg is not None:
                # A save is "done" on every rank only once rank 0 has applied retention and
                # uploaded: wait() then means the same on all ranks (steps() agrees).
                torch.distributed.barrier(group=self._pg)

    def _job_done(self, job: Job) -> None:
        m: SaveMetrics = job.metrics
        m.stage_s = job.stage_s
        m.blocked_s = job.blocked_s
        m.done = True
        with self._lock:
            if job in self._inflight:
                self._inflight.remove(job)
            self._free.append(job.buffers)
            if job.error is not None:
                m.error = f"{type(job.error).__name__}: {job.error}"
                self._errors.append((job.step, job.error))
        if job.error is not None:
            log.error("outlast: saving step %d failed: %s", job.step, m.error)
        else:
            log.info(
                "outlast: saved step %d (%.1f MiB): stall %.1f ms (blocked %.1f ms), stage %.3f s, "
                "persist %.3f s, %.0f MiB/s",
                job.step, m.nbytes / 2**20, m.stall_s * 1e3, m.blocked_s * 1e3, m.stage_s, m.persist_s,
                m.throughput_bytes_per_s / 2**20,
            )

    @property
    def last_metrics(self) -> SaveMetrics | None:
        """Metrics of the most recent save request (``done`` says whether it finished)."""
        return self.metrics[-1] if self.metrics else None

    def wait_staged(self) -> None:
        """Block until every save in flight has copied all its tensors; after this the
        live state may change freely. The time blocked counts as the save's stall."""
        for job in list(self._inflight):
            if not job.staged():
                t0 = time.perf_counter()
                job.phase_done[-1].wait()
                job.blocked_s += time.perf_counter() - t0

    def wait(self) -> None:
        """Block until every save in flight is committed (and uploaded); raise the first
        background error, if any."""
        for job in list(self._inflight):
            job.done.wait()
        self._raise_pending()

    def close(self) -> None:
        """Wait for saves in flight, stop the background threads, remove the hooks.
        Raises the error of a failed background save. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for job in list(self._inflight):
                job.done.wait()
        finally:
            self._engine.close()
            for h in self._hooks.values():
                h.remove()
            self._hooks.clear()
        self._raise_pending()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:  # an exception is already on its way; do not mask it
                self.close()
            except CheckpointError as e:
                log.error("outlast: while closing after an error: %s", e)

    # ------------------------------------------------------------------ listing and retention
    def _local_steps(self) -> tuple[list[int], list[int]]:
        valid, invalid = [], []
        for name in os.listdir(self.directory):
            mt = STEP_DIR.match(name)
            if not mt:
                continue
            try:
                check_local(os.path.join(self.directory, name))
                valid.append(int(mt.group(1)))
            except CheckpointError:
                invalid.append(int(mt.group(1)))
        return sorted(valid), sorted(invalid)

    def _remote_steps(self) -> tuple[list[int], list[int]]:
        valid, invalid = [], []
        for name in self.remote.names():
            s = int(STEP_DIR.match(name).group(1))
            try:
                self.remote.manifest(name)
                valid.append(s)
            except CheckpointError:
                invalid.append(s)
        return sorted(valid), sorted(invalid)

    def steps(self) -> list[int]:
        """Steps of the valid local checkpoints (manifest well formed, files at their
        sizes; checksums are checked only when one is loaded), oldest first."""
        return self._local_steps()[0]

    def latest_step(self) -> int | None:
        """The newest valid local checkpoint's step, or None."""
        valid = self.steps()
        return valid[-1] if valid else None

    def _apply_retention_local(self) -> None:
        valid, invalid = self._local_steps()
        for s in plan_retention(valid, invalid, keep_last=self.keep_last, keep_every=self.keep_every):
            p = self.path_of(s)
            # Rename first: the folder disappears at once, a crash leaves only a .tmp- leftover.
            hidden = os.path.join(self.directory, f".{step_dir_name(s)}.tmp-del{secrets.token_hex(4)}")
            try:
                os.rename(p, hidden)
            except OSError as e:
                log.warning("outlast: retention could not remove %s: %s", p, e)
                continue
            remove_tree(hidden)
            log.info("outlast: retention removed %s", p)

    def _apply_retention_remote(self) -> None:
        valid, invalid = self._remote_steps()
        for s in plan_retention(valid, invalid, keep_last=self.keep_last, keep_every=self.keep_every):
            self.remote.delete(step_dir_name(s))
            log.info("outlast: retention removed %s/%s", self.remote.url, step_dir_name(s))

    # ------------------------------------------------------------------ restoring
    def _candidates(self) -> list[tuple[int, str]]:
        """(step, source) pairs to try, newest step first, local before remote."""
        seen: dict[int, list[str]] = {}
        for name in os.listdir(self.directory):
            mt = STEP_DIR.match(name)
            if mt:
                seen.setdefault(int(mt.group(1)), []).append("local")
        if self.remote is not None:
            for name in self.remote.names():
                seen.setdefault(int(STEP_DIR.match(name).group(1)), []).append("remote")
        return [(s, src) for s in sorted(seen, reverse=True) for src in seen[s]]

    def _agree(self, ok: bool) -> bool:
        if self._ctl is None:
            return ok
        flag = torch.tensor([int(ok)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self._ctl)
        return bool(flag.item())

    def restore(self, state: dict) -> int | None:
        """Load the newest valid checkpoint into ``state`` in place; return its step.

        Tries checkpoints newest first, from the local directory and then the remote
        tier (downloading it into the local directory). One that is incomplete or
        corrupt (no or malformed manifest, a file missing or of the wrong size, a
        checksum that fails) is skipped with a warning naming it. Loads are strict, so
        the checkpoint that finally loads overwrites every tensor and value of ``state``,
        including whatever a failed attempt had already written.

        Returns:
            The restored step, or None if there is no checkpoint at all (``state`` untouched).

        Raises:
            IncompatibleStateError: ``state`` does not match the checkpoint (not skipped:
                an older checkpoint of the same run would not match either).
            CorruptCheckpointError: checkpoints exist but none could be loaded, and a
                failed attempt may have written into ``state``.
        """
        if self._closed:
            raise CheckpointError("this Checkpointer is closed; create a new one to restore")
        self.wait()
        candidates = self._candidates()
        if self._ctl is not None:
            # Rank 0's view decides (ranks may list the shared directory at different moments).
            holder = [candidates]
            torch.distributed.broadcast_object_list(holder, src=0, group=self._ctl)
            candidates = holder[0]
        touched: list[str] = []
        for step, source in candidates:
            path = self.path_of(step)
            where = path if source == "local" else f"{self.remote.url}/{step_dir_name(step)}"
            err: BaseException | None = None
            if source == "remote" and self.rank == 0:
                try:
                    self.remote.manifest(step_dir_name(step))
                    log.info("outlast: downloading %s to %s", where, path)
                    self.remote.download(step_dir_name(step), path)
                except _BAD_CHECKPOINT as e:
                    err = e
            if source == "remote":
                self._barrier()  # every rank reads what rank 0 downloaded
            if err is None:
                try:
                    check_local(path)
                except _BAD_CHECKPOINT as e:
                    err = e
            if self._agree(err is None):
                try:
                    touched.append(where)
                    load(state, path, strict=True, verify=self.verify, **self._pg_kw())
                except _BAD_CHECKPOINT as e:
                    err = e
                if self._agree(err is None):
                    log.info("outlast: restored step %d from %s", step, where)
                    return step
            msg = f"outlast: skipping checkpoint {where}: {err or 'invalid on another rank'}; falling back to an older one"
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        if touched:
            raise CorruptCheckpointError(
                f"no checkpoint under {self.directory} could be loaded (tried {', '.join(touched)}); "
                "a failed attempt may have partly overwritten the live state: rebuild it before training"
            )
        return None

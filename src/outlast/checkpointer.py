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
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .api import load, persist, prepare_flat, prepare_save
from .collective import Group, group_timeout, outlast_class, raise_gathered
from .tree import flatten
from .engine import (
    PHASE_FORWARD, PHASE_OPTIM, Engine, Job, StagingPool, find_owners, hooked_modules, phase_of_items, pin_file_backed,
    release_pins, wait_event,
)
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    UnsupportedFormatError,
)
from .reader import open_manifest
from .storage.commit import recover
from .storage.local import is_temp_name, remove_tree
from .storage.remote import STEP_DIR, RemoteTier, Uploader

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
    """Validity check without reading tensor data: the manifest and every shard file's size
    and header (what opening a checkpoint checks, see ``reader.open_manifest``)."""
    return open_manifest(path)


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

    **Back-pressure.** At most ``max_in_flight`` saves are in progress (staged and
    persisted; each holds one set of staging buffers from a blocking pool). A save
    requested beyond that waits for the oldest to release its buffers
    (``if_busy="wait"``; the wait counts as stall) or is dropped (``if_busy="skip"``;
    ``metrics`` records it with ``skipped=True`` and a warning is logged).

    **Remote tier.** Rank 0 uploads each committed step on a thread and queue of its own,
    so no save waits for the network; a failed upload is retried ``upload_retries``
    times with exponential backoff (``upload_backoff_s``, doubling). ``wait()``,
    ``close()`` and ``restore()`` flush the queue. Local retention keeps a step's folder
    until its upload has ended.

    **Failures.** An error in the background (disk full, I/O error, a staging copy that
    fails, a remote that keeps failing) is raised as a
    :class:`~outlast.errors.StorageError` (or another ``CheckpointError``) by the next
    ``save``, ``wait`` or ``close``, naming the step and the cause. Nothing partial is
    committed: the previous checkpoint stays the latest valid one. Under
    torch.distributed every rank raises, the same class, at the same call: a staging
    failure on one rank reaches the others in the save's first exchange, and pending
    errors are exchanged at every ``save``/``wait``/``close``. Every wait is bounded:
    collectives by the process group's timeout (the Checkpointer's own groups inherit
    it), waits for background work by ``timeout`` seconds.

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
        timeout: seconds any wait for background work may take (a hook waiting for a
            copy, back-pressure, ``wait``, ``close``, flushing uploads) before it raises
            a ``CheckpointError`` saying what it waited for.
        upload_retries: extra tries of a failed upload to the remote tier.
        upload_backoff_s: seconds before the first retry; each further one waits twice as long.
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
        timeout: float = 1800.0,
        upload_retries: int = 3,
        upload_backoff_s: float = 1.0,
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
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(upload_retries, int) or isinstance(upload_retries, bool) or upload_retries < 0:
            raise ValueError(f"upload_retries must be an integer >= 0, got {upload_retries!r}")
        if not isinstance(upload_backoff_s, (int, float)) or upload_backoff_s < 0:
            raise ValueError(f"upload_backoff_s must be a number of seconds >= 0, got {upload_backoff_s!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.max_in_flight = max_in_flight
        self.if_busy = if_busy
        self.num_writers = num_writers
        self.verify = verify
        self.timeout = float(timeout)
        self.metrics: list[SaveMetrics] = []

        self._pg = None
        self._ctl = None
        self._bg: Group | None = None  # the persist thread's collectives
        self._fg: Group | None = None  # the training thread's agreements
        self.rank, self.world_size = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            import torch.distributed as dist

            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            # Background collectives need their own CPU group: they run while the
            # training thread uses the default group, and gloo works on host buffers.
            # new_group() would give it torch's 30-minute default, not the job's timeout.
            t = group_timeout()
            self._pg = dist.new_group(backend="gloo", timeout=t)
            # A second one for the training thread's own agreements (skip, errors, restore).
            self._ctl = dist.new_group(backend="gloo", timeout=t)
            self._bg = Group(self._pg, self.rank, self.world_size)
            self._fg = Group(self._ctl, self.rank, self.world_size)
        self.remote = RemoteTier(remote, **(remote_options or {})) if remote else None

        os.makedirs(self.directory, exist_ok=True)
        err = None
        if self.rank == 0:
            try:
                self._clean_leftovers()
            except OSError as e:
                err = e
        self._together(err, f"opening the Checkpointer on {self.directory}")

        self._engine = Engine(nice=nice, timeout=self.timeout)
        self._pool = StagingPool(max_in_flight)
        self._inflight: list[Job] = []
        self._errors: list[tuple[int, BaseException, str]] = []  # (step, cause, "save" | "upload")
        self._lock = threading.Lock()
        # Hooks by id(), each with a weak reference to its object: an id is reused once
        # the object is freed, and a new optimizer at an old one's address needs its own hook.
        self._hooks: dict[int, tuple[weakref.ref, Any]] = {}
        self._uploader = None
        if self.remote is not None and self.rank == 0:
            self._uploader = Uploader(
                self.remote, retries=upload_retries, backoff_s=upload_backoff_s,
                after_each=self._apply_retention_remote, on_done=self._upload_done,
            )
        self._closed = False

    # ------------------------------------------------------------------ helpers
    def _pg_kw(self, background: bool = False) -> dict:
        # The training thread's collectives (prepare_save, load, agreements) and the
        # persist thread's run on different groups, so they can never pair up wrongly.
        if self._pg is None:
            return {}
        return {"process_group": self._pg if background else self._ctl}

    def _together(self, err: BaseException | None, what: str) -> None:
        """Raise ``err`` (or another rank's) on every rank; a barrier when none failed."""
        if self._fg is not None:
            self._fg.raise_together(err, what)
        elif err is not None:
            raise err

    def path_of(self, step: int) -> str:
        """The local folder of ``step``'s checkpoint."""
        return os.path.join(self.directory, step_dir_name(step))

    def _clean_leftovers(self) -> None:
        # A commit cut between its two renames (no RENAME_EXCHANGE): put the old step back.
        for name in os.listdir(self.directory):
            if name.startswith(".") and ".old-" in name and recover(os.path.join(self.directory, name[1:].split(".old-")[0])):
                log.warning("outlast: recovered %s, moved aside by a commit that was cut off", name[1:].split(".old-")[0])
        for name in os.listdir(self.directory):
            p = os.path.join(self.directory, name)
            final = name[1:].split(".old-")[0] if ".old-" in name else None
            if is_temp_name(name) or (final is not None and os.path.isdir(os.path.join(self.directory, final))):
                log.info("outlast: removing leftover %s of an interrupted save", p)
                remove_tree(p)

    def _hook(self, obj: Any, register) -> None:
        entry = self._hooks.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return
        self._hooks[id(obj)] = (weakref.ref(obj), register(obj))

    def _register_hooks(self, state: dict) -> tuple[list, list, list]:
        """Hook the state's optimizers and buffer-holding modules; returns (optimizers,
        modules, the modules hooked: empty when no module of the state has buffers)."""
        optimizers, modules = find_owners(state)
        for o in optimizers:
            self._hook(o, lambda o: o.register_step_pre_hook(self._optim_hook))
        hooked = hooked_modules(modules)
        for m in hooked:
            self._hook(m, lambda m: m.register_forward_pre_hook(self._forward_hook))
        if len(self._hooks) > 64:  # entries whose object is gone
            self._hooks = {k: v for k, v in self._hooks.items() if v[0]() is not None}
        return optimizers, modules, hooked

    def _optim_hook(self, optimizer, args, kwargs) -> None:
        self._engine.wait_phase(PHASE_OPTIM)

    def _forward_hook(self, module, args) -> None:
        self._engine.wait_phase(PHASE_FORWARD)

    def _pending_error(self) -> CheckpointError | None:
        """The oldest background failure not yet raised, as the error to raise (or None)."""
        with self._lock:
            if not self._errors:
                return None
            step, e, kind = self._errors.pop(0)
        if kind == "upload":
            msg = (
                f"background upload of step {step} to {self.remote.url} failed: {e}. The local "
                f"checkpoint {self.path_of(step)} is committed; the remote tier lacks it."
            )
        else:
            latest = self.latest_step()
            keep = f"the latest valid checkpoint is still step {latest}" if latest is not None else "no checkpoint is committed yet"
            msg = (
                f"background save of step {step} to {self.path_of(step)} failed: {e}. "
                f"Nothing of it was committed; {keep}. Fix the cause (free disk space, check "
                "permissions or the remote) and save again."
            )
        cls = type(e) if isinstance(e, CheckpointError) else StorageError if isinstance(e, OSError) else CheckpointError
        try:
            err = cls(msg)
        except TypeError:  # a subclass with another constructor
            err = CheckpointError(msg)
        err.__cause__ = e
        return err

    def _raise_pending(self) -> None:
        """Raise the oldest background failure; under torch.distributed on every rank at once
        (a collective: every rank calls this at the same points)."""
        self._together(self._pending_error(), "a background save")

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
        m = SaveMetrics(step, self.path_of(step))
        what = f"saving step {step} to {self.path_of(step)}"
        if self._fg is None:
            self._raise_pending()
        bufs = None
        if self.if_busy == "skip":
            bufs = self._pool.try_acquire()
        else:
            tb = time.perf_counter()
            bufs = self._pool.acquire(self.timeout, what)
            m.backpressure_s = time.perf_counter() - tb
        try:
            busy = bufs is None
            if self._fg is None:
                self._raise_pending()
            else:
                # One exchange: every rank's pending background error (all raise the same
                # one) and whether it is busy (all must skip alike, or collectives pair wrongly).
                exc = self._pending_error()
                got = self._fg.all_gather((busy, None if exc is None else (type(exc).__name__, str(exc))), what)
                raise_gathered(exc, [o for _, o in got], "a background save")
                busy = any(b for b, _ in got)
        except BaseException:
            if bufs is not None:
                self._pool.release(bufs)
            raise
        if busy:
            if bufs is not None:
                self._pool.release(bufs)
            m.skipped = m.done = True
            m.save_call_s = time.perf_counter() - t0
            self.metrics.append(m)
            log.warning("outlast: skipped saving step %d: %d save(s) still in flight (if_busy='skip')", step, len(self._inflight))
            return False
        try:
            job = self._start(step, state, m, bufs)
        except BaseException:
            self._pool.release(bufs)
            raise
        m.save_call_s = time.perf_counter() - t0
        return True

    def _start(self, step: int, state: dict, m: SaveMetrics, bufs) -> Job:
        optimizers, modules, hooked = self._register_hooks(state)
        pins = pin_file_backed(optimizers)  # offloaded optimizer state: written from its files, not staged
        try:
            job = self._make_job(step, state, m, bufs, optimizers, modules, hooked)
        except BaseException:
            release_pins(pins)
            raise
        job.pins = pins
        with self._lock:
            self._inflight.append(job)
        self.metrics.append(m)
        self._engine.submit(job)
        return job

    def _make_job(self, step: int, state: dict, m: SaveMetrics, bufs, optimizers, modules, hooked) -> Job:
        if self._pg is None:
            # One process: only flatten here (state_dict() calls and plain values belong
            # to this moment); planning runs first thing on the staging thread.
            flat = flatten(state)
            nw = self.num_writers

            def prepare() -> tuple:
                prepared = prepare_flat(flat, num_writers=nw)
                return prepared, phase_of_items(prepared, optimizers, modules)

            job = Job(step, None, [], bufs, self._persist_job, self._job_done, metrics=m,
                      prepare=prepare, has_cuda=any(leaf.value.device.type == "cuda" for leaf in flat.tensors.values()
                                                    if isinstance(leaf.value, torch.Tensor)))
            if not hooked:
                job.phase_done[PHASE_FORWARD].set()  # nothing a forward pass mutates: never wait
        else:
            # Distributed: planning is collective, so it stays on this thread, where every
            # rank reaches it in the same order (a rank failing to flatten fails all).
            prepared = prepare_save(state, num_writers=self.num_writers, **self._pg_kw())
            m.nbytes = prepared.nbytes
            job = Job(step, prepared, phase_of_items(prepared, optimizers, modules), bufs,
                      self._persist_job, self._job_done, metrics=m)
        return job

    def _persist_job(self, job: Job) -> None:
        m: SaveMetrics = job.metrics
        path = self.path_of(job.step)
        if self._bg is not None:
            # The other ranks are about to enter persist's collectives: a rank whose copy
            # failed says so here, and every rank raises instead of waiting for it.
            self._bg.raise_together(job.stage_error, f"staging step {job.step} for {path}")
        elif job.stage_error is not None:
            raise job.stage_error
        t0 = time.perf_counter()
        persist(job.prepared, path, step=job.step, overwrite=True, **self._pg_kw(background=True))
        m.persist_s = time.perf_counter() - t0
        err = None
        if self.rank == 0:
            try:
                t1 = time.perf_counter()
                self._apply_retention_local()
                m.retention_s = time.perf_counter() - t1
                if self._uploader is not None:
                    self._uploader.submit(job.step, path)
            except Exception as e:  # noqa: BLE001 - to every rank
                err = e
        if self._bg is not None:
            # A save is "done" on every rank only once rank 0 has applied retention:
            # wait() then means the same on all ranks (steps() agrees).
            self._bg.raise_together(err, f"applying retention after step {job.step}")
        elif err is not None:
            raise err

    def _upload_done(self, step: int, seconds: float, err: BaseException | None) -> None:
        for m in reversed(self.metrics):
            if m.step == step and not m.skipped:
                m.upload_s = seconds
                if err is not None and m.error is None:
                    m.error = f"upload: {type(err).__name__}: {err}"
                break
        if err is not None:
            log.error("outlast: uploading step %d failed: %s", step, err)
            with self._lock:
                self._errors.append((step, err, "upload"))

    def _job_done(self, job: Job) -> None:
        m: SaveMetrics = job.metrics
        m.stage_s = job.stage_s
        m.blocked_s = job.blocked_s
        m.done = True
        with self._lock:
            if job in self._inflight:
                self._inflight.remove(job)
            if job.error is not None:
                m.error = f"{type(job.error).__name__}: {job.error}"
                self._errors.append((job.step, job.error, "save"))
        self._pool.release(job.buffers)
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
        with self._lock:
            jobs = list(self._inflight)
        for job in jobs:
            if not job.staged():
                t0 = time.perf_counter()
                try:
                    wait_event(job.phase_done[-1], self.timeout, f"step {job.step}'s tensors to be copied")
                finally:
                    job.blocked_s += time.perf_counter() - t0

    def _drain(self) -> None:
        with self._lock:
            jobs = list(self._inflight)
        for job in jobs:
            wait_event(job.done, self.timeout, f"step {job.step} to be committed to {self.path_of(job.step)}")
        if self._uploader is not None:
            self._uploader.flush(self.timeout)
            # Folders retention kept only for their upload can go now (nothing is in flight).
            try:
                self._apply_retention_local()
            except OSError as e:
                log.warning("outlast: retention after the uploads failed: %s", e)

    def wait(self) -> None:
        """Block until every save in flight is committed and uploaded; raise the first
        background error, if any (under torch.distributed: on every rank)."""
        err = None
        try:
            self._drain()
        except CheckpointError as e:
            err = e
        self._together(err, "waiting for background saves")
        self._raise_pending()

    def close(self) -> None:
        """Wait for saves in flight, stop the background threads, remove the hooks.
        Raises the error of a failed background save. Idempotent."""
        if self._closed:
            return
        self._closed = True
        err = None
        try:
            self._drain()
        except CheckpointError as e:
            err = e
        finally:
            try:
                if err is None:  # after a timed-out drain a join would only time out again
                    self._engine.close()
                    if self._uploader is not None:
                        self._uploader.close(self.timeout)
            except CheckpointError as e:
                err = err or e
            for _, h in self._hooks.values():
                h.remove()
            self._hooks.clear()
        self._together(err, "closing the Checkpointer")
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
        uploading = self._uploader.pending_steps() if self._uploader is not None else set()
        for s in plan_retention(valid, invalid, keep_last=self.keep_last, keep_every=self.keep_every):
            if s in uploading:
                continue  # its upload reads this folder; the next save's retention takes it
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

    def _settle(self, err: BaseException | None, what: str) -> str | None:
        """Agree on one restore attempt across ranks before anyone branches.

        Returns None when it succeeded on every rank, or why to skip the checkpoint when
        it is unusable on some rank (incomplete, corrupt, unreadable); raises on every
        rank, the same class, for anything else (a state that does not match, a bug).
        """
        if self._fg is None:
            if err is None:
                return None
            if isinstance(err, _BAD_CHECKPOINT + (OSError,)):
                return str(err)
            raise err
        got = self._fg.all_gather(None if err is None else (type(err).__name__, str(err)), what)
        failed = [(r, o) for r, o in enumerate(got) if o is not None]
        if not failed:
            return None
        fatal = [None if o is None or issubclass(outlast_class(o[0]), _BAD_CHECKPOINT) else o for o in got]
        if any(fatal):
            raise_gathered(err if fatal[self.rank] is not None else None, fatal, what)
        if err is not None:
            return str(err)
        r, (name, msg) = failed[0]
        return f"on rank {r}: {name}: {msg}"

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
        candidates: list = []
        err = None
        if self.rank == 0:
            try:
                candidates = self._candidates()
            except Exception as e:  # noqa: BLE001 - to every rank
                err = e
        if self._fg is not None:
            # Rank 0's view decides (ranks may list the shared directory at different moments).
            self._together(err, f"listing checkpoints under {self.directory}")
            candidates = self._fg.broadcast(candidates, f"listing checkpoints under {self.directory}")
        elif err is not None:
            raise err
        touched: list[str] = []
        for step, source in candidates:
            path = self.path_of(step)
            where = path if source == "local" else f"{self.remote.url}/{step_dir_name(step)}"
            err = None
            skip = None
            if source == "remote":
                if self.rank == 0:
                    try:
                        self.remote.manifest(step_dir_name(step))
                        log.info("outlast: downloading %s to %s", where, path)
                        self.remote.download(step_dir_name(step), path)
                    except Exception as e:  # noqa: BLE001 - settled on every rank
                        err = e
                # Also the barrier: every rank reads what rank 0 downloaded.
                skip = self._settle(err, f"downloading {where}")
            if skip is None:
                err = None
                try:
                    check_local(path)
                except Exception as e:  # noqa: BLE001 - settled on every rank
                    err = e
                skip = self._settle(err, f"checking {where}")
            if skip is None:
                err = None
                touched.append(where)
                try:
                    load(state, path, strict=True, verify=self.verify, **self._pg_kw())
                except Exception as e:  # noqa: BLE001 - settled on every rank
                    err = e
                skip = self._settle(err, f"restoring {where}")
                if skip is None:
                    log.info("outlast: restored step %d from %s", step, where)
                    return step
            msg = f"outlast: skipping checkpoint {where}: {skip}; falling back to an older one"
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        if touched:
            raise CorruptCheckpointError(
                f"no checkpoint under {self.directory} could be loaded (tried {', '.join(touched)}); "
                "a failed attempt may have partly overwritten the live state: rebuild it before training"
            )
        return None

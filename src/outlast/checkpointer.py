"""``Checkpointer``: steps, near-zero-stall asynchronous saves, tiers, retention, resume.

The manager over the functional core, and a composition of three parts with one reason
to change each: an :class:`~outlast.async_saver.AsyncSaver` (buffer pool, hooks, jobs in
flight on :mod:`outlast.engine`'s threads), a :class:`~outlast.steps.StepDirectory`
(``step-00001200`` names, validity, retention, recovery of interrupted saves) and a
:class:`~outlast.replicator.Replicator` for an optional remote tier. What stays here is
the orchestration: the order of those parts in a save, the agreement between ranks
under torch.distributed, background errors raised at the next call, and restoring the
newest checkpoint that is actually valid, falling back past incomplete or corrupt ones.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Any

import torch

from .api import load, persist
from .async_saver import AsyncSaver, SaveMetrics
from .collective import Group, group_timeout, outlast_class, raise_gathered
from .engine import Job
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    UnsupportedFormatError,
)
from .replicator import Replicator
from .steps import Retention, StepDirectory, check_local, plan_retention, step_dir_name
from .storage.remote import RemoteTier

log = logging.getLogger("outlast")

# plan_retention, step_dir_name and check_local moved to outlast.steps; importing them
# from here still works (tests, user code).
__all__ = ["Checkpointer", "SaveMetrics", "check_local", "plan_retention", "step_dir_name"]

IF_BUSY = ("wait", "skip")
# Failures that make a checkpoint unusable (restore falls back past them). A state
# that does not match (IncompatibleStateError) is the caller's problem and is raised.
_BAD_CHECKPOINT = (CorruptCheckpointError, IncompleteCheckpointError, UnsupportedFormatError, StorageError)


def _is_step(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Checkpointer:
    """Periodic checkpoints of training state under one directory, saved in the background.

    Example::

        ckpt = outlast.Checkpointer("runs/exp1", keep_last=3)
        state = {"model": model, "optim": optimizer, "sched": scheduler, "data": loader_state}
        start = ckpt.restore(state)          # latest valid checkpoint, in place; its step or None
        for step in range((start or -1) + 1, total):
            train_step()
            if step % 50 == 0:
                ckpt.save(state, step=step)  # returns at once
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
        memory_every: keep snapshots in shared memory every this many steps
            (:meth:`maybe_snapshot`; every :meth:`save` also leaves one), with a copy or
            parity on other nodes; :meth:`restore` prefers them (docs/memory.md).
        redundancy: ``"mirror"`` or ``"parity"`` (see :class:`outlast.memtier.MemoryConfig`).
        ranks_per_node: ranks per failure domain (default torchrun's ``LOCAL_WORLD_SIZE``).
        parity_group: ranks per parity group (default: one per node, at most 8).
        memory_job_id: names the job's shared-memory folder (default ``TORCHELASTIC_RUN_ID``).
        shm_dir: the tmpfs holding memory snapshots.
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
        memory_every: int | None = None,
        redundancy: str = "mirror",
        ranks_per_node: int | None = None,
        parity_group: int | None = None,
        memory_job_id: str | None = None,
        shm_dir: str = "/dev/shm",
    ) -> None:
        memory_config = None
        if memory_every is not None:
            from .memtier import MemoryConfig  # validates every field

            memory_config = MemoryConfig(memory_every, redundancy, ranks_per_node, parity_group, memory_job_id, shm_dir)
        retention = Retention(keep_last=keep_last, keep_every=keep_every)  # validates both
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
        self.retention = retention
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
        self._memory = None
        if memory_config is not None:
            from .memtier import MemoryTier

            # The memory tier's exchanges run on a group of their own (gloo: host buffers).
            mem_pg = dist.new_group(backend="gloo", timeout=group_timeout()) if self._pg is not None else None
            self._memory = MemoryTier(memory_config, rank=self.rank, world_size=self.world_size,
                                      directory=self.directory, pg=mem_pg)
        self._last_started: int | None = None
        # Where the last restore came from: {"source": "memory" | "disk", "step", ...}.
        self.last_restore: dict | None = None
        self.remote = RemoteTier(remote, **(remote_options or {})) if remote else None

        self._repo = StepDirectory(self.directory)
        err = None
        if self.rank == 0:
            try:
                self._repo.recover_leftovers()
            except OSError as e:
                err = e
        self._together(err, f"opening the Checkpointer on {self.directory}")

        self._errors: list[tuple[int, BaseException, str]] = []  # (step, cause, "save" | "upload")
        self._lock = threading.Lock()
        self._saver = AsyncSaver(max_in_flight=max_in_flight, nice=nice, timeout=self.timeout,
                                 on_failure=self._save_failed)
        # Every rank lists and fetches from the remote tier; rank 0 alone uploads.
        self._replicator = None
        if self.remote is not None:
            self._replicator = Replicator(
                self.remote, retention, upload=self.rank == 0, retries=upload_retries,
                backoff_s=upload_backoff_s, on_done=self._upload_done,
            )
        self._closed = False

    # The parts, under the names the tests and older code reach for.
    @property
    def _engine(self):
        return self._saver.engine

    @property
    def _pool(self):
        return self._saver.pool

    @property
    def _inflight(self) -> list[Job]:
        return self._saver.inflight

    @property
    def _uploader(self):
        return self._replicator.uploader if self._replicator is not None else None

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
        return self._repo.path_of(step)

    def _save_failed(self, step: int, err: BaseException) -> None:
        with self._lock:
            self._errors.append((step, err, "save"))

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
            valid = self.steps()
            if step in valid:
                # The failure came after the commit (retention, queueing the upload): the
                # checkpoint itself is good, and saying otherwise would send a user after it.
                msg = (
                    f"step {step} was saved and committed to {self.path_of(step)}, but what follows a "
                    f"commit failed: {e}. The checkpoint is valid; older ones may not have been "
                    "deleted as keep_last/keep_every ask. Fix the cause (permissions, disk) and save again."
                )
            else:
                latest = valid[-1] if valid else None
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
    def save(self, state: dict, step: int) -> bool:
        """Start saving ``state`` as checkpoint ``step``; returns at once.

        The argument order is :func:`outlast.save`'s (``state`` first); the order before
        0.2, ``save(step, state)``, still works and warns.

        Returns False if the save was skipped (``if_busy="skip"`` and saves in flight).
        Raises the error of an earlier background save, if one failed, before starting.

        Example:
            >>> with outlast.Checkpointer("runs/save-demo") as ckpt:
            ...     ckpt.save({"model": model}, step=100)
            True
        """
        if _is_step(state) and not _is_step(step):
            from ._deprecated import warn

            warn("Checkpointer.save(step, state)", "Checkpointer.save(state, step)")
            state, step = step, state
        persist = self._persist_job if self._memory is None else self._persist_with_memory
        return self._submit(state, step, persist, self.path_of(step))

    def maybe_snapshot(self, state: dict, step: int) -> bool:
        """Snapshot ``state`` into shared memory if ``step`` is a multiple of
        ``memory_every`` (and was not just saved with :meth:`save`, which leaves a memory
        snapshot too); returns at once, True if a snapshot was started. Call it every step.

        The snapshot goes through the same staging buffers as :meth:`save` (one copy of
        the state), then to this rank's piece in ``/dev/shm`` and its mirror or parity on
        other nodes. Collective under torch.distributed.

        Example:
            >>> ckpt = outlast.Checkpointer("runs/x", memory_every=5, memory_job_id="demo")
            >>> ckpt.maybe_snapshot(state, step=10)
            True
            >>> ckpt.close()  # a clean end frees the job's shared memory
        """
        if self._memory is None:
            raise CheckpointError("this Checkpointer has no memory tier; pass memory_every=K to create it")
        if step % self._memory.config.every or step == self._last_started:
            return False
        return self._submit(state, step, self._memory.persist, self._memory.path_of(step))

    def _persist_with_memory(self, job: Job) -> None:
        self._memory.persist(job)  # first: it is the quick tier, and it reports a failed copy to every rank
        self._persist_job(job)

    def _submit(self, state: dict, step: int, persist, path: str) -> bool:
        if self._closed:
            raise CheckpointError("this Checkpointer is closed; create a new one to save")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        t0 = time.perf_counter()
        m = SaveMetrics(step, path)
        what = f"saving step {step} to {path}"
        if self._fg is None:
            self._raise_pending()
        bufs = self._saver.acquire(wait=self.if_busy == "wait", what=what, metrics=m)
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
                self._saver.release(bufs)
            raise
        if busy:
            if bufs is not None:
                self._saver.release(bufs)
            m.skipped = m.done = True
            m.save_call_s = time.perf_counter() - t0
            self.metrics.append(m)
            log.warning("outlast: skipped saving step %d: %d save(s) still in flight (if_busy='skip')", step, self._saver.in_flight())
            return False
        # Listed before the job can run (its upload's report looks for it), and taken out
        # again if it fails to start.
        self.metrics.append(m)
        try:
            self._saver.start(step, state, m, bufs, persist, num_writers=self.num_writers,
                              prepare_kw=None if self._pg is None else self._pg_kw())
        except BaseException:
            self.metrics.remove(m)
            self._saver.release(bufs)
            raise
        m.save_call_s = time.perf_counter() - t0
        self._last_started = step
        return True

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
        report = persist(job.prepared, path, step=job.step, overwrite=True, **self._pg_kw(background=True))
        m.persist_s = time.perf_counter() - t0
        err = None
        if self.rank == 0:
            try:
                self._repo.remember(job.step, report.manifest)
                t1 = time.perf_counter()
                self._apply_retention_local()
                m.retention_s = time.perf_counter() - t1
                if self._uploader is not None:
                    self._replicator.submit(job.step, path)
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

    @property
    def last_metrics(self) -> SaveMetrics | None:
        """Metrics of the most recent save request (``done`` says whether it finished)."""
        return self.metrics[-1] if self.metrics else None

    def wait_staged(self) -> None:
        """Block until every save in flight has copied all its tensors; after this the
        live state may change freely. The time blocked counts as the save's stall."""
        self._saver.wait_staged()

    def _drain(self) -> None:
        self._saver.drain()
        if self._uploader is not None:
            self._replicator.flush(self.timeout)
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
                    self._saver.close()
                    if self._replicator is not None:
                        self._replicator.close(self.timeout)
            except CheckpointError as e:
                err = err or e
            self._saver.remove_hooks()
        self._together(err, "closing the Checkpointer")
        self._raise_pending()
        if self._memory is not None:
            self._memory.close(free=True)  # a clean end: the job's shared memory is freed

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
    def steps(self) -> list[int]:
        """Steps of the valid local checkpoints (manifest well formed, files at their
        sizes; checksums are checked only when one is loaded), oldest first."""
        return self._repo.steps()

    def latest_step(self) -> int | None:
        """The newest valid local checkpoint's step, or None."""
        return self._repo.latest_step()

    def _apply_retention_local(self) -> None:
        # A folder whose upload is queued or running stays; the next save's retention takes it.
        keep = self._replicator.pending_steps() if self._replicator is not None else set()
        self._repo.apply_retention(self.retention, keep=keep)

    # ------------------------------------------------------------------ restoring
    def _candidates(self) -> list[tuple[int, str]]:
        """(step, source) pairs to try, newest step first, local before remote."""
        seen: dict[int, list[str]] = {}
        for step in self._repo.present():
            seen.setdefault(step, []).append("local")
        if self._replicator is not None:
            for step in self._replicator.present():
                seen.setdefault(step, []).append("remote")
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

    def _restore_memory(self, state: dict) -> int | None:
        """The newest memory snapshot, loaded in place, if it is at least as new as the
        newest disk checkpoint; else None after a warning saying why disk is used."""
        def newest(valid: bool) -> int | None:
            # Folder names first: a memory step at least as new needs no manifest read
            # from storage (recovery from memory reads nothing there).
            out, err = None, None
            if self.rank == 0:
                try:
                    out = self._repo.latest_step() if valid else max(self._repo.present(), default=None)
                except Exception as e:  # noqa: BLE001 - to every rank
                    err = e
            if self._fg is not None:
                self._together(err, f"listing checkpoints under {self.directory}")
                return self._fg.broadcast(out, f"listing checkpoints under {self.directory}")
            if err is not None:
                raise err
            return out

        latest = newest(valid=False)
        plan, folder, why = self._memory.prepare_restore()
        if plan is not None:
            for line in plan.bad_copies:
                msg = f"outlast: memory snapshot: {line}"
                warnings.warn(msg, stacklevel=3)
                log.warning(msg)
        if plan is not None and latest is not None and latest > plan.step:
            latest = newest(valid=True)
        if plan is not None and latest is not None and latest > plan.step:
            why = why + [f"disk checkpoint step {latest} is newer than memory snapshot step {plan.step}"]
            self._memory.finish_restore(plan, folder, loaded=False)
            plan = None
        if plan is not None:
            err = None
            try:
                # Every node holds the whole step: each rank reads its own regions from its
                # node's copy (no exchange). Every file was checked against the manifest's
                # checksums as it was found, received or rebuilt, so none is hashed twice.
                from .memtier.tier import load_local

                load_local(state, folder)
            except Exception as e:  # noqa: BLE001 - settled on every rank
                err = e
            skip = self._settle(err, f"restoring memory snapshot step {plan.step} of job {self._memory.job_id}")
            self._memory.finish_restore(plan, folder, loaded=skip is None)
            if skip is None:
                self.last_restore = {"source": "memory", "step": plan.step, "skipped": why,
                                     "bad_copies": plan.bad_copies, "rebuilt": sorted(plan.rebuild)}
                log.info("outlast: restored step %d from memory (job %s)%s", plan.step, self._memory.job_id,
                         f"; rebuilt rank(s) {sorted(plan.rebuild)} from parity" if plan.rebuild else "")
                return plan.step
            why = why + [f"step {plan.step}: loading it failed: {skip}"]
        self.last_restore = {"source": "disk", "why": why}
        if latest is None and plan is None and why == ["no memory snapshot of this job exists"]:
            return None  # a fresh start: nothing anywhere, nothing to warn about
        msg = "outlast: memory snapshots cannot be used, restoring from disk: " + "; ".join(why)
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
        return None

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
        if self._memory is not None:
            got = self._restore_memory(state)
            if got is not None:
                return got
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
                        self._replicator.fetch(step, path)
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
                    self.last_restore = {**(self.last_restore or {}), "source": source if source == "remote" else "disk",
                                         "step": step}
                    if self._memory is not None:
                        self._memory.discard_after(step)
                    return step
            msg = f"outlast: skipping checkpoint {where}: {skip}; falling back to an older one"
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        if touched:
            raise CorruptCheckpointError(
                f"no checkpoint under {self.directory} could be loaded (tried {', '.join(touched)}); "
                "a failed attempt may have partly overwritten the live state: rebuild it before training"
            )
        if self._memory is not None:
            self._memory.discard_after(None)
        return None

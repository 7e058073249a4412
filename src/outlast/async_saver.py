"""The async saver: saves started on the training thread, finished in the background.

A :class:`~outlast.Checkpointer` hands each save to an :class:`AsyncSaver`. The saver
takes a set of staging buffers from its pool (the back-pressure on saves in flight),
hooks the state's optimizers and buffer-holding modules so that no tensor changes
before its copy exists, builds the :class:`~outlast.engine.Job` and submits it to the
:class:`~outlast.engine.Engine` (stage, then persist with the callable it is given), and
tracks it until it is done. It knows nothing of step folders, retention or remote tiers:
what persisting a job means is the caller's callable; a failure is reported to the
caller's ``on_failure`` callback. The copy itself, the threads and the buffer layout are
:mod:`outlast.engine`'s.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .engine import (
    PHASE_FORWARD, PHASE_OPTIM, Engine, Job, StagingBuffers, StagingPool, find_owners, hooked_modules,
    phase_of_items, pin_file_backed, release_pins, wait_event,
)
from .saving import prepare_flat, prepare_save
from .tree import flatten

log = logging.getLogger("outlast")

__all__ = ["AsyncSaver", "SaveMetrics"]


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


class AsyncSaver:
    """Background saves of training state: buffer pool, hooks, jobs in flight.

    **Concurrency contract.** NOT thread-safe: :meth:`acquire`, :meth:`start`,
    :meth:`wait_staged`, :meth:`drain` and :meth:`close` are called from the training
    thread; the engine's threads only finish jobs (``inflight`` is guarded by a lock).
    Not collective: under torch.distributed the caller agrees across ranks before it
    starts a save, and passes the process group for the collective planning.

    Args:
        max_in_flight: saves in progress at once (each holds one set of staging buffers).
        nice: niceness added to the persist thread.
        timeout: seconds any wait for background work may take.
        on_failure: ``on_failure(step, error)`` on the persist thread when a save fails,
            before the job leaves ``inflight``.

    Example:
        >>> import outlast
        >>> saver = AsyncSaver(max_in_flight=1, nice=0, timeout=60.0)
        >>> m = SaveMetrics(1, "runs/saver-demo")
        >>> job = saver.start(1, {"w": torch.ones(4)}, m, saver.acquire(wait=True, what="demo", metrics=m),
        ...                   lambda job: outlast.persist(job.prepared, m.path))
        >>> saver.drain(); saver.close()
        >>> m.done, m.error
        (True, None)
    """

    def __init__(self, *, max_in_flight: int = 1, nice: int = 10, timeout: float = 1800.0,
                 on_failure: Callable[[int, BaseException], None] | None = None) -> None:
        self.timeout = timeout
        self.engine = Engine(nice=nice, timeout=timeout)
        self.pool = StagingPool(max_in_flight)
        self.inflight: list[Job] = []
        self._on_failure = on_failure
        self._lock = threading.Lock()
        # Hooks by id(), each with a weak reference to its object: an id is reused once
        # the object is freed, and a new optimizer at an old one's address needs its own hook.
        self._hooks: dict[int, tuple[weakref.ref, Any]] = {}

    # ------------------------------------------------------------------ buffers
    def acquire(self, *, wait: bool, what: str, metrics: SaveMetrics) -> StagingBuffers | None:
        """One set of staging buffers: waits for one (the wait is recorded as
        ``metrics.backpressure_s``) or, with ``wait=False``, None if all are in use."""
        if not wait:
            return self.pool.try_acquire()
        t0 = time.perf_counter()
        bufs = self.pool.acquire(self.timeout, what)
        metrics.backpressure_s = time.perf_counter() - t0
        return bufs

    def release(self, bufs: StagingBuffers) -> None:
        """Give back buffers taken by :meth:`acquire` for a save that did not start."""
        self.pool.release(bufs)

    def in_flight(self) -> int:
        with self._lock:
            return len(self.inflight)

    # ------------------------------------------------------------------ hooks
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
        self.engine.wait_phase(PHASE_OPTIM)

    def _forward_hook(self, module, args) -> None:
        self.engine.wait_phase(PHASE_FORWARD)

    def remove_hooks(self) -> None:
        for _, h in self._hooks.values():
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ saving
    def start(
        self,
        step: int,
        state: dict,
        metrics: SaveMetrics,
        bufs: StagingBuffers,
        persist: Callable[[Job], Any],
        *,
        num_writers: int = 1,
        prepare_kw: dict | None = None,
    ) -> Job:
        """Submit the save of ``state`` as ``step`` into ``bufs``; ``persist(job)`` runs on
        the persist thread once the copy is done. ``prepare_kw`` None: one process (only
        flattening happens here, planning on the staging thread); otherwise the keyword
        arguments of the collective :func:`~outlast.prepare_save`, run here."""
        optimizers, modules, hooked = self._register_hooks(state)
        pins = pin_file_backed(optimizers)  # offloaded optimizer state: written from its files, not staged
        try:
            job = self._make_job(step, state, metrics, bufs, persist, num_writers, prepare_kw, optimizers, modules, hooked)
        except BaseException:
            release_pins(pins)
            raise
        job.pins = pins
        with self._lock:
            self.inflight.append(job)
        self.engine.submit(job)
        return job

    def _make_job(self, step, state, metrics, bufs, persist, num_writers, prepare_kw, optimizers, modules, hooked) -> Job:
        if prepare_kw is None:
            # One process: only flatten here (state_dict() calls and plain values belong
            # to this moment); planning runs first thing on the staging thread.
            flat = flatten(state)

            def prepare() -> tuple:
                prepared = prepare_flat(flat, num_writers=num_writers)
                return prepared, phase_of_items(prepared, optimizers, modules)

            job = Job(step, None, [], bufs, persist, self._job_done, metrics=metrics,
                      prepare=prepare, has_cuda=any(leaf.value.device.type == "cuda" for leaf in flat.tensors.values()
                                                    if isinstance(leaf.value, torch.Tensor)))
            if not hooked:
                job.phase_done[PHASE_FORWARD].set()  # nothing a forward pass mutates: never wait
        else:
            # Distributed: planning is collective, so it stays on this thread, where every
            # rank reaches it in the same order (a rank failing to flatten fails all).
            prepared = prepare_save(state, num_writers=num_writers, **prepare_kw)
            metrics.nbytes = prepared.nbytes
            job = Job(step, prepared, phase_of_items(prepared, optimizers, modules), bufs,
                      persist, self._job_done, metrics=metrics)
        return job

    def _job_done(self, job: Job) -> None:
        m: SaveMetrics = job.metrics
        m.stage_s = job.stage_s
        m.blocked_s = job.blocked_s
        m.done = True
        if job.error is not None:
            m.error = f"{type(job.error).__name__}: {job.error}"
            if self._on_failure is not None:
                self._on_failure(job.step, job.error)
        with self._lock:
            if job in self.inflight:
                self.inflight.remove(job)
        self.pool.release(job.buffers)
        if job.error is not None:
            log.error("outlast: saving step %d failed: %s", job.step, m.error)
        else:
            log.info(
                "outlast: saved step %d (%.1f MiB): stall %.1f ms (blocked %.1f ms), stage %.3f s, "
                "persist %.3f s, %.0f MiB/s",
                job.step, m.nbytes / 2**20, m.stall_s * 1e3, m.blocked_s * 1e3, m.stage_s, m.persist_s,
                m.throughput_bytes_per_s / 2**20,
            )

    # ------------------------------------------------------------------ waiting
    def wait_staged(self) -> None:
        """Block until every save in flight has copied all its tensors; the time blocked
        counts as that save's stall."""
        with self._lock:
            jobs = list(self.inflight)
        for job in jobs:
            if not job.staged():
                t0 = time.perf_counter()
                try:
                    wait_event(job.phase_done[-1], self.timeout, f"step {job.step}'s tensors to be copied")
                finally:
                    job.blocked_s += time.perf_counter() - t0

    def drain(self) -> None:
        """Block until every save in flight is done (committed or failed)."""
        with self._lock:
            jobs = list(self.inflight)
        for job in jobs:
            wait_event(job.done, self.timeout, f"step {job.step} to be committed to {job.metrics.path}")

    def close(self) -> None:
        """Stop the engine's threads after the work queued (CheckpointError on timeout).
        Hooks stay until :meth:`remove_hooks`."""
        self.engine.close()

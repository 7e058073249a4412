"""The asynchronous save pipeline: staging buffers, the background workers and the hooks.

A save is ``stage -> persist``. *Stage* copies every tensor region of a
:class:`~outlast.api.PreparedSave` into host buffers that are allocated once and reused
while the layout is unchanged; *persist* writes those buffers with
:func:`outlast.api.persist` (shard files, manifest, atomic rename). Both run on
background threads, so :meth:`Engine.submit` returns as soon as the plan is made.

Consistency comes from ordering plus hooks. Regions are staged in three phases:

0. module buffers (BatchNorm statistics and the like: a forward pass mutates them),
1. tensors an optimizer updates (its parameters and its state),
2. everything else.

A forward pre-hook on every module of the state waits for phase 0, and an optimizer
step pre-hook waits for phases 0 and 1, so the training thread blocks only if it would
mutate a tensor before its copy exists. Phase 0 is small and phase 1 is finished long
before ``optimizer.step()`` in a normal loop (it overlaps the forward and backward).

Staging buffers are laid out as the shard files themselves (header, then each tensor at
its file offset), page-aligned, so persisting is a checksum pass plus one O_DIRECT write
per file: no copy into the page cache, which on a 2-core machine cost 0.3-0.4 s of
kernel CPU per 240 MiB save (taken from the training) against about 0.01 s direct.

Why threads and not a helper process (measured in bench/stall.py on a 2-core box): the
work releases the GIL almost entirely (``memmove`` through ctypes, ``os.write``, xxhash),
so a thread costs the training loop only the CPU it uses; a helper process would still
need the same copy into shared memory on this side and adds a second interpreter's
memory. What the background does cost is CPU, so the copy uses one core in chunks
(``memmove`` instead of ``Tensor.copy_``, which would wake torch's intra-op thread pool
and compete with the training's own parallel regions), the persist thread runs at a low
scheduling priority (``nice``) and writes with one writer by default.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .api import FileLayout, PreparedSave, layout_files
from .errors import CheckpointError
from .storage.local import aligned_buffer

log = logging.getLogger("outlast")

__all__ = ["Engine", "Job", "StagingBuffers", "StagingPool", "find_owners", "hooked_modules", "copy_into", "pin_file_backed",
           "release_pins"]

# Copies are cut into chunks of this size: each chunk is one GIL-free memmove, and a
# hook waiting for a phase never waits for more than the chunk in progress beyond it.
COPY_CHUNK = 4 << 20

PHASE_FORWARD, PHASE_OPTIM, PHASE_REST = 0, 1, 2
N_PHASES = 3


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    # A DTensor (FSDP2 / tensor parallel) has no storage of its own: key by its local shard.
    t = getattr(t, "_local_tensor", t)
    return (t.device.type, t.untyped_storage().data_ptr())


def _walk_objects(x: Any, found: list, seen: set, depth: int) -> None:
    """Collect optimizers and modules in nested state, directly or inside wrappers."""
    if id(x) in seen or depth > 4:
        return
    seen.add(id(x))
    if isinstance(x, (torch.optim.Optimizer, torch.nn.Module)):
        found.append(x)
        return
    if isinstance(x, torch.Tensor) or isinstance(x, (str, bytes, int, float, bool, type(None))):
        return
    if isinstance(x, dict):
        for v in x.values():
            _walk_objects(v, found, seen, depth + 1)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _walk_objects(v, found, seen, depth + 1)
    elif callable(getattr(x, "state_dict", None)):
        # A Stateful wrapper (e.g. DCP's ModelWrapper/OptimizerWrapper, a user class)
        # holding the real objects as attributes.
        for v in getattr(x, "__dict__", {}).values():
            _walk_objects(v, found, seen, depth + 1)


def find_owners(state: Any) -> tuple[list[torch.optim.Optimizer], list[torch.nn.Module]]:
    """The optimizers and modules reachable from ``state`` (each once)."""
    found: list = []
    _walk_objects(state, found, set(), 0)
    return [o for o in found if isinstance(o, torch.optim.Optimizer)], [m for m in found if isinstance(m, torch.nn.Module)]


def hooked_modules(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The modules whose forward must wait for the buffers' copy: every module of the
    state that holds buffers anywhere below it (its forward may mutate any of them), and
    every submodule that owns buffers itself, so that calling a submodule directly
    (``model.encoder(x)``, a BatchNorm run outside its parent) waits too. Modules without
    buffers get no hook: nothing their forward does changes saved state."""
    out: list = []
    seen: set = set()
    for m in modules:
        owners = [sub for sub in m.modules() if sub._buffers]  # once per save(): kept cheap
        if not owners:
            continue
        for x in [m, *owners]:
            if id(x) not in seen:
                seen.add(id(x))
                out.append(x)
    return out


def phase_of_items(prepared: PreparedSave, optimizers, modules) -> list[int]:
    """The staging phase of every item (see the module docstring)."""
    forward: set = set()
    for m in modules:
        for b in m.buffers():
            forward.add(_storage_key(b))
    optim: set = set()
    for o in optimizers:
        for g in o.param_groups:
            for p in g["params"]:
                optim.add(_storage_key(p))
        for st in o.state.values():
            if isinstance(st, dict):
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        optim.add(_storage_key(v))
    out = []
    for it in prepared.items:
        k = _storage_key(it.data)
        out.append(PHASE_FORWARD if k in forward else PHASE_OPTIM if k in optim else PHASE_REST)
    return out


def pin_file_backed(optimizers: list) -> list:
    """Pins of optimizer state that already lives in files (``OffloadAdamW.pin_state_files``).

    A tensor a pin ``holds`` is not staged: it is persisted straight from its (memory-mapped)
    file, so a save does not hold a second, in-memory copy of offloaded state; the pin keeps
    the file unchanged until the save ends (:meth:`Engine` releases it). Optimizers without
    the method (every in-memory one) give none.
    """
    pins = []
    try:
        for o in optimizers:
            pin = getattr(o, "pin_state_files", None)
            pin = pin() if callable(pin) else None
            if pin is not None:
                pins.append(pin)
    except BaseException:
        release_pins(pins)
        raise
    return pins


def release_pins(pins: list) -> None:
    for p in pins:
        p.release()


def copy_into(dst: torch.Tensor, src: torch.Tensor, chunk: int = COPY_CHUNK) -> None:
    """Copy the bytes of ``src`` into ``dst``, a contiguous uint8 CPU buffer of exactly
    that many bytes, with one core and the GIL released.

    Contiguous CPU sources are copied with ``memmove`` in ``chunk``-byte pieces (ctypes
    releases the GIL around each call); anything else (a strided view, a lazily
    conjugated tensor, a tensor on an accelerator) goes through ``Tensor.copy_`` into
    ``dst`` viewed as ``src``'s dtype and shape (the shard layout puts every tensor at a
    multiple of its item size), so no temporary copy is made.
    """
    n = src.numel() * src.element_size()
    if dst.dtype != torch.uint8 or dst.numel() != n or not dst.is_contiguous():
        raise ValueError(f"copy_into: destination is not a {n}-byte contiguous uint8 buffer")
    if n == 0:
        return
    if src.device.type == "cpu" and src.is_contiguous() and not src.is_conj() and not src.is_neg():
        d, s = dst.data_ptr(), src.data_ptr()
        for off in range(0, n, chunk):
            ctypes.memmove(d + off, s + off, min(chunk, n - off))
        return
    with torch.no_grad():
        dst.view(src.dtype).view(src.shape).copy_(src, non_blocking=src.device.type == "cuda")


class StagingBuffers:
    """The staging memory of one save in flight: one buffer per shard file, laid out as
    that file (header, then every item at its offset; see :func:`outlast.api.layout_files`),
    so persisting is a checksum pass plus a direct write of each buffer. Allocated once
    and reused while the layout (every item's key, dtype, shape and file) is unchanged;
    page-aligned for O_DIRECT and pinned when the source is on an accelerator, so
    device-to-host copies run at full speed."""

    def __init__(self) -> None:
        self._signature: tuple | None = None
        self.images: list[tuple[FileLayout, torch.Tensor]] = []
        self.views: list[torch.Tensor] = []
        self.allocations = 0

    def for_items(self, prepared: PreparedSave) -> list[torch.Tensor]:
        """The byte buffer of every item of ``prepared``, inside its file image."""
        items = prepared.items
        sig = (tuple((i.key, i.dtype, i.box.sizes, i.data.device.type) for i in items), tuple(prepared.writer_of))
        if sig != self._signature:
            self.images, self.views = [], []  # free the old buffers before taking new ones
            pin = torch.cuda.is_available() and any(i.data.device.type == "cuda" for i in items)
            views: list = [None] * len(items)
            images = []
            for lay in layout_files(items, prepared.writer_of):
                img = aligned_buffer(lay.size, pin=pin)
                img[: len(lay.head)].copy_(torch.frombuffer(bytearray(lay.head), dtype=torch.uint8))
                for i, off in zip(lay.order, lay.offsets):
                    views[i] = img[off : off + items[i].nbytes]
                images.append((lay, img))
            self.images, self.views = images, views
            self._signature = sig
            self.allocations += 1
        return self.views


class StagingPool:
    """The fixed set of :class:`StagingBuffers` (one per save allowed in flight).

    :meth:`acquire` blocks until a set is free and :meth:`release` hands one back, both
    under one condition variable, so the training thread can never see a save as
    finished while its buffers are still on their way back (the pool replaced an
    in-flight list and a free list read without a lock)."""

    def __init__(self, n: int) -> None:
        self.size = n
        self._free = [StagingBuffers() for _ in range(n)]
        self._cond = threading.Condition()

    def available(self) -> int:
        with self._cond:
            return len(self._free)

    def try_acquire(self) -> StagingBuffers | None:
        with self._cond:
            return self._free.pop() if self._free else None

    def acquire(self, timeout: float | None, what: str) -> StagingBuffers:
        """A free set, waiting at most ``timeout`` seconds; raises CheckpointError naming ``what``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout):
                raise CheckpointError(
                    f"{what}: timed out after {timeout:g} s waiting for an earlier save to release its "
                    f"staging buffers ({self.size} in use). The background save is stuck (a hung disk, "
                    "filesystem or collective); check the other ranks' logs, or raise timeout="
                )
            return self._free.pop()

    def release(self, buffers: StagingBuffers) -> None:
        with self._cond:
            self._free.append(buffers)
            self._cond.notify()


def wait_event(event: threading.Event, timeout: float | None, what: str) -> None:
    """``event.wait`` bounded by ``timeout``; on expiry a CheckpointError naming ``what``."""
    if not event.wait(timeout):
        raise CheckpointError(
            f"timed out after {timeout:g} s waiting for {what}. The background save is stuck (a hung "
            "disk, filesystem or collective: see the other ranks' logs); raise the Checkpointer's "
            "timeout= if the save is merely slow"
        )


@dataclass
class Job:
    """One save on its way through stage -> persist. ``finish`` runs on the persist thread."""

    step: int
    prepared: PreparedSave | None  # None until ``prepare`` has run on the staging thread
    phases: list[int]
    buffers: StagingBuffers
    persist: Callable[["Job"], Any]
    on_done: Callable[["Job"], None]
    phase_done: list[threading.Event] = field(default_factory=lambda: [threading.Event() for _ in range(N_PHASES)])
    done: threading.Event = field(default_factory=threading.Event)
    cuda_ready: Any = None  # a CUDA event recorded on the training stream at submit
    error: BaseException | None = None
    # A staging failure. The job still goes to the persist callable, which under
    # torch.distributed hands it to the other ranks at their next exchange (instead of
    # leaving them waiting in persist's collectives for a rank that never comes).
    stage_error: BaseException | None = None
    stage_s: float = 0.0
    persist_s: float = 0.0  # set by the persist callable (it knows its own parts)
    blocked_s: float = 0.0
    result: Any = None
    metrics: Any = None  # the caller's record of this save (filled as it progresses)
    # Deferred planning: ``prepare()`` returns ``(prepared, phases)``; run first thing on
    # the staging thread so the training thread only flattens.
    prepare: Callable[[], tuple[PreparedSave, list[int]]] | None = None
    has_cuda: bool = False
    # From :func:`pin_file_backed`: items whose tensors a pin holds are persisted from their
    # files, not staged; the pins are released when the job ends, whatever its outcome.
    pins: list = field(default_factory=list)

    def staged(self) -> bool:
        return self.phase_done[-1].is_set()

    def release_waiters(self) -> None:
        for e in self.phase_done:
            e.set()


def _lower_priority(nice: int) -> None:
    if nice <= 0:
        return
    try:  # Linux: a thread is a task with its own niceness; threads it starts inherit it.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass


class Engine:
    """Two background threads: one stages (normal priority), one persists (``nice``).
    Not thread-safe: one training thread submits and waits; hooks call
    :meth:`wait_phase` from that same thread.

    ``stage_delay`` (seconds before each item is copied) exists for tests that must
    slow staging down deterministically. ``timeout`` bounds every wait of the training
    thread on the background (hooks, :meth:`close`).
    """

    def __init__(self, *, nice: int = 10, stage_delay: float = 0.0, device_copies: bool = True,
                 timeout: float | None = None) -> None:
        self.nice = nice
        self.stage_delay = stage_delay
        self.timeout = timeout
        self._stage_q: queue.Queue = queue.Queue()
        self._persist_q: queue.Queue = queue.Queue()
        self._staging: Job | None = None  # the job whose copy may be in progress
        self._lock = threading.Lock()
        self._stream = None
        if device_copies and torch.cuda.is_available():
            self._stream = torch.cuda.Stream()
        self._threads = [
            threading.Thread(target=self._stage_loop, name="outlast-stage", daemon=True),
            threading.Thread(target=self._persist_loop, name="outlast-persist", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- training thread
    def submit(self, job: Job) -> None:
        if job.prepared is not None:
            job.has_cuda = any(i.data.device.type == "cuda" for i in job.prepared.items)
        if self._stream is not None and job.has_cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream())
            job.cuda_ready = ev
        with self._lock:
            self._staging = job
        self._stage_q.put(job)

    def wait_phase(self, phase: int) -> float:
        """Block until the job being staged has copied ``phase`` (and all before it).
        Returns the seconds blocked (added to that job's stall)."""
        with self._lock:
            job = self._staging
        if job is None or job.phase_done[phase].is_set():
            return 0.0
        t0 = time.perf_counter()
        try:
            wait_event(job.phase_done[phase], self.timeout, f"step {job.step}'s tensors to be copied before they change")
        finally:
            dt = time.perf_counter() - t0
            job.blocked_s += dt
        return dt

    def close(self) -> None:
        """Stop both threads after the work queued; raises CheckpointError if one does not
        finish within ``timeout`` (it is a daemon thread: the process can still exit)."""
        self._stage_q.put(None)
        for t in self._threads:
            t.join(self.timeout)
            if t.is_alive():
                raise CheckpointError(
                    f"timed out after {self.timeout:g} s waiting for the {t.name} thread to finish its "
                    "work; it is stuck in a write, fsync or collective (see the other ranks' logs)"
                )

    # -- background
    def _stage_loop(self) -> None:
        # The copy runs at normal priority: the step hook waits for it, and at a lower
        # one the training's own threads starve it (measured: a first save blocked
        # optimizer.step() for 160-590 ms at nice 10, 0 ms at nice 0). It takes the same
        # CPU either way; at normal priority it is over within the forward pass.
        while True:
            job = self._stage_q.get()
            if job is None:
                self._persist_q.put(None)
                return
            t0 = time.perf_counter()
            try:
                if job.prepared is None:
                    job.prepared, job.phases = job.prepare()
                    job.prepare = None
                    if job.metrics is not None:
                        job.metrics.nbytes = job.prepared.nbytes
                items = job.prepared.items
                direct = {i for i, it in enumerate(items) if any(p.holds(it.data) for p in job.pins)}
                if direct:
                    # Staging buffers for the other items only; the save is then written item by
                    # item (the file-backed ones read from their files) instead of as images.
                    keep = [i for i in range(len(items)) if i not in direct]
                    sub = dataclasses.replace(job.prepared, items=[items[i] for i in keep],
                                              writer_of=[job.prepared.writer_of[i] for i in keep])
                    bufs = [None] * len(items)
                    for i, b in zip(keep, job.buffers.for_items(sub)):
                        bufs[i] = b
                else:
                    bufs = job.buffers.for_items(job.prepared)
                order = sorted((i for i in range(len(items)) if i not in direct), key=lambda i: job.phases[i])
                if job.cuda_ready is not None:
                    self._stream.wait_event(job.cuda_ready)
                current = 0
                for i in order:
                    while job.phases[i] > current:
                        self._finish_phase(job, current)
                        current += 1
                    if self.stage_delay:
                        time.sleep(self.stage_delay)
                    if self._stream is not None and job.prepared.items[i].data.device.type == "cuda":
                        with torch.cuda.stream(self._stream):
                            copy_into(bufs[i], job.prepared.items[i].data)
                    else:
                        copy_into(bufs[i], job.prepared.items[i].data)
                while current < N_PHASES:
                    self._finish_phase(job, current)
                    current += 1
                job.stage_s = time.perf_counter() - t0
                if direct:
                    job.prepared = job.prepared.with_data([items[i].data if i in direct else bufs[i] for i in range(len(items))])
                else:
                    job.prepared = job.prepared.with_images(job.buffers.images, bufs)
            except BaseException as e:  # noqa: BLE001 - handed to persist, then to the training thread
                job.stage_error = e
                job.release_waiters()
                with self._lock:
                    if self._staging is job:
                        self._staging = None
                # Persist still sees the job, in order: it reports the failure (to the
                # other ranks too) instead of writing.
                self._persist_q.put(job)
                continue
            with self._lock:
                if self._staging is job:
                    self._staging = None
            self._persist_q.put(job)

    def _finish_phase(self, job: Job, phase: int) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        job.phase_done[phase].set()

    def _persist_loop(self) -> None:
        _lower_priority(self.nice)
        while True:
            job = self._persist_q.get()
            if job is None:
                return
            try:
                job.result = job.persist(job)
            except BaseException as e:  # noqa: BLE001 - handed back to the training thread
                job.error = e
            if job.error is None and job.stage_error is not None:
                job.error = job.stage_error  # a persist callable that did not report it
            # Drop references to the live state and buffers before signalling.
            job.prepared = None  # type: ignore[assignment]
            self._finish(job)

    @staticmethod
    def _finish(job: Job) -> None:
        try:
            job.on_done(job)
        except BaseException as e:  # noqa: BLE001
            if job.error is None:
                job.error = e
        finally:
            release_pins(job.pins)  # written (or failed): the files may change again; before done,
            job.done.set()          # so a step after Checkpointer.wait() never waits for them

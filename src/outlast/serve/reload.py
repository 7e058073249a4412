"""Hot reload: follow a Checkpointer run directory and swap each newly committed, verified step in.

A training run's :class:`outlast.Checkpointer` commits ``RUN_DIR/step-NNNNNNNN`` by renaming a
finished folder whose ``manifest.json`` was written last, so a ``step-*`` folder with a manifest is
a commit. :class:`WeightsManager` polls for a step newer than any it has tried, reads it with
outlast's checkpoint reader (every chunk's checksum checked, whatever layout trained it) into the
serving layout on a worker thread (:meth:`LlamaRuntime.from_checkpoint`),
salts it with an identity taken from the manifest's verified checksums, and hands it to the engine
loop, which swaps it in between steps once the requests running on the old weights finish. A
checkpoint that is incomplete, corrupt or of another architecture is refused, recorded with its reason, and the old weights keep serving. The same
manager serves the authenticated admin endpoint: reload a given step, roll back, or resume following.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time

import numpy as np

from ..errors import CheckpointError
from .errors import ModelLoadError, ServeError, StepNotFoundError
from .loop import EngineLoop
from .model import LlamaRuntime
from .weights import checkpoint_identity, load_config

__all__ = ["WeightsManager", "committed_steps", "prefetch", "step_of", "version_of"]

log = logging.getLogger("outlast.serve")
_STEP = re.compile(r"^step-(\d+)$")


def committed_steps(run_dir: str) -> dict[int, str]:
    """``{step: path}`` of the committed step folders of a Checkpointer directory (manifest present;
    checksums are checked only when one is loaded).

    Example:
        >>> committed_steps("runs/exp1")
        {100: 'runs/exp1/step-00000100', 200: 'runs/exp1/step-00000200'}
    """
    out = {}
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return out
    for name in names:
        m = _STEP.match(name)
        if m and os.path.exists(os.path.join(run_dir, name, "manifest.json")):
            out[int(m.group(1))] = os.path.join(run_dir, name)
    return out


def step_of(path: str) -> int | None:
    """The step a ``step-NNNNNNNN`` folder holds, or None for any other source."""
    m = _STEP.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def prefetch(path: str | None, max_fraction: float = 0.5) -> threading.Thread | None:
    """Start reading a newly committed step's files into the page cache, in the background.

    The Checkpointer writes with O_DIRECT, so a step that just committed is not in the page cache,
    and the read of a reload would wait on the disk (the first replica of ``bench/fleet.py`` read
    540 MB in 1.06-1.42 s cold against 0.34-0.42 s warm). A daemon thread reads the files in
    8 MiB pieces into one small buffer while the reload is polled, drained and planned; the
    reload's own read then finds them cached. (``posix_fadvise(WILLNEED)`` was tried first: on
    this kernel it queued only ~2% of the files.) Skipped when the step's files exceed
    ``max_fraction`` of the memory available now (prefetching more would only evict what it read).
    Returns the thread, or None when skipped. Errors are ignored: this is only a hint.

    Example:
        >>> prefetch("runs/exp1/step-00000200").join()
    """
    if path is None:
        return None
    try:
        files = [os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs]
        if sum(os.path.getsize(f) for f in files) > max_fraction * _mem_available():
            return None
    except OSError:
        return None

    def run() -> None:
        buf = bytearray(8 << 20)
        for f in files:
            try:
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
            except OSError:
                pass

    t = threading.Thread(target=run, name="outlast-prefetch", daemon=True)
    t.start()
    return t


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def version_of(step: int) -> str:
    """The ``system_fingerprint`` of responses served by a checkpoint step: ``step-<N>``."""
    return f"step-{step}"


class WeightsManager:
    """Which checkpoint step an engine serves, and every change to it.

    Args:
        loop: the running engine loop whose weights are replaced.
        run_dir: the Checkpointer directory (``step-*`` folders).
        prefix: the model's sub-tree in the checkpoints.
        config: a config.json for checkpoints without ``serve_config``.
        follow: load each new committed step automatically (False: only the admin endpoint reloads).
        poll_s: how often the directory is listed (one listdir and a stat per step folder: about
            0.1 ms of CPU with 20 steps, so 0.1 s costs ~0.1% of a core and adds 0.05 s on average).
        step: the step served at start (None if the engine's weights came from elsewhere).
        keep_buffers: keep a reload's memory mapped between reloads: the read's staging tensors
            and the weights a swap retires, which the next reload reads and builds into, both
            mapped and touched once in the background at :meth:`start`. Costs two more copies of
            the weights' bytes resident (a reload's peak is the same either way); saves the
            first-touch page faults that took most of a reload's time (0.5-2.7 s of 1.5-2.8 s on
            the 2-core EPYC for SmolLM2-135M; docs/fleet.md). False: allocate per reload and let
            the old weights go.
        direct_io: read steps with O_DIRECT. The Checkpointer writes with O_DIRECT, so a step that
            just committed is not in the page cache; reading it around the cache took ~1/10 of the
            CPU of a buffered read (which on a busy host is what decides a reload's time), and
            no background prefetch runs. False: buffered reads, with a prefetch of each new step
            (:func:`prefetch`).

    Example:
        >>> wm = WeightsManager(loop, "runs/exp1", step=100); wm.start()
        >>> wm.reload(200)      # blocks until step 200 serves; raises if it is refused
        >>> wm.rollback()       # back to 100
        >>> wm.close()
    """

    def __init__(self, loop: EngineLoop, run_dir: str, *, prefix: str = "model", config: str | None = None,
                 follow: bool = True, poll_s: float = 0.1, step: int | None = None, keep_buffers: bool = True,
                 direct_io: bool = True):
        self.loop = loop
        self.run_dir = run_dir
        self.prefix = prefix
        self.config = config
        self.follow = follow
        self.poll_s = poll_s
        self.step = step
        self.history: list[int] = [step] if step is not None else []
        self.refused: dict[int, str] = {}
        self.highest_tried = step if step is not None else -1
        self._lock = threading.Lock()
        self._prepared: tuple | None = None  # (step, runtime, identity) read ahead of its swap
        self.timings: dict = {}  # where the last reload's time went (read + verify, build, identity, swap)
        self.keep_buffers = keep_buffers
        self.direct_io = direct_io
        self._staging: dict | None = {} if keep_buffers else None  # the read's destinations, by name
        self._spare: dict | None = None  # a retired runtime's arrays, which no step uses any more
        self._warm: threading.Thread | None = None
        self._packing: threading.Thread | None = None  # oneDNN's packing of the weights just swapped in
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="outlast-reload", daemon=True)
        m = loop.engine.metrics
        if step is not None:
            loop.engine.weights_version = version_of(step)
            m.weights_step.set(step)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "WeightsManager":
        if self.keep_buffers:
            self._warm = threading.Thread(target=self._map_buffers, name="outlast-reload-buffers", daemon=True)
            self._warm.start()
        self._thread.start()
        return self

    def _map_buffers(self) -> None:
        """Map and touch the staging tensors (shapes from the served step's manifest) and a spare
        set of serving arrays (shapes from the engine's runtime), so the first reload finds its
        memory as later ones do. Runs once, in the background; a failure only costs speed."""
        try:
            from .model import _DTYPES, _empty

            rt = self.loop.engine.runtime
            spare = {}
            for key, a in rt.arrays().items():
                b = np.empty_like(a) if isinstance(a, np.ndarray) else _empty(tuple(a.shape), a.dtype)
                b.fill(0) if isinstance(b, np.ndarray) else b.zero_()
                spare[key] = b
            path = committed_steps(self.run_dir).get(self.step) if self.step is not None else None
            if path is not None:
                from ..reader import open_manifest

                for fqn, e in open_manifest(path, check_files=False).tensors.items():
                    if len(e.path) > 1 and e.path[0] == self.prefix and e.dtype in _DTYPES:
                        name = ".".join(map(str, e.path[1:]))
                        if name not in self._staging:
                            self._staging[name] = _empty(tuple(e.shape), _DTYPES[e.dtype]).zero_()
            if self._spare is None:
                self._spare = spare
        except Exception as e:  # noqa: BLE001 - only a hint: reloads then map their memory themselves
            log.info("outlast serve: reload buffers not mapped ahead: %r", e)

    def _retire(self, runtime) -> None:
        """``runtime`` no longer serves and nothing computes with it: the next build goes into it."""
        if self.keep_buffers and runtime is not None:
            self._spare = {k: a for k, a in runtime.arrays().items() if k not in runtime.borrowed}

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def status(self) -> dict:
        """What serves now, the steps served before, the refused ones with why, and the committed ones."""
        return {"step": self.step, "version": self.loop.engine.weights_version, "follow": self.follow,
                "history": list(self.history), "refused": {str(k): v for k, v in sorted(self.refused.items())},
                "committed": sorted(committed_steps(self.run_dir)), "timings": dict(self.timings)}

    # -- changes ---------------------------------------------------------------------------
    def prepare(self, step: int) -> dict:
        """Read and verify ``step`` into the serving layout without serving it yet (the engine keeps
        running); a later :meth:`reload` of the same step then only swaps. Raises as :meth:`reload`."""
        with self._lock:
            path = self._path(step)
            t0 = time.monotonic()
            try:
                self._prepared = (step, *self._build(path))
                self.loop.engine.metrics.prepare_seconds.observe(time.monotonic() - t0)
            except (CheckpointError, OSError, ValueError, KeyError) as e:
                raise self._refuse(step, path, e) from e
            return self.status() | {"prepared": step}

    def _path(self, step: int) -> str:
        path = committed_steps(self.run_dir).get(step)
        if path is None:
            raise StepNotFoundError(f"{self.run_dir} has no committed step {step} "
                                    f"(committed: {sorted(committed_steps(self.run_dir))})")
        self.highest_tried = max(self.highest_tried, step)
        return path

    def _pack_after_swap(self, runtime) -> None:
        """Pack the weights just swapped in for oneDNN or in panels on a thread of its own (when
        that is the GEMM backend): they serve at once on numpy's GEMMs, and on the packed ones from
        the step after the packing is done (``pack_s`` in the timings). Packing before the swap took 0.25-2.3 s on
        the 2-core EPYC, which every reload's first response would have waited for."""
        if not self.loop.engine.packs():
            return
        timings = self.timings

        def pack() -> None:
            t = time.monotonic()
            try:
                self.loop.engine.prepare(runtime)
            except Exception:  # costs speed only: the runtime keeps numpy's GEMMs
                log.exception("outlast serve: packing the new weights failed; serving on numpy's GEMMs")
                return
            timings["pack_s"] = round(time.monotonic() - t, 3)

        self._packing = threading.Thread(target=pack, name="outlast-reload-pack", daemon=True)
        self._packing.start()

    def _build(self, path: str) -> tuple:
        waited = 0.0
        if self._packing is not None:  # it reads the serving runtime's arrays, which a later build
            # overwrites once they are retired; and it competes with this build for the cores
            self._packing.join()
            self._packing = None
        if self._warm is not None:
            t = time.monotonic()
            self._warm.join()  # it fills the buffers this build takes
            self._warm, waited = None, time.monotonic() - t
        if self._prepared is not None:  # read ahead but never served: its arrays are free
            self._retire(self._prepared[1])
            self._prepared = None
        t0 = time.monotonic()
        cfg = load_config(path, config=self.config)
        # one verified read, then the serving layout (fused, transposed), both into mapped memory
        into, self._spare = self._spare, None  # from here on they belong to the runtime built now
        try:
            runtime = LlamaRuntime.from_checkpoint(cfg, path, self.prefix, staging=self._staging, into=into,
                                                   direct_io=self.direct_io)
        except BaseException:
            self._spare = into  # nothing was built into them
            raise
        t1 = time.monotonic()
        # the manifest's checksums, which the read verified every chunk against
        identity = checkpoint_identity(path, cfg, self.prefix, runtime.manifest)
        self.timings = {"step": step_of(path), "buffers_wait_s": round(waited, 3),
                        "read_verify_s": round(runtime.load_seconds, 3),
                        "build_s": round(t1 - t0 - runtime.load_seconds, 3),
                        "identity_s": round(time.monotonic() - t1, 3)}
        return runtime, identity

    def reload(self, step: int, *, pin: bool = False) -> dict:
        """Load ``step`` and serve it (blocking until it serves).

        Args:
            step: a committed step of ``run_dir``.
            pin: stop following new commits (an operator chose this step).

        Returns:
            :meth:`status` after the swap.

        Raises:
            StepNotFoundError: ``run_dir`` has no such committed step.
            ModelLoadError: it is incomplete, corrupt or does not fit; the old weights keep
                serving and the step is listed in ``refused``.
        """
        with self._lock:
            if pin:
                self.follow = False
            path = self._path(step)
            t0 = time.monotonic()
            runtime = None
            try:
                if self._prepared is not None and self._prepared[0] == step:
                    (_, runtime, identity), self._prepared = self._prepared, None
                else:
                    runtime, identity = self._build(path)
                old = self.loop.engine.runtime
                t_swap = time.monotonic()
                self.loop.swap_weights(runtime, identity, version_of(step))
                self.timings["swap_s"] = round(time.monotonic() - t_swap, 3)
                self._retire(old)
                self._pack_after_swap(runtime)
            except ServeError as e:
                if isinstance(e, ModelLoadError):  # refused by the engine before it swapped
                    self._retire(runtime)
                    raise self._refuse(step, path, e) from e
                # the loop stopped or timed out: whether it swapped is unknown, so neither
                # runtime's memory may be reused
                self.loop.engine.metrics.reloads.labels("failed").inc()
                raise
            except (CheckpointError, OSError, ValueError, KeyError) as e:
                raise self._refuse(step, path, e) from e
            self.refused.pop(step, None)
            self.step = step
            self.history.append(step)
            m = self.loop.engine.metrics
            m.reloads.labels("ok").inc()
            m.weights_step.set(step)
            m.reload_seconds.observe(time.monotonic() - t0)
            log.warning("outlast serve: now serving step %d (%s) after %.2f s (%s)", step, path, time.monotonic() - t0,
                        ", ".join(f"{k} {v}" for k, v in self.timings.items() if k != "step"))
            return self.status()

    def _refuse(self, step: int, path: str, e: BaseException) -> ModelLoadError:
        why = f"{type(e).__name__}: {e}"
        self.refused[step] = why
        self.loop.engine.metrics.reloads.labels("refused").inc()
        log.warning("outlast serve: refused %s, still serving step %s: %s", path, self.step, why)
        return ModelLoadError(f"step {step} ({path}) was refused and step {self.step} keeps serving: {why}")

    def rollback(self) -> dict:
        """Serve the step served before the current one, and stop following new commits.

        Raises:
            ModelLoadError: nothing to roll back to, or that step is gone or refused now.
        """
        if len(self.history) < 2:
            raise ModelLoadError(f"no earlier step to roll back to (served so far: {self.history})")
        prev = self.history[-2]
        out = self.reload(prev, pin=True)
        del self.history[-2:]  # [..., prev, current, prev] -> [..., prev]: a rollback undoes, it adds nothing
        return out | {"history": list(self.history)}

    def resume_following(self) -> dict:
        """Follow new commits again (the next one newer than any tried is loaded)."""
        self.follow = True
        return self.status()

    # -- the watcher -----------------------------------------------------------------------
    def newest_untried(self) -> int | None:
        steps = [s for s in committed_steps(self.run_dir) if s > self.highest_tried]
        return max(steps) if steps else None

    def _watch(self) -> None:
        prefetched = -1
        while not self._stop.wait(self.poll_s):
            if not self.loop.alive:
                continue
            step = self.newest_untried()
            if step is None:
                continue
            if step > prefetched and not self.direct_io:  # also when a router drives the reloads (--no-follow)
                prefetched = step
                prefetch(committed_steps(self.run_dir).get(step))
            if not self.follow:
                continue
            try:
                self.reload(step)
            except ServeError:
                pass  # refused and recorded; the next commit is tried when it appears

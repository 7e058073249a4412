"""The engine in a process of its own (``outlast serve --engine-process``).

In :class:`~outlast.serve.loop.EngineLoop` the engine thread shares the GIL with the HTTP
event loop: every token streamed to a client is Python that holds it, and a step whose
threads wait for the GIL stalls. That made torch's OpenMP threads (oneDNN's GEMMs and the
attention on both cores, 1.15-1.2x faster steps in process) no faster through the server.
Here the engine runs in a child process (spawned, so no fork of a threaded parent) and only
messages cross: requests and aborts go down a pipe, each step's outputs come back as one
message. The child runs steps on torch's OpenMP threads, and a lone decode's GEMVs on two
OpenBLAS threads, unless ``compute_threads`` is set.

The messages are pickled Python objects between this process and the child it spawned (no
file format involved). Not supported here: hot reload (``--watch``) and ``call()``.

Example:
    >>> loop = ProcessEngineLoop("SmolLM2-135M-Instruct.Q4_1.gguf", EngineConfig()); loop.start()
    >>> async for out in loop.submit(ids, SamplingParams()): ...
    >>> loop.close()
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing as mp
import threading
import time
import types

from .config import EngineConfig
from .errors import BadRequestError, ModelLoadError, ServeError
from .loop import EngineLoop

__all__ = ["ProcessEngineLoop"]


def _child(conn, source: str, ec: EngineConfig, load_kw: dict) -> None:
    """The engine process: load, say hello, then step while there is work, reading messages between steps.

    It ends on a ``stop`` message or when the parent's end of the pipe closes (the parent died:
    ``recv`` raises EOFError), so it never outlives the server. Ctrl-C reaches the whole process
    group; the parent decides, so the child ignores it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from . import load_engine

        eng = load_engine(source, ec, **load_kw)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it there
        conn.send(("fail", f"{type(e).__name__}: {e}"))
        return
    conn.send(("hello", {"model_config": eng.model_config, "max_model_len": eng.max_model_len,
                         "weights_version": eng.weights_version, "kv_blocks": eng.kv.num_blocks,
                         "block_size": eng.kv.block_size}))

    def handle(msg) -> bool:
        kind, arg = msg
        if kind == "add":
            rid, ids, params = arg
            try:
                eng.add_request(rid, ids, params)
            except Exception as e:  # noqa: BLE001 - handed to the waiting request
                conn.send(("err", (rid, isinstance(e, BadRequestError), str(e))))
        elif kind == "abort":
            eng.abort(arg)
        elif kind == "metrics":
            eng._update_gauges()  # gauges are set after each step: an abort since the last one counts now
            conn.send(("metrics", (arg, eng.metrics.render())))
        elif kind == "stop":
            return False
        return True

    def recv():
        try:
            return conn.recv()
        except (EOFError, OSError):  # the server is gone: stop, as on a stop message
            return ("stop", None)

    while True:
        if not eng.has_work() and not handle(recv()):
            return
        while conn.poll():
            if not handle(recv()):
                return
        if eng.has_work():
            outs = eng.step()
            conn.send(("outs", (outs, eng.num_waiting)))
        else:
            conn.send(("outs", ([], eng.num_waiting)))


class _RemoteMetrics:
    def __init__(self, loop: "ProcessEngineLoop"):
        self._loop = loop

    def render(self) -> bytes:
        return self._loop._ask_metrics()


class _RemoteEngine:
    """What the HTTP layer reads of the engine, in the parent: the tokenizer, limits and metrics."""

    def __init__(self, loop: "ProcessEngineLoop", tokenizer, config: EngineConfig, hello: dict):
        self.tokenizer = tokenizer
        self.config = config
        self.model_config = hello["model_config"]
        self.max_model_len = hello["max_model_len"]
        self.weights_version = hello["weights_version"]
        self.metrics = _RemoteMetrics(loop)
        self.kv = types.SimpleNamespace(num_blocks=hello["kv_blocks"], block_size=hello["block_size"])
        self.num_waiting = 0  # as the child last said

    def validate(self, prompt_token_ids, params, prompt_param: str = "prompt") -> None:
        from .engine import LLMEngine

        LLMEngine.validate(self, prompt_token_ids, params, prompt_param)  # the same checks, on the same limits


class ProcessEngineLoop(EngineLoop):
    """An :class:`EngineLoop` whose engine runs in a child process.

    Args:
        source, prefix, config, tokenizer: as :func:`outlast.serve.load_engine` (the child loads them).
        engine_config: limits and cache sizes; with ``compute_threads`` None the child runs its
            steps on torch's OpenMP threads (``compute_threads=1``, ``torch_threads`` = the CPUs, up
            to 2) and a lone decode's GEMVs on as many OpenBLAS threads (``gemv_blas_threads``; torch
            drops to one thread for that step). With the HTTP work in another process, that made a
            lone decode step 31 instead of 37 ms on the 2-core EPYC.
        start_timeout: seconds to wait for the child to load the model.

    Raises (from :meth:`start`):
        ModelLoadError: the child could not load the model (its message).
        ServeError: the child died or did not answer in time.
    """

    def __init__(self, source: str, engine_config: EngineConfig | None = None, *, prefix: str = "model",
                 config: str | None = None, tokenizer: str | None = None, start_timeout: float = 600.0):
        ec = engine_config or EngineConfig()
        if ec.compute_threads is None:
            from .model import _usable_cpus

            cpus = max(1, min(2, _usable_cpus()))
            ec = dataclasses.replace(ec, compute_threads=1, torch_threads=cpus, gemv_blas_threads=cpus)
        self._ec = ec
        self._source, self._load_kw = source, dict(prefix=prefix, config=config, tokenizer=tokenizer)
        self._tok_src = tokenizer or source
        self._start_timeout = start_timeout
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child, source, ec, self._load_kw), name="outlast-engine",
                                 daemon=True)
        self._child_end = child
        self._send_lock = threading.Lock()
        self._metrics_box: dict[int, tuple[threading.Event, list]] = {}
        self._metrics_ids = itertools.count()  # next() on it is atomic
        self.engine = None  # set by start()
        super().__init__(self.engine)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self._forward, name="outlast-engine-send", daemon=True)
        self._reader = threading.Thread(target=self._read, name="outlast-engine-recv", daemon=True)

    @property
    def pid(self) -> int | None:
        """The engine process' id (None before :meth:`start`)."""
        return self._proc.pid

    def start(self) -> None:
        from .tokenizer import load_tokenizer

        self._proc.start()
        self._child_end.close()
        try:
            tok = load_tokenizer(self._tok_src)  # while the child loads the weights
            if not self._conn.poll(self._start_timeout):
                raise ServeError(f"the engine process did not load {self._source} within {self._start_timeout:.0f} s")
            try:
                kind, arg = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(5)
                raise ServeError(f"the engine process exited (code {self._proc.exitcode}) while loading "
                                 f"{self._source}; its error is above in this log") from None
            if kind == "fail":
                raise ModelLoadError(arg)
        except BaseException:
            self._proc.kill()  # no child left behind when starting fails
            self._proc.join(5)
            raise
        self.engine = _RemoteEngine(self, tok, self._ec, arg)
        self._thread.start()
        self._reader.start()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        try:
            self._send(("stop", None))
        except (OSError, ValueError):
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout)
        if self._reader.ident is not None:
            self._reader.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._proc.is_alive() and self.error is None

    def call(self, fn, timeout: float = 30.0):
        raise ServeError("call() runs on the engine's thread; with the engine in its own process it is not available")

    def swap_weights(self, runtime, identity: bytes, version: str, timeout: float = 600.0) -> None:
        raise ServeError("hot reload needs the engine in this process: start the server without --engine-process")

    def _send(self, msg) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _forward(self) -> None:
        """Requests and aborts from the handlers to the child, in order."""
        try:
            while not self._stop.is_set():
                kind, arg = self._inbox.get()
                if kind == "add":
                    with self._lock:
                        self._pending -= 1
                    if arg[0] not in self._streams:
                        continue  # the client left before the request reached the engine
                if kind in ("add", "abort"):
                    self._send((kind, arg))
        except (OSError, ValueError) as e:  # the pipe broke: the child is gone
            self._died(e)

    def _read(self) -> None:
        """Outputs, errors and metrics from the child; its death fails every waiting request."""
        while True:
            try:
                kind, arg = self._conn.recv()
            except (EOFError, OSError) as e:
                if not self._stop.is_set():
                    self._died(e)
                return
            if kind == "outs":
                outs, waiting = arg
                self.engine.num_waiting = waiting
                for o in outs:
                    self._deliver(o.request_id, o)
            elif kind == "err":
                rid, bad, msg = arg
                self._deliver(rid, BadRequestError(msg) if bad else ServeError(msg))
            elif kind == "metrics":
                key, text = arg
                box = self._metrics_box.get(key)
                if box is not None:
                    box[1].append(text)
                    box[0].set()

    def _died(self, e: BaseException) -> None:
        self._proc.join(1.0)
        self.error = ServeError(f"the engine process exited (code {self._proc.exitcode}): {e!r}")
        for rid in list(self._streams):
            self._deliver(rid, self.error)

    def _ask_metrics(self, timeout: float = 10.0) -> bytes:
        if not self.alive:
            raise ServeError(f"the engine process has stopped: {self.error!r}")
        key = next(self._metrics_ids)
        done, box = threading.Event(), []
        self._metrics_box[key] = (done, box)
        try:
            self._send(("metrics", key))
            t0 = time.monotonic()
            while not done.wait(0.1):
                if not self.alive or time.monotonic() - t0 > timeout:
                    raise ServeError("the engine process did not answer for its metrics")
            return box[0]
        finally:
            self._metrics_box.pop(key, None)

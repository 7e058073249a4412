"""The engine loop thread and its asyncio face: HTTP handlers never wait on a step.

:class:`EngineLoop` owns an :class:`~outlast.serve.engine.LLMEngine` and runs it in a daemon
thread. Handlers call :meth:`EngineLoop.submit`, an async iterator of
:class:`~outlast.serve.engine.StepOutput`; adds and aborts travel to the thread through a
``queue.Queue`` and outputs come back through ``loop.call_soon_threadsafe`` into one
``asyncio.Queue`` per request. Leaving the iterator early (a client disconnect) aborts the
request, which frees its KV blocks on the next loop turn.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import traceback
from typing import AsyncIterator

from .engine import LLMEngine, StepOutput
from .errors import OverloadedError, ServeError
from .sampler import SamplingParams

__all__ = ["EngineLoop"]


class EngineLoop:
    """Runs an engine in its own thread.

    Args:
        engine: the engine (touched only by the loop thread once started).

    Example:
        >>> loop = EngineLoop(engine); loop.start()
        >>> async for out in loop.submit(ids, SamplingParams()): ...
        >>> loop.close()
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._pending = 0  # added but not yet seen by the thread
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outlast-engine", daemon=True)
        self.error: BaseException | None = None
        self._swap: tuple | None = None  # new weights waiting for the running requests to finish

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def num_queued(self) -> int:
        """Requests waiting for a first step (the bounded queue's length)."""
        return self.engine.num_waiting + self._pending

    def submit(self, prompt_token_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> AsyncIterator[StepOutput]:
        """Validate and queue a request; returns the async iterator of its outputs.

        Call it from a coroutine on the event loop that will consume the outputs.
        Leaving the iterator before the last output aborts the request.

        Raises:
            BadRequestError: the request cannot be served as asked.
            OverloadedError: the queue is full.
            ServeError: the engine loop has stopped.
        """
        self.engine.validate(prompt_token_ids, params)
        if not self.alive:
            raise ServeError(f"the engine loop has stopped: {self.error!r}")
        with self._lock:
            if self.num_queued() >= self.engine.config.max_waiting:
                raise OverloadedError(f"{self.num_queued()} requests are queued (limit "
                                      f"{self.engine.config.max_waiting}); retry shortly", retry_after=1)
            self._pending += 1
        rid = request_id or f"req-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", (rid, list(prompt_token_ids), params)))
        return self._stream(rid, q)

    async def _stream(self, rid: str, q: asyncio.Queue) -> AsyncIterator[StepOutput]:
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._inbox.put(("abort", rid))

    def call(self, fn, timeout: float = 30.0):
        """Run ``fn(engine)`` on the loop thread and return its result (for tests and stats)."""
        done = threading.Event()
        box: list = []
        self._inbox.put(("call", (fn, box, done)))
        if not done.wait(timeout):
            raise TimeoutError("the engine loop did not answer")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def swap_weights(self, runtime, identity: bytes, version: str, timeout: float = 600.0) -> None:
        """Serve ``runtime`` once the requests running now have finished; blocks until it serves.

        Call it from a thread other than the event loop's (it waits). New requests wait in the
        queue meanwhile (they run on the new weights); nothing is dropped or recomputed.

        Raises:
            ModelLoadError: the new weights do not fit the served architecture (old ones stay).
            ServeError: the loop stopped or did not swap within ``timeout`` seconds.
        """
        if not self.alive:
            raise ServeError(f"the engine loop has stopped ({self.error!r}); no weights can be swapped in")
        done = threading.Event()
        box: list = []
        self._inbox.put(("swap", (runtime, identity, version, done, box)))
        if not done.wait(timeout):
            self._inbox.put(("cancel_swap", done))
            done.wait(30.0)  # the loop either swapped meanwhile or cancels now
            if not box:
                raise ServeError("the engine loop stopped before swapping weights")
        if box[0] is not None:
            raise box[0]

    def _maybe_swap(self) -> None:
        if self._swap is None or not self.engine.swap_ready():
            return
        (runtime, identity, version, done, box), self._swap = self._swap, None
        try:
            self.engine.swap_weights(runtime, identity, version)
            box.append(None)
        except Exception as e:  # noqa: BLE001 - handed to the waiting caller
            self.engine.scheduler.admit_new = True
            box.append(e)
        done.set()

    def _deliver(self, rid: str, item) -> None:
        s = self._streams.get(rid)
        if s is not None:
            s[0].call_soon_threadsafe(s[1].put_nowait, item)

    def _handle(self, msg) -> None:
        kind, arg = msg
        eng = self.engine
        if kind == "add":
            rid, ids, params = arg
            with self._lock:
                self._pending -= 1
            if rid not in self._streams:
                return  # the client left before the request reached the engine
            try:
                eng.add_request(rid, ids, params)
            except Exception as e:  # noqa: BLE001 - handed to the waiting handler
                self._deliver(rid, e)
        elif kind == "abort":
            eng.abort(arg)
        elif kind == "wake":
            pass
        elif kind == "swap":
            if self._swap is not None:  # a newer swap replaces one still waiting
                self._swap[4].append(ServeError("replaced by a newer weight swap before it happened"))
                self._swap[3].set()
            self._swap = arg
            eng.scheduler.admit_new = False
        elif kind == "cancel_swap":
            if self._swap is not None and self._swap[3] is arg:
                self._swap[4].append(ServeError("the engine did not reach a point to swap weights in time "
                                                "(requests still running); the old weights stay"))
                arg.set()
                self._swap = None
                eng.scheduler.admit_new = True
        elif kind == "call":
            fn, box, done = arg
            try:
                box.append(fn(eng))
            except Exception as e:  # noqa: BLE001
                box.append(e)
            done.set()

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                if not eng.has_work():
                    self._handle(self._inbox.get())  # idle: sleep until a message
                try:
                    while True:
                        self._handle(self._inbox.get_nowait())
                except queue.Empty:
                    pass
                self._maybe_swap()
                if self._stop.is_set() or not eng.has_work():
                    continue
                for out in eng.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request
            self.error = e
            traceback.print_exc()
            for rid in list(self._streams):
                self._deliver(rid, ServeError(f"the engine failed: {e!r}"))

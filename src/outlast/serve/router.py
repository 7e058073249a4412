"""``outlast route``: one OpenAI-compatible endpoint in front of several ``outlast serve`` replicas.

The router forwards request bodies unchanged (it parses them only to pick a replica, see
:mod:`outlast.serve.policy`), polls every replica's ``/health`` (``health_interval`` seconds; a
refused connection takes a replica out of rotation at once), and retries a request on another
replica when the chosen one cannot be reached, answers 429/503, or dies before the response's
first event: nothing has reached the client yet, so a retry is invisible. A stream that breaks
after its first event ends with an OpenAI-style ``error`` event and ``data: [DONE]`` so clients
raise instead of taking a truncated answer. With ``run_dir`` it follows a Checkpointer directory
and reloads the replicas one at a time (draining each first), so capacity never drops to zero;
the bearer-token admin routes (:mod:`outlast.serve.router_app`) do the same on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from urllib.parse import urlsplit

import httpx
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge

from .errors import ServeError
from .http1 import BackendError, BackendPool
from .policy import Replica, RoutingConfig, choose, prefix_hashes
from .reload import committed_steps, version_of

__all__ = ["Router", "ReloadFailed", "routing_text"]

log = logging.getLogger("outlast.serve")


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _sse_error(message: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": "replica_failed"}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


def routing_text(body: dict) -> str:
    """The text whose prefix decides cache affinity: the chat messages in order, or the prompt."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        return "".join(f"<{m.get('role')}>{m.get('content')}\n" for m in msgs if isinstance(m, dict))
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1:
        p = p[0]
    if isinstance(p, list):
        return ",".join(map(str, p))
    return p if isinstance(p, str) else ""


class _Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("outlast_router_requests", "Requests by replica and outcome (ok, http_error, "
                                "stream_broken, no_replica)", ["replica", "outcome"], registry=r)
        self.retries = Counter("outlast_router_retries", "Requests moved off a replica before answering",
                               ["replica", "why"], registry=r)
        self.decisions = Counter("outlast_router_decisions", "Routing decisions by reason", ["reason"], registry=r)
        self.up = Gauge("outlast_router_replica_up", "1 while a replica passes health checks", ["replica"], registry=r)
        self.draining = Gauge("outlast_router_replica_draining", "1 while a replica is drained for a reload",
                              ["replica"], registry=r)
        self.outstanding = Gauge("outlast_router_replica_outstanding_requests", "Requests in flight per replica",
                                 ["replica"], registry=r)
        self.down_events = Counter("outlast_router_replica_down", "Times a replica left rotation", ["replica"], registry=r)
        self.reloads = Counter("outlast_router_reloads", "Rolling reloads by outcome", ["outcome"], registry=r)
        self.step = Gauge("outlast_router_weights_step", "Checkpoint step the fleet serves (-1: unknown)", registry=r)
        self.step.set(-1)


class Router:
    """The routing state and the proxy.

    Args:
        backends: replica base URLs (``http://127.0.0.1:8001``).
        config: the routing policy and its knobs.
        admin_token: bearer token of the router's admin routes (None: they answer 403).
        backend_token: bearer token the replicas' admin routes want (default ``admin_token``).
        run_dir: a Checkpointer directory to follow with rolling reloads (the replicas must run
            ``--watch RUN_DIR --no-follow``).
        step: the step the replicas serve at start (default: the newest committed in ``run_dir``).
        health_interval: seconds between health checks.
        request_timeout: seconds a replica may take to answer (and between stream events).
        drain_timeout: seconds a rolling reload waits for a replica's running requests.
        canary_timeout: seconds a rolling reload waits, after a replica swapped, for it to answer
            one request on the new weights before the next replica drains (0: do not wait).

    Example:
        >>> r = Router(["http://127.0.0.1:8001", "http://127.0.0.1:8002"], RoutingConfig("cache_aware"))
        >>> uvicorn.run(create_router_app(r), port=8000)
    """

    def __init__(self, backends: list[str], config: RoutingConfig | None = None, *, admin_token: str | None = None,
                 backend_token: str | None = None, run_dir: str | None = None, step: int | None = None,
                 health_interval: float = 0.2, request_timeout: float = 600.0, drain_timeout: float = 120.0,
                 canary_timeout: float = 2.0):
        if not backends:
            raise ValueError("the router needs at least one --backend URL")
        self.replicas = [Replica(u.rstrip("/")) for u in backends]
        self._addr = {}
        for r in self.replicas:
            u = urlsplit(r.url)
            if u.scheme != "http" or not u.hostname or u.path not in ("", "/"):
                raise ValueError(f"a backend is a base URL like http://127.0.0.1:8001, got {r.url!r}")
            self._addr[r] = (u.hostname, u.port or 80)
        self.config = config or RoutingConfig()
        self.admin_token = admin_token
        self.backend_token = backend_token or admin_token
        self.run_dir = run_dir
        if run_dir is not None and step is None:
            steps = committed_steps(run_dir)
            step = max(steps) if steps else None
        self.step = step
        self.history: list[int] = [step] if step is not None else []
        self.refused: dict[int, str] = {}
        self.highest_tried = step if step is not None else -1
        self.follow = True
        self.health_interval = health_interval
        self.request_timeout = request_timeout
        self.drain_timeout = drain_timeout
        self.canary_timeout = canary_timeout
        self._rollout: str | None = None  # the version a rolling reload is moving the replicas to
        self.m = _Metrics()
        if step is not None:
            self.m.step.set(step)
        self.client: httpx.AsyncClient | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._tasks: list[asyncio.Task] = []
        self._side_tasks: set[asyncio.Task] = set()
        self.supervisor = None  # set by ``outlast serve --replicas``: /fleet then shows pids and restarts

    # -- lifecycle (inside the server's event loop) --------------------------------------
    async def start(self) -> None:
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.request_timeout, connect=2.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        self.backend = BackendPool(connect_timeout=2.0, read_timeout=self.request_timeout)
        self._reload_lock = asyncio.Lock()
        await asyncio.gather(*(self._check(r) for r in self.replicas))
        self._tasks.append(asyncio.create_task(self._health_loop()))
        if self.run_dir is not None:
            self._tasks.append(asyncio.create_task(self._watch_loop()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.client is not None:
            await self.client.aclose()
            await self.backend.aclose()

    def current_path(self) -> str | None:
        """The step folder the fleet serves (a replica restarted by the supervisor starts from it)."""
        if self.run_dir is None or self.step is None:
            return None
        return committed_steps(self.run_dir).get(self.step)

    def status(self) -> dict:
        return {"policy": self.config.policy, "balance_abs": self.config.balance_abs, "step": self.step, "follow": self.follow, "history": list(self.history),
                "refused": {str(k): v for k, v in sorted(self.refused.items())},
                "replicas": [{"url": r.url, "up": r.up, "draining": r.draining, "outstanding": r.outstanding,
                              "outstanding_tokens": r.outstanding_tokens, "weights_version": r.weights_version,
                              "answered": r.answered}
                             for r in self.replicas]} | (
            {"pids": self.supervisor.pids(), "restarts": list(self.supervisor.restarts)} if self.supervisor else {})

    # -- health ----------------------------------------------------------------------------
    def _set_up(self, r: Replica, up: bool, why: str = "") -> None:
        if r.up and not up:
            log.warning("outlast route: %s is out of rotation: %s", r.url, why)
            self.m.down_events.labels(r.url).inc()
        if not r.up and up:
            r.forget()  # a replica that comes back (restarted) has an empty prefix cache
        r.up = up
        self.m.up.labels(r.url).set(1 if up else 0)

    async def _check(self, r: Replica) -> None:
        resp = None
        try:
            # the lean client (not httpx): at 5 checks a second per replica its CPU counts
            resp = await self.backend.request(*self._addr[r], b"GET", b"/health",
                                              timeout=max(1.0, 4 * self.health_interval))
            body = await resp.read()
            if resp.status == 200:
                r.weights_version = json.loads(body).get("weights_version", "")
                r.slow_checks = 0
                self._set_up(r, True)
                if (self.run_dir is not None and self.step is not None and not r.catching_up
                        and r.weights_version != version_of(self.step) and not self._reload_lock.locked()):
                    r.catching_up = True
                    t = asyncio.create_task(self._catch_up(r))
                    self._side_tasks.add(t)
                    t.add_done_callback(self._side_tasks.discard)
            else:
                self._set_up(r, False, f"/health answered {resp.status}")
        except BackendError as e:
            if e.timed_out:  # a busy replica can be slow to answer; a dead one refuses at once
                r.slow_checks += 1
                if r.slow_checks >= 3:
                    self._set_up(r, False, f"/health timed out {r.slow_checks} times in a row: {e}")
            else:
                self._set_up(r, False, f"{type(e).__name__}: {e}")
        except (ValueError, AttributeError) as e:
            self._set_up(r, False, f"/health did not answer JSON: {e}")
        finally:
            if resp is not None:
                await resp.aclose()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await asyncio.gather(*(self._check(r) for r in self.replicas))

    # -- proxy -----------------------------------------------------------------------------
    def _take(self, r: Replica, tokens: int) -> None:
        r.outstanding += 1
        r.outstanding_tokens += tokens
        self.m.outstanding.labels(r.url).set(r.outstanding)

    def _release(self, r: Replica, tokens: int) -> None:
        r.outstanding -= 1
        r.outstanding_tokens -= tokens
        self.m.outstanding.labels(r.url).set(r.outstanding)

    async def proxy(self, path: str, raw: bytes, send, disconnected: asyncio.Event) -> None:
        """Answer one POST ``raw`` body on ASGI ``send``, from a replica (retrying on others).

        The hot path talks ASGI and a lean HTTP/1.1 client (:mod:`outlast.serve.http1`) directly:
        FastAPI's routing, httpx's request models and httpcore's h11 layers cost more CPU than the
        rest of the router together.
        """
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # the replica answers the 400
        if not isinstance(body, dict):
            body = {}
        text = routing_text(body)
        hashes = prefix_hashes(text, self.config.chunk_chars) if self.config.policy == "cache_aware" else []
        mt = body.get("max_tokens") or body.get("max_completion_tokens")
        tokens = len(text) // 4 + (mt if isinstance(mt, int) else 256)
        tried: set = set()
        why_failed = "no replica is up"
        bpath = path.encode()
        while True:
            r, why = choose(self.replicas, self.config, hashes, tried, self._rollout)
            if r is None:
                break
            tried.add(r)
            self.m.decisions.labels(why).inc()
            self._take(r, tokens)
            resp = None
            try:
                resp = await self.backend.request(*self._addr[r], b"POST", bpath, raw,
                                                  b"content-type: application/json\r\n")
                ctype = resp.header(b"content-type")
                if resp.status in (429, 503) and any(x.available and x not in tried for x in self.replicas):
                    self.m.retries.labels(r.url, str(resp.status)).inc()
                    why_failed = f"{r.url} answered {resp.status}"
                    continue
                out_headers = [(b"content-type", ctype or b"application/json"), (b"x-outlast-replica", r.url.encode())]
                retry_after = resp.header(b"retry-after")
                if retry_after:
                    out_headers.append((b"retry-after", retry_after))
                it = resp.aiter()
                if ctype.startswith(b"text/event-stream"):
                    first, rest = await _first_events(it)
                    r.remember(hashes, self.config.tree_chunks)
                    r.answered += resp.status < 400
                    await send({"type": "http.response.start", "status": resp.status,
                                "headers": out_headers + [(b"cache-control", b"no-cache")]})
                    await self._relay(r, it, first, rest, send, disconnected)
                    return
                content = b"".join([c async for c in it])
            except _NETWORK as e:
                why_failed = f"{r.url}: {type(e).__name__}: {e}"
                self._set_up(r, False, why_failed)
                self.m.retries.labels(r.url, "unreachable").inc()
                continue
            finally:
                self._release(r, tokens)
                if resp is not None:
                    await resp.aclose()
            r.remember(hashes, self.config.tree_chunks)
            r.answered += resp.status < 400
            self.m.requests.labels(r.url, "ok" if resp.status < 400 else "http_error").inc()
            await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
            await send({"type": "http.response.body", "body": content})
            return
        self.m.requests.labels("none", "no_replica").inc()
        err = json.dumps({"error": {"message": f"no replica could take the request ({why_failed}); retry shortly",
                                    "type": "server_error", "param": None, "code": "no_replica"}}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": err})

    async def _relay(self, r: Replica, it, first: bytes, rest: bytes, send, disconnected: asyncio.Event) -> None:
        """Forward whole events; a stream that breaks gets an error event instead of a silent end."""
        buf, done = rest, first.rstrip().endswith(b"data: [DONE]")
        await send({"type": "http.response.body", "body": first, "more_body": True})
        try:
            async for chunk in it:
                if disconnected.is_set():
                    return  # the client left: closing our side makes the replica abort the request
                buf += chunk
                if b"\n\n" in buf:
                    cut = buf.rindex(b"\n\n") + 2
                    out, buf = buf[:cut], buf[cut:]
                    done = out.rstrip().endswith(b"data: [DONE]")
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            if not done:
                raise _StreamEnded("the stream ended without data: [DONE]")
            self.m.requests.labels(r.url, "ok").inc()
            await send({"type": "http.response.body", "body": b""})
        except _NETWORK as e:
            self._set_up(r, False, f"stream broke: {type(e).__name__}: {e}")
            self.m.requests.labels(r.url, "stream_broken").inc()
            await send({"type": "http.response.body", "more_body": False, "body": _sse_error(
                f"the replica {r.url} failed while streaming ({type(e).__name__}: {e}); the response above is "
                f"incomplete: retry the request")})

    async def get_any(self, path: str, send) -> None:
        """Answer a GET (``/v1/models``) on ASGI ``send`` from the first available replica."""
        for r in self.replicas:
            if r.available:
                resp = None
                try:
                    resp = await self.backend.request(*self._addr[r], b"GET", path.encode())
                    content = await resp.read()
                except BackendError as e:
                    self._set_up(r, False, f"{type(e).__name__}: {e}")
                    continue
                finally:
                    if resp is not None:
                        await resp.aclose()
                await send({"type": "http.response.start", "status": resp.status,
                            "headers": [(b"content-type", resp.header(b"content-type") or b"application/json")]})
                await send({"type": "http.response.body", "body": content})
                return
        err = json.dumps({"error": {"message": "no replica is up; retry shortly", "type": "server_error",
                                    "param": None, "code": "no_replica"}}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": err})

    # -- rolling reloads -------------------------------------------------------------------
    async def rolling_reload(self, step: int, *, pin: bool = False) -> dict:
        """Move every replica to ``step``, one at a time, so the others keep the capacity.

        While another replica is available, a replica stops getting new requests and reads, verifies
        and builds the step while its running requests finish, then swaps once they have: the drain's
        wait is not added to the reload's. (Its engine thread slows the read only while those last
        requests run: a read next to a busy engine was 1.05-1.6x slower in an in-process A/B with
        SmolLM2-135M at load average 10 on 2 cores.) The others keep the capacity meanwhile.
        The only available replica reads the step while still serving (``prepare_only``) and is
        drained only for the swap. One at a time also keeps the reading off the other replicas' cores.

        Once a replica serves the step, new requests go to the replicas on it (see ``prefer`` in
        :func:`~outlast.serve.policy.choose`), and the next replica drains only after the swapped
        one has answered a request on the new weights (at most ``canary_timeout``): the new
        weights answer first, without the next replica's read competing for the cores.

        Raises:
            ReloadFailed: a replica refused the step (replicas already swapped go back); old weights serve.
        """
        async with self._reload_lock:
            if pin:
                self.follow = False
            self.highest_tried = max(self.highest_tried, step)
            prev, moved = self.step, []
            try:
                return await self._roll(step, prev, moved)
            finally:
                self._rollout = None

    async def _roll(self, step: int, prev: int | None, moved: list) -> dict:
        todo = [r for r in self.replicas if r.up]
        for k, r in enumerate(todo):
            if k and moved and self.canary_timeout > 0:
                await self._canary(moved[-1])
            if any(x is not r and x.available for x in self.replicas):
                status, payload = await self._swap_one(r, step)  # drained: reads on an idle engine
            else:
                status, payload = await self._admin(r, {"step": step, "prepare_only": True})
                if status == 200:
                    status, payload = await self._swap_one(r, step)
            if status == 200:
                log.warning("outlast route: %s serves step %d (%s)", r.url, step, payload.get("timings"))
            if status in (404, 422):
                self._rollout = None
                for m in moved:
                    if prev is not None:
                        await self._swap_one(m, prev)
                raise self._failed(step, prev, r, status, payload)
            if status == 200:
                moved.append(r)
                self._rollout = version_of(step)
            # else unreachable (dead or restarting): the health checks catch it up later
        if not moved:
            raise self._failed(step, prev, None, 502, {"error": {"message": "no replica could be reached"}})
        self.step = step
        self.history.append(step)
        self.refused.pop(step, None)
        self.m.step.set(step)
        self.m.reloads.labels("ok").inc()
        return self.status()

    async def _canary(self, r: Replica) -> None:
        """Wait until ``r`` (just swapped) answers one more request, at most ``canary_timeout``."""
        seen, t0 = r.answered, time.monotonic()
        while r.answered == seen and r.up and time.monotonic() < t0 + self.canary_timeout:
            await asyncio.sleep(0.005)
        if r.answered > seen:
            log.warning("outlast route: canary: %s answered on %s after %.2f s", r.url, r.weights_version,
                        time.monotonic() - t0)
        else:
            log.warning("outlast route: canary: %s answered nothing on %s in %.1f s (%s); the rollout goes on",
                        r.url, r.weights_version, self.canary_timeout, "up" if r.up else "down")

    def _failed(self, step: int, prev: int | None, r: Replica | None, status: int, payload: dict) -> "ReloadFailed":
        msg = (payload.get("error") or {}).get("message", str(payload))
        if status in (404, 422):
            self.refused[step] = msg
        self.m.reloads.labels("refused" if status in (404, 422) else "failed").inc()
        where = r.url if r is not None else "the fleet"
        return ReloadFailed(status, f"{where} did not load step {step}: {msg}; step {prev} keeps serving")

    async def _admin(self, r: Replica, body: dict) -> tuple[int, dict]:
        try:
            resp = await self.client.post(r.url + "/admin/reload", json=body, timeout=self.request_timeout,
                                          headers={"authorization": f"Bearer {self.backend_token}"})
        except httpx.TransportError as e:
            return 502, {"error": {"message": f"{type(e).__name__}: {e}"}}
        try:
            return resp.status_code, resp.json()
        except ValueError:
            return resp.status_code, {"error": {"message": resp.text}}

    async def _swap_one(self, r: Replica, step: int) -> tuple[int, dict]:
        others = any(x is not r and x.available for x in self.replicas)
        try:
            if others:  # capacity stays on the others while this one swaps
                r.draining = True
                self.m.draining.labels(r.url).set(1)
                # The replica reads, verifies and builds the step while its last requests finish
                # (no new ones reach it), so the drain's wait (1.2 s of a 3.3 s reload in one
                # bench/fleet.py run) is not added to the reload's.
                prepared = asyncio.create_task(self._admin(r, {"step": step, "prepare_only": True}))
                deadline = time.monotonic() + self.drain_timeout
                while r.outstanding and time.monotonic() < deadline and any(
                        x is not r and x.available for x in self.replicas):
                    await asyncio.sleep(0.01)
                status, payload = await prepared
                if status != 200:
                    return status, payload
            status, payload = await self._admin(r, {"step": step})
            if status == 200:
                r.weights_version = version_of(step)
                r.forget()
            return status, payload
        finally:
            r.draining = False
            self.m.draining.labels(r.url).set(0)

    async def _catch_up(self, r: Replica) -> None:
        """A replica that came back on other weights (restarted mid-reload) is moved to the fleet's step."""
        try:
            async with self._reload_lock:
                if r.up and self.step is not None and r.weights_version != version_of(self.step):
                    status, payload = await self._swap_one(r, self.step)
                    if status != 200:
                        log.warning("outlast route: %s could not catch up to step %s: %s", r.url, self.step, payload)
        finally:
            r.catching_up = False

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)  # as often as the replicas poll; a listing costs ~0.13 ms of CPU
            if not self.follow:
                continue
            newer = [s for s in committed_steps(self.run_dir) if s > self.highest_tried]
            if not newer:
                continue
            step = max(newer)
            try:
                await self.rolling_reload(step)
                log.warning("outlast route: the fleet serves step %d", step)
            except ReloadFailed as e:
                log.warning("outlast route: %s", e)


class _StreamEnded(Exception):
    """A replica's stream stopped without its end marker."""


_NETWORK = (BackendError, _StreamEnded)


async def _first_events(it) -> tuple[bytes, bytes]:
    """Read until one whole event: before it, a failure can still be retried elsewhere."""
    buf = b""
    async for chunk in it:
        buf += chunk
        if b"\n\n" in buf:
            cut = buf.rindex(b"\n\n") + 2
            return buf[:cut], buf[cut:]
    raise _StreamEnded("the replica closed the stream before its first event")


class ReloadFailed(ServeError):
    """A rolling reload stopped: a replica refused the step or could not be reached."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

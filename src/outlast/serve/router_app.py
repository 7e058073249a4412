"""The HTTP face of ``outlast route``: a plain ASGI function for the two proxied POST routes in front
of a FastAPI app for the rest (``/v1/models``, ``/health``, ``/fleet``, ``/metrics``, ``/admin/*``).

The proxied routes (and ``GET /v1/models``) skip FastAPI because its routing and request models cost
more CPU per request than the rest of the router together; they read the body, watch for the client leaving (so a stream whose
client is gone stops and the replica aborts the request), and hand over to :meth:`Router.proxy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .admin import require_token
from .errors import AdminAuthError
from .router import ReloadFailed, Router, _error

__all__ = ["create_router_app", "run_router"]


_PROXIED = frozenset(("/v1/completions", "/v1/chat/completions"))


def create_router_app(router: Router):
    """The router's ASGI application: ``/v1/*`` proxied, ``/health``, ``/metrics``, ``/fleet``, ``/admin/*``.

    The two POST routes are answered by a plain ASGI function in front of FastAPI (which serves the rest).

    Example:
        >>> app = create_router_app(Router(["http://127.0.0.1:8001"]))
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="outlast route", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(AdminAuthError)
    async def _on_auth(_, e: AdminAuthError):
        return _error(e.status, str(e), "authentication_error" if e.status == 401 else "permission_error", e.code,
                      headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

    @app.exception_handler(ReloadFailed)
    async def _on_reload(_, e: ReloadFailed):
        return _error(e.status if e.status in (404, 422) else 502, str(e), "invalid_request_error", "reload_failed", "step")

    @app.get("/health")
    async def health():
        up = sum(r.up for r in router.replicas)
        if not up:
            return _error(503, "no replica is up", "server_error", "no_replica")
        return {"status": "ok", "replicas_up": up, "replicas": len(router.replicas)}

    @app.get("/fleet")
    async def fleet():
        return router.status()

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(router.m.registry), media_type=CONTENT_TYPE_LATEST)

    def admin(request: Request) -> None:
        require_token(request.headers.get("authorization"), router.admin_token)
        if router.run_dir is None:
            raise AdminAuthError("reloads are off: start the router with --watch RUN_DIR", 403, "reload_disabled")

    @app.get("/admin/weights")
    async def admin_weights(request: Request):
        admin(request)
        return router.status()

    @app.post("/admin/reload")
    async def admin_reload(request: Request):
        admin(request)
        try:
            step = json.loads(await request.body()).get("step")
        except (ValueError, AttributeError):
            step = None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            return _error(400, f"the body must be {{\"step\": N}} with N a non-negative integer, got step={step!r}",
                          "invalid_request_error", None, "step")
        return await router.rolling_reload(step, pin=True)

    @app.post("/admin/rollback")
    async def admin_rollback(request: Request):
        admin(request)
        if len(router.history) < 2:
            return _error(409, f"no earlier step to roll back to (served so far: {router.history})",
                          "invalid_request_error", "nothing_to_roll_back")
        prev = router.history[-2]
        out = await router.rolling_reload(prev, pin=True)
        del router.history[-3:-1]
        return out | {"history": list(router.history)}

    @app.post("/admin/follow")
    async def admin_follow(request: Request):
        admin(request)
        router.follow = True
        return router.status()

    async def asgi(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/v1/models":
            return await router.get_any("/v1/models", send)
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _PROXIED:
            return await app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        disconnected = asyncio.Event()

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        watcher = asyncio.create_task(watch())
        try:
            await router.proxy(scope["path"], b"".join(chunks), send, disconnected)
        finally:
            watcher.cancel()

    return asgi


def run_router(router: Router, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the router until interrupted (blocking).

    Example:
        >>> run_router(Router(["http://127.0.0.1:8001"]), port=8000)
    """
    import uvicorn

    from .server import bind

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(create_router_app(router), log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])

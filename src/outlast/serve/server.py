"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) over an :class:`~outlast.serve.loop.EngineLoop`.

Routes: ``/v1/completions``, ``/v1/chat/completions`` (both with ``stream: true`` as
server-sent events ending in ``data: [DONE]`` and ``stream_options.include_usage``),
``/v1/models``, ``/health`` and ``/metrics``. Request bodies are parsed here, strictly:
invalid UTF-8, malformed JSON, an unknown model, wrong types or out-of-range values get
HTTP 400 with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``; a
full queue gets 429 with ``Retry-After``. Handlers only enqueue and await, so HTTP never
blocks the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from .admin import require_token
from .errors import AdminAuthError, BadRequestError, ModelLoadError, OverloadedError, ServeError, StepNotFoundError
from .loop import EngineLoop
from .sampler import SamplingParams

__all__ = ["create_app", "serve", "ServerThread"]


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _bad(message: str, param: str | None = None) -> BadRequestError:
    return BadRequestError(message, param=param)


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def _sampling(body: dict, default_max: int, max_key: tuple[str, ...] = ("max_tokens",)) -> SamplingParams:
    max_tokens = default_max
    for k in max_key:
        if body.get(k) is not None:
            max_tokens = body[k]
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise _bad(f"{k} must be an integer >= 1, got {max_tokens!r}", k)
    n = body.get("n", 1)
    if n != 1:
        raise _bad(f"only n=1 is supported, got {n!r}: send n requests instead", "n")
    for k in ("logprobs", "top_logprobs"):  # chat: logprobs true / top_logprobs N; completions: logprobs N
        if body.get(k) not in (None, False, 0):
            raise _bad(f"{k} is not supported by this server; leave it out (or null)", k)
    stop = body.get("stop")
    if stop is None:
        stop = []
    kw = dict(max_tokens=max_tokens, stop=stop)
    for k, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("seed", None),
                       ("stop_token_ids", []), ("ignore_eos", False)):
        v = body.get(k)
        kw[k] = default if v is None else v
    if not isinstance(kw["ignore_eos"], bool):
        raise _bad("ignore_eos must be a boolean", "ignore_eos")
    return SamplingParams(**kw)


def _stream_opts(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("stream_options must be an object", "stream_options")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise _bad("stream_options.include_usage must be a boolean", "stream_options")
    return stream, usage


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise _bad(f"messages[{i}] must be an object with a role of system, user, assistant or tool", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise _bad(f"messages[{i}].content parts must be text parts", "messages")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def create_app(loop: EngineLoop, model_name: str, weights=None, admin_token: str | None = None) -> FastAPI:
    """The FastAPI application serving ``model_name`` through ``loop``.

    Args:
        loop: a started :class:`EngineLoop`.
        model_name: the id clients send as ``model`` (and ``/v1/models`` lists).
        weights: a :class:`~outlast.serve.reload.WeightsManager` for hot reloads (the admin routes
            ``GET /admin/weights``, ``POST /admin/reload {"step": N}``, ``/admin/rollback``, ``/admin/follow``).
        admin_token: the bearer token the admin routes require (None: they answer 403).

    Returns:
        The application (run it with uvicorn, or :func:`serve`).

    Example:
        >>> app = create_app(loop, "smollm2"); uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    app = FastAPI(title="outlast serve", docs_url=None, redoc_url=None, openapi_url=None)
    engine = loop.engine
    tok = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(BadRequestError)
    async def _on_bad(_, e: BadRequestError):
        return _error(400, str(e), "invalid_request_error", e.param)

    @app.exception_handler(OverloadedError)
    async def _on_overload(_, e: OverloadedError):
        return _error(429, str(e), "rate_limit_error", None, "queue_full", headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(AdminAuthError)
    async def _on_auth(_, e: AdminAuthError):
        return _error(e.status, str(e), "authentication_error" if e.status == 401 else "permission_error", None,
                      e.code, headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

    @app.exception_handler(StepNotFoundError)
    async def _on_no_step(_, e: StepNotFoundError):
        return _error(404, str(e), "invalid_request_error", "step", "step_not_found")

    @app.exception_handler(ModelLoadError)
    async def _on_refused(_, e: ModelLoadError):
        return _error(422, str(e), "invalid_request_error", "step", "checkpoint_refused")

    @app.exception_handler(ServeError)
    async def _on_serve(_, e: ServeError):
        return _error(503, str(e), "server_error", None, None, headers={"Retry-After": "5"})

    def check_model(body: dict) -> None:
        m = body.get("model")
        if m is not None and m != model_name:
            raise BadRequestError(f"the model {m!r} does not exist; this server serves {model_name!r}", param="model")

    @app.get("/health")
    async def health():
        if not loop.alive:
            return _error(503, f"the engine loop has stopped: {loop.error!r}", "server_error")
        return {"status": "ok", "weights_version": engine.weights_version}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "outlast", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        # off the event loop: with the engine in its own process, rendering waits for its answer
        return Response(await run_in_threadpool(engine.metrics.render), media_type=CONTENT_TYPE_LATEST)

    async def admin(request: Request):
        require_token(request.headers.get("authorization"), admin_token)
        if weights is None:
            raise AdminAuthError("hot reload is off: start the server with --watch RUN_DIR", 403, "reload_disabled")
        return weights

    @app.get("/admin/weights")
    async def admin_weights(request: Request):
        return (await admin(request)).status()

    @app.post("/admin/reload")
    async def admin_reload(request: Request):
        wm = await admin(request)
        body = await _json_body(request)
        step = body.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise _bad(f"step must be a non-negative integer, got {step!r}", "step")
        if body.get("prepare_only") is True:  # read and verify now, swap on a later call (rolling reloads)
            return await asyncio.to_thread(wm.prepare, step)
        return await asyncio.to_thread(wm.reload, step, pin=True)

    @app.post("/admin/rollback")
    async def admin_rollback(request: Request):
        return await asyncio.to_thread((await admin(request)).rollback)

    @app.post("/admin/follow")
    async def admin_follow(request: Request):
        return (await admin(request)).resume_following()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        else:
            raise _bad("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")
        params = _sampling(body, 16)
        stream, usage = _stream_opts(body)
        return await _respond(loop, ids, params, stream, usage, chat=False, model=model_name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json_body(request)
        check_model(body)
        ids = tok.chat(_messages(body))
        if len(ids) >= engine.max_model_len:
            raise _bad(f"the messages have {len(ids)} tokens; this model's context is {engine.max_model_len}", "messages")
        params = _sampling(body, engine.max_model_len - len(ids), ("max_tokens", "max_completion_tokens"))
        stream, usage = _stream_opts(body)
        engine.validate(ids, params, prompt_param="messages")
        return await _respond(loop, ids, params, stream, usage, chat=True, model=model_name)

    return app


async def _respond(loop: EngineLoop, ids: list[int], params: SamplingParams, stream: bool, include_usage: bool,
                   *, chat: bool, model: str):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    gen = loop.submit(ids, params, request_id=rid)

    def usage_of(o) -> dict:
        u = {"prompt_tokens": o.num_prompt_tokens, "completion_tokens": o.num_output_tokens,
             "total_tokens": o.num_prompt_tokens + o.num_output_tokens}
        if o.num_cached_tokens:
            u["prompt_tokens_details"] = {"cached_tokens": o.num_cached_tokens}
        return u

    if not stream:
        text, last = [], None
        async with contextlib.aclosing(gen):
            async for o in gen:
                text.append(o.text)
                last = o
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                   "finish_reason": last.finish_reason} if chat else
                  {"index": 0, "text": content, "logprobs": None, "finish_reason": last.finish_reason})
        return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": last.weights_version,
                "choices": [choice], "usage": usage_of(last)}

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    fingerprint = loop.engine.weights_version  # until the first output says which weights run it

    def event(choices: list, usage=None) -> str:
        d = {"id": rid, "object": chunk_obj, "created": created, "model": model, "system_fingerprint": fingerprint,
             "choices": choices}
        if include_usage:
            d["usage"] = usage
        return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

    async def sse():
        nonlocal fingerprint
        async with contextlib.aclosing(gen):
            last = None
            try:
                async for o in gen:
                    if last is None and chat:  # sent with the first token: it then names the weights that run it
                        fingerprint = o.weights_version
                        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}])
                    last = o
                    fingerprint = o.weights_version
                    if not o.text and not o.finished:
                        continue
                    if chat:
                        delta = {"content": o.text} if o.text else {}
                        yield event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": o.finish_reason}])
                    else:
                        yield event([{"index": 0, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}])
            except ServeError as e:
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
            if include_usage and last is not None:
                yield event([], usage_of(last))
            yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it a keep-alive client's second request waited ~40 ms
    # (the response's header and body writes held by Nagle until the client's delayed ACK).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def serve(loop: EngineLoop, model_name: str, host: str = "127.0.0.1", port: int = 8000, *, weights=None,
          admin_token: str | None = None) -> None:
    """Serve until interrupted (blocking); ``weights`` and ``admin_token`` as in :func:`create_app`.

    Example:
        >>> serve(loop, "smollm2", "127.0.0.1", 8000)
    """
    import uvicorn

    app = create_app(loop, model_name, weights, admin_token)
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


class ServerThread:
    """A uvicorn server on a background thread (tests, benchmarks, notebooks).

    Example:
        >>> with ServerThread(loop, "m") as srv: httpx.get(srv.url + "/health")
    """

    def __init__(self, loop: EngineLoop, model_name: str, host: str = "127.0.0.1", port: int = 0, *, weights=None,
                 admin_token: str | None = None):
        import uvicorn

        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(loop, model_name, weights, admin_token), log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise ServeError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    def close(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

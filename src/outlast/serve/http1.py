"""A lean HTTP/1.1 client for the router's hot path: keep-alive connections to the replicas, one write per request.

The router talks only to ``outlast serve`` replicas on loopback, whose answers are either a body with
``content-length`` or a chunked stream (server-sent events). httpcore over h11 and anyio spent most
of the router's CPU per request (two writes per request, layers of events and state machines), and
a raw asyncio pipe showed that the sockets themselves add under 0.3 ms; this client does only what
those answers need. Any failure to talk to a replica is a :class:`BackendError`; a request on a
reused keep-alive connection that the replica had closed meanwhile is retried once on a new one
(nothing was sent to the engine then), so the router does not mistake an idle timeout for a
dead replica.
"""

from __future__ import annotations

import asyncio
import socket

__all__ = ["BackendError", "BackendPool", "BackendResponse"]


class BackendError(Exception):
    """The replica could not be reached, closed the connection, sent something malformed, or timed out
    (then ``timed_out`` is True: a busy replica, not necessarily a dead one)."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


class _Conn:
    __slots__ = ("reader", "writer", "key")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: tuple[str, int]):
        self.reader, self.writer, self.key = reader, writer, key

    def close(self) -> None:
        self.writer.close()


class BackendResponse:
    """Status, headers (names lower-cased) and the body, read as it arrives with :meth:`aiter`."""

    __slots__ = ("status", "headers", "_conn", "_pool", "_length", "_chunked", "_done", "_keep", "_timeout")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], conn: _Conn, pool: "BackendPool",
                 timeout: float):
        self.status, self.headers, self._conn, self._pool = status, headers, conn, pool
        self._length: int | None = None
        self._chunked = False
        self._keep = True
        for k, v in headers:
            if k == b"content-length":
                self._length = int(v)
            elif k == b"transfer-encoding":
                self._chunked = b"chunked" in v.lower()
            elif k == b"connection" and v.lower() == b"close":
                self._keep = False
        if self._length is None and not self._chunked:
            self._keep = False  # the body runs to the end of the connection
        self._done = self._length == 0 and not self._chunked
        self._timeout = timeout

    def header(self, name: bytes) -> bytes:
        for k, v in self.headers:
            if k == name:
                return v
        return b""

    async def aiter(self):
        """The body's bytes as they arrive (chunked encoding removed)."""
        r = self._conn.reader
        try:
            if self._chunked:
                while True:
                    async with asyncio.timeout(self._timeout):
                        line = await r.readuntil(b"\r\n")
                    size = int(line.split(b";", 1)[0], 16)
                    if size == 0:
                        async with asyncio.timeout(self._timeout):
                            while await r.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                                pass
                        break
                    async with asyncio.timeout(self._timeout):
                        data = await r.readexactly(size + 2)
                    yield data[:-2]
            elif self._length is not None:
                left = self._length
                while left:
                    async with asyncio.timeout(self._timeout):
                        data = await r.read(min(left, 1 << 16))
                    if not data:
                        raise BackendError(f"the replica closed the connection with {left} bytes of the body unsent")
                    left -= len(data)
                    yield data
            else:
                while True:
                    async with asyncio.timeout(self._timeout):
                        data = await r.read(1 << 16)
                    if not data:
                        break
                    yield data
            self._done = True
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as e:
            raise BackendError(f"{type(e).__name__}: {e}", isinstance(e, TimeoutError)) from e

    async def read(self) -> bytes:
        return b"".join([c async for c in self.aiter()])

    async def aclose(self) -> None:
        """Give the connection back for reuse when the body was read whole, else close it (the replica
        then sees the client leave and aborts the request)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep:
            self._pool._release(conn)
        else:
            conn.close()


class BackendPool:
    """Keep-alive connections per ``(host, port)``.

    Args:
        connect_timeout: seconds to open a connection.
        read_timeout: seconds the replica may take to send the response head, and between body reads.
        max_idle: idle connections kept per replica.

    Example:
        >>> pool = BackendPool()
        >>> resp = await pool.request("127.0.0.1", 8001, b"POST", b"/v1/completions", body)
        >>> data = await resp.read(); await resp.aclose()
    """

    def __init__(self, connect_timeout: float = 2.0, read_timeout: float = 600.0, max_idle: int = 256):
        self.connect_timeout, self.read_timeout, self.max_idle = connect_timeout, read_timeout, max_idle
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    async def _connect(self, key: tuple[str, int]) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(*key, limit=1 << 20)
        except (OSError, TimeoutError) as e:
            raise BackendError(f"cannot connect to {key[0]}:{key[1]}: {type(e).__name__}: {e}",
                               isinstance(e, TimeoutError)) from e
        sock = writer.get_extra_info("socket")
        if sock is not None:  # the request is one write; never hold it back for an ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(reader, writer, key)

    def _release(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) < self.max_idle and not conn.reader.at_eof():
            idle.append(conn)
        else:
            conn.close()

    async def request(self, host: str, port: int, method: bytes, path: bytes, body: bytes = b"",
                      headers: bytes = b"", timeout: float | None = None) -> BackendResponse:
        """Send one request and read the response head; the body is read from the returned response.

        Args:
            headers: extra header lines, each ending with ``\\r\\n``.
            timeout: seconds for the head and between body reads (default ``read_timeout``).

        Raises:
            BackendError: the replica could not be reached or answered malformed or too late.
        """
        key = (host, port)
        head = (b"%s %s HTTP/1.1\r\nhost: %s:%d\r\n%scontent-length: %d\r\n\r\n"
                % (method, path, host.encode(), port, headers, len(body)))
        payload = head + body
        idle = self._idle.get(key)
        timeout = self.read_timeout if timeout is None else timeout
        for attempt in (0, 1):
            reused = bool(idle) and attempt == 0
            conn = idle.pop() if reused else await self._connect(key)
            try:
                conn.writer.write(payload)
                async with asyncio.timeout(timeout):
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as e:
                conn.close()
                if reused and isinstance(e, (ConnectionError, asyncio.IncompleteReadError)) and not (
                        isinstance(e, asyncio.IncompleteReadError) and e.partial):
                    continue  # an idle connection the replica had closed: nothing reached it; once more, fresh
                raise BackendError(f"{type(e).__name__}: {e}", isinstance(e, TimeoutError)) from e
            try:
                lines = raw[:-4].split(b"\r\n")
                status = int(lines[0].split(b" ", 2)[1])
                hdrs = []
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    hdrs.append((k.strip().lower(), v.strip()))
            except (IndexError, ValueError) as e:
                conn.close()
                raise BackendError(f"malformed response head from {host}:{port}: {raw[:200]!r}") from e
            return BackendResponse(status, hdrs, conn, self, timeout)
        raise BackendError(f"{host}:{port} closed two connections in a row")  # pragma: no cover - loop returns

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()

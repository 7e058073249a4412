"""The router's HTTP/1.1 client against a scripted asyncio server on loopback: bodies by length and chunked,
keep-alive reuse, an idle connection the server closed (retried once, invisibly), and a dead server."""

from __future__ import annotations

import asyncio

import pytest

from outlast.serve.http1 import BackendError, BackendPool


async def _server(answers: list[bytes], close_after_each: bool = False):
    """Answers the i-th request on any connection with ``answers[i]``; records each connection."""
    conns = []
    n = 0

    async def handle(reader, writer):
        nonlocal n
        conns.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await reader.readexactly(length)
                writer.write(answers[n])
                n += 1
                await writer.drain()
                if close_after_each:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], conns


def test_lengths_chunks_reuse_stale_and_dead():
    async def main():
        sized = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
        chunked = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                   b"6\r\ndata: \r\n3\r\nx\n\n\r\n0\r\n\r\n")
        srv, port, conns = await _server([sized, chunked, sized])
        pool = BackendPool(read_timeout=10)
        r = await pool.request("127.0.0.1", port, b"POST", b"/v1/completions", b"{}")
        assert (r.status, r.header(b"content-type"), await r.read()) == (200, b"application/json", b'{"a":1}')
        await r.aclose()
        r = await pool.request("127.0.0.1", port, b"POST", b"/v1/completions", b"{}")
        assert [c async for c in r.aiter()] == [b"data: ", b"x\n\n"]
        await r.aclose()
        assert len(conns) == 1  # both on one keep-alive connection

        conns[0].close()  # the server drops the idle connection (as uvicorn does after its keep-alive timeout)
        await asyncio.sleep(0.05)
        r = await pool.request("127.0.0.1", port, b"GET", b"/v1/models")
        assert await r.read() == b'{"a":1}'
        await r.aclose()
        assert len(conns) == 2  # retried once on a fresh connection, invisibly

        srv.close()
        await srv.wait_closed()
        for w in conns:
            w.close()
        with pytest.raises(BackendError):
            await pool.request("127.0.0.1", port, b"POST", b"/v1/completions", b"{}")

        # A body cut short (the replica died mid-answer) is an error, never a short answer.
        srv, port, _ = await _server([b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this"], close_after_each=True)
        r = await pool.request("127.0.0.1", port, b"POST", b"/x", b"{}")
        with pytest.raises(BackendError):
            await r.read()
        await r.aclose()
        srv.close()
        await pool.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))

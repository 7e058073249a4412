"""``outlast serve`` as a real process on 127.0.0.1: it starts, answers, and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_children(pid: int) -> list[int]:
    """Child processes of ``pid`` started by multiprocessing's spawn (not its resource tracker)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            for c in f.read().split():
                with open(f"/proc/{c}/cmdline", "rb") as g:
                    if b"spawn_main" in g.read():
                        out.append(int(c))
    return out


@pytest.mark.parametrize("where", ["default", "--in-process"])
def test_outlast_serve_answers_and_stops(gguf_path, tmp_path, where):
    """By default the engine runs in a child process of the server; ``--in-process`` keeps it in the server's.
    The child one serves bf16 weights (``--dtype bfloat16``), the in-process one fp32."""
    dtype = "bfloat16" if where == "default" else "float32"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "..", "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "outlast.cli", "serve", gguf_path, "--host", "127.0.0.1",
                             "--port", str(port), "--kv-cache-gib", "0.1", "--kv-disk", str(tmp_path / "kv"),
                             "--served-model-name", "m", "--gemm-backend", "onednn", "--dtype", dtype]
                            + ([where] if where != "default" else []),
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    killed, engines = False, []
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        engines = _spawned_children(proc.pid)
        assert f"{dtype} weights" in (tmp_path / "serve.log").read_text()
        assert len(engines) == (1 if where == "default" else 0), engines
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            killed = True
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells it.
    assert not killed and proc.returncode in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()
    for pid in engines:  # the engine process ends with the server
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"

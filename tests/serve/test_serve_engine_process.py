"""``--engine-process``: the engine in a spawned child process behind the real HTTP server on 127.0.0.1.

The child is a real process (multiprocessing, spawn) that loads the GGUF itself; the tests talk to
the server with the official ``openai`` client and httpx, and kill the child to check that the
server fails requests cleanly instead of hanging."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import openai
import pytest

from fleet_helpers import streaming_completion, wait_for
from serve_data import PROMPTS

MODEL = "smollm2"


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _start(gguf_path, **kw):
    from outlast.serve.config import EngineConfig
    from outlast.serve.proc import ProcessEngineLoop
    from outlast.serve.server import ServerThread

    loop = ProcessEngineLoop(gguf_path, EngineConfig(num_blocks=128, token_budget=256, max_num_seqs=8, **kw),
                             start_timeout=300)
    loop.start()
    srv = ServerThread(loop, MODEL).start()
    srv.loop = loop
    return srv


@pytest.fixture(scope="module")
def server(gguf_path):
    srv = _start(gguf_path)
    yield srv
    srv.close()
    srv.loop.close()
    assert not srv.loop._proc.is_alive()  # close() stops the child


def test_the_engine_runs_in_another_process(server):
    pid = server.loop.pid
    assert pid is not None and pid != os.getpid() and server.loop._proc.is_alive()
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_greedy_tokens_equal_the_in_process_engine_streaming_and_not(server, alone_outputs, tokenizer):
    """The child steps on torch's OpenMP threads (not the in-process worker split): same greedy tokens."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    eos = {"ignore_eos": True}
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, extra_body=eos)
    text = r.choices[0].message.content
    assert text == tokenizer.decode(alone_outputs[0])
    assert r.usage.prompt_tokens == len(tokenizer.chat(msgs)) and r.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=eos))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 8


def test_bad_input_gets_400_in_the_front_and_the_engine_carries_on(server):
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 10 ** 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_disconnect_mid_stream_frees_the_blocks_in_the_child(server):
    """The abort crosses to the child; /metrics (rendered by the child) shows its blocks free again."""
    with streaming_completion(server.url, MODEL, PROMPTS[7]) as lines:
        assert _metric(server.url, "outlast_serve_kv_cache_usage_ratio") > 0  # it holds blocks now
        lines.close()
    wait_for(lambda: _metric(server.url, "outlast_serve_kv_cache_usage_ratio") == 0.0, 60, "the blocks to be freed")
    assert _metric(server.url, "outlast_serve_requests_running") == 0
    assert _metric(server.url, 'outlast_serve_requests_finished_total{reason="abort"}') >= 1


def test_a_killed_engine_process_fails_requests_with_503_and_health(gguf_path):
    srv = _start(gguf_path)
    try:
        with streaming_completion(srv.url, MODEL, PROMPTS[3], events=1) as lines:
            os.kill(srv.loop.pid, signal.SIGKILL)
            rest = "\n".join(lines)  # the stream ends with an error event instead of hanging
        assert '"server_error"' in rest and "engine process exited" in rest
        h = httpx.get(srv.url + "/health", timeout=10)
        assert h.status_code == 503 and "engine process exited" in h.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/completions", timeout=30, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    finally:
        srv.close()
        srv.loop.close()


def test_cli_refuses_engine_process_with_watch(gguf_path, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "..", "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "outlast.cli", "serve", gguf_path, "--engine-process",
                        "--watch", str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "--engine-process does not work with --watch" in r.stderr


def test_a_model_the_child_cannot_load_raises_in_the_parent_and_leaves_no_child(tmp_path):
    from outlast.serve.errors import ModelLoadError
    from outlast.serve.proc import ProcessEngineLoop

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file")
    loop = ProcessEngineLoop(str(bad), start_timeout=120)
    with pytest.raises(ModelLoadError) as e:  # the front (tokenizer) or the child (weights), whichever says first
        loop.start()
    assert "model.gguf" in str(e.value)
    assert not loop._proc.is_alive()
    loop.close()  # safe after a failed start

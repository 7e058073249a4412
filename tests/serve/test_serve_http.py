"""The HTTP server end to end on 127.0.0.1: the official ``openai`` client, SSE, metrics, every bad input,
the bounded queue and a client that disconnects mid-stream."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from fleet_helpers import streaming_completion
from serve_data import PROMPTS

MODEL = "smollm2"


@pytest.fixture(scope="module")
def server(make_engine):
    from outlast.serve.loop import EngineLoop
    from outlast.serve.server import ServerThread

    eng = make_engine(num_blocks=128, token_budget=256, max_num_seqs=8)
    loop = EngineLoop(eng)
    loop.start()
    srv = ServerThread(loop, MODEL).start()
    srv.loop = loop
    yield srv
    srv.close()
    loop.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def wait_until(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_chat_with_the_openai_client_streaming_and_not_agree(client, alone_outputs, tokenizer):
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    eos = {"ignore_eos": True}  # as the engine test ran
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, extra_body=eos)
    text = r.choices[0].message.content
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.chat(msgs))
    assert text == tokenizer.decode(alone_outputs[0])  # the same greedy tokens as the engine test
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=eos))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completions_streaming_ends_with_done_and_stop_strings_cut(server, client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    full = r.choices[0].text
    assert full.strip()
    stop = full.strip().split()[1] if len(full.split()) > 1 else full.strip()[-1]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
                            "stream": True, "stop": [stop]}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == full[: full.index(stop)] and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible_over_http(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b
    assert {client.completions.create(**{**kw, "seed": s}).choices[0].text for s in (8, 9)} != {a}


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["weights_version"].startswith("weights-")
    msgs = [{"role": "user", "content": PROMPTS[3]}]
    for _ in range(2):  # the second finds the first's prompt blocks
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    for name in ("outlast_serve_requests_running", "outlast_serve_requests_waiting",
                 "outlast_serve_kv_cache_usage_ratio", "outlast_serve_time_to_first_token_seconds_count",
                 "outlast_serve_inter_token_latency_seconds_count"):
        assert name in values, name
    assert values["outlast_serve_prefix_cache_hits_tokens_total"] >= 16
    assert values["outlast_serve_time_to_first_token_seconds_count"] >= 2


BAD = [
    (b'{"model": "smollm2", "prompt": ', None, "malformed JSON"),
    (b'{"model": "smollm2", "prompt": "caf\xe9"}', None, "invalid UTF-8"),
    (b'["not", "an", "object"]', None, "not an object"),
    ({"model": "gpt-9", "prompt": "hi"}, "model", "unknown model"),
    ({"model": MODEL, "prompt": "hi " * 9000}, "prompt", "prompt past the context"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens 0"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, "max_tokens", "max_tokens negative"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 10**6}, "max_tokens", "max_tokens past the context"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, "max_tokens", "max_tokens not a number"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature", "temperature < 0"),
    ({"model": MODEL, "prompt": "hi", "temperature": 9}, "temperature", "temperature > 2"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p", "top_p 0"),
    ({"model": MODEL, "prompt": "hi", "top_p": 1.1}, "top_p", "top_p > 1"),
    ({"model": MODEL, "prompt": "hi", "top_k": -7}, "top_k", "top_k < -1"),
    ({"model": MODEL, "prompt": "hi", "n": 3}, "n", "n > 1"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 2}, "logprobs", "logprobs asked for"),
    ({"model": MODEL, "prompt": "hi", "stream": "yes"}, "stream", "stream not a boolean"),
    ({"model": MODEL, "prompt": 42}, "prompt", "prompt of the wrong type"),
    ({"model": MODEL, "prompt": [1, 10**7]}, "prompt", "token id past the vocabulary"),
    ({"model": MODEL}, "prompt", "no prompt"),
]


@pytest.mark.parametrize("body,param,why", BAD, ids=[b[2] for b in BAD])
def test_bad_completion_requests_get_400_with_an_openai_error(server, body, param, why):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/completions", timeout=30, **kw)
    assert r.status_code == 400, (why, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"] and err["param"] == param


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 9000}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
])
def test_bad_chat_requests_get_400_and_the_server_carries_on(server, client, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_openai_client_raises_bad_request_for_bad_values(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", temperature=-2)


def test_disconnect_mid_stream_frees_the_kv_blocks(server):
    eng = server.loop.engine
    with streaming_completion(server.url, MODEL, PROMPTS[7]) as lines:
        assert server.loop.call(lambda e: e.kv.pool.num_free) < eng.kv.num_blocks  # it holds blocks now
        lines.close()
    # The client has gone: its request is aborted and every block is free again.
    assert wait_until(lambda: server.loop.call(lambda e: (e.kv.pool.num_free, len(e.requests)))
                      == (eng.kv.num_blocks, 0))
    assert server.loop.call(lambda e: e.num_running + e.num_waiting) == 0


def test_a_full_queue_answers_429_with_retry_after(make_engine):
    from outlast.serve.loop import EngineLoop
    from outlast.serve.server import ServerThread

    eng = make_engine(num_blocks=32, max_num_seqs=1, max_waiting=1)
    loop = EngineLoop(eng)
    loop.start()
    try:
        with ServerThread(loop, MODEL) as srv:
            async def fire():
                async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                    body = {"model": MODEL, "prompt": "Count to one hundred:", "max_tokens": 24, "ignore_eos": True}
                    return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(5)))
            rs = asyncio.run(fire())
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 429 in codes, codes
        refused = [r for r in rs if r.status_code == 429]
        assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full" for r in refused)
    finally:
        loop.close()
    assert eng.kv.pool.num_free == eng.kv.num_blocks

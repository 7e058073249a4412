"""The real model behind ``outlast serve --replicas 2`` on 127.0.0.1: routing, and kill -9 of a replica under load.

Clients use the official ``openai`` client through the router. A replica killed with SIGKILL while
requests run must leave rotation, every non-streaming request must still succeed (retried on the
other replica), a stream cut mid-way must end with a clear error (the client raises), never a
silently short answer, and the supervisor must restart the replica.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest

from fleet_helpers import start, stop, wait_for
from outlast.serve.supervisor import free_port
from serve_data import MAX_NEW, PROMPTS


@pytest.fixture()
def fleet(tmp_path, tokenizer_dir, weights):
    # The real model's weights as an outlast checkpoint: replicas read it in under a second, where
    # dequantising the GGUF takes several (each replica, and again on the restart).
    import outlast

    cfg, sd = weights
    ckpt = str(tmp_path / "smollm2")
    outlast.save({"model": sd, "serve_config": cfg.to_json()}, ckpt)
    port = free_port()
    log = str(tmp_path / "fleet.log")
    proc = start(["serve", ckpt, "--tokenizer", tokenizer_dir, "--replicas", "2", "--port", str(port),
                  "--kv-cache-gib", "0.05", "--max-model-len", "512", "--served-model-name", "m"], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: all(r["up"] for r in httpx.get(url + "/fleet", timeout=5).json()["replicas"]), 180,
                 "both replicas up", proc, log)
        yield url, proc, log
    finally:
        stop(proc)


def test_router_serves_real_model_and_survives_kill9(fleet, tokenizer, prompt_ids, alone_outputs):
    url, proc, log = fleet
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)

    # Same greedy tokens as the engine alone, through the router.
    r = client.completions.create(model="m", prompt=prompt_ids[0], max_tokens=MAX_NEW, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == tokenizer.decode(alone_outputs[0])
    assert r.system_fingerprint.startswith("weights-")

    # Cache-aware: the turns of one conversation go to the replica that holds its prefix.
    msgs = [{"role": "system", "content": "You are a concise assistant who answers in one sentence."},
            {"role": "user", "content": PROMPTS[20]}]
    homes = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=msgs, max_tokens=4, temperature=0)
        homes.append(raw.headers["x-outlast-replica"])
        msgs = msgs + [{"role": "assistant", "content": raw.parse().choices[0].message.content},
                       {"role": "user", "content": "And then?"}]
    assert len(set(homes)) == 1, homes

    # Load on both replicas, then kill -9 one of them.
    fleet_state = httpx.get(url + "/fleet", timeout=5).json()
    victim, victim_pid = 0, fleet_state["pids"][0]
    victim_url = fleet_state["replicas"][0]["url"]
    ok, stream_errors, other_errors = [], [], []
    stop_evt = threading.Event()

    def load(k: int) -> None:
        deadline = time.monotonic() + 120
        for i in range(60):  # bounded in count and time
            if stop_evt.is_set() or time.monotonic() > deadline:
                return
            p = [{"role": "user", "content": PROMPTS[(k * 7 + i) % 20]}]
            try:
                if k % 2:
                    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                        model="m", messages=p, max_tokens=12, temperature=0, stream=True) if c.choices)
                else:
                    text = client.chat.completions.create(model="m", messages=p, max_tokens=12,
                                                          temperature=0).choices[0].message.content
                ok.append(text)
            except openai.APIError as e:
                (stream_errors if k % 2 and "failed while streaming" in str(e) else other_errors).append(repr(e))
            except Exception as e:  # noqa: BLE001
                other_errors.append(repr(e))

    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: httpx.get(url + "/fleet", timeout=5).json()["replicas"][victim]["outstanding"] > 0, 60,
                 "requests in flight on the victim", proc, log)
        os.kill(victim_pid, signal.SIGKILL)
        wait_for(lambda: not httpx.get(url + "/fleet", timeout=5).json()["replicas"][victim]["up"], 30,
                 "the killed replica out of rotation", proc, log)
        n = len(ok)
        wait_for(lambda: len(ok) >= n + 4, 90, "requests served by the survivor", proc, log)
        st = wait_for(lambda: (lambda s: s if s["replicas"][victim]["up"] and s["pids"][victim] != victim_pid
                               else None)(httpx.get(url + "/fleet", timeout=5).json()),
                      150, "the supervisor to restart the replica", proc, log)
        assert st["restarts"][victim] == 1
    finally:
        stop_evt.set()
        for t in threads:
            t.join(150)
    assert not any(t.is_alive() for t in threads)
    assert other_errors == [], other_errors[:5]  # nothing non-streaming failed; no stream ended silently short
    assert len(ok) >= 8
    metrics = httpx.get(url + "/metrics", timeout=5).text
    assert any(line.startswith(f'outlast_router_replica_down_total{{replica="{victim_url}"}}')
               and float(line.rsplit(" ", 1)[1]) >= 1 for line in metrics.splitlines()), metrics
    # The requests in flight on the victim were retried (before any byte reached their client) or cut with an error.
    retried = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("outlast_router_retries_total") and victim_url in line)
    assert retried + len(stream_errors) >= 1, metrics

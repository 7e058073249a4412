"""Hot reload behind the router, as real processes on 127.0.0.1: ``outlast serve --watch RUN --replicas 2``.

Tiny random Llama checkpoints are committed with ``outlast.Checkpointer`` while two client threads
(the official ``openai`` client, one streaming) keep sending greedy requests. Every response must
succeed and its text must equal what a fresh engine loaded from the step it names
(``system_fingerprint``) generates; a corrupt step must be refused while the old one keeps
serving; the admin routes must refuse a missing or wrong token and roll back with the right one.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import httpx
import openai
import pytest

from fleet_helpers import TOKEN, assert_each_response_equals_its_step, commit_step, corrupt, start, stop, wait_for
from outlast.serve.supervisor import free_port

PROMPTS = ["The river runs", "Seven small boats", "A market at dawn", "Why do birds sing"]
MAX = 6


@pytest.fixture()
def fleet(tmp_path, tokenizer_dir):
    run = tmp_path / "run"
    commit_step(str(run), 1)
    port = free_port()
    log = str(tmp_path / "fleet.log")
    proc = start(["serve", "--watch", str(run), "--tokenizer", tokenizer_dir, "--replicas", "2", "--port", str(port),
                  "--kv-cache-gib", "0.02", "--max-model-len", "256", "--served-model-name", "tiny"], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: all(r["up"] for r in httpx.get(url + "/fleet", timeout=5).json()["replicas"]), 120,
                 "both replicas up", proc, log)
        yield url, run, proc, log
    finally:
        stop(proc)


def _load(url: str, stop_evt: threading.Event, out: list, errors: list, stream: bool) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
    deadline = time.monotonic() + 150
    for i in range(2000):  # bounded in count and time
        if stop_evt.is_set() or time.monotonic() > deadline:
            return
        p = PROMPTS[i % len(PROMPTS)]
        sent = time.monotonic()
        try:
            kw = dict(model="tiny", prompt=p, max_tokens=MAX, temperature=0, extra_body={"ignore_eos": True})
            if stream:
                chunks = list(client.completions.create(stream=True, **kw))
                fps = {c.system_fingerprint for c in chunks}
                assert len(fps) == 1, fps  # one request, one version of the weights
                out.append((p, "".join(c.choices[0].text for c in chunks if c.choices), fps.pop(), sent))
            else:
                r = client.completions.create(**kw)
                out.append((p, r.choices[0].text, r.system_fingerprint, sent))
        except Exception as e:  # noqa: BLE001 - every failure is reported by the test
            errors.append(repr(e))


def test_reload_under_load_corrupt_skipped_admin(fleet, tmp_path, tokenizer):
    url, run, proc, log = fleet
    stop_evt = threading.Event()
    out: list = []
    errors: list = []
    threads = [threading.Thread(target=_load, args=(url, stop_evt, out, errors, s)) for s in (False, True)]
    for t in threads:
        t.start()
    try:
        served = lambda step: any(x[2] == f"step-{step}" for x in out[-6:])  # noqa: E731
        # Responses to requests sent after time t (one received just before may still be on its way in).
        since = lambda t: [x for x in out if x[3] > t]  # noqa: E731
        wait_for(lambda: served(1), 60, "responses from step 1", proc, log)
        commit_step(str(run), 2)
        wait_for(lambda: served(2), 60, "responses from step 2 after its commit", proc, log)
        # The rollout: the first replica on step 2 takes the traffic and answers on it (the canary)
        # before the second one drains and reloads.
        wait_for(lambda: all(r["weights_version"] == "step-2" for r in httpx.get(url + "/fleet", timeout=5)
                             .json()["replicas"]), 60, "both replicas on step 2", proc, log)
        lines = [ln for ln in open(log).read().splitlines() if "step 2" in ln or "on step-2" in ln]
        canary = [i for i, ln in enumerate(lines) if "canary:" in ln and "answered on step-2" in ln]
        swaps = [i for i, ln in enumerate(lines) if "serves step 2 (" in ln]
        assert len(swaps) == 2 and len(canary) == 1 and swaps[0] < canary[0] < swaps[1], lines

        # A committed-looking step whose data fails its checksums: refused, step 2 keeps serving.
        side = tmp_path / "side"
        bad = commit_step(str(side), 3)
        corrupt(bad)
        os.rename(bad, run / os.path.basename(bad))
        wait_for(lambda: "3" in httpx.get(url + "/fleet", timeout=5).json()["refused"], 60, "step 3 refused", proc, log)
        t = time.monotonic()
        wait_for(lambda: len(since(t)) >= 4, 60, "responses after the refusal", proc, log)
        assert {x[2] for x in since(t)} == {"step-2"}
        commit_step(str(run), 4)
        wait_for(lambda: served(4), 60, "responses from step 4 (the watcher goes on past a refused step)", proc, log)

        # The admin route: refused without the token, with a wrong one, and on a replica with the router's token
        # (replicas have a token of their own); a rollback with the right token.
        r = httpx.post(url + "/admin/rollback", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_token"
        r = httpx.post(url + "/admin/rollback", headers={"authorization": "Bearer nope"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
        replica = httpx.get(url + "/fleet", timeout=5).json()["replicas"][0]["url"]
        r = httpx.post(replica + "/admin/reload", json={"step": 1}, headers={"authorization": f"Bearer {TOKEN}"},
                       timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
        r = httpx.post(url + "/admin/rollback", headers={"authorization": f"Bearer {TOKEN}"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["step"] == 2 and {x["weights_version"] for x in r.json()["replicas"]} == {"step-2"}
        t = time.monotonic()
        wait_for(lambda: len(since(t)) >= 4, 60, "responses after the rollback", proc, log)
        assert {x[2] for x in since(t)} == {"step-2"}
        r = httpx.post(url + "/admin/reload", json={"step": 3}, headers={"authorization": f"Bearer {TOKEN}"}, timeout=120)
        assert r.status_code == 422 and "step 3" in r.json()["error"]["message"], r.text
    finally:
        stop_evt.set()
        for t in threads:
            t.join(90)
    assert not any(t.is_alive() for t in threads)
    assert errors == [], errors[:5]
    assert {x[2] for x in out} == {"step-1", "step-2", "step-4"}

    # Each response equals a fresh engine started on the step it names.
    assert_each_response_equals_its_step(run, out, tokenizer, (1, 2, 4), PROMPTS, MAX)
    shutil.rmtree(run, ignore_errors=True)

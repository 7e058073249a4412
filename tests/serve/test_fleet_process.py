"""The fleet commands as a user starts them by hand, as real processes on 127.0.0.1.

* ``outlast route --backend URL --backend URL`` in front of two ``outlast serve`` processes started
  separately: the official ``openai`` client gets the same greedy answers through the router as from a
  replica directly, both replicas take requests, a replica killed with SIGKILL leaves rotation while
  requests keep succeeding, and the same replica started again on its port comes back.
* ``outlast serve --watch RUN_DIR`` alone (no replicas, no MODEL): it serves the newest committed step,
  picks up a newly committed one under load (every response equals a fresh engine on the step it names),
  refuses a corrupt one while the old weights keep serving, and goes on to the next commit.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai

from fleet_helpers import TOKEN, assert_each_response_equals_its_step, commit_step, corrupt, start, stop, wait_for
from outlast.serve.supervisor import free_port

PROMPTS = ["The river runs", "Seven small boats", "A market at dawn", "Why do birds sing"]
MAX = 6


def _serve(args: list[str], tmp_path, name: str):
    port = free_port()
    log = str(tmp_path / f"{name}.log")
    proc = start([*args, "--port", str(port), "--kv-cache-gib", "0.02", "--max-model-len", "256",
                  "--served-model-name", "tiny"], log)
    return f"http://127.0.0.1:{port}", port, proc, log


def _up(url: str) -> bool:
    return httpx.get(url + "/health", timeout=5).status_code == 200


def _complete(client: openai.OpenAI, prompt: str) -> tuple[str, str]:
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX, temperature=0,
                                  extra_body={"ignore_eos": True})
    return r.choices[0].text, r.system_fingerprint


def _ok_count(router: str, replica: str) -> float:
    key = f'outlast_router_requests_total{{outcome="ok",replica="{replica}"}} '
    for line in httpx.get(router + "/metrics", timeout=5).text.splitlines():
        if line.startswith(key):
            return float(line.split()[-1])
    return 0.0


def test_route_standalone_over_hand_started_replicas(tmp_path, tokenizer_dir):
    step = commit_step(str(tmp_path / "run"), 1)
    procs = []
    try:
        (u1, _, p1, l1), (u2, port2, p2, l2) = (_serve(["serve", step, "--tokenizer", tokenizer_dir], tmp_path, n)
                                                for n in ("replica-1", "replica-2"))
        procs += [p1, p2]
        rport = free_port()
        rlog = str(tmp_path / "route.log")
        router = start(["route", "--backend", u1, "--backend", u2, "--port", str(rport), "--policy", "round_robin",
                        "--health-interval", "0.1", "--balance-abs", "5"], rlog)
        procs.append(router)
        url = f"http://127.0.0.1:{rport}"
        wait_for(lambda: _up(u1), 120, "replica 1 up", p1, l1)
        wait_for(lambda: _up(u2), 120, "replica 2 up", p2, l2)
        wait_for(lambda: all(r["up"] for r in httpx.get(url + "/fleet", timeout=5).json()["replicas"]), 60,
                 "the router sees both replicas", router, rlog)
        assert httpx.get(url + "/fleet", timeout=5).json()["balance_abs"] == 5

        direct = openai.OpenAI(base_url=u1 + "/v1", api_key="unused", timeout=60, max_retries=0)
        routed = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
        want = {p: _complete(direct, p) for p in PROMPTS}
        for p in PROMPTS * 2:
            assert _complete(routed, p) == want[p]
        chunks = list(routed.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=MAX, temperature=0, stream=True))
        assert chunks and chunks[-1].system_fingerprint == want[PROMPTS[0]][1]  # same weights on both replicas
        assert [m.id for m in routed.models.list().data] == ["tiny"]
        assert _ok_count(url, u1) > 0 and _ok_count(url, u2) > 0  # round-robin: both replicas answered

        # A replica killed with SIGKILL leaves rotation; requests keep succeeding on the other.
        os.killpg(p2.pid, signal.SIGKILL)
        p2.wait(10)
        wait_for(lambda: not httpx.get(url + "/fleet", timeout=5).json()["replicas"][1]["up"], 10,
                 "the killed replica out of rotation", router, rlog)
        for p in PROMPTS * 2:
            assert _complete(routed, p) == want[p]

        # Started again on its port (by hand: there is no supervisor here), it comes back into rotation.
        p2b = start(["serve", step, "--tokenizer", tokenizer_dir, "--port", str(port2), "--kv-cache-gib", "0.02",
                     "--max-model-len", "256", "--served-model-name", "tiny"], l2 + ".2")
        procs.append(p2b)
        wait_for(lambda: httpx.get(url + "/fleet", timeout=5).json()["replicas"][1]["up"], 120,
                 "the restarted replica back in rotation", p2b, l2 + ".2")
        before = _ok_count(url, u2)
        for p in PROMPTS:
            assert _complete(routed, p) == want[p]
        assert _ok_count(url, u2) > before  # it answers again
    finally:
        for p in procs:
            stop(p)


def test_serve_watch_single_engine_reload_and_refusal(tmp_path, tokenizer_dir, tokenizer):
    run = tmp_path / "run"
    commit_step(str(run), 1)
    url, _, proc, log = _serve(["serve", "--watch", str(run), "--tokenizer", tokenizer_dir], tmp_path, "serve")
    out: list = []
    errors: list = []
    stop_evt = threading.Event()

    def load() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
        deadline = time.monotonic() + 120
        for i in range(3000):  # bounded in count and time
            if stop_evt.is_set() or time.monotonic() > deadline:
                return
            p = PROMPTS[i % len(PROMPTS)]
            sent = time.monotonic()
            try:
                out.append((p, *_complete(client, p), sent))
            except Exception as e:  # noqa: BLE001 - every failure is reported by the test
                errors.append(repr(e))

    th = threading.Thread(target=load)
    admin = {"authorization": f"Bearer {TOKEN}"}
    try:
        wait_for(lambda: _up(url), 120, "the server up", proc, log)
        th.start()
        served = lambda s: any(x[2] == f"step-{s}" for x in out[-4:])  # noqa: E731
        since = lambda t: [x for x in out if x[3] > t]  # noqa: E731
        wait_for(lambda: served(1), 60, "responses from step 1", proc, log)
        commit_step(str(run), 2)
        wait_for(lambda: served(2), 60, "responses from step 2 after its commit", proc, log)
        assert httpx.get(url + "/health", timeout=5).json()["weights_version"] == "step-2"

        # Committed-looking but corrupt: refused with its reason, step 2 keeps serving.
        bad = commit_step(str(tmp_path / "side"), 3)
        corrupt(bad)
        os.rename(bad, run / os.path.basename(bad))
        wait_for(lambda: "3" in httpx.get(url + "/admin/weights", headers=admin, timeout=5).json()["refused"], 60,
                 "step 3 refused", proc, log)
        status = httpx.get(url + "/admin/weights", headers=admin, timeout=5).json()
        assert status["step"] == 2 and "checksum" in status["refused"]["3"].lower(), status
        t = time.monotonic()
        wait_for(lambda: len(since(t)) >= 4, 60, "responses after the refusal", proc, log)
        assert {x[2] for x in since(t)} == {"step-2"}
        m = httpx.get(url + "/metrics", timeout=5).text
        assert 'outlast_serve_weight_reloads_total{outcome="refused"} 1.0' in m, m
        commit_step(str(run), 4)
        wait_for(lambda: served(4), 60, "responses from step 4 (past the refused step)", proc, log)
    finally:
        stop_evt.set()
        if th.is_alive():
            th.join(90)
        stop(proc)
    assert errors == [], errors[:5]
    assert {x[2] for x in out} == {"step-1", "step-2", "step-4"}

    # Each response equals a fresh engine started on the step it names.
    assert_each_response_equals_its_step(run, out, tokenizer, (1, 2, 4), PROMPTS, MAX)

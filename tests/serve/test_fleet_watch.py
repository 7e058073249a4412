"""One engine following a run directory (``outlast serve --watch`` without replicas), in process.

The engine swaps weights only between steps and only once the requests running on the old weights
have finished: a request that started before a swap ends on the old weights, whole, and a request
queued meanwhile runs on the new ones. The watcher loads each new commit, refuses a corrupt one
(old weights stay), and goes on to the next.
"""

from __future__ import annotations

import os
import time

import httpx
import torch

from fleet_helpers import TOKEN, commit_step, corrupt, wait_for


def test_swap_waits_for_running_requests(tmp_path, tokenizer):
    from outlast.serve import EngineConfig, LLMEngine, SamplingParams
    from outlast.serve.model import LlamaRuntime
    from outlast.serve.weights import load_weights, weights_identity

    run = str(tmp_path / "run")
    cfg, sd1 = load_weights(commit_step(run, 1))
    _, sd2 = load_weights(commit_step(run, 2))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids = tokenizer.encode("The river runs")
    want1 = LLMEngine(cfg, sd1, tokenizer, EngineConfig(num_blocks=32)).generate([ids], params)[0]
    want2 = LLMEngine(cfg, sd2, tokenizer, EngineConfig(num_blocks=32)).generate([ids], params)[0]
    assert want1 != want2

    eng = LLMEngine(cfg, sd1, tokenizer, EngineConfig(num_blocks=32))
    old = eng.add_request("old", ids, params)
    eng.step()  # "old" is running on step 1's weights
    eng.scheduler.admit_new = False  # what EngineLoop does when a swap is asked for
    new = eng.add_request("new", ids, params)
    outs = []
    while not eng.swap_ready():
        outs += eng.step()
    assert old.output_token_ids == want1 and new.num_computed_tokens == 0  # "new" waited
    assert {o.weights_version for o in outs} == {eng.weights_version}
    eng.swap_weights(LlamaRuntime(cfg, sd2), weights_identity(cfg, sd2), "step-2")
    outs = []
    while eng.has_work():
        outs += eng.step()
    assert new.output_token_ids == want2 and {o.weights_version for o in outs} == {"step-2"}
    # The same prompt found no prefix blocks of step 1: the cache keys carry the weights' identity.
    assert new.num_cached_prompt_tokens == 0


def test_watch_follows_refuses_corrupt_and_admin(tmp_path, tokenizer):
    from outlast.serve import EngineConfig, LLMEngine
    from outlast.serve.loop import EngineLoop
    from outlast.serve.reload import WeightsManager
    from outlast.serve.server import ServerThread
    from outlast.serve.weights import load_weights

    run = tmp_path / "run"
    eng = LLMEngine(*load_weights(commit_step(str(run), 1)), tokenizer, EngineConfig(num_blocks=64))
    loop = EngineLoop(eng)
    loop.start()
    wm = WeightsManager(loop, str(run), step=1, poll_s=0.05).start()
    body = {"prompt": "A market at dawn", "max_tokens": 4, "temperature": 0}
    try:
        with ServerThread(loop, "tiny", weights=wm, admin_token=TOKEN) as srv:
            fp = lambda: httpx.post(srv.url + "/v1/completions", json=body, timeout=30).json()["system_fingerprint"]  # noqa: E731
            assert fp() == "step-1"
            commit_step(str(run), 2)
            wait_for(lambda: fp() == "step-2", 60, "step 2 served")
            bad = commit_step(str(tmp_path / "side"), 3)
            corrupt(bad)
            os.rename(bad, run / os.path.basename(bad))
            wait_for(lambda: "3" in wm.status()["refused"], 60, "step 3 refused")
            assert fp() == "step-2" and "checksum" in wm.status()["refused"]["3"].lower()
            commit_step(str(run), 4)
            wait_for(lambda: fp() == "step-4", 60, "step 4 served after the refused one")
            m = httpx.get(srv.url + "/metrics", timeout=10).text
            assert 'outlast_serve_weight_reloads_total{outcome="refused"} 1.0' in m
            assert "outlast_serve_weights_step 4.0" in m

            admin = srv.url + "/admin/reload"
            r = httpx.post(admin, json={"step": 1}, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_token"
            r = httpx.post(admin, json={"step": 1}, headers={"authorization": "Bearer " + TOKEN + "x"}, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
            auth = {"authorization": "Bearer " + TOKEN}
            assert httpx.post(admin, json={"step": 9}, headers=auth, timeout=10).status_code == 404
            assert httpx.post(admin, json={"step": 3}, headers=auth, timeout=30).status_code == 422
            assert fp() == "step-4"
            r = httpx.post(admin, json={"step": 1}, headers=auth, timeout=60)
            assert r.status_code == 200 and r.json()["step"] == 1 and r.json()["follow"] is False
            assert fp() == "step-1"
            commit_step(str(run), 5)  # pinned by the admin: not followed ...
            time.sleep(0.5)
            assert fp() == "step-1"
            r = httpx.post(srv.url + "/admin/rollback", headers=auth, timeout=60)
            assert r.status_code == 200 and r.json()["step"] == 4 and fp() == "step-4"
            httpx.post(srv.url + "/admin/follow", headers=auth, timeout=10).raise_for_status()
            wait_for(lambda: fp() == "step-5", 60, "step 5 once following again")  # ... until following resumes
    finally:
        wm.close()
        loop.close()


def test_checkpoint_identity_follows_every_weight_byte(tmp_path):
    """The reload's prefix-cache salt comes from the manifest's checksums, not a pass over the bytes: it
    must still change when one weight byte does, and stay equal for two checkpoints of equal bytes."""
    import outlast
    import torch
    from outlast.serve.model import LlamaRuntime
    from outlast.serve.weights import checkpoint_identity, load_config, load_weights, weights_identity

    from fleet_helpers import tiny_config, tiny_state

    cfg = tiny_config()

    def save(name: str, state: dict) -> str:
        with outlast.Checkpointer(str(tmp_path / name)) as ck:
            ck.save({"model": state, "serve_config": cfg.to_json()}, 1)
        return ck.path_of(1)

    base = tiny_state(1)
    a, b = save("a", base), save("b", {k: v.clone() for k, v in base.items()})
    flipped = {k: v.clone() for k, v in base.items()}
    w = flipped["model.layers.0.mlp.down_proj.weight"]
    w.view(torch.uint8).view(-1)[7] ^= 1  # one bit of one byte
    c = save("c", flipped)
    ida, idb, idc = (checkpoint_identity(p, cfg) for p in (a, b, c))
    assert ida == idb and ida != idc
    assert checkpoint_identity(a, cfg, "model", outlast.manifest_of(a)) == ida
    # what a reload builds: the verified read, the same arrays as the state-dict path, the manifest it checked
    rt = LlamaRuntime.from_checkpoint(load_config(c), c)
    ref = LlamaRuntime(*load_weights(c))
    assert torch.equal(rt.embed, ref.embed) and (rt.lm_head == ref.lm_head).all()
    for x, y in zip(rt.layers, ref.layers):
        for k in x:
            assert (x[k] == y[k]).all(), k
    assert checkpoint_identity(c, cfg, "model", rt.manifest) == idc
    # GGUF/HF sources have no manifest: their identity still hashes every byte, and stays apart
    assert weights_identity(cfg, base) != weights_identity(cfg, flipped) and weights_identity(cfg, base) != ida


def test_reloads_reuse_retired_memory_and_serve_each_step_exactly(tmp_path, tokenizer):
    """With ``keep_buffers`` a reload reads into kept staging tensors and builds into the arrays the
    previous swap retired. Every step served must still equal a fresh engine on that step: reading
    the next step while one serves, preparing a step that is then dropped, and rolling back must
    never write into the weights that serve."""
    from outlast.serve import EngineConfig, LLMEngine
    from outlast.serve.loop import EngineLoop
    from outlast.serve.reload import WeightsManager
    from outlast.serve.server import ServerThread
    from outlast.serve.weights import load_weights

    from fleet_helpers import assert_each_response_equals_its_step

    run = tmp_path / "run"
    for s in (1, 2, 3):
        commit_step(str(run), s)
    cfg, sd = load_weights(str(run / "step-00000001"))
    given = {k: v.clone() for k, v in sd.items()}
    eng = LLMEngine(cfg, sd, tokenizer, EngineConfig(num_blocks=64))
    loop = EngineLoop(eng)
    loop.start()
    wm = WeightsManager(loop, str(run), step=1, follow=False, poll_s=0.05).start()
    prompts = ["A market at dawn", "The river runs"]
    out = []

    def ask(srv, want_step):
        for p in prompts:
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": p, "max_tokens": 5, "temperature": 0,
                                                               "ignore_eos": True}, timeout=30).json()
            assert r["system_fingerprint"] == f"step-{want_step}"
            out.append((p, r["choices"][0]["text"], r["system_fingerprint"]))

    def ptrs(rt):
        return {k: (a.ctypes.data if hasattr(a, "ctypes") else a.data_ptr()) for k, a in rt.arrays().items()}

    def apart_from_staging():  # the next read (into the staging) must never write what serves
        assert not set(ptrs(eng.runtime).values()) & {t.data_ptr() for t in wm._staging.values()}

    try:
        with ServerThread(loop, "tiny", weights=wm) as srv:
            ask(srv, 1)
            first = ptrs(eng.runtime)
            # the engine's own weights: the embedding and norms are the caller's tensors, never reused
            callers = {k: first.pop(k) for k in eng.runtime.borrowed}
            assert callers and first
            wm.reload(2)
            ask(srv, 2)
            apart_from_staging()
            wm._packing.join(60)  # packed for oneDNN after the swap, on its own thread
            assert eng.runtime.packed and "pack_s" in wm.status()["timings"]
            second = ptrs(eng.runtime)
            assert not set(second.values()) & (set(first.values()) | set(callers.values()))  # mapped at start
            wm.reload(3)
            ask(srv, 3)
            apart_from_staging()
            third = ptrs(eng.runtime)
            assert {k: third[k] for k in first} == first  # into step 1's retired arrays, every one it owned
            assert not set(third.values()) & set(callers.values())
            wm.prepare(1)  # read and built while step 3 serves: into step 2's retired arrays
            apart_from_staging()
            ask(srv, 3)
            wm.reload(2)  # the prepared step 1 is dropped (its arrays retired), step 2 read again
            ask(srv, 2)
            apart_from_staging()
            wm.rollback()
            ask(srv, 3)
            apart_from_staging()
            assert wm.status()["step"] == 3 and not wm.refused
    finally:
        wm.close()
        loop.close()
    assert_each_response_equals_its_step(run, out, tokenizer, [1, 2, 3], prompts, 5)
    assert all(torch.equal(sd[k], v) for k, v in given.items())  # the caller's tensors were never written


def test_new_weights_serve_before_their_onednn_packing_ends(tmp_path, tokenizer, monkeypatch):
    """A reload swaps in weights built unpacked and packs them afterwards on a thread of its own:
    a response on the new step must not wait for the packing, and steps use the packed copies
    once it is done (results equal a fresh engine either way)."""
    import threading

    from outlast.serve import EngineConfig, LLMEngine, SamplingParams
    from outlast.serve import model
    from outlast.serve.loop import EngineLoop
    from outlast.serve.reload import WeightsManager
    from outlast.serve.weights import load_weights

    run = tmp_path / "run"
    commit_step(str(run), 1)
    commit_step(str(run), 2)
    eng = LLMEngine(*load_weights(str(run / "step-00000001")), tokenizer,
                    EngineConfig(num_blocks=64, gemm_backend="onednn"))
    assert eng.runtime.packed  # the first weights are packed while they are built
    release, packing = threading.Event(), threading.Event()
    orig = model.LlamaRuntime.pack

    def slow_pack(self, halves, **kw):
        packing.set()
        assert release.wait(60)
        return orig(self, halves, **kw)

    monkeypatch.setattr(model.LlamaRuntime, "pack", slow_pack)
    used = []
    orig_call = model._Packed.__call__
    monkeypatch.setattr(model._Packed, "__call__", lambda self, x, par: used.append(1) or orig_call(self, x, par))
    loop = EngineLoop(eng)
    loop.start()
    wm = WeightsManager(loop, str(run), step=1, follow=False).start()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = tokenizer.encode("A market at dawn")
    try:
        wm.reload(2)  # returns while the packing waits
        assert packing.wait(10) and not eng.runtime.packed
        before = loop.call(lambda e: e.generate([prompt], params)[0])  # served on numpy's GEMMs
        assert not used
        release.set()
        wm._packing.join(60)
        assert eng.runtime.packed and "pack_s" in wm.timings
        after = loop.call(lambda e: e.generate([prompt], params)[0])
        assert used  # the packed copies serve now
    finally:
        release.set()
        wm.close()
        loop.close()
    ref = LLMEngine(*load_weights(str(run / "step-00000002")), tokenizer, EngineConfig(num_blocks=64))
    want = ref.generate([prompt], params)[0]
    assert before == after == want


def test_reload_without_kept_buffers(tmp_path, tokenizer):
    """``keep_buffers=False`` and buffered reads: each reload maps its own memory and nothing is kept;
    it serves the same."""
    from outlast.serve import EngineConfig, LLMEngine
    from outlast.serve.loop import EngineLoop
    from outlast.serve.reload import WeightsManager
    from outlast.serve.weights import load_weights

    run = tmp_path / "run"
    commit_step(str(run), 1)
    commit_step(str(run), 2)
    eng = LLMEngine(*load_weights(str(run / "step-00000001")), tokenizer, EngineConfig(num_blocks=64))
    loop = EngineLoop(eng)
    loop.start()
    wm = WeightsManager(loop, str(run), step=1, follow=False, keep_buffers=False, direct_io=False).start()
    try:
        old = eng.runtime
        wm.reload(2)
        ref = LLMEngine(*load_weights(str(run / "step-00000002")), tokenizer, EngineConfig(num_blocks=64)).runtime
        assert (eng.runtime.lm_head == ref.lm_head).all() and torch.equal(eng.runtime.embed, ref.embed)
        assert wm._spare is None and wm._staging is None
        assert eng.runtime.lm_head.ctypes.data != old.lm_head.ctypes.data
    finally:
        wm.close()
        loop.close()

"""The decode copy of K/V and the two-thread step give the same tokens as gathering on one thread.

A tiny random Llama (fleet_helpers) keeps these fast; the real-model tests in test_serve_model.py
run the same paths (they are the defaults) against transformers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleet_helpers import tiny_config, tiny_state
from outlast.serve.config import EngineConfig
from outlast.serve.engine import LLMEngine
from outlast.serve import model
from outlast.serve.model import SeqSlice
from outlast.serve.sampler import SamplingParams


@pytest.mark.parametrize("backend", sorted(model.GEMM_BACKENDS))
def test_linear_splits_give_the_one_thread_product(backend):
    g = np.random.default_rng(0)
    w = g.standard_normal((96, 40)).astype(np.float32)
    mm = model.GEMM_BACKENDS[backend]
    for m in (1, 2, 7, model.ROW_SPLIT_MIN, model.ROW_SPLIT_MIN + 3):  # one GEMV, inner-dim split, row split
        x = torch.from_numpy(g.standard_normal((m, 96)).astype(np.float32))
        want = x.double() @ torch.from_numpy(w).double()
        one = model._linear(x, w, parallel=False, mm=mm)
        two = model._linear(x, w, parallel=True, mm=mm)
        assert one.dtype == two.dtype == torch.float32 and two.shape == (m, 40)
        assert torch.allclose(one.double(), want, rtol=1e-5, atol=1e-4)
        assert torch.allclose(two.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cols", [40, 100, 3072])
def test_onednn_packed_weights_give_the_product_whole_halved_and_split(cols):
    g = np.random.default_rng(1)
    w = g.standard_normal((96, cols)).astype(np.float32)
    whole, halves = model._Packed.from_array(w, halves=False), model._Packed.from_array(w, halves=True)
    assert len(whole.parts) == 1 and len(halves.parts) == 2 and halves.cut % 16 == 0
    x = torch.from_numpy(g.standard_normal((3, 96)).astype(np.float32))
    before = halves(x, parallel=True)
    w[:] = 0  # packing copied the weights: the packed copies no longer read the array
    assert torch.equal(halves(x, parallel=True), before)
    ref = g.standard_normal((96, cols)).astype(np.float32)
    whole, halves = model._Packed.from_array(ref, halves=False), model._Packed.from_array(ref, halves=True)
    # From the [out, in] parts a matrix is fused from (q, k, v; gate, up), halves spanning parts,
    # one part in bf16 (converted), as a build packs them.
    t = torch.from_numpy(ref.T.copy())
    cut1, cut2 = cols // 3, cols // 3 + 7
    fused = model._Packed((t[:cut1], t[cut1:cut2].bfloat16(), t[cut2:]), halves=True)
    tb = t.clone()
    tb[cut1:cut2] = tb[cut1:cut2].bfloat16().float()
    for m in (2, 7, 33, model.ROW_SPLIT_MIN + 3):
        x = torch.from_numpy(g.standard_normal((m, 96)).astype(np.float32))
        want = x.double() @ torch.from_numpy(ref).double()
        assert torch.allclose(fused(x, parallel=True).double(), x.double() @ tb.double().T, rtol=1e-5, atol=1e-4)
        for got in (whole(x, parallel=False), halves(x, parallel=False), halves(x, parallel=True)):
            assert got.dtype == torch.float32 and got.shape == (m, cols)
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
        # A row's result does not depend on the rows beside it (batched = alone).
        assert torch.equal(halves(x[:1].contiguous().expand(2, 96).contiguous(), parallel=True)[0],
                           halves(x, parallel=True)[0])


def test_onednn_steps_use_the_packed_weights_and_one_row_steps_numpy(tokenizer, monkeypatch):
    rt = _engine(tokenizer, gemm_backend="onednn").runtime
    assert set(rt.packed) == {id(rt.lm_head)} | {id(L[n]) for L in rt.layers for n in ("wqkv", "wo", "wgu", "wdown")}
    assert rt._packed_halves is True  # two threads a step: built packed in halves
    late = model.LlamaRuntime(tiny_config(), tiny_state(3))  # built unpacked; packs from its arrays
    assert not late.packed
    late.pack(halves=True)
    assert late.pack_seconds > 0 and len(late.packed) == len(rt.packed)
    for name in ("wqkv", "wgu", "wdown"):
        x = torch.randn(5, rt.layers[1][name].shape[0])
        a, b = rt.packed[id(rt.layers[1][name])], late.packed[id(late.layers[1][name])]
        assert torch.allclose(a(x, True), b(x, True), rtol=1e-5, atol=1e-5)
        assert torch.allclose(a(x, True), x @ torch.from_numpy(rt.layers[1][name]), rtol=1e-4, atol=1e-4)
    calls = []
    orig = model._Packed.__call__
    monkeypatch.setattr(model._Packed, "__call__", lambda self, x, par: calls.append(x.shape[0]) or orig(self, x, par))
    rt._step_gemm = rt.gemm
    x = torch.randn(3, rt.config.hidden_size)
    rt._mm(x, rt.layers[0]["wqkv"])
    rt._mm(x[:1], rt.layers[0]["wqkv"])  # one row: numpy's GEMV, not oneDNN
    assert calls == [3]
    again = rt.packed
    rt.pack(halves=rt.parallel)  # packing is done once
    assert rt.packed is again


def test_gemm_backend_comes_from_the_config_or_the_cpu(tokenizer):
    with pytest.raises(ValueError, match="gemm_backend"):
        EngineConfig(gemm_backend="mkl")
    for name in ("numpy", "torch", "onednn"):
        rt = _engine(tokenizer, gemm_backend=name).runtime
        assert rt.gemm is model.GEMM_BACKENDS[name]
        assert bool(rt.packed) == (name == "onednn")  # oneDNN packs every matrix once
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    assert model.onednn_available()  # the CPU build of torch the README installs has it
    assert model.default_gemm_backend() == "onednn"
    model.default_gemm_backend.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model, "onednn_available", lambda: False)
            assert model.default_gemm_backend() == ("torch" if intel else "numpy")
    finally:
        model.default_gemm_backend.cache_clear()
    assert _engine(tokenizer).runtime.gemm is model.GEMM_BACKENDS[model.default_gemm_backend()]


def test_a_lone_decode_runs_its_gemvs_on_two_blas_threads_and_gives_them_back(tokenizer, prompts, monkeypatch):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    ref = _engine(tokenizer, compute_threads=1, decode_kv_gib=0)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = ref.generate([prompts[1]], params)[0]
    assert _engine(tokenizer, compute_threads=2).runtime.single_row_blas_threads == 0  # off by default
    eng = _engine(tokenizer, compute_threads=2, gemv_blas_threads=2)
    assert eng.runtime.single_row_blas_threads == 2 and ref.runtime.single_row_blas_threads == 0
    seen, step_tokens = [], []
    orig, orig_forward = model._linear, eng.runtime._forward

    def spy(x, w, parallel=True, mm=model._np_mm):
        seen.append((step_tokens[-1], mm is model._np_mm, blas_threads()))
        return orig(x, w, parallel, mm)

    def forward(step, k, v):
        step_tokens.append(int(step.token_ids.shape[0]))
        return orig_forward(step, k, v)

    monkeypatch.setattr(model, "_linear", spy)
    monkeypatch.setattr(eng.runtime, "_forward", forward)
    assert eng.generate([prompts[1]], params)[0] == want
    assert step_tokens[0] == len(prompts[1]) and step_tokens[1:] == [1] * 11
    lone = [s for s in seen if s[0] == 1]
    assert len(lone) == 11 * (4 * len(eng.runtime.layers) + 1)  # every decode step's GEMVs ...
    assert all(np_mm and threads == {2} for _, np_mm, threads in lone)  # ... on numpy's BLAS, two threads
    assert all(threads == {1} for t, _, threads in seen if t > 1)  # the prefill on one
    assert blas_threads() == {1}  # given back after each step
    # an explicit BLAS setting is left alone
    assert _engine(tokenizer, gemv_blas_threads=2, blas_threads=None).runtime.single_row_blas_threads == 0
    with pytest.raises(ValueError, match="gemv_blas_threads"):
        EngineConfig(gemv_blas_threads=4)


def _engine(tokenizer, **kw) -> LLMEngine:
    return LLMEngine(tiny_config(), tiny_state(3), tokenizer, EngineConfig(**kw))


def _run(eng: LLMEngine, prompts: list[list[int]], abort_at: int | None = None, watch=None) -> None:
    """Staggered arrivals (a new request every other step), one abort: slots are freed, reused, left as holes."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    pending = list(enumerate(prompts))
    step = 0
    while pending or eng.has_work():
        if pending and step % 2 == 0:
            i, p = pending.pop(0)
            eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=10 + 3 * i, ignore_eos=True)
                            if i % 2 else params)
        if abort_at is not None and step == abort_at:
            assert eng.abort("r1")
        eng.step()
        if watch is not None:
            watch(eng)
        step += 1


def _outputs(eng: LLMEngine, prompts, **kw) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    orig = eng._append

    def capture(req, tok, now):
        got.setdefault(req.request_id, []).append(tok)
        return orig(req, tok, now)

    eng._append = capture
    _run(eng, prompts, **kw)
    return got


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(100, 40000, n).tolist() for n in (5, 40, 17, 64, 3, 33, 90, 12)]


def test_decode_copy_and_two_threads_give_the_gathering_tokens(tokenizer, prompts, monkeypatch):
    ref = _outputs(_engine(tokenizer, compute_threads=1, decode_kv_gib=0), prompts, abort_at=9)
    # prefill attention in jobs of 16 query rows (each against only the context it sees), shared
    # out over both threads
    monkeypatch.setattr(model, "PREFILL_ROWS", 16)
    # and every decode longer than the shortest attends on its own, at its exact length
    monkeypatch.setattr(model, "PAD_COST", 0)
    jobs = model._prefill_jobs([SeqSlice(0, 48, 90, []), SeqSlice(48, 5, 5, [])], 2)
    assert sorted((j[0], j[1], j[2], j[3]) for t in jobs for j in t) == \
        [(0, 0, 16, 58), (0, 16, 32, 74), (0, 32, 48, 90), (1, 0, 5, 5)]
    assert all(jobs) and all(j[4].shape == (j[2] - j[1], j[3]) for t in jobs for j in t)
    seen = []

    def watch(eng):
        dk = eng.runtime.decode_kv
        seen.append((len(dk.slot_of), max(dk.slot_of.values(), default=-1)))

    eng = _engine(tokenizer, compute_threads=2, token_budget=48)
    got = _outputs(eng, prompts, abort_at=9, watch=watch)
    assert got == ref
    assert eng.runtime.parallel and eng.runtime.decode_kv is not None
    assert max(n for n, _ in seen) >= 4  # several sequences decoded from the copy at once
    assert any(top + 1 > n for n, top in seen if n)  # with a hole below the highest slot in use
    assert seen[-1][0] == 0 or not eng.has_work()


def test_preemption_and_a_too_small_budget_fall_back_and_still_match(tokenizer, prompts):
    ref = _outputs(_engine(tokenizer, compute_threads=1, decode_kv_gib=0), prompts)
    # 10 blocks of 16 tokens for 8 sequences of up to 90 + 31 tokens: requests are preempted and
    # recomputed, and their decode copies must not be reused across the preemption.
    small = _engine(tokenizer, num_blocks=14)
    got = _outputs(small, prompts)
    assert small.scheduler.num_preemptions > 0
    assert got == ref
    # a budget below one slot: every step gathers (nothing is held), same tokens
    tight = _engine(tokenizer, decode_kv_gib=1e-6)
    assert _outputs(tight, prompts) == ref
    assert not tight.runtime.decode_kv.slot_of and tight.runtime.decode_kv.k.numel() == 0


def test_a_step_that_outgrows_the_copy_gathers_and_later_steps_refill_their_copies(tokenizer, prompts):
    # Room for 8 slots of 256 tokens exactly: the long prompt crosses 256 tokens while decoding,
    # those steps gather, and the short sequences' copies (left behind for those steps) must be
    # refilled, not reused, once it finishes.
    c = tiny_config()
    budget = 2 * c.num_layers * 8 * c.num_kv_heads * 256 * c.head_dim * 4
    mixed = prompts[:3] + [np.random.default_rng(2).integers(100, 40000, 240).tolist()] + prompts[3:]
    ref = _outputs(_engine(tokenizer, compute_threads=1, decode_kv_gib=0), mixed)
    eng = _engine(tokenizer, decode_kv_gib=budget / (1 << 30), max_num_seqs=8)
    assert eng.runtime.decode_kv.k.shape[1] == 8 and eng.runtime.decode_kv.k.shape[3] == 256
    assert _outputs(eng, mixed) == ref
    assert eng.runtime.decode_kv.fallbacks > 0


def test_the_padded_length_is_the_cheapest_split():
    assert model._pad_length(4, [10, 12, 11, 9]) == 12  # similar lengths: one padded pass
    # one long context among short ones goes alone instead of padding every slot up to it
    assert model._pad_length(32, [100] * 31 + [1000]) == 100
    assert model._pad_length(3, [900, 1000, 1000]) == 1000  # going alone costs PAD_COST each
    lens = [37, 400, 90, 1200, 64, 700]
    cost = lambda p: 8 * p + sum(n + model.PAD_COST for n in lens if n > p)  # noqa: E731
    assert cost(model._pad_length(8, lens)) == min(cost(p) for p in lens)


def test_engine_config_rejects_bad_thread_counts():
    with pytest.raises(ValueError, match="compute_threads"):
        EngineConfig(compute_threads=3)
    with pytest.raises(ValueError, match="decode_kv_gib"):
        EngineConfig(decode_kv_gib=-1)


@pytest.mark.parametrize("gemm", ["onednn", "panel"])
def test_a_lone_decode_beside_openmp_threads_drops_torch_to_one_thread(tokenizer, prompts, monkeypatch, gemm):
    """The engine process' setting (steps on torch's two OpenMP threads, a lone decode's GEMVs on two
    OpenBLAS threads): torch runs that step on one thread and gets its two back after it. With the
    panel GEMMs (the engine process's default) a lone decode's GEMVs are theirs, on torch's two
    threads, and BLAS is left alone."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    before = torch.get_num_threads()
    try:
        ref = _engine(tokenizer, compute_threads=1, decode_kv_gib=0)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        want = ref.generate([prompts[2]], params)[0]
        eng = _engine(tokenizer, compute_threads=1, torch_threads=2, gemv_blas_threads=2, gemm_backend=gemm)
        assert torch.get_num_threads() == 2 and eng.runtime.single_row_blas_threads == 2
        assert eng.runtime._packed_halves == ("panel" if gemm == "panel" else False)
        seen, orig_forward = [], eng.runtime._forward

        def forward(step, k, v):
            seen.append((int(step.token_ids.shape[0]), torch.get_num_threads(), blas_threads()))
            return orig_forward(step, k, v)

        monkeypatch.setattr(eng.runtime, "_forward", forward)
        assert eng.generate([prompts[2]], params)[0] == want
        assert seen[0] == (len(prompts[2]), 2, {1})  # the prefill on torch's two threads
        # each lone decode: torch on one, BLAS on two; with panels, torch on two
        assert seen[1:] == [(1, 1, {2}) if gemm == "onednn" else (1, 2, {1})] * 7
        assert torch.get_num_threads() == 2 and blas_threads() == {1}  # both given back
    finally:
        torch.set_num_threads(before)


def test_decode_copy_memory_starts_zeroed_writable_and_sized():
    """The decode copy's buffers come from ``_lazy_zeros`` (pages mapped on first write)."""
    kv = model._DecodeKV(num_layers=2, num_kv_heads=3, head_dim=8, max_bytes=1 << 20, slots=4, max_len=300)
    assert kv.k.shape == kv.v.shape == (2, 4, 3, 512, 8) and kv.k.dtype == torch.float32
    assert not kv.k.any() and not kv.v.any()
    kv.k[1, 3, 2, 511] = 7.0  # the last element: the whole buffer is writable memory
    assert float(kv.k.sum()) == 56.0 and not kv.v.any()
    empty = model._lazy_zeros((2, 0, 5))  # a decode copy with no room (cap 0) still builds
    assert empty.shape == (2, 0, 5)

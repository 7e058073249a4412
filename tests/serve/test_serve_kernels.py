"""The compiled kernels (outlast.serve.kernels): decode attention, the fused element-wise layer ops
and the panel GEMM, built here, each equal to its torch/float64 reference, refusing bad input, used
by the engine on torch's threads with the same greedy tokens as torch ops, and replaced by torch
ops (with a warning) where they cannot build.

The build needs a C++ compiler and ninja (the test extra has ninja). CI has both, so a kernel
that does not build fails these tests instead of skipping them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fleet_helpers import tiny_config, tiny_state
from outlast.serve import kernels
from outlast.serve.config import EngineConfig
from outlast.serve.engine import LLMEngine
from outlast.serve.sampler import SamplingParams


@pytest.fixture(scope="module")
def ops():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed build is a failure here, not a fallback
        mod = kernels.load()
    assert mod is not None, "the serve kernels did not build (needs g++ and ninja)"
    return mod


@pytest.fixture(scope="module")
def kern(ops):
    return ops.decode_attention


def _reference(q, k, v, rows, slots, lens, scale):
    T, H, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(T, H, D)
    for r, s, n in zip(rows.tolist(), slots.tolist(), lens.tolist()):
        for j in range(H):
            p = torch.softmax((q[r, j].double() @ k[s, j // G, :n].double().T) * scale, -1)
            out[r, j] = (p @ v[s, j // G, :n].double()).float()
    return out


@pytest.mark.parametrize("D,G,kvh", [(64, 3, 3), (128, 4, 2), (32, 1, 4), (8, 2, 2), (16, 16, 1)])
def test_kernel_equals_softmax_attention_at_each_sequences_length(kern, D, G, kvh):
    g = torch.Generator().manual_seed(D + G)
    H, cap = G * kvh, 80
    # K/V: a larger copy, sliced, so slot, head and position strides are not a dense tensor's
    k = torch.randn(8, kvh, cap + 16, D, generator=g)[:, :, :cap]
    v = torch.randn(8, kvh, cap + 16, D, generator=g)[:, :, :cap]
    # q: the query heads of a fused [T, H + kvh, D] projection, as the step hands them over
    q = (torch.randn(9, H + kvh, D, generator=g) * 2)[:, :H]
    rows = torch.tensor([0, 2, 3, 5, 6, 8])  # rows 1, 4 and 7 are another sequence's (prefill)
    slots = torch.tensor([5, 0, 7, 2, 1, 3])  # in any order, with slots 4 and 6 unused
    lens = torch.tensor([1, 80, 17, 5, 64, 33])
    out = torch.full((9, H, D), 7.0)
    kern(q, k, v, rows, slots, lens, D ** -0.5, out)
    want = _reference(q, k, v, rows, slots, lens, D ** -0.5)
    torch.testing.assert_close(out[rows], want[rows], rtol=2e-5, atol=2e-5)
    assert (out[[1, 4, 7]] == 7.0).all()  # other rows untouched
    # positions past a sequence's length, and unused slots, are never read
    k2, v2 = k.clone(), v.clone()
    for s, n in zip(slots.tolist(), lens.tolist()):
        k2[s, :, n:] = 1e4
        v2[s, :, n:] = float("nan")
    k2[[4, 6]] = float("nan")
    out2 = torch.full((9, H, D), 7.0)
    kern(q, k2, v2, rows, slots, lens, D ** -0.5, out2)
    assert torch.equal(out, out2)


def test_kernel_keeps_large_scores_finite(kern):
    # scores far apart (a softmax without the max subtracted would overflow)
    q = torch.full((1, 6, 64), 40.0)
    k = torch.randn(1, 2, 10, 64)
    k[0, :, 3] = 5.0
    v = torch.randn(1, 2, 10, 64)
    out = torch.empty_like(q)
    zero, ten = torch.tensor([0]), torch.tensor([10])
    kern(q, k, v, zero, zero, ten, 1.0, out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(q, k, v, zero, zero, ten, 1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(lens=torch.tensor([0, 4])), "length out of range"),
    (dict(lens=torch.tensor([4, 11])), "length out of range"),
    (dict(rows=torch.tensor([0, 3])), "row out of range"),
    (dict(slots=torch.tensor([-1, 1])), "slot out of range"),
    (dict(lens=torch.tensor([4, 4], dtype=torch.int32)), "int64"),
    (dict(lens=torch.tensor([4, 4, 4])), "one length"),
    (dict(q=torch.zeros(3, 4, 64, dtype=torch.float64)), "fp32"),
    (dict(q=torch.zeros(3, 4, 48)), "shapes disagree"),
    (dict(q=torch.zeros(3, 5, 64)), "shapes disagree"),
])
def test_kernel_refuses_bad_input_with_a_message(kern, bad, match):
    args = dict(q=torch.zeros(3, 4, 64), k=torch.zeros(2, 2, 10, 64), v=torch.zeros(2, 2, 10, 64),
                rows=torch.tensor([0, 2]), slots=torch.tensor([1, 0]), lens=torch.tensor([4, 10]))
    args.update(bad)
    out = torch.zeros(args["q"].shape, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=match):
        kern(args["q"], args["k"], args["v"], args["rows"], args["slots"], args["lens"], 0.125, out)


def _rms_ref(x, w, eps):
    x = x.double()
    return (w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).float()


@pytest.mark.parametrize("rows", [1, 5, 300])  # 300 rows of 576: split over the threads
def test_rms_norm_and_the_residual_add_before_it(ops, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(576, generator=g)
    x = (torch.randn(rows, 600, generator=g) * 3)[:, :576]  # rows with a stride, not a dense tensor
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), _rms_ref(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    d = torch.randn(rows, 576, generator=g)
    want_x = x + d
    before = x.clone()
    h = ops.add_rms_norm(x, d, w, 1e-5)
    assert not torch.equal(x, before)
    torch.testing.assert_close(x, want_x, rtol=0, atol=0)  # the add, in place
    torch.testing.assert_close(h, _rms_ref(want_x, w, 1e-5), rtol=1e-5, atol=1e-5)
    assert h.is_contiguous() and h.shape == (rows, 576)


def test_silu_mul_equals_torch_over_a_wide_range(ops):
    g = torch.Generator().manual_seed(1)
    gu = torch.randn(7, 2 * 200, generator=g) * 8
    gu[0, :6] = torch.tensor([-200.0, -88.0, -30.0, 0.0, 30.0, 200.0])  # exp's clamps on both sides
    got = ops.silu_mul(gu)
    want = F.silu(gu[:, :200].double()) * gu[:, 200:].double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want.float(), rtol=2e-6, atol=1e-6)


def _rope_ref(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def test_rope_kv_write_rotates_in_place_and_writes_pool_and_decode_copy(ops):
    g = torch.Generator().manual_seed(3)
    T, H, kvh, D, bs, blocks = 6, 6, 2, 16, 4, 5
    qkv = torch.randn(T, (H + 2 * kvh) * D, generator=g)
    ang = torch.randn(40, D // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    positions = torch.tensor([3, 0, 1, 2, 17, 39])
    slot_mapping = torch.tensor([3, 8, 9, 10, 0, 19])  # block * bs + offset
    kpool, vpool = torch.full((kvh, blocks, bs, D), 5.0), torch.full((kvh, blocks, bs, D), 5.0)
    dk, dv = torch.full((3, kvh, 50, D), 5.0), torch.full((3, kvh, 50, D), 5.0)
    drows, dslots, dpos = torch.tensor([0, 5, 4]), torch.tensor([2, 0, 1]), torch.tensor([3, 39, 17])
    heads = qkv.view(T, H + 2 * kvh, D)
    want_qk = _rope_ref(heads[:, : H + kvh], cos[positions][:, None], sin[positions][:, None])
    want_v = heads[:, H + kvh:].clone()
    ops.rope_kv_write(qkv, cos, sin, positions, H, kvh, kpool, vpool, slot_mapping, dk, dv, drows, dslots, dpos)
    torch.testing.assert_close(heads[:, : H + kvh], want_qk, rtol=1e-6, atol=1e-6)
    assert torch.equal(heads[:, H + kvh:], want_v)  # values are not rotated
    flat_k, flat_v = kpool.view(kvh, -1, D), vpool.view(kvh, -1, D)
    for t, sl in enumerate(slot_mapping.tolist()):
        assert torch.equal(flat_k[:, sl], heads[t, H:H + kvh]) and torch.equal(flat_v[:, sl], want_v[t])
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slot_mapping] = False
    assert (flat_k[:, untouched] == 5.0).all() and (flat_v[:, untouched] == 5.0).all()
    for r, sl, p in zip(drows.tolist(), dslots.tolist(), dpos.tolist()):
        assert torch.equal(dk[sl, :, p], heads[r, H:H + kvh]) and torch.equal(dv[sl, :, p], want_v[r])
    assert int((dk != 5.0).any(-1).sum()) == 3 * kvh  # nothing else in the decode copy
    # no decode copy: empty index tensors
    none = torch.empty(0, dtype=torch.int64)
    ops.rope_kv_write(qkv, cos, sin, positions, H, kvh, kpool, vpool, slot_mapping, torch.empty(0), torch.empty(0),
                      none, none, none)


@pytest.mark.parametrize("bad, match", [
    (dict(positions=torch.tensor([0, 40])), "past the tables"),
    (dict(slot_mapping=torch.tensor([0, 20])), "outside the pool"),
    (dict(slot_mapping=torch.tensor([-1, 2])), "outside the pool"),
    (dict(dpos=torch.tensor([50])), "decode position"),
    (dict(dslots=torch.tensor([3])), "decode slot"),
    (dict(drows=torch.tensor([2])), "decode row"),
    (dict(positions=torch.tensor([0, 1], dtype=torch.int32)), "int64"),
    (dict(H=5), "qkv must be"),
])
def test_rope_kv_write_refuses_bad_indices_before_writing(ops, bad, match):
    kvh, D = 2, 16
    args = dict(qkv=torch.randn(2, 10 * D), cos=torch.ones(40, D), sin=torch.zeros(40, D),
                positions=torch.tensor([0, 1]), H=6, kvh=kvh, kpool=torch.zeros(kvh, 5, 4, D), vpool=torch.zeros(kvh, 5, 4, D),
                slot_mapping=torch.tensor([0, 1]), dk=torch.zeros(3, kvh, 50, D), dv=torch.zeros(3, kvh, 50, D),
                drows=torch.tensor([1]), dslots=torch.tensor([0]), dpos=torch.tensor([1]))
    args.update(bad)
    before = args["qkv"].clone()
    with pytest.raises(RuntimeError, match=match):
        ops.rope_kv_write(*args.values())
    assert torch.equal(args["qkv"], before) and not args["kpool"].any() and not args["dk"].any()


@pytest.mark.parametrize("K,N", [(576, 960), (64, 40), (100, 33), (48, 32), (1536, 576)])
def test_panel_gemm_equals_a_float64_product(ops, K, N):
    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(K, N, generator=g)
    wp = ops.pack_panels(w)
    assert wp.shape == (-(-N // 32), K, 32)
    for M in (1, 2, 7, 8, 9, 17, 64):
        x = torch.randn(M, K + 3, generator=g)[:, :K]  # rows with a stride
        got = ops.panel_mm(x, wp, N)
        assert got.shape == (M, N) and got.is_contiguous()
        torch.testing.assert_close(got, (x.double() @ w.double()).float(), rtol=1e-5, atol=K * 2e-7)  # fp32 sums
    assert ops.panel_mm(torch.empty(0, K), wp, N).shape == (0, N)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(2, 30)), "packed by pack_panels"),
    (dict(n=70), "does not match"),
    (dict(n=32), "does not match"),
    (dict(x=torch.zeros(2, 48, dtype=torch.float64)), "fp32"),
    (dict(x=torch.zeros(48, 2).t()), "contiguous rows"),
])
def test_panel_gemm_refuses_bad_input(ops, bad, match):
    args = dict(x=torch.zeros(2, 48), wp=ops.pack_panels(torch.zeros(48, 40)), n=40)
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        ops.panel_mm(args["x"], args["wp"], args["n"])


def _greedy(eng, prompts, n=12):
    got = {}
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=n + i, ignore_eos=True))
    while eng.has_work():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    return got


def test_engine_on_one_thread_uses_the_kernel_with_the_torch_ops_tokens(kern, tokenizer, monkeypatch):
    rng = np.random.default_rng(2)
    prompts = [rng.integers(100, 40000, n).tolist() for n in (5, 40, 17, 64, 3, 33, 90)]
    cfg = dict(compute_threads=1, torch_threads=1, token_budget=48)
    ref = LLMEngine(tiny_config(), tiny_state(5), tokenizer, EngineConfig(compiled_kernels=False, **cfg))
    assert ref.runtime.layer_ops is None
    want = _greedy(ref, prompts)
    eng = LLMEngine(tiny_config(), tiny_state(5), tokenizer, EngineConfig(**cfg))
    assert eng.runtime.layer_ops is not None and eng.runtime.layer_ops.decode_attention is kern
    # the GEMMs on panels, every matrix
    assert eng.gemm_backend() == "panel" and ref.gemm_backend() != "panel"
    assert len(eng.runtime.packed) == 1 + 4 * tiny_config().num_layers
    assert all(type(p).__name__ == "_Panel" for p in eng.runtime.packed.values())
    calls = []  # decode attention: sequences per call
    fused = {}

    class Counting:  # the module's ops, counted
        def __getattr__(self, name):
            fn = getattr(eng_ops, name)

            def counted(*a):
                fused[name] = fused.get(name, 0) + 1
                if name == "decode_attention":
                    calls.append(int(a[4].numel()))
                return fn(*a)

            return counted

    eng_ops = eng.runtime.layer_ops
    monkeypatch.setattr(eng.runtime, "layer_ops", Counting())
    panel_calls = []
    for p in eng.runtime.packed.values():
        monkeypatch.setattr(p, "mm", lambda x, w, n, f=p.mm: (panel_calls.append(int(x.shape[0])), f(x, w, n))[1])
    assert _greedy(eng, prompts) == want
    assert len(calls) > 20 and max(calls) >= 4  # several sequences per call, every decode step's layers
    L = tiny_config().num_layers
    steps = fused["rope_kv_write"] // L
    assert steps > 10 and fused["rope_kv_write"] == steps * L and fused["silu_mul"] == steps * L
    assert fused["add_rms_norm"] == steps * (2 * L - 1) and fused["rms_norm"] == 2 * steps  # + final norm
    assert len(panel_calls) == steps * (4 * L + 1) and 1 in panel_calls  # one-row steps on panels too
    # two threads splitting with the compute worker keep their own attention, ops and GEMMs
    par = LLMEngine(tiny_config(), tiny_state(5), tokenizer, EngineConfig(compute_threads=2))
    assert par.runtime.layer_ops is None
    assert par.gemm_backend() != "panel"


def test_a_kernel_that_cannot_build_warns_once_and_torch_ops_serve(tokenizer, monkeypatch, tmp_path):
    import torch.utils.cpp_extension as ext

    def no_compiler(**kw):
        raise RuntimeError("Ninja is required to load C++ extensions\nno g++ here")

    monkeypatch.setattr(ext, "load", no_compiler)
    monkeypatch.setenv("OUTLAST_KERNEL_DIR", str(tmp_path))
    kernels.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="did not build.*no g\\+\\+ here.*ninja") as caught:
            eng = LLMEngine(tiny_config(), tiny_state(5), tokenizer, EngineConfig(compute_threads=1))
        assert len([w for w in caught if "did not build" in str(w.message)]) == 1  # once
        assert eng.runtime.layer_ops is None
        assert eng.gemm_backend() != "panel" and not any(type(p).__name__ == "_Panel" for p in eng.runtime.packed.values())
        assert _greedy(eng, [[5, 6, 7, 8]], n=4)["r0"]  # serves on torch ops
    finally:
        kernels.load.cache_clear()


def test_the_panel_backend_refuses_the_two_thread_split(tokenizer):
    with pytest.raises(ValueError, match="compute_threads=1"):
        LLMEngine(tiny_config(), tiny_state(5), tokenizer, EngineConfig(compute_threads=2, gemm_backend="panel"))
    with pytest.raises(ValueError, match="gemm_backend"):
        EngineConfig(gemm_backend="blas")

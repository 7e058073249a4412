"""The compiled decode attention (outlast.serve.kernels): built here, equal to torch's attention,
refusing bad input, used by the engine on torch's threads with the same tokens, and replaced by
torch ops (with a warning) where it cannot build.

The build needs a C++ compiler and ninja (the test extra has ninja). CI has both, so a kernel
that does not build fails these tests instead of skipping them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fleet_helpers import tiny_config, tiny_state
from outlast.serve import kernels
from outlast.serve.config import EngineConfig
from outlast.serve.engine import LLMEngine
from outlast.serve.sampler import SamplingParams


@pytest.fixture(scope="module")
def kern():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed build is a failure here, not a fallback
        k = kernels.decode_attention()
    assert k is not None, "the decode attention kernel did not build (needs g++ and ninja)"
    return k


def _reference(q, k, v, lens, scale):
    out = torch.empty_like(q)
    kvh = k.shape[1]
    for i in range(q.shape[0]):
        s, h = divmod(i, kvh)
        n = int(lens[s])
        p = torch.softmax((q[i].double() @ k[s, h, :n].double().T) * scale, -1)
        out[i] = (p @ v[s, h, :n].double()).float()
    return out


@pytest.mark.parametrize("D,G,kvh", [(64, 3, 3), (128, 4, 2), (32, 1, 4), (8, 2, 2), (16, 16, 1)])
def test_kernel_equals_softmax_attention_at_each_slots_length(kern, D, G, kvh):
    g = torch.Generator().manual_seed(D + G)
    slots, cap = 6, 80
    # a larger copy, sliced: slot, head and position strides are not those of a dense tensor
    big_k = torch.randn(slots + 2, kvh, cap + 16, D, generator=g)
    big_v = torch.randn(slots + 2, kvh, cap + 16, D, generator=g)
    k, v = big_k[:slots, :, :cap], big_v[:slots, :, :cap]
    q = torch.randn(slots * kvh, G, D, generator=g) * 2
    lens = torch.tensor([1, 80, 17, 5, 64, 33], dtype=torch.int64)
    out = torch.full_like(q, float("nan"))
    kern(q, k, v, lens, D ** -0.5, out)
    torch.testing.assert_close(out, _reference(q, k, v, lens, D ** -0.5), rtol=2e-5, atol=2e-5)
    # positions past a slot's length never count: garbage there changes nothing
    k2, v2 = k.clone(), v.clone()
    for s, n in enumerate(lens.tolist()):
        k2[s, :, n:] = 1e4
        v2[s, :, n:] = float("nan")
    out2 = torch.empty_like(q)
    kern(q, k2, v2, lens, D ** -0.5, out2)
    assert torch.equal(out, out2)


def test_kernel_keeps_large_scores_finite(kern):
    # scores far apart (a softmax without the max subtracted would overflow)
    q = torch.full((2, 3, 64), 40.0)
    k = torch.randn(1, 2, 10, 64)
    k[0, :, 3] = 5.0
    v = torch.randn(1, 2, 10, 64)
    out = torch.empty_like(q)
    kern(q, k, v, torch.tensor([10]), 1.0, out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(q, k, v, torch.tensor([10]), 1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(lens=torch.tensor([0, 4])), "length out of range"),
    (dict(lens=torch.tensor([4, 11])), "length out of range"),
    (dict(lens=torch.tensor([4, 4], dtype=torch.int32)), "int64"),
    (dict(q=torch.zeros(4, 2, 64, dtype=torch.float64)), "fp32"),
    (dict(q=torch.zeros(4, 2, 48)), "shapes disagree|head_dim"),
    (dict(q=torch.zeros(3, 2, 64)), "shapes disagree"),
])
def test_kernel_refuses_bad_input_with_a_message(kern, bad, match):
    args = dict(q=torch.zeros(4, 2, 64), k=torch.zeros(2, 2, 10, 64), v=torch.zeros(2, 2, 10, 64),
                lens=torch.tensor([4, 10]))
    args.update(bad)
    out = torch.zeros(args["q"].shape, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=match):
        kern(args["q"], args["k"], args["v"], args["lens"], 0.125, out)


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
    assert ref.runtime.attention_kernel is None
    want = _greedy(ref, prompts)
    eng = LLMEngine(tiny_config(), tiny_state(5), tokenizer, EngineConfig(**cfg))
    assert eng.runtime.attention_kernel is kern
    calls = []

    def counted(*a):
        calls.append(int(a[3].numel()))
        return kern(*a)

    monkeypatch.setattr(eng.runtime, "attention_kernel", counted)
    assert _greedy(eng, prompts) == want
    assert len(calls) > 20 and max(calls) >= 4  # several sequences per call, every decode step's layers
    # two threads splitting with the compute worker keep their own attention
    par = LLMEngine(tiny_config(), tiny_state(5), tokenizer, EngineConfig(compute_threads=2))
    assert par.runtime.attention_kernel is None


def test_a_kernel_that_cannot_build_warns_once_and_torch_ops_serve(tokenizer, monkeypatch, tmp_path):
    import torch.utils.cpp_extension as ext

    def no_compiler(**kw):
        raise RuntimeError("Ninja is required to load C++ extensions\nno g++ here")

    monkeypatch.setattr(ext, "load", no_compiler)
    monkeypatch.setenv("OUTLAST_KERNEL_DIR", str(tmp_path))
    kernels.decode_attention.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="did not build.*no g\\+\\+ here.*ninja"):
            eng = LLMEngine(tiny_config(), tiny_state(5), tokenizer, EngineConfig(compute_threads=1))
        assert eng.runtime.attention_kernel is None
        assert _greedy(eng, [[5, 6, 7, 8]], n=4)["r0"]  # serves on torch ops
    finally:
        kernels.decode_attention.cache_clear()

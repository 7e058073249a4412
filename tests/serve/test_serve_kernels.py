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
        calls.append(int(a[4].numel()))
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

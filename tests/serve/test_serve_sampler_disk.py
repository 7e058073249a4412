"""Sampler semantics and the disk tier's checksums and bound, without a model."""

from __future__ import annotations

import os

import pytest
import torch

from outlast.serve.errors import BadRequestError
from outlast.serve.kv_disk import DiskKVTier
from outlast.serve.sampler import SamplingParams, make_generator, sample


def logits(v=50, seed=0):
    return torch.randn(1, v, generator=torch.Generator().manual_seed(seed)) * 3


def draws(lg, p, n=200):
    g = make_generator(p)
    return [sample(lg, [p], [g])[0] for _ in range(n)]


def test_greedy_is_argmax():
    lg = torch.randn(4, 50)
    assert sample(lg, [SamplingParams(temperature=0)] * 4, [None] * 4) == lg.argmax(-1).tolist()


def test_greedy_takes_the_first_of_equal_maxima_and_of_nans_on_strided_rows():
    # The sampler's argmax is numpy's; these are the cases where two argmaxes could disagree.
    base = torch.randn(5, 40)
    base[0, [7, 3, 30]] = 100.0  # ties: the first index wins (3 is cut off below)
    base[1, [25, 9]] = float("nan")  # NaN counts as the maximum: the first NaN wins
    base[2, :] = -float("inf")
    base[3, 11] = float("inf")
    lg = base[:, 5:]  # not contiguous, as the engine's logit rows can be
    got = sample(lg, [SamplingParams(temperature=0)] * 5, [None] * 5)
    assert got[:4] == [2, 4, 0, 6]
    assert got == lg.argmax(-1).tolist()


def test_seed_reproduces_and_different_seeds_differ():
    lg = logits()
    p = SamplingParams(temperature=1.0, seed=123)
    assert draws(lg, p) == draws(lg, p)
    assert draws(lg, p) != draws(lg, SamplingParams(temperature=1.0, seed=124))


def test_top_k_and_top_p_restrict_the_support():
    lg = logits()
    top3 = set(torch.topk(lg[0], 3).indices.tolist())
    assert set(draws(lg, SamplingParams(temperature=1.5, top_k=3, seed=1))) <= top3
    assert len(set(draws(lg, SamplingParams(temperature=1.5, top_k=3, seed=1)))) > 1
    probs = lg[0].softmax(-1)
    order = probs.argsort(descending=True)
    keep = set()
    mass = 0.0
    for t in order.tolist():
        keep.add(t)
        mass += float(probs[t])
        if mass >= 0.5:
            break
    assert set(draws(lg, SamplingParams(temperature=1.0, top_p=0.5, seed=2))) <= keep
    assert set(draws(lg, SamplingParams(temperature=1.0, top_p=1e-6, seed=3))) == {int(order[0])}


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(temperature=2.5), dict(top_p=0.0), dict(top_p=1.5),
                                dict(top_k=-2), dict(max_tokens=0), dict(max_tokens=-3), dict(max_tokens=1.5),
                                dict(seed="x"), dict(stop=[""]), dict(stop=[1]), dict(stop_token_ids=[-1]),
                                dict(temperature=float("nan"))])
def test_bad_sampling_values_are_refused_naming_the_field(kw):
    with pytest.raises(BadRequestError) as e:
        SamplingParams(**kw)
    assert e.value.param == next(iter(kw))


def test_disk_tier_round_trips_detects_damage_and_stays_bounded(tmp_path):
    shape = (2, 4, 1, 8)
    per = 2 * 2 * 4 * 1 * 8 * 4
    tier = DiskKVTier(str(tmp_path), 3 * per, shape)
    blocks = {bytes([i]) * 16: (torch.randn(shape), torch.randn(shape)) for i in range(5)}
    for h, (k, v) in blocks.items():
        tier.put(h, k, v)
    assert len(tier) == 3 and tier.bytes <= 3 * per  # the two oldest were dropped
    assert tier.get(bytes([0]) * 16) is None
    h = bytes([4]) * 16
    k, v = tier.get(h)
    assert torch.equal(k, blocks[h][0]) and torch.equal(v, blocks[h][1])
    h3 = bytes([3]) * 16
    path = os.path.join(str(tmp_path), h3.hex() + ".kv")
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 0x01  # one flipped bit in the payload
    open(path, "wb").write(bytes(raw))
    assert tier.get(h3) is None and tier.corrupt == 1 and not os.path.exists(path)
    h2 = bytes([2]) * 16
    path = os.path.join(str(tmp_path), h2.hex() + ".kv")
    open(path, "r+b").truncate(40)
    assert tier.get(h2) is None and tier.corrupt == 2
    # A new process finds the surviving block.
    again = DiskKVTier(str(tmp_path), 3 * per, shape)
    assert h in again and torch.equal(again.get(h)[0], blocks[h][0])

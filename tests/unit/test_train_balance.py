"""Tests for outlast.train.balance: exact cover, determinism, quality against naive and optimal."""

import csv
import itertools
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outlast.train.balance import METHODS, CostModel, documents_for_rank, imbalance, loads, partition
from outlast.train.data import DocumentStream
from outlast.train.model import ModelConfig

LENGTHS_CSV = Path(__file__).resolve().parents[2] / "bench" / "data" / "topical_chat_lengths.csv"


def real_lengths():
    with open(LENGTHS_CSV) as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return [int(r["prompt_bytes"]) + int(r["reply_bytes"]) for r in rows]


def optimum(costs, world_size):
    """Smallest possible max part cost, by brute force (tiny inputs only)."""
    return min(
        max(sum(c for c, a in zip(costs, assign) if a == r) for r in range(world_size))
        for assign in itertools.product(range(world_size), repeat=len(costs))
    )


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.floats(0, 1e6, allow_nan=False), max_size=60),
    world_size=st.integers(1, 9),
    method=st.sampled_from(METHODS),
)
def test_every_document_assigned_exactly_once_and_deterministic(costs, world_size, method):
    parts = partition(costs, world_size, method)
    assert len(parts) == world_size
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))
    assert all(p == sorted(p) for p in parts)
    assert partition(list(costs), world_size, method) == parts


@settings(max_examples=150, deadline=None)
@given(costs=st.lists(st.integers(1, 30), min_size=1, max_size=7), world_size=st.integers(2, 3))
def test_lpt_within_graham_bound_and_kk_within_largest_item_of_mean(costs, world_size):
    best = optimum(costs, world_size)
    lpt = max(loads(partition(costs, world_size, "lpt"), costs))
    assert best <= lpt <= (4 / 3 - 1 / (3 * world_size)) * best + 1e-9
    kk = max(loads(partition(costs, world_size, "kk"), costs))
    assert best <= kk <= sum(costs) / world_size + max(costs) + 1e-9


def test_known_cases_where_the_optimum_is_known():
    # 1..9 into 3 parts: 15 each is optimal; KK finds it, greedy LPT does not (16).
    costs = list(range(1, 10))
    assert optimum(costs, 3) == 15
    assert max(loads(partition(costs, 3, "kk"), costs)) == 15
    assert max(loads(partition(costs, 3, "lpt"), costs)) == 16
    assert max(loads(partition(costs, 3, "naive"), costs)) == 24
    # Perfect 2-way split, found by both heuristics.
    costs = [3, 1, 1, 2, 2, 1]
    for method in ("kk", "lpt"):
        assert imbalance(partition(costs, 2, method), costs) == 1.0


def test_balanced_methods_beat_naive_on_random_lengths():
    rng = random.Random(0)
    for world_size in (2, 4, 8, 16):
        ratios = {m: [] for m in METHODS}
        for _ in range(10):
            lengths = [int(rng.lognormvariate(6, 1.2)) + 1 for _ in range(128)]
            costs = [CostModel(1.0, 1 / 512)(n) for n in lengths]
            for m in METHODS:
                ratios[m].append(imbalance(partition(costs, world_size, m), costs))
        mean = {m: sum(v) / len(v) for m, v in ratios.items()}
        assert mean["kk"] < mean["naive"] and mean["lpt"] < mean["naive"]


def test_balanced_methods_beat_naive_on_real_lengths_every_step():
    lengths = real_lengths()
    assert len(lengths) > 20_000
    rng = random.Random(1)
    cost = CostModel.from_config(ModelConfig.preset("small"))
    for world_size in (4, 16):
        for _ in range(5):
            batch = [cost(n) for n in rng.sample(lengths, 256)]
            naive = imbalance(partition(batch, world_size, "naive"), batch)
            for m in ("kk", "lpt"):
                assert imbalance(partition(batch, world_size, m), batch) <= naive


def test_imbalance_and_loads():
    assert loads([[0, 2], [1]], [1.0, 5.0, 2.0]) == [3.0, 5.0]
    assert imbalance([[0, 2], [1]], [1.0, 5.0, 2.0]) == 1.25
    assert imbalance([[0], []], [0.0]) == 1.0
    assert imbalance([[0], [1], []], [1.0, 1.0]) == 1.5  # an idle rank still counts in the mean
    with pytest.raises(ValueError, match="at least one part"):
        imbalance([], [])


def test_fewer_documents_than_ranks_leaves_empty_parts_last():
    for m in METHODS:
        parts = partition([5.0, 1.0], 4, m)
        assert sorted(i for p in parts for i in p) == [0, 1] and parts[2:] == [[], []]


def test_cost_model_from_config_has_linear_and_quadratic_terms():
    cfg = ModelConfig.preset("base")
    cost = CostModel.from_config(cfg)
    d = cfg.d_model
    assert cost.quadratic == 2 * cfg.n_layers * d
    assert cost.linear == 2 * cfg.n_layers * (4 * d * d + 2 * d * cfg.d_ff) + 2 * d * cfg.vocab_size
    # Attention overtakes the linear term near 12 * d tokens when d_ff = 4 * d.
    crossover = cost.linear / cost.quadratic
    assert 12 * d <= crossover <= 13 * d
    assert cost(2 * d) < 2 * cost(d) * 1.2 and cost(100 * d) > 2 * cost(50 * d) * 1.5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="world_size"):
        partition([1.0], 0)
    with pytest.raises(ValueError, match=r"costs\[1\]"):
        partition([1.0, -2.0], 2)
    with pytest.raises(ValueError, match=r"costs\[0\]"):
        partition([float("nan")], 2)
    with pytest.raises(ValueError, match="unknown partition method"):
        partition([1.0], 2, "random")
    with pytest.raises(ValueError, match="CostModel.quadratic"):
        CostModel(1.0, -1.0)
    with pytest.raises(ValueError, match="rank=2"):
        documents_for_rank([1, 2], rank=2, world_size=2)


def test_ranks_split_a_shared_stream_without_communication():
    # Each rank owns a stream with the same seed, draws the same global batch and keeps
    # its share; together they cover the batch exactly once.
    docs = [torch.full((n,), 7) for n in [5, 80, 13, 400, 2, 61, 33, 250, 9, 120, 17, 3]]
    world_size, batch = 3, 8
    cost = CostModel.from_config(ModelConfig.preset("tiny"))
    streams = [DocumentStream(docs, seed=11) for _ in range(world_size)]
    for _step in range(4):
        seen = []
        for rank, stream in enumerate(streams):
            global_batch = stream.take(batch)
            mine = documents_for_rank([d.numel() for d in global_batch], rank, world_size, cost)
            seen += [(id(global_batch[i]), i) for i in mine]
        assert sorted(i for _, i in seen) == list(range(batch))
        assert len(set(seen)) == batch
    assert len({json_state(s) for s in streams}) == 1


def json_state(stream):
    return tuple(sorted(stream.state_dict().items()))


def _dense_kk(costs, w):
    """The textbook multi-way differencing, copying every subset (the reference)."""
    import heapq

    heap = [(-float(c), i, [float(c)] + [0.0] * (w - 1), [[i]] + [[] for _ in range(w - 1)]) for i, c in enumerate(costs)]
    heapq.heapify(heap)
    counter = len(costs)
    while len(heap) > 1:
        _, _, sa, xa = heapq.heappop(heap)
        _, _, sb, xb = heapq.heappop(heap)
        sums = [sa[k] + sb[w - 1 - k] for k in range(w)]
        sets = [xa[k] + xb[w - 1 - k] for k in range(w)]
        order = sorted(range(w), key=lambda k: -sums[k])
        heapq.heappush(heap, (-(sums[order[0]] - sums[order[-1]]), counter, [sums[k] for k in order], [sets[k] for k in order]))
        counter += 1
    return heap[0][3]


def test_fast_kk_equals_the_dense_reference():
    import random

    rnd = random.Random(3)
    for n, w in [(1, 1), (3, 8), (17, 4), (200, 16), (513, 128), (64, 64)]:
        costs = [rnd.uniform(0.5, 1000.0) for _ in range(n)]
        want = sorted((sorted(p) for p in _dense_kk(costs, w)), key=lambda p: (not p, p[:1]))
        assert partition(costs, w, "kk") == want, (n, w)

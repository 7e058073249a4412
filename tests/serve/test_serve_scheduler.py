"""Scheduler and KV bookkeeping without a model: invariants over many random workloads.

A fake step stands in for the forward: every scheduled request advances by its tokens and,
when caught up, gets one new token. Checked at every step: the budget is never exceeded,
every running decode is scheduled before any prefill gets tokens (unless it was preempted),
no block is referenced by two live requests unless it is a shared prefix, and at the end
every reference count is back to zero.
"""

from __future__ import annotations

import random

import pytest

from outlast.serve.kv_cache import KVCacheManager, chain_hash
from outlast.serve.sampler import SamplingParams
from outlast.serve.scheduler import Request, Scheduler


def kv_manager(num_blocks, block_size=4, salt=b"w", prefix=True):
    return KVCacheManager(2, 1, 2, num_blocks=num_blocks, block_size=block_size, salt=salt, enable_prefix_caching=prefix)


def run_workload(seed: int, *, num_blocks: int, budget: int, max_seqs: int, prefix: bool):
    rng = random.Random(seed)
    kv = kv_manager(num_blocks, prefix=prefix)
    s = Scheduler(kv, max_num_seqs=max_seqs, token_budget=budget)
    shared = [rng.randrange(100) for _ in range(12)]
    reqs = []
    for i in range(rng.randrange(3, 12)):
        prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(100) for _ in range(rng.randrange(1, 20))]
        # The engine refuses requests longer than the pool (LLMEngine.validate): so does this workload.
        max_tokens = min(rng.randrange(1, 10), num_blocks * 4 - len(prompt))
        r = Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
        reqs.append(r)
        s.add(r)
    steps = 0
    while s.has_work():
        steps += 1
        assert steps < 5000, "no progress"
        decoding = [r for r in s.running if r.num_computed_tokens == r.num_tokens - 1]
        out = s.schedule()
        assert 0 < out.num_tokens <= budget or (out.num_tokens == 0 and not s.running)
        names = [r.request_id for r, _ in out.scheduled]
        assert len(names) == len(set(names))
        assert len(s.running) <= max_seqs
        got = {r.request_id: n for r, n in out.scheduled}
        first_prefill = next((i for i, (r, n) in enumerate(out.scheduled) if n > 1 or r.num_computed_tokens + n < r.num_tokens), None)
        for r in decoding:
            if r in out.preempted:
                continue
            assert got.get(r.request_id) == 1, "a running decode was skipped"
            if first_prefill is not None:
                assert names.index(r.request_id) < first_prefill, "a prefill went before a decode"
        # Each live request's table covers its tokens; blocks are shared only as cached prefixes.
        owners: dict[int, list[str]] = {}
        for r in s.running:
            table = kv.req_blocks[r.request_id]
            assert len(table) * kv.block_size >= r.num_computed_tokens + got.get(r.request_id, 0)
            for b in table:
                owners.setdefault(b.block_id, []).append(r.request_id)
        for bid, who in owners.items():
            b = kv.pool.blocks[bid]
            assert b.ref_cnt == len(who)
            assert len(who) == 1 or b.block_hash is not None
        for r, n in out.scheduled:  # the fake forward + sampler
            r.num_computed_tokens += n
            kv.cache_full_blocks(r)
            if r.num_computed_tokens == r.num_tokens:
                r.append_token(rng.randrange(100))
                if len(r.output_token_ids) >= r.params.max_tokens:
                    s.finish(r, "length")
    assert all(r.status == "finished" and len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert kv.pool.num_free == num_blocks and not kv.req_blocks
    return s, kv


@pytest.mark.parametrize("seed", range(40))
def test_invariants_hold_on_random_workloads(seed):
    # Pools from tight (forces preemption) to roomy; budgets from tiny (forces chunking) to large.
    rng = random.Random(1000 + seed)
    run_workload(seed, num_blocks=rng.choice([9, 12, 20, 64]), budget=rng.choice([1, 3, 8, 64]),
                 max_seqs=rng.choice([1, 2, 4, 16]), prefix=rng.random() < 0.7)


def test_tight_pool_preempts_and_still_finishes_everything():
    preempted = 0
    for seed in range(10):
        s, _ = run_workload(seed, num_blocks=9, budget=64, max_seqs=16, prefix=False)
        preempted += s.num_preemptions
    assert preempted > 0


def test_abort_frees_blocks_at_once():
    kv = kv_manager(16)
    s = Scheduler(kv, max_num_seqs=4, token_budget=64)
    a = Request("a", list(range(10)), SamplingParams(max_tokens=5))
    b = Request("b", list(range(30, 40)), SamplingParams(max_tokens=5))
    s.add(a), s.add(b)
    s.schedule()
    assert kv.pool.num_free == 16 - 6
    s.abort("a")
    assert kv.pool.num_free == 16 - 3 and "a" not in kv.req_blocks and a.finish_reason == "abort"
    s.abort("b")
    assert kv.pool.num_free == 16 and all(blk.ref_cnt == 0 for blk in kv.pool.blocks)
    assert s.abort("nope") is None


def test_prefix_hit_shares_blocks_and_salt_separates_models():
    kv = kv_manager(16, salt=b"model-A")
    first = Request("a", list(range(13)), SamplingParams())
    assert kv.allocate_slots(first, 13)
    first.num_computed_tokens = 13
    kv.cache_full_blocks(first)
    second = Request("b", list(range(12)) + [99, 98], SamplingParams())
    blocks, n = kv.lookup_prefix(second)
    assert n == 12 and [b.block_id for b in blocks] == kv.block_table(first)[:3]
    assert all(b.ref_cnt == 2 for b in blocks)
    kv.release(blocks)
    other = kv_manager(16, salt=b"model-B")
    assert other.lookup_prefix(Request("c", list(range(13)), SamplingParams()))[1] == 0
    assert chain_hash(b"model-A", [1, 2]) != chain_hash(b"model-B", [1, 2])


def test_full_prompt_hit_still_computes_its_last_token():
    kv = kv_manager(16)
    a = Request("a", list(range(8)), SamplingParams())
    kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    kv.free(a)
    blocks, n = kv.lookup_prefix(Request("b", list(range(8)), SamplingParams()))
    assert n == 4  # the second block would hold the last token, whose logits are needed


def test_lru_evicts_the_oldest_freed_block_first():
    kv = kv_manager(4, block_size=2)
    a = Request("a", [1, 2, 3, 4], SamplingParams())
    kv.allocate_slots(a, 4)
    a.num_computed_tokens = 4
    kv.cache_full_blocks(a)
    kv.free(a)  # tail block freed first, so it is evicted first
    assert len(kv.pool.cached) == 2
    kv.pool.allocate(), kv.pool.allocate()  # the two never-used blocks
    kv.pool.allocate()  # now the oldest free one: a's tail
    assert chain_hash(chain_hash(b"w", [1, 2]), [3, 4]) not in kv.pool.cached
    assert chain_hash(b"w", [1, 2]) in kv.pool.cached

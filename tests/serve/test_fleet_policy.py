"""The routing policies as pure functions: affinity, the fall-back to the least loaded, round-robin."""

from __future__ import annotations

import pytest

from outlast.serve.policy import Replica, RoutingConfig, choose, prefix_hashes
from outlast.serve.router import routing_text

CONV = "<system>You are a helpful assistant.\n<user>Tell me about the river that runs through the old town.\n"


def _replicas(n=2):
    return [Replica(f"http://r{i}", up=True) for i in range(n)]


def test_prefix_hashes_chain_and_share_prefixes():
    a = prefix_hashes(CONV, 16)
    b = prefix_hashes(CONV + "<assistant>It is long.\n<user>And the bridges?\n", 16)
    assert len(a) == len(CONV) // 16 and b[: len(a)] == a
    assert prefix_hashes("x" + CONV, 16)[0] != a[0]


def test_cache_aware_follows_the_prefix_then_balances():
    cfg = RoutingConfig("cache_aware", chunk_chars=16, balance_abs=2, balance_rel=1.5)
    rs = _replicas()
    rs[1].remember(prefix_hashes(CONV, 16), 1000)
    rs[0].outstanding_tokens = 0
    rs[1].outstanding_tokens = 500  # busier by tokens, yet it holds the prefix
    turn2 = prefix_hashes(CONV + "<assistant>It is long.\n<user>And the bridges?\n", 16)
    assert choose(rs, cfg, turn2) == (rs[1], "prefix")
    assert choose(rs, cfg, prefix_hashes("<user>Something else entirely, nothing shared here.\n", 16)) == (rs[0], "miss")
    rs[1].outstanding = 5  # uneven load: more than 2 above the idlest and 1.5x as many
    assert choose(rs, cfg, turn2) == (rs[0], "balance")
    rs[1].up = False
    assert choose(rs, cfg, turn2)[0] is rs[0]
    rs[0].draining = True  # the only live replica is draining: it still takes requests rather than fail them
    assert choose(rs, cfg, turn2)[0] is rs[0]
    rs[0].up = False
    assert choose(rs, cfg, turn2) == (None, "none")


def test_round_robin_and_least_tokens():
    rs = _replicas(3)
    picks = [choose(rs, RoutingConfig("round_robin"), [])[0] for _ in range(6)]
    assert set(picks) == set(rs) and all(picks[i] is not picks[i + 1] for i in range(5))
    rs[0].outstanding_tokens, rs[1].outstanding_tokens, rs[2].outstanding_tokens = 30, 10, 20
    assert choose(rs, RoutingConfig("least_tokens"), [])[0] is rs[1]
    assert choose(rs, RoutingConfig("least_tokens"), [], exclude={rs[1]})[0] is rs[2]


def test_a_rollout_prefers_replicas_on_the_new_weights_until_they_are_overloaded():
    cfg = RoutingConfig("cache_aware", chunk_chars=16, balance_abs=2, balance_rel=1.5)
    rs = _replicas(3)
    rs[1].remember(prefix_hashes(CONV, 16), 1000)  # affinity points at an old replica
    rs[2].weights_version = "step-2"
    hashes = prefix_hashes(CONV, 16)
    assert choose(rs, cfg, hashes) == (rs[1], "prefix")  # no rollout: the policy alone
    assert choose(rs, cfg, hashes, prefer="step-2")[0] is rs[2]
    rs[0].weights_version = "step-2"
    rs[2].outstanding = 1
    assert choose(rs, cfg, hashes, prefer="step-2")[0] is rs[0]  # the policy picks among the new ones
    rs[0].outstanding = rs[2].outstanding = 4  # both new ones loaded past the thresholds: everyone again
    assert choose(rs, cfg, hashes, prefer="step-2") == (rs[1], "balance")
    rs[0].outstanding = rs[2].outstanding = 2  # within them: still the new ones
    assert choose(rs, cfg, hashes, prefer="step-2")[0] in (rs[0], rs[2])
    rs[0].draining = rs[2].draining = True  # not available: the old one takes it
    assert choose(rs, cfg, hashes, prefer="step-2")[0] is rs[1]


def test_routing_text_and_config_validation():
    assert routing_text({"messages": [{"role": "user", "content": "hi"}]}) == "<user>hi\n"
    assert routing_text({"prompt": [1, 2, 3]}) == "1,2,3" and routing_text({"prompt": ["ab"]}) == "ab"
    with pytest.raises(ValueError, match="policy"):
        RoutingConfig("random")
    with pytest.raises(ValueError, match="cache_threshold"):
        RoutingConfig(cache_threshold=2.0)

"""Routing policies of ``outlast route``: which replica gets a request (pure: no I/O, no clocks).

Each :class:`Replica` carries the router's view of one backend: up or not, draining or not, the
requests and estimated tokens it has outstanding, and an approximate prefix tree of the prompts
sent to it. The tree is SGLang's cache-aware idea at a coarser grain: a prompt's text is cut into
fixed-size character chunks whose hashes chain (``H(parent, chunk)``), so "the longest cached
prefix" is a walk down a dict, and each replica keeps an LRU of the chunk hashes it has seen.
:func:`choose` applies a policy: ``round_robin``; ``least_tokens`` (least outstanding tokens);
``cache_aware`` (the replica matching the longest prefix when at least ``cache_threshold`` of the
prompt matches, else the least loaded; and the least loaded whenever load is uneven, i.e. the
busiest replica has more than ``balance_abs`` requests above the idlest and more than
``balance_rel`` times as many).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import xxhash

__all__ = ["Replica", "RoutingConfig", "choose", "prefix_hashes", "POLICIES"]

POLICIES = ("round_robin", "least_tokens", "cache_aware")


@dataclass(frozen=True)
class RoutingConfig:
    """How the router picks replicas."""

    policy: str = "cache_aware"
    """One of ``round_robin``, ``least_tokens``, ``cache_aware``."""
    chunk_chars: int = 32
    """Characters per prefix-tree chunk (about 8 tokens)."""
    cache_threshold: float = 0.3
    """Smallest matched fraction of a prompt that routes by affinity."""
    balance_abs: int = 16
    """Uneven load: the busiest has more than this many requests above the idlest ... (4, then 8 before:
    with 32 conversations pausing at random between turns, cache-aware routing then balanced in
    27-42% of its decisions, moving conversations away from their caches; at 8, in 2-4%, and its
    hit-rate ratio over round-robin went from 1.64-2.13x to 2.31-2.35x in ``bench/fleet.py``'s
    conversation phase. At 8 on a later host, a 2-core EPYC with AVX-512, the ratio was 1.63-2.31x
    over 12 runs (4 below 1.8x; 8-28 balance decisions of 192); at 16, 2.64/2.11/2.36x in three runs,
    cache-aware at the workload's ceiling (0.770) in each, TTFT p50 1.0-1.3 s as at 8. On a CPU
    engine a moved conversation recomputes its whole history, which costs more than waiting in a
    continuous batch a few requests longer. SGLang's router uses 32, for GPU engines that batch
    far more. ``outlast route --balance-abs N`` sets it.)"""
    balance_rel: float = 1.5
    """... and more than this many times as many."""
    tree_chunks: int = 200_000
    """Most chunk hashes remembered per replica (LRU)."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"RoutingConfig.policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for f in ("chunk_chars", "tree_chunks"):
            if getattr(self, f) < 1:
                raise ValueError(f"RoutingConfig.{f} must be >= 1, got {getattr(self, f)!r}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"RoutingConfig.cache_threshold must be in [0, 1], got {self.cache_threshold!r}")
        if self.balance_abs < 0 or self.balance_rel < 1.0:
            raise ValueError("RoutingConfig.balance_abs must be >= 0 and balance_rel >= 1")


@dataclass(eq=False)
class Replica:
    """The router's view of one backend."""

    url: str
    up: bool = False
    draining: bool = False
    """Taken out of rotation on purpose (a rolling reload); requests in flight finish."""
    outstanding: int = 0
    outstanding_tokens: int = 0
    weights_version: str = ""
    answered: int = 0
    """Requests it answered with a success status (a rolling reload's canary waits for one)."""
    slow_checks: int = 0
    catching_up: bool = False
    """A reload to the fleet's step is under way for this replica (it came back on other weights)."""
    """Health checks in a row that timed out (several take a replica out; one refused connection does)."""
    tree: OrderedDict = field(default_factory=OrderedDict)

    @property
    def available(self) -> bool:
        return self.up and not self.draining

    def matched(self, hashes: list[bytes]) -> int:
        """How many leading chunks of a prompt this replica has seen."""
        n = 0
        for h in hashes:
            if h not in self.tree:
                break
            n += 1
        return n

    def remember(self, hashes: list[bytes], limit: int) -> None:
        for h in hashes:
            self.tree[h] = None
            self.tree.move_to_end(h)
        while len(self.tree) > limit:
            self.tree.popitem(last=False)

    def forget(self) -> None:
        """A restarted replica (or new weights) has an empty cache."""
        self.tree.clear()


def prefix_hashes(text: str, chunk_chars: int) -> list[bytes]:
    """Chained hashes of ``text``'s full chunks (a partial last chunk is not cached by anyone yet).

    Example:
        >>> len(prefix_hashes("a" * 70, 32))
        2
    """
    out, parent = [], b""
    for i in range(0, len(text) - chunk_chars + 1, chunk_chars):
        parent = xxhash.xxh3_64_digest(parent + text[i : i + chunk_chars].encode("utf-8", "surrogatepass"))
        out.append(parent)
    return out


_rr = itertools.count()


def _least_loaded(cands: list[Replica]) -> Replica:
    return min(cands, key=lambda r: (r.outstanding_tokens, r.outstanding, len(r.tree)))


def choose(replicas: list[Replica], cfg: RoutingConfig, hashes: list[bytes], exclude: set | None = None,
           prefer: str | None = None) -> tuple[Replica | None, str]:
    """Pick a replica for a prompt with chunk ``hashes``; returns ``(replica or None, why)``.

    ``why`` is ``round_robin``, ``least_tokens``, ``prefix`` (affinity), ``balance`` (load was
    uneven) or ``miss`` (too little matched anywhere: least loaded).

    ``prefer``: a weights version being rolled out. Replicas already serving it take the request
    (the policy then picks among them) unless they are loaded past the balance thresholds against
    the least loaded replica: the new weights answer as soon as one replica has them, and the
    replicas still on the old ones empty before their turn to reload.

    Example:
        >>> r, why = choose(replicas, RoutingConfig(), prefix_hashes(prompt, 32))
    """
    cands = [r for r in replicas if r.available and (exclude is None or r not in exclude)]
    if not cands:  # every live replica is draining: queueing on one beats failing the request
        cands = [r for r in replicas if r.up and (exclude is None or r not in exclude)]
    if not cands:
        return None, "none"
    if prefer is not None:
        newer = [r for r in cands if r.weights_version == prefer]
        if newer and len(newer) < len(cands):
            lo = min(r.outstanding for r in cands)
            least_new = min(r.outstanding for r in newer)
            if not (least_new - lo > cfg.balance_abs and least_new > cfg.balance_rel * lo):
                cands = newer
    if cfg.policy == "round_robin":
        return cands[next(_rr) % len(cands)], "round_robin"
    if cfg.policy == "least_tokens":
        return _least_loaded(cands), "least_tokens"
    lo = min(r.outstanding for r in cands)
    hi = max(r.outstanding for r in cands)
    if hi - lo > cfg.balance_abs and hi > cfg.balance_rel * lo:
        return _least_loaded(cands), "balance"
    best = max(cands, key=lambda r: (r.matched(hashes), -r.outstanding_tokens))
    if hashes and best.matched(hashes) >= cfg.cache_threshold * len(hashes) and best.matched(hashes) > 0:
        return best, "prefix"
    return _least_loaded(cands), "miss"

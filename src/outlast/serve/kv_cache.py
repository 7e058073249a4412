"""Paged KV cache: one preallocated K and V tensor, plus plain-Python block bookkeeping.

The storage is two tensors ``[num_layers, kv_heads, num_blocks, block_size, head_dim]`` (heads
before blocks, so a gather of a sequence's blocks gives each head's context contiguously: see
``LlamaRuntime.forward``).
The bookkeeping follows vLLM v1's block pool: each block has a reference count and, once
full, a chained hash ``H(parent, tokens)`` rooted in a salt that names the weights, so a
prefix hit is a dictionary walk. Unreferenced blocks wait in a free list that is also the
LRU: allocation takes the oldest and, if it still held a cached prefix, forgets it (and
spills it to the disk tier when there is one). A prefix that is no longer in memory but
is on disk is loaded back into fresh blocks instead of being recomputed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch
import xxhash

from .kv_disk import DiskKVTier

if TYPE_CHECKING:
    from .scheduler import Request

__all__ = ["Block", "BlockPool", "KVCacheManager", "chain_hash"]


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Hash of a full block given its parent's hash (or the salt for the first block).

    Example:
        >>> h1 = chain_hash(salt, ids[:16]); h2 = chain_hash(h1, ids[16:32])
    """
    return xxhash.xxh3_128_digest(parent + np.asarray(tokens, dtype=np.int64).tobytes())


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None


class BlockPool:
    """Blocks, their reference counts, the hash -> block map and the LRU free list.

    Args:
        num_blocks: blocks in the pool.
        on_evict: called as ``on_evict(hash, block_id)`` just before a cached block is reused.
    """

    def __init__(self, num_blocks: int, on_evict=None):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, Block] = {}
        self.on_evict = on_evict

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> Block:
        """Take the least recently freed block (the caller checked ``num_free``)."""
        _, b = self.free.popitem(last=False)
        if b.block_hash is not None:
            if self.cached.get(b.block_hash) is b:
                del self.cached[b.block_hash]
                if self.on_evict is not None:
                    self.on_evict(b.block_hash, b.block_id)
            b.block_hash = None
        b.ref_cnt = 1
        return b

    def touch(self, b: Block) -> None:
        """Take one more reference (a prefix hit); a free block leaves the free list."""
        if b.ref_cnt == 0:
            del self.free[b.block_id]
        b.ref_cnt += 1

    def release(self, blocks: list[Block]) -> None:
        """Drop one reference of each; tail blocks first so they are evicted before their parents."""
        for b in reversed(blocks):
            b.ref_cnt -= 1
            if b.ref_cnt < 0:
                raise RuntimeError(f"block {b.block_id} released more often than taken")
            if b.ref_cnt == 0:
                self.free[b.block_id] = b

    def cache(self, b: Block, h: bytes) -> None:
        """Publish a full block under hash ``h`` (the first block with a hash keeps it)."""
        if b.block_hash is None and h not in self.cached:
            b.block_hash = h
            self.cached[h] = b


class KVCacheManager:
    """The KV storage tensors, the block pool and each request's block table.

    Args:
        num_layers, num_kv_heads, head_dim: the model's KV shape.
        num_blocks, block_size: pool geometry.
        salt: identity of the weights; roots every block hash so two models never share KV.
        enable_prefix_caching: look up and publish full blocks by hash.
        disk: optional :class:`DiskKVTier` for evicted prefix blocks.

    Example:
        >>> kv = KVCacheManager(30, 3, 64, num_blocks=512, block_size=16, salt=b"weights")
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, num_blocks: int, block_size: int,
                 salt: bytes, enable_prefix_caching: bool = True, disk: DiskKVTier | None = None):
        shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=torch.float32)
        self.v = torch.zeros(shape, dtype=torch.float32)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.salt = salt
        self.enable_prefix_caching = enable_prefix_caching
        self.disk = disk
        self.pool = BlockPool(num_blocks, on_evict=self._spill if disk is not None else None)
        self.req_blocks: dict[str, list[Block]] = {}
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found (memory or disk)
        self.disk_hits = 0  # blocks loaded from disk

    # -- hashing -------------------------------------------------------------------------
    def update_hashes(self, req: "Request") -> None:
        """Extend ``req.block_hashes`` to cover every full block of its tokens."""
        bs = self.block_size
        toks = req.all_token_ids
        while (len(req.block_hashes) + 1) * bs <= len(toks):
            i = len(req.block_hashes)
            parent = req.block_hashes[-1] if i else self.salt
            req.block_hashes.append(chain_hash(parent, toks[i * bs : (i + 1) * bs]))

    # -- prefix lookup -------------------------------------------------------------------
    def lookup_prefix(self, req: "Request") -> tuple[list[Block], int]:
        """Blocks already holding a prefix of ``req`` (referenced for it) and the tokens they cover.

        At least one token is always left to compute, so the last position yields logits.
        Memory hits come first; past them, blocks on the disk tier are loaded into fresh blocks.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self.update_hashes(req)
        usable = (len(req.all_token_ids) - 1) // self.block_size
        self.prefix_queries += len(req.all_token_ids)
        hits: list[Block] = []
        for h in req.block_hashes[:usable]:
            b = self.pool.cached.get(h)
            if b is None:
                break
            self.pool.touch(b)
            hits.append(b)
        if self.disk is not None:
            for h in req.block_hashes[len(hits) : usable]:
                # Keep one free block per remaining token block so the request can still run.
                if h not in self.disk or self.pool.num_free <= 1:
                    break
                got = self.disk.get(h)
                if got is None:
                    break
                b = self.pool.allocate()
                # The disk tier keeps the token-major block layout [layers, block_size, kv_heads, head_dim].
                self.k[:, :, b.block_id] = got[0].transpose(1, 2)
                self.v[:, :, b.block_id] = got[1].transpose(1, 2)
                self.pool.cache(b, h)
                hits.append(b)
                self.disk_hits += 1
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def _spill(self, h: bytes, block_id: int) -> None:
        self.disk.put(h, self.k[:, :, block_id].transpose(1, 2), self.v[:, :, block_id].transpose(1, 2))

    # -- allocation ----------------------------------------------------------------------
    def allocate_slots(self, req: "Request", num_new_tokens: int, prefix: list[Block] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req`` after its computed ones.

        ``prefix`` (from :meth:`lookup_prefix`) becomes the start of a new request's table.
        Returns False, changing nothing, when the pool has too few free blocks.
        """
        blocks = self.req_blocks.get(req.request_id)
        if blocks is None:
            blocks = list(prefix or [])
        total = req.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size) - len(blocks)
        if need > self.pool.num_free:
            return False
        for _ in range(max(need, 0)):
            blocks.append(self.pool.allocate())
        self.req_blocks[req.request_id] = blocks
        return True

    def block_table(self, req: "Request") -> list[int]:
        return [b.block_id for b in self.req_blocks[req.request_id]]

    def cache_full_blocks(self, req: "Request") -> None:
        """Publish every block of ``req`` whose tokens are all computed."""
        if not self.enable_prefix_caching:
            return
        self.update_hashes(req)
        blocks = self.req_blocks.get(req.request_id, [])
        full = min(req.num_computed_tokens // self.block_size, len(req.block_hashes), len(blocks))
        for i in range(req.num_cached_blocks, full):
            self.pool.cache(blocks[i], req.block_hashes[i])
        req.num_cached_blocks = max(req.num_cached_blocks, full)

    def free(self, req: "Request") -> None:
        """Release every block of ``req`` at once (finished, cancelled or preempted)."""
        blocks = self.req_blocks.pop(req.request_id, None)
        if blocks:
            self.pool.release(blocks)
        req.num_cached_blocks = 0

    def release(self, blocks: list[Block]) -> None:
        self.pool.release(blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - self.pool.num_free / self.num_blocks

"""A bounded disk tier for KV blocks evicted from the in-memory pool.

A block is stored under its chained prefix hash (the same key the pool uses) as one file:
a 32-byte header (magic, format version, payload length, xxh3-64 of the payload) and the
raw fp32 K and V of every layer. A file that is short, has another length or whose
checksum disagrees is deleted and reported as a miss, so the caller recomputes the block;
it is never used. Files are written to a temporary name and renamed into place, and the
oldest files go first once ``max_bytes`` is reached.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict

import numpy as np
import torch
import xxhash

__all__ = ["DiskKVTier"]

MAGIC = b"OLKV"
VERSION = 1
HEADER = struct.Struct("<4sIQQ8x")  # magic, version, payload bytes, xxh3-64 of payload, pad to 32


class DiskKVTier:
    """KV blocks on disk, keyed by block hash, bounded in bytes, checksummed.

    Args:
        directory: where the block files live (created if missing; existing valid names are indexed).
        max_bytes: most payload bytes kept; the least recently used files are removed beyond it.
        block_shape: shape of one block's K (and of its V): ``[num_layers, block_size, kv_heads, head_dim]``.

    Example:
        >>> tier = DiskKVTier("/tmp/kv", 4 << 30, (30, 16, 3, 64))
        >>> tier.put(h, k_block, v_block); tier.get(h)  # -> (k, v) or None
    """

    def __init__(self, directory: str, max_bytes: int, block_shape: tuple[int, ...]):
        self.directory = directory
        self.max_bytes = int(max_bytes)
        self.block_shape = tuple(block_shape)
        self.payload_bytes = 2 * int(np.prod(self.block_shape)) * 4
        os.makedirs(directory, exist_ok=True)
        self._index: OrderedDict[bytes, int] = OrderedDict()
        self.bytes = 0
        self.stores = self.loads = self.misses = self.corrupt = 0
        for name in sorted(os.listdir(directory), key=lambda n: os.stat(os.path.join(directory, n)).st_mtime):
            if name.endswith(".kv"):
                try:
                    key = bytes.fromhex(name[:-3])
                except ValueError:
                    continue
                self._index[key] = self.payload_bytes
                self.bytes += self.payload_bytes
        self._trim()

    def _path(self, key: bytes) -> str:
        return os.path.join(self.directory, key.hex() + ".kv")

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def put(self, key: bytes, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one block's K and V (each ``block_shape``) under ``key``; replaces nothing already there."""
        if key in self._index:
            self._index.move_to_end(key)
            return
        payload = torch.stack([k, v]).contiguous().numpy().tobytes()
        header = HEADER.pack(MAGIC, VERSION, len(payload), xxhash.xxh3_64_intdigest(payload))
        path = self._path(key)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
        os.replace(tmp, path)
        self._index[key] = len(payload)
        self.bytes += len(payload)
        self.stores += 1
        self._trim()

    def get(self, key: bytes) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The block stored under ``key`` as ``(k, v)``, or None if absent or damaged (then it is deleted)."""
        if key not in self._index:
            self.misses += 1
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            self._drop(key)
            self.misses += 1
            return None
        ok = len(raw) == HEADER.size + self.payload_bytes
        if ok:
            magic, version, n, digest = HEADER.unpack_from(raw)
            payload = memoryview(raw)[HEADER.size :]
            ok = (magic == MAGIC and version == VERSION and n == self.payload_bytes
                  and xxhash.xxh3_64_intdigest(payload) == digest)
        if not ok:
            self.corrupt += 1
            self._drop(key)
            return None
        self._index.move_to_end(key)
        kv = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(2, *self.block_shape)
        self.loads += 1
        return kv[0], kv[1]

    def _drop(self, key: bytes) -> None:
        n = self._index.pop(key, 0)
        self.bytes -= n
        try:
            os.remove(self._path(key))
        except FileNotFoundError:
            pass

    def _trim(self) -> None:
        while self.bytes > self.max_bytes and self._index:
            self._drop(next(iter(self._index)))

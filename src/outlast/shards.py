"""Shard file byte layout: which items go in which file, where each lands, their checksums.

Pure layout (:func:`layout_files`) plus the two ways to write it: :func:`write_items`
streams tensors into files, :func:`write_images` writes prebuilt page-aligned file images
(the Checkpointer's staging buffers). Both produce the same bytes and the same chunk
records (with per-row-block checksums for large chunks), so a checkpoint does not depend
on how it was written.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch

from . import dtypes
from .format import DATA_DIR, Chunk, grid_key
from .layouts import staged
from .regions import Box
from .storage.local import ShardWriter, hash_stream, shard_layout, write_file_image


# Chunks at least this large also get per-block checksums of about _BLOCK_BYTES, so a
# rank that needs a few rows of a big chunk can read and verify just those rows.
_BLOCKS_FROM = 8 << 20
_BLOCK_BYTES = 4 << 20


@dataclass
class SaveItem:
    """One region to persist: ``data`` (CPU, contiguous) is ``box`` of tensor ``fqn``."""

    fqn: str
    dtype: str
    box: Box
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.box.numel * dtypes.itemsize(self.dtype)

    whole: bool = True  # the region is the entire logical tensor

    @property
    def key(self) -> str:
        # Whole tensors keep their plain name so any safetensors reader sees familiar keys.
        if self.whole:
            return self.fqn
        return grid_key(self.fqn, self.box.offsets)


def block_rows_for(box: Box, nbytes: int) -> int:
    """Rows per checksummed block of a chunk (0: the chunk gets no block checksums)."""
    if nbytes < _BLOCKS_FROM or box.ndim == 0 or box.sizes[0] < 2:
        return 0
    row_bytes = nbytes // box.sizes[0]
    br = max(1, _BLOCK_BYTES // max(1, row_bytes))
    return 0 if br >= box.sizes[0] else br


@dataclass(frozen=True)
class FileLayout:
    """Where the items of one shard file go: ``order`` lists item indices in file order,
    ``offsets`` their absolute byte offsets; ``head`` is everything before the first."""

    rel: str
    order: tuple[int, ...]
    head: bytes
    offsets: tuple[int, ...]
    size: int


def layout_files(items: Sequence[SaveItem], writer_of: Sequence[int], *, file_prefix: str = "w") -> list[FileLayout]:
    """The shard files that ``items`` go to, one per writer id, and where each item lies.

    Widest dtypes first: with the 8-byte-aligned header every tensor then starts at a
    multiple of its item size (what safetensors' own writer guarantees), so readers can
    mmap it without a copy. Then by key, so a file's bytes do not depend on the order the
    planner listed items.
    """
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(writer_of):
        groups.setdefault(w, []).append(i)
    out = []
    for w in sorted(groups):
        order = sorted(groups[w], key=lambda i: (-dtypes.itemsize(items[i].dtype), items[i].key))
        head, offsets, size = shard_layout([_entry(items[i]) for i in order])
        out.append(FileLayout(f"{DATA_DIR}/{file_prefix}{w:05d}.safetensors", tuple(order), head, tuple(offsets), size))
    return out


def _entry(item: SaveItem) -> tuple[str, str, tuple, int]:
    return (item.key, item.dtype, item.box.sizes, item.nbytes)


def _block_bytes(item: SaveItem) -> tuple[int, int]:
    br = block_rows_for(item.box, item.nbytes)
    return br, (br * (item.nbytes // item.box.sizes[0]) if br else 0)


def _in_parallel(fn, files: list) -> list:
    """``fn`` of every file, one thread per file (writes and hashing release the GIL)."""
    if len(files) <= 1:
        return [fn(f) for f in files]
    with ThreadPoolExecutor(len(files), thread_name_prefix="outlast-write") as pool:
        return list(pool.map(fn, files))


def _collect(items: Sequence[SaveItem], layouts: list[FileLayout], results: list) -> tuple[dict[str, list[Chunk]], dict[str, int]]:
    chunks: dict[str, list[Chunk]] = {}
    files: dict[str, int] = {}
    for lay, recs in zip(layouts, results):
        files[lay.rel] = lay.size
        for i, off, (digest, br, blocks) in zip(lay.order, lay.offsets, recs):
            it = items[i]
            chunks.setdefault(it.fqn, []).append(Chunk(it.box, lay.rel, it.key, off, it.nbytes, digest, br, blocks))
    return chunks, files


def write_items(tmp: str, items: Sequence[SaveItem], writer_of: Sequence[int], *, file_prefix: str = "w") -> tuple[dict[str, list[Chunk]], dict[str, int]]:
    """Write ``items`` into one shard file per writer id under ``tmp/data``.

    Writer ids are global (unique across ranks), so ranks sharing ``tmp`` never write
    the same file. Returns the chunks per fqn and the size of each file written. Files
    are written in parallel threads (os.write and xxhash release the GIL).
    """
    layouts = layout_files(items, writer_of, file_prefix=file_prefix)

    def write_one(lay: FileLayout) -> list[tuple]:
        writer = ShardWriter(os.path.join(tmp, lay.rel), [_entry(items[i]) for i in lay.order])
        try:
            recs = []
            for i in lay.order:
                br, bb = _block_bytes(items[i])
                rec = writer.write(items[i].key, staged(items[i].data), block_bytes=bb)
                recs.append((rec.checksum, br, rec.block_checksums))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return recs

    return _collect(items, layouts, _in_parallel(write_one, layouts))


def write_images(tmp: str, items: Sequence[SaveItem], images: Sequence[tuple[FileLayout, torch.Tensor]]) -> tuple[dict[str, list[Chunk]], dict[str, int]]:
    """Write shard files whose bytes are already laid out in memory (the Checkpointer's
    staging buffers, see :func:`layout_files`): checksum every item in place, then write
    each image with O_DIRECT (:func:`~outlast.storage.local.write_file_image`). Same
    result as :func:`write_items` for the same items, without the page-cache copy."""
    def write_one(image: tuple[FileLayout, torch.Tensor]) -> list[tuple]:
        lay, img = image
        data = memoryview(img.numpy())
        recs = []
        for i, off in zip(lay.order, lay.offsets):
            br, bb = _block_bytes(items[i])
            digest, blocks = hash_stream(data[off : off + items[i].nbytes], bb)
            recs.append((digest, br, blocks))
        write_file_image(os.path.join(tmp, lay.rel), img, lay.size)
        return recs

    return _collect(items, [lay for lay, _ in images], _in_parallel(write_one, list(images)))

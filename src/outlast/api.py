"""The functional core: ``save``, ``load`` and ``read``.

``save`` flattens nested state, plans which process writes which region, writes every
region into safetensors shard files under a hidden temporary directory, writes the
manifest last and commits the directory with one atomic rename. ``load`` restores in
place into live state (tensors copied into existing tensors, plain values replaced,
Stateful objects handed their filled state dicts). ``read`` returns a fresh nested dict
of CPU tensors and values.

When ``torch.distributed`` is initialised, ``save`` and ``load`` are collective: every
rank of the process group calls them with its own part of the state (plain tensors,
DTensors, :class:`~outlast.FlatShard`). The checkpoint directory must be on a
filesystem every rank sees (NFS, Lustre, a local disk for one node). See
``docs/distributed.md``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import xxhash

from . import __version__, dtypes
from .collective import Group, group_of, raise_gathered
from .errors import CheckpointExistsError, DistributedError, IncompatibleStateError
from .format import DATA_DIR, MANIFEST_NAME, Chunk, Manifest, PlainEntry, TensorEntry, fqn_of
from .layouts import LocalTensor, local_tensor, staged
from .plan import (
    DEFAULT_MIN_SPLIT_BYTES,
    RankMeta,
    RegionMeta,
    SavePlan,
    StoredChunk,
    TensorMeta,
    Want,
    plan_load_reads,
    plan_save,
)
from .reader import CheckpointReader, ReadRequest, open_manifest
from .regions import Box
from .storage.local import (
    ShardWriter,
    commit_dir,
    hash_stream,
    remove_tree,
    shard_layout,
    temp_dir_for,
    write_file_image,
    write_manifest,
)
from .tree import FlatState, flatten, insert

__all__ = ["save", "load", "read", "LoadReport", "SaveReport", "SaveItem", "prepare_save", "persist"]

# More than one writer file lets the kernel keep several writes in flight; measured on a
# virtio disk (bench/save_load.py) 2-4 writers beat one, more gives nothing.
DEFAULT_WRITERS = 4
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
        return f"{self.fqn}#{'_'.join(map(str, self.box.offsets))}"


@dataclass
class LoadReport:
    """What :func:`load` did. ``missing``: live keys the checkpoint lacks; ``unexpected``:
    checkpoint keys under the state's top-level names that the live state lacks.

    Counters are this rank's: ``bytes_read`` from storage, ``bytes_received`` from other
    ranks (pieces another rank read once for several), ``bytes_sent`` to other ranks.
    """

    path: str
    step: int | None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    bytes_read: int = 0
    tensors_loaded: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    preads: int = 0
    rank: int = 0
    world_size: int = 1


@dataclass
class SaveReport:
    """What :func:`persist` did. ``bytes_written`` is this rank's tensor bytes;
    ``bytes_per_rank`` every rank's (so ``balance`` = max/mean is known everywhere)."""

    path: str = ""
    rank: int = 0
    world_size: int = 1
    bytes_written: int = 0
    files_written: int = 0
    bytes_per_rank: list[int] = field(default_factory=list)
    plan_cached: bool = False
    seconds: float = 0.0

    @property
    def balance(self) -> float:
        b = self.bytes_per_rank
        mean = sum(b) / len(b) if b else 0
        return max(b) / mean if mean else 1.0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def describe_state(flat: FlatState) -> tuple[dict[str, LocalTensor], dict[str, PlainEntry], dict[str, list]]:
    """Local regions of every tensor leaf and the plain entries (validated, nothing written)."""
    tensors = {fqn: local_tensor(fqn, leaf.value) for fqn, leaf in flat.tensors.items()}
    plain = {fqn: PlainEntry(leaf.path, leaf.value) for fqn, leaf in flat.plain.items()}
    paths = {fqn: leaf.path for fqn, leaf in flat.tensors.items()}
    return tensors, plain, paths


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


def _write_data(tmp: str, prepared: "PreparedSave") -> tuple[dict[str, list[Chunk]], dict[str, int]]:
    if prepared.images is not None:
        return write_images(tmp, prepared.items, prepared.images)
    return write_items(tmp, prepared.items, prepared.writer_of)


def build_manifest(
    tensors: dict[str, TensorMeta],
    plain: dict[str, PlainEntry],
    chunks: dict[str, list[Chunk]],
    files: dict[str, int],
    *,
    step: int | None,
    world_size: int = 1,
    extra: dict | None = None,
) -> Manifest:
    entries = {}
    for fqn, tm in tensors.items():
        cs = sorted(chunks.get(fqn, []), key=lambda c: c.box.offsets)
        entries[fqn] = TensorEntry(_thaw(tm.path), tm.dtype, tm.shape, cs)
    return Manifest(
        tensors=entries,
        plain=plain,
        files=files,
        step=step,
        created=_now(),
        library=f"outlast {__version__}",
        world_size=world_size,
        extra=extra or {},
    )


def check_destination(path: str, overwrite: bool) -> None:
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise CheckpointExistsError(f"{path} exists and is not a checkpoint directory; choose another path")
    if overwrite:
        if os.listdir(path) and not os.path.exists(os.path.join(path, MANIFEST_NAME)) and not os.path.isdir(os.path.join(path, DATA_DIR)):
            raise CheckpointExistsError(
                f"{path} is a non-empty directory that is not a checkpoint; outlast will not replace it"
            )
        return
    if os.path.exists(os.path.join(path, MANIFEST_NAME)):
        raise CheckpointExistsError(
            f"{path} already holds a committed checkpoint; pass overwrite=True to replace it "
            "(the old one stays valid until the new one is committed)"
        )
    if os.listdir(path):
        raise CheckpointExistsError(f"{path} is a non-empty directory; choose another path or pass overwrite=True")


@dataclass
class PreparedSave:
    """Everything a save needs, decided before any byte is written.

    ``items`` are the regions this process writes and ``writer_of[i]`` the shard file
    (global writer id) of ``items[i]``. The data of an item may be the live tensor (a
    synchronous save) or a staged copy (the Checkpointer's asynchronous save):
    :func:`persist` only reads ``item.data``. ``plan`` is the global save plan (every
    rank's items); ``group`` the process group it was made for (None: one process).
    """

    tensors: dict[str, LocalTensor]
    paths: dict[str, list]
    plain: dict[str, PlainEntry]
    items: list[SaveItem]
    writer_of: list[int]
    world_size: int = 1
    rank: int = 0
    plan: SavePlan | None = None
    group: Any = None
    plan_cached: bool = False
    report: SaveReport | None = None
    # Staged shard files, each already laid out in one buffer (see ``with_images``).
    images: list[tuple[FileLayout, torch.Tensor]] | None = None

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    def with_data(self, data: Sequence[torch.Tensor]) -> "PreparedSave":
        """The same plan with ``items[i].data`` replaced by ``data[i]`` (staged copies)."""
        items = [SaveItem(i.fqn, i.dtype, i.box, d, i.whole) for i, d in zip(self.items, data, strict=True)]
        return dataclasses.replace(self, items=items, report=None, images=None)

    def with_images(self, images: Sequence[tuple[FileLayout, torch.Tensor]], data: Sequence[torch.Tensor]) -> "PreparedSave":
        """The same plan, persisted from ``images``: for each :class:`FileLayout` of
        ``layout_files(items, writer_of)``, a buffer holding that file's bytes.
        ``data[i]`` (the bytes of item i inside its image) replaces the live tensors."""
        out = self.with_data(data)
        out.images = list(images)
        return out


class _PlanCache:
    """Recent save plans by (group, local layout signature); small, thread-safe.

    A hit is only used when every rank hits the plan made from the same exchange (see
    :func:`prepare_save`), so a stale entry can cost a re-plan but never a wrong plan.
    """

    def __init__(self, size: int = 8):
        self._size = size
        self._plans: OrderedDict[tuple, tuple[str, SavePlan]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[str, SavePlan] | None:
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
            return hit

    def put(self, key: tuple, plan_id: str, plan: SavePlan) -> None:
        with self._lock:
            self._plans[key] = (plan_id, plan)
            self._plans.move_to_end(key)
            while len(self._plans) > self._size:
                self._plans.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


_plan_cache = _PlanCache()


def _rank_meta(tensors: dict[str, LocalTensor], paths: dict[str, list]) -> RankMeta:
    metas = {}
    regions = []
    for fqn, lt in tensors.items():
        st = dtypes.to_safetensors(lt.dtype)
        metas[fqn] = TensorMeta(_freeze(paths[fqn]), st, tuple(lt.global_shape), dtypes.itemsize(st))
        regions += [RegionMeta(fqn, r.box) for r in lt.regions]
    return RankMeta(metas, regions)


def _freeze(path: list) -> tuple:
    return tuple(tuple(p) if isinstance(p, list) else p for p in path)


def _thaw(path: tuple) -> list:
    return [list(p) if isinstance(p, tuple) else p for p in path]


def _signature(meta: RankMeta, num_writers: int | None, min_split: int) -> str:
    h = xxhash.xxh3_64()
    h.update(repr((num_writers, min_split)).encode())
    for fqn, m in meta.tensors.items():
        h.update(repr((fqn, m.path, m.dtype, m.shape)).encode())
    for r in meta.regions:
        h.update(repr((r.fqn, r.box.offsets, r.box.sizes)).encode())
    return h.hexdigest()


def _local_regions(tensors: dict[str, LocalTensor]) -> list:
    return [r for lt in tensors.values() for r in lt.regions]


def prepare_save(
    state: dict,
    *,
    num_writers: int | None = None,
    process_group: Any = None,
    min_split_bytes: int = DEFAULT_MIN_SPLIT_BYTES,
) -> PreparedSave:
    """Flatten and validate ``state`` and plan which rank and file writes which region.

    Collective when ``torch.distributed`` is initialised: every rank of
    ``process_group`` (default: the world) must call it. The ranks exchange their
    regions' metadata once and compute the same global plan: replicas written once,
    bytes balanced across ranks. The plan is cached while every rank's layout is
    unchanged (then the exchange is one tiny all-gather of cache ids).

    Args:
        state: this rank's nested state (see :func:`save`).
        num_writers: shard files per rank (default: about 4 per node in total).
        process_group: the group to save with (default: the world group).
        min_split_bytes: replicated regions at least twice this size may be cut into
            row-blocks written by different ranks, to balance bytes per rank.

    Returns:
        A :class:`PreparedSave` whose ``items`` are this rank's writes.

    Raises:
        SerializationError: a leaf cannot be saved (raised on every rank).
        DistributedError: ranks disagree (tensor shapes/dtypes, overlapping regions).

    Example:
        >>> prepared = outlast.prepare_save({"model": model})   # collective
        >>> outlast.persist(prepared, "ckpt/step-10")           # collective
    """
    return prepare_flat(state, num_writers=num_writers, process_group=process_group, min_split_bytes=min_split_bytes)


def prepare_flat(
    state: "dict | FlatState",
    *,
    num_writers: int | None = None,
    process_group: Any = None,
    min_split_bytes: int = DEFAULT_MIN_SPLIT_BYTES,
) -> PreparedSave:
    """:func:`prepare_save` for state that may already be flattened.

    The Checkpointer flattens on the training thread (that is where ``state_dict()``
    must be called and plain values captured) and plans on its staging thread.
    """
    group = group_of(process_group)
    err: BaseException | None = None
    tensors: dict = {}
    plain: dict = {}
    paths: dict = {}
    meta = None
    try:
        flat = state if isinstance(state, FlatState) else flatten(state)
        tensors, plain, paths = describe_state(flat)
        meta = _rank_meta(tensors, paths)
    except Exception as e:  # noqa: BLE001 - sent to every rank, then re-raised
        if group is None:
            raise
        err = e
    cached = False
    if group is None:
        # Cached too: a Checkpointer saving the same model every N steps should not pay
        # for planning on the training thread each time.
        writers = num_writers or _single_writers(meta)
        key = ("single", _signature(meta, writers, min_split_bytes))
        hit = _plan_cache.get(key)
        if hit is not None:
            plan, cached = hit[1], True
        else:
            plan = plan_save([meta], writers_per_rank=writers, min_split_bytes=min_split_bytes)
            _plan_cache.put(key, key[1], plan)
        rank, size = 0, 1
    else:
        rank, size = group.rank, group.size
        sig = _signature(meta, num_writers, min_split_bytes) if meta is not None else ""
        key = (id(group.pg), rank, size, sig)
        hit = _plan_cache.get(key) if meta is not None else None
        outcome = None if err is None else (type(err).__name__, str(err))
        got = group.all_gather((outcome, hit[0] if hit else None), "outlast.prepare_save")
        if any(o is not None for o, _ in got):
            raise_gathered(err, [o for o, _ in got], "outlast.prepare_save (flattening the state)")
        ids = {pid for _, pid in got}
        if len(ids) == 1 and None not in ids:
            plan = hit[1]
            cached = True
        else:
            metas = group.all_gather(meta, "outlast.prepare_save (exchanging layouts)")
            plan = plan_save(metas, writers_per_rank=num_writers, min_split_bytes=min_split_bytes)
            sigs = group.all_gather(sig, "outlast.prepare_save (exchanging layouts)")
            plan_id = xxhash.xxh3_64_hexdigest("|".join(sigs).encode())
            _plan_cache.put(key, plan_id, plan)
    regions = _local_regions(tensors)
    items: list[SaveItem] = []
    writer_of: list[int] = []
    for w in plan.for_rank(rank):
        reg = regions[w.region]
        tm = plan.tensors[w.fqn]
        data = reg.data[w.box.relative_to(reg.box)] if w.box != reg.box else reg.data
        whole = w.box.sizes == tuple(tm.shape) and not any(w.box.offsets)
        items.append(SaveItem(w.fqn, tm.dtype, w.box, data, whole))
        writer_of.append(w.writer)
    pg = None if group is None else group.pg
    return PreparedSave(tensors, paths, plain, items, writer_of, size, rank, plan, pg, cached)


def _single_writers(meta: RankMeta) -> int:
    total = sum(r.box.numel * meta.tensors[r.fqn].itemsize for r in meta.regions)
    return max(1, min(DEFAULT_WRITERS, total // (16 << 20) or 1, len(meta.regions) or 1))


def _same_plain(gathered: list[dict], path: str) -> dict[str, PlainEntry]:
    merged: dict[str, tuple[int, Any, str]] = {}
    for r, entries in enumerate(gathered):
        for fqn, (p, value) in entries.items():
            text = _json_text(value)
            if fqn in merged and merged[fqn][2] != text:
                r0, _, t0 = merged[fqn]
                raise DistributedError(
                    f"saving {path}: ranks disagree about plain value {fqn!r}: rank {r0} has "
                    f"{_short(t0)}, rank {r} has {_short(text)}. A name must mean the same value on "
                    "every rank; put per-rank values under per-rank keys (e.g. state['rng'][f'rank{rank}'])."
                )
            merged.setdefault(fqn, (r, (p, value), text))
    return {fqn: PlainEntry(pv[0], pv[1]) for fqn, (_, pv, _) in merged.items()}


def _json_text(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, allow_nan=True)


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def persist(
    prepared: PreparedSave,
    path: str | os.PathLike,
    *,
    step: int | None = None,
    overwrite: bool = False,
    extra: dict | None = None,
    process_group: Any = None,
) -> Manifest:
    """Write a prepared save under a temporary directory and commit it atomically at ``path``.

    Collective when the save was prepared on a process group: rank 0 creates the hidden
    temporary directory, every rank writes its own shard files into it, rank 0 writes
    the manifest last and commits by rename; every rank returns after the commit. A
    failure on any rank (disk full, a bad value) fails the save on every rank with that
    cause, and nothing is committed. ``path`` must be on a filesystem all ranks share.

    Args:
        prepared: from :func:`prepare_save` (or its :meth:`~PreparedSave.with_data`).
        path: the checkpoint directory to create.
        step: training step recorded in the manifest.
        overwrite: replace a committed checkpoint at ``path``.
        extra: JSON object stored in the manifest's ``extra``.
        process_group: defaults to the group the save was prepared with.

    Returns:
        The committed :class:`~outlast.format.Manifest` (on every rank). ``prepared.report``
        is filled with a :class:`SaveReport`.

    Example:
        >>> outlast.persist(outlast.prepare_save(state), "ckpt/step-10", step=10)
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    if process_group is not None:
        group = group_of(process_group)
    elif prepared.group is not None:
        group = group_of(prepared.group)
    else:
        group = None
    report = SaveReport(path=path, rank=prepared.rank, world_size=prepared.world_size, plan_cached=prepared.plan_cached)
    prepared.report = report
    if group is None:
        check_destination(path, overwrite)
        tmp = temp_dir_for(path)
        try:
            chunks, files = _write_data(tmp, prepared)
            manifest = build_manifest(
                _tensor_metas(prepared), prepared.plain, chunks, files,
                step=step, world_size=prepared.world_size, extra=extra,
            )
            write_manifest(tmp, manifest.dumps())
            commit_dir(tmp, path, overwrite=overwrite)
        except BaseException:
            remove_tree(tmp)
            raise
        report.bytes_written = prepared.nbytes
        report.files_written = len(files)
        report.bytes_per_rank = [prepared.nbytes]
        report.seconds = time.perf_counter() - t0
        return manifest
    what = f"saving checkpoint {path}"
    if group.size != prepared.world_size or group.rank != prepared.rank:
        raise DistributedError(
            f"{what}: the save was prepared on a group of {prepared.world_size} ranks (this was rank "
            f"{prepared.rank}) but persist runs on a group of {group.size} (rank {group.rank}); "
            "pass the same process_group to prepare_save and persist"
        )
    # 1. Rank 0 checks the destination and creates the staging directory.
    tmp = err = None
    if group.rank == 0:
        try:
            check_destination(path, overwrite)
            tmp = temp_dir_for(path)
        except Exception as e:  # noqa: BLE001
            err = e
    tmp = group.broadcast((tmp, None if err is None else (type(err).__name__, str(err))), what)
    tmp, failure = tmp
    if failure is not None:
        raise_gathered(err, [failure] + [None] * (group.size - 1), what)
    # 2. Every rank writes its files; 3. outcomes, chunk records and plain values meet.
    err = None
    chunks: dict = {}
    files: dict = {}
    try:
        chunks, files = _write_data(tmp, prepared)
    except Exception as e:  # noqa: BLE001
        err = e
    payload = (
        None if err is None else (type(err).__name__, str(err)),
        {k: [c.to_json() for c in v] for k, v in chunks.items()},
        files,
        {fqn: (p.path, p.value) for fqn, p in prepared.plain.items()},
        prepared.nbytes,
    )
    gathered = group.all_gather(payload, what)
    try:
        raise_gathered(err, [g[0] for g in gathered], what)
        plain = _same_plain([g[3] for g in gathered], path)
    except BaseException:
        if group.rank == 0:
            remove_tree(tmp)
        raise
    # 4. Rank 0 writes the manifest last and commits; everyone learns the outcome.
    manifest = None
    err = None
    if group.rank == 0:
        try:
            all_chunks: dict[str, list[Chunk]] = {}
            all_files: dict[str, int] = {}
            for _, cj, fs, _, _ in gathered:
                for fqn, cs in cj.items():
                    all_chunks.setdefault(fqn, []).extend(_chunk_from_json(c) for c in cs)
                all_files.update(fs)
            manifest = build_manifest(
                prepared.plan.tensors, plain, all_chunks, all_files,
                step=step, world_size=group.size, extra=extra,
            )
            write_manifest(tmp, manifest.dumps())
            commit_dir(tmp, path, overwrite=overwrite)
        except Exception as e:  # noqa: BLE001
            remove_tree(tmp)
            err = e
    result = group.broadcast(
        (None if err is None else (type(err).__name__, str(err)), None if manifest is None else manifest.dumps()),
        what,
    )
    if result[0] is not None:
        raise_gathered(err, [result[0]] + [None] * (group.size - 1), what)
    if manifest is None:
        manifest = Manifest.loads(result[1], os.path.join(path, MANIFEST_NAME))
    report.bytes_written = prepared.nbytes
    report.files_written = len(files)
    report.bytes_per_rank = [g[4] for g in gathered]
    report.seconds = time.perf_counter() - t0
    return manifest


def _chunk_from_json(c: dict) -> Chunk:
    return Chunk(
        Box(tuple(c["offsets"]), tuple(c["sizes"])), c["file"], c["key"], c["offset"], c["nbytes"],
        c["checksum"], c.get("block_rows", 0), tuple(c.get("block_checksums", ())),
    )


def _tensor_metas(prepared: PreparedSave) -> dict[str, TensorMeta]:
    if prepared.plan is not None:
        return prepared.plan.tensors
    out = {}
    for fqn, lt in prepared.tensors.items():
        st = dtypes.to_safetensors(lt.dtype)
        out[fqn] = TensorMeta(_freeze(prepared.paths[fqn]), st, tuple(lt.global_shape), dtypes.itemsize(st))
    return out


def save(
    state: dict,
    path: str | os.PathLike,
    *,
    step: int | None = None,
    overwrite: bool = False,
    num_writers: int | None = None,
    extra: dict | None = None,
    process_group: Any = None,
) -> Manifest:
    """Save nested ``state`` as a checkpoint directory at ``path``, atomically.

    Collective when ``torch.distributed`` is initialised: every rank of
    ``process_group`` calls it with its own part of the state, and one checkpoint is
    written (each unique region once, bytes balanced across ranks). ``path`` must be on
    a filesystem every rank sees.

    Args:
        state: nested dict; leaves are tensors (plain, DTensor, :class:`~outlast.FlatShard`),
            JSON values (None, bool, int, float, str, lists, dicts with str keys) or
            objects with ``state_dict()`` / ``load_state_dict()`` (modules, optimizers,
            schedulers, :class:`~outlast.ModelOptimizerState`, your own classes).
        path: the checkpoint directory to create.
        step: training step recorded in the manifest (shown by ``outlast ls``).
        overwrite: replace a committed checkpoint at ``path``; the old one stays valid
            until the new one is complete.
        num_writers: shard files per rank (default 4 in one process, fewer for tiny
            states or many ranks).
        extra: JSON object stored in the manifest.
        process_group: the group to save with (default: the world group).

    Returns:
        The committed :class:`~outlast.format.Manifest`.

    Raises:
        SerializationError: a leaf cannot be saved (nothing is written).
        CheckpointExistsError: ``path`` holds a checkpoint and ``overwrite`` is False.
        StorageError: the disk failed or is full (nothing is committed).
        DistributedError: ranks disagree about the state, or a rank failed.

    Example:
        >>> outlast.save({"model": model, "optim": opt, "step": 10}, "ckpt/step-10", step=10)
    """
    path = os.fspath(path)
    prepared = prepare_save(state, num_writers=num_writers, process_group=process_group)
    if prepared.group is None:
        check_destination(path, overwrite)
    return persist(prepared, path, step=step, overwrite=overwrite, extra=extra)


def _top(fqn_path: list) -> Any:
    p = fqn_path[0]
    return p[0] if isinstance(p, list) else p


def _stateful_owner(path: list, flat: FlatState) -> tuple[Any, list] | None:
    for k in range(len(path), 0, -1):
        node = flat.statefuls.get(fqn_of(path[:k]))
        if node is not None:
            return node, path[k:]
    return None


def _match_types(template: Any, value: Any) -> Any:
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(_match_types(t, v) for t, v in zip(template, value)) if len(template) == len(value) else tuple(value)
    if isinstance(template, dict) and isinstance(value, dict):
        return {k: _match_types(template.get(k), v) for k, v in value.items()}
    if isinstance(template, list) and isinstance(value, list) and len(template) == len(value):
        return [_match_types(t, v) for t, v in zip(template, value)]
    return value


def plan_load(flat: FlatState, manifest: Manifest, ckpt: str, strict: bool) -> tuple[list[ReadRequest], LoadReport, list]:
    """Match live leaves with checkpoint entries; return read requests and a report.

    Raises IncompatibleStateError for shape/dtype conflicts, and in strict mode for
    missing or unexpected keys.
    """
    report = LoadReport(ckpt, manifest.step)
    requests: list[ReadRequest] = []
    for fqn, leaf in flat.tensors.items():
        e = manifest.tensors.get(fqn)
        if e is None:
            if fqn in manifest.plain:
                raise IncompatibleStateError(f"{fqn!r} is a tensor in the live state but a plain value in checkpoint {ckpt}")
            report.missing.append(fqn)
            continue
        lt = local_tensor(fqn, leaf.value)
        want = dtypes.from_safetensors(e.dtype)
        if tuple(lt.global_shape) != tuple(e.shape):
            raise IncompatibleStateError(
                f"tensor {fqn!r}: checkpoint {ckpt} has shape {list(e.shape)}, the live tensor has "
                f"{list(lt.global_shape)}. Build the model with the checkpoint's configuration."
            )
        if lt.dtype != want:
            raise IncompatibleStateError(
                f"tensor {fqn!r}: checkpoint {ckpt} has dtype {want}, the live tensor has {lt.dtype}. "
                "Cast the model (e.g. model.to(dtype)) before loading, or convert the checkpoint."
            )
        requests += [ReadRequest(fqn, r.box, r.data) for r in lt.regions]
    for fqn in flat.plain:
        if fqn not in manifest.plain:
            if fqn in manifest.tensors:
                raise IncompatibleStateError(f"{fqn!r} is a plain value in the live state but a tensor in checkpoint {ckpt}")
            prefix = fqn + "."
            fills_container = any(k.startswith(prefix) for k in manifest.tensors) or any(k.startswith(prefix) for k in manifest.plain)
            if not fills_container:
                report.missing.append(fqn)
    tops = {_top(leaf.path) for leaf in list(flat.tensors.values()) + list(flat.plain.values())}
    tops |= {_top(n.path) for n in flat.statefuls.values() if n.path}
    extras = []
    for fqn, entry in list(manifest.tensors.items()) + list(manifest.plain.items()):
        if fqn in flat.tensors or fqn in flat.plain or _top(entry.path) not in tops:
            continue
        owner = _stateful_owner(entry.path, flat)
        if owner is not None:
            extras.append((fqn, entry, owner))
        else:
            report.unexpected.append(fqn)
    if strict and (report.missing or report.unexpected):
        def show(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = []
        if report.missing:
            parts.append(f"missing from the checkpoint: {show(report.missing)}")
        if report.unexpected:
            parts.append(f"in the checkpoint but not in the live state: {show(report.unexpected)}")
        raise IncompatibleStateError(
            f"state does not match checkpoint {ckpt}: " + "; ".join(parts)
            + ". Pass strict=False to load what matches and get a report."
        )
    return requests, report, extras


def load(
    state: dict,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    verify: bool = True,
    process_group: Any = None,
) -> LoadReport:
    """Load a checkpoint in place into live ``state``.

    Tensors are copied into the existing tensors (shape and dtype checked; any device),
    plain values are replaced, Stateful objects get ``load_state_dict`` with their filled
    state dict. Top-level names absent from ``state`` are ignored, so loading only
    ``{"model": model}`` from a model+optimizer checkpoint works.

    Collective when ``torch.distributed`` is initialised: every rank passes its own
    layout (any mix of plain tensors, DTensors and FlatShards, at any world size — not
    necessarily the one that saved). Each rank reads from storage only the rows its
    regions need; data several ranks need (DDP replicas) is read once, by one of them,
    and sent to the others over the process group.

    Args:
        state: the live nested state, as given to :func:`save`.
        path: a committed checkpoint directory (on a filesystem every rank sees).
        strict: raise if a live key is missing from the checkpoint, or the checkpoint has
            keys under a top-level name of ``state`` that the live state lacks.
        verify: check the checksum of every byte read (whole chunks, or the checksum
            blocks of a partly read chunk; costs a little CPU).
        process_group: the group to load with (default: the world group).

    Returns:
        A :class:`LoadReport` with missing and unexpected keys and this rank's counters
        (``bytes_read`` from storage, ``bytes_received`` / ``bytes_sent`` between ranks).

    Raises:
        IncompatibleStateError: shapes, dtypes or keys do not match (on every rank).
        CorruptCheckpointError: a file is missing or damaged (on every rank).
        DistributedError: ranks disagree (e.g. see different files at ``path``).

    Example:
        >>> report = outlast.load({"model": model, "optim": opt}, "ckpt/step-10")
    """
    path = os.fspath(path)
    group = group_of(process_group)
    if group is not None:
        return _load_distributed(state, path, strict, verify, group)
    flat = flatten(state)
    with CheckpointReader(path) as reader:
        manifest = reader.manifest
        requests, report, extras = plan_load(flat, manifest, path, strict)
        stats = reader.read_regions(requests, verify=verify)
        report.bytes_read = stats.bytes_read
        report.preads = stats.chunks_read
        report.tensors_loaded = len({r.fqn for r in requests})
        _finish_load(flat, manifest, reader, extras, report, verify)
    return report


def _load_distributed(state: dict, path: str, strict: bool, verify: bool, group: Group) -> LoadReport:
    from .transfer import TransferStats, check_coverage, exchange, read_mine

    what = f"loading checkpoint {path}"
    err: BaseException | None = None
    reader = None
    requests: list[ReadRequest] = []
    wants = None
    digest = None
    try:
        reader = CheckpointReader(path)
        flat = flatten(state)
        requests, report, extras = plan_load(flat, reader.manifest, path, strict)
        wants = [(q.fqn, q.box) for q in requests]
        digest = xxhash.xxh3_64_hexdigest(reader.manifest.dumps())
    except Exception as e:  # noqa: BLE001 - sent to every rank, then re-raised
        err = e
    try:
        gathered = group.all_gather((None if err is None else (type(err).__name__, str(err)), digest, wants), what)
        raise_gathered(err, [g[0] for g in gathered], what)
        if len({g[1] for g in gathered}) != 1:
            raise DistributedError(
                f"{what}: ranks read different manifests at {path}. Every rank must see the same "
                "checkpoint: put it on a filesystem all ranks share (and do not load while saving to it)."
            )
        m = reader.manifest
        all_wants = [Want(fqn, box, r, i) for r, g in enumerate(gathered) for i, (fqn, box) in enumerate(g[2])]
        check_coverage(path, reader, all_wants)  # same data on every rank: same outcome
        fqns = {w.fqn for w in all_wants}
        chunks = [
            StoredChunk(fqn, i, c.box, dtypes.itemsize(m.tensors[fqn].dtype), c.block_rows)
            for fqn in sorted(fqns)
            for i, c in enumerate(m.tensors[fqn].chunks)
        ]
        plan = plan_load_reads(chunks, all_wants, group.size, verify=verify)
        stats = TransferStats()
        err = None
        outgoing: dict = {}
        try:
            outgoing = read_mine(reader, plan, group.rank, requests, stats)
        except Exception as e:  # noqa: BLE001
            err = e
        raise_gathered(err, group.all_gather(None if err is None else (type(err).__name__, str(err)), what), what)
        exchange(group, plan, reader, requests, outgoing, stats)
        report.bytes_read = stats.bytes_read
        report.bytes_received = stats.bytes_received
        report.bytes_sent = stats.bytes_sent
        report.preads = stats.preads
        report.rank, report.world_size = group.rank, group.size
        report.tensors_loaded = len({q.fqn for q in requests})
        err = None
        try:
            _finish_load(flat, m, reader, extras, report, verify)
        except Exception as e:  # noqa: BLE001 - a Stateful's load_state_dict failing on one rank fails all
            err = e
        raise_gathered(err, group.all_gather(None if err is None else (type(err).__name__, str(err)), what), what)
    finally:
        if reader is not None:
            reader.close()
    return report


def _finish_load(flat: FlatState, manifest: Manifest, reader: CheckpointReader, extras: list, report: LoadReport, verify: bool) -> None:
    # Entries only the checkpoint has, under a Stateful object (e.g. optimizer state
    # of an optimizer that has not stepped yet): materialise them for the object.
    for fqn, entry, (node, rel) in extras:
        if isinstance(entry, TensorEntry):
            value = reader.read_tensor(fqn, verify=verify)
            report.bytes_read += entry.nbytes
        else:
            value = entry.value
        if not isinstance(node.state, dict):
            raise IncompatibleStateError(f"cannot restore {fqn!r}: state_dict() of {type(node.obj).__name__} is not a dict")
        insert(node.state, rel, value)
    for fqn, leaf in flat.plain.items():
        pe = manifest.plain.get(fqn)
        if pe is None:
            continue
        if leaf.parent is None and fqn in flat.statefuls:
            # The object's whole state_dict is one plain value (e.g. an empty dict).
            flat.statefuls[fqn].state = _match_types(leaf.original, pe.value)
            continue
        if isinstance(leaf.parent, tuple):
            raise IncompatibleStateError(f"cannot restore plain value {fqn!r} inside a tuple; use a list in the state")
        leaf.parent[leaf.key] = _match_types(leaf.original, pe.value)
    # Innermost objects first, so an outer object receives already-restored children.
    for fqn in sorted(flat.statefuls, key=lambda k: -len(flat.statefuls[k].path)):
        node = flat.statefuls[fqn]
        node.obj.load_state_dict(node.state)


def _selected(fqn: str, keys: Sequence[str] | None) -> bool:
    return keys is None or any(fqn == k or fqn.startswith(k + ".") for k in keys)


def read(path: str | os.PathLike, keys: Iterable[str] | str | None = None, *, verify: bool = True) -> dict:
    """Read a checkpoint into a new nested dict of full CPU tensors and plain values.

    Works for any checkpoint, whatever layout saved it. Nesting is rebuilt exactly
    (lists stay lists, int keys stay ints); Stateful objects come back as their state dicts.

    Args:
        path: a committed checkpoint directory.
        keys: dotted names or prefixes to read (e.g. ``"model"`` or
            ``["model.embed.weight", "step"]``); default everything.
        verify: check chunk checksums.

    Example:
        >>> sd = outlast.read("ckpt/step-10", keys="model")["model"]
    """
    path = os.fspath(path)
    if isinstance(keys, str):
        keys = [keys]
    keys = list(keys) if keys is not None else None
    out: dict = {}
    with CheckpointReader(path) as reader:
        m = reader.manifest
        if keys is not None:
            names = list(m.tensors) + list(m.plain)
            unknown = [k for k in keys if not any(_selected(n, [k]) for n in names)]
            if unknown:
                tops = sorted({n.split(".", 1)[0] for n in names})
                raise IncompatibleStateError(f"checkpoint {path} has no entries named {unknown}; top-level names: {tops}")
        wanted = [(fqn, e) for fqn, e in m.tensors.items() if _selected(fqn, keys)]
        tensors = {fqn: torch.empty(e.shape, dtype=dtypes.from_safetensors(e.dtype)) for fqn, e in wanted}
        reader.read_regions([ReadRequest(fqn, Box.full(e.shape), tensors[fqn]) for fqn, e in wanted], verify=verify)
        for fqn, e in wanted:
            insert(out, e.path, tensors[fqn])
        for fqn, p in m.plain.items():
            if _selected(fqn, keys):
                insert(out, p.path, p.value)
    return out


def manifest_of(path: str | os.PathLike) -> Manifest:
    """The validated manifest of a committed checkpoint."""
    return open_manifest(os.fspath(path))

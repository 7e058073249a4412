"""Saving: flatten and plan (:func:`prepare_save`), write and commit (:func:`persist`), both (:func:`save`).

``save`` flattens nested state, plans which process writes which region (the plan is
cached while the layout is unchanged), writes every region into safetensors shard files
inside one commit transaction (``storage.commit``), writes the manifest last and
publishes the directory atomically. Collective when ``torch.distributed`` is
initialised: every rank writes its own regions, rank 0 writes the manifest and commits,
a failure on any rank fails the save on every rank and nothing is committed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import xxhash

from . import __version__, dtypes, grid
from .collective import group_of, raise_gathered
from .errors import CheckpointExistsError, DistributedError
from .format import DATA_DIR, MANIFEST_NAME, Chunk, Manifest, PlainEntry, TensorEntry
from .layouts import LocalTensor, local_tensor
from .plan import DEFAULT_MIN_SPLIT_BYTES, RankMeta, RegionMeta, SavePlan, TensorMeta, plan_save
from .regions import Box
from .shards import FileLayout, SaveItem, write_images, write_items
from .storage.commit import Transaction
from .tree import FlatState, flatten


# More than one writer file lets the kernel keep several writes in flight; measured on a
# virtio disk (bench/save_load.py) 2-4 writers beat one, more gives nothing.
DEFAULT_WRITERS = 4


# Manifest attributes a SaveReport forwards (with a DeprecationWarning): before 0.2
# ``save`` and ``persist`` returned the Manifest itself.
_MANIFEST_ATTRS = frozenset(f.name for f in dataclasses.fields(Manifest)) | {"nbytes", "to_json", "dumps"}


@dataclass
class SaveReport:
    """What :func:`save` / :func:`persist` did, and the committed :class:`~outlast.Manifest`.

    ``bytes_written`` is this rank's tensor bytes; ``bytes_per_rank`` every rank's (so
    ``balance`` = max/mean is known everywhere). ``manifest`` is the same on every rank.

    Example:
        >>> report = outlast.save({"w": torch.ones(2)}, "ckpt/report-demo", step=3)
        >>> report.manifest.step, sorted(report.manifest.tensors)
        (3, ['w'])
    """

    path: str = ""
    rank: int = 0
    world_size: int = 1
    bytes_written: int = 0
    files_written: int = 0
    bytes_per_rank: list[int] = field(default_factory=list)
    plan_cached: bool = False
    seconds: float = 0.0
    manifest: Manifest | None = None

    @property
    def balance(self) -> float:
        b = self.bytes_per_rank
        mean = sum(b) / len(b) if b else 0
        return max(b) / mean if mean else 1.0

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: ``report.tensors`` and friends from code
        # written when save returned the Manifest.
        if name in _MANIFEST_ATTRS:
            manifest = self.__dict__.get("manifest")
            if manifest is not None:
                from ._deprecated import warn

                warn(f"SaveReport.{name} (save used to return the Manifest)", f"report.manifest.{name}")
                return getattr(manifest, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def describe_state(flat: FlatState) -> tuple[dict[str, LocalTensor], dict[str, PlainEntry], dict[str, list]]:
    """Local regions of every tensor leaf and the plain entries (validated, nothing written)."""
    tensors = {fqn: local_tensor(fqn, leaf.value) for fqn, leaf in flat.tensors.items()}
    plain = {fqn: PlainEntry(leaf.path, leaf.value) for fqn, leaf in flat.plain.items()}
    paths = {fqn: leaf.path for fqn, leaf in flat.tensors.items()}
    return tensors, plain, paths


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
    plan: "SavePlan | grid.GridSavePlan | None" = None
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
    grids: dict | None = {}
    for fqn, lt in tensors.items():
        st = dtypes.to_safetensors(lt.dtype)
        metas[fqn] = TensorMeta(_freeze(paths[fqn]), st, tuple(lt.global_shape), dtypes.itemsize(st))
        regions += [RegionMeta(fqn, r.box) for r in lt.regions]
        if grids is not None and lt.grid is not None:
            grids[fqn] = lt.grid
        else:
            grids = None
    return RankMeta(metas, regions, grids)


_GROUP_MAPS: dict = {}


def group_rank_map(group) -> dict[int, int] | None:
    """Global rank -> rank in ``group`` (None for the world group: the same numbers)."""
    import torch.distributed as dist

    if group.pg is None or group.pg is dist.group.WORLD:
        return None
    key = id(group.pg)
    hit = _GROUP_MAPS.get(key)
    if hit is None or hit[0] is not group.pg:
        ranks = dist.get_process_group_ranks(group.pg)
        hit = _GROUP_MAPS[key] = (group.pg, {int(g): i for i, g in enumerate(ranks)})
    return hit[1]


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
            # Ranks whose layout is all grids (DTensor Shard/Replicate, plain tensors) send
            # a digest; one rank per class of equal digests sends the descriptor, ranks
            # without grids send their boxes (outlast.grid).
            try:
                meta = grid.checked(meta, rank, group_rank_map(group))
            except Exception:  # noqa: BLE001 - never fail one rank here: describe it by boxes
                meta = RankMeta(meta.tensors, meta.regions)
            what = "outlast.prepare_save (exchanging layouts)"
            info = group.all_gather((sig, grid.layout_digest(meta)), what)
            classes, rep = grid.exchange_classes([d for _, d in info])
            sent = group.all_gather(grid.payload(meta, rank, rep), what)
            plan = grid.plan_save_layouts(
                [(ranks, sent[ranks[0]]) for ranks in classes], size,
                writers_per_rank=num_writers, min_split_bytes=min_split_bytes,
            )
            plan_id = xxhash.xxh3_64_hexdigest("|".join(s for s, _ in info).encode())
            _plan_cache.put(key, plan_id, plan)
    regions = _local_regions(tensors)
    by_fqn = {fqn: lt.regions[0] for fqn, lt in tensors.items() if lt.regions}
    items: list[SaveItem] = []
    writer_of: list[int] = []
    for w in plan.for_rank(rank):
        # A grid plan names the tensor only: a rank holds one region of a grid tensor.
        reg = regions[w.region] if w.region >= 0 else by_fqn[w.fqn]
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
) -> SaveReport:
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
        A :class:`SaveReport` (also left in ``prepared.report``) whose ``manifest`` is the
        committed :class:`~outlast.Manifest`, the same on every rank.

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
        with Transaction(path, overwrite=overwrite) as tx:
            chunks, files = _write_data(tx.tmp, prepared)
            manifest = build_manifest(
                _tensor_metas(prepared), prepared.plain, chunks, files,
                step=step, world_size=prepared.world_size, extra=extra,
            )
            tx.commit(manifest.dumps())
        report.bytes_written = prepared.nbytes
        report.files_written = len(files)
        report.bytes_per_rank = [prepared.nbytes]
        report.seconds = time.perf_counter() - t0
        report.manifest = manifest
        return report
    what = f"saving checkpoint {path}"
    if group.size != prepared.world_size or group.rank != prepared.rank:
        raise DistributedError(
            f"{what}: the save was prepared on a group of {prepared.world_size} ranks (this was rank "
            f"{prepared.rank}) but persist runs on a group of {group.size} (rank {group.rank}); "
            "pass the same process_group to prepare_save and persist"
        )
    # 1. Rank 0 checks the destination and creates the staging directory.
    tmp = err = tx = None
    if group.rank == 0:
        try:
            check_destination(path, overwrite)
            tx = Transaction(path, overwrite=overwrite)
            tmp = tx.tmp
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
        if tx is not None:
            tx.abort()
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
            tx.commit(manifest.dumps())
        except Exception as e:  # noqa: BLE001
            tx.abort()
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
    report.manifest = manifest
    return report


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
) -> SaveReport:
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
        A :class:`SaveReport`: bytes and files written, seconds, and ``manifest``, the
        committed :class:`~outlast.Manifest`.

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

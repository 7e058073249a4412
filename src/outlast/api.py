"""The functional core: ``save``, ``load`` and ``read``.

``save`` flattens nested state, writes every tensor region into safetensors shard
files under a hidden temporary directory, writes the manifest last and commits the
directory with one atomic rename. ``load`` restores in place into live state (tensors
copied into existing tensors, plain values replaced, Stateful objects handed their
filled state dicts). ``read`` returns a fresh nested dict of CPU tensors and values.
"""

from __future__ import annotations

import datetime as _dt
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from . import __version__, dtypes
from .errors import CheckpointExistsError, IncompatibleStateError, SerializationError
from .format import DATA_DIR, MANIFEST_NAME, Chunk, Manifest, PlainEntry, TensorEntry, fqn_of
from .layouts import LocalTensor, local_tensor, staged
from .plan import balance
from .reader import CheckpointReader, ReadRequest, open_manifest
from .regions import Box
from .storage.local import ShardWriter, commit_dir, remove_tree, temp_dir_for, write_manifest
from .tree import FlatState, flatten, insert

__all__ = ["save", "load", "read", "LoadReport", "SaveItem"]

# More than one writer file lets the kernel keep several writes in flight; measured on a
# virtio disk (bench/save_load.py) 2-4 writers beat one, more gives nothing.
DEFAULT_WRITERS = 4


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
    checkpoint keys under the state's top-level names that the live state lacks."""

    path: str
    step: int | None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    bytes_read: int = 0
    tensors_loaded: int = 0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def describe_state(flat: FlatState) -> tuple[dict[str, LocalTensor], dict[str, PlainEntry], dict[str, list]]:
    """Local regions of every tensor leaf and the plain entries (validated, nothing written)."""
    tensors = {fqn: local_tensor(fqn, leaf.value) for fqn, leaf in flat.tensors.items()}
    plain = {fqn: PlainEntry(leaf.path, leaf.value) for fqn, leaf in flat.plain.items()}
    paths = {fqn: leaf.path for fqn, leaf in flat.tensors.items()}
    return tensors, plain, paths


def write_items(tmp: str, items: Sequence[SaveItem], writer_of: Sequence[int], *, file_prefix: str = "w") -> tuple[dict[str, list[Chunk]], dict[str, int]]:
    """Write ``items`` into one shard file per writer id under ``tmp/data``.

    Returns the chunks per fqn and the size of each file written. Files are written
    in parallel threads (os.write and xxhash release the GIL).
    """
    groups: dict[int, list[SaveItem]] = {}
    for item, w in zip(items, writer_of):
        groups.setdefault(w, []).append(item)

    def write_one(w: int) -> tuple[str, int, list[tuple[SaveItem, Any]]]:
        rel = f"{DATA_DIR}/{file_prefix}{w:05d}.safetensors"
        # Widest dtypes first: with the 8-byte-aligned header every tensor then starts at a
        # multiple of its item size (what safetensors' own writer guarantees), so readers
        # can mmap it without a copy.
        its = sorted(groups[w], key=lambda i: -dtypes.itemsize(i.dtype))
        writer = ShardWriter(os.path.join(tmp, rel), [(i.key, i.dtype, i.box.sizes, i.nbytes) for i in its])
        try:
            recs = [(i, writer.write(i.key, staged(i.data))) for i in its]
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return rel, writer.size, recs

    chunks: dict[str, list[Chunk]] = {}
    files: dict[str, int] = {}
    ws = sorted(groups)
    if len(ws) <= 1:
        results = [write_one(w) for w in ws]
    else:
        with ThreadPoolExecutor(len(ws), thread_name_prefix="outlast-write") as pool:
            results = list(pool.map(write_one, ws))
    for rel, size, recs in results:
        files[rel] = size
        for item, rec in recs:
            chunks.setdefault(item.fqn, []).append(Chunk(item.box, rel, rec.key, rec.offset, rec.nbytes, rec.checksum))
    return chunks, files


def build_manifest(
    tensors: dict[str, LocalTensor],
    paths: dict[str, list],
    plain: dict[str, PlainEntry],
    chunks: dict[str, list[Chunk]],
    files: dict[str, int],
    *,
    step: int | None,
    world_size: int = 1,
    extra: dict | None = None,
) -> Manifest:
    entries = {}
    for fqn, lt in tensors.items():
        cs = sorted(chunks.get(fqn, []), key=lambda c: c.box.offsets)
        entries[fqn] = TensorEntry(paths[fqn], dtypes.to_safetensors(lt.dtype), lt.global_shape, cs)
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
    (writer id) of ``items[i]``. The data of an item may be the live tensor (a
    synchronous save) or a staged copy (the Checkpointer's asynchronous save):
    :func:`persist` only reads ``item.data``.
    """

    tensors: dict[str, LocalTensor]
    paths: dict[str, list]
    plain: dict[str, PlainEntry]
    items: list[SaveItem]
    writer_of: list[int]
    world_size: int = 1
    rank: int = 0

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    def with_data(self, data: Sequence[torch.Tensor]) -> "PreparedSave":
        """The same plan with ``items[i].data`` replaced by ``data[i]`` (staged copies)."""
        items = [SaveItem(i.fqn, i.dtype, i.box, d, i.whole) for i, d in zip(self.items, data, strict=True)]
        return PreparedSave(self.tensors, self.paths, self.plain, items, self.writer_of, self.world_size, self.rank)


def prepare_save(state: dict, *, num_writers: int | None = None) -> PreparedSave:
    """Flatten and validate ``state`` and plan which writer writes which region.

    Raises SerializationError (naming the key) before anything touches the disk.
    """
    flat = flatten(state)
    tensors, plain, paths = describe_state(flat)
    items = [
        SaveItem(lt.fqn, dtypes.to_safetensors(lt.dtype), r.box, r.data, r.box == Box.full(lt.global_shape))
        for lt in tensors.values()
        for r in lt.regions
    ]
    total = sum(i.nbytes for i in items)
    n = num_writers or max(1, min(DEFAULT_WRITERS, total // (16 << 20) or 1, len(items) or 1))
    return PreparedSave(tensors, paths, plain, items, balance([i.nbytes for i in items], n))


def persist(prepared: PreparedSave, path: str | os.PathLike, *, step: int | None = None, overwrite: bool = False, extra: dict | None = None) -> Manifest:
    """Write a prepared save under a temporary directory and commit it atomically at ``path``."""
    path = os.fspath(path)
    check_destination(path, overwrite)
    tmp = temp_dir_for(path)
    try:
        chunks, files = write_items(tmp, prepared.items, prepared.writer_of)
        manifest = build_manifest(
            prepared.tensors, prepared.paths, prepared.plain, chunks, files,
            step=step, world_size=prepared.world_size, extra=extra,
        )
        write_manifest(tmp, manifest.dumps())
        commit_dir(tmp, path, overwrite=overwrite)
    except BaseException:
        remove_tree(tmp)
        raise
    return manifest


def save(state: dict, path: str | os.PathLike, *, step: int | None = None, overwrite: bool = False, num_writers: int | None = None) -> Manifest:
    """Save nested ``state`` as a checkpoint directory at ``path``, atomically.

    Args:
        state: nested dict; leaves are tensors, JSON values (None, bool, int, float, str,
            lists, dicts with str keys) or objects with ``state_dict()`` /
            ``load_state_dict()`` (modules, optimizers, schedulers, your own classes).
        path: the checkpoint directory to create.
        step: training step recorded in the manifest (shown by ``outlast ls``).
        overwrite: replace a committed checkpoint at ``path``; the old one stays valid
            until the new one is complete.
        num_writers: shard files to write in parallel (default 4, fewer for tiny states).

    Returns:
        The committed :class:`~outlast.format.Manifest`.

    Raises:
        SerializationError: a leaf cannot be saved (nothing is written).
        CheckpointExistsError: ``path`` holds a checkpoint and ``overwrite`` is False.
        StorageError: the disk failed or is full (nothing is committed).

    Example:
        >>> outlast.save({"model": model, "optim": opt, "step": 10}, "ckpt/step-10", step=10)
    """
    path = os.fspath(path)
    prepared = prepare_save(state, num_writers=num_writers)
    check_destination(path, overwrite)
    return persist(prepared, path, step=step, overwrite=overwrite)


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


def load(state: dict, path: str | os.PathLike, *, strict: bool = True, verify: bool = True) -> LoadReport:
    """Load a checkpoint in place into live ``state``.

    Tensors are copied into the existing tensors (shape and dtype checked; any device),
    plain values are replaced, Stateful objects get ``load_state_dict`` with their filled
    state dict. Top-level names absent from ``state`` are ignored, so loading only
    ``{"model": model}`` from a model+optimizer checkpoint works.

    Args:
        state: the live nested state, as given to :func:`save`.
        path: a committed checkpoint directory.
        strict: raise if a live key is missing from the checkpoint, or the checkpoint has
            keys under a top-level name of ``state`` that the live state lacks.
        verify: check the checksum of every chunk read (costs a little CPU).

    Returns:
        A :class:`LoadReport` with missing and unexpected keys and bytes read.

    Example:
        >>> report = outlast.load({"model": model, "optim": opt}, "ckpt/step-10")
    """
    path = os.fspath(path)
    flat = flatten(state)
    with CheckpointReader(path) as reader:
        manifest = reader.manifest
        requests, report, extras = plan_load(flat, manifest, path, strict)
        stats = reader.read_regions(requests, verify=verify)
        report.bytes_read = stats.bytes_read
        report.tensors_loaded = len({r.fqn for r in requests})
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
    return report


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

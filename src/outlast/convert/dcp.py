"""PyTorch Distributed Checkpoint (DCP) directories: read and write in one process.

Reading goes through DCP's own public classes (``FileSystemReader``,
``DefaultLoadPlanner``, ``torch.distributed.checkpoint.load(..., no_dist=True)``), a batch
of tensors at a time, so sharded DCP checkpoints from any number of ranks are assembled
by DCP itself. Two places where stock DCP would unpickle arbitrary objects are closed:

* ``.metadata`` is a pickle. ``FileSystemReader.read_metadata`` calls ``pickle.load``
  on it, which can run any code a crafted file names. outlast instead unpickles it with
  an allow-list of the classes DCP's metadata is made of (DCP's metadata dataclasses,
  ``torch.Size``, dtypes, layouts, ``pathlib`` paths); any other global is refused with
  :class:`~outlast.errors.UnsupportedFormatError`. This shuts the known code-execution
  route, but parsing pickle is still a larger attack surface than JSON: convert DCP
  checkpoints you trust.
* Non-tensor values are ``torch.save``'d blobs that ``DefaultLoadPlanner`` loads with
  ``weights_only=False``; outlast's planner loads them with ``weights_only=True``.

Tensor data itself is read by DCP with ``torch.load(weights_only=True)``.

Writing uses ``torch.distributed.checkpoint.save(..., no_dist=True)`` with a planner
that produces each tensor only when DCP's writer asks for it, so an export holds about
one tensor in memory. The output is staged in a hidden directory and renamed into place.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from typing import Any, Iterator

import torch

from ..errors import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError, UnsupportedFormatError
from ..format import PlainEntry, fqn_of
from ..storage.local import remove_tree
from ..tree import _as_json
from .. import dtypes
from ..writer import TensorSpec
from .core import Source, commit_foreign, foreign_tmp, progress_bar

METADATA_FILE = ".metadata"

# Tensors are read in batches of about this many bytes per dcp.load call: one planning
# round per batch instead of per tensor, and memory stays bounded.
_READ_BATCH_BYTES = 256 << 20

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# The classes DCP's metadata is made of, by name: nothing else in that module (it imports
# other things) and nothing a newer torch adds until it is reviewed and listed here.
_METADATA_CLASSES = frozenset({
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
})
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickle DCP metadata, refusing every global that is not part of it."""

    def __init__(self, f, where: str):
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == _METADATA_MODULE and name in _METADATA_CLASSES:
            import torch.distributed.checkpoint.metadata as md

            obj = getattr(md, name, None)
            if isinstance(obj, type) and obj.__module__ == _METADATA_MODULE:
                return obj
        raise UnsupportedFormatError(
            f"{self.where} refers to {module}.{name}, which is not part of DCP's metadata; outlast "
            "refuses to unpickle it (a crafted .metadata can run code). If you trust this "
            "checkpoint, load it with torch.distributed.checkpoint and save it with outlast.save."
        )


def read_metadata(path: str) -> Any:
    """The DCP ``Metadata`` of directory ``path``, unpickled with the allow-list."""
    mpath = os.path.join(path, METADATA_FILE)
    if not os.path.isdir(path):
        raise UnsupportedFormatError(f"{path} is not a DCP checkpoint directory")
    if not os.path.exists(mpath):
        hint = " (a save that never finished, or not a DCP checkpoint)" if os.listdir(path) else ""
        raise IncompleteCheckpointError(
            f"{path} has no {METADATA_FILE}: it is not a complete DCP checkpoint{hint}. DCP writes "
            f"{METADATA_FILE} last; use an older checkpoint."
        )
    try:
        with open(mpath, "rb") as f:
            meta = _MetadataUnpickler(f, mpath).load()
    except UnsupportedFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CorruptCheckpointError(f"{mpath} is not readable DCP metadata ({type(e).__name__}: {e})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(meta, Metadata):
        raise CorruptCheckpointError(f"{mpath} holds a {type(meta).__name__}, not DCP Metadata")
    _check_storage(meta, path, mpath)
    return meta


def _check_storage(meta: Any, path: str, mpath: str) -> None:
    """Every item's file stays inside ``path``, exists, and holds its byte range."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    root = os.path.realpath(path)
    sizes: dict[str, int] = {}
    storage = getattr(meta, "storage_data", None)
    if not isinstance(storage, dict):
        raise CorruptCheckpointError(f"{mpath} has no storage map (storage_data); it is not usable DCP metadata")
    for index, info in storage.items():
        fqn = getattr(index, "fqn", index)
        if not isinstance(info, _StorageInfo):
            raise CorruptCheckpointError(f"{mpath}: the storage entry of {fqn!r} is a {type(info).__name__}, not _StorageInfo")
        rel, off, length = info.relative_path, info.offset, info.length
        if not (isinstance(rel, str) and rel and not os.path.isabs(rel)):
            raise CorruptCheckpointError(f"{mpath}: {fqn!r} names file {rel!r}, not a relative path inside {path}")
        full = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([root, full]) != root:
            raise CorruptCheckpointError(f"{mpath}: {fqn!r} names file {rel!r}, which lies outside {path}; refused")
        if not (type(off) is int and type(length) is int and off >= 0 and length >= 0):
            raise CorruptCheckpointError(f"{mpath}: {fqn!r} has an invalid byte range offset={off!r} length={length!r}")
        if full not in sizes:
            try:
                sizes[full] = os.path.getsize(full)
            except OSError:
                raise CorruptCheckpointError(f"{mpath}: {fqn!r} is stored in {rel}, which is missing from {path}") from None
        if off + length > sizes[full]:
            raise CorruptCheckpointError(
                f"{mpath}: {fqn!r} needs bytes {off}..{off + length} of {rel}, which has only {sizes[full]} "
                "(truncated or the metadata is wrong)"
            )


def _cause(e: BaseException) -> BaseException:
    """The first underlying exception of DCP's CheckpointException (which wraps each rank's)."""
    for v in (getattr(e, "failures", None) or {}).values():
        inner = v[0] if isinstance(v, tuple) else v
        if isinstance(inner, BaseException):
            return inner
    return e


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class _SafeReader(FileSystemReader):
        """FileSystemReader whose metadata comes from the allow-listed unpickler, once."""

        def __init__(self, path: str, metadata: Any):
            super().__init__(path)
            self._metadata = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            self._metadata.storage_meta = self._metadata.storage_meta or _storage_meta()
            self._metadata.storage_meta.load_id = self.load_id
            return self._metadata

    return _SafeReader


def _storage_meta() -> Any:
    from torch.distributed.checkpoint.metadata import StorageMeta

    return StorageMeta()


def _load_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class _SafeLoadPlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner on a flat dict whose non-tensor values load weights_only."""

        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    return _SafeLoadPlanner()


def _entry_path(fqn: str, obj_path: Any) -> list:
    # DCP records each flattened name's key path; an int there is a list index.
    if isinstance(obj_path, (tuple, list)) and obj_path and all(
        isinstance(p, str) or (isinstance(p, int) and not isinstance(p, bool)) for p in obj_path
    ):
        path = [[p] if isinstance(p, int) else p for p in obj_path]
        if fqn_of(path) == fqn:
            return path
    return [fqn]


class DCPSource(Source):
    """A DCP checkpoint directory. Names are DCP's flattened FQNs; paths its key paths."""

    format = "dcp"

    def __init__(self, path: str):
        super().__init__(path)
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        self.metadata = read_metadata(path)
        self._reader = _reader_class()(path, self.metadata)
        planner_data = self.metadata.planner_data if isinstance(self.metadata.planner_data, dict) else {}
        byte_keys = []
        for fqn, md in self.metadata.state_dict_metadata.items():
            path_ = _entry_path(fqn, planner_data.get(fqn))
            if isinstance(md, TensorStorageMetadata):
                st = dtypes.to_safetensors(md.properties.dtype, name=fqn)
                self.specs.append(TensorSpec(fqn, st, tuple(int(s) for s in md.size), tuple(path_)))
            elif isinstance(md, BytesStorageMetadata):
                byte_keys.append((fqn, path_))
            else:
                raise UnsupportedFormatError(f"{path}: entry {fqn!r} has unknown metadata {type(md).__name__}")
        if byte_keys:
            values = self._load({k: None for k, _ in byte_keys})
            for fqn, path_ in byte_keys:
                try:
                    value = _as_json(values[fqn])
                except TypeError:
                    raise UnsupportedFormatError(
                        f"{path}: value {fqn!r} is a {type(values[fqn]).__name__}, which is not JSON; "
                        "outlast stores plain values as JSON"
                    ) from None
                self.plain[fqn] = PlainEntry(path_, value)
        step = self.plain.get("step")
        if step is not None and isinstance(step.value, int) and not isinstance(step.value, bool):
            self.step = step.value

    def _load(self, state_dict: dict) -> dict:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dcp.load(state_dict, storage_reader=self._reader, planner=_load_planner(), no_dist=True)
            except (dcp.CheckpointException, Exception) as e:  # noqa: BLE001 - DCP wraps failures
                cause = _cause(e)
                if isinstance(cause, CheckpointError):
                    raise cause from None
                if isinstance(cause, FileNotFoundError):
                    raise CorruptCheckpointError(
                        f"{self.path}: data file {cause.filename} named in {METADATA_FILE} is missing"
                    ) from None
                raise CorruptCheckpointError(
                    f"reading DCP checkpoint {self.path} failed: {type(cause).__name__}: {cause}"
                ) from None
        return state_dict

    def _empty(self, spec: TensorSpec) -> torch.Tensor:
        return torch.empty(spec.shape, dtype=spec.torch_dtype)

    def read(self, fqn: str) -> torch.Tensor:
        spec = next(s for s in self.specs if s.fqn == fqn)
        return self._load({fqn: self._empty(spec)})[fqn]

    def iter_tensors(self) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        batch: list[TensorSpec] = []
        size = 0
        for spec in self.specs + [None]:
            if spec is not None and (not batch or size + spec.nbytes <= _READ_BATCH_BYTES):
                batch.append(spec)
                size += spec.nbytes
                continue
            if batch:
                loaded = self._load({s.fqn: self._empty(s) for s in batch})
                for s in batch:
                    yield s, loaded.pop(s.fqn)
                del loaded
            batch, size = ([spec], spec.nbytes) if spec is not None else ([], 0)


# ---------------------------------------------------------------- writing


def _nested_state(specs: list[TensorSpec], plain: dict[str, PlainEntry]) -> dict:
    """The nested dict DCP will flatten: meta tensors at every tensor path, plain values."""
    from ..tree import insert

    root: dict = {}
    for s in specs:
        insert(root, s.entry_path, torch.empty(s.shape, dtype=s.torch_dtype, device="meta"))
    for e in plain.values():
        insert(root, e.path, e.value)
    return root


def write_dcp(src: Source, dst: str, *, overwrite: bool, progress: bool | None) -> list[str]:
    """Write ``src`` as a DCP checkpoint at ``dst``; returns the files written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
    from torch.distributed.checkpoint.metadata import MetadataIndex

    spec_of = {fqn_of(s.entry_path): s for s in src.specs}
    bar = progress_bar(src.nbytes, f"{src.format} -> dcp", progress)

    class _LazyPlanner(DefaultSavePlanner):
        """Plans from meta tensors; reads each tensor from the source when DCP writes it."""

        def resolve_data(self, write_item: Any) -> Any:
            index: MetadataIndex = write_item.index
            spec = spec_of.get(index.fqn)
            if spec is None or write_item.tensor_data is None:
                return super().resolve_data(write_item)
            t = src.read(spec.fqn).detach().contiguous()
            bar.update(spec.nbytes)
            return t

    tmp = foreign_tmp(dst, overwrite, (METADATA_FILE,))
    try:
        state = _nested_state(src.specs, src.plain)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dcp.save(state, storage_writer=FileSystemWriter(tmp, single_file_per_rank=True, thread_count=1),
                         planner=_LazyPlanner(), no_dist=True)
            except dcp.CheckpointException as e:  # a BaseException wrapping each rank's failure
                cause = _cause(e)
                if isinstance(cause, (CheckpointError, OSError)):
                    raise cause from None
                raise
        commit_foreign(tmp, dst, overwrite)
    except BaseException:
        remove_tree(tmp)
        raise
    finally:
        bar.close()
    return sorted(f for f in os.listdir(dst) if os.path.isfile(os.path.join(dst, f)))

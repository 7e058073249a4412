"""Streaming checkpoint writer: tensors declared up front, fed one at a time, committed atomically.

:func:`outlast.save` needs the whole state in memory. Converters and merges produce
tensors one by one (read from another format, or accumulated from N checkpoints) and
must not hold them all. A :class:`CheckpointWriter` takes the list of tensors (name,
path, dtype, shape) before any data, plans the shard files from those sizes, then
accepts each tensor in the declared order and streams it into its file with
:class:`~outlast.storage.local.ShardWriter` (header first, checksum while writing). Its
output is an ordinary outlast checkpoint: one whole-tensor chunk per tensor, the manifest
written last, the directory committed with the same atomic rename as a save.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from . import __version__, dtypes
from .saving import check_destination
from .shards import block_rows_for
from .errors import IncompatibleStateError, SerializationError
from .format import DATA_DIR, Chunk, Manifest, PlainEntry, TensorEntry, fqn_of
from .layouts import staged
from .regions import Box
from .storage.commit import Transaction
from .storage.local import ShardWriter

__all__ = ["CheckpointWriter", "TensorSpec", "DEFAULT_MAX_FILE_BYTES"]

# Big enough that a 7B model in bf16 is a handful of files, small enough that a copy
# to object storage or a partial re-download stays cheap.
DEFAULT_MAX_FILE_BYTES = 2 << 30


@dataclass(frozen=True)
class TensorSpec:
    """A logical tensor the writer will receive: dotted ``fqn``, safetensors ``dtype``
    name (``"F32"``, ``"BF16"``, ...), ``shape``, and ``path`` in the nested state
    (default: ``[fqn]``, a flat key, which is how ``outlast.save`` names the entries of a
    ``state_dict()``)."""

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    path: tuple | None = None

    @classmethod
    def of(cls, fqn: str, t: torch.Tensor, path: Iterable | None = None) -> "TensorSpec":
        """The spec of tensor ``t`` (the tensor itself is not kept)."""
        return cls(fqn, dtypes.to_safetensors(t.dtype, name=fqn), tuple(t.shape), tuple(path) if path is not None else None)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtypes.from_safetensors(self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * dtypes.itemsize(self.dtype)

    @property
    def entry_path(self) -> list:
        return list(self.path) if self.path is not None else [self.fqn]


def plan_files(sizes: list[int], max_file_bytes: int) -> list[int]:
    """File index of each tensor: consecutive tensors fill a file up to ``max_file_bytes``.

    A tensor larger than the limit gets a file of its own. Pure; order is kept so that
    tensors can be streamed in declaration order, one open file at a time.

    Example:
        >>> plan_files([4, 4, 4, 9, 1], 8)
        [0, 0, 1, 2, 3]
    """
    out, f, used = [], 0, 0
    for n in sizes:
        if used and used + n > max_file_bytes:
            f, used = f + 1, 0
        out.append(f)
        used += n
    return out


class CheckpointWriter:
    """Write an outlast checkpoint tensor by tensor; commit atomically.

    Tensors must be written in the order of ``specs`` (that is what lets the writer
    stream them into shard files without holding any). Nothing is visible at ``path``
    until :meth:`commit`; leaving a ``with`` block by an exception, or :meth:`abort`,
    removes the hidden staging directory. Not thread-safe.

    Args:
        path: the checkpoint directory to create.
        specs: every tensor, in the order they will be written.
        step: training step recorded in the manifest.
        overwrite: replace a committed checkpoint at ``path`` (atomically, on commit).
        plain: JSON values to store: ``{fqn: value}`` (path ``[fqn]``) or
            ``{fqn: PlainEntry}``.
        max_file_bytes: shard files hold at most this many tensor bytes (a larger tensor
            gets its own file).
        extra: free-form JSON recorded in the manifest (provenance of a conversion).

    Example:
        >>> specs = [TensorSpec("w", "F32", (2, 3))]
        >>> with CheckpointWriter("out", specs, step=7) as w:
        ...     w.write("w", torch.zeros(2, 3))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Iterable[TensorSpec],
        *,
        step: int | None = None,
        overwrite: bool = False,
        plain: Mapping[str, Any] | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        extra: dict | None = None,
    ):
        self.path = os.fspath(path)
        self.specs = list(specs)
        self.step = step
        self.overwrite = overwrite
        self.extra = dict(extra or {})
        if max_file_bytes <= 0:
            raise ValueError(f"max_file_bytes must be positive, got {max_file_bytes}")
        seen: set[str] = set()
        for s in self.specs:
            if s.fqn in seen:
                raise SerializationError(f"tensor {s.fqn!r} is declared twice for {self.path}")
            if not dtypes.known(s.dtype):
                raise SerializationError(f"tensor {s.fqn!r}: unknown safetensors dtype {s.dtype!r}")
            if fqn_of(s.entry_path) != s.fqn:
                # Readers refuse a manifest whose entry name is not its path's name.
                raise SerializationError(
                    f"tensor {s.fqn!r}: its path {s.entry_path} names {fqn_of(s.entry_path)!r}; "
                    "a TensorSpec's fqn must be its path joined with '.'"
                )
            seen.add(s.fqn)
        self.plain: dict[str, PlainEntry] = {}
        for k, v in (plain or {}).items():
            if k in seen:
                raise SerializationError(f"{k!r} is declared both as a tensor and as a plain value")
            self.plain[k] = v if isinstance(v, PlainEntry) else PlainEntry([k], v)
        self._file_of = plan_files([s.nbytes for s in self.specs], max_file_bytes)
        self._next = 0
        self._chunks: dict[str, Chunk] = {}
        self._files: dict[str, int] = {}
        self._shard: ShardWriter | None = None
        self._shard_index = -1
        self.bytes_written = 0
        self.committed: Manifest | None = None
        check_destination(self.path, overwrite)
        self._tx: Transaction | None = Transaction(self.path, overwrite=overwrite)
        self._tmp: str | None = self._tx.tmp

    # -- lifecycle
    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    @property
    def done(self) -> bool:
        return self._tmp is None

    def _rel(self, index: int) -> str:
        return f"{DATA_DIR}/w{index:05d}.safetensors"

    def _open_shard(self, index: int) -> None:
        self._close_shard()
        members = [s for s, f in zip(self.specs, self._file_of) if f == index]
        rel = self._rel(index)
        self._shard = ShardWriter(
            os.path.join(self._tmp, rel), [(s.fqn, s.dtype, s.shape, s.nbytes) for s in members]
        )
        self._shard_index = index

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._files[self._rel(self._shard_index)] = self._shard.size
            self._shard = None

    @property
    def next_fqn(self) -> str | None:
        """The name the next :meth:`write` must carry (None when all are written)."""
        return self.specs[self._next].fqn if self._next < len(self.specs) else None

    def write(self, fqn: str, tensor: torch.Tensor) -> None:
        """Write the next tensor. Its name, dtype and shape must match the declared spec.

        Raises IncompatibleStateError naming the tensor on any mismatch (nothing of it
        is written).
        """
        if self._tmp is None:
            raise SerializationError(f"writer for {self.path} is already committed or aborted")
        if self._next >= len(self.specs):
            raise IncompatibleStateError(f"{fqn!r} was not declared: all {len(self.specs)} tensors of {self.path} are written")
        spec = self.specs[self._next]
        if fqn != spec.fqn:
            declared = "declared" if any(s.fqn == fqn for s in self.specs) else "not declared"
            raise IncompatibleStateError(
                f"tensor {fqn!r} ({declared}) written out of order: {spec.fqn!r} is next for {self.path}"
            )
        if tensor.dtype != spec.torch_dtype or tuple(tensor.shape) != tuple(spec.shape):
            raise IncompatibleStateError(
                f"tensor {fqn!r}: declared {spec.dtype} {list(spec.shape)}, got "
                f"{dtypes.to_safetensors(tensor.dtype, name=fqn)} {list(tensor.shape)}"
            )
        index = self._file_of[self._next]
        if index != self._shard_index:
            self._open_shard(index)
        box = Box.full(spec.shape)
        # The same row-block checksums a save writes, so resharded loads of converted or
        # merged checkpoints can verify partial reads too.
        br = block_rows_for(box, spec.nbytes)
        rec = self._shard.write(fqn, staged(tensor.detach()), block_bytes=br * (spec.nbytes // box.sizes[0]) if br else 0)
        self._chunks[fqn] = Chunk(box, self._rel(index), rec.key, rec.offset, rec.nbytes, rec.checksum,
                                  br, rec.block_checksums)
        self._next += 1
        self.bytes_written += rec.nbytes

    def _check_complete(self) -> None:
        missing = [s.fqn for s in self.specs[self._next:]]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise IncompatibleStateError(f"cannot commit {self.path}: {len(missing)} declared tensor(s) never written: {shown}")

    def manifest(self) -> Manifest:
        """The manifest the commit writes (all tensors must have been written)."""
        self._check_complete()
        tensors = {
            s.fqn: TensorEntry(s.entry_path, s.dtype, tuple(s.shape), [self._chunks[s.fqn]]) for s in self.specs
        }
        return Manifest(
            tensors=tensors,
            plain=dict(self.plain),
            files=dict(self._files),
            step=self.step,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            library=f"outlast {__version__}",
            world_size=1,
            extra=self.extra,
        )

    def commit(self) -> Manifest:
        """Finish the last file, write the manifest and make the checkpoint visible."""
        if self._tmp is None:
            raise SerializationError(f"writer for {self.path} is already committed or aborted")
        try:
            self._check_complete()
            self._close_shard()
            manifest = self.manifest()
            self._tx.commit(manifest.dumps())
        except BaseException:
            self.abort()
            raise
        self._tmp = self._tx = None
        self.committed = manifest
        return manifest

    def abort(self) -> None:
        """Drop everything written; ``path`` is left as it was."""
        if self._shard is not None:
            self._shard.abort()
            self._shard = None
        if self._tx is not None:
            self._tx.abort()
            self._tmp = self._tx = None

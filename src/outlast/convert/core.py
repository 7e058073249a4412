"""Format conversion: every checkpoint format seen as named tensors, streamed one at a time.

A *source* (outlast, Hugging Face safetensors, PyTorch DCP, a ``torch.save`` file, a
DeepSpeed ZeRO folder) exposes the same small interface: :class:`TensorSpec` of every
tensor up front (name, nested path, dtype, shape, all known without reading data), the
plain values, and the tensors themselves one at a time. A *sink* (outlast, HF, DCP)
plans its files from the specs, then pulls the tensors in order, so a conversion holds
about one tensor in memory whatever the checkpoint's size. Every sink writes under a
hidden temporary directory and renames it into place at the end, like a save.

``prefix`` maps between a sub-tree of a nested checkpoint and a flat foreign one:

======================================  ==========================================
conversion                              what ``prefix="model"`` does
======================================  ==========================================
outlast/torch/dcp/deepspeed -> hf/dcp   keep ``model.*`` and strip ``model.``
anything else -> outlast                nest every name under ``model.``
outlast -> outlast                      keep ``model.*`` (names unchanged)
hf -> dcp                               nest every name under ``model.``
======================================  ==========================================
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch

from ..errors import CheckpointExistsError, CheckpointNotFoundError, IncompatibleStateError, StorageError
from ..format import PlainEntry
from ..storage.commit import Transaction
from ..writer import DEFAULT_MAX_FILE_BYTES, CheckpointWriter, TensorSpec

__all__ = ["convert_checkpoint", "open_source", "Source", "ConvertResult", "SOURCE_FORMATS", "DEST_FORMATS"]

SOURCE_FORMATS = ("outlast", "hf", "dcp", "torch", "deepspeed")
DEST_FORMATS = ("outlast", "hf", "dcp")

# Hugging Face's own default for save_pretrained.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


# ---------------------------------------------------------------- sources


class Source:
    """A checkpoint seen as ``specs`` (every tensor, in reading order), ``plain`` values
    and a ``step``; :meth:`read` returns one tensor, :meth:`iter_tensors` all of them in
    ``specs`` order. Use as a context manager to release files."""

    format = "?"
    # False for readers that can only stream their tensors in one order (DeepSpeed).
    random_access = True

    def __init__(self, path: str):
        self.path = path
        self.specs: list[TensorSpec] = []
        self.plain: dict[str, PlainEntry] = {}
        self.step: int | None = None

    def read(self, fqn: str) -> torch.Tensor:
        raise NotImplementedError

    def iter_tensors(self) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        for spec in self.specs:
            yield spec, self.read(spec.fqn)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OutlastSource(Source):
    """An outlast checkpoint; every chunk read is checked against its checksum."""

    format = "outlast"

    def __init__(self, path: str, *, verify: bool = True):
        from ..reader import CheckpointReader

        super().__init__(path)
        self.reader = CheckpointReader(path)
        self.verify = verify
        m = self.reader.manifest
        self.step = m.step
        self.specs = [TensorSpec(fqn, e.dtype, tuple(e.shape), tuple(e.path)) for fqn, e in m.tensors.items()]
        self.plain = dict(m.plain)

    def read(self, fqn: str) -> torch.Tensor:
        return self.reader.read_tensor(fqn, verify=self.verify)

    def close(self) -> None:
        self.reader.close()


class _Renamed(Source):
    """A view of another source with some tensors selected and renamed (prefix handling)."""

    def __init__(self, inner: Source, specs: list[TensorSpec], names: dict[str, str], plain: dict[str, PlainEntry]):
        super().__init__(inner.path)
        self.inner = inner
        self.format = inner.format
        self.specs = specs
        self._names = names  # new fqn -> inner fqn
        self.plain = plain
        self.step = inner.step

    def read(self, fqn: str) -> torch.Tensor:
        return self.inner.read(self._names[fqn])

    def iter_tensors(self) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        if len(self.specs) == len(self.inner.specs) or not self.inner.random_access:
            # The inner source's own (possibly batched, or only possible) order; tensors
            # outside the selection are skipped.
            by_inner = {v: k for k, v in self._names.items()}
            spec_of = {s.fqn: s for s in self.specs}
            for spec, t in self.inner.iter_tensors():
                new = by_inner.get(spec.fqn)
                if new is not None:
                    yield spec_of[new], t
        else:
            yield from super().iter_tensors()

    def close(self) -> None:
        self.inner.close()


def _strip_path(path: list, prefix: str) -> list | None:
    """``path`` without the leading elements that spell ``prefix``; None if they don't."""
    from ..format import fqn_of

    for k in range(1, len(path)):
        head = fqn_of(path[:k])
        if head == prefix:
            return list(path[k:])
        if not prefix.startswith(head + "."):
            return None
    return None


def select_prefix(src: Source, prefix: str, *, strip: bool) -> Source:
    """Keep the tensors and values under ``prefix.``; with ``strip``, drop the prefix."""
    p = prefix.rstrip(".")
    specs, names = [], {}
    for s in src.specs:
        if not s.fqn.startswith(p + "."):
            continue
        if strip:
            new = s.fqn[len(p) + 1:]
            path = _strip_path(s.entry_path, p) or [new]
            specs.append(TensorSpec(new, s.dtype, s.shape, tuple(path)))
            names[new] = s.fqn
        else:
            specs.append(s)
            names[s.fqn] = s.fqn
    plain = {}
    for k, e in src.plain.items():
        if k.startswith(p + "."):
            if strip:
                new = k[len(p) + 1:]
                plain[new] = PlainEntry(_strip_path(e.path, p) or [new], e.value)
            else:
                plain[k] = e
    if not specs and not plain:
        tops = sorted({s.fqn.split(".", 1)[0] for s in src.specs} | {k.split(".", 1)[0] for k in src.plain})
        raise IncompatibleStateError(
            f"{src.path} has nothing under prefix {p!r}; its top-level names are {tops}"
        )
    return _Renamed(src, specs, names, plain)


def nest_prefix(src: Source, prefix: str) -> Source:
    """Put every tensor and value under ``prefix.`` (path ``[prefix, *path]``)."""
    p = prefix.rstrip(".")
    specs = [TensorSpec(f"{p}.{s.fqn}", s.dtype, s.shape, (p, *s.entry_path)) for s in src.specs]
    names = {f"{p}.{s.fqn}": s.fqn for s in src.specs}
    plain = {f"{p}.{k}": PlainEntry([p, *e.path], e.value) for k, e in src.plain.items()}
    return _Renamed(src, specs, names, plain)


def open_source(path: str | os.PathLike, fmt: str, *, verify: bool = True, tag: str | None = None) -> Source:
    """Open ``path`` as a :class:`Source` of format ``fmt`` (one of :data:`SOURCE_FORMATS`)."""
    path = os.fspath(path)
    if fmt not in SOURCE_FORMATS:
        raise ValueError(f"unknown source format {fmt!r}; choose one of {', '.join(SOURCE_FORMATS)}")
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"no {fmt} checkpoint at {path}: the path does not exist")
    if fmt == "outlast":
        return OutlastSource(path, verify=verify)
    if fmt == "hf":
        from .hf import HFSource

        return HFSource(path)
    if fmt == "dcp":
        from .dcp import DCPSource

        return DCPSource(path)
    if fmt == "torch":
        from .torch_save import TorchSaveSource

        return TorchSaveSource(path)
    return _deepspeed_source(path, tag)


def _deepspeed_source(path: str, tag: str | None) -> Source:
    # DeepSpeed support lives in convert/deepspeed.py (its own branch); import lazily so
    # the rest of convert works without it.
    try:
        from .deepspeed import read_deepspeed
    except ImportError as e:
        raise NotImplementedError(
            "--from deepspeed needs outlast.convert.deepspeed, which this outlast build lacks "
            f"({e}); upgrade outlast"
        ) from None
    return IterSource(path, "deepspeed", read_deepspeed(path, tag=tag))


class IterSource(Source):
    """Adapter for readers that only stream ``(name, tensor)`` pairs (DeepSpeed).

    ``state.iter_tensors()`` yields names and tensors; ``state.step`` and, if present,
    ``state.param_groups`` become plain values. If the reader offers no up-front
    ``tensor_specs()``, one pass over the tensors learns their shapes first.
    """

    random_access = False

    def __init__(self, path: str, fmt: str, state: Any):
        super().__init__(path)
        self.format = fmt
        self.state = state
        self.step = getattr(state, "step", None)
        specs_fn = getattr(state, "tensor_specs", None)
        if callable(specs_fn):
            self.specs = [s if isinstance(s, TensorSpec) else TensorSpec(*s) for s in specs_fn()]
        else:
            self.specs = [TensorSpec.of(n, t, _deepspeed_path(n)) for n, t in state.iter_tensors()]
        self.specs = [s if s.path is not None else replace(s, path=tuple(_deepspeed_path(s.fqn))) for s in self.specs]
        if self.step is not None:
            self.plain["step"] = PlainEntry(["step"], self.step)
        groups = getattr(state, "param_groups", None)
        if groups is not None:
            self.plain["optim.param_groups"] = PlainEntry(["optim", "param_groups"], groups)

    def iter_tensors(self) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        specs = iter(self.specs)
        for name, t in self.state.iter_tensors():
            spec = next(specs, None)
            if spec is None or spec.fqn != name:
                raise IncompatibleStateError(f"{self.path}: reader yielded {name!r}, expected {spec and spec.fqn!r}")
            yield spec, t

    def read(self, fqn: str) -> torch.Tensor:
        raise NotImplementedError(
            f"{self.format} checkpoints stream in one order only; convert to outlast first, then "
            "from outlast to the format you need"
        )


def _deepspeed_path(name: str) -> list:
    # model.<fqn> / master.<fqn> keep the module FQN as one key, as outlast.save does for
    # a state_dict; optim.state.<fqn>.<key> nests like torch's optimizer state.
    for top in ("model.", "master."):
        if name.startswith(top):
            return [top[:-1], name[len(top):]]
    if name.startswith("optim.state.") and name.count(".") >= 3:
        fqn, key = name[len("optim.state."):].rsplit(".", 1)
        return ["optim", "state", fqn, key]
    return [name]


# ---------------------------------------------------------------- progress and commits


def progress_bar(total: int, desc: str, enabled: bool | None) -> Any:
    """A tqdm bar in bytes on stderr; ``enabled=None`` shows it only on a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=(not enabled) if enabled is not None else None, file=sys.stderr, leave=False)


def foreign_tmp(final: str, overwrite: bool, markers: tuple[str, ...]) -> str:
    """Staging directory for a non-outlast output; refuses to clobber unrelated files.

    ``markers`` are file names that show an existing directory is an output of the same
    kind (so ``overwrite`` may replace it).
    """
    final = os.path.abspath(final)
    if os.path.lexists(final):
        if not os.path.isdir(final):
            raise CheckpointExistsError(f"{final} exists and is not a directory; choose another path")
        entries = os.listdir(final)
        if entries and not overwrite:
            raise CheckpointExistsError(f"{final} is not empty; choose another path or pass overwrite=True")
        if entries and not any(m in entries for m in markers):
            raise CheckpointExistsError(
                f"{final} holds files that are not a checkpoint ({', '.join(sorted(entries)[:3])}...); "
                "outlast will not replace it"
            )
    return Transaction(final).tmp


def commit_foreign(tmp: str, final: str, overwrite: bool) -> None:
    """Publish a finished foreign output with the same transaction as a save (storage.commit)."""
    # The staging directory has outlast's empty data/ folder; the foreign format has none.
    data = os.path.join(tmp, "data")
    if os.path.isdir(data) and not os.listdir(data):
        os.rmdir(data)
    final = os.path.abspath(final)
    if os.path.isdir(final) and not os.listdir(final):
        os.rmdir(final)  # an empty directory the user made for us: not worth an exchange
    Transaction(final, overwrite=overwrite, tmp=tmp).commit()


# ---------------------------------------------------------------- sinks


@dataclass
class ConvertResult:
    """What :func:`convert` wrote."""

    src: str
    dst: str
    src_format: str
    dst_format: str
    tensors: int
    nbytes: int
    files: list[str]
    plain_dropped: list[str]

    def to_json(self) -> dict:
        return dict(self.__dict__)


def write_outlast(src: Source, dst: str, *, overwrite: bool, max_file_bytes: int, progress: bool | None, extra: dict) -> list[str]:
    bar = progress_bar(src.nbytes, f"{src.format} -> outlast", progress)
    try:
        with CheckpointWriter(dst, src.specs, step=src.step, overwrite=overwrite, plain=src.plain,
                              max_file_bytes=max_file_bytes, extra=extra) as w:
            for spec, t in src.iter_tensors():
                w.write(spec.fqn, t)
                bar.update(spec.nbytes)
                del t
        return sorted(w.committed.files)
    finally:
        bar.close()


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    src_format: str,
    dst_format: str,
    prefix: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | None = None,
    verify: bool = True,
    progress: bool | None = False,
    tag: str | None = None,
) -> ConvertResult:
    """Convert a checkpoint between formats, streaming tensor by tensor.

    Sources: ``"outlast"``, ``"hf"`` (a directory with ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``), ``"dcp"`` (a torch.distributed.checkpoint
    directory), ``"torch"`` (a ``torch.save`` file, read with ``weights_only=True``),
    ``"deepspeed"`` (a ZeRO save_dir). Destinations: ``"outlast"``, ``"hf"``, ``"dcp"``.
    The output appears atomically at ``dst`` when complete.

    Args:
        src: the checkpoint to read.
        dst: the directory to create.
        src_format: one of ``outlast, hf, dcp, torch, deepspeed``.
        dst_format: one of ``outlast, hf, dcp``.
        prefix: a dotted sub-tree such as ``"model"``: selected (and stripped) when
            exporting from a nested checkpoint, added when importing into outlast (see
            the module docstring for the table).
        overwrite: replace an existing output at ``dst``.
        max_shard_size: bytes per output file (HF shards, default 5 GB; outlast data
            files, default 2 GiB). Ignored for DCP (one file).
        verify: check checksums of what is read from an outlast source.
        progress: show a progress bar on stderr (None: only on a terminal).
        tag: DeepSpeed tag to read (default: the ``latest`` file).

    Returns:
        A :class:`ConvertResult` (tensor count, bytes, files written, plain values the
        destination format could not hold).

    Raises:
        CheckpointNotFoundError / IncompleteCheckpointError: no (complete) source.
        CorruptCheckpointError: a checksum failed or a referenced file is missing.
        CheckpointExistsError: ``dst`` exists and ``overwrite`` is False.

    Example:
        >>> outlast.convert_checkpoint("ckpt/step-100", "hf-out", src_format="outlast",
        ...                            dst_format="hf", prefix="model")
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if dst_format not in DEST_FORMATS:
        raise ValueError(f"unknown destination format {dst_format!r}; choose one of {', '.join(DEST_FORMATS)}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"source and destination are the same path {src}")
    source = open_source(src, src_format, verify=verify, tag=tag)
    try:
        if prefix:
            if src_format == "outlast" and dst_format == "outlast":
                source = select_prefix(source, prefix, strip=False)
            elif dst_format == "outlast" or src_format == "hf":
                source = nest_prefix(source, prefix)
            else:
                source = select_prefix(source, prefix, strip=True)
        dropped: list[str] = []
        if dst_format == "outlast":
            extra = {"converted_from": {"format": src_format, "path": os.path.abspath(src)}}
            files = write_outlast(source, dst, overwrite=overwrite, progress=progress, extra=extra,
                                  max_file_bytes=max_shard_size or DEFAULT_MAX_FILE_BYTES)
        elif dst_format == "hf":
            from .hf import write_hf

            files = write_hf(source, dst, overwrite=overwrite, progress=progress,
                             max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
            dropped = sorted(source.plain)
        else:
            from .dcp import write_dcp

            files = write_dcp(source, dst, overwrite=overwrite, progress=progress)
        return ConvertResult(src, dst, src_format, dst_format, len(source.specs), source.nbytes, files, dropped)
    finally:
        source.close()


def __getattr__(name: str) -> Any:
    # ``outlast.convert.core.convert``: the name before 0.2 (see outlast._deprecated).
    if name == "convert":
        from .._deprecated import warn

        warn("outlast.convert.core.convert", "outlast.convert_checkpoint")
        return convert_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Opening committed checkpoints and reading regions of their tensors.

A :class:`CheckpointReader` validates the manifest and the data files once, then
serves reads: whole tensors (:meth:`read_tensor`) or many regions at once
(:meth:`read_regions`). Reads go through the same engine as a distributed load (the
load planner of :mod:`outlast.plan` and the executor of :mod:`outlast.transfer`, with
one rank and no exchange): only the rows needed are read, widened to their checksum
blocks, adjacent ranges are coalesced into one ``preadv``, a read that exactly fills a
contiguous destination lands in it directly, and every byte is checked before use.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import dtypes
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleStateError,
    IncompleteCheckpointError,
    StorageError,
)
from .format import MANIFEST_NAME, MAX_MANIFEST_BYTES, Chunk, Manifest, TensorEntry
from .regions import Box
from .storage.commit import recover
from .storage.local import (DirectIORefused, checksum, is_temp_name, open_direct, pread_direct_into,
                            pread_into, read_header)


@dataclass
class ReadRequest:
    """Fill ``dest`` (holding ``box`` of logical tensor ``fqn``) from the checkpoint."""

    fqn: str
    box: Box
    dest: torch.Tensor


@dataclass
class ReadStats:
    bytes_read: int = 0
    chunks_read: int = 0  # storage reads (preads) made


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def open_manifest(path: str, *, check_files: bool = True) -> Manifest:
    """Read and validate ``path/manifest.json`` with errors a user can act on.

    With ``check_files`` (the default: every open) each data file must also exist at the
    size the manifest lists, with a valid safetensors header whose entry for every chunk
    agrees with it (key, dtype, shape, byte range). Checksums of the bytes are checked
    when they are read (or by :meth:`CheckpointReader.verify`).
    """
    if not os.path.exists(path) and not recover(path):
        raise CheckpointNotFoundError(f"no checkpoint at {path}: the path does not exist")
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path} is not a checkpoint directory")
    mpath = os.path.join(path, MANIFEST_NAME)
    if not os.path.exists(mpath):
        hint = " (a save that never finished)" if os.listdir(path) else ""
        raise IncompleteCheckpointError(
            f"{path} has no {MANIFEST_NAME}: it is an incomplete checkpoint{hint} and cannot be "
            "loaded. Load an older checkpoint (outlast ls shows them) or delete this directory."
        )
    try:
        with open(mpath, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise StorageError(f"reading {mpath} failed: {e.strerror}") from e
    m = Manifest.loads(data, mpath)
    if check_files:
        check_data_files(path, m)
    return m


def check_data_files(path: str, manifest: Manifest, files=None) -> None:
    """Raise :class:`CorruptCheckpointError` if a data file (of ``files``, default all)
    disagrees with ``manifest``: missing, wrong size, or a header that does not match."""
    problems = file_problems(path, manifest, files=files)
    if problems:
        raise CorruptCheckpointError(
            f"checkpoint {path} is damaged: {problems[0]}"
            + (f" (and {len(problems) - 1} more problem(s); outlast verify lists them)" if len(problems) > 1 else "")
            + ". Use an older checkpoint or restore the file.",
            problems,
        )


def file_problems(path: str, manifest: Manifest, headers: dict | None = None, *, files=None) -> list[str]:
    """Every disagreement between the data files on disk and ``manifest``, one line each.

    Checks existence, exact size, the safetensors header, and each chunk's header entry.
    ``headers``, if given, receives ``{file: (header, data_start) or None}``. ``files``
    limits the check to those data files (a distributed load splits them across ranks).
    """
    problems: list[str] = []
    headers = {} if headers is None else headers
    wanted = None if files is None else set(files)
    for rel, size in sorted(manifest.files.items()):
        if wanted is not None and rel not in wanted:
            continue
        p = os.path.join(path, rel)
        try:
            actual = os.path.getsize(p)
        except FileNotFoundError:
            problems.append(f"{rel}: file missing (holds {_describe_file(manifest, rel)})")
            headers[rel] = None
            continue
        except OSError as e:
            problems.append(f"{rel}: cannot be read ({e.strerror})")
            headers[rel] = None
            continue
        if actual != size:
            problems.append(f"{rel}: size is {actual} bytes, manifest says {size} (truncated or overwritten)")
        try:
            headers[rel] = read_header(p)
        except CorruptCheckpointError as e:
            problems.append(f"{rel}: {e}")
            headers[rel] = None
    # Only the chunks of files whose header was read: a distributed load splits the files
    # across ranks, and a grid-encoded tensor then expands only this rank's share.
    read = {rel for rel, hdr in headers.items() if hdr is not None}
    for fqn, e in manifest.tensors.items():
        for c in e.iter_chunks(read):
            hdr = headers[c.file]
            h, base = hdr
            info = h.get(c.key)
            want = {"dtype": e.dtype, "shape": list(c.box.sizes), "data_offsets": [c.offset - base, c.offset - base + c.nbytes]}
            if not isinstance(info, dict) or any(info.get(k) != v for k, v in want.items()):
                problems.append(
                    f"{c.file}: tensor {fqn!r}: safetensors header entry {c.key!r} is {info!r}, the manifest says {want}"
                )
    return problems


def _describe_file(manifest: Manifest, rel: str) -> str:
    names = [f for f, t in manifest.tensors.items() if any(c.file == rel for c in t.chunks)]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"regions of {len(names)} tensor(s): {shown}" if names else "no tensors"


class CheckpointReader:
    """Read-only access to one committed checkpoint directory.

    Not thread-safe for concurrent calls; each call parallelises internally. Use as a
    context manager (or call :meth:`close`) to release file descriptors.

    Example:
        >>> with CheckpointReader("ckpt/step-100") as r:
        ...     w = r.read_tensor("model.weight")
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, check_files: bool = True,
                 direct_io: bool = False):
        self.path = os.fspath(path)
        # check_files=False opens a checkpoint with damaged files so verify() can list them.
        self.manifest = open_manifest(self.path, check_files=check_files)
        self.threads = threads or default_threads()
        self.direct_io = direct_io
        """Read with O_DIRECT (no page cache; see :func:`~outlast.storage.local.pread_direct_into`),
        falling back to buffered reads, file by file, where the filesystem refuses it. For a
        checkpoint that is not in the page cache (just written with O_DIRECT); a cached one is
        read faster through the cache."""
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int | None] = {}
        self._refused_fds: list[int] = []
        self._fd_lock = threading.Lock()

    # -- lifecycle
    def close(self) -> None:
        with self._fd_lock:
            for fd in [*self._fds.values(), *self._direct_fds.values(), *self._refused_fds]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._direct_fds.clear()
            self._refused_fds.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def file_path(self, rel: str) -> str:
        return os.path.join(self.path, rel)

    def _fd(self, rel: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(rel)
            if fd is None:
                p = self.file_path(rel)
                try:
                    fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except FileNotFoundError:
                    raise CorruptCheckpointError(
                        f"data file {p} is missing; it holds {self._describe_file(rel)}. "
                        "The checkpoint is incomplete: use an older one or restore the file."
                    ) from None
                self._fds[rel] = fd
            return fd

    def _describe_file(self, rel: str) -> str:
        return _describe_file(self.manifest, rel)

    def pread(self, rel: str, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset`` of data file ``rel`` (O_DIRECT when :attr:`direct_io`)."""
        if self.direct_io:
            with self._fd_lock:
                if rel not in self._direct_fds:
                    try:
                        self._direct_fds[rel] = open_direct(self.file_path(rel))
                    except FileNotFoundError:
                        self._direct_fds[rel] = None  # the buffered open below says which file is missing
                fd = self._direct_fds[rel]
            if fd is not None:
                try:
                    return pread_direct_into(fd, buf, offset, self.file_path(rel))
                except DirectIORefused:
                    with self._fd_lock:  # buffered from now on; closed with the others
                        if self._direct_fds.get(rel) == fd:
                            self._direct_fds[rel] = None
                            self._refused_fds.append(fd)
        pread_into(self._fd(rel), buf, offset, self.file_path(rel))

    # -- reads
    def entry(self, fqn: str) -> TensorEntry:
        try:
            return self.manifest.tensors[fqn]
        except KeyError:
            raise IncompatibleStateError(f"checkpoint {self.path} has no tensor {fqn!r}") from None

    def _read_chunk_into(self, fqn: str, chunk: Chunk, buf: memoryview, verify: bool) -> None:
        self.pread(chunk.file, buf, chunk.offset)
        if verify:
            got = checksum(buf)
            if got != chunk.checksum:
                raise CorruptCheckpointError(
                    f"checksum mismatch in {self.file_path(chunk.file)} for tensor {fqn!r} "
                    f"region offsets={list(chunk.box.offsets)} sizes={list(chunk.box.sizes)}: "
                    f"expected {chunk.checksum}, got {got}. The file is damaged; use an older "
                    "checkpoint or restore the file.",
                    [f"{chunk.file}: {fqn} {list(chunk.box.offsets)}"],
                )

    def read_tensor(self, fqn: str, *, verify: bool = True) -> torch.Tensor:
        """The whole logical tensor ``fqn`` as a new CPU tensor."""
        e = self.entry(fqn)
        out = torch.empty(e.shape, dtype=dtypes.from_safetensors(e.dtype))
        self.read_regions([ReadRequest(fqn, Box.full(e.shape), out)], verify=verify)
        return out

    def read_regions(
        self,
        requests: Sequence[ReadRequest],
        *,
        verify: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> ReadStats:
        """Fill every request's ``dest`` from the stored chunks; each chunk is read once.

        Raises CorruptCheckpointError if a region is not covered by the checkpoint's chunks
        (data lost) or a checksum fails, IncompatibleStateError if a request names an
        unknown tensor or has the wrong dtype.
        """
        # One read engine: the load planner and executor of a distributed load, with one
        # rank and no exchange. So every caller gets the same partial row reads (widened to
        # checksum blocks), coalesced preads, direct reads into contiguous destinations,
        # and the same meaning of verify.
        from .plan import StoredChunk, Want, plan_load_reads
        from .transfer import TransferStats, read_mine

        wants, stored, seen = [], [], set()
        for k, req in enumerate(requests):
            e = self.entry(req.fqn)
            want = dtypes.from_safetensors(e.dtype)
            if req.dest.dtype != want:
                raise IncompatibleStateError(
                    f"tensor {req.fqn!r}: checkpoint has dtype {want}, live tensor has {req.dest.dtype}"
                )
            if tuple(req.dest.shape) != req.box.sizes:
                raise ValueError(f"{req.fqn}: destination shape {tuple(req.dest.shape)} != region {req.box.sizes}")
            got = sum(i.numel for c in e.chunks if (i := c.box.intersect(req.box)) is not None)
            if req.box.ndim == 0:
                got = 1 if e.chunks else 0
            if got != req.box.numel:
                raise CorruptCheckpointError(
                    f"checkpoint {self.path} does not hold all of tensor {req.fqn!r} region "
                    f"offsets={list(req.box.offsets)} sizes={list(req.box.sizes)}: {req.box.numel - got} "
                    "elements are in no chunk (regions lost)"
                )
            wants.append(Want(req.fqn, req.box, 0, k))
            if req.fqn not in seen:
                seen.add(req.fqn)
                item = dtypes.itemsize(e.dtype)
                stored += [StoredChunk(req.fqn, i, c.box, item, c.block_rows) for i, c in enumerate(e.chunks)]
        plan = plan_load_reads(stored, wants, 1, verify=verify)
        ts = TransferStats()
        read_mine(self, plan, 0, list(requests), ts, progress=progress)
        stats = ReadStats(bytes_read=ts.bytes_read, chunks_read=ts.preads)
        return stats

    # -- verification
    def verify(self, *, progress: Callable[[int], None] | None = None) -> list[str]:
        """Check every file and chunk; return a list of problems (empty if all is well)."""
        headers: dict[str, tuple[dict, int] | None] = {}
        problems = file_problems(self.path, self.manifest, headers)
        for fqn, e in self.manifest.tensors.items():
            for c in e.chunks:
                if headers.get(c.file) is None:
                    if progress:
                        progress(c.nbytes)
                    continue
                region = f"region offsets={list(c.box.offsets)} sizes={list(c.box.sizes)}"
                try:
                    buf = bytearray(c.nbytes)
                    self._read_chunk_into(fqn, c, memoryview(buf), True)
                except CorruptCheckpointError as err:
                    what = "checksum mismatch" if "checksum mismatch" in str(err) else str(err)
                    problems.append(f"{c.file}: tensor {fqn!r} {region}: {what}")
                else:
                    # Partial (resharded) loads trust the per-row-block checksums instead of
                    # the chunk's, so verify must check those too.
                    bad = _bad_blocks(c, memoryview(buf))
                    if bad:
                        problems.append(f"{c.file}: tensor {fqn!r} {region}: block checksum mismatch in row block(s) {bad}")
                if progress:
                    progress(c.nbytes)
        return problems


def _bad_blocks(c: Chunk, buf: memoryview) -> list[int]:
    """Indices of the chunk's row blocks whose stored checksum does not match ``buf``."""
    if not c.block_rows or not c.block_checksums:
        return []
    rows = c.box.sizes[0]
    row_bytes = c.nbytes // rows if rows else 0
    bad = []
    for i, want in enumerate(c.block_checksums):
        lo = i * c.block_rows * row_bytes
        hi = min(rows, (i + 1) * c.block_rows) * row_bytes
        if checksum(buf[lo:hi]) != want:
            bad.append(i)
    return bad


def list_checkpoints(root: str) -> list[dict]:
    """Describe every checkpoint directly under ``root`` (and ``root`` itself if it is one).

    Each row: ``path``, ``name``, ``step``, ``nbytes``, ``status`` ("committed",
    "incomplete" or "corrupt"), ``error``. Rows are sorted by step, then name.
    """
    rows = []
    candidates = []
    if os.path.isdir(root):  # a commit cut between its two renames: put the old one back first
        for name in os.listdir(root):
            if name.startswith(".") and ".old-" in name:
                recover(os.path.join(root, name[1:].split(".old-")[0]))
    if os.path.exists(os.path.join(root, MANIFEST_NAME)):
        candidates.append(root)
    if os.path.isdir(root):
        with os.scandir(root) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    candidates.append(e.path)
    for p in candidates:
        name = os.path.basename(os.path.normpath(p))
        row = {"path": p, "name": name, "step": None, "nbytes": _du(p), "status": "committed", "error": None}
        if is_temp_name(name) or not os.path.exists(os.path.join(p, MANIFEST_NAME)):
            if not is_temp_name(name) and not _looks_like_checkpoint(p):
                continue
            row["status"] = "incomplete"
        else:
            try:
                m = open_manifest(p)
                row["step"] = m.step
            except Exception as e:  # noqa: BLE001 - every failure is reported as "corrupt"
                row["status"] = "corrupt"
                row["error"] = str(e)
        rows.append(row)
    rows.sort(key=lambda r: (r["step"] is None, r["step"] or 0, r["name"]))
    return rows


def _looks_like_checkpoint(p: str) -> bool:
    return os.path.isdir(os.path.join(p, "data"))


def _du(p: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(p):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total

"""The offload directory: two generations of state files and the record of which is current.

For every state kind (``exp_avg``, ``exp_avg_sq``, optionally ``master`` and
``max_exp_avg_sq``) there are two files, ``<kind>.0.bin`` and ``<kind>.1.bin``. A step
reads generation ``g`` and writes generation ``1 - g``; only when every write of the
step has succeeded and been flushed is ``state.json`` replaced (write, fsync, rename)
to name ``1 - g`` as current. A step that fails half way (disk full, I/O error) leaves
generation ``g`` untouched and still current: the previous state is intact, at the
price of twice the disk space and none of extra I/O (an in-place update would need a
journal, i.e. a second write of every byte).

Files are preallocated (``posix_fallocate``) when the directory is created, so a disk
too small is reported before the first step and later steps write into blocks that
already exist. Files are opened with O_DIRECT (reads and writes skip the page cache,
which under a memory limit would otherwise be charged to the job and evicted in
bursts); a filesystem that refuses O_DIRECT gets buffered I/O and one warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import CorruptCheckpointError, IncompatibleStateError, StorageError
from ..storage.local import fsync_dir, pread_into
from .layout import ITEMSIZE, StateLayout

__all__ = ["StateFiles", "STATE_JSON", "FORMAT_VERSION", "DirectIOWarning"]

STATE_JSON = "state.json"
FORMAT_VERSION = 1


class DirectIOWarning(UserWarning):
    """The filesystem refused O_DIRECT; offloaded state goes through the page cache."""


def _storage_error(action: str, path: str, e: OSError) -> StorageError:
    hint = ""
    if e.errno == errno.ENOSPC:
        hint = " (the disk is full: free space on it or point offload.dir at a larger disk)"
    elif e.errno == errno.EIO:
        hint = " (an I/O error from the device: check dmesg)"
    # errno and filename stay unset: OSError.__str__ would then print them instead of the message.
    return StorageError(f"{action} {path} failed: {e.strerror or e}{hint}")


@dataclass(frozen=True)
class _Meta:
    generation: int
    steps: list[int]


class StateFiles:
    """The state files of one offloaded optimizer (one process, one directory).

    NOT thread-safe for :meth:`commit`; :meth:`read` and :meth:`write` on different
    chunks may run on different threads (they are ``pread``/``pwrite``).

    Args:
        directory: where the files live (created if needed). One optimizer per directory.
        layout: the :class:`StateLayout` of the parameters.
        kinds: the state kinds, e.g. ``("exp_avg", "exp_avg_sq")``.
        reopen: open the state a previous process left there (validated against
            ``layout``) instead of creating fresh zero files.

    Example:
        >>> lay = StateLayout.build([5000], chunk_elems=4096)
        >>> files = StateFiles(tempfile.mkdtemp(), lay, ("exp_avg", "exp_avg_sq"))
        >>> buf = aligned_buffer(4096 * 4)
        >>> files.read("exp_avg", files.generation, 0, buf)        # zeros on a fresh directory
        >>> files.write("exp_avg", files.next_generation(), 0, buf)
        >>> files.flush(1); files.commit(1, [1]); files.generation
        1
        >>> files.close(); shutil.rmtree(files.directory)
    """

    def __init__(self, directory: str, layout: StateLayout, kinds: Sequence[str], *, reopen: bool = False):
        self.directory = os.path.abspath(directory)
        self.layout = layout
        self.kinds = tuple(kinds)
        self.direct = True
        self._fds: dict[tuple[str, int], int] = {}
        os.makedirs(self.directory, exist_ok=True)
        try:
            if reopen:
                meta = self._validate()
            else:
                meta = self._create()
            self.generation = meta.generation
            self.steps = list(meta.steps)
            for kind in self.kinds:
                for g in (0, 1):
                    self._fds[(kind, g)] = self._open(self.path(kind, g))
        except BaseException:
            self.close()
            raise
        self._maps: dict[tuple[str, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ paths, creation
    def path(self, kind: str, generation: int) -> str:
        return os.path.join(self.directory, f"{kind}.{generation}.bin")

    @property
    def nbytes(self) -> int:
        """Bytes on disk (both generations of every kind)."""
        return 2 * len(self.kinds) * self.layout.nbytes

    def _create(self) -> _Meta:
        size = self.layout.nbytes
        for kind in self.kinds:
            for g in (0, 1):
                p = self.path(kind, g)
                try:
                    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                except OSError as e:
                    raise _storage_error("creating offload state file", p, e) from e
                try:
                    if size:
                        os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        os.ftruncate(fd, size)  # a filesystem without fallocate: sparse is the best we get
                    else:
                        raise _storage_error(
                            f"reserving {size} bytes ({self.nbytes} for the whole offloaded state) for", p, e
                        ) from e
                finally:
                    os.close(fd)
        meta = _Meta(0, [0] * len(self.layout.numels))
        self._write_meta(meta)
        return meta

    def _validate(self) -> _Meta:
        sp = os.path.join(self.directory, STATE_JSON)
        try:
            with open(sp, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"offload state record {sp} is missing: {self.directory} holds no offloaded state to reopen "
                "(start fresh with reopen=False, or restore from a checkpoint)"
            ) from None
        except (ValueError, UnicodeDecodeError):
            raise CorruptCheckpointError(f"offload state record {sp} is not valid JSON (a torn write?)") from None
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise CorruptCheckpointError(f"{sp}: not an outlast offload state record of version {FORMAT_VERSION}")
        if list(raw.get("numels", [])) != list(self.layout.numels) or list(raw.get("kinds", [])) != list(self.kinds):
            raise IncompatibleStateError(
                f"{sp} describes parameters {raw.get('numels')} with state {raw.get('kinds')}, but this optimizer "
                f"has {list(self.layout.numels)} with {list(self.kinds)}: it belongs to another model or configuration"
            )
        for kind in self.kinds:
            for g in (0, 1):
                p = self.path(kind, g)
                try:
                    size = os.path.getsize(p)
                except FileNotFoundError:
                    raise CorruptCheckpointError(
                        f"offload state file {p} is missing; the offloaded state in {self.directory} is "
                        "incomplete: restore from a checkpoint (Checkpointer.restore) instead of reopening it"
                    ) from None
                if size != self.layout.nbytes:
                    raise CorruptCheckpointError(
                        f"offload state file {p} is {size} bytes, expected {self.layout.nbytes} "
                        f"({'truncated' if size < self.layout.nbytes else 'too long'}); restore from a checkpoint "
                        "instead of reopening it"
                    )
        g = raw.get("generation")
        if g not in (0, 1) or len(raw.get("steps", [])) != len(self.layout.numels):
            raise CorruptCheckpointError(f"{sp}: generation or steps are malformed")
        return _Meta(int(g), [int(s) for s in raw["steps"]])

    def _open(self, path: str) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC
        if self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise _storage_error("opening offload state file", path, e) from e
                self._refuse_direct(path)
        try:
            return os.open(path, flags)
        except OSError as e:
            raise _storage_error("opening offload state file", path, e) from e

    def _refuse_direct(self, path: str) -> None:
        if self.direct:
            warnings.warn(
                f"the filesystem of {path} refuses O_DIRECT; offloaded optimizer state goes through the page "
                "cache (slower, and the cache is charged to this job's memory)",
                DirectIOWarning,
                stacklevel=3,
            )
        self.direct = False
        for fd in self._fds.values():
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    # ------------------------------------------------------------------ I/O
    def read(self, kind: str, generation: int, start: int, buf: torch.Tensor) -> None:
        """Fill ``buf`` (uint8, aligned) with the bytes of elements from ``start`` of ``kind``'s file."""
        path = self.path(kind, generation)
        mv = memoryview(buf.numpy())
        off = start * ITEMSIZE
        fd = self._fds[(kind, generation)]
        try:
            pread_into(fd, mv, off, path)
        except StorageError as e:
            if not (self.direct and getattr(e.__cause__, "errno", None) == errno.EINVAL):
                raise
            self._refuse_direct(path)  # accepted at open, refused on use: go buffered from here
            pread_into(fd, mv, off, path)

    def write(self, kind: str, generation: int, start: int, buf: torch.Tensor) -> None:
        """Write ``buf`` (uint8, aligned) as the bytes of elements from ``start`` of ``kind``'s file."""
        path = self.path(kind, generation)
        mv = memoryview(buf.numpy())
        off = start * ITEMSIZE
        fd = self._fds[(kind, generation)]
        done = 0
        while done < len(mv):
            try:
                n = _pwrite(fd, mv[done:], off + done)
            except OSError as e:
                if e.errno == errno.EINVAL and self.direct:
                    self._refuse_direct(path)
                    continue
                raise _storage_error("writing offloaded optimizer state to", path, e) from e
            if n == 0:
                raise _storage_error("writing offloaded optimizer state to", path, OSError(errno.EIO, "no progress"))
            done += n

    def next_generation(self) -> int:
        """The generation a step writes (the one that is not current)."""
        return 1 - self.generation

    def flush(self, generation: int) -> None:
        """Make every write to ``generation``'s files durable (fdatasync)."""
        for kind in self.kinds:
            try:
                os.fdatasync(self._fds[(kind, generation)])
            except OSError as e:
                raise _storage_error("flushing", self.path(kind, generation), e) from e

    def commit(self, generation: int, steps: Sequence[int]) -> None:
        """Name ``generation`` as current, atomically (after :meth:`flush`)."""
        self._write_meta(_Meta(generation, list(steps)))
        self.generation = generation
        self.steps = list(steps)

    def _write_meta(self, meta: _Meta) -> None:
        final = os.path.join(self.directory, STATE_JSON)
        tmp = final + ".tmp"
        data = json.dumps({
            "version": FORMAT_VERSION, "generation": meta.generation, "kinds": list(self.kinds),
            "numels": list(self.layout.numels), "steps": list(meta.steps),
        }).encode()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(self.directory)
        except OSError as e:
            raise _storage_error("writing the offload state record", final, e) from e

    # ------------------------------------------------------------------ views
    def mapped(self, kind: str, generation: int) -> torch.Tensor:
        """The whole of ``kind``'s file as a 1-D fp32 tensor memory-mapped from it (shared:
        writes go to the file). Costs address space, not memory: pages come and go with the
        page cache."""
        key = (kind, generation)
        t = self._maps.get(key)
        if t is None:
            n = self.layout.total
            t = torch.from_file(self.path(kind, generation), shared=True, size=n, dtype=torch.float32) if n else torch.empty(0)
            self._maps[key] = t
        return t

    def release(self, kind: str, generation: int) -> None:
        """Drop the cached mapping of ``kind``'s file and its clean pages from the page cache.

        A mapping is address space, but its pages stay charged to the process' memory
        cgroup while mapped, and a cgroup v1 limit OOM-kills rather than unmap them: one
        pass over a file (filling the masters, reading them back) must not pin its size.
        Call :meth:`flush` first if the pages were written, and drop your own views.
        """
        self._maps.pop((kind, generation), None)
        fd = self._fds.get((kind, generation))
        if fd is not None and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        self._maps = {}


def _pwrite(fd: int, mv: memoryview, offset: int) -> int:
    return os.pwrite(fd, mv, offset)


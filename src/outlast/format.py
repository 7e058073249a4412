"""The checkpoint format, versions 1 and 2: the manifest schema and its validation.

A checkpoint is a directory holding ``manifest.json`` (the commit point, written last)
and ``data/*.safetensors`` files. The manifest names every logical tensor (dtype, global
shape) and its chunks: a region (box) of the tensor, the file and safetensors key holding
it, the byte range and an xxh3-64 checksum of those bytes. Version 2 adds one more way to
list a tensor's chunks: when they are the cells of a product grid (the FSDP/TP case) the
manifest stores the grid (:class:`ChunkGrid`, cut points per dim and a few flat arrays)
instead of one JSON object per chunk. Plain values are JSON in the manifest. Nothing is pickled. ``docs/format.md`` is the human specification; this module
is the executable one, and it treats every manifest as hostile input: anything malformed
raises :class:`~outlast.errors.CorruptCheckpointError` or
:class:`~outlast.errors.UnsupportedFormatError` naming the checkpoint and the field.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import xxhash

from . import dtypes
from .errors import CorruptCheckpointError, UnsupportedFormatError
from .regions import Box, tiling_fault

FORMAT_ID = "outlast.checkpoint"
FORMAT_VERSION = 2  # the newest version this module reads; it writes 1 unless a tensor is grid-encoded
GRID_VERSION = 2  # the first version with grid-encoded chunk lists
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
CHECKSUM_ALGORITHM = "xxh3-64"
MANIFEST_CHECKSUM = "manifest_checksum"
_PLACEHOLDER = "0" * 16

# Bounds on hostile input, far above anything a real checkpoint holds: a crafted manifest
# must fail with CorruptCheckpointError, not exhaust memory or time.
MAX_MANIFEST_BYTES = 1 << 30   # ~1 KiB per chunk: a million chunks
MAX_NDIM = 64
MAX_DIM = 1 << 62              # a dimension's size, an offset
MAX_NBYTES = 1 << 62           # a tensor's bytes

# A path element is a str or int dict key, or a one-element list [i] for a list index.
PathElem = "str | int | list[int]"


@dataclass(frozen=True)
class Chunk:
    """One stored region of a logical tensor.

    ``offset`` is the absolute byte offset of the region's bytes in ``file`` (relative to
    the checkpoint directory); ``nbytes`` their length; ``checksum`` a lowercase hex
    xxh3-64 digest of exactly those bytes. The bytes are the region in C order.

    Optional (written by outlast >= 0.1 for large chunks, ignored by readers that do not
    know them, so the format stays version 1): ``block_rows`` and ``block_checksums``,
    the xxh3-64 of each run of ``block_rows`` rows (dim 0) of the chunk, the last run
    possibly shorter. They let a reader that needs only some rows read and verify just
    the blocks holding them.
    """

    box: Box
    file: str
    key: str
    offset: int
    nbytes: int
    checksum: str
    block_rows: int = 0
    block_checksums: tuple[str, ...] = ()

    def to_json(self) -> dict:
        out = {
            "offsets": list(self.box.offsets),
            "sizes": list(self.box.sizes),
            "file": self.file,
            "key": self.key,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "checksum": self.checksum,
        }
        if self.block_rows:
            out["block_rows"] = self.block_rows
            out["block_checksums"] = list(self.block_checksums)
        return out


def grid_key(fqn: str, offsets: Sequence[int]) -> str:
    """The safetensors key of a chunk of ``fqn`` at ``offsets`` that is not the whole tensor
    (the rule :class:`~outlast.shards.SaveItem` writes, and every grid cell's key)."""
    return f"{fqn}#{'_'.join(map(str, offsets))}"


def grid_cells(shape: Sequence[int], offsets: np.ndarray, sizes: np.ndarray) -> "tuple[list[np.ndarray], np.ndarray] | None":
    """(cut points per dim, flat C-order cell of each chunk) when the boxes ``offsets`` /
    ``sizes`` (one row per chunk) are exactly the cells of a product grid, else None.

    Each box must be one cell of the product of all box boundaries and every cell one box:
    then the boxes tile the tensor. Tensors without elements are never a grid.

    Example:
        >>> cuts, cell = grid_cells((4, 2), np.array([[2, 0], [0, 0]]), np.array([[2, 2], [2, 2]]))
        >>> [c.tolist() for c in cuts], cell.tolist()
        ([[0, 2, 4], [0, 2]], [1, 0])
    """
    n = len(offsets)
    if not len(shape) or n == 0 or math.prod(shape) == 0:
        return None
    offsets = np.asarray(offsets, dtype=np.int64).reshape(n, len(shape))
    sizes = np.asarray(sizes, dtype=np.int64).reshape(n, len(shape))
    if (sizes <= 0).any():
        return None
    ends = offsets + sizes
    cuts, idx = [], []
    for d, size in enumerate(shape):
        c = np.sort(np.concatenate([offsets[:, d], ends[:, d]]), kind="stable")
        c = c[np.concatenate(([True], c[1:] != c[:-1]))]
        if c[0] != 0 or c[-1] != size:
            return None
        lo = np.searchsorted(c, offsets[:, d])
        if not np.array_equal(np.searchsorted(c, ends[:, d]), lo + 1):
            return None
        cuts.append(c)
        idx.append(lo)
    counts = tuple(len(c) - 1 for c in cuts)
    if math.prod(counts) != n:
        return None
    flat = np.ravel_multi_index(idx, counts)
    seen = np.zeros(n, dtype=bool)
    seen[flat] = True
    if not seen.all():  # two chunks on one cell leave another cell without one
        return None
    return cuts, flat


class ChunkGrid:
    """A tensor's chunks stored as the cells of a product grid (manifest version 2).

    ``cuts[d]`` are the split points of dim ``d``, strictly increasing from 0 to the
    dim's size; the cells of their product, in C order (last dim fastest), are the
    chunks, so the chunk list index of a cell is its flat index. Per cell: ``file`` (an
    index into the manifest's file names, sorted: ``files`` here), ``offset`` (absolute
    byte offset in that file) and the 16-hex-digit ``checksum``; optionally
    ``block_rows`` (0: none) and the cells' row-block checksums, concatenated in cell
    order. What a chunk record spells out is derived: the box from the cuts, ``nbytes``
    from the box, the key is ``grid_key(fqn, offsets)``. The file table is the manifest's
    own ``files`` (one per writer): a table per tensor would repeat 4,096 names in each
    of 700 tensors.

    Why this encoding: the per-cell numbers are stored as base64 of little-endian
    integers (``file`` u32, ``offset`` and ``block_rows`` u64) and the checksums as one
    string of hex digits. At 4,096 ranks a 70B layout has ~1.9 M chunks; as JSON number
    arrays, parsing them and turning them into numpy arrays cost ~0.5 s of CPU here,
    as base64 ~0.2 s (and the text is no larger: a file offset is ~11 decimal digits,
    ~11 base64 characters). Any language's standard library decodes base64. Checksums
    stay the hex digits the per-chunk form writes, so the same digest reads the same in
    both forms. Validation of all of it is a handful of numpy operations, not a loop per
    chunk (see ``_Validator.grid``).
    """

    def __init__(self, fqn: str, cuts: Sequence[np.ndarray], files: Sequence[str], file: np.ndarray, offset: np.ndarray,
                 checksums: str, itemsize: int, block_rows: np.ndarray | None = None, block_checksums: str = ""):
        self.fqn = fqn
        self.cuts = [np.asarray(c, dtype=np.int64) for c in cuts]
        self.files = files  # shared by every grid of a manifest: not copied
        self.file = np.asarray(file, dtype=np.int64)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.checksums = checksums
        self.itemsize = itemsize
        self.block_rows = None if block_rows is None else np.asarray(block_rows, dtype=np.int64)
        self.block_checksums = block_checksums
        self._json: dict | None = None
        self._block_start: np.ndarray | None = None

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(len(c) - 1 for c in self.cuts)

    def __len__(self) -> int:
        return math.prod(self.counts)

    def nbytes(self) -> np.ndarray:
        """Bytes of every cell, in cell order."""
        out = np.full(1, self.itemsize, dtype=np.int64)
        for c in self.cuts:
            out = np.multiply.outer(out, np.diff(c)).reshape(-1)
        return out

    def rows(self) -> np.ndarray:
        """Dim-0 size of every cell, in cell order."""
        return np.repeat(np.diff(self.cuts[0]), len(self) // self.counts[0])

    def block_rows_array(self) -> np.ndarray:
        return np.zeros(len(self), dtype=np.int64) if self.block_rows is None else self.block_rows

    def box(self, i: int) -> Box:
        lo, sz = [], []
        for d in range(len(self.cuts) - 1, -1, -1):
            i, k = divmod(i, self.counts[d])
            a, b = int(self.cuts[d][k]), int(self.cuts[d][k + 1])
            lo.append(a)
            sz.append(b - a)
        return Box(tuple(reversed(lo)), tuple(reversed(sz)))

    def chunk(self, i: int) -> Chunk:
        """The chunk record of cell ``i`` (O(ndim))."""
        box = self.box(i)
        nb = box.numel * self.itemsize
        br, blocks = 0, ()
        if self.block_rows is not None and self.block_rows[i]:
            if self._block_start is None:
                n = np.where(self.block_rows > 0, -(-self.rows() // np.maximum(self.block_rows, 1)), 0)
                self._block_start = np.concatenate(([0], np.cumsum(n)))
            br = int(self.block_rows[i])
            a, b = int(self._block_start[i]), int(self._block_start[i + 1])
            blocks = tuple(self.block_checksums[16 * k : 16 * k + 16] for k in range(a, b))
        return Chunk(box, self.files[int(self.file[i])], grid_key(self.fqn, box.offsets), int(self.offset[i]), nb,
                     self.checksums[16 * i : 16 * i + 16], br, blocks)

    def to_json(self, file_names: Sequence[str] | None = None) -> dict:
        """The grid's JSON, its file indices into ``file_names`` (the manifest's sorted
        file names; default: the table it was built with)."""
        if file_names is not None and file_names is not self.files and list(file_names) != list(self.files):
            pos = {f: i for i, f in enumerate(file_names)}
            remap = np.array([pos.get(f, -1) for f in self.files], dtype=np.int64)
            if (remap[self.file] < 0).any():
                raise ValueError(f"{self.fqn}: a chunk's file is not among the manifest's files")
            self.file, self.files, self._json = remap[self.file], file_names, None
        if self._json is None:
            out = {
                "cuts": [c.tolist() for c in self.cuts],
                "file": _b64(self.file, "<u4"),
                "offset": _b64(self.offset, "<u8"),
                "checksum": self.checksums,
            }
            if self.block_rows is not None and self.block_rows.any():
                out["block_rows"] = _b64(self.block_rows, "<u8")
                out["block_checksums"] = self.block_checksums
            self._json = out
        return self._json

    @classmethod
    def from_chunks(cls, fqn: str, shape: Sequence[int], itemsize: int, chunks: Sequence[Chunk],
                    file_names: Sequence[str] | None = None) -> "ChunkGrid | None":
        """The grid ``chunks`` form, or None (fewer than two chunks, not a product grid,
        a key that is not the grid's rule, a file not in ``file_names``): then the
        manifest lists them one by one. ``file_names``: the manifest's, sorted (default:
        the chunks' own files)."""
        n, nd = len(chunks), len(shape)
        if n < 2 or nd == 0:
            return None
        offs = np.fromiter((o for c in chunks for o in c.box.offsets), dtype=np.int64, count=n * nd).reshape(n, nd)
        sizes = np.fromiter((x for c in chunks for x in c.box.sizes), dtype=np.int64, count=n * nd).reshape(n, nd)
        found = grid_cells(shape, offs, sizes)
        if found is None:
            return None
        cuts, flat = found
        order = np.empty(n, dtype=np.int64)
        order[flat] = np.arange(n)
        cs = [chunks[i] for i in order.tolist()]
        if any(c.key != grid_key(fqn, c.box.offsets) for c in cs):
            return None
        files = sorted({c.file for c in cs}) if file_names is None else file_names
        at = {f: i for i, f in enumerate(files)}
        if any(c.file not in at for c in cs):
            return None
        blocks = any(c.block_rows for c in cs)
        return cls(
            fqn, cuts, files,
            np.fromiter((at[c.file] for c in cs), dtype=np.int64, count=n),
            np.fromiter((c.offset for c in cs), dtype=np.int64, count=n),
            "".join(c.checksum for c in cs), itemsize,
            np.fromiter((c.block_rows for c in cs), dtype=np.int64, count=n) if blocks else None,
            "".join(x for c in cs for x in c.block_checksums) if blocks else "",
        )


def _b64(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


class TensorEntry:
    """A logical tensor: where it sits in the nested state, its dtype, shape and chunks.

    The chunks are a list, or a :class:`ChunkGrid` (``grid``) expanded into that list only
    when ``chunks`` is asked for; ``chunk(i)`` and ``iter_chunks`` do not expand it. An
    entry built from a list is written in the grid form when its chunks form one.
    """

    def __init__(self, path: list, dtype: str, shape: Sequence[int], chunks: list[Chunk] | None = None, *, grid: ChunkGrid | None = None):
        self.path = path
        self.dtype = dtype
        self.shape = tuple(shape)
        self.grid = grid
        self._chunks = [] if chunks is None and grid is None else chunks

    @property
    def chunks(self) -> list[Chunk]:
        if self._chunks is None:
            self._chunks = [self.grid.chunk(i) for i in range(len(self.grid))]
        return self._chunks

    @chunks.setter
    def chunks(self, value: list[Chunk]) -> None:
        self._chunks, self.grid = value, None

    @property
    def nchunks(self) -> int:
        return len(self.grid) if self._chunks is None else len(self._chunks)

    def chunk(self, i: int) -> Chunk:
        """Chunk ``i`` of the list (a grid's cell ``i``), without expanding a grid."""
        return self.grid.chunk(i) if self._chunks is None else self._chunks[i]

    def iter_chunks(self, files: "set[str] | None" = None) -> Iterator[Chunk]:
        """The chunks (only those stored in ``files``, if given), in list order."""
        if self._chunks is not None:
            yield from (c for c in self._chunks if files is None or c.file in files)
            return
        g = self.grid
        keep = np.ones(len(g), dtype=bool)
        if files is not None:
            # g.files is sorted: find the few wanted names, not all names in the set.
            idx = [i for f in files if (i := bisect.bisect_left(g.files, f)) < len(g.files) and g.files[i] == f]
            keep = np.isin(g.file, idx)
        for i in np.nonzero(keep)[0].tolist():
            yield g.chunk(i)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorEntry):
            return NotImplemented
        return (self.path, self.dtype, self.shape, self.chunks) == (other.path, other.dtype, other.shape, other.chunks)

    def __repr__(self) -> str:
        how = f"grid={self.grid.counts}" if self._chunks is None else f"chunks={len(self._chunks)}"
        return f"TensorEntry(path={self.path!r}, dtype={self.dtype!r}, shape={self.shape}, {how})"

    def to_json(self, grids: bool = True, file_names: Sequence[str] | None = None) -> dict:
        """The entry's JSON; ``grids=False`` lists the chunks one by one even if they form
        a grid. ``file_names``: the manifest's sorted file names, which a grid indexes."""
        out = {"path": self.path, "dtype": self.dtype, "shape": list(self.shape)}
        g = None
        if grids:
            # A grid read from a manifest stays its own encoding (even once expanded).
            g = self.grid if self.grid is not None else ChunkGrid.from_chunks(
                fqn_of(self.path), self.shape, dtypes.itemsize(self.dtype), self._chunks, file_names)
        if g is not None:
            out["grid"] = g.to_json(file_names)
        else:
            out["chunks"] = [c.to_json() for c in self.chunks]
        return out


@dataclass
class PlainEntry:
    """A JSON value at ``path`` in the nested state."""

    path: list
    value: Any

    def to_json(self) -> dict:
        return {"path": self.path, "value": self.value}


@dataclass
class Manifest:
    """The whole manifest. ``files`` maps each data file to its size in bytes."""

    tensors: dict[str, TensorEntry]
    plain: dict[str, PlainEntry]
    files: dict[str, int]
    step: int | None = None
    created: str = ""
    library: str = ""
    world_size: int = 1
    extra: dict = field(default_factory=dict)
    # xxh3-64 of the bytes this manifest was parsed from ("" if built in memory): ranks
    # compare it to agree they read one manifest, without serialising it again.
    source_digest: str = field(default="", compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data (logical, once per element)."""
        return sum(t.nbytes for t in self.tensors.values())

    def to_json(self, grids: bool = True) -> dict:
        """The manifest's JSON; ``grids=False`` writes no grid form (version 1, which
        older readers read), listing every chunk."""
        names = sorted(self.files)
        tensors = {k: v.to_json(grids, names) for k, v in self.tensors.items()}
        return {
            "format": FORMAT_ID,
            # Version 1 unless a tensor is grid-encoded: readers of version 1 still read
            # every checkpoint that does not need the grid form.
            "version": GRID_VERSION if any("grid" in t for t in tensors.values()) else 1,
            "step": self.step,
            "created": self.created,
            "library": self.library,
            "world_size": self.world_size,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "files": dict(sorted(self.files.items())),
            "tensors": tensors,
            "plain": {k: v.to_json() for k, v in self.plain.items()},
            "extra": self.extra,
        }

    def dumps(self, grids: bool = True) -> bytes:
        """The manifest file's bytes, ending in the checksum of the manifest itself.

        Tensors whose chunks form a grid are written in the grid form (then the manifest
        is version 2) unless ``grids`` is False.

        The checksum is the xxh3-64 of these very bytes with its own 16 hex digits read
        as zeros, so a flipped dtype, shape or plain value is caught on open even though
        it parses (see ``docs/format.md``).
        """
        doc = self.to_json(grids)
        # Two marks, so no single flipped byte can turn the check off: renaming either key
        # leaves the other one demanding the checksum.
        doc["sealed"] = True
        doc[MANIFEST_CHECKSUM] = _PLACEHOLDER
        # allow_nan: Python floats such as inf/nan in plain state must survive a round trip.
        # Compact: the C encoder (indent= falls back to the pure-Python one, 5x slower: 8 ms per
        # save of a 240 MiB model on the training box). `outlast inspect` is the readable view.
        data = json.dumps(doc, separators=(",", ":"), allow_nan=True).encode()
        at = data.rindex(_PLACEHOLDER.encode())
        digest = xxhash.xxh3_64_hexdigest(data).encode()
        return data[:at] + digest + data[at + 16:]

    @classmethod
    def loads(cls, data: bytes, where: str) -> "Manifest":
        """Parse and validate manifest bytes; ``where`` names the file in errors.

        Raises CorruptCheckpointError for anything malformed (never IndexError,
        OverflowError, RecursionError or MemoryError), UnsupportedFormatError for a newer
        format version.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"{where} is {len(data)} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit for a "
                "manifest; it is not an outlast manifest or it is damaged"
            )
        try:
            raw = json.loads(data, object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as e:
            raise CorruptCheckpointError(
                f"{where} is malformed: the key {e.args[0]!r} appears twice in one object, so readers "
                "could disagree about its value. The checkpoint cannot be trusted; use an older one."
            ) from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise CorruptCheckpointError(
                f"{where} is not valid JSON ({why}); the checkpoint is damaged: "
                "restore it from another copy or use an older checkpoint"
            ) from None
        if isinstance(raw, dict) and (MANIFEST_CHECKSUM in raw or "sealed" in raw):
            # A newer version may checksum differently: say "upgrade" before "damaged".
            _check_version(raw, where)
            if raw.get("sealed") is not True or MANIFEST_CHECKSUM not in raw:
                raise CorruptCheckpointError(
                    f"{where} is damaged: it must carry both 'sealed': true and its "
                    f"{MANIFEST_CHECKSUM!r}, and one of them is missing or altered. Use an older "
                    "checkpoint or restore this one from another copy."
                )
            _check_self_checksum(data, raw[MANIFEST_CHECKSUM], where)
        try:
            m = cls.from_json(raw, where)
            m.source_digest = xxhash.xxh3_64_hexdigest(data)
            return m
        except (CorruptCheckpointError, UnsupportedFormatError):
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError, MemoryError) as e:
            # The validator should have refused it by name; never let a parser fault escape raw.
            raise CorruptCheckpointError(
                f"{where} is malformed ({type(e).__name__}: {e}). The checkpoint cannot be trusted; "
                "use an older checkpoint or restore this one from another copy."
            ) from e

    @classmethod
    def from_json(cls, raw: Any, where: str) -> "Manifest":
        v = _Validator(where)
        v.check(isinstance(raw, dict), "", "the manifest must be a JSON object")
        _check_version(raw, where)
        v.version = raw["version"]
        files = v.obj(raw, "files")
        for name, size in files.items():
            v.check(_safe_rel(name), f"files.{name}", "must be a relative path inside the checkpoint")
            v.check(_is_int(size) and size >= 0, f"files.{name}", "size must be a non-negative integer")
        step = raw.get("step")
        v.check(step is None or _is_int(step), "step", "must be an integer or null")
        ws = raw.get("world_size", 1)
        v.check(_is_int(ws) and ws >= 1, "world_size", "must be a positive integer")
        tensors_raw, plain_raw = v.obj(raw, "tensors"), v.obj(raw, "plain")
        # A list index [i] in a path must name an element that exists: each element holds
        # at least one entry, so i < entries. (A crafted [10**12] would build a huge list.)
        v.max_index = len(tensors_raw) + len(plain_raw)
        v.file_names = sorted(files)
        tensors: dict[str, TensorEntry] = {}
        for fqn, t in tensors_raw.items():
            tensors[fqn] = v.tensor(fqn, t, files)
        plain: dict[str, PlainEntry] = {}
        for fqn, p in plain_raw.items():
            v.check(isinstance(p, dict) and "value" in p, f"plain.{fqn}", "must be an object with a value")
            v.check(fqn not in tensors, f"plain.{fqn}", "names a tensor too; every name must be unique")
            plain[fqn] = PlainEntry(v.path(f"plain.{fqn}", p.get("path"), fqn), p["value"])
        v.unique_keys(tensors)
        v.tree([(f"tensors.{k}", e.path) for k, e in tensors.items()] + [(f"plain.{k}", e.path) for k, e in plain.items()])
        extra = raw.get("extra", {})
        v.check(isinstance(extra, dict), "extra", "must be an object")
        return cls(
            tensors=tensors,
            plain=plain,
            files=dict(files),
            step=step,
            created=str(raw.get("created", "")),
            library=str(raw.get("library", "")),
            world_size=ws,
            extra=extra,
        )


def _check_version(raw: dict, where: str) -> None:
    v = _Validator(where)
    fmt = raw.get("format")
    v.check(fmt == FORMAT_ID, "format", f"expected {FORMAT_ID!r}, got {fmt!r}")
    version = raw.get("version")
    v.check(_is_int(version), "version", "must be an integer")
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where} uses outlast format version {version} (written by "
            f"{raw.get('library', 'an unknown library')}); this outlast reads versions up to "
            f"{FORMAT_VERSION}. Upgrade outlast (pip install -U outlast) to read it."
        )
    v.check(version >= 1, "version", f"unknown version {version}")


_LEAF = object()


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _check_self_checksum(data: bytes, want: Any, where: str) -> None:
    # The digest is the last string in the file: only '"', white space and '}' follow it.
    ok = isinstance(want, str) and len(want) == 16
    at = data.rfind(want.encode()) if ok else -1
    if at < 0 or data[at + 16:].strip(b' \t\r\n"}') or data[at + 16:at + 17] != b'"':
        raise CorruptCheckpointError(
            f"{where} is malformed: field {MANIFEST_CHECKSUM!r} must be the last field, a 16-digit "
            "hex string. The checkpoint cannot be trusted; use an older checkpoint."
        )
    h = xxhash.xxh3_64()  # streamed over views: no copy of a manifest of 100+ MB
    view = memoryview(data)
    h.update(view[:at])
    h.update(_PLACEHOLDER.encode())
    h.update(view[at + 16:])
    got = h.hexdigest()
    if got != want:
        raise CorruptCheckpointError(
            f"checksum mismatch in {where}: the manifest itself is damaged (expected {want}, got "
            f"{got}), so no dtype, shape or value in it can be trusted. Use an older checkpoint or "
            "restore this one from another copy."
        )


def _is_hex16(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 16 and all(ch in "0123456789abcdef" for ch in x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _safe_rel(name: Any) -> bool:
    # Data files must stay inside the checkpoint: a hostile manifest must not make
    # outlast read /etc/passwd or ../../other-checkpoint.
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")):
        return False
    parts = name.replace("\\", "/").split("/")
    return all(p not in ("", ".", "..") for p in parts)


class _Validator:
    def __init__(self, where: str):
        self.where = where

    def fail(self, fieldname: str, why: str) -> None:
        at = f" field {fieldname!r}" if fieldname else ""
        raise CorruptCheckpointError(
            f"{self.where} is malformed:{at} {why}. The checkpoint cannot be trusted; "
            "use an older checkpoint or restore this one from another copy."
        )

    def check(self, ok: bool, fieldname: str, why: str) -> None:
        if not ok:
            self.fail(fieldname, why)

    def obj(self, raw: dict, key: str) -> dict:
        val = raw.get(key)
        self.check(isinstance(val, dict), key, "missing or not an object")
        return val

    def ints(self, fieldname: str, val: Any) -> tuple[int, ...]:
        self.check(
            isinstance(val, list) and all(_is_int(x) and x >= 0 for x in val),
            fieldname,
            "must be a list of non-negative integers",
        )
        self.check(len(val) <= MAX_NDIM, fieldname, f"has {len(val)} dimensions, more than {MAX_NDIM}")
        self.check(all(x <= MAX_DIM for x in val), fieldname, f"holds a value above {MAX_DIM}")
        return tuple(val)

    def path(self, fieldname: str, val: Any, fqn: str) -> list:
        ok = isinstance(val, list) and 1 <= len(val) <= 1024 and all(
            isinstance(p, str) or _is_int(p) or (isinstance(p, list) and len(p) == 1 and _is_int(p[0]))
            for p in val
        )
        self.check(ok, f"{fieldname}.path", "must be a non-empty list of keys")
        for p in val:
            if isinstance(p, list):
                self.check(0 <= p[0] < self.max_index, f"{fieldname}.path", f"list index {p[0]} is out of range")
        self.check(fqn_of(val) == fqn, f"{fieldname}.path", f"names {fqn_of(val)!r}, not the entry's name {fqn!r}")
        return val

    def tree(self, entries: list[tuple[str, list]]) -> None:
        """The paths must form one tree: no entry inside another, and below each node either
        list indices or dict keys, never both (else rebuilding the nested state fails)."""
        root: dict = {}
        kinds: dict[int, str] = {}
        for where, path in entries:
            node = root
            for depth, p in enumerate(path):
                kind = "list" if isinstance(p, list) else "dict"
                key = ("l", p[0]) if isinstance(p, list) else ("d", p)
                if kinds.setdefault(id(node), kind) != kind:
                    self.fail(f"{where}.path", f"mixes list indices and dict keys under {fqn_of(path[:depth]) or 'the root'!r}")
                last = depth == len(path) - 1
                child = node.get(key)
                if child is _LEAF or (last and child is not None):
                    self.fail(f"{where}.path", f"{fqn_of(path[: depth + 1])!r} is both a value and a container")
                if last:
                    node[key] = _LEAF
                else:
                    node = node.setdefault(key, {})

    def unique_keys(self, tensors: dict) -> None:
        seen: dict[tuple[str, str], str] = {}
        grids = {fqn: t.grid for fqn, t in tensors.items() if t.grid is not None}
        for fqn, t in tensors.items():
            if t.grid is not None:
                # A grid's keys are f"{fqn}#{digits and _}": they cannot repeat within the
                # grid (distinct offsets) nor match another grid's (the fqn is all before
                # the last '#'). Only a listed chunk can take one: checked below.
                continue
            for c in t.chunks:
                other = seen.setdefault((c.file, c.key), fqn)
                if other is not fqn:
                    self.fail(f"tensors.{fqn}", f"chunk key {c.key!r} in {c.file} is used twice (also by {other!r})")
                owner, _, cell = c.key.rpartition("#")
                g = grids.get(owner)
                if g is not None and cell and not cell.strip("0123456789_"):
                    i = _grid_cell_of(g, cell)
                    if i is not None and g.files[int(g.file[i])] == c.file:
                        self.fail(f"tensors.{fqn}", f"chunk key {c.key!r} in {c.file} is used twice (also by {owner!r})")

    max_index = 0
    version = 1
    file_names: list = []
    file_sizes = None

    def grid(self, fqn: str, g: Any, shape: tuple, item: int, files: dict) -> ChunkGrid:
        """A grid-encoded chunk list, checked as strictly as a listed one, with numpy."""
        at = f"tensors.{fqn}.grid"
        self.check(self.version >= GRID_VERSION, at, f"needs format version {GRID_VERSION} or later, the manifest says {self.version}")
        self.check(isinstance(g, dict), at, "must be an object")
        self.check(len(shape) >= 1 and math.prod(shape) > 0, at, f"a tensor of shape {list(shape)} cannot be a grid: list its chunks")
        cuts_raw = g.get("cuts")
        self.check(isinstance(cuts_raw, list) and len(cuts_raw) == len(shape), f"{at}.cuts", f"must be {len(shape)} lists, one per dimension")
        cuts = []
        for d, c in enumerate(cuts_raw):
            # type(x) is int, for every x, in C: bools and floats are refused.
            self.check(isinstance(c, list) and len(c) >= 2 and set(map(type, c)) == {int}, f"{at}.cuts[{d}]", "must be a list of integers")
            try:
                a = np.array(c, dtype=np.int64)
            except OverflowError:
                a = None
            # Strictly increasing from 0 to the dim's size: the cells tile the tensor
            # (inside the shape, no overlap, no gap) by construction.
            self.check(a is not None and c[0] == 0 and c[-1] == shape[d] and bool((a[1:] > a[:-1]).all()), f"{at}.cuts[{d}]",
                       f"must rise strictly from 0 to the dimension's size {shape[d]}")
            cuts.append(a)
        n = math.prod(len(c) - 1 for c in cuts)
        names = self.file_names
        fidx = self.b64(f"{at}.file", g.get("file"), "<u4", n)
        self.check(bool((fidx < len(names)).all()), f"{at}.file", f"holds a file index past the {len(names)} files in 'files'")
        off = self.b64(f"{at}.offset", g.get("offset"), "<u8", n)
        self.check(bool((off <= MAX_DIM).all()), f"{at}.offset", f"holds a value above {MAX_DIM}")
        off = off.astype(np.int64)
        nbytes = ChunkGrid(fqn, cuts, names, fidx, off, "", item).nbytes()
        if self.file_sizes is None:  # sizes above 2**63 are no limit for ranges of <= 2**63 bytes
            self.file_sizes = np.array([min(files[f], 1 << 63) for f in names], dtype=np.uint64)
        sizes = self.file_sizes[fidx.astype(np.int64)]
        past = np.nonzero(off.astype(np.uint64) + nbytes.astype(np.uint64) > sizes)[0]
        if past.size:
            i = int(past[0])
            self.fail(f"{at}.offset", f"cell {i}'s byte range ends past the size of {names[int(fidx[i])]}")
        cs = g.get("checksum")
        self.check(_hex_run(cs, n), f"{at}.checksum", f"must be {n} 16-digit lowercase hex checksums, one string")
        br, bcs = None, ""
        if "block_rows" in g or "block_checksums" in g:
            br = self.b64(f"{at}.block_rows", g.get("block_rows"), "<u8", n)
            self.check(bool((br <= MAX_DIM).all()), f"{at}.block_rows", f"holds a value above {MAX_DIM}")
            br = br.astype(np.int64)
            rows = ChunkGrid(fqn, cuts, names, fidx, off, "", item).rows()
            nblocks = int(np.where(br > 0, -(-rows // np.maximum(br, 1)), 0).sum())
            bcs = g.get("block_checksums")
            self.check(_hex_run(bcs, nblocks), f"{at}.block_checksums", f"must be {nblocks} 16-digit lowercase hex checksums, one string")
        return ChunkGrid(fqn, cuts, names, fidx, off, cs, item, br, bcs)

    def b64(self, fieldname: str, val: Any, dtype: str, n: int) -> np.ndarray:
        """``n`` little-endian integers of ``dtype`` from a base64 string."""
        width = np.dtype(dtype).itemsize
        self.check(isinstance(val, str) and len(val) == 4 * -(-n * width // 3), fieldname,
                   f"must be base64 of {n} little-endian {8 * width}-bit integers")
        try:
            raw = base64.b64decode(val, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        self.check(len(raw) == n * width, fieldname, f"must be base64 of {n} little-endian {8 * width}-bit integers")
        return np.frombuffer(raw, dtype=dtype)

    def tensor(self, fqn: str, t: Any, files: dict) -> TensorEntry:
        at = f"tensors.{fqn}"
        self.check(isinstance(t, dict), at, "must be an object")
        dt = t.get("dtype")
        self.check(isinstance(dt, str) and dtypes.known(dt), f"{at}.dtype", f"unknown dtype {dt!r}")
        shape = self.ints(f"{at}.shape", t.get("shape"))
        item = dtypes.itemsize(dt)
        self.check(math.prod(shape) * item <= MAX_NBYTES, f"{at}.shape", f"{list(shape)} is impossibly large")
        if "grid" in t:
            self.check("chunks" not in t, at, "has both 'chunks' and 'grid'; a tensor lists its chunks one way")
            g = self.grid(fqn, t["grid"], shape, item, files)
            return TensorEntry(self.path(at, t.get("path"), fqn), dt, shape, grid=g)
        chunks_raw = t.get("chunks")
        self.check(isinstance(chunks_raw, list), f"{at}.chunks", "must be a list")
        chunks = []
        for i, c in enumerate(chunks_raw):
            # Most chunks are well formed: check them without building any message (a manifest
            # of 1.9 million chunks took ~27 us each through the path below). Anything the fast
            # check does not accept goes through the full one, which either accepts it too or
            # raises the error naming the field.
            ch = _chunk_if_valid(c, shape, item, files)
            if ch is not None:
                chunks.append(ch)
                continue
            cat = f"{at}.chunks[{i}]"
            self.check(isinstance(c, dict), cat, "must be an object")
            offs = self.ints(f"{cat}.offsets", c.get("offsets"))
            sizes = self.ints(f"{cat}.sizes", c.get("sizes"))
            self.check(len(offs) == len(shape) == len(sizes), cat, "offsets/sizes rank differs from shape")
            box = Box(offs, sizes)
            self.check(box.within(shape), cat, f"region {offs}+{sizes} lies outside shape {list(shape)}")
            f = c.get("file")
            self.check(isinstance(f, str) and f in files, f"{cat}.file", f"names a file {f!r} not listed in 'files'")
            self.check(isinstance(c.get("key"), str) and c["key"] != "", f"{cat}.key", "must be a non-empty string")
            off, nb = c.get("offset"), c.get("nbytes")
            self.check(_is_int(off) and off >= 0, f"{cat}.offset", "must be a non-negative integer")
            self.check(_is_int(nb) and nb == box.numel * item, f"{cat}.nbytes", "does not match the region size")
            self.check(off + nb <= files[f], cat, f"byte range ends past the size of {f}")
            cs = c.get("checksum")
            self.check(_is_hex16(cs), f"{cat}.checksum", "must be a 16-digit lowercase hex string")
            br, bcs = c.get("block_rows", 0), c.get("block_checksums", [])
            if br or "block_checksums" in c:
                rows = sizes[0] if sizes else 0
                self.check(_is_int(br) and 1 <= br and rows >= 1, f"{cat}.block_rows", "must be a positive integer for a chunk with rows")
                self.check(
                    isinstance(bcs, list) and len(bcs) == -(-rows // br) and all(_is_hex16(x) for x in bcs),
                    f"{cat}.block_checksums",
                    f"must be {-(-rows // max(1, br if _is_int(br) else 1))} 16-digit hex strings",
                )
            chunks.append(Chunk(box, f, c["key"], off, nb, cs, br or 0, tuple(bcs) if br else ()))
        # An empty tensor's chunk must be its full box, so the shard header pins its shape.
        self.check(
            math.prod(shape) > 0 or all(c.box == Box.full(shape) for c in chunks),
            f"{at}.chunks", f"a tensor of shape {list(shape)} has no elements: its chunk must be the whole tensor",
        )
        # Structural, not arithmetic: the chunks must tile the tensor (no overlap, no gap).
        fault = tiling_fault(shape, [c.box for c in chunks])
        self.check(fault is None, at, f"chunks do not tile shape {list(shape)}: {fault}")
        return TensorEntry(self.path(at, t.get("path"), fqn), dt, shape, chunks)


def _hex_run(x: Any, n: int) -> bool:
    """``x`` is ``n`` 16-digit lowercase hex numbers, written one after another."""
    if type(x) is not str or len(x) != 16 * n or not x.isascii():
        return False
    a = np.frombuffer(x.encode("ascii"), dtype=np.uint8)
    return bool((((a >= 48) & (a <= 57)) | ((a >= 97) & (a <= 102))).all())


def _grid_cell_of(g: ChunkGrid, cell: str) -> int | None:
    """The flat cell of ``g`` whose offsets ``cell`` spells ("3_0"), or None."""
    parts = cell.split("_")
    if len(parts) != len(g.cuts) or not all(parts):
        return None
    idx = []
    for c, p in zip(g.cuts, parts):
        if len(p) > 20 or str(int(p)) != p:
            return None
        k = int(np.searchsorted(c[:-1], int(p)))
        if k >= len(c) - 1 or int(c[k]) != int(p):
            return None
        idx.append(k)
    return int(np.ravel_multi_index(idx, g.counts))


def _hex16(x: Any) -> bool:
    return type(x) is str and len(x) == 16 and not x.strip("0123456789abcdef")


def _chunk_if_valid(c: Any, shape: tuple, item: int, files: dict) -> "Chunk | None":
    """The chunk ``c`` describes if it passes every check of ``_Validator.tensor``'s chunk loop;
    None for anything else (the caller then runs that loop, which names the fault). Stricter
    than or equal to that loop on every field, never looser."""
    if type(c) is not dict:
        return None
    offs, sizes = c.get("offsets"), c.get("sizes")
    if type(offs) is not list or type(sizes) is not list or len(offs) != len(shape) or len(sizes) != len(shape):
        return None
    numel = 1
    for o, n, d in zip(offs, sizes, shape):
        if type(o) is not int or type(n) is not int or o < 0 or n < 0 or o + n > d:
            return None  # shape's dims are <= MAX_DIM already, so these are too
        numel *= n
    f, key, off, nb, cs = c.get("file"), c.get("key"), c.get("offset"), c.get("nbytes"), c.get("checksum")
    if type(f) is not str or f not in files or type(key) is not str or not key:
        return None
    if type(off) is not int or off < 0 or type(nb) is not int or nb != numel * item or off + nb > files[f]:
        return None
    if not _hex16(cs):
        return None
    br = c.get("block_rows", 0)
    bcs: tuple = ()
    if br or "block_checksums" in c:
        raw = c.get("block_checksums", [])
        rows = sizes[0] if sizes else 0
        if type(br) is not int or br < 1 or rows < 1 or type(raw) is not list or len(raw) != -(-rows // br):
            return None
        if not all(_hex16(x) for x in raw):
            return None
        bcs = tuple(raw)
    else:
        br = 0
    box = object.__new__(Box)  # offsets and sizes are checked above
    object.__setattr__(box, "offsets", tuple(offs))
    object.__setattr__(box, "sizes", tuple(sizes))
    return Chunk(box, f, key, off, nb, cs, br, bcs)


def fqn_of(path: list) -> str:
    """The dotted name of a path: ``["optim", "state", 0, "exp_avg"] -> "optim.state.0.exp_avg"``."""
    return ".".join(str(p[0]) if isinstance(p, list) else str(p) for p in path)

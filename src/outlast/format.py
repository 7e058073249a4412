"""The checkpoint format, version 1: the manifest schema and its validation.

A checkpoint is a directory holding ``manifest.json`` (the commit point, written last)
and ``data/*.safetensors`` files. The manifest names every logical tensor (dtype, global
shape) and its chunks: a region (box) of the tensor, the file and safetensors key holding
it, the byte range and an xxh3-64 checksum of those bytes. Plain values are JSON in the
manifest. Nothing is pickled. ``docs/format.md`` is the human specification; this module
is the executable one, and it treats every manifest as hostile input: anything malformed
raises :class:`~outlast.errors.CorruptCheckpointError` or
:class:`~outlast.errors.UnsupportedFormatError` naming the checkpoint and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import xxhash

from . import dtypes
from .errors import CorruptCheckpointError, UnsupportedFormatError
from .regions import Box, tiling_fault

FORMAT_ID = "outlast.checkpoint"
FORMAT_VERSION = 1
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


@dataclass
class TensorEntry:
    """A logical tensor: where it sits in the nested state, its dtype, shape and chunks."""

    path: list
    dtype: str
    shape: tuple[int, ...]
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "chunks": [c.to_json() for c in self.chunks],
        }


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

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data (logical, once per element)."""
        return sum(t.nbytes for t in self.tensors.values())

    def to_json(self) -> dict:
        return {
            "format": FORMAT_ID,
            "version": FORMAT_VERSION,
            "step": self.step,
            "created": self.created,
            "library": self.library,
            "world_size": self.world_size,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "files": dict(sorted(self.files.items())),
            "tensors": {k: v.to_json() for k, v in self.tensors.items()},
            "plain": {k: v.to_json() for k, v in self.plain.items()},
            "extra": self.extra,
        }

    def dumps(self) -> bytes:
        """The manifest file's bytes, ending in the checksum of the manifest itself.

        The checksum is the xxh3-64 of these very bytes with its own 16 hex digits read
        as zeros, so a flipped dtype, shape or plain value is caught on open even though
        it parses (see ``docs/format.md``).
        """
        doc = self.to_json()
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
            return cls.from_json(raw, where)
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
    got = xxhash.xxh3_64_hexdigest(data[:at] + _PLACEHOLDER.encode() + data[at + 16:])
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

    max_index = 0

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
        for fqn, t in tensors.items():
            for c in t.chunks:
                other = seen.setdefault((c.file, c.key), fqn)
                if other is not fqn:
                    self.fail(f"tensors.{fqn}", f"chunk key {c.key!r} in {c.file} is used twice (also by {other!r})")

    def tensor(self, fqn: str, t: Any, files: dict) -> TensorEntry:
        at = f"tensors.{fqn}"
        self.check(isinstance(t, dict), at, "must be an object")
        dt = t.get("dtype")
        self.check(isinstance(dt, str) and dtypes.known(dt), f"{at}.dtype", f"unknown dtype {dt!r}")
        shape = self.ints(f"{at}.shape", t.get("shape"))
        item = dtypes.itemsize(dt)
        self.check(math.prod(shape) * item <= MAX_NBYTES, f"{at}.shape", f"{list(shape)} is impossibly large")
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

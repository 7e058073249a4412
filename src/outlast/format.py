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

from . import dtypes
from .errors import CorruptCheckpointError, UnsupportedFormatError
from .regions import Box

FORMAT_ID = "outlast.checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
CHECKSUM_ALGORITHM = "xxh3-64"

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
        # allow_nan: Python floats such as inf/nan in plain state must survive a round trip.
        return json.dumps(self.to_json(), indent=1, allow_nan=True).encode()

    @classmethod
    def loads(cls, data: bytes, where: str) -> "Manifest":
        """Parse and validate manifest bytes; ``where`` names the file in errors."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(
                f"{where} is not valid JSON ({e}); the checkpoint is damaged: "
                "restore it from another copy or use an older checkpoint"
            ) from None
        return cls.from_json(raw, where)

    @classmethod
    def from_json(cls, raw: Any, where: str) -> "Manifest":
        v = _Validator(where)
        v.check(isinstance(raw, dict), "", "the manifest must be a JSON object")
        fmt = raw.get("format")
        v.check(fmt == FORMAT_ID, "format", f"expected {FORMAT_ID!r}, got {fmt!r}")
        version = raw.get("version")
        v.check(isinstance(version, int) and not isinstance(version, bool), "version", "must be an integer")
        if version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{where} uses outlast format version {version} (written by "
                f"{raw.get('library', 'an unknown library')}); this outlast reads versions up to "
                f"{FORMAT_VERSION}. Upgrade outlast (pip install -U outlast) to read it."
            )
        v.check(version >= 1, "version", f"unknown version {version}")
        files = v.obj(raw, "files")
        for name, size in files.items():
            v.check(_safe_rel(name), f"files.{name}", "must be a relative path inside the checkpoint")
            v.check(_is_int(size) and size >= 0, f"files.{name}", "size must be a non-negative integer")
        step = raw.get("step")
        v.check(step is None or _is_int(step), "step", "must be an integer or null")
        ws = raw.get("world_size", 1)
        v.check(_is_int(ws) and ws >= 1, "world_size", "must be a positive integer")
        tensors: dict[str, TensorEntry] = {}
        for fqn, t in v.obj(raw, "tensors").items():
            tensors[fqn] = v.tensor(fqn, t, files)
        plain: dict[str, PlainEntry] = {}
        for fqn, p in v.obj(raw, "plain").items():
            v.check(isinstance(p, dict) and "value" in p, f"plain.{fqn}", "must be an object with a value")
            plain[fqn] = PlainEntry(v.path(f"plain.{fqn}", p.get("path")), p["value"])
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
        return tuple(val)

    def path(self, fieldname: str, val: Any) -> list:
        ok = isinstance(val, list) and len(val) >= 1 and all(
            isinstance(p, str) or _is_int(p) or (isinstance(p, list) and len(p) == 1 and _is_int(p[0]))
            for p in val
        )
        self.check(ok, f"{fieldname}.path", "must be a non-empty list of keys")
        return val

    def tensor(self, fqn: str, t: Any, files: dict) -> TensorEntry:
        at = f"tensors.{fqn}"
        self.check(isinstance(t, dict), at, "must be an object")
        dt = t.get("dtype")
        self.check(isinstance(dt, str) and dtypes.known(dt), f"{at}.dtype", f"unknown dtype {dt!r}")
        shape = self.ints(f"{at}.shape", t.get("shape"))
        chunks_raw = t.get("chunks")
        self.check(isinstance(chunks_raw, list), f"{at}.chunks", "must be a list")
        item = dtypes.itemsize(dt)
        chunks = []
        covered = 0
        for i, c in enumerate(chunks_raw):
            cat = f"{at}.chunks[{i}]"
            self.check(isinstance(c, dict), cat, "must be an object")
            offs = self.ints(f"{cat}.offsets", c.get("offsets"))
            sizes = self.ints(f"{cat}.sizes", c.get("sizes"))
            self.check(len(offs) == len(shape) == len(sizes), cat, "offsets/sizes rank differs from shape")
            box = Box(offs, sizes)
            self.check(box.within(shape), cat, f"region {offs}+{sizes} lies outside shape {list(shape)}")
            f = c.get("file")
            self.check(isinstance(f, str) and f in files, f"{cat}.file", f"names a file {f!r} not listed in 'files'")
            self.check(isinstance(c.get("key"), str), f"{cat}.key", "must be a string")
            off, nb = c.get("offset"), c.get("nbytes")
            self.check(_is_int(off) and off >= 0, f"{cat}.offset", "must be a non-negative integer")
            self.check(_is_int(nb) and nb == box.numel * item, f"{cat}.nbytes", "does not match the region size")
            self.check(off + nb <= files[f], cat, f"byte range ends past the size of {f}")
            cs = c.get("checksum")
            self.check(isinstance(cs, str) and len(cs) == 16, f"{cat}.checksum", "must be a 16-digit hex string")
            br, bcs = c.get("block_rows", 0), c.get("block_checksums", [])
            if br or "block_checksums" in c:
                rows = sizes[0] if sizes else 0
                self.check(_is_int(br) and 1 <= br and rows >= 1, f"{cat}.block_rows", "must be a positive integer for a chunk with rows")
                self.check(
                    isinstance(bcs, list) and len(bcs) == -(-rows // br) and all(isinstance(x, str) and len(x) == 16 for x in bcs),
                    f"{cat}.block_checksums",
                    f"must be {-(-rows // max(1, br if _is_int(br) else 1))} 16-digit hex strings",
                )
            covered += box.numel
            chunks.append(Chunk(box, f, c["key"], off, nb, cs, br or 0, tuple(bcs) if br else ()))
        self.check(
            covered == math.prod(shape) or (math.prod(shape) == 0),
            at,
            f"chunks cover {covered} of {math.prod(shape)} elements",
        )
        return TensorEntry(self.path(at, t.get("path")), dt, shape, chunks)


def fqn_of(path: list) -> str:
    """The dotted name of a path: ``["optim", "state", 0, "exp_avg"] -> "optim.state.0.exp_avg"``."""
    return ".".join(str(p[0]) if isinstance(p, list) else str(p) for p in path)

"""Mutations of a small checkpoint for fuzzing the reader (used by tests and bench/fuzz.py).

A case is one change to a pristine checkpoint: bytes of ``manifest.json`` flipped,
inserted or cut; one node of the manifest's JSON replaced, removed or duplicated and the
manifest re-sealed with a valid self-checksum (a crafted manifest); or bytes of a shard's
safetensors header changed. :func:`outcome` then opens and reads it, and says "refused"
(a :class:`~outlast.errors.CheckpointError`) or "exact" (every tensor bit-exact with the
original of its name, or of the entry it was renamed from). Anything else — another
exception, or data that is not exactly what was saved — raises ``AssertionError``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct

import torch

import outlast
from outlast.errors import CheckpointError

from state_helpers import add_grid_tensor, reseal_manifest


def pristine_state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "w": torch.randn(6, 5, generator=g),
            "b": torch.randn(5, generator=g).to(torch.bfloat16),
            "ids": torch.arange(7, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "scale": torch.tensor(2.5, dtype=torch.float16),
            "empty": torch.zeros(0, 3),
        },
        "layers": [torch.ones(2, dtype=torch.int8), {"bias": torch.full((3,), 0.5, dtype=torch.float64)}],
        "step": 7,
        "config": {"lr": 0.1, "name": "fuzz"},
    }


def make_pristine(path: str) -> dict:
    """Save the pristine state at ``path`` (two shard files), plus one tensor stored as a
    3 x 2 grid of chunks over three more files (so the manifest holds the grid form too);
    return what ``read`` gives back."""
    outlast.save(pristine_state(), path, step=7, num_writers=2)
    g = torch.Generator().manual_seed(1)
    add_grid_tensor(path, ["model", "grid"], torch.randn(7, 6, generator=g), [[0, 2, 5, 7], [0, 4, 6]])
    return outlast.read(path)


def _nodes(doc, at=()):
    """Every (path, value) in a JSON document, containers included."""
    yield at, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _nodes(v, at + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _nodes(v, at + (i,))


def _value(rnd: random.Random, old):
    choices = [
        None, True, False, 0, -1, 1, 2**31, 2**63, 10**30, 1.5, float("nan"), "", "x", "F32", "I8", "../x",
        "data/w00000.safetensors", [], [0], [-1], [1, 2], {}, {"a": 1},
    ]
    if isinstance(old, int) and not isinstance(old, bool):
        choices += [old + 1, old - 1, old * 2, old + 8, -old]
    if isinstance(old, list):
        choices += [old[:-1], old + old[-1:], list(reversed(old))]
    if isinstance(old, str) and old:
        choices += [old[:-1], old + "0", old.upper(), old[::-1]]
    return rnd.choice(choices)


def mutate_structure(doc: dict, rnd: random.Random) -> str:
    """Change one node of the manifest JSON in place; return a description."""
    nodes = [(p, v) for p, v in _nodes(doc) if p and p[0] != "manifest_checksum"]
    path, old = rnd.choice(nodes)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = rnd.choice(["replace", "replace", "delete", "duplicate"])
    if op == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, json.loads(json.dumps(parent[key])))
    elif op == "duplicate" and isinstance(parent, dict):
        parent[str(key) + "_copy"] = json.loads(json.dumps(parent[key]))
    else:
        parent[key] = _value(rnd, old)
    return f"{op} {'/'.join(map(str, path))}"


def mutate_bytes(data: bytes, rnd: random.Random) -> bytes:
    """Flip, insert, cut or overwrite a few bytes."""
    data = bytearray(data)
    for _ in range(rnd.randint(1, 3)):
        op = rnd.choice(["flip", "flip", "insert", "cut", "set"])
        i = rnd.randrange(max(1, len(data)))
        if op == "flip" and data:
            data[i] ^= 1 << rnd.randrange(8)
        elif op == "insert":
            data[i:i] = bytes([rnd.randrange(256)])
        elif op == "cut" and data:
            del data[i : i + rnd.randint(1, 8)]
        elif data:
            data[i] = rnd.choice(b' "{}[],:0123456789-eE.tfn\\\x00\xff')
    return bytes(data)


def apply_case(path: str, pristine_dir: str, rnd: random.Random) -> str:
    """Reset ``path`` to the pristine checkpoint, apply one random mutation, describe it."""
    if os.path.exists(path):
        shutil.rmtree(path)
    shutil.copytree(pristine_dir, path)
    mp = os.path.join(path, "manifest.json")
    kind = rnd.choice(["manifest-bytes", "manifest-struct", "manifest-struct", "header-bytes"])
    if kind == "manifest-bytes":
        with open(mp, "rb") as f:
            raw = f.read()
        with open(mp, "wb") as f:
            f.write(mutate_bytes(raw, rnd))
        return kind
    if kind == "manifest-struct":
        desc = []
        reseal_manifest(path, lambda doc: desc.append(mutate_structure(doc, rnd)))
        return f"{kind}: {desc[0]}"
    data_dir = os.path.join(path, "data")
    name = rnd.choice(sorted(os.listdir(data_dir)))
    p = os.path.join(data_dir, name)
    with open(p, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    with open(p, "wb") as f:
        f.write(mutate_bytes(raw[: 8 + n], rnd) + raw[8 + n :])
    return f"{kind}: {name}"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)) if a.numel() else (a.dtype == b.dtype and a.shape == b.shape)


def _tensors(tree, at=""):
    if isinstance(tree, torch.Tensor):
        yield at, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{at}.{k}" if at else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{at}.{i}" if at else str(i))


def outcome(path: str, original: dict, what: str) -> str:
    """Read the checkpoint at ``path``: "refused" or "exact"; AssertionError for a wrong load."""
    try:
        got = outlast.read(path)
    except CheckpointError:
        return "refused"
    except Exception as e:  # noqa: BLE001 - the point: nothing but CheckpointError may escape
        raise AssertionError(f"{what}: {type(e).__name__} escaped instead of a CheckpointError: {e}") from e
    want = dict(_tensors(original))
    values = list(want.values())
    for name, t in _tensors(got):
        if name in want:
            ok = _same(t, want[name])
        else:  # an entry renamed consistently (name and path): its data must still be one we saved
            ok = any(_same(t, v) for v in values)
        if not ok:
            raise AssertionError(f"{what}: WRONG LOAD: tensor {name!r} is not the data that was saved")
    return "exact"

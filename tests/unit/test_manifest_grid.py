"""The grid-encoded chunk list (manifest version 2): written whenever a tensor's chunks
form a product grid, read back to the same chunks, taken by the load planner as stored,
and validated as strictly as the per-chunk list (every fault refused by name)."""

import base64
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import outlast
from outlast import errors, grid, loading, shards
from outlast.format import Chunk, ChunkGrid, Manifest, TensorEntry, grid_cells, grid_key
from outlast.reader import CheckpointReader, ReadRequest
from outlast.regions import Box, tiling_fault

from state_helpers import add_grid_tensor, reseal_manifest

CUTS = [[0, 9, 20, 37], [0, 4, 10]]
FQN = "model.big"


def _raw(ckpt):
    with open(os.path.join(ckpt, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture()
def ckpt(tmp_path):
    path = str(tmp_path / "ck")
    state = {"model": {"small": torch.arange(6.0)}, "step": 3}
    outlast.save(state, path)
    big = torch.randn(37, 10, generator=torch.Generator().manual_seed(1))
    add_grid_tensor(path, ["model", "big"], big, CUTS)
    return path, big


def test_grid_form_is_written_and_reads_back(ckpt):
    path, big = ckpt
    raw = _raw(path)
    assert raw["version"] == 2
    t = raw["tensors"][FQN]
    assert "chunks" not in t and t["grid"]["cuts"] == CUTS
    assert "chunks" in raw["tensors"]["model.small"]  # one chunk: listed as before
    got = outlast.read(path)
    assert torch.equal(got["model"]["big"], big) and got["step"] == 3
    live = {"model": {"big": torch.zeros(37, 10), "small": torch.zeros(6)}}
    outlast.load(live, path)
    assert torch.equal(live["model"]["big"], big)
    with CheckpointReader(path) as r:
        assert r.verify() == []
        box = Box((5, 3), (20, 5))  # crosses cells in both dims
        dest = torch.zeros(20, 5)
        r.read_regions([ReadRequest(FQN, box, dest)])
        assert torch.equal(dest, big[5:25, 3:8])


def test_grid_chunks_equal_the_chunks_written(ckpt):
    path, _ = ckpt
    m = outlast.manifest_of(path)
    e = m.tensors[FQN]
    assert e.grid is not None and e.nchunks == 6
    one = e.chunk(4)  # no expansion needed for one chunk
    assert e._chunks is None
    cs = e.chunks
    assert cs[4] == one
    assert [c.box for c in cs] == [Box((a, b), (c - a, d - b)) for a, c in zip(CUTS[0], CUTS[0][1:]) for b, d in zip(CUTS[1], CUTS[1][1:])]
    assert all(c.key == grid_key(FQN, c.box.offsets) and c.nbytes == c.box.numel * 4 for c in cs)
    # The same entry written as a list of chunks encodes to the very same grid.
    again = TensorEntry(e.path, e.dtype, e.shape, list(reversed(cs))).to_json(file_names=sorted(m.files))
    assert again["grid"] == _raw(path)["tensors"][FQN]["grid"]


def test_the_load_planner_takes_the_stored_grid_without_detecting_it(ckpt, monkeypatch):
    path, _ = ckpt
    m = outlast.manifest_of(path)
    monkeypatch.setattr(grid, "stored_grid", lambda *a, **k: pytest.fail("grid detected from chunk boxes"))
    sg = loading.stored_grids(m, [FQN])[FQN]
    assert [c.tolist() for c in sg.cuts] == CUTS and sg.chunk.tolist() == list(range(6))


def test_row_block_checksums_in_the_grid_form(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_BLOCKS_FROM", 64)
    monkeypatch.setattr(shards, "_BLOCK_BYTES", 48)  # 3 rows of 4 floats per block
    path = str(tmp_path / "ck")
    outlast.save({"x": torch.zeros(1)}, path)
    big = torch.randn(20, 4, generator=torch.Generator().manual_seed(2))
    add_grid_tensor(path, ["big"], big, [[0, 7, 20], [0, 4]], writers=2)
    g = _raw(path)["tensors"]["big"]["grid"]
    assert np.frombuffer(base64.b64decode(g["block_rows"]), "<u8").tolist() == [3, 3]
    assert len(g["block_checksums"]) == 16 * (3 + 5)
    with CheckpointReader(path) as r:
        assert r.verify() == []
        c = r.manifest.tensors["big"].chunk(1)
        assert c.block_rows == 3 and len(c.block_checksums) == 5
        dest = torch.zeros(2, 4)
        stats = r.read_regions([ReadRequest("big", Box((10, 0), (2, 4)), dest)])
        assert torch.equal(dest, big[10:12]) and stats.bytes_read == 3 * 16  # one block, not the chunk
    # A flipped byte in the block read is caught by that block's checksum.
    with open(os.path.join(path, c.file), "r+b") as f:
        f.seek(c.offset + 16 * 3 + 1)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    with CheckpointReader(path) as r, pytest.raises(errors.CorruptCheckpointError, match="checksum mismatch"):
        r.read_regions([ReadRequest("big", Box((10, 0), (2, 4)), torch.zeros(2, 4))])


def _g(raw):
    return raw["tensors"][FQN]["grid"]


def _b64(values, dtype):
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode()


def _add_file(raw, name, size):
    # The grid's file indices point into the sorted names of 'files': a name there that
    # escapes the checkpoint is refused before any index is followed.
    raw["files"][name] = size


HOSTILE = {
    "grid_in_version_1": (lambda r: r.update(version=1), "needs format version 2"),
    "both_forms": (lambda r: r["tensors"][FQN].update(chunks=[]), "both 'chunks' and 'grid'"),
    "cuts_short_of_the_end": (lambda r: r["tensors"][FQN].update(shape=[38, 10]), "rise strictly from 0"),
    "cuts_not_rising": (lambda r: _g(r)["cuts"][0].__setitem__(1, 0), "rise strictly from 0"),
    "cuts_not_from_zero": (lambda r: _g(r)["cuts"][1].__setitem__(0, 1), "rise strictly from 0"),
    "cuts_wrong_rank": (lambda r: _g(r)["cuts"].pop(), "one per dimension"),
    "cuts_not_integers": (lambda r: _g(r)["cuts"][1].__setitem__(1, 4.0), "list of integers"),
    "file_escapes": (lambda r: _add_file(r, "../../etc/passwd", 10**6), "relative path inside"),
    "file_absolute": (lambda r: _add_file(r, "/etc/passwd", 10**6), "relative path inside"),
    "file_index_past": (lambda r: _g(r).update(file=_b64([0, 1, 2, 4, 0, 1], "<u4")), "file index past the 4 files"),
    "offset_past_file": (lambda r: _g(r).update(offset=_b64([0, 0, 0, 0, 0, 10**6], "<u8")), "past the size of"),
    "offset_huge": (lambda r: _g(r).update(offset=_b64([2**63] * 6, "<u8")), "above"),
    "offset_short": (lambda r: _g(r).update(offset=_b64([0] * 5, "<u8")), "base64 of 6"),
    "offset_not_base64": (lambda r: _g(r).update(offset="!" * len(_g(r)["offset"])), "base64 of 6"),
    "offset_a_list": (lambda r: _g(r).update(offset=[0] * 6), "base64 of 6"),
    "checksum_upper": (lambda r: _g(r).update(checksum=_g(r)["checksum"].upper()), "lowercase hex"),
    "checksum_short": (lambda r: _g(r).update(checksum=_g(r)["checksum"][:-16]), "6 16-digit"),
    "block_checksums_alone": (lambda r: _g(r).update(block_checksums=""), "block_rows"),
    "block_count_wrong": (lambda r: _g(r).update(block_rows=_b64([0, 0, 0, 0, 0, 5], "<u8"), block_checksums="0" * 16), "block_checksums"),
    "empty_tensor_grid": (lambda r: r["tensors"][FQN].update(shape=[0, 10]), "cannot be a grid"),
    "key_taken_by_a_listed_chunk": (
        lambda r: r["tensors"]["model.small"]["chunks"][0].update(
            key=f"{FQN}#0_0", file=sorted(r["files"])[int(np.frombuffer(base64.b64decode(_g(r)["file"]), "<u4")[0])]),
        "used twice"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_crafted_grids_are_refused_by_name(ckpt, name):
    path, _ = ckpt
    edit, fragment = HOSTILE[name]
    reseal_manifest(path, edit)
    for attempt in (lambda: outlast.read(path), lambda: outlast.load({"model": {"big": torch.zeros(37, 10)}}, path, strict=False)):
        with pytest.raises(errors.CorruptCheckpointError) as e:
            attempt()
        msg = str(e.value)
        assert fragment in msg and "manifest.json" in msg, msg
        # Names the tensor; a path that escapes is refused where 'files' lists it, by name.
        assert (FQN if name not in ("file_escapes", "file_absolute") else "etc/passwd") in msg, msg


def test_a_newer_version_says_upgrade(ckpt):
    path, _ = ckpt
    reseal_manifest(path, lambda r: r.update(version=3))
    with pytest.raises(errors.UnsupportedFormatError, match="Upgrade outlast"):
        outlast.read(path)


# --------------------------------------------------------------------------- properties

@st.composite
def grids(draw):
    nd = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 9)) for _ in range(nd))
    cuts = [sorted({0, n} | set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3)))) if n > 1 else [0, n] for n in shape]
    return shape, cuts


def _chunks(fqn, shape, cuts, item, files):
    out = []
    for idx in np.ndindex(*[len(c) - 1 for c in cuts]):
        lo = tuple(cuts[d][i] for d, i in enumerate(idx))
        sz = tuple(cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(idx))
        n = int(np.prod(sz)) * item
        f = files[len(out) % len(files)]
        out.append(Chunk(Box(lo, sz), f, grid_key(fqn, lo), 8 * len(out), n, f"{len(out):016x}"))
    return out


@settings(max_examples=150, deadline=None)
@given(g=grids(), seed=st.integers(0, 2**31))
def test_any_grid_round_trips_and_any_shuffle_encodes_the_same(g, seed):
    shape, cuts = g
    files = {"data/a.safetensors": 10**6, "data/b.safetensors": 10**6}
    cs = _chunks("t", shape, cuts, 4, sorted(files))
    rng = np.random.default_rng(seed)
    shuffled = [cs[i] for i in rng.permutation(len(cs))]
    m = Manifest({"t": TensorEntry(["t"], "F32", shape, shuffled)}, {}, files)
    raw = json.loads(m.dumps())
    assert ("grid" in raw["tensors"]["t"]) == (len(cs) > 1)
    back = Manifest.loads(m.dumps(), "m.json").tensors["t"]
    assert back.chunks == cs  # cell order: C order of the grid


@settings(max_examples=200, deadline=None)
@given(g=grids(), seed=st.integers(0, 2**31))
def test_grid_detection_accepts_only_boxes_that_tile(g, seed):
    """Boxes of a grid, one of them moved, grown or dropped: found a grid only if they tile."""
    shape, cuts = g
    boxes = [c.box for c in _chunks("t", shape, cuts, 1, ["f"])]
    rng = np.random.default_rng(seed)
    k = int(rng.integers(len(boxes)))
    how = int(rng.integers(4))
    b = boxes[k]
    if how == 0:
        boxes.pop(k)
    elif how == 1:
        boxes.append(b)
    elif how == 2:
        d = int(rng.integers(len(shape)))
        boxes[k] = Box(b.offsets, tuple(s + (i == d) for i, s in enumerate(b.sizes)))
    offs = np.array([x.offsets for x in boxes]).reshape(len(boxes), len(shape))
    sizes = np.array([x.sizes for x in boxes]).reshape(len(boxes), len(shape))
    found = grid_cells(shape, offs, sizes)
    tiles = all(x.within(shape) for x in boxes) and tiling_fault(shape, boxes) is None
    assert (found is not None) == tiles


def test_grid_encoding_is_compact():
    shape, cuts = (4096, 64), [list(range(0, 4097, 4)), [0, 32, 64]]
    files = {f"data/w{i:05d}.safetensors": 10**9 for i in range(256)}
    cs = _chunks("layers.0.mlp.w", shape, cuts, 2, sorted(files))
    grid_bytes = len(Manifest({"t": TensorEntry(["layers.0.mlp.w"], "BF16", shape, cs)}, {}, files).dumps())
    listed = len(json.dumps([c.to_json() for c in cs], separators=(",", ":")))
    assert grid_bytes * 3 < listed, (grid_bytes, listed)
    assert isinstance(ChunkGrid.from_chunks("layers.0.mlp.w", shape, 2, cs), ChunkGrid)


def test_a_read_manifest_writes_back_the_same_bytes_in_either_form(ckpt):
    path, _ = ckpt
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        data = f.read()
    m = Manifest.loads(data, "manifest.json")
    assert m.dumps() == data
    m.tensors[FQN].chunks  # expanded: still written as the grid it was read as
    assert m.dumps() == data
    old = m.dumps(grids=False)  # for readers of version 1
    assert json.loads(old)["version"] == 1 and "chunks" in json.loads(old)["tensors"][FQN]
    assert Manifest.loads(old, "m.json").tensors[FQN].chunks == m.tensors[FQN].chunks

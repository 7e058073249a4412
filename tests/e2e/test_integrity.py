"""Damaged checkpoints: every fault is detected, named precisely, and never loads wrong data."""

import errno
import json
import os

import pytest
import torch

import outlast
from outlast.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    UnsupportedFormatError,
)
from outlast.reader import CheckpointReader
from state_helpers import reseal_manifest


@pytest.fixture
def saved(ckpt_dir):
    state = {"model": {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10, 10)}, "step": 3}
    outlast.save(state, ckpt_dir, step=3, num_writers=2)
    return ckpt_dir, state


def chunk_of(path, fqn):
    return outlast.manifest_of(path).tensors[fqn].chunks[0]


def test_flipped_byte_is_caught_naming_file_and_tensor(saved):
    path, state = saved
    c = chunk_of(path, "model.a")
    with open(os.path.join(path, c.file), "r+b") as f:
        f.seek(c.offset + 123)
        byte = f.read(1)
        f.seek(c.offset + 123)
        f.write(bytes([byte[0] ^ 0x01]))
    live = {"model": {"a": torch.zeros(1000), "b": torch.zeros(10, 10)}}
    with pytest.raises(CorruptCheckpointError) as e:
        outlast.load(live, path)
    assert c.file in str(e.value) and "'model.a'" in str(e.value) and "checksum" in str(e.value)
    with pytest.raises(CorruptCheckpointError, match="model.a"):
        outlast.read(path)
    with CheckpointReader(path, check_files=False) as r:
        problems = r.verify()
    assert len(problems) == 1 and "model.a" in problems[0] and c.file in problems[0]
    # verify=False skips the check (documented): the flipped bit comes through.
    outlast.load(live, path, verify=False)
    assert not torch.equal(live["model"]["a"], state["model"]["a"])


def test_truncated_data_file(saved):
    path, _ = saved
    c = chunk_of(path, "model.a")
    full = os.path.join(path, c.file)
    os.truncate(full, c.offset + 10)
    with pytest.raises(CorruptCheckpointError, match="truncated") as e:
        outlast.read(path, keys="model.a")
    assert c.file in str(e.value)
    with CheckpointReader(path, check_files=False) as r:
        problems = r.verify()
    assert any("size is" in p and c.file in p for p in problems)


def test_deleted_data_file_names_what_it_held(saved):
    path, _ = saved
    c = chunk_of(path, "model.a")
    os.remove(os.path.join(path, c.file))
    with pytest.raises(CorruptCheckpointError, match="missing") as e:
        outlast.read(path)
    assert "model.a" in str(e.value)
    with CheckpointReader(path, check_files=False) as r:
        problems = r.verify()
    assert any("file missing" in p and "model.a" in p for p in problems)


def test_missing_manifest_is_incomplete(saved):
    path, _ = saved
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(IncompleteCheckpointError, match="incomplete"):
        outlast.read(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        outlast.load({}, str(tmp_path / "nope"))


def test_future_version_asks_to_upgrade(saved):
    path, _ = saved
    from outlast.format import FORMAT_VERSION

    reseal_manifest(path, lambda m: m.update(version=FORMAT_VERSION + 1))
    with pytest.raises(UnsupportedFormatError, match="Upgrade outlast"):
        outlast.read(path)


def test_hostile_safetensors_header_is_refused(saved):
    path, _ = saved
    c = chunk_of(path, "model.a")
    with open(os.path.join(path, c.file), "r+b") as f:
        f.write((2**62).to_bytes(8, "little"))  # absurd header length
    with CheckpointReader(path, check_files=False) as r:
        problems = r.verify()
    assert any("header length" in p for p in problems)


def test_disk_full_during_save_commits_nothing_and_keeps_the_old(monkeypatch, saved):
    path, state = saved
    import outlast.storage.local as local

    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd, data):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(local.os, "write", failing_write)
    with pytest.raises(StorageError, match="disk is full"):
        outlast.save({"model": {"a": torch.zeros(1000), "b": torch.zeros(10, 10)}}, path, overwrite=True, num_writers=1)
    monkeypatch.setattr(local.os, "write", real_write)
    back = outlast.read(path)
    assert torch.equal(back["model"]["a"], state["model"]["a"]) and back["step"] == 3
    parent = os.path.dirname(path)
    assert os.listdir(parent) == [os.path.basename(path)]  # the temporary directory is gone


def test_verify_checks_row_block_checksums(ckpt_dir):
    """Large chunks carry per-row-block checksums (used by partial loads); verify checks them."""
    import json

    outlast.save({"big": torch.randn(4096, 1024)}, ckpt_dir)  # 16 MiB: has row blocks
    chunk = json.load(open(os.path.join(ckpt_dir, "manifest.json")))["tensors"]["big"]["chunks"][0]
    assert chunk.get("block_checksums"), "a 16 MiB chunk should carry block checksums"
    with CheckpointReader(ckpt_dir) as r:
        assert r.verify() == []
    reseal_manifest(ckpt_dir, lambda m: m["tensors"]["big"]["chunks"][0]["block_checksums"].__setitem__(1, "0" * 16))
    with CheckpointReader(ckpt_dir) as r:
        problems = r.verify()
    assert len(problems) == 1 and "block checksum mismatch in row block(s) [1]" in problems[0] and "'big'" in problems[0]


def test_rows_listed_twice_and_rows_missing_is_refused(ckpt_dir):
    """The reported hole: rows 0:2 of a 4-row tensor listed twice (valid checksums), rows 2:4 in
    no chunk. Element counts add up; tiling does not. It used to read rows 2:4 as zeros."""
    outlast.save({"x": torch.arange(8.0).reshape(2, 4)}, ckpt_dir)

    def forge(m):
        t = m["tensors"]["x"]
        t["shape"] = [4, 4]
        t["chunks"] = [t["chunks"][0], dict(t["chunks"][0])]

    reseal_manifest(ckpt_dir, forge)
    for attempt in (lambda: outlast.read(ckpt_dir), lambda: outlast.load({"x": torch.zeros(4, 4)}, ckpt_dir)):
        with pytest.raises(CorruptCheckpointError, match="overlap") as e:
            attempt()
        assert "'tensors.x'" in str(e.value) and "manifest.json" in str(e.value)


def test_flipped_byte_in_the_manifest_is_caught(saved):
    """A bit flip that keeps the JSON valid (a shape digit) is caught by the manifest's checksum."""
    path, _ = saved
    mp = os.path.join(path, "manifest.json")
    raw = open(mp, "rb").read()
    flipped = raw.replace(b'"shape":[1000', b'"shape":[1001', 1)
    assert flipped != raw
    open(mp, "wb").write(flipped)
    with pytest.raises(CorruptCheckpointError, match="manifest itself is damaged") as e:
        outlast.read(path)
    assert mp in str(e.value)


@pytest.mark.parametrize("change,fragment", [
    (lambda h: h["model.a"].update(dtype="I32"), "safetensors header entry 'model.a'"),
    (lambda h: h["model.a"].update(shape=[10, 100]), "safetensors header entry 'model.a'"),
    (lambda h: h.update({"extra": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}), "hole or an overlap"),
])
def test_shard_header_disagreeing_with_the_manifest_is_refused_on_open(ckpt_dir, change, fragment):
    """Each data file's safetensors header is checked against the manifest when a checkpoint opens."""
    import struct

    outlast.save({"model": {"a": torch.arange(1000, dtype=torch.float32)}}, ckpt_dir, num_writers=1)
    c = chunk_of(ckpt_dir, "model.a")
    p = os.path.join(ckpt_dir, c.file)
    raw = open(p, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    new = struct.pack("<Q", len(head)) + head + raw[8 + n :]
    open(p, "wb").write(new)

    def follow(m):  # keep the manifest consistent with the new file, so only the header is wrong
        m["files"][c.file] = len(new)
        m["tensors"]["model.a"]["chunks"][0]["offset"] = 8 + len(head) + (c.offset - 8 - n)

    reseal_manifest(ckpt_dir, follow)
    with pytest.raises(CorruptCheckpointError) as e:
        outlast.read(ckpt_dir)
    assert fragment in str(e.value) and c.file in str(e.value)
    with pytest.raises(CorruptCheckpointError):
        CheckpointReader(ckpt_dir)
    with CheckpointReader(ckpt_dir, check_files=False) as r:  # verify still lists it
        assert any(fragment in p for p in r.verify())

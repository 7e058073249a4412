"""Staged shard files written with O_DIRECT: same bytes as the buffered writer, and a
fallback through the page cache where the filesystem refuses O_DIRECT."""

from __future__ import annotations

import errno
import os
import types

import pytest
import torch

import outlast
from outlast.checkpointer import step_dir_name
from outlast.engine import StagingBuffers, copy_into
from outlast.errors import StorageError
from outlast.storage import local as local_storage
from outlast.storage.local import DIRECT_ALIGN, aligned_buffer, write_file_image


@pytest.mark.parametrize("size", [0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, (3 << 20) + 17])
def test_write_file_image_writes_exactly_size_bytes(tmp_path, size):
    img = aligned_buffer(size)
    assert img.data_ptr() % DIRECT_ALIGN == 0 and img.numel() % DIRECT_ALIGN == 0 and img.numel() >= size
    img.copy_(torch.randint(0, 256, (img.numel(),), dtype=torch.uint8))
    p = str(tmp_path / "f")
    write_file_image(p, img, size)
    with open(p, "rb") as f:
        assert f.read() == img[:size].numpy().tobytes()


class _Os(types.ModuleType):
    """``os`` as the storage layer sees it, with O_DIRECT refused at ``where``."""

    def __init__(self, where: str):
        super().__init__("os")
        self.__dict__.update(os.__dict__)
        self.direct_writes = 0
        direct_fds: set = set()

        def open_(path, flags, mode=0o777):
            if flags & os.O_DIRECT and where == "open":
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            fd = os.open(path, flags, mode)
            if flags & os.O_DIRECT:
                direct_fds.add(fd)
            return fd

        def write(fd, data):
            import fcntl

            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                self.direct_writes += 1
                if where == "second-write" and self.direct_writes == 2:
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return os.write(fd, data)

        self.open = open_
        self.write = write


@pytest.mark.parametrize("where", ["open", "second-write"])
def test_write_file_image_falls_back_to_the_page_cache(tmp_path, monkeypatch, where):
    size = (150 << 20) + 123  # three 64 MiB writes: the second one is refused
    img = aligned_buffer(size)
    img[::4096].copy_(torch.arange(img[::4096].numel()).to(torch.uint8))
    fake = _Os(where)
    monkeypatch.setattr(local_storage, "os", fake)
    p = str(tmp_path / "f")
    assert write_file_image(p, img, size) is False
    monkeypatch.undo()
    assert os.path.getsize(p) == size
    with open(p, "rb") as f:
        assert f.read() == img[:size].numpy().tobytes()
    assert fake.direct_writes == (0 if where == "open" else 2)


def test_write_file_image_names_the_file_when_the_disk_is_full(tmp_path, monkeypatch):
    fake = _Os("none")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fake.write = full
    monkeypatch.setattr(local_storage, "os", fake)
    with pytest.raises(StorageError, match=r"writing .*/f failed.*disk is full"):
        write_file_image(str(tmp_path / "f"), aligned_buffer(10), 10)


def _odd_state():
    torch.manual_seed(0)
    base = torch.randn(7, 9, dtype=torch.float64)
    return {
        "big": torch.randn(3000, 1024),  # 12 MiB: has row-block checksums
        "half": torch.randn(5, 3).to(torch.bfloat16),
        "strided": base.t(),  # not contiguous
        "every_other": torch.arange(40, dtype=torch.int32)[::2],  # strided 1-D
        "scalar": torch.tensor(3, dtype=torch.int16),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "plain": {"pos": 7},
    }


def test_checkpointer_files_equal_a_synchronous_save(tmp_path):
    """The staged images (header, offsets, bytes, checksums) match what save() writes."""
    state = _odd_state()
    outlast.save(state, tmp_path / "sync", num_writers=2)
    with outlast.Checkpointer(tmp_path / "run", num_writers=2) as ckpt:
        ckpt.save(state, 5)
    got = tmp_path / "run" / step_dir_name(5)
    sync_m = outlast.manifest_of(tmp_path / "sync")
    got_m = outlast.manifest_of(got)
    assert sync_m.files == got_m.files and len(got_m.files) == 2
    for rel in got_m.files:
        assert (got / rel).read_bytes() == (tmp_path / "sync" / rel).read_bytes(), rel
    for fqn, entry in sync_m.tensors.items():
        assert [c.to_json() for c in got_m.tensors[fqn].chunks] == [c.to_json() for c in entry.chunks], fqn
    assert any(c.block_checksums for c in got_m.tensors["big"].chunks)
    back = outlast.read(got)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert back[k].dtype == v.dtype and torch.equal(back[k], v.resolve_conj()), k
    assert back["plain"] == {"pos": 7}


def test_staging_buffers_are_reused_until_the_layout_changes(tmp_path):
    a = {"w": torch.ones(1000), "v": torch.ones(10, dtype=torch.float16)}
    sb = StagingBuffers()
    p1 = outlast.prepare_save(a)
    v1 = sb.for_items(p1)
    assert sb.allocations == 1 and all(v.dtype == torch.uint8 for v in v1)
    assert all(img.data_ptr() % DIRECT_ALIGN == 0 for _, img in sb.images)
    sb.for_items(outlast.prepare_save({"w": torch.zeros(1000), "v": torch.zeros(10, dtype=torch.float16)}))
    assert sb.allocations == 1  # same layout, new values: same memory
    sb.for_items(outlast.prepare_save({"w": torch.zeros(1001), "v": torch.zeros(10, dtype=torch.float16)}))
    assert sb.allocations == 2


def test_copy_into_refuses_a_wrong_size_buffer():
    with pytest.raises(ValueError, match="16-byte"):
        copy_into(torch.empty(15, dtype=torch.uint8), torch.zeros(4))

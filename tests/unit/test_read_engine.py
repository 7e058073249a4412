"""Single-process reads run the distributed load's engine: partial rows, block checks, coalescing."""

import os

import pytest
import torch

import outlast
from outlast.errors import CorruptCheckpointError
from outlast.reader import CheckpointReader, ReadRequest
from outlast.regions import Box


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("big") / "ck")
    t = torch.randn(4096, 1024)  # 16 MiB: stored with row-block checksums
    outlast.save({"big": t, "small": torch.arange(10.0)}, path, num_writers=1)
    return path, t


def test_a_few_rows_read_only_their_checksum_blocks(big):
    path, t = big
    c = outlast.manifest_of(path).tensors["big"].chunks[0]
    assert c.block_rows and c.block_rows < 4096
    dest = torch.empty(3, 1024)
    with CheckpointReader(path) as r:
        stats = r.read_regions([ReadRequest("big", Box((100, 0), (3, 1024)), dest)])
    assert torch.equal(dest, t[100:103])
    assert stats.bytes_read == c.block_rows * 1024 * 4  # one block, not the 16 MiB chunk


def test_a_flip_outside_the_rows_read_is_not_needed_but_inside_is_caught(big, tmp_path):
    import shutil

    path, t = big
    copy = str(tmp_path / "ck")
    shutil.copytree(path, copy)
    c = outlast.manifest_of(copy).tensors["big"].chunks[0]
    row_bytes = 1024 * 4
    with open(os.path.join(copy, c.file), "r+b") as f:  # damage row 3000
        f.seek(c.offset + 3000 * row_bytes + 8)
        b = f.read(1)
        f.seek(c.offset + 3000 * row_bytes + 8)
        f.write(bytes([b[0] ^ 0x10]))
    with CheckpointReader(copy) as r:
        dest = torch.empty(3, 1024)
        r.read_regions([ReadRequest("big", Box((100, 0), (3, 1024)), dest)])  # other block: fine
        assert torch.equal(dest, t[100:103])
        with pytest.raises(CorruptCheckpointError, match=r"checksum mismatch .*rows 2048\.\.3072"):
            r.read_regions([ReadRequest("big", Box((2999, 0), (2, 1024)), torch.empty(2, 1024))])  # noqa: E501
        # verify=False means no checksum at all, on this path as on a distributed load
        r.read_regions([ReadRequest("big", Box((0, 0), (4096, 1024)), torch.empty(4096, 1024))], verify=False)


def test_whole_tensors_land_directly_and_adjacent_small_ones_coalesce(big):
    path, t = big
    got = outlast.read(path)
    assert torch.equal(got["big"], t) and torch.equal(got["small"], torch.arange(10.0))


def _odd_state():
    g = torch.Generator().manual_seed(3)
    # 33 MiB spans three 16 MiB bounce buffers; the odd sizes leave every later tensor unaligned
    return {"a": torch.randn(1027, generator=g), "big": torch.randn(33 * 1024 * 256 + 5, generator=g),
            "m": torch.randn(1001, 37, generator=g), "h": torch.randn(9, 3, generator=g).to(torch.bfloat16)}


def test_direct_io_reads_equal_buffered_ones_at_unaligned_offsets(tmp_path):
    import fcntl

    path = str(tmp_path / "ck")
    state = _odd_state()
    outlast.save(state, path, num_writers=1)
    with CheckpointReader(path, direct_io=True) as r:
        got = {k: r.read_tensor(k) for k in state}
        rows = torch.empty(5, 37)
        r.read_regions([ReadRequest("m", Box((997, 0), (4, 37)), rows[:4])])
        fds = dict(r._direct_fds)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert torch.equal(rows[:4], state["m"][997:1001])
    # the reads went through O_DIRECT descriptors
    assert fds and all(fd is not None for fd in fds.values())
    # (closed now; what matters is that they were opened with the flag: open one the same way)
    from outlast.storage.local import open_direct

    fd = open_direct(os.path.join(path, next(iter(fds))))
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)


def test_direct_io_still_checks_every_checksum_and_catches_a_short_file(tmp_path):
    from outlast.storage.local import open_direct, pread_direct_into

    path = str(tmp_path / "ck")
    state = _odd_state()
    outlast.save(state, path, num_writers=1)
    c = outlast.manifest_of(path).tensors["big"].chunks[0]
    f = os.path.join(path, c.file)
    with open(f, "r+b") as fh:
        fh.seek(c.offset + c.nbytes - 3)
        b = fh.read(1)
        fh.seek(c.offset + c.nbytes - 3)
        fh.write(bytes([b[0] ^ 0x10]))
    with CheckpointReader(path, direct_io=True) as r:
        with pytest.raises(CorruptCheckpointError, match="big"):
            r.read_tensor("big")
        assert torch.equal(r.read_tensor("a"), state["a"])
    # a file shorter than the bytes asked for is a corruption error naming it
    short = str(tmp_path / "short.bin")
    with open(short, "wb") as fh:
        fh.write(b"x" * 5000)
    fd = open_direct(short)
    try:
        buf = bytearray(3999)
        pread_direct_into(fd, memoryview(buf), 1001, short)  # unaligned start, crosses a page, ends at EOF
        assert bytes(buf) == b"x" * 3999
        with pytest.raises(CorruptCheckpointError, match="short.bin is truncated"):
            pread_direct_into(fd, memoryview(bytearray(4000)), 1001, short)
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["open", "read"])
def test_direct_io_falls_back_to_buffered_where_the_filesystem_refuses_it(tmp_path, monkeypatch, where):
    """A filesystem that refuses O_DIRECT (EINVAL when opening, as tmpfs did before Linux 6.6, or
    on the first read): the reader goes on through the page cache, file by file."""
    import outlast.storage.local as local

    path = str(tmp_path / "ck")
    state = _odd_state()
    outlast.save(state, path, num_writers=1)
    real_open, real_preadv, direct = os.open, os.preadv, set()

    def fake_open(p, flags, *a):
        if flags & os.O_DIRECT:
            if where == "open":
                raise OSError(22, "Invalid argument")
            fd = real_open(p, flags, *a)
            direct.add(fd)
            return fd
        return real_open(p, flags, *a)

    def fake_preadv(fd, bufs, off):
        if fd in direct:
            raise OSError(22, "Invalid argument")
        return real_preadv(fd, bufs, off)

    monkeypatch.setattr(local.os, "open", fake_open)
    monkeypatch.setattr(local.os, "preadv", fake_preadv)
    with CheckpointReader(path, direct_io=True) as r:
        assert all(torch.equal(r.read_tensor(k), v) for k, v in state.items())
        assert r._direct_fds and all(fd is None for fd in r._direct_fds.values())
        assert len(r._refused_fds) == (len(direct) if where == "read" else 0)

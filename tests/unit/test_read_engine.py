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

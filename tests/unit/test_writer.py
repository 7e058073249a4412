"""CheckpointWriter: streaming writes, file planning, atomic commit and abort."""

import os

import pytest
import torch

import outlast
from outlast.errors import CheckpointExistsError, IncompatibleStateError
from outlast.writer import CheckpointWriter, TensorSpec, plan_files


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 16, generator=g),
        "b": torch.randn(16, generator=g).to(torch.bfloat16),
        "ids": torch.arange(10),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
    }


def test_plan_files_fills_then_rolls_over():
    assert plan_files([4, 4, 4, 9, 1], 8) == [0, 0, 1, 2, 3]
    assert plan_files([], 8) == []
    assert plan_files([10], 1) == [0]


def test_stream_roundtrip_with_paths_plain_and_several_files(tmp_path):
    ts = _tensors()
    specs = [TensorSpec.of(f"model.{k}", v, ["model", k]) for k, v in ts.items()]
    with CheckpointWriter(tmp_path / "c", specs, step=7, plain={"step": 7, "cfg": {"lr": 0.1}}, max_file_bytes=1024) as w:
        assert w.next_fqn == "model.w"
        for k, v in ts.items():
            w.write(f"model.{k}", v)
    m = outlast.manifest_of(tmp_path / "c")
    assert m.step == 7 and len(m.files) == 2  # "w" (4 KiB) alone, then the small ones together
    back = outlast.read(tmp_path / "c")
    assert back["step"] == 7 and back["cfg"] == {"lr": 0.1}
    for k, v in ts.items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v)


def test_out_of_order_and_wrong_shape_are_refused(tmp_path):
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (3,))]
    w = CheckpointWriter(tmp_path / "c", specs)
    with pytest.raises(IncompatibleStateError, match="'b'.*out of order.*'a' is next"):
        w.write("b", torch.zeros(3))
    with pytest.raises(IncompatibleStateError, match="declared F32 \\[2\\], got F32 \\[5\\]"):
        w.write("a", torch.zeros(5))
    w.write("a", torch.zeros(2))
    with pytest.raises(IncompatibleStateError, match="never written: b"):
        w.commit()
    assert not os.path.exists(tmp_path / "c")
    assert os.listdir(tmp_path) == []  # the staging directory is gone too


def test_exception_in_with_block_leaves_nothing(tmp_path):
    specs = [TensorSpec("a", "F32", (2,))]
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "c", specs) as w:
            w.write("a", torch.zeros(2))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_existing_checkpoint_needs_overwrite(tmp_path):
    outlast.save({"x": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(CheckpointExistsError):
        CheckpointWriter(tmp_path / "c", [TensorSpec("x", "F32", (2,))])
    with CheckpointWriter(tmp_path / "c", [TensorSpec("x", "F32", (2,))], overwrite=True) as w:
        w.write("x", torch.full((2,), 5.0))
    assert torch.equal(outlast.read(tmp_path / "c")["x"], torch.full((2,), 5.0))


def test_large_tensors_get_row_block_checksums_like_a_save(tmp_path):
    """A streamed checkpoint carries the same per-row-block checksums as outlast.save."""
    import outlast
    from outlast import CheckpointWriter, TensorSpec
    from outlast.reader import CheckpointReader

    t = torch.randn(4096, 1024)
    with CheckpointWriter(str(tmp_path / "w"), [TensorSpec("big", "F32", (4096, 1024))]) as w:
        w.write("big", t)
    outlast.save({"big": t}, str(tmp_path / "s"))
    a = outlast.manifest_of(str(tmp_path / "w")).tensors["big"].chunks[0]
    b = outlast.manifest_of(str(tmp_path / "s")).tensors["big"].chunks[0]
    assert a.block_rows and (a.block_rows, a.block_checksums, a.checksum) == (b.block_rows, b.block_checksums, b.checksum)
    with CheckpointReader(str(tmp_path / "w")) as r:
        assert r.verify() == []

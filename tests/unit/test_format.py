"""The format pinned by golden files, and a folder of hostile manifests that must be refused."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

import outlast
from outlast import errors
from golden_state import golden_state

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(HERE, "golden", "v1")
HOSTILE = os.path.join(HERE, "hostile")


def test_golden_checkpoint_reads_back_the_golden_state():
    got = outlast.read(GOLDEN)
    want = golden_state()
    for k, t in want["model"].items():
        assert got["model"][k].dtype == t.dtype and torch.equal(got["model"][k], t), k
    assert isinstance(got["layers"], list)
    assert torch.equal(got["layers"][0], want["layers"][0])
    assert torch.equal(got["layers"][1]["bias"], want["layers"][1]["bias"])
    assert list(got["optim"]["state"]) == [0]  # int keys survive
    assert got["optim"]["param_groups"] == want["optim"]["param_groups"]
    assert got["step"] == 7 and got["config"] == want["config"]


def test_writer_reproduces_golden_bytes(tmp_path):
    """Saving the golden state today gives byte-identical data and the same manifest."""
    out = str(tmp_path / "g")
    outlast.save(golden_state(), out, step=7, num_writers=1)
    with open(os.path.join(GOLDEN, "data", "w00000.safetensors"), "rb") as f:
        golden_bytes = f.read()
    with open(os.path.join(out, "data", "w00000.safetensors"), "rb") as f:
        assert f.read() == golden_bytes
    a = json.load(open(os.path.join(GOLDEN, "manifest.json")))
    b = json.load(open(os.path.join(out, "manifest.json")))
    # Manifests written today end in their own checksum; the golden one (older) has none
    # and must still load.
    assert "manifest_checksum" not in a and list(b)[-2:] == ["sealed", "manifest_checksum"]
    b.pop("manifest_checksum")
    b.pop("sealed")
    for m in (a, b):
        m.pop("created")
        m.pop("library")
    assert a == b


def test_data_files_are_plain_safetensors():
    with safe_open(os.path.join(GOLDEN, "data", "w00000.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.embed.weight"), golden_state()["model"]["embed.weight"])
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_manifest_has_no_pickle_and_documents_checksums():
    raw = open(os.path.join(GOLDEN, "manifest.json"), "rb").read()
    m = json.loads(raw)
    assert m["format"] == "outlast.checkpoint" and m["version"] == 1
    assert m["checksum_algorithm"] == "xxh3-64"
    for name in os.listdir(os.path.join(GOLDEN, "data")):
        with open(os.path.join(GOLDEN, "data", name), "rb") as f:
            assert b"\x80\x04" not in f.read(16)  # no pickle protocol header


def hostile_cases():
    with open(os.path.join(HOSTILE, "expected.json")) as f:
        return sorted(json.load(f).items())


@pytest.mark.parametrize("name,expect", hostile_cases(), ids=[c[0] for c in hostile_cases()])
def test_hostile_manifests_are_refused_with_a_clear_error(tmp_path, name, expect):
    ck = tmp_path / "ck"
    shutil.copytree(GOLDEN, ck)
    shutil.copy(os.path.join(HOSTILE, name), ck / "manifest.json")
    cls = getattr(errors, expect["error"])
    for attempt in (
        lambda: outlast.read(str(ck)),
        lambda: outlast.load({"model": {"embed.weight": torch.zeros(3, 4)}}, str(ck), strict=False),
    ):
        with pytest.raises(cls) as e:
            attempt()
        assert expect["message_contains"] in str(e.value)
        assert "manifest.json" in str(e.value)  # names the file at fault


def test_every_dtype_name_maps_both_ways():
    from outlast import dtypes

    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
               torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        assert dtypes.from_safetensors(dtypes.to_safetensors(dt)) is dt
    with pytest.raises(errors.SerializationError, match="complex64"):
        dtypes.to_safetensors(torch.complex64, name="z")

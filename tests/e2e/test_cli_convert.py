"""The convert and merge commands: output, --json, exit codes, error lines."""

import json

import torch
from click.testing import CliRunner

import outlast
from outlast.cli import main


def _save(path, step, seed, shape=(4, 3)):
    g = torch.Generator().manual_seed(seed)
    outlast.save({"model": {"w": torch.randn(*shape, generator=g)}, "step": step}, path, step=step)


def test_convert_roundtrip_via_cli(tmp_path):
    _save(tmp_path / "ck", 1, 0)
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--from", "outlast",
                                  "--to", "hf", "--prefix", "model", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["ok"] and out["files"] == ["model.safetensors"] and out["tensors"] == 1
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--from", "hf",
                                  "--to", "outlast", "--prefix", "model", "-q"])
    assert r.exit_code == 0 and "1 tensors" in r.output
    assert torch.equal(outlast.read(tmp_path / "back")["model"]["w"], outlast.read(tmp_path / "ck")["model"]["w"])


def test_convert_max_shard_size_parses_units(tmp_path):
    outlast.save({"model": {f"w{i}": torch.zeros(256) for i in range(4)}}, tmp_path / "ck")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--from", "outlast",
                                  "--to", "hf", "--prefix", "model", "--max-shard-size", "2KiB", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["files"][-1] == "model.safetensors.index.json"
    assert len(json.loads(r.output)["files"]) == 3  # two 2 KiB shards + the index


def test_convert_dcp_without_metadata_exits_3(tmp_path):
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / "__0_0.distcp").write_bytes(b"")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "dcp"), str(tmp_path / "o"), "--from", "dcp", "--to", "outlast"])
    assert r.exit_code == 3 and "error:" in r.output and ".metadata" in r.output


def test_merge_via_cli_and_json(tmp_path):
    for i in range(3):
        _save(tmp_path / f"s{i}", (i + 1) * 10, i)
    srcs = [str(tmp_path / f"s{i}") for i in range(3)]
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "avg"), *srcs, "--method", "lawa", "--last-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["steps"] == [20, 30] and out["weights"] == [0.5, 0.5] and out["step"] == 30
    exp = (outlast.read(srcs[1])["model"]["w"] + outlast.read(srcs[2])["model"]["w"]) / 2
    torch.testing.assert_close(outlast.read(tmp_path / "avg")["model"]["w"], exp, rtol=0, atol=1e-6)
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "w"), *srcs, "--method", "weighted", "--weights", "1,0,1"])
    assert r.exit_code == 0 and "merged (weighted)" in r.output


def test_merge_mismatch_exits_1_with_error_line(tmp_path):
    _save(tmp_path / "a", 1, 0, shape=(4, 3))
    _save(tmp_path / "b", 2, 0, shape=(3, 4))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "out"), str(tmp_path / "a"), str(tmp_path / "b")])
    assert r.exit_code == 1 and "error: cannot merge: tensor 'model.w'" in r.output
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "out"), str(tmp_path / "a"), "--method", "ema"])
    assert r.exit_code == 1 and "decay" in r.output

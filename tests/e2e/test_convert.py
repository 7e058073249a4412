"""outlast.convert: round trips through HF safetensors, DCP and torch.save, bit-exact."""

import json
import os
import pickle
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

import outlast
from outlast.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsupportedFormatError,
)


def _model_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 8, generator=g),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "layers.0.norm.weight": torch.randn(8, generator=g, dtype=torch.float64),
        "layers.1.attn.weight": torch.randn(8, 8, generator=g).half(),
        "pos_ids": torch.arange(12),
        "mask": torch.tensor([[True, False], [False, True]]),
        "scale": torch.tensor(0.5),
    }


def _full_state(seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    return {
        "model": _model_state(seed),
        "optim": {"state": {"0": {"exp_avg": torch.randn(50, 8, generator=g), "step": torch.tensor(9.0)}},
                  "param_groups": [{"lr": 0.01, "betas": [0.9, 0.95], "params": ["embed.weight"]}]},
        "step": 9,
        "rng": {"seed": 1234},
    }


def _assert_same_tree(a, b):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_tree(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_tree(x, y)
    else:
        assert a == b


def _no_leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n]


def test_outlast_hf_outlast_sharded_bit_exact(tmp_path):
    state = _full_state()
    outlast.save(state, tmp_path / "ck", step=9)
    res = outlast.convert_checkpoint(tmp_path / "ck", tmp_path / "hf", src_format="outlast", dst_format="hf",
                          prefix="model", max_shard_size=1200)
    files = sorted(os.listdir(tmp_path / "hf"))
    n = len(files) - 1
    assert n > 1 and f"model-00001-of-{n:05d}.safetensors" in files and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state["model"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state["model"].values())
    assert res.tensors == len(state["model"]) and not _no_leftovers(tmp_path)
    assert not (tmp_path / "hf" / "data").exists()
    outlast.convert_checkpoint(tmp_path / "hf", tmp_path / "back", src_format="hf", dst_format="outlast", prefix="model")
    _assert_same_tree(outlast.read(tmp_path / "back"), {"model": state["model"]})
    # Manifest names are exactly the ones outlast.save gives a state_dict under "model".
    assert set(outlast.manifest_of(tmp_path / "back").tensors) == set(outlast.manifest_of(tmp_path / "ck").tensors) - {
        "optim.state.0.exp_avg", "optim.state.0.step"}


def test_hf_single_file_has_pt_metadata(tmp_path):
    outlast.save({"model": _model_state()}, tmp_path / "ck")
    outlast.convert_checkpoint(tmp_path / "ck", tmp_path / "hf", src_format="outlast", dst_format="hf", prefix="model")
    assert sorted(os.listdir(tmp_path / "hf")) == ["model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("layers.0.attn.weight"), _model_state()["layers.0.attn.weight"])


def test_hf_sharded_index_written_by_safetensors_imports(tmp_path):
    sd = _model_state()
    d = tmp_path / "hf"
    d.mkdir()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for f, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(d / f), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    outlast.convert_checkpoint(d, tmp_path / "ck", src_format="hf", dst_format="outlast")
    _assert_same_tree(outlast.read(tmp_path / "ck"), sd)


def test_hf_index_naming_missing_shard_is_a_clear_error(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, str(d / "model-00001-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CorruptCheckpointError, match="model-00002-of-00002.safetensors, which is missing") as e:
        outlast.convert_checkpoint(d, tmp_path / "ck", src_format="hf", dst_format="outlast")
    assert "model.safetensors.index.json" in str(e.value) and "'b'" in str(e.value)
    assert not (tmp_path / "ck").exists()


def test_outlast_dcp_outlast_bit_exact(tmp_path):
    state = _full_state()
    outlast.save(state, tmp_path / "ck", step=9)
    outlast.convert_checkpoint(tmp_path / "ck", tmp_path / "dcp", src_format="outlast", dst_format="dcp")
    assert ".metadata" in os.listdir(tmp_path / "dcp") and not _no_leftovers(tmp_path)
    outlast.convert_checkpoint(tmp_path / "dcp", tmp_path / "back", src_format="dcp", dst_format="outlast")
    back = outlast.read(tmp_path / "back")
    _assert_same_tree(back, state)
    assert outlast.manifest_of(tmp_path / "back").step == 9
    assert set(outlast.manifest_of(tmp_path / "back").tensors) == set(outlast.manifest_of(tmp_path / "ck").tensors)


def test_dcp_export_loads_with_dcp_into_a_model_state_dict(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    outlast.save({"model": model, "step": 3}, tmp_path / "ck", step=3)
    outlast.convert_checkpoint(tmp_path / "ck", tmp_path / "dcp", src_format="outlast", dst_format="dcp", prefix="model")
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    sd = fresh.state_dict()
    dcp.load(sd, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_dcp_written_by_dcp_imports(tmp_path):
    import torch.distributed.checkpoint as dcp

    sd = {"model": _model_state(), "layers": [torch.ones(3), torch.zeros(2, dtype=torch.bfloat16)],
          "step": 12, "cfg": {"lr": 0.5, "name": "x"}}
    dcp.save(sd, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    outlast.convert_checkpoint(tmp_path / "dcp", tmp_path / "ck", src_format="dcp", dst_format="outlast")
    back = outlast.read(tmp_path / "ck")
    _assert_same_tree(back, sd)
    assert outlast.manifest_of(tmp_path / "ck").step == 12


def test_dcp_without_metadata_is_incomplete(tmp_path):
    d = tmp_path / "dcp"
    d.mkdir()
    (d / "__0_0.distcp").write_bytes(b"x" * 10)
    with pytest.raises(IncompleteCheckpointError, match=r"has no \.metadata") as e:
        outlast.convert_checkpoint(d, tmp_path / "ck", src_format="dcp", dst_format="outlast")
    assert str(d) in str(e.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_dcp_metadata_with_foreign_global_is_refused_not_run(tmp_path, monkeypatch):
    d = tmp_path / "dcp"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(_Evil()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsupportedFormatError, match="system"):
        outlast.convert_checkpoint(d, tmp_path / "ck", src_format="dcp", dst_format="outlast")
    assert not (tmp_path / "pwned").exists()


def _dcp_with(tmp_path, edit):
    """A real DCP checkpoint whose metadata's storage entries ``edit(info) -> info`` rewrote."""
    import dataclasses

    import torch.distributed.checkpoint as dcp
    from outlast.convert.dcp import read_metadata

    d = tmp_path / "dcp"
    dcp.save({"w": torch.arange(16.0)}, checkpoint_id=str(d), no_dist=True)
    meta = read_metadata(str(d))
    meta.storage_data = {k: edit(v, dataclasses.replace) for k, v in meta.storage_data.items()}
    (d / ".metadata").write_bytes(pickle.dumps(meta))  # a crafted file, as an attacker would write it
    return d


@pytest.mark.parametrize("edit,fragment", [
    (lambda v, r: r(v, relative_path="../../etc/passwd"), "outside"),
    (lambda v, r: r(v, relative_path="/etc/passwd"), "not a relative path"),
    (lambda v, r: r(v, length=v.length + 10**6), "truncated"),
    (lambda v, r: r(v, offset=-1), "invalid byte range"),
    (lambda v, r: r(v, relative_path="missing.distcp"), "missing"),
])
def test_dcp_metadata_paths_and_lengths_are_checked_before_reading(tmp_path, edit, fragment):
    d = _dcp_with(tmp_path, edit)
    with pytest.raises(CorruptCheckpointError, match=fragment) as e:
        outlast.convert_checkpoint(d, tmp_path / "ck", src_format="dcp", dst_format="outlast")
    assert ".metadata" in str(e.value) and "'w'" in str(e.value)
    assert not (tmp_path / "ck").exists()


def test_dcp_metadata_admits_only_listed_classes(tmp_path):
    """A class of DCP's metadata module that is not on the list (here: one made up) is refused."""
    import torch.distributed.checkpoint.metadata as md

    class Sneaky:
        pass

    Sneaky.__module__ = md.__name__
    Sneaky.__qualname__ = Sneaky.__name__ = "Sneaky"
    md.Sneaky = Sneaky
    try:
        d = tmp_path / "dcp"
        d.mkdir()
        (d / ".metadata").write_bytes(pickle.dumps(Sneaky()))
    finally:
        del md.Sneaky
    md.Sneaky = Sneaky  # present at load time too: only the allow-list may refuse it
    try:
        with pytest.raises(UnsupportedFormatError, match="Sneaky"):
            outlast.convert_checkpoint(d, tmp_path / "ck", src_format="dcp", dst_format="outlast")
    finally:
        del md.Sneaky


def test_torch_save_imports_nested_and_nests_state_dicts(tmp_path):
    state = _full_state()
    torch.save(state, tmp_path / "full.pt")
    outlast.convert_checkpoint(tmp_path / "full.pt", tmp_path / "a", src_format="torch", dst_format="outlast")
    _assert_same_tree(outlast.read(tmp_path / "a"), state)
    assert outlast.manifest_of(tmp_path / "a").step == 9

    model = torch.nn.Linear(4, 3)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    outlast.convert_checkpoint(tmp_path / "sd.pt", tmp_path / "b", src_format="torch", dst_format="outlast", prefix="model")
    fresh = torch.nn.Linear(4, 3)
    outlast.load({"model": fresh}, tmp_path / "b")
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_torch_save_with_arbitrary_object_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "obj": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsupportedFormatError, match="weights_only"):
        outlast.convert_checkpoint(tmp_path / "evil.pt", tmp_path / "ck", src_format="torch", dst_format="outlast")


def test_flipped_byte_in_outlast_source_names_file_and_tensor(tmp_path):
    outlast.save({"model": _model_state()}, tmp_path / "ck")
    c = outlast.manifest_of(tmp_path / "ck").tensors["model.embed.weight"].chunks[0]
    f = tmp_path / "ck" / c.file
    data = bytearray(f.read_bytes())
    data[c.offset + 17] ^= 0x01
    f.write_bytes(bytes(data))
    for fmt in ("hf", "dcp", "outlast"):
        with pytest.raises(CorruptCheckpointError) as e:
            outlast.convert_checkpoint(tmp_path / "ck", tmp_path / fmt, src_format="outlast", dst_format=fmt)
        assert "checksum mismatch" in str(e.value) and c.file in str(e.value) and "'model.embed.weight'" in str(e.value)
        assert not (tmp_path / fmt).exists()
    assert not _no_leftovers(tmp_path)


def test_existing_destination_needs_overwrite(tmp_path):
    outlast.save({"model": _model_state()}, tmp_path / "ck")
    outlast.convert_checkpoint(tmp_path / "ck", tmp_path / "hf", src_format="outlast", dst_format="hf", prefix="model")
    with pytest.raises(outlast.errors.CheckpointExistsError):
        outlast.convert_checkpoint(tmp_path / "ck", tmp_path / "hf", src_format="outlast", dst_format="hf", prefix="model")
    outlast.convert_checkpoint(tmp_path / "ck", tmp_path / "hf", src_format="outlast", dst_format="hf", prefix="model",
                    overwrite=True, max_shard_size=1000)
    assert "model.safetensors" not in os.listdir(tmp_path / "hf")  # replaced whole, not mixed
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "hf")


def test_unknown_prefix_lists_top_level_names(tmp_path):
    outlast.save(_full_state(), tmp_path / "ck")
    with pytest.raises(outlast.errors.IncompatibleStateError, match="nothing under prefix 'modle'.*'model'"):
        outlast.convert_checkpoint(tmp_path / "ck", tmp_path / "hf", src_format="outlast", dst_format="hf", prefix="modle")


def test_deepspeed_hook_calls_read_deepspeed(tmp_path, monkeypatch):
    calls = []

    class FakeState:
        step = 5
        param_groups = [{"lr": 0.1, "params": ["w"]}]

        def iter_tensors(self):
            yield "model.w", torch.full((2, 2), 1.5, dtype=torch.bfloat16)
            yield "master.w", torch.full((2, 2), 1.5)
            yield "optim.state.w.exp_avg", torch.zeros(2, 2)

    def read_deepspeed(path, tag=None):
        calls.append((path, tag))
        return FakeState()

    fake = types.ModuleType("outlast.convert.deepspeed")
    fake.read_deepspeed = read_deepspeed
    monkeypatch.setitem(sys.modules, "outlast.convert.deepspeed", fake)
    ds = tmp_path / "ds"
    ds.mkdir()
    outlast.convert_checkpoint(ds, tmp_path / "ck", src_format="deepspeed", dst_format="outlast", tag="global_step5")
    assert calls == [(str(ds), "global_step5")]
    back = outlast.read(tmp_path / "ck")
    assert back["model"]["w"].dtype == torch.bfloat16 and torch.equal(back["master"]["w"], torch.full((2, 2), 1.5))
    assert back["optim"]["state"]["w"]["exp_avg"].shape == (2, 2) and back["step"] == 5
    assert back["optim"]["param_groups"] == [{"lr": 0.1, "params": ["w"]}]
    # Export of the model sub-tree streams in the reader's order, skipping the rest.
    outlast.convert_checkpoint(ds, tmp_path / "hf", src_format="deepspeed", dst_format="hf", prefix="model")
    from safetensors.torch import load_file

    assert list(load_file(str(tmp_path / "hf" / "model.safetensors"))) == ["w"]


def test_deepspeed_absent_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "outlast.convert.deepspeed", None)
    (tmp_path / "ds").mkdir()
    with pytest.raises(NotImplementedError, match="outlast.convert.deepspeed"):
        outlast.convert_checkpoint(tmp_path / "ds", tmp_path / "ck", src_format="deepspeed", dst_format="outlast")


def test_outlast_to_outlast_selects_subtree_and_reshards(tmp_path):
    state = _full_state()
    outlast.save(state, tmp_path / "ck", step=9)
    outlast.convert_checkpoint(tmp_path / "ck", tmp_path / "m", src_format="outlast", dst_format="outlast",
                    prefix="model", max_shard_size=512)
    m = outlast.manifest_of(tmp_path / "m")
    assert len(m.files) > 1 and all(k.startswith("model.") for k in m.tensors)
    assert m.extra["converted_from"]["format"] == "outlast"
    _assert_same_tree(outlast.read(tmp_path / "m"), {"model": state["model"]})

"""The public surface of issue 11: module names not shadowed, save's report, Manifest,
one argument order for both saves, and the old spellings still working with a warning."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
import torch

import outlast


def _state():
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": 7}


def test_convert_and_merge_are_their_modules():
    # Before: outlast/__init__ rebound these names to functions, so `import outlast.merge
    # as m` gave the function and m.merge_weights failed.
    import outlast.convert as convert_pkg
    import outlast.merge as merge_mod

    assert outlast.merge is merge_mod is sys.modules["outlast.merge"]
    assert outlast.convert is convert_pkg is sys.modules["outlast.convert"]
    assert merge_mod.merge_weights(2, "mean") == [0.5, 0.5]
    assert convert_pkg.core.convert_checkpoint is outlast.convert_checkpoint
    assert merge_mod.merge_checkpoints is outlast.merge_checkpoints


def test_module_names_do_not_depend_on_import_order():
    # A fresh interpreter that imports the submodule first must see the same thing.
    code = ("import outlast.merge, outlast.convert.hf, outlast; "
            "print(type(outlast.merge).__name__, hasattr(outlast.merge, 'merge_weights'), "
            "hasattr(outlast.convert, 'hf'))")
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["_CallableModule", "True", "True"]


def test_new_names_do_not_warn(tmp_path):
    outlast.save(_state(), tmp_path / "a", step=1)
    outlast.save(_state(), tmp_path / "b", step=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        man = outlast.merge_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "avg")
        res = outlast.convert_checkpoint(tmp_path / "a", tmp_path / "hf", src_format="outlast", dst_format="hf")
    assert isinstance(man, outlast.Manifest) and man.step == 2
    assert res.tensors == 1


def test_old_function_spellings_still_work_and_warn(tmp_path):
    outlast.save(_state(), tmp_path / "a", step=1)
    with pytest.warns(DeprecationWarning, match=r"outlast\.merge\(\.\.\.\) is deprecated; use outlast\.merge_checkpoints"):
        man = outlast.merge([tmp_path / "a"], tmp_path / "avg")
    assert torch.equal(outlast.read(tmp_path / "avg")["w"], _state()["w"]) and man.step == 1
    with pytest.warns(DeprecationWarning, match=r"outlast\.convert_checkpoint"):
        res = outlast.convert(tmp_path / "a", tmp_path / "hf", src_format="outlast", dst_format="hf")
    assert res.dst_format == "hf"
    with pytest.warns(DeprecationWarning, match="merge_checkpoints"):
        from outlast.merge import merge
    assert merge is outlast.merge_checkpoints
    with pytest.warns(DeprecationWarning, match="convert_checkpoint"):
        from outlast.convert.core import convert
    assert convert is outlast.convert_checkpoint
    with pytest.raises(AttributeError):
        importlib.import_module("outlast.merge").no_such_name  # noqa: B018


def test_save_returns_a_report_carrying_the_manifest(tmp_path):
    report = outlast.save(_state(), tmp_path / "ck", step=5)
    assert isinstance(report, outlast.SaveReport)
    assert isinstance(report.manifest, outlast.Manifest)
    assert report.manifest.step == 5 and sorted(report.manifest.tensors) == ["w"]
    assert report.manifest.to_json() == outlast.manifest_of(tmp_path / "ck").to_json()
    assert report.bytes_written == 24 and report.files_written >= 1 and report.path == str(tmp_path / "ck")
    prepared = outlast.prepare_save(_state())
    persisted = outlast.persist(prepared, tmp_path / "ck2", step=6)
    assert persisted is prepared.report and persisted.manifest.step == 6


def test_report_used_as_a_manifest_still_works_and_warns(tmp_path):
    report = outlast.save(_state(), tmp_path / "ck", step=5)
    with pytest.warns(DeprecationWarning, match=r"report\.manifest\.tensors"):
        assert list(report.tensors) == ["w"]
    with pytest.warns(DeprecationWarning, match=r"report\.manifest\.step"):
        assert report.step == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert report.world_size == 1  # its own field, not forwarded
    with pytest.raises(AttributeError, match="no_such_field"):
        report.no_such_field  # noqa: B018


def test_manifest_is_exported():
    assert outlast.Manifest is importlib.import_module("outlast.format").Manifest
    assert "Manifest" in outlast.__all__ and "convert_checkpoint" in outlast.__all__
    assert "merge_checkpoints" in outlast.__all__


def test_checkpointer_save_takes_state_first(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with outlast.Checkpointer(tmp_path / "run") as ckpt:
            assert ckpt.save(_state(), 1) is True
            assert ckpt.save(_state(), step=2) is True
            assert ckpt.save(state=_state(), step=3) is True
    with outlast.Checkpointer(tmp_path / "run") as ckpt:
        assert ckpt.steps() == [1, 2, 3]


def test_checkpointer_save_old_order_still_works_and_warns(tmp_path):
    with outlast.Checkpointer(tmp_path / "run") as ckpt:
        with pytest.warns(DeprecationWarning, match=r"Checkpointer\.save\(state, step\)"):
            assert ckpt.save(4, _state()) is True
        ckpt.wait()
        assert ckpt.steps() == [4]
        live = {"w": torch.zeros(2, 3), "step": 0}
        assert ckpt.restore(live) == 4
    assert torch.equal(live["w"], _state()["w"]) and live["step"] == 7


def test_checkpointer_save_rejects_a_bad_step(tmp_path):
    with outlast.Checkpointer(tmp_path / "run") as ckpt:
        with pytest.raises(ValueError, match="step must be a non-negative integer"):
            ckpt.save(_state(), -1)
        with pytest.raises(ValueError, match="step must be a non-negative integer"):
            ckpt.save(_state(), True)

"""Faults of the offload tier: disk full, a failed write back, missing or truncated state
files, a filesystem that refuses O_DIRECT. Each must give a clear outlast error naming
the file and leave the previous state intact."""

from __future__ import annotations

import errno
import os
import subprocess
import warnings

import pytest
import torch

from outlast.errors import CorruptCheckpointError, IncompatibleStateError, StorageError
from outlast.offload import DirectIOWarning, OffloadAdamW
from outlast.offload import files as files_mod

KW = dict(lr=1e-2, weight_decay=0.1)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_(True) for s in [(300, 41), (7,), (5000,)]]


def _grads(ps, step):
    g = torch.Generator().manual_seed(99 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def _snapshot(opt, ps):
    sd = opt.state_dict()["state"]
    return [p.detach().clone() for p in ps], {i: {k: v.clone() for k, v in s.items()} for i, s in sd.items()}


def _fail_nth_write(monkeypatch, n, err=errno.ENOSPC):
    calls = {"n": 0}
    real = files_mod._pwrite

    def pwrite(fd, mv, off):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(err, os.strerror(err))
        return real(fd, mv, off)

    monkeypatch.setattr(files_mod, "_pwrite", pwrite)
    return calls


@pytest.mark.parametrize("master", [True, False])
def test_disk_full_during_write_back_keeps_previous_state(tmp_path, monkeypatch, master):
    ref, ps = _params(), _params()
    ref_opt = torch.optim.AdamW(ref, **KW)
    opt = OffloadAdamW(ps, dir=str(tmp_path / "st"), master_params=master, chunk_bytes=8192, **KW)
    for step in range(2):
        _grads(ref, step), _grads(ps, step)
        ref_opt.step(), opt.step()
    params_before, state_before = _snapshot(opt, ps)
    gen_before = opt.files.generation

    _grads(ps, 2)
    calls = _fail_nth_write(monkeypatch, 4)  # a write in the middle of the step
    with pytest.raises(StorageError) as ei:
        opt.step()
    msg = str(ei.value)
    assert "disk is full" in msg and str(tmp_path / "st") in msg and ".bin" in msg
    assert calls["n"] >= 4
    monkeypatch.undo()

    # The on-disk state is the previous step's, and is still current.
    assert opt.files.generation == gen_before
    reopened = OffloadAdamW(_params(), dir=str(tmp_path / "st"), master_params=master, chunk_bytes=8192, reopen=True, **KW)
    sd = reopened.state_dict()["state"]
    for i, s in state_before.items():
        for k, v in s.items():
            assert torch.equal(sd[i][k], v), f"{k} of param {i} changed by the failed step"
    reopened.close()

    if master:
        # Fully undone: the parameters were restored from the master copy; the retried step
        # gives exactly torch's result.
        for p, b in zip(ps, params_before):
            assert torch.equal(p.detach(), b)
        _grads(ref, 2), _grads(ps, 2)
        ref_opt.step(), opt.step()
        for r, p in zip(ref, ps):
            assert torch.equal(r, p)
    else:
        assert "partly updated" in msg and "restore the last checkpoint" in msg
        with pytest.raises(StorageError, match="cannot step"):
            opt.step()
        # loading a checkpoint (here: the reference's state) makes it usable again
        with torch.no_grad():
            for p, r in zip(ps, ref):
                p.copy_(r)
        opt.load_state_dict(ref_opt.state_dict())
        _grads(ref, 2), _grads(ps, 2)
        ref_opt.step(), opt.step()
        for r, p in zip(ref, ps):
            assert torch.equal(r, p)
    opt.close()


def test_disk_too_small_is_reported_at_creation(tmp_path):
    """A real full disk: a 1 MiB tmpfs cannot hold 2 generations of 2 x 1.2 MB state files."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"this test mounts a 1 MiB tmpfs to fill a real disk and needs root: mount said {r.stderr.strip()!r}")
    try:
        ps = [torch.zeros(300_000, requires_grad=True)]
        with pytest.raises(StorageError) as ei:
            OffloadAdamW(ps, dir=str(mnt / "st"))
        assert "disk is full" in str(ei.value) and str(mnt / "st") in str(ei.value)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _prepared(tmp_path):
    ps = _params()
    opt = OffloadAdamW(ps, dir=str(tmp_path / "st"), chunk_bytes=8192, **KW)
    _grads(ps, 0)
    opt.step()
    opt.close()
    return ps


def test_missing_state_file_is_named(tmp_path):
    ps = _prepared(tmp_path)
    victim = tmp_path / "st" / "exp_avg_sq.1.bin"
    victim.unlink()
    with pytest.raises(CorruptCheckpointError, match=str(victim)):
        OffloadAdamW(ps, dir=str(tmp_path / "st"), chunk_bytes=8192, reopen=True, **KW)


def test_truncated_state_file_is_named(tmp_path):
    ps = _prepared(tmp_path)
    victim = tmp_path / "st" / "exp_avg.0.bin"
    os.truncate(victim, 4096)
    with pytest.raises(CorruptCheckpointError, match=rf"{victim} is 4096 bytes.*truncated"):
        OffloadAdamW(ps, dir=str(tmp_path / "st"), chunk_bytes=8192, reopen=True, **KW)


def test_missing_record_and_other_model_are_refused(tmp_path):
    with pytest.raises(CorruptCheckpointError, match="state.json is missing"):
        OffloadAdamW(_params(), dir=str(tmp_path / "empty"), reopen=True)
    _prepared(tmp_path)
    with pytest.raises(IncompatibleStateError, match="another model"):
        OffloadAdamW([torch.zeros(10, requires_grad=True)], dir=str(tmp_path / "st"), reopen=True)


def test_o_direct_refused_falls_back_to_buffered_with_a_warning(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(files_mod.os, "open", no_direct)
    ref, ps = _params(), _params()
    ref_opt = torch.optim.AdamW(ref, **KW)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = OffloadAdamW(ps, dir=str(tmp_path / "st"), chunk_bytes=8192, **KW)
    assert any(issubclass(x.category, DirectIOWarning) and "O_DIRECT" in str(x.message) for x in w)
    assert not opt.files.direct
    for step in range(3):
        _grads(ref, step), _grads(ps, step)
        ref_opt.step(), opt.step()
    for r, p in zip(ref, ps):
        assert torch.equal(r, p)
    opt.close()

"""OffloadAdamW(overlap_forward=True): step() returns early, the next forward finishes the update.

The same small model trains with torch.optim.AdamW and with OffloadAdamW on the same
batches. Every step's loss must be equal bit for bit (the forward of step k reads the
parameters step k-1 left, partly updated by the module pre-hooks on the way), and so
must parameters and state after each step. Tiny chunks (8 KiB) make many chunks, and the
tests check that chunks really were left to the forward (``forward_chunks``), or they
would only test ``synchronize()``.
"""

from __future__ import annotations

import errno
import os
import time

import pytest
import torch

import outlast
from outlast.errors import StorageError
from outlast.offload import OffloadAdamW
from outlast.offload import files as files_mod
from state_helpers import assert_same_as_torch_adamw

KW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(33, 301), torch.nn.Tanh(), torch.nn.Linear(301, 77), torch.nn.Tanh(),
                               torch.nn.Linear(77, 1000), torch.nn.Tanh(), torch.nn.Linear(1000, 5))


def _groups(m):
    return [{"params": list(m[0].parameters())},
            {"params": list(m[2].parameters()) + list(m[4].parameters()), "lr": 3e-3, "weight_decay": 0.0},
            {"params": list(m[6].parameters()), "betas": (0.8, 0.9)}]


def _loss(m, step):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 33, generator=g), torch.randn(16, 5, generator=g)
    return torch.nn.functional.mse_loss(m(x), y)


def _train(pairs, steps):
    """``steps`` (a range) of backward / step / zero_grad for each (model, optimizer) pair."""
    for step in steps:
        for m, o in pairs:
            _loss(m, step).backward()
            o.step()
            o.zero_grad()


def _opt(m, tmp_path, **kw):
    args = dict(KW, dir=str(tmp_path / "st"), chunk_bytes=8192, overlap_forward=True)
    args.update(kw)
    return OffloadAdamW(_groups(m), **args).attach(m)


@pytest.mark.parametrize("tier,master,backward,clip,fused", [
    ("disk", False, False, True, None),    # the plain step left to the forward: clipping is allowed
    ("disk", True, True, False, None),     # with overlap_backward: updates in backward, the rest in forward
    ("host", False, True, False, None),
    ("host", True, True, False, None),     # fp32 masters in host memory (the ZeRO-Offload shape)
    ("disk", False, True, False, True),    # torch's fused kernel, against torch.optim.AdamW(fused=True)
])
def test_forward_overlapped_equal_to_torch_adamw(tmp_path, tier, master, backward, clip, fused):
    ref, mine = _model(), _model()
    a = torch.optim.AdamW(_groups(ref), **KW, fused=fused)
    b = _opt(mine, tmp_path, tier=tier, master_params=master, overlap_backward=backward, fused=fused)
    sa = torch.optim.lr_scheduler.LambdaLR(a, lambda s: 1.0 / (1 + s))
    sb = torch.optim.lr_scheduler.LambdaLR(b, lambda s: 1.0 / (1 + s))
    in_forward, prefetched = [], []
    for step in range(6):
        losses = []
        for m, o, s in ((ref, a, sa), (mine, b, sb)):
            loss = _loss(m, step)  # mine: this forward finishes the previous step
            losses.append(loss.item())
            loss.backward()
            if o is b:
                time.sleep(0.02)  # time for the read-ahead the forward started (checked below)
            if clip:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            o.step()
            o.zero_grad(set_to_none=step != 3)  # in place once: must not zero gradients the step still needs
            s.step()
        assert losses[0] == losses[1], f"step {step}: the forward saw other parameters than torch's"
        if step > 0:
            in_forward.append(b.last_step_stats["forward_chunks"])  # the step before, finished by this forward
            prefetched.append(b.last_step_stats["prefetched_chunks"])
    assert sum(in_forward) > 0, "no chunk was updated inside a forward: the overlap is not exercised"
    assert sum(prefetched) > 0, "no chunk was read ahead of its step: the read-ahead is not exercised"
    assert_same_as_torch_adamw(ref.parameters(), a, mine.parameters(), b)  # state_dict() finishes the last step
    b.close()


def test_save_mid_step_holds_the_updated_parameters(tmp_path):
    ref, mine = _model(), _model()
    a = torch.optim.AdamW(_groups(ref), **KW)
    b = _opt(mine, tmp_path)
    for m, o in ((ref, a), (mine, b)):
        _loss(m, 0).backward()
        o.step()
    assert b._deferred is not None and b._deferred.stream.remaining > 0
    # The optimizer is not in the saved state: the save still finishes its step first.
    outlast.save({"model": mine}, str(tmp_path / "ck"))
    back = _model(seed=5)
    outlast.load({"model": back}, str(tmp_path / "ck"))
    for r, p in zip(ref.parameters(), back.parameters()):
        assert torch.equal(r, p)
    b.close()


def test_synchronize_then_read_parameters_directly(tmp_path):
    ref, mine = _model(), _model()
    a = torch.optim.AdamW(_groups(ref), **KW)
    b = _opt(mine, tmp_path)
    _train([(ref, a), (mine, b)], range(2))
    assert not torch.equal(ref[6].weight, mine[6].weight), "nothing was left for the forward to finish"
    b.synchronize()
    for r, p in zip(ref.parameters(), mine.parameters()):
        assert torch.equal(r, p)
    b.synchronize()  # nothing left: a no-op
    b.close()


def test_attach_is_required_and_must_cover_every_parameter(tmp_path):
    m = _model()
    b = OffloadAdamW(m.parameters(), dir=str(tmp_path / "a"), overlap_forward=True, chunk_bytes=8192, **KW)
    _loss(m, 0).backward()
    with pytest.raises(ValueError, match=r"opt.attach\(model\)"):
        b.step()
    with pytest.raises(ValueError, match="in no module of the model") as ei:
        b.attach(m[:4])  # the last layers are not in it
    assert "[1000, 77]" in str(ei.value)
    b.attach(m)
    b.step()
    b.close()


def test_disk_full_in_a_deferred_write_fails_the_forward_and_restores(tmp_path, monkeypatch):
    ref, mine = _model(), _model()
    a = torch.optim.AdamW(_groups(ref), **KW)
    b = _opt(mine, tmp_path, master_params=True)
    for m, o in ((ref, a), (mine, b)):
        _loss(m, 0).backward()
        o.step()
        o.zero_grad()
    b.synchronize()  # step 0 updated and committed
    before = [p.detach().clone() for p in mine.parameters()]
    gen = b.files.generation
    _loss(mine, 1).backward()
    writes = {"n": 0}
    real = files_mod._pwrite

    def pwrite(fd, mv, off):
        writes["n"] += 1
        if writes["n"] == 3 * len(b.layout.chunks) // 2:  # a write the forward is waiting behind
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, mv, off)

    monkeypatch.setattr(files_mod, "_pwrite", pwrite)
    b.step()  # returns at once: the failure surfaces where the step is finished
    with pytest.raises(StorageError, match="disk is full") as ei:
        _loss(mine, 2)
    monkeypatch.undo()
    assert ".bin" in str(ei.value) and "previous step" in str(ei.value)
    assert b.files.generation == gen
    for p, q in zip(mine.parameters(), before):  # restored from the masters: step 1 was not applied
        assert torch.equal(p, q)
    # Retrying the step gives exactly torch's result.
    b.zero_grad()
    _loss(ref, 1).backward()
    a.step()
    _loss(mine, 1).backward()
    b.step()
    b.synchronize()
    for r, p in zip(ref.parameters(), mine.parameters()):
        assert torch.equal(r, p)
    b.close()


def test_old_gradients_are_freed_by_the_forward(tmp_path):
    # zero_grad(set_to_none=True) drops p.grad, but the step still needs the gradients until
    # the forward has updated every chunk; then they must go, before backward allocates new ones.
    import gc
    import weakref

    m = _model()
    b = _opt(m, tmp_path)
    _loss(m, 0).backward()
    old = [weakref.ref(p.grad) for p in m.parameters()]
    b.step()
    b.zero_grad(set_to_none=True)
    gc.collect()
    assert any(r() is not None for r in old), "the deferred step must hold the gradients it has not used yet"
    with torch.no_grad():
        m(torch.zeros(1, 33))  # updates every chunk
    gc.collect()
    assert all(r() is None for r in old), "gradients of finished parameters are still held"
    b.close()


def test_load_state_dict_discards_the_read_ahead(tmp_path):
    # The forward that finishes a step starts reading the next step's state; a load that
    # replaces the state must not let the next step use those stale reads.
    ref, mine = _model(), _model()
    a = torch.optim.AdamW(_groups(ref), **KW)
    b = _opt(mine, tmp_path)
    _train([(ref, a)], range(3))
    _train([(mine, b)], range(2))
    _loss(mine, 2)  # finishes step 1 and starts reading ahead for step 2
    assert b._prefetch is not None
    with torch.no_grad():
        for p, r in zip(mine.parameters(), ref.parameters()):
            p.copy_(r)
    b.load_state_dict(a.state_dict())  # jump to the reference's state after step 2
    assert b._prefetch is None
    losses = []
    for m, o in ((ref, a), (mine, b)):
        loss = _loss(m, 3)
        losses.append(loss.item())
        loss.backward()
        o.step()
    assert losses[0] == losses[1]
    assert_same_as_torch_adamw(ref.parameters(), a, mine.parameters(), b)
    b.close()


def test_backward_hooks_wait_for_nothing_while_the_step_before_still_writes(tmp_path, monkeypatch):
    # Both overlaps: the forward finishes step k, whose last writes may still run when the next
    # backward's first gradient hooks fire. Those gradients are taken as final without waiting
    # (committing step k would stall the backward) and updated once step k is committed.
    real = files_mod._pwrite

    def slow_pwrite(fd, mv, off):
        time.sleep(0.002)  # a slow disk: writes lag behind the forward's updates
        return real(fd, mv, off)

    monkeypatch.setattr(files_mod, "_pwrite", slow_pwrite)
    ref, mine = _model(), _model()
    a = torch.optim.AdamW(_groups(ref), **KW)
    b = _opt(mine, tmp_path, overlap_backward=True, master_params=True, pool_sets=64)
    early = []
    for step in range(5):
        losses = []
        for m, o in ((ref, a), (mine, b)):
            loss = _loss(m, step)
            losses.append(loss.item())
            loss.backward()
            o.step()
            o.zero_grad()
        assert losses[0] == losses[1], f"step {step}"
        if step > 0:
            early.append(b.last_step_stats["early_grads"])
    assert sum(early) > 0, "no gradient hook ran while the step before was still writing: the path is not exercised"
    assert_same_as_torch_adamw(ref.parameters(), a, mine.parameters(), b)
    b.close()

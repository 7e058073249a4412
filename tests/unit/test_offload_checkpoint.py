"""Offloaded state in checkpoints: saved straight from its files, restored into them,
and interchangeable with torch.optim.AdamW's state (a run moves in and out of offload)."""

from __future__ import annotations

import pytest
import torch

import outlast
from outlast.offload import OffloadAdamW

KW = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(33, 70), torch.nn.GELU(), torch.nn.Linear(70, 1030), torch.nn.Linear(1030, 3))


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 33, generator=g), torch.randn(8, 3, generator=g)


def _train(model, opt, steps):
    losses = []
    for s in steps:
        x, y = _batch(s)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _make(kind, model, tmp_path, name):
    if kind == "offload":
        return OffloadAdamW(model.parameters(), dir=str(tmp_path / name), chunk_bytes=16384, **KW)
    if kind == "host_master":  # the ZeRO-Offload shape's tier: fp32 masters and moments in host memory
        return OffloadAdamW(model.parameters(), tier="host", master_params=True, chunk_bytes=16384, **KW)
    return torch.optim.AdamW(model.parameters(), **KW)


@pytest.mark.parametrize("first,second", [("offload", "offload"), ("offload", "torch"), ("torch", "offload"),
                                          ("host_master", "offload"),
                                          ("host_master", "torch")])
def test_resume_across_offload(tmp_path, first, second):
    """Train 3 steps, save, resume in a fresh process-like state (other optimizer kind), train 3 more:
    the same losses and weights as 6 uninterrupted steps of torch AdamW."""
    ref = _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), **KW)
    ref_losses = _train(ref, ref_opt, range(6))

    m1 = _model()
    o1 = _make(first, m1, tmp_path, "off1")
    l1 = _train(m1, o1, range(3))
    outlast.save({"train": outlast.ModelOptimizerState(m1, o1), "step": 3}, str(tmp_path / "ck"))
    if first != "torch":
        o1.close()

    m2 = _model(seed=123)  # different weights: everything must come from the checkpoint
    o2 = _make(second, m2, tmp_path, "off2")
    state = {"train": outlast.ModelOptimizerState(m2, o2), "step": 0}
    outlast.load(state, str(tmp_path / "ck"))
    assert state["step"] == 3
    l2 = _train(m2, o2, range(3, 6))
    assert l1 + l2 == ref_losses
    for p, q in zip(ref.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    if second != "torch":
        o2.close()


def test_state_dict_is_memory_mapped_from_the_files(tmp_path):
    """What outlast.save reads is the file's mapping itself, not a copy in process memory."""
    m = _model()
    opt = OffloadAdamW(m.parameters(), dir=str(tmp_path / "off"), chunk_bytes=16384, **KW)
    _train(m, opt, range(2))
    g = opt.files.generation
    for kind in ("exp_avg", "exp_avg_sq"):
        base = opt.files.mapped(kind, g).untyped_storage().data_ptr()
        for i, s in opt.state_dict()["state"].items():
            assert s[kind].untyped_storage().data_ptr() == base
    # and the bytes behind the mapping are the file's: read them back with plain I/O
    raw = torch.frombuffer(bytearray(open(opt.files.path("exp_avg", g), "rb").read()), dtype=torch.float32)
    first = next(iter(m.parameters()))
    assert torch.equal(raw[: first.numel()].view(first.shape), opt.state[first]["exp_avg"])
    opt.close()


def test_checkpointer_save_and_restore(tmp_path):
    ref = _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), **KW)
    ref_losses = _train(ref, ref_opt, range(5))

    m = _model()
    opt = OffloadAdamW(m.parameters(), dir=str(tmp_path / "off"), chunk_bytes=16384, **KW)
    with outlast.Checkpointer(str(tmp_path / "run"), keep_last=2) as ck:
        state = {"train": outlast.ModelOptimizerState(m, opt)}
        losses = _train(m, opt, range(2))
        ck.save(state, 2)
        losses += _train(m, opt, range(2, 3))  # the step hook waits for the copy before writing the files
        ck.save(state, 3)
    opt.close()

    m2 = _model(seed=7)
    opt2 = OffloadAdamW(m2.parameters(), dir=str(tmp_path / "off2"), chunk_bytes=16384, **KW)
    with outlast.Checkpointer(str(tmp_path / "run")) as ck:
        assert ck.restore({"train": outlast.ModelOptimizerState(m2, opt2)}) == 3
    losses += _train(m2, opt2, range(3, 5))
    assert losses == ref_losses
    opt2.close()


def _staged_bytes(ck):
    """Bytes of staging memory the Checkpointer holds (its buffers are reused between saves)."""
    return sum(img.numel() for bufs in ck._pool._free for _, img in bufs.images)


@pytest.mark.parametrize("wrap", [False, True])
def test_checkpointer_writes_offloaded_state_from_its_files_not_staged(tmp_path, wrap):
    """The async Checkpointer stages the model but not the offloaded state: its staging
    memory is the size of the parameters, not parameters + state (the old behaviour staged
    everything), and the checkpoint still holds the exact state."""
    m = _model()
    opt = OffloadAdamW(m.parameters(), dir=str(tmp_path / "off"), chunk_bytes=16384, **KW)
    state = {"train": outlast.ModelOptimizerState(m, opt)} if wrap else {"model": m, "optim": opt}
    params_bytes = sum(p.numel() * 4 for p in m.parameters())
    with outlast.Checkpointer(str(tmp_path / "run")) as ck:
        _train(m, opt, range(2))
        want = {k: v.clone() for k, v in opt.state_dict()["state"][2].items()}
        ck.save(state, 2)
        ck.wait()
        staged = _staged_bytes(ck)
        assert params_bytes <= staged < params_bytes + 4096 * 8  # the parameters and headers, no state
        assert ck.metrics[-1].nbytes >= 3 * params_bytes  # while the save held parameters and both moments
        _train(m, opt, range(2, 4))  # both generations written since: the checkpoint must not follow them
    opt.close()
    ref = _model(seed=5)
    ref_opt = torch.optim.AdamW(ref.parameters(), **KW)
    back = {"train": outlast.ModelOptimizerState(ref, ref_opt)} if wrap else {"model": ref, "optim": ref_opt}
    with outlast.Checkpointer(str(tmp_path / "run")) as ck:
        assert ck.restore(back) == 2
    got = ref_opt.state_dict()["state"][2]
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(got[k], want[k])


def test_a_step_that_would_overwrite_files_being_saved_waits_for_the_save(tmp_path, monkeypatch):
    """A save pins the generation it writes from; the next step writes the other one, the
    step after waits for the save (here it times out: the save is held), then goes on."""
    import threading

    import outlast.checkpointer as checkpointer
    from outlast.errors import StorageError

    hold = threading.Event()
    real_persist = checkpointer.persist

    def slow_persist(*a, **k):
        hold.wait(30)
        return real_persist(*a, **k)

    monkeypatch.setattr(checkpointer, "persist", slow_persist)
    m = _model()
    opt = OffloadAdamW(m.parameters(), dir=str(tmp_path / "off"), chunk_bytes=16384, **KW)
    opt.pin_timeout_s = 0.5
    with outlast.Checkpointer(str(tmp_path / "run")) as ck:
        _train(m, opt, range(2))
        want = {k: v.clone() for k, v in opt.state_dict()["state"][2].items()}
        ck.save({"model": m, "optim": opt}, 2)
        _train(m, opt, range(2, 3))  # writes the other generation: no wait
        x, y = _batch(3)
        torch.nn.functional.mse_loss(m(x), y).backward()
        with pytest.raises(StorageError, match=r"exp_avg\.\d\.bin .*this step would overwrite them.*Checkpointer.wait"):
            opt.step()
        hold.set()
        ck.wait()
        opt.step()  # the save is done: the step goes on
    opt.close()
    ref = _model(seed=5)
    ref_opt = torch.optim.AdamW(ref.parameters(), **KW)
    with outlast.Checkpointer(str(tmp_path / "run")) as ck:
        assert ck.restore({"model": ref, "optim": ref_opt}) == 2
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ref_opt.state_dict()["state"][2][k], want[k])


def test_host_tier_state_is_staged_as_before(tmp_path):
    m = _model()
    opt = OffloadAdamW(m.parameters(), tier="host", chunk_bytes=16384, **KW)
    assert opt.pin_state_files() is None  # in memory, updated in place: the Checkpointer copies it
    with outlast.Checkpointer(str(tmp_path / "run")) as ck:
        _train(m, opt, range(2))
        ck.save({"model": m, "optim": opt}, 2)
        ck.wait()
        assert _staged_bytes(ck) >= 3 * sum(p.numel() * 4 for p in m.parameters())
    opt.close()


def test_load_waits_for_a_save_still_writing_the_state_files(tmp_path):
    """outlast.load fills the optimizer's mapped views in place: while a checkpoint holds a pin on
    those files (an async save writing them), the load must not change a byte of them."""
    import threading
    import time

    m = _model()
    opt = OffloadAdamW(m.parameters(), dir=str(tmp_path / "off"), chunk_bytes=16384, **KW)
    _train(m, opt, range(2))
    state = {"train": outlast.ModelOptimizerState(m, opt)}
    outlast.save(state, str(tmp_path / "a"))
    _train(m, opt, range(2, 4))  # the live state moves on from the checkpoint
    before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    pin = opt.pin_state_files()
    assert pin is not None
    done = threading.Event()
    errors = []

    def load():
        try:
            outlast.load(state, str(tmp_path / "a"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        done.set()

    t = threading.Thread(target=load, daemon=True)
    t.start()
    time.sleep(0.5)
    assert not done.is_set()  # waiting for the pin
    now = opt.state_dict()["state"][0]
    for k, v in before.items():
        assert torch.equal(now[k], v), k  # the pinned files are untouched
    pin.release()
    assert done.wait(60) and not errors, errors
    for k in ("exp_avg", "exp_avg_sq"):
        assert not torch.equal(opt.state_dict()["state"][0][k], before[k])
    opt.close()

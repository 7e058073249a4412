"""Checkpointer in one process: save/restore, hooks, back-pressure, failures, tiers, retention."""

from __future__ import annotations

import errno
import gc
import logging
import os
import threading
import time
import types
import weakref

import pytest
import torch

import outlast
from outlast.checkpointer import step_dir_name
from outlast.errors import CheckpointError, CorruptCheckpointError, StorageError
from outlast.storage import local as local_storage


def make_state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    return {"model": model, "optim": opt, "sched": sched, "data": {"pos": 0}, "extra": torch.zeros(5)}


def train(state, step: int) -> None:
    torch.manual_seed(1000 + step)
    model, opt = state["model"], state["optim"]
    model(torch.randn(8, 32)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    state["sched"].step()
    state["data"]["pos"] = step


def tensors_of(state) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in state["model"].state_dict().items()}
    for i, st in state["optim"].state_dict()["state"].items():
        for k, v in st.items():
            out[f"optim.{i}.{k}"] = v.clone()
    out["extra"] = state["extra"].clone()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_roundtrip_and_metrics(tmp_path, caplog):
    state = make_state()
    snaps = {}
    with caplog.at_level(logging.INFO, logger="outlast"):
        with outlast.Checkpointer(tmp_path / "run") as ckpt:
            assert ckpt.restore(state) is None
            for step in range(3):
                train(state, step)
                ckpt.save(state, step)
                ckpt.wait()
                snaps[step] = (tensors_of(state), dict(state["data"]), state["sched"].state_dict())
            m = ckpt.last_metrics
    assert m.done and not m.skipped and m.error is None and m.step == 2
    assert m.nbytes > 0 and m.persist_s > 0 and m.stall_s >= m.save_call_s
    assert any("saved step 2" in r.message for r in caplog.records)
    assert sorted(os.listdir(tmp_path / "run")) == [step_dir_name(s) for s in range(3)]

    fresh = make_state(seed=1)
    with outlast.Checkpointer(tmp_path / "run") as ckpt:
        assert ckpt.restore(fresh) == 2
    assert_same(tensors_of(fresh), snaps[2][0])
    assert fresh["data"] == snaps[2][1]
    assert fresh["sched"].state_dict() == snaps[2][2]


def test_optimizer_hook_blocks_the_racing_step(tmp_path):
    """Fails without the step pre-hook: optimizer.step() right after save() would change
    the parameters before the (deliberately slow) copy reaches them."""
    state = make_state()
    train(state, 0)
    before = tensors_of(state)
    with outlast.Checkpointer(tmp_path) as ckpt:
        ckpt._engine.stage_delay = 0.05  # per tensor: the copy takes ~1 s
        ckpt.save(state, 1)
        train(state, 1)  # forward (buffer hook), backward, optimizer.step (step hook)
        ckpt.wait()
        assert ckpt.last_metrics.blocked_s > 0
    saved = outlast.read(tmp_path / step_dir_name(1))
    for k, v in saved["model"].items():
        assert torch.equal(v, before[f"model.{k}"]), k
    assert not torch.equal(saved["model"]["0.weight"], state["model"][0].weight.detach())


def test_wait_staged_covers_other_mutations(tmp_path):
    state = make_state()
    with outlast.Checkpointer(tmp_path) as ckpt:
        ckpt._engine.stage_delay = 0.02
        ckpt.save(state, 0)
        ckpt.wait_staged()
        state["extra"].fill_(7.0)  # not owned by an optimizer or module: our own rule
    assert torch.equal(outlast.read(tmp_path / step_dir_name(0))["extra"], torch.zeros(5))


def test_plain_values_are_captured_at_save(tmp_path):
    state = make_state()
    with outlast.Checkpointer(tmp_path) as ckpt:
        ckpt._engine.stage_delay = 0.02
        state["data"]["pos"] = 41
        ckpt.save(state, 0)
        state["data"]["pos"] = 42
    assert outlast.read(tmp_path / step_dir_name(0))["data"]["pos"] == 41


def test_if_busy_skip_and_wait(tmp_path):
    state = make_state()
    with outlast.Checkpointer(tmp_path / "skip", if_busy="skip") as ckpt:
        ckpt._engine.stage_delay = 0.05
        assert ckpt.save(state, 0) is True
        assert ckpt.save(state, 1) is False
        ckpt.wait()
        assert [m.skipped for m in ckpt.metrics] == [False, True]
        assert ckpt.steps() == [0]
    with outlast.Checkpointer(tmp_path / "wait") as ckpt:
        ckpt._engine.stage_delay = 0.02
        ckpt.save(state, 0)
        ckpt.save(state, 1)
        assert ckpt.metrics[1].backpressure_s > 0
        ckpt.wait()
        assert ckpt.steps() == [0, 1]


class _FullDisk(types.ModuleType):
    """``os`` as the shard writer sees it, with a disk that is full."""

    def __init__(self):
        super().__init__("os")
        self.__dict__.update(os.__dict__)

        def write(fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.write = write


def test_write_failure_is_raised_on_next_call_and_nothing_is_committed(tmp_path, monkeypatch):
    state = make_state()
    ckpt = outlast.Checkpointer(tmp_path)
    train(state, 0)
    ckpt.save(state, 0)
    ckpt.wait()
    good = tensors_of(state)
    monkeypatch.setattr(local_storage, "os", _FullDisk())
    train(state, 1)
    ckpt.save(state, 1)  # returns; the failure happens in the background
    ckpt._inflight and ckpt._inflight[0].done.wait()
    with pytest.raises(StorageError, match=r"step 1.*disk is full.*latest valid checkpoint is still step 0"):
        ckpt.save(state, 2)
    monkeypatch.undo()
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == [step_dir_name(0)]  # no partial step 1, no temp dir
    fresh = make_state(seed=3)
    with outlast.Checkpointer(tmp_path) as c2:
        assert c2.restore(fresh) == 0
    assert_same(tensors_of(fresh), good)


def test_write_failure_is_raised_by_close(tmp_path, monkeypatch):
    state = make_state()
    ckpt = outlast.Checkpointer(tmp_path)
    monkeypatch.setattr(local_storage, "os", _FullDisk())
    ckpt.save(state, 0)
    with pytest.raises(StorageError, match="disk is full"):
        ckpt.close()
    assert os.listdir(tmp_path) == []


def test_retention_keep_last_and_keep_every(tmp_path):
    state = make_state()
    with outlast.Checkpointer(tmp_path, keep_last=2, keep_every=4) as ckpt:
        for step in range(10):
            ckpt.save(state, step)
        ckpt.wait()
        assert ckpt.steps() == [0, 4, 8, 9]


def test_retention_never_deletes_the_only_valid_one(tmp_path):
    state = make_state()
    with outlast.Checkpointer(tmp_path) as ckpt:
        ckpt.save(state, 1)
        ckpt.save(state, 2)
    # The newest becomes corrupt (a truncated file): it is not counted as valid, so
    # step 1 is the only valid checkpoint and keep_last=1 must not delete it.
    f = next((tmp_path / step_dir_name(2) / "data").iterdir())
    os.truncate(f, 10)
    with outlast.Checkpointer(tmp_path, keep_last=1) as ckpt:
        ckpt._apply_retention_local()
        assert sorted(os.listdir(tmp_path)) == [step_dir_name(1), step_dir_name(2)]
        assert ckpt.steps() == [1]
        ckpt.save(state, 3)
        ckpt.wait()
        # Now step 3 is the newest valid: step 1 goes by keep_last, the broken step 2 as garbage.
        assert sorted(os.listdir(tmp_path)) == [step_dir_name(3)]


def test_restore_skips_incomplete_and_corrupt_newest(tmp_path):
    state = make_state()
    snaps = {}
    with outlast.Checkpointer(tmp_path) as ckpt:
        for step in range(3):
            train(state, step)
            ckpt.save(state, step)
            ckpt.wait()
            snaps[step] = tensors_of(state)
    # step 2: flip bytes inside a tensor (sizes intact: only checksums catch it, after
    # the load has already written some tensors into the live state).
    f = next((tmp_path / step_dir_name(2) / "data").iterdir())
    raw = bytearray(f.read_bytes())
    raw[-64:] = bytes(64)
    raw[-65] ^= 0xFF
    f.write_bytes(bytes(raw))
    # step 3: a save that never finished.
    (tmp_path / step_dir_name(3) / "data").mkdir(parents=True)
    (tmp_path / step_dir_name(3) / "data" / "w00000.safetensors").write_bytes(b"x" * 100)
    fresh = make_state(seed=5)
    with outlast.Checkpointer(tmp_path) as ckpt:
        with pytest.warns(UserWarning) as rec:
            assert ckpt.restore(fresh) == 1
    msgs = " | ".join(str(w.message) for w in rec)
    assert step_dir_name(3) in msgs and "manifest" in msgs
    assert step_dir_name(2) in msgs and "checksum" in msgs
    assert_same(tensors_of(fresh), snaps[1])


def test_restore_raises_when_every_checkpoint_fails_after_touching_state(tmp_path):
    state = make_state()
    with outlast.Checkpointer(tmp_path) as ckpt:
        ckpt.save(state, 0)
    f = next((tmp_path / step_dir_name(0) / "data").iterdir())
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with outlast.Checkpointer(tmp_path) as ckpt, pytest.warns(UserWarning):
        with pytest.raises(CorruptCheckpointError, match="partly overwritten"):
            ckpt.restore(make_state())


def test_leftover_temp_dirs_are_cleaned_at_startup(tmp_path):
    (tmp_path / ".step-00000007.tmp-abcd1234" / "data").mkdir(parents=True)
    with outlast.Checkpointer(tmp_path):
        assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_remote_tier_restore_when_local_is_gone(tmp_path, scheme):
    import shutil

    url = f"file://{tmp_path / 'remote'}" if scheme == "file" else f"memory://outlast-test-{os.getpid()}"
    state = make_state()
    with outlast.Checkpointer(tmp_path / "local", remote=url, keep_last=2) as ckpt:
        for step in range(4):
            train(state, step)
            ckpt.save(state, step)
        ckpt.wait()
        want = tensors_of(state)
        assert [int(n[5:]) for n in sorted(ckpt.remote.names())] == [2, 3]
    shutil.rmtree(tmp_path / "local")
    # A newer upload that was cut short (data, no manifest) must not count.
    with outlast.Checkpointer(tmp_path / "local", remote=url) as ckpt:
        ckpt.remote.fs.makedirs(ckpt.remote._p(step_dir_name(9), "data"), exist_ok=True)
        ckpt.remote.fs.pipe_file(ckpt.remote._p(step_dir_name(9), "data", "w00000.safetensors"), b"partial")
        fresh = make_state(seed=9)
        with pytest.warns(UserWarning, match="upload never finished"):
            assert ckpt.restore(fresh) == 3
        assert ckpt.steps() == [3]  # downloaded into the local tier
    assert_same(tensors_of(fresh), want)
    if scheme == "memory":
        ckpt.remote.fs.rm(ckpt.remote.root, recursive=True)


def test_closed_checkpointer_refuses(tmp_path):
    ckpt = outlast.Checkpointer(tmp_path)
    ckpt.close()
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.save(make_state(), 0)


# ---------------------------------------------------------------- hooks, buffers, the pool, timeouts
def test_new_optimizer_at_a_freed_ones_id_is_hooked(tmp_path):
    """Fails with hooks keyed by id() alone: a new optimizer allocated where a freed one
    was has the same id, is taken as already hooked, and its step() changes the
    parameters while the (deliberately slow) copy is still reading them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    with outlast.Checkpointer(tmp_path) as ckpt:
        first = {"model": model, "optim": torch.optim.SGD(model.parameters(), lr=0.5)}
        ckpt.save(first, 0)
        ckpt.wait()
        old, gone = id(first["optim"]), weakref.ref(first["optim"])
        del first  # the only reference: the optimizer is freed here
        gc.collect()
        assert gone() is None, "the first optimizer is still referenced"
        keep = []
        for _ in range(1000):  # CPython usually reuses the freed block for the next object of its size
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            if id(opt) == old:
                break
            keep.append(opt)
        if id(opt) != old:
            # The engine's threads allocate too, so the block may have gone to another
            # object: then give the new optimizer the freed one's entry, which is exactly
            # what an id() collision looks like to a registry keyed by id().
            hooks = ckpt._saver._hooks
            hooks[id(opt)] = hooks.pop(old)
        state = {"model": model, "optim": opt}
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ckpt._engine.stage_delay = 0.1
        ckpt.save(state, 1)
        model(torch.randn(4, 16)).sum().backward()
        opt.step()  # must wait for the copy of the parameters
        ckpt.wait()
    saved = outlast.read(tmp_path / step_dir_name(1))["model"]
    for k, v in before.items():
        assert torch.equal(saved[k], v), k


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        self.head = torch.nn.Linear(8, 2)


def test_buffers_of_a_submodule_called_directly_are_saved_as_at_save(tmp_path):
    """Fails with a hook on the state's top module only: calling ``net.features`` directly
    (a BatchNorm inside it updates its running stats in forward) bypasses it, and the
    slow copy saves statistics from after save()."""
    torch.manual_seed(0)
    net = _Net()
    state = {"model": net}
    with outlast.Checkpointer(tmp_path) as ckpt:
        net.features(torch.randn(16, 8))
        before = {k: v.clone() for k, v in net.state_dict().items()}
        ckpt._engine.stage_delay = 0.1
        ckpt.save(state, 0)
        net.features(torch.randn(16, 8) + 3)  # mutates running_mean/var/num_batches_tracked
        ckpt.wait()
        assert ckpt.last_metrics.blocked_s > 0
    saved = outlast.read(tmp_path / step_dir_name(0))["model"]
    for k in ("features.1.running_mean", "features.1.running_var", "features.1.num_batches_tracked"):
        assert torch.equal(saved[k], before[k]), k
    assert not torch.equal(net.features[1].running_mean, before["features.1.running_mean"])


def test_modules_without_buffers_get_no_hook(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with outlast.Checkpointer(tmp_path) as ckpt:
        ckpt.save({"model": model}, 0)
        assert not model._forward_pre_hooks and not model[0]._forward_pre_hooks
        net = _Net()
        ckpt.save({"model": net}, 1)
        assert net._forward_pre_hooks and net.features[1]._forward_pre_hooks
        assert not net.head._forward_pre_hooks and not net.features[0]._forward_pre_hooks
    assert not net._forward_pre_hooks and not net.features[1]._forward_pre_hooks  # removed by close()


def test_save_waits_for_the_buffers_themselves(tmp_path, monkeypatch):
    """The persist thread takes a finished save off the in-flight list and then hands its
    buffers back; a save() arriving between the two must wait for the buffers. (Before
    the pool, save() read the in-flight list without a lock: ``while len(inflight) >=
    max: inflight[0].done.wait()`` raised IndexError when the job left the list between
    the two reads; only an unrelated lock kept the free list from being popped empty.)"""
    state = make_state()
    with outlast.Checkpointer(tmp_path) as ckpt:
        pool = ckpt._pool
        real = pool.release
        gate = threading.Event()

        def late_release(b):
            gate.wait(30)
            real(b)

        monkeypatch.setattr(pool, "release", late_release)
        ckpt.save(state, 0)
        for _ in range(3000):  # until step 0 is committed and off the list, its buffers not back
            if not ckpt._inflight:
                break
            time.sleep(0.01)
        assert not ckpt._inflight and pool.available() == 0
        threading.Timer(0.2, gate.set).start()
        train(state, 1)
        assert ckpt.save(state, 1) is True
        assert ckpt.metrics[1].backpressure_s > 0
        ckpt.wait()
        assert ckpt.steps() == [0, 1]


def test_pool_acquire_blocks_until_release_and_times_out():
    from outlast.engine import StagingPool

    pool = StagingPool(1)
    b = pool.acquire(1.0, "saving step 1")
    assert pool.try_acquire() is None
    with pytest.raises(CheckpointError, match=r"saving step 2: timed out after 0.01 s .*staging buffers"):
        pool.acquire(0.01, "saving step 2")
    threading.Timer(0.05, pool.release, args=(b,)).start()
    assert pool.acquire(30, "saving step 3") is b


def test_a_stuck_background_save_times_out_naming_what_it_waited_for(tmp_path, monkeypatch):
    """Every wait is bounded: a staging thread that never finishes makes the hook,
    wait() and close() raise CheckpointError instead of hanging the training."""
    from outlast import engine

    gate = threading.Event()
    real = engine.copy_into

    def stuck(dst, src, *a, **k):
        gate.wait(60)
        real(dst, src, *a, **k)

    state = make_state()
    ckpt = outlast.Checkpointer(tmp_path, timeout=0.2)
    monkeypatch.setattr(engine, "copy_into", stuck)
    try:
        ckpt.save(state, 0)
        with pytest.raises(CheckpointError, match=r"timed out after 0.2 s waiting for step 0's tensors"):
            train(state, 0)  # the forward hook waits for the buffers' copy
        with pytest.raises(CheckpointError, match=r"timed out after 0.2 s waiting for step 0 to be committed"):
            ckpt.wait()
    finally:
        gate.set()
        monkeypatch.undo()
    ckpt.close()
    assert ckpt.steps() == [0]


def test_staging_failure_is_raised_on_next_call_and_nothing_is_committed(tmp_path, monkeypatch):
    from outlast import engine

    def broken(dst, src, *a, **k):
        raise RuntimeError("copy failed (simulated)")

    state = make_state()
    with outlast.Checkpointer(tmp_path) as ckpt:
        monkeypatch.setattr(engine, "copy_into", broken)
        ckpt.save(state, 0)
        with pytest.raises(CheckpointError, match=r"step 0.*copy failed \(simulated\)") as ei:
            ckpt.wait()
        assert isinstance(ei.value.__cause__, RuntimeError)
        monkeypatch.undo()
        ckpt.save(state, 1)
    assert os.listdir(tmp_path) == [step_dir_name(1)]


# ---------------------------------------------------------------- the remote tier's own queue
class _Remote:
    """A memory:// remote tier whose put_file can be held at a gate or made to fail."""

    def __init__(self, ckpt, fail: int = 0, gate: threading.Event | None = None):
        self.fs = ckpt.remote.fs
        self.real = self.fs.put_file
        self.fail, self.gate, self.calls = fail, gate, 0

    def put_file(self, src, dst, *a, **k):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail:
            self.fail -= 1
            raise OSError(errno.ECONNRESET, "connection reset by peer (simulated)")
        return self.real(src, dst, *a, **k)


def _url(name: str) -> str:
    return f"memory://outlast-{name}-{os.getpid()}-{time.monotonic_ns()}"


def test_training_never_waits_for_uploads_and_wait_flushes_them(tmp_path, monkeypatch):
    """Fails with the upload on the persist thread: save(1) (max_in_flight=1) would wait
    for step 0's upload, which is held until after save(1) returns."""
    gate = threading.Event()
    state = make_state()
    with outlast.Checkpointer(tmp_path / "local", remote=_url("q"), keep_last=1) as ckpt:
        remote = _Remote(ckpt, gate=gate)
        monkeypatch.setattr(ckpt.remote.fs, "put_file", remote.put_file)
        for step in range(3):
            train(state, step)
            assert ckpt.save(state, step) is True
        ckpt.wait_staged()
        for _ in range(3000):
            if not ckpt._inflight:
                break
            time.sleep(0.01)
        assert not ckpt._inflight  # every save committed while step 0's upload is held
        assert not gate.is_set() and ckpt.remote.names() in ([], [step_dir_name(0)])
        assert {0, 1, 2} >= ckpt._uploader.pending_steps() >= {1, 2}
        # keep_last=1, but step 0 and 1 stay on disk until their uploads end
        assert ckpt.steps() == [0, 1, 2]
        gate.set()
        ckpt.wait()
        assert ckpt.remote.names() == [step_dir_name(2)]  # remote retention after each upload
        assert ckpt.steps() == [2]
        assert all(m.upload_s > 0 for m in ckpt.metrics)
    ckpt.remote.fs.rm(ckpt.remote.root, recursive=True)


def test_failed_uploads_are_retried_with_exponential_backoff(tmp_path, monkeypatch):
    from outlast.storage import remote as remote_mod

    slept = []
    monkeypatch.setattr(remote_mod.time, "sleep", slept.append)
    state = make_state()
    with outlast.Checkpointer(tmp_path, remote=_url("retry"), upload_retries=3, upload_backoff_s=0.5) as ckpt:
        remote = _Remote(ckpt, fail=2)
        monkeypatch.setattr(ckpt.remote.fs, "put_file", remote.put_file)
        ckpt.save(state, 0)
        ckpt.wait()
        assert ckpt.remote.names() == [step_dir_name(0)]
        ckpt.remote.manifest(step_dir_name(0))
        assert slept == [0.5, 1.0] and ckpt._uploader.attempts == 3
    ckpt.remote.fs.rm(ckpt.remote.root, recursive=True)


def test_upload_that_keeps_failing_is_raised_on_the_next_call(tmp_path, monkeypatch):
    from outlast.storage import remote as remote_mod

    monkeypatch.setattr(remote_mod.time, "sleep", lambda s: None)
    state = make_state()
    ckpt = outlast.Checkpointer(tmp_path, remote=_url("fail"), upload_retries=2)
    remote = _Remote(ckpt, fail=10**6)
    monkeypatch.setattr(ckpt.remote.fs, "put_file", remote.put_file)
    ckpt.save(state, 0)
    with pytest.raises(StorageError, match=r"upload of step 0 .*failed 3 time\(s\).*connection reset.*committed") as ei:
        ckpt.wait()
    assert isinstance(ei.value.__cause__, StorageError)
    assert ckpt.steps() == [0] and ckpt.remote.names() in ([], [step_dir_name(0)])
    assert "upload" in ckpt.metrics[0].error
    ckpt.close()


def test_reupload_removes_the_remote_manifest_first(tmp_path, monkeypatch):
    """Fails without it: a re-upload of a step cut short after the first of two data files
    left the old manifest vouching for a mix of new and old files of the same sizes."""
    from outlast.storage.remote import RemoteTier

    tier = RemoteTier(_url("reup"))
    path = str(tmp_path / step_dir_name(5))
    state = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    outlast.save(state, path, num_writers=2)
    tier.upload(path)
    tier.manifest(step_dir_name(5))
    outlast.save({"a": torch.ones(1000), "b": torch.ones(1000)}, path, num_writers=2, overwrite=True)
    real, n = tier.fs.put_file, [0]

    def second_fails(src, dst, *a, **k):
        n[0] += 1
        if n[0] == 2:
            raise OSError(errno.EPIPE, "broken pipe (simulated)")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(tier.fs, "put_file", second_fails)
    with pytest.raises(StorageError, match="broken pipe"):
        tier.upload(path)
    with pytest.raises(outlast.errors.IncompleteCheckpointError, match="upload never finished"):
        tier.manifest(step_dir_name(5))
    monkeypatch.undo()
    tier.upload(path)
    got = tier.manifest(step_dir_name(5))
    assert got.files.keys() == outlast.manifest_of(path).files.keys()
    tier.fs.rm(tier.root, recursive=True)


def test_a_failure_after_the_commit_says_the_checkpoint_is_valid(tmp_path, monkeypatch):
    state = make_state()
    ckpt = outlast.Checkpointer(tmp_path, keep_last=1)
    ckpt.save(state, 1)
    ckpt.wait()

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / step_dir_name(1)))

    monkeypatch.setattr(ckpt._repo, "apply_retention", refuse)  # deleting step 1 fails after step 2 commits
    ckpt.save(state, 2)
    with pytest.raises(CheckpointError) as ei:
        ckpt.wait()
    msg = str(ei.value)
    assert "step 2 was saved and committed" in msg and "Nothing of it was committed" not in msg
    assert "Permission denied" in msg
    monkeypatch.undo()
    assert ckpt.steps() == [1, 2]
    ckpt.save(state, 3)  # and the next save still works
    ckpt.close()
    assert ckpt.steps() == [3]

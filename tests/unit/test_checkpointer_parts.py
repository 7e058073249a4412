"""The Checkpointer's three parts on their own: the step-directory repository
(outlast.steps), the replicator for a remote tier (outlast.replicator) and the async
saver (outlast.async_saver). The Checkpointer's own behaviour is test_checkpointer.py's."""

from __future__ import annotations

import os
import time

import pytest
import torch

import outlast
from outlast.async_saver import AsyncSaver, SaveMetrics
from outlast.checkpointer import Checkpointer
from outlast.replicator import Replicator
from outlast.steps import Retention, StepDirectory, step_dir_name, step_of
from outlast.storage.remote import RemoteTier


def _save(repo: StepDirectory, step: int) -> str:
    path = repo.path_of(step)
    outlast.save({"w": torch.full((4,), float(step))}, path, step=step)
    return path


def _url(name: str) -> str:
    return f"memory://outlast-parts-{name}-{os.getpid()}-{time.monotonic_ns()}"


# ---------------------------------------------------------------- steps


def test_step_names_round_trip():
    assert step_of(step_dir_name(1200)) == 1200
    assert step_of("step-100") == 100 and step_of("step-x") is None and step_of(".step-00000001.tmp-1") is None


def test_repository_lists_valid_and_invalid_steps(tmp_path):
    repo = StepDirectory(tmp_path / "run")
    for s in (1, 2, 3):
        _save(repo, s)
    os.remove(os.path.join(repo.path_of(2), "manifest.json"))  # an interrupted save
    os.makedirs(os.path.join(repo.directory, "notes"))
    assert repo.scan() == ([1, 3], [2])
    assert sorted(repo.present()) == [1, 2, 3]
    assert repo.steps() == [1, 3] and repo.latest_step() == 3


def test_repository_counts_a_folder_whose_name_is_not_zero_padded(tmp_path):
    repo = StepDirectory(tmp_path)
    outlast.save({"w": torch.ones(2)}, tmp_path / "step-7", step=7)
    assert repo.steps() == [7]


def test_repository_retention_keeps_what_it_is_told_to(tmp_path):
    repo = StepDirectory(tmp_path)
    for s in (1, 2, 3, 4):
        _save(repo, s)
    assert repo.apply_retention(Retention(keep_last=1), keep={2}) == [1, 3]
    assert repo.steps() == [2, 4]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # renamed, then removed


def test_repository_recovers_leftovers(tmp_path):
    repo = StepDirectory(tmp_path)
    _save(repo, 1)
    leftover = tmp_path / ".step-00000002.tmp-abc"
    os.makedirs(leftover)
    repo.recover_leftovers()
    assert not leftover.exists() and repo.steps() == [1]


@pytest.mark.parametrize("kw", [{"keep_last": 0}, {"keep_every": True}, {"keep_last": 1.5}])
def test_retention_rejects_bad_values_naming_the_field(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Retention(**kw)


# ---------------------------------------------------------------- replicator


def test_replicator_uploads_applies_retention_and_fetches(tmp_path):
    repo = StepDirectory(tmp_path / "local")
    done = []
    rep = Replicator(RemoteTier(_url("rep")), Retention(keep_last=2), on_done=lambda s, sec, e: done.append((s, e)))
    try:
        for s in (1, 2, 3):
            rep.submit(s, _save(repo, s))
        rep.flush(timeout=60)
        assert rep.pending_steps() == set()
        assert done == [(1, None), (2, None), (3, None)]
        assert rep.scan() == ([2, 3], [])  # retention after each upload
        back = tmp_path / "back" / step_dir_name(3)
        rep.fetch(3, str(back))
        assert torch.equal(outlast.read(back)["w"], torch.full((4,), 3.0))
        with pytest.raises(outlast.errors.CheckpointError):
            rep.fetch(1, str(tmp_path / "back" / step_dir_name(1)))  # retention removed it
    finally:
        rep.close(timeout=60)
        rep.tier.fs.rm(rep.tier.root, recursive=True)


def test_replicator_that_does_not_upload_refuses_submit(tmp_path):
    rep = Replicator(RemoteTier(_url("ro")), Retention(), upload=False)
    assert rep.uploader is None and rep.pending_steps() == set() and rep.present() == []
    with pytest.raises(outlast.errors.CheckpointError, match="does not upload"):
        rep.submit(1, str(tmp_path))
    rep.flush(timeout=1)
    rep.close(timeout=1)


# ---------------------------------------------------------------- async saver


def test_async_saver_saves_in_the_background_and_reports_failure(tmp_path):
    failures = []
    saver = AsyncSaver(max_in_flight=1, nice=0, timeout=60.0, on_failure=lambda s, e: failures.append(s))
    try:
        m = SaveMetrics(1, str(tmp_path / "a"))
        bufs = saver.acquire(wait=True, what="test", metrics=m)
        assert saver.acquire(wait=False, what="test", metrics=m) is None  # one set of buffers only
        saver.start(1, {"w": torch.arange(8.0)}, m, bufs, lambda job: outlast.persist(job.prepared, m.path))
        saver.drain()
        assert m.done and m.error is None and saver.in_flight() == 0 and m.nbytes == 32
        assert torch.equal(outlast.read(m.path)["w"], torch.arange(8.0))

        def boom(job):
            raise OSError("disk on fire")

        m2 = SaveMetrics(2, str(tmp_path / "b"))
        saver.start(2, {"w": torch.ones(2)}, m2, saver.acquire(wait=True, what="test", metrics=m2), boom)
        saver.drain()
        assert failures == [2] and "disk on fire" in m2.error and saver.in_flight() == 0
        assert saver.pool.available() == 1  # the buffers came back
    finally:
        saver.close()


def test_async_saver_hooks_each_optimizer_once_and_removes_them(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = AsyncSaver(nice=0, timeout=60.0)
    try:
        for step in (1, 2):
            m = SaveMetrics(step, str(tmp_path / f"s{step}"))
            saver.start(step, {"model": model, "opt": opt}, m, saver.acquire(wait=True, what="t", metrics=m),
                        lambda job, m=m: outlast.persist(job.prepared, m.path))
            saver.drain()
        assert len(opt._optimizer_step_pre_hooks) == 1
        saver.remove_hooks()
        assert len(opt._optimizer_step_pre_hooks) == 0
    finally:
        saver.close()


def test_checkpointer_is_composed_of_the_three_parts(tmp_path):
    with Checkpointer(tmp_path / "run", keep_last=1, remote=_url("cp")) as ckpt:
        assert isinstance(ckpt._repo, StepDirectory) and ckpt._repo.directory == ckpt.directory
        assert isinstance(ckpt._saver, AsyncSaver) and ckpt._engine is ckpt._saver.engine
        assert isinstance(ckpt._replicator, Replicator) and ckpt._uploader is ckpt._replicator.uploader
        assert ckpt.retention == Retention(keep_last=1)
        ckpt.save({"w": torch.ones(2)}, 1)
        ckpt.save({"w": torch.ones(2)}, 2)
        ckpt.wait()
        assert ckpt.steps() == [2] and ckpt._replicator.scan() == ([2], [])
    ckpt.remote.fs.rm(ckpt.remote.root, recursive=True)
    with Checkpointer(tmp_path / "plain") as ckpt:
        assert ckpt._replicator is None and ckpt._uploader is None


def _count_checks(monkeypatch) -> list:
    from outlast import steps

    seen = []
    real = steps.check_local

    def counting(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(steps, "check_local", counting)
    return seen


def test_listing_validates_a_manifest_once_while_it_is_unchanged(tmp_path, monkeypatch):
    repo = StepDirectory(tmp_path)
    for s in (1, 2):
        _save(repo, s)
    seen = _count_checks(monkeypatch)
    assert repo.steps() == [1, 2] and sorted(seen) == [step_dir_name(1), step_dir_name(2)]
    assert repo.steps() == [1, 2] and len(seen) == 2  # unchanged: not parsed again
    # A manifest replaced (a new file, as every commit writes it) is validated again...
    mpath = tmp_path / step_dir_name(2) / "manifest.json"
    text = mpath.read_text()
    os.remove(mpath)
    mpath.write_text(text)
    assert repo.steps() == [1, 2] and seen[-1] == step_dir_name(2) and len(seen) == 3
    # ... and so a damaged one (its seal no longer matches) is no longer counted.
    os.remove(mpath)
    mpath.write_text(text.replace('"step":2', '"step":3'))
    assert repo.scan() == ([1], [2]) and len(seen) == 4


def test_listing_still_sees_a_truncated_or_missing_data_file(tmp_path):
    repo = StepDirectory(tmp_path)
    for s in (1, 2, 3):
        _save(repo, s)
    assert repo.steps() == [1, 2, 3]
    data = os.path.join(repo.path_of(3), "data")
    os.truncate(os.path.join(data, os.listdir(data)[0]), 10)
    os.remove(os.path.join(repo.path_of(2), "data", os.listdir(os.path.join(repo.path_of(2), "data"))[0]))
    assert repo.scan() == ([1], [2, 3])


def test_remember_spares_the_new_step_its_validation(tmp_path, monkeypatch):
    repo = StepDirectory(tmp_path)
    report = outlast.save({"w": torch.ones(3)}, repo.path_of(5), step=5)
    seen = _count_checks(monkeypatch)
    repo.remember(5, report.manifest)
    assert repo.steps() == [5] and seen == []
    assert repo.apply_retention(Retention(keep_last=1)) == [] and seen == []

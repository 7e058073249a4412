"""The one commit transaction: order of fsyncs and renames, new parents, no-exchange
filesystems, a kill -9 between the two renames, and every writer going through it."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import outlast
from outlast.storage import commit as commit_mod
from outlast.storage.commit import Transaction


@pytest.fixture
def record(monkeypatch):
    """Record ("fsync", path) and ("rename", src, dst) in the order they happen."""
    log = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b):
        log.append(("rename", os.fspath(a), os.fspath(b)))
        return real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return log


def test_save_fsyncs_every_file_then_every_dir_then_renames_then_fsyncs_the_parent(tmp_path, record):
    final = str(tmp_path / "ck")
    outlast.save({"a": torch.ones(3), "b": torch.zeros(2)}, final, num_writers=2)
    renames = [i for i, e in enumerate(record) if e[0] == "rename"]
    assert len(renames) == 1, record
    r = renames[0]
    tmp = record[r][1]
    assert os.path.basename(tmp).startswith(".ck.tmp-") and record[r][2] == final
    before = [e[1] for e in record[:r] if e[0] == "fsync"]
    files = [p for p in before if os.path.basename(p) != os.path.basename(tmp) and not p.endswith("/data")]
    assert {os.path.relpath(p, tmp) for p in files} == {"manifest.json", *(os.path.join("data", f) for f in os.listdir(os.path.join(final, "data")))}
    # the manifest after every data file; the directories after the manifest, data/ before tmp
    assert before.index(os.path.join(tmp, "manifest.json")) > max(before.index(p) for p in files if "/data/" in p)
    assert before.index(os.path.join(tmp, "data")) > before.index(os.path.join(tmp, "manifest.json"))
    assert before.index(tmp) > before.index(os.path.join(tmp, "data"))
    assert record[r + 1] == ("fsync", str(tmp_path))  # the parent, after the rename


def test_new_parent_directories_are_made_durable(tmp_path, record):
    final = tmp_path / "a" / "b" / "step-1"
    outlast.save({"x": torch.ones(1)}, final)
    synced = [e[1] for e in record if e[0] == "fsync"]
    # each directory created on the way has its own parent fsync'd
    for parent in (tmp_path, tmp_path / "a"):
        assert str(parent) in synced
    assert outlast.read(final)["x"].item() == 1


def test_overwrite_without_exchange_renames_old_aside_then_new_in(tmp_path, record, monkeypatch):
    final = str(tmp_path / "ck")
    outlast.save({"x": torch.ones(2)}, final)
    record.clear()
    monkeypatch.setattr(commit_mod, "_exchange", lambda a, b: False)  # as on NFS
    outlast.save({"x": torch.full((2,), 2.0)}, final, overwrite=True)
    steps = [e for e in record if e[0] == "rename" or e[1] == str(tmp_path)]
    assert steps[0][0] == "rename" and steps[0][1] == final and ".ck.old-" in steps[0][2]
    assert steps[1] == ("fsync", str(tmp_path))
    assert steps[2][0] == "rename" and ".ck.tmp-" in steps[2][1] and steps[2][2] == final
    assert steps[3] == ("fsync", str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # the old copy is gone after the commit
    assert outlast.read(final)["x"].tolist() == [2.0, 2.0]


CRASH_CHILD = textwrap.dedent("""
    import os, signal, sys, torch, outlast
    from outlast.storage import commit
    final = sys.argv[1]
    if len(sys.argv) < 3:
        outlast.save({"x": torch.arange(4.0)}, final)
    commit._exchange = lambda a, b: False          # a filesystem without RENAME_EXCHANGE
    real = os.rename
    def rename(a, b):
        real(a, b)
        if os.fspath(a) == final:                  # the old copy is aside, the new one not yet in
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
    outlast.save({"x": torch.full((4,), -1.0)}, final, overwrite=True)
""")


def test_kill_between_the_two_renames_is_recovered_on_the_next_open(tmp_path):
    final = str(tmp_path / "ck")
    p = subprocess.run([sys.executable, "-c", CRASH_CHILD, final], timeout=120, capture_output=True)
    assert p.returncode == -9, p.stderr.decode()
    left = sorted(os.listdir(tmp_path))
    assert "ck" not in left and any(n.startswith(".ck.old-") for n in left), left
    rows = outlast.reader.list_checkpoints(str(tmp_path))  # `outlast ls` recovers it too
    assert [r["name"] for r in rows if r["status"] == "committed"] == ["ck"]
    assert outlast.read(final)["x"].tolist() == [0.0, 1.0, 2.0, 3.0]  # the last good one, exactly


def test_a_stale_moved_aside_copy_is_never_what_recovers(tmp_path):
    """Found by the soak: a kill during the cleanup of an earlier two-step commit left an older
    .old- copy with its manifest; a later cut commit then 'recovered' that older one."""
    final = str(tmp_path / "ck")
    outlast.save({"x": torch.full((4,), 1.0)}, final)
    os.rename(final, str(tmp_path / ".ck.old-00000000"))   # v1, left by a cut cleanup
    outlast.save({"x": torch.arange(4.0)}, final)           # v2 committed since
    p = subprocess.run([sys.executable, "-c", CRASH_CHILD, final, "keep"], timeout=120, capture_output=True)
    assert p.returncode == -9, p.stderr.decode()
    assert outlast.read(final)["x"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_open_of_a_missing_checkpoint_recovers_the_moved_aside_copy(tmp_path):
    final = str(tmp_path / "ck")
    outlast.save({"x": torch.ones(2)}, final)
    os.rename(final, str(tmp_path / ".ck.old-abcd1234"))
    assert outlast.read(final)["x"].tolist() == [1.0, 1.0]
    assert os.path.isdir(final) and not os.path.exists(tmp_path / ".ck.old-abcd1234")


def test_every_writer_commits_through_the_transaction(tmp_path, monkeypatch):
    calls = []
    real = Transaction.commit

    def commit(self, manifest=None):
        calls.append(os.path.basename(self.final))
        return real(self, manifest)

    monkeypatch.setattr(Transaction, "commit", commit)
    outlast.save({"model": {"w": torch.ones(2, 2)}}, tmp_path / "saved")
    with outlast.CheckpointWriter(tmp_path / "streamed", [outlast.TensorSpec("w", "F32", (2,))]) as w:
        w.write("w", torch.ones(2))
    outlast.save({"model": {"w": torch.zeros(2, 2)}}, tmp_path / "saved2")
    outlast.merge_checkpoints([tmp_path / "saved", tmp_path / "saved2"], tmp_path / "merged")
    outlast.convert_checkpoint(tmp_path / "saved", tmp_path / "hf", src_format="outlast", dst_format="hf", prefix="model")
    from outlast.storage.remote import RemoteTier

    outlast.save({"model": {"w": torch.ones(2, 2)}}, tmp_path / "step-1")
    tier = RemoteTier(f"file://{tmp_path}/remote")
    tier.upload(str(tmp_path / "step-1"))
    tier.download("step-1", str(tmp_path / "downloaded"))
    assert calls == ["saved", "streamed", "saved2", "merged", "hf", "step-1", "downloaded"]
    assert torch.equal(outlast.read(tmp_path / "downloaded")["model"]["w"], torch.ones(2, 2))


def test_transaction_aborted_by_an_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with Transaction(tmp_path / "ck") as tx:
            open(os.path.join(tx.tmp, "data", "f"), "wb").write(b"x")
            raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == []


def test_checkpointer_recovers_a_step_moved_aside_by_a_cut_commit(tmp_path):
    with outlast.Checkpointer(tmp_path / "run") as ck:
        ck.save({"x": torch.full((3,), 5.0)}, 5)
        ck.wait()
    step = tmp_path / "run" / "step-00000005"
    os.rename(step, tmp_path / "run" / ".step-00000005.old-0badcafe")
    state = {"x": torch.zeros(3)}
    with outlast.Checkpointer(tmp_path / "run") as ck:
        assert ck.restore(state) == 5
    assert state["x"].tolist() == [5.0, 5.0, 5.0] and step.is_dir()

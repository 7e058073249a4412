"""The Checkpointer under torch.distributed: 2 real processes, gloo."""

import os

import pytest

from tests.dist.harness import run_job


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_two_ranks_save_restore_retention_remote(tmp_path):
    directory, remote = str(tmp_path / "run"), str(tmp_path / "remote")
    res = run_job("ckpt_jobs", "roundtrip", 2, directory, "file://" + remote)
    for r in res:
        assert r["steps"] == [2, 3]
        assert r["restored"] == 3
        assert r["equal"]
    assert sorted(os.listdir(remote)) == ["step-00000002", "step-00000003"]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_failure_on_one_rank_is_raised_or_settled_on_every_rank(tmp_path):
    """Each part hung (until the harness killed the job) before: rank 0 waited in persist
    for a rank whose copy had failed, in restore's agreement for a rank that had raised a
    PermissionError, and rank 1 returned from wait() while rank 0 raised the upload error."""
    directory, remote = str(tmp_path / "run"), "file://" + str(tmp_path / "remote")
    res = run_job("ckpt_jobs", "failures", 2, directory, remote, timeout=150)
    for r in res:
        assert r["timeouts"] == [60.0, 60.0, 60.0]  # the Checkpointer's groups inherit the job's timeout
        assert r["staging"]["type"] == "DistributedError", r["staging"]
        assert "rank 1" in r["staging"]["msg"] and "copy into the staging buffer failed" in r["staging"]["msg"]
        assert r["steps"] == [0, 2]
        assert r["restored"] == 0
        assert r["upload"]["type"] == "StorageError", r["upload"]
        assert "Access Denied" in r["upload"]["msg"]
    assert "staging step 1" in res[0]["staging"]["msg"]

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

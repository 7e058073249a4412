"""The memory tier under real failures: 4 gloo ranks under ``torchrun --max-restarts``.

Each scenario is one torchrun launch of tests/dist/memtier_job.py (4 ranks as 2 nodes of
2, or as 4 nodes for parity), whose first attempt injects a fault: ``kill -9`` of a rank,
a rank killed inside a snapshot (torn), a flipped byte, a whole node's ranks killed and
its shared memory deleted, both copies of a shard deleted. torchrun restarts the ranks,
they ``restore`` and finish; the final state must be bit-identical to a run that never
failed. That reference is computed here in one process: the job's update is elementwise,
so its result does not depend on the world size (which is also what lets the 4 -> 2
restart be compared exactly). Several assertions share one launch where they look at
different restarts of the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest
import torch

import outlast
from outlast.memtier import store
from tests.dist import memtier_job as job

pytestmark = pytest.mark.slow

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TIMEOUT = 240


def reference() -> dict:
    state = job.make_state(0, 1)
    for step in range(job.STEPS):
        job.update(state, step)
    return {"w": state["w"].local.reshape(job.SHAPE), "m": state["m"].local.reshape(job.SHAPE), "step": state["meta"]["step"]}


def launch(tmp, name: str, world: int, restarts: int, redundancy: str, rpn: int, scenario: str, job_id: str,
           check: bool = True) -> str:
    out = os.path.join(tmp, name)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           f"--max-restarts={restarts}", "--monitor-interval=0.2", os.path.join(ROOT, "tests", "dist", "memtier_job.py"),
           out, os.path.join(tmp, "disk"), job_id, redundancy, str(rpn), scenario]
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        raise AssertionError(f"{scenario}: timed out after {TIMEOUT}s:\n{log.decode()[-4000:]}")
    text = log.decode(errors="replace")
    with open(os.path.join(out, "log.txt"), "w") as f:
        f.write(text)
    if check and p.returncode != 0:
        raise AssertionError(f"{scenario}: torchrun failed with {p.returncode}:\n{text[-6000:]}")
    return out


def attempts(out: str, attempt: int, world: int) -> list[dict]:
    res = []
    for r in range(world):
        with open(os.path.join(out, f"attempt{attempt}-rank{r}.json")) as f:
            res.append(json.load(f))
    return res


def assert_bit_exact(out: str) -> None:
    got = outlast.read(os.path.join(out, "final"))
    ref = reference()
    assert got["meta"]["step"] == ref["step"] == job.STEPS - 1
    assert torch.equal(got["w"], ref["w"]), "weights differ from a run that never failed"
    assert torch.equal(got["m"], ref["m"]), "momentum differs from a run that never failed"


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("memtier"))


@pytest.fixture(scope="module")
def kill_run(tmp_root):
    """kill -9 in a snapshot (torn step 7) plus a flipped byte in step 6 -> memory; then
    both copies of rank 1 deleted and rank 1 killed -> disk; then to the end."""
    job_id = f"t{uuid.uuid4().hex[:10]}"
    try:
        out = launch(os.path.join(tmp_root, "kill"), "out", 4, 2, "mirror", 2, "kill_torn_flip", job_id)
        yield out, job_id
    finally:
        shutil.rmtree(store.job_dir("/dev/shm", job_id), ignore_errors=True)


def test_kill9_one_rank_resumes_from_memory_bit_exact(kill_run):
    out, _ = kill_run
    first = attempts(out, 1, 4)
    assert all(a["restore"]["source"] == "memory" and a["start"] == 6 == a["meta_step"] for a in first)
    assert all(a["start"] is None for a in attempts(out, 0, 4))
    assert_bit_exact(out)


def test_torn_snapshot_falls_back_to_previous_complete_step(kill_run):
    out, _ = kill_run
    # rank 2 died inside step 7's snapshot, after the others wrote theirs
    skipped = attempts(out, 1, 4)[0]["restore"]["skipped"]
    assert len(skipped) == 1 and skipped[0].startswith("step 7:") and "w00002" in skipped[0]


def test_flipped_byte_is_detected_and_that_copy_unused(kill_run):
    out, _ = kill_run
    bad = attempts(out, 1, 4)[0]["restore"]["bad_copies"]
    assert len(bad) == 1 and "w00001" in bad[0] and "checksum mismatch" in bad[0] and "node 0" in bad[0]
    assert "damaged" in open(os.path.join(out, "log.txt")).read()  # the user is told (warning)


def test_both_copies_lost_falls_back_to_disk_and_says_so(kill_run):
    out, _ = kill_run
    third = attempts(out, 2, 4)
    assert all(a["restore"]["source"] == "disk" and a["start"] == 8 for a in third)
    assert any("w00001" in w and "no intact copy" in w for w in third[0]["restore"]["why"])
    log = open(os.path.join(out, "log.txt")).read()
    assert "memory snapshots cannot be used, restoring from disk" in log


def test_clean_end_frees_shared_memory(kill_run):
    out, job_id = kill_run
    assert all(a["shm_after_close"] is False for a in attempts(out, 2, 4))
    assert not os.path.exists(store.job_dir("/dev/shm", job_id))


@pytest.mark.parametrize("redundancy,rpn,scenario,lost_rank_rebuilt", [
    ("mirror", 2, "node_loss", []),          # 2 nodes of 2: node 1's ranks killed, its shm deleted
    ("parity", 1, "parity_node_loss", [2]),  # 4 nodes of 1, one parity group of 4: node 2 lost
])
def test_whole_node_lost_recovered_from_memory(tmp_root, redundancy, rpn, scenario, lost_rank_rebuilt):
    job_id = f"t{uuid.uuid4().hex[:10]}"
    try:
        out = launch(os.path.join(tmp_root, scenario), "out", 4, 1, redundancy, rpn, scenario, job_id)
    finally:
        shutil.rmtree(store.job_dir("/dev/shm", job_id), ignore_errors=True)
    second = attempts(out, 1, 4)
    assert all(a["restore"]["source"] == "memory" and a["start"] == 6 for a in second)
    assert second[0]["restore"]["rebuilt"] == lost_rank_rebuilt
    assert_bit_exact(out)


def test_restart_on_two_ranks_from_a_four_rank_snapshot(tmp_root):
    job_id = f"t{uuid.uuid4().hex[:10]}"
    tmp = os.path.join(tmp_root, "shrink")
    try:
        # every rank of the 4-rank job is killed after step 6; no restarts: the job fails
        launch(tmp, "out", 4, 0, "mirror", 2, "shrink", job_id, check=False)
        out = launch(tmp, "out", 2, 0, "mirror", 2, "shrink", job_id)
    finally:
        shutil.rmtree(store.job_dir("/dev/shm", job_id), ignore_errors=True)
    two = attempts(out, 1, 2)
    assert all(a["world"] == 2 and a["restore"]["source"] == "memory" and a["start"] == 6 for a in two)
    assert not os.path.exists(os.path.join(tmp, "disk", "step-00000006"))  # only disk steps 0 and 4 exist
    assert_bit_exact(out)

"""Offloaded optimizer state reshards like any other layout (real processes, gloo).

Two uninterrupted 2-rank runs save after K steps: FSDP2 with torch AdamW, and DDP with
OffloadAdamW (each rank its own state files). Each checkpoint is then resumed on 1 rank
in the other layout. Losses after the resume match the uninterrupted run within the
tolerance of another reduction order (as tests/dist/test_training.py); a resume into the
same layout at the same world size is bit-exact (tests/unit/test_offload_checkpoint.py).
"""

import shutil
import tempfile

import pytest

from tests.dist.harness import run_job

pytestmark = pytest.mark.slow


def test_offloaded_state_reshards_both_ways(tmp_path):
    root = str(tmp_path)
    ref = {kind: run_job("jobs_offload", "reference", 2, root, kind)[0]["losses"] for kind in ("fsdp", "offload")}
    one = run_job("jobs_offload", "resume", 1, root, "offload:fsdp,fsdp:offload")[0]
    assert one["offload:fsdp"] == pytest.approx(ref["offload"], abs=1e-4)
    assert one["fsdp:offload"] == pytest.approx(ref["fsdp"], abs=1e-4)


def test_async_checkpointer_writes_offloaded_state_from_files_on_two_ranks():
    root = tempfile.mkdtemp(prefix="outlast-offload-async-")
    try:
        res = run_job("jobs_offload", "async_save", 2, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for r in res:
        assert r["same"], "the checkpoint does not hold the offloaded state of the step it was saved at"
    # The ranks' staging together: the parameters (half the AdamW state's bytes) and headers.
    # Staging the state too, as before, would be the parameters plus the state: 1.5x.
    assert sum(r["staged"] for r in res) < res[0]["state_bytes"], res

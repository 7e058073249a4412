"""Offloaded optimizer state reshards like any other layout (real processes, gloo).

Two uninterrupted 2-rank runs save after K steps: FSDP2 with torch AdamW, and DDP with
OffloadAdamW (each rank its own state files). Each checkpoint is then resumed in the
other layout on 1 and 2 ranks, and the offloaded one also as itself. Losses after the
resume match the uninterrupted run: bit for bit for the same layout and world size,
otherwise within the tolerance of another reduction order (as tests/dist/test_training.py).
"""

import tempfile

import pytest

from tests.dist.harness import run_job

pytestmark = pytest.mark.slow


def test_offloaded_state_reshards_both_ways():
    root = tempfile.mkdtemp(prefix="outlast-offload-reshard-")
    ref = {kind: run_job("jobs_offload", "reference", 2, root, kind)[0]["losses"] for kind in ("fsdp", "offload")}
    two = run_job("jobs_offload", "resume", 2, root, "offload:offload,fsdp:offload")[0]
    assert two["offload:offload"] == ref["offload"]
    assert two["fsdp:offload"] == pytest.approx(ref["fsdp"], abs=1e-4)
    one = run_job("jobs_offload", "resume", 1, root, "offload:fsdp,fsdp:offload")[0]
    assert one["offload:fsdp"] == pytest.approx(ref["offload"], abs=1e-4)
    assert one["fsdp:offload"] == pytest.approx(ref["fsdp"], abs=1e-4)

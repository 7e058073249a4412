"""Training continuity: FSDP2 on 2 ranks, save model + AdamW state, resume elsewhere.

The losses after resuming must match the uninterrupted run: bit-exactly at the same
world size and layout (same arithmetic in the same order), and within 1e-4 absolute
otherwise. With another world size the per-rank micro-batches differ, so losses and
gradients are summed in another order (all-reduce / reduce-scatter over 1, 3 ranks
or DDP buckets instead of FSDP2 on 2): float32 rounding differs in the last bits and
AdamW carries that forward for a few steps.
"""


import pytest

from tests.dist.harness import run_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train"))
    return root, run_job("jobs_train", "reference", 2, root)[0]["losses"]


def test_resume_same_world_size_bit_exact_and_into_ddp(ref):
    root, losses = ref
    res = run_job("jobs_train", "resume", 2, root, "fsdp,ddp")[0]
    assert res["fsdp"]["losses"] == losses
    assert res["ddp"]["losses"] == pytest.approx(losses, abs=1e-4)


@pytest.mark.parametrize("world", [1, 3])
def test_resume_other_world_sizes(ref, world):
    root, losses = ref
    res = run_job("jobs_train", "resume", world, root, "fsdp")[0]
    assert res["fsdp"]["losses"] == pytest.approx(losses, abs=1e-4)

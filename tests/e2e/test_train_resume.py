"""Exact resume: a run stopped and resumed equals the run that never stopped.

Same world size: losses (and final weights) are bit-identical. Another world size:
the same documents make each step's update, but partial sums over ranks and
micro-batches add in another order, so losses agree to float32 rounding (measured
~1e-8 relative over these steps; asserted at 1e-5).
"""

import shutil

import pytest
import torch

import outlast

from train_helpers import check, losses, run_train, small_config

pytestmark = pytest.mark.slow


def final_model(run_dir, step=8):
    return outlast.read(f"{run_dir}/checkpoints/step-{step:08d}", keys="train.model")["train"]["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_on_one_process_is_bit_exact(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    check(run_train(tmp_path, small_config(full), name="full"))
    check(run_train(tmp_path, small_config(split, stop_after=3), name="stop"))
    assert sorted(losses(split)) == [1, 2, 3]
    r = check(run_train(tmp_path, small_config(split), name="resume"))
    assert "resumed from step 3" in r.stderr
    assert losses(split) == losses(full)
    assert_same_weights(final_model(split), final_model(full))


def test_update_does_not_depend_on_the_micro_batch_split(tmp_path):
    # Documents no longer than either budget (a longer one would be cut into pieces that do
    # not see each other: another computation). Twice the budget packs about twice the
    # documents per micro-batch, and first-fit-decreasing groups them differently again.
    a, b = tmp_path / "a", tmp_path / "b"
    data = {"max_doc_tokens": 64, "token_budget": 64}
    check(run_train(tmp_path, small_config(a, steps=4, data=data), name="a"))
    data = {"max_doc_tokens": 64, "token_budget": 128, "packing": "first_fit_decreasing"}
    check(run_train(tmp_path, small_config(b, steps=4, data=data), name="b"))
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5), s


def test_two_ranks_resume_bit_exact_and_on_one_rank_within_tolerance(tmp_path):
    full, split, shrunk = tmp_path / "full", tmp_path / "split", tmp_path / "shrunk"
    check(run_train(tmp_path, small_config(full), 2, name="full"))
    check(run_train(tmp_path, small_config(split, stop_after=4), 2, name="stop"))
    shutil.copytree(split, shrunk)

    # Same world size: bit-exact.
    check(run_train(tmp_path, small_config(split), 2, name="resume2"))
    assert losses(split) == losses(full)
    assert_same_weights(final_model(split), final_model(full))

    # 2 ranks -> 1 rank: the same global batches, so the same curve up to summation order.
    r = check(run_train(tmp_path, small_config(shrunk), 1, name="resume1"))
    assert "saved on 2 rank(s), now 1" in r.stderr
    ref, got = losses(full), losses(shrunk)
    assert got.keys() == ref.keys()
    for s in range(1, 5):
        assert got[s] == ref[s]  # before the stop: the same run
    for s in range(5, 9):
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=0), s
    a, b = final_model(shrunk), final_model(full)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_fsdp2_resume_bit_exact_and_into_ddp_on_one_rank(tmp_path):
    fsdp = {"mode": "fsdp"}
    full, split, into_ddp = tmp_path / "full", tmp_path / "split", tmp_path / "ddp"
    check(run_train(tmp_path, small_config(full, dist=fsdp), 2, name="full"))
    check(run_train(tmp_path, small_config(split, dist=fsdp, stop_after=4), 2, name="stop"))
    shutil.copytree(split, into_ddp)
    check(run_train(tmp_path, small_config(split, dist=fsdp), 2, name="resume"))
    assert losses(split) == losses(full)
    assert_same_weights(final_model(split), final_model(full))
    # FSDP2 shards on 2 ranks -> DDP on 1 rank, no conversion step.
    check(run_train(tmp_path, small_config(into_ddp), 1, name="into_ddp"))
    ref, got = losses(full), losses(into_ddp)
    for s in range(5, 9):
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=0), s

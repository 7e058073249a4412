"""The trainer's ``optim.offload_dir`` switch (here with ``offload_overlap_forward``): the same
losses as in-memory AdamW, and a run resumes across the switch (offloaded -> in memory) bit for bit."""

from __future__ import annotations

import os

import pytest

from outlast.train.config import ConfigError, DistConfig, OptimConfig, TrainConfig
from outlast.train.loop import read_log
from train_helpers import check, run_train, small_config


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_log(str(run_dir)) if "loss" in r}


def test_offloaded_training_equals_in_memory_and_resumes_without_offload(tmp_path):
    a, b = tmp_path / "mem", tmp_path / "off"
    check(run_train(tmp_path, small_config(a, steps=6), name="a"))
    # offloaded for steps 1-4 (checkpoint at 4, stop), then resumed in memory for 5-6
    # with overlap_forward: each step is finished by the next forward, and by the save at step 4
    check(run_train(tmp_path, small_config(b, steps=6, stop_after=4, optim={"offload_dir": "offload",
                                                                            "offload_overlap_forward": True}), name="b1"))
    assert os.path.exists(b / "offload" / "rank0" / "state.json")
    check(run_train(tmp_path, small_config(b, steps=6), name="b2"))
    assert _losses(a) == _losses(b)
    assert sorted(_losses(b)) == [1, 2, 3, 4, 5, 6]


def test_offload_needs_ddp():
    with pytest.raises(ConfigError, match="offload_dir"):
        TrainConfig(optim=OptimConfig(offload_dir="x"), dist=DistConfig(mode="fsdp"))


def test_overlap_forward_under_ddp_on_two_ranks_equals_in_memory(tmp_path):
    # Two gloo ranks: DDP's all-reduce happens in backward, step() starts after it, and each
    # rank's next forward finishes its own offloaded step; losses equal the in-memory run's.
    # Both with optim.fused (torch's fused kernel, in memory and offloaded).
    a, b = tmp_path / "mem2", tmp_path / "off2"
    check(run_train(tmp_path, small_config(a, steps=4, optim={"fused": True}), nproc=2, name="a2"))
    check(run_train(tmp_path, small_config(b, steps=4, optim={"offload_dir": "offload", "offload_overlap_forward": True,
                                                              "fused": True}),
                    nproc=2, name="b2"))
    assert os.path.exists(b / "offload" / "rank1" / "state.json")
    assert _losses(a) == _losses(b)
    assert sorted(_losses(b)) == [1, 2, 3, 4]

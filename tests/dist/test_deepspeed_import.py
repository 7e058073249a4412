"""outlast.convert.deepspeed against real DeepSpeed ZeRO checkpoints (CPU, gloo).

The checkpoints are written once per session by tests/fixtures/make_deepspeed_ckpt.py
under torchrun at world sizes 1, 2 and 3, for ZeRO stages 1, 2, 3 x fp32, bf16. Every
reference comes from DeepSpeed itself (its consolidation script and the live engine's
``safe_get_full_*`` getters), so these tests pin the reader to DeepSpeed, not to itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

# DeepSpeed is a test extra: if it does not import, the suite fails here (no silent skip).
import deepspeed  # noqa: F401,E402  (only to write the checkpoints; the reader never imports it)

from safetensors.torch import load_file

from outlast.convert.deepspeed import DeepSpeedFormatError, read_deepspeed

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
SCRIPT = os.path.join(FIXTURES, "make_deepspeed_ckpt.py")
WORLD_SIZES = (1, 2, 3)
STAGES = (1, 2, 3)
DTYPES = ("fp32", "bf16")
CASES = [(w, s, d) for w in WORLD_SIZES for s in STAGES for d in DTYPES]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> str:
    """Write every case; one torchrun per world size (DeepSpeed start-up dominates)."""
    out = str(tmp_path_factory.mktemp("deepspeed"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for world in WORLD_SIZES:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", SCRIPT, "--out", out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return out


def case_dir(root: str, world: int, stage: int, dtype: str) -> str:
    return os.path.join(root, f"ws{world}", f"z{stage}_{dtype}")


def reference(d: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """{"fp32"|"model"|"master"|"exp_avg"|"exp_avg_sq": {fqn: tensor}}, metadata."""
    refs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(os.path.join(d, "reference.safetensors")).items():
        kind, fqn = key.split(".", 1)
        refs.setdefault(kind, {})[fqn] = t
    with open(os.path.join(d, "reference.json")) as f:
        return refs, json.load(f)


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}"
    assert torch.equal(got, want), f"{what}: max |diff| {(got.float() - want.float()).abs().max().item()}"


@pytest.mark.parametrize("world,stage,dtype", CASES)
def test_matches_deepspeed_consolidation(ckpts, world, stage, dtype):
    """fp32 weights == DeepSpeed's own zero_to_fp32 consolidation, bit for bit."""
    d = case_dir(ckpts, world, stage, dtype)
    refs, meta = reference(d)
    st = read_deepspeed(d)
    assert (st.zero_stage, st.world_size, st.step) == (stage, world, meta["train_steps"])
    assert st.model_dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    for fqn, want in refs["fp32"].items():
        src = st.shared.get(fqn, fqn)
        # Trainable params come out of the fp32 partitions; buffers and frozen params
        # DeepSpeed returns as stored (frozen ones in the model dtype).
        got = st.master[src] if src in st.master else st.model[fqn]
        assert_bit_equal(got, want, f"{d}: {fqn}")


@pytest.mark.parametrize("world,stage,dtype", CASES)
def test_matches_live_engine(ckpts, world, stage, dtype):
    """Model weights (run dtype), master weights and Adam moments == what the live engine held."""
    d = case_dir(ckpts, world, stage, dtype)
    refs, _ = reference(d)
    st = read_deepspeed(d)
    for fqn, want in refs["model"].items():
        assert_bit_equal(st.model[fqn], want, f"{d}: model {fqn}")
    assert set(st.master) == set(refs["master"])
    for fqn, want in refs["master"].items():
        assert_bit_equal(st.master[fqn], want, f"{d}: master {fqn}")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_bit_equal(st.optim_state[fqn][key], refs[key][fqn], f"{d}: {key} {fqn}")
        assert st.optim_state[fqn]["step"].item() == st.step


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", (2, 3))
def test_optimizer_state_independent_of_world_size(ckpts, stage, world):
    """Same training at world size N and 1 gives the same Adam state -- up to rounding.

    Not bit-exact: the gradient all-reduce sums per-rank means in another order than one
    rank's mean over the whole batch. Measured on fp32: relative differences <= ~1e-6.
    bf16 runs differ by a few percent (bf16 gradients), so only fp32 is compared; the exact
    checks are test_matches_live_engine.
    """
    one = read_deepspeed(case_dir(ckpts, 1, stage, "fp32"))
    many = read_deepspeed(case_dir(ckpts, world, stage, "fp32"))
    assert set(one.optim_state) == set(many.optim_state)
    for fqn, s1 in one.optim_state.items():
        sn = many.optim_state[fqn]
        assert sn["step"].item() == s1["step"].item()
        for key in ("exp_avg", "exp_avg_sq"):
            scale = s1[key].abs().max().item()
            torch.testing.assert_close(sn[key], s1[key], rtol=1e-5, atol=1e-5 * scale, msg=f"{fqn} {key}")
        torch.testing.assert_close(many.master[fqn], one.master[fqn], rtol=1e-5, atol=1e-6)


def test_iter_tensors_streams_everything_once(ckpts):
    st = read_deepspeed(case_dir(ckpts, 2, 3, "bf16"))
    names = [n for n, _ in st.iter_tensors()]
    assert len(names) == len(set(names))
    assert {n[len("model."):] for n in names if n.startswith("model.")} == set(st.model)  # tied aliases too
    streamed = dict(st.iter_tensors())
    for fqn, t in st.master.items():
        assert torch.equal(streamed[f"master.{fqn}"], t)
        assert torch.equal(streamed[f"optim.state.{fqn}.exp_avg_sq"], st.optim_state[fqn]["exp_avg_sq"])


def test_param_groups_are_json_and_name_fqns(ckpts):
    st = read_deepspeed(case_dir(ckpts, 3, 2, "fp32"))
    json.dumps(st.param_groups)
    assert [g["weight_decay"] for g in st.param_groups] == [0.1, 0.0]
    assert sorted(p for g in st.param_groups for p in g["params"]) == sorted(st.master)
    assert st.shared == {"head.weight": "embed.weight"}


@pytest.mark.parametrize("stage", STAGES)
def test_resume_in_plain_torch_matches_deepspeed_next_step(ckpts, stage):
    """Load a world-size-2 checkpoint into a plain model + torch AdamW; one step == DeepSpeed's.

    fp32 only: the plain loop has no bf16 master/low-precision split to mimic. The losses
    are not bit-identical because DeepSpeed ran two ranks (all-reduced gradients); the
    observed gap is ~1e-7 relative, so 1e-5 is asserted.
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    sys.path.insert(0, FIXTURES)
    try:
        import make_deepspeed_ckpt as fx
    finally:
        sys.path.remove(FIXTURES)

    d = case_dir(ckpts, 2, stage, "fp32")
    _, meta = reference(d)
    st = read_deepspeed(d)

    model = fx.TinyLM()
    model.load_state_dict(st.model, strict=True)
    optim = torch.optim.AdamW(fx.param_groups(model), lr=fx.LR, betas=fx.BETAS, eps=fx.EPS)
    set_optimizer_state_dict(model, optim, st.optimizer_state_dict())
    assert optim.param_groups[0]["weight_decay"] == fx.WEIGHT_DECAY

    assert_next_step_matches(fx, model, optim, meta)


def assert_next_step_matches(fx, model, optim, meta) -> None:
    """The resumed model's loss, and its loss after one more step, equal DeepSpeed's."""
    x, y = fx.batch(meta["train_steps"])
    loss = fx.loss_fn(model(x), y)
    assert loss.item() == pytest.approx(meta["loss_resume"], rel=1e-6)
    loss.backward()
    optim.step()
    with torch.no_grad():
        x, y = fx.batch(meta["train_steps"] + 1)
        loss_next = fx.loss_fn(model(x), y).item()
    assert loss_next == pytest.approx(meta["loss_next"], rel=1e-5)


# ---- errors -----------------------------------------------------------------------------


@pytest.fixture
def copy_of(ckpts, tmp_path):
    def make(world: int, stage: int, dtype: str) -> str:
        dst = str(tmp_path / "ckpt")
        shutil.copytree(case_dir(ckpts, world, stage, dtype), dst)
        return dst
    return make


@pytest.mark.parametrize("stage,dtype,missing", [
    (2, "fp32", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    (3, "bf16", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    (1, "bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
])
def test_missing_rank_file_names_it(copy_of, stage, dtype, missing):
    d = copy_of(2, stage, dtype)
    os.remove(os.path.join(d, "step3", missing))
    with pytest.raises(DeepSpeedFormatError, match=missing) as info:
        read_deepspeed(d)
    assert d in str(info.value) and "copy the complete checkpoint" in str(info.value)


def test_missing_latest(copy_of):
    d = copy_of(1, 1, "fp32")
    os.remove(os.path.join(d, "latest"))
    with pytest.raises(DeepSpeedFormatError, match=r"missing file 'latest'.*step3.*tag="):
        read_deepspeed(d)
    assert read_deepspeed(d, tag="step3").zero_stage == 1
    assert read_deepspeed(os.path.join(d, "step3")).zero_stage == 1  # the tag folder itself


def test_wrong_tag(copy_of):
    d = copy_of(1, 2, "fp32")
    with pytest.raises(DeepSpeedFormatError, match=r"no checkpoint tag 'step9'.*step3"):
        read_deepspeed(d, tag="step9")


def test_no_optimizer_files_is_unsupported(copy_of):
    d = copy_of(1, 2, "fp32")
    os.remove(os.path.join(d, "step3", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    with pytest.raises(DeepSpeedFormatError, match="stage 1/2/3"):
        read_deepspeed(d)


def test_refuses_foreign_pickled_objects(copy_of):
    """A class outside the three stand-ins is refused by weights_only, not executed."""
    d = copy_of(1, 2, "fp32")
    path = os.path.join(d, "step3", "mp_rank_00_model_states.pt")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd["evil"] = _Evil()
    torch.save(sd, path)
    with pytest.raises(DeepSpeedFormatError, match="weights_only"):
        read_deepspeed(d)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


# ---- resuming a DeepSpeed run under outlast ---------------------------------------------


def _fixture_module():
    sys.path.insert(0, FIXTURES)
    try:
        import make_deepspeed_ckpt as fx
    finally:
        sys.path.remove(FIXTURES)
    return fx


@pytest.mark.parametrize("stage", STAGES)
def test_converted_checkpoint_resumes_under_outlast_in_one_process(ckpts, tmp_path, stage):
    """DeepSpeed (2 ranks, ZeRO-N) -> outlast convert -> outlast.load at 1 process: same next loss.

    Tolerance as in the plain-torch resume above: DeepSpeed all-reduced two ranks'
    gradients, this process computes the whole batch, so sums round differently (~1e-7).
    """
    import outlast

    fx = _fixture_module()
    d = case_dir(ckpts, 2, stage, "fp32")
    _, meta = reference(d)
    out = str(tmp_path / "outlast")
    outlast.convert_checkpoint(d, out, src_format="deepspeed", dst_format="outlast", prefix="train")
    assert outlast.manifest_of(out).step == meta["train_steps"]
    model = fx.TinyLM()
    optim = torch.optim.AdamW(fx.param_groups(model), lr=fx.LR, betas=fx.BETAS, eps=fx.EPS)
    report = outlast.load({"train": outlast.ModelOptimizerState(model, optim)}, out)
    assert report.missing == []
    assert_next_step_matches(fx, model, optim, meta)


def test_converted_checkpoint_resumes_under_fsdp2_at_another_world_size(ckpts, tmp_path):
    """DeepSpeed ZeRO-3 on 2 ranks -> outlast -> FSDP2 on 3 ranks: the same next loss."""
    import outlast

    from tests.dist.harness import run_job

    d = case_dir(ckpts, 2, 3, "fp32")
    _, meta = reference(d)
    out = str(tmp_path / "outlast")
    outlast.convert_checkpoint(d, out, src_format="deepspeed", dst_format="outlast", prefix="train")
    results = run_job("jobs_deepspeed", "resume_fsdp2", 3, out)
    for r in results:
        assert r["loss_resume"] == pytest.approx(meta["loss_resume"], rel=1e-6)
        assert r["loss_next"] == pytest.approx(meta["loss_next"], rel=1e-5)


@pytest.mark.parametrize("world,stage,dtype", [(2, 1, "bf16"), (3, 3, "fp32"), (1, 2, "bf16"), (2, 3, "bf16")])
def test_tensor_specs_describe_iter_tensors_without_assembling(ckpts, world, stage, dtype):
    from outlast import dtypes

    st = read_deepspeed(case_dir(ckpts, world, stage, dtype))
    got = [(n, dtypes.to_safetensors(t.dtype), tuple(t.shape)) for n, t in st.iter_tensors()]
    assert st.tensor_specs() == got

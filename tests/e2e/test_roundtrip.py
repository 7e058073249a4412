"""save -> load / read round trips over every dtype, odd shapes and real training objects."""

import os

import pytest
import torch

import outlast
from outlast.errors import CheckpointExistsError, IncompatibleStateError, SerializationError
from state_helpers import fresh_state, trained_state

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
              torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def sample(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64).to(dtype)


def bits(t):
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_every_dtype_round_trips_bit_exactly(ckpt_dir, dtype):
    state = {"a": sample(dtype, (5, 7)), "scalar": sample(dtype, ()), "empty": sample(dtype, (0, 3))}
    outlast.save(state, ckpt_dir)
    back = outlast.read(ckpt_dir)
    for k, t in state.items():
        assert back[k].dtype == dtype and back[k].shape == t.shape
        assert torch.equal(bits(back[k]), bits(t)), k  # bit-exact (NaN too)
    live = {k: torch.zeros_like(v) for k, v in state.items()}
    outlast.load(live, ckpt_dir)
    for k in state:
        assert torch.equal(bits(live[k]), bits(state[k]))


def test_non_contiguous_views_and_shared_storage(ckpt_dir):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    state = {"t": base.t(), "strided": base[::2, 1::3], "a": base[:3], "b": base[3:], "same": base, "same2": base}
    outlast.save(state, ckpt_dir)
    back = outlast.read(ckpt_dir)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    # Loading into views writes through to the viewed storage, like any in-place copy.
    target = torch.zeros(6, 8)
    live = {"t": target.t(), "strided": torch.zeros(3, 3), "a": target[:3], "b": target[3:], "same": torch.zeros(6, 8), "same2": torch.zeros(6, 8)}
    outlast.load(live, ckpt_dir)
    assert torch.equal(target, base)


def test_many_small_tensors(ckpt_dir):
    state = {"p": {f"t{i}": torch.full((3,), float(i)) for i in range(10_000)}}
    m = outlast.save(state, ckpt_dir).manifest
    assert len(m.tensors) == 10_000
    back = outlast.read(ckpt_dir, keys=["p.t9999", "p.t0"])
    assert set(back["p"]) == {"t9999", "t0"}
    assert torch.equal(back["p"]["t9999"], torch.full((3,), 9999.0))
    live = {"p": {f"t{i}": torch.zeros(3) for i in range(10_000)}}
    outlast.load(live, ckpt_dir)
    assert all(torch.equal(live["p"][f"t{i}"], state["p"][f"t{i}"]) for i in range(0, 10_000, 97))


def test_few_huge_tensors(ckpt_dir):
    big = torch.randn(64 << 20 >> 2)  # 64 MiB
    state = {"big": big, "big2": big.view(4096, -1)[:, :100].clone()}
    outlast.save(state, ckpt_dir)
    live = {"big": torch.zeros_like(big), "big2": torch.zeros(4096, 100)}
    report = outlast.load(live, ckpt_dir)
    assert torch.equal(live["big"], big) and torch.equal(live["big2"], state["big2"])
    assert report.bytes_read == big.nbytes + state["big2"].nbytes


def test_training_objects_resume_in_place(ckpt_dir):
    src = trained_state()
    outlast.save(src, ckpt_dir, step=2)
    dst = fresh_state()  # optimizer never stepped: its state is created from the checkpoint
    report = outlast.load(dst, ckpt_dir)
    assert report.missing == [] and report.unexpected == []
    for a, b in zip(src["model"].state_dict().values(), dst["model"].state_dict().values()):
        assert torch.equal(a, b)
    so, do = src["optim"].state_dict(), dst["optim"].state_dict()
    for pid, st in so["state"].items():
        for k, v in st.items():
            assert torch.equal(v, do["state"][pid][k])
    assert do["param_groups"][0]["lr"] == so["param_groups"][0]["lr"]
    assert isinstance(do["param_groups"][0]["betas"], tuple)
    assert dst["sched"].state_dict() == src["sched"].state_dict()
    assert dst["step"] == 2 and torch.equal(dst["rng"], src["rng"])
    # The resumed objects keep training identically.
    x = torch.randn(4, 6)
    for s in (src, dst):
        s["model"](x).square().mean().backward()
        s["optim"].step()
    for a, b in zip(src["model"].parameters(), dst["model"].parameters()):
        assert torch.equal(a, b)


def test_subset_load_and_non_strict_report(ckpt_dir):
    src = trained_state()
    outlast.save(src, ckpt_dir)
    model = fresh_state()["model"]
    outlast.load({"model": model}, ckpt_dir)  # model only, strict: other top-level names ignored
    assert torch.equal(model[0].weight, src["model"][0].weight)
    bigger = torch.nn.Sequential(*fresh_state()["model"], torch.nn.Linear(3, 3))
    with pytest.raises(IncompatibleStateError, match="missing from the checkpoint: model.3.weight"):
        outlast.load({"model": {"0.weight": bigger[0].weight, "3.weight": bigger[3].weight}}, ckpt_dir)
    live = {"model": {"0.weight": torch.zeros(16, 6), "3.weight": torch.zeros(3, 3)}}
    with pytest.raises(IncompatibleStateError, match="not in the live state"):
        outlast.load(live, ckpt_dir)
    report = outlast.load(live, ckpt_dir, strict=False)
    assert report.missing == ["model.3.weight"]
    assert "model.0.bias" in report.unexpected
    assert torch.equal(live["model"]["0.weight"], src["model"][0].weight.detach())


def test_read_selected_keys(ckpt_dir):
    outlast.save(trained_state(), ckpt_dir, step=2)
    got = outlast.read(ckpt_dir, keys="model")
    assert set(got) == {"model"} and set(got["model"]) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"}
    with pytest.raises(IncompatibleStateError, match="no entries named"):
        outlast.read(ckpt_dir, keys="nope")


def test_shape_and_dtype_mismatch_name_tensor_and_both_shapes(ckpt_dir):
    outlast.save({"w": torch.zeros(3, 4)}, ckpt_dir)
    with pytest.raises(IncompatibleStateError, match=r"'w'.*\[3, 4\].*\[4, 3\]"):
        outlast.load({"w": torch.zeros(4, 3)}, ckpt_dir)
    with pytest.raises(IncompatibleStateError, match=r"'w'.*float32.*float64"):
        outlast.load({"w": torch.zeros(3, 4, dtype=torch.float64)}, ckpt_dir)


def test_unserialisable_leaf_writes_nothing(tmp_path):
    path = tmp_path / "ck"
    with pytest.raises(SerializationError, match="'cfg.fn'"):
        outlast.save({"w": torch.zeros(2), "cfg": {"fn": lambda: 1}}, str(path))
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_refused_unless_asked(ckpt_dir):
    outlast.save({"w": torch.zeros(2)}, ckpt_dir, step=1)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        outlast.save({"w": torch.ones(2)}, ckpt_dir, step=2)
    assert outlast.manifest_of(ckpt_dir).step == 1
    outlast.save({"w": torch.ones(2)}, ckpt_dir, step=2, overwrite=True)
    assert outlast.manifest_of(ckpt_dir).step == 2
    assert torch.equal(outlast.read(ckpt_dir)["w"], torch.ones(2))
    # No temporary or old directories are left next to it.
    assert os.listdir(os.path.dirname(ckpt_dir)) == [os.path.basename(ckpt_dir)]


def test_plain_values_survive_json(ckpt_dir):
    state = {"f": float("inf"), "n": float("nan"), "s": "ünïcode", "none": None, "nested": {"a": [1, {"b": 2.5}]}}
    outlast.save(state, ckpt_dir)
    back = outlast.read(ckpt_dir)
    assert back["f"] == float("inf") and back["n"] != back["n"] and back["s"] == "ünïcode"
    assert back["nested"] == {"a": [1, {"b": 2.5}]} and back["none"] is None

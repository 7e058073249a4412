"""outlast.merge_checkpoints against direct computations of each method."""

import pytest
import torch

import outlast
from outlast.errors import CorruptCheckpointError, IncompatibleStateError
from outlast.merge import merge_weights


def _save_run(tmp_path, n=4, steps=None):
    """n checkpoints of one tiny 'model'; returns (paths, states) oldest first."""
    steps = steps or [100 * (i + 1) for i in range(n)]
    paths, states = [], []
    for i, step in enumerate(steps):
        g = torch.Generator().manual_seed(i)
        sd = {
            "w": torch.randn(33, 7, generator=g),
            "h": torch.randn(5, generator=g).to(torch.bfloat16),
            "d": torch.randn(3, generator=g, dtype=torch.float64),
            "count": torch.tensor(step),
            "mask": torch.rand(4, generator=g) > 0.5,
        }
        p = tmp_path / f"step-{step}"
        outlast.save({"model": sd, "step": step, "data": {"epoch": i}}, p, step=step)
        paths.append(p)
        states.append(sd)
    return paths, states


def _expected(states, weights):
    out = {}
    for k in ("w", "h", "d"):
        acc_dtype = torch.float64 if k == "d" else torch.float32
        acc = torch.zeros_like(states[0][k], dtype=acc_dtype)
        for sd, w in zip(states, weights):
            acc += w * sd[k].to(acc_dtype)
        out[k] = acc.to(states[0][k].dtype)
    return out


def _check(result, states, weights, newest):
    exp = _expected(states, weights)
    m = result["model"]
    torch.testing.assert_close(m["w"], exp["w"], rtol=0, atol=1e-6)
    torch.testing.assert_close(m["d"], exp["d"], rtol=0, atol=1e-12)
    assert m["h"].dtype == torch.bfloat16
    torch.testing.assert_close(m["h"].float(), exp["h"].float(), rtol=0, atol=1e-2)
    # Non-float tensors and plain values come from the newest source.
    assert torch.equal(m["count"], newest["count"]) and torch.equal(m["mask"], newest["mask"])


def test_mean(tmp_path):
    paths, states = _save_run(tmp_path)
    man = outlast.merge_checkpoints(paths, tmp_path / "out")
    out = outlast.read(tmp_path / "out")
    _check(out, states, [0.25] * 4, states[-1])
    assert out["step"] == 400 and out["data"] == {"epoch": 3} and man.step == 400


def test_weighted_follows_source_order_even_when_given_shuffled(tmp_path):
    paths, states = _save_run(tmp_path)
    order = [2, 0, 3, 1]
    raw = [1.0, 2.0, 3.0, 4.0]
    outlast.merge_checkpoints([paths[i] for i in order], tmp_path / "out", method="weighted", weights=raw)
    w_by_state = [0.0] * 4
    for i, r in zip(order, raw):
        w_by_state[i] = r / sum(raw)
    _check(outlast.read(tmp_path / "out"), states, w_by_state, states[-1])


def test_lawa_last_k_by_step(tmp_path):
    paths, states = _save_run(tmp_path, steps=[300, 100, 400, 200])
    man = outlast.merge_checkpoints(paths, tmp_path / "out", method="lawa", last_k=2)
    # steps 300 and 400 are the newest two: states[0] and states[2]
    _check(outlast.read(tmp_path / "out"), [states[0], states[2]], [0.5, 0.5], states[2])
    assert man.extra["merged_from"]["steps"] == [300, 400]


def test_ema_matches_the_recurrence(tmp_path):
    paths, states = _save_run(tmp_path)
    decay = 0.7
    outlast.merge_checkpoints(list(reversed(paths)), tmp_path / "out", method="ema", decay=decay)
    ema = states[0]["w"].clone()
    for sd in states[1:]:
        ema = decay * ema + (1 - decay) * sd["w"]
    out = outlast.read(tmp_path / "out")["model"]
    torch.testing.assert_close(out["w"], ema, rtol=0, atol=1e-6)
    _check(outlast.read(tmp_path / "out"), states, merge_weights(4, "ema", decay=decay), states[-1])


def test_merge_weights_validation():
    assert merge_weights(3, "ema", decay=0.5) == [0.25, 0.25, 0.5]
    assert merge_weights(4, "lawa", last_k=1) == [0, 0, 0, 1.0]
    with pytest.raises(ValueError, match="one weight per source"):
        merge_weights(3, "weighted", weights=[1, 2])
    with pytest.raises(ValueError, match="decay in \\[0, 1\\)"):
        merge_weights(3, "ema", decay=1.0)
    with pytest.raises(ValueError, match="last_k"):
        merge_weights(3, "lawa", last_k=4)


def test_mismatched_shapes_name_tensor_and_both_sources(tmp_path):
    outlast.save({"model": {"w": torch.zeros(3, 4), "b": torch.zeros(2)}}, tmp_path / "a", step=1)
    outlast.save({"model": {"w": torch.zeros(4, 3), "b": torch.zeros(2)}}, tmp_path / "b", step=2)
    with pytest.raises(IncompatibleStateError) as e:
        outlast.merge_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    msg = str(e.value)
    assert "'model.w'" in msg and str(tmp_path / "a") in msg and str(tmp_path / "b") in msg
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(tmp_path):
    outlast.save({"model": {"w": torch.zeros(3)}}, tmp_path / "a", step=1)
    outlast.save({"model": {"w": torch.zeros(3), "extra": torch.zeros(1)}}, tmp_path / "b", step=2)
    with pytest.raises(IncompatibleStateError, match="'model.extra' is in .*b but not in .*a"):
        outlast.merge_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "out")


def test_corrupt_source_fails_with_checksum_error(tmp_path):
    paths, _ = _save_run(tmp_path, n=2)
    m = outlast.manifest_of(paths[0])
    c = m.tensors["model.w"].chunks[0]
    f = paths[0] / c.file
    data = bytearray(f.read_bytes())
    data[c.offset + 5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch.*'model.w'"):
        outlast.merge_checkpoints(paths, tmp_path / "out")
    assert not (tmp_path / "out").exists()

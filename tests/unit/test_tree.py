"""Flattening nested state into named leaves and rebuilding it."""

import pytest
import torch

from outlast.errors import SerializationError
from outlast.tree import flatten, insert


def test_modules_optimizers_and_plain_values_flatten_by_name():
    m = torch.nn.Linear(2, 2)
    o = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 2)).sum().backward()
    o.step()
    flat = flatten({"model": m, "optim": o, "step": 3, "cfg": {"a": (1, 2)}})
    assert set(flat.tensors) == {
        "model.weight", "model.bias",
        "optim.state.0.step", "optim.state.0.exp_avg", "optim.state.0.exp_avg_sq",
        "optim.state.1.step", "optim.state.1.exp_avg", "optim.state.1.exp_avg_sq",
    }
    assert flat.plain["cfg"].value == {"a": [1, 2]}
    assert flat.plain["cfg"].original == {"a": (1, 2)}
    # Optimizer param ids stay ints in the path; lists are marked with [i].
    assert flat.tensors["optim.state.0.step"].path == ["optim", "state", 0, "step"]
    assert flat.plain["optim.param_groups"].value[0]["params"] == [0, 1]
    assert set(flat.statefuls) == {"model", "optim"}


def test_list_indices_are_marked_in_paths():
    flat = flatten({"layers": [torch.zeros(1), {"b": torch.ones(1)}]})
    assert flat.tensors["layers.0"].path == ["layers", [0]]
    assert flat.tensors["layers.1.b"].path == ["layers", [1], "b"]


@pytest.mark.parametrize("bad", [{1, 2}, object(), b"bytes", 1 + 2j])
def test_unserialisable_leaf_names_the_key(bad):
    with pytest.raises(SerializationError, match=r"'model.extra'"):
        flatten({"model": {"w": torch.zeros(1), "extra": bad}})


def test_name_collisions_are_refused():
    with pytest.raises(SerializationError, match="same name 'a.b'"):
        flatten({"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}})


def test_state_must_be_a_dict():
    with pytest.raises(SerializationError, match="must be a dict"):
        flatten([torch.zeros(1)])


def test_numpy_scalars_become_json():
    import numpy as np  # a dependency of outlast
    flat = flatten({"x": np.float32(0.5), "n": np.int64(3)})
    assert flat.plain["x"].value == 0.5 and flat.plain["n"].value == 3


def test_insert_rebuilds_nesting():
    out = {}
    insert(out, ["optim", "state", 0, "exp_avg"], 1)
    insert(out, ["layers", [1], "b"], 2)
    assert out == {"optim": {"state": {0: {"exp_avg": 1}}}, "layers": [None, {"b": 2}]}

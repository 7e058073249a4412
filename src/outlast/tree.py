"""Flattening nested training state into named leaves, and putting values back.

State is a nested dict whose leaves are tensors, JSON values, or *Stateful* objects
(anything with ``state_dict()`` and ``load_state_dict()``: modules, optimizers,
schedulers, user objects). Flattening gives every leaf a *path* (the keys from the root)
and a dotted *fqn* (``"optim.state.0.exp_avg"``). A subtree without tensors whose dict
keys are all strings is kept whole as one JSON value (so tuples such as Adam's betas
and optimizer ``param_groups`` stay readable in the manifest). Paths are JSON: a str
or int dict key, or ``[i]`` for a list index, so :func:`outlast.read` can rebuild the
exact nesting without a template.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SerializationError
from .format import fqn_of
from .layouts import is_leaf_tensor


@dataclass
class Leaf:
    path: list
    value: Any  # a torch.Tensor or a JSON value
    parent: Any = None  # the container holding it (dict, list, tuple) for in-place replacement
    key: Any = None
    original: Any = None  # the live value before JSON conversion (tuples stay tuples on load)


@dataclass
class StatefulNode:
    path: list
    obj: Any
    state: Any  # what obj.state_dict() returned; filled in place, then handed back


@dataclass
class FlatState:
    tensors: dict[str, Leaf] = field(default_factory=dict)
    plain: dict[str, Leaf] = field(default_factory=dict)
    statefuls: dict[str, StatefulNode] = field(default_factory=dict)


def is_stateful(x: Any) -> bool:
    return (
        not isinstance(x, (dict, list, tuple, torch.Tensor))
        and callable(getattr(x, "state_dict", None))
        and callable(getattr(x, "load_state_dict", None))
    )


def _json_scalar(x: Any) -> Any:
    """Return x as a plain JSON scalar, or raise TypeError."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    # numpy scalars and 0-d arrays: their .item() is a Python scalar.
    item = getattr(x, "item", None)
    if callable(item) and getattr(x, "ndim", 1) == 0 and not isinstance(x, torch.Tensor):
        return _json_scalar(item())
    raise TypeError


def _as_json(x: Any) -> Any:
    """Deep-convert a tensor-free value to JSON types, or raise TypeError."""
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise TypeError
        return {k: _as_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_as_json(v) for v in x]
    return _json_scalar(x)


def _has_tensor_or_stateful(x: Any) -> bool:
    if is_leaf_tensor(x) or is_stateful(x):
        return True
    if isinstance(x, dict):
        return any(_has_tensor_or_stateful(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_tensor_or_stateful(v) for v in x)
    return False


def _elem(key: Any, in_list: bool, path: list) -> Any:
    if in_list:
        return [key]
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise SerializationError(
            f"state key {key!r} at {fqn_of(path) or '<root>'!r} is a {type(key).__name__}; "
            "only str and int keys can be saved"
        )
    return key


def flatten(state: Any, *, expand_stateful: bool = True) -> FlatState:
    """Flatten nested state into named leaves. Raises SerializationError naming a bad leaf.

    Example:
        >>> flat = flatten({"model": torch.nn.Linear(2, 2), "step": 3})
        >>> sorted(flat.tensors), sorted(flat.plain)
        (['model.bias', 'model.weight'], ['step'])
    """
    if not isinstance(state, dict):
        raise SerializationError(
            f"state must be a dict (e.g. {{'model': model, 'optim': optimizer}}), got {type(state).__name__}"
        )
    _settle_offloaded_steps()
    out = FlatState()
    _walk(state, [], out, None, None, expand_stateful)
    return out


def _settle_offloaded_steps() -> None:
    # OffloadAdamW(overlap_forward=True) returns from step() before every parameter is
    # updated; finish such steps before reading or writing any tensor of a state.
    adamw = sys.modules.get("outlast.offload.adamw")
    if adamw is not None:
        adamw.synchronize_pending()


def _add(table: dict, path: list, leaf: Leaf, out: FlatState) -> None:
    name = fqn_of(path)
    if name in out.tensors or name in out.plain:
        raise SerializationError(
            f"two entries of the state flatten to the same name {name!r}; rename one of the keys"
        )
    table[name] = leaf


def _walk(node: Any, path: list, out: FlatState, parent: Any, key: Any, expand: bool) -> None:
    if is_leaf_tensor(node):
        _add(out.tensors, path, Leaf(list(path), node, parent, key), out)
        return
    if is_stateful(node) and expand:
        sd = node.state_dict()
        out.statefuls[fqn_of(path)] = StatefulNode(list(path), node, sd)
        if isinstance(sd, (dict, list)) and len(sd):
            # Walk inside so every value has a container to be replaced in.
            for k, v in (sd.items() if isinstance(sd, dict) else enumerate(sd)):
                _walk(v, path + [_elem(k, not isinstance(sd, dict), path)], out, sd, k, expand)
        else:
            _walk(sd, path, out, None, None, expand)
        return
    if isinstance(node, (dict, list, tuple)) and (path == [] or _has_tensor_or_stateful(node)):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            _walk(v, path + [_elem(k, not isinstance(node, dict), path)], out, node, k, expand)
        return
    try:
        value = _as_json(node)
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        if isinstance(node, (dict, list, tuple)):
            # A tensor-free container that JSON cannot hold whole (e.g. int keys): go inside.
            items = node.items() if isinstance(node, dict) else enumerate(node)
            if len(node) == 0:
                value = {} if isinstance(node, dict) else []
                _add(out.plain, path, Leaf(list(path), value, parent, key), out)
                return
            for k, v in items:
                _walk(v, path + [_elem(k, not isinstance(node, dict), path)], out, node, k, expand)
            return
        raise SerializationError(
            f"cannot save {fqn_of(path)!r}: a {type(node).__name__} is neither a tensor, a JSON value "
            "(None, bool, int, float, str, list, dict with str keys) nor an object with "
            "state_dict()/load_state_dict(). Convert it, or leave it out of the state."
        ) from None
    if not path:
        raise SerializationError("state must be a dict")
    _add(out.plain, path, Leaf(list(path), value, parent, key, node), out)


def is_nan_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values that treats NaN as equal to NaN (for tests and merges)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(is_nan_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(is_nan_equal(x, y) for x, y in zip(a, b))
    return a == b


def insert(root: dict, path: list, value: Any) -> None:
    """Set ``value`` at ``path`` under ``root``, creating dicts and lists on the way."""
    node: Any = root
    for i, p in enumerate(path):
        last = i == len(path) - 1
        nxt_is_list = not last and isinstance(path[i + 1], list)
        if isinstance(p, list):
            idx = p[0]
            if not isinstance(node, list):
                raise SerializationError(f"cannot insert list index at {fqn_of(path[: i + 1])!r}")
            while len(node) <= idx:
                node.append(None)
            if last:
                node[idx] = value
            else:
                if node[idx] is None:
                    node[idx] = [] if nxt_is_list else {}
                node = node[idx]
        else:
            if last:
                node[p] = value
            else:
                if p not in node or node[p] is None:
                    node[p] = [] if nxt_is_list else {}
                node = node[p]

"""Load the served model from a GGUF file, a Hugging Face directory or an outlast checkpoint.

All three end as one :class:`~outlast.serve.config.ModelConfig`, a state dict under Hugging
Face names and an identity (a hash of the config and every weight byte) that salts the
prefix cache. An outlast checkpoint is read with the public :func:`outlast.read`; its
config comes from the ``serve_config`` value that ``outlast convert --from gguf`` writes, or
from a ``config.json`` given with ``config=``.
"""

from __future__ import annotations

import json
import os

import torch
import xxhash

from .config import ModelConfig
from .errors import ModelLoadError
from .gguf import read_gguf

__all__ = ["load_weights", "weights_identity", "flatten"]


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts (as :func:`outlast.read` returns) -> one level of dotted names."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def weights_identity(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> bytes:
    """A 16-byte hash of the config and all weight bytes: same weights, same prefix-cache keys."""
    h = xxhash.xxh3_128()
    h.update(json.dumps({k: v for k, v in config.to_json().items() if k != "name"}, sort_keys=True).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.digest()


def _is_outlast(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "manifest.json"))


def load_weights(source: str, *, prefix: str = "model", config: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read config and weights from any supported source.

    Args:
        source: a ``.gguf`` file, a Hugging Face directory (config.json + safetensors) or an
            outlast checkpoint directory.
        prefix: the sub-tree of an outlast checkpoint holding the model's tensors.
        config: a ``config.json`` (or a directory with one) for an outlast checkpoint without ``serve_config``.

    Returns:
        ``(config, state_dict)`` with Hugging Face names.

    Example:
        >>> cfg, sd = load_weights("ckpt/step-00001000", prefix="model")
    """
    source = os.fspath(source)
    if os.path.isfile(source):
        if not source.endswith(".gguf"):
            raise ModelLoadError(f"{source}: expected a .gguf file, a Hugging Face directory or an outlast checkpoint")
        return read_gguf(source)
    if not os.path.isdir(source):
        raise ModelLoadError(f"{source} does not exist")
    if _is_outlast(source):
        import outlast

        tree = outlast.read(source, keys=prefix)
        sd = flatten(tree.get(prefix, tree))
        from ..errors import IncompatibleStateError

        try:
            plain = outlast.read(source, keys="serve_config").get("serve_config")
        except IncompatibleStateError:  # no such entry: the config must come from --config
            plain = None
        if plain is not None:
            cfg = ModelConfig.from_json(plain)
        elif config is not None:
            path = os.path.join(config, "config.json") if os.path.isdir(config) else config
            cfg = _config_from_hf_file(path, os.path.basename(source.rstrip("/")))
        else:
            raise ModelLoadError(f"{source} holds no serve_config; pass the model's config.json (--config)")
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        return cfg, sd
    cfg_path = os.path.join(source, "config.json")
    if not os.path.exists(cfg_path):
        raise ModelLoadError(f"{source} has no config.json and no outlast manifest")
    from safetensors.torch import load_file

    cfg = _config_from_hf_file(cfg_path, os.path.basename(source.rstrip("/")))
    files = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"{source} has no .safetensors files")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(os.path.join(source, f)))
    return cfg, sd


def _config_from_hf_file(path: str, name: str) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json; a bad or unsupported one is a ModelLoadError naming it."""
    try:
        with open(path) as f:
            return ModelConfig.from_hf(json.load(f), name=name)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except KeyError as e:
        raise ModelLoadError(f"{path}: the config lacks {e.args[0]!r}, which a Llama-family model needs") from None

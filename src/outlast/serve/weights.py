"""Load the served model from a GGUF file, a Hugging Face directory or an outlast checkpoint.

All three end as one :class:`~outlast.serve.config.ModelConfig`, a state dict under Hugging
Face names and an identity that salts the prefix cache. At start (:func:`weights_identity`) it is a
hash of the config and every weight byte, so the same weights from any source share cache keys and
``weights-<hash>`` fingerprint. A hot reload of a checkpoint step instead hashes the config and the
manifest's per-chunk checksums (:func:`checkpoint_identity`): the read verifies every chunk against
them, so it changes whenever a weight byte does, without a second pass over 540 MB. An outlast
checkpoint is read with the public :func:`outlast.read` (on a hot reload, with one verified read
straight into the serving layout, :meth:`~outlast.serve.model.LlamaRuntime.from_checkpoint`); its config comes from the
``serve_config`` value that ``outlast convert --from gguf`` writes, or from a ``config.json`` given
with ``config=``.
"""

from __future__ import annotations

import json
import os

import torch
import xxhash

from .config import ModelConfig
from .errors import ModelLoadError
from .gguf import read_gguf

__all__ = ["load_weights", "load_config", "weights_identity", "checkpoint_identity", "flatten"]


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
    h.update(_config_json(config))
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.digest()


def _config_json(config: ModelConfig) -> bytes:
    return json.dumps({k: v for k, v in config.to_json().items() if k != "name"}, sort_keys=True).encode()


def checkpoint_identity(path: str, config: ModelConfig, prefix: str = "model", manifest=None) -> bytes:
    """A 16-byte identity of an outlast checkpoint's weights, from its manifest alone.

    Hashes the config and, for every tensor under ``prefix`` (sorted by name), its name, dtype,
    shape and each chunk's region and xxh3-64 checksum. A read checks every chunk against those
    checksums, so the weights a reload serves are exactly the ones named here: a changed weight
    byte changes its chunk's checksum and so the identity, with no pass over the bytes. Two
    checkpoints of the same bytes saved the same way get the same identity (a different chunking
    of the same bytes gives another one: only a prefix-cache miss). Not equal to
    :func:`weights_identity` of the same weights (a domain tag keeps the two apart).

    Args:
        manifest: the checkpoint's manifest if already read (e.g. the one the weights were verified
            against); read from ``path`` otherwise.

    Example:
        >>> salt = checkpoint_identity("runs/exp1/step-00000200", cfg)
    """
    import outlast

    m = manifest if manifest is not None else outlast.manifest_of(path)
    h = xxhash.xxh3_128()
    h.update(b"outlast-manifest-identity-v1\0")
    h.update(_config_json(config))
    for fqn in sorted(m.tensors):
        if not fqn.startswith(prefix + "."):
            continue
        e = m.tensors[fqn]
        h.update(json.dumps([fqn, e.dtype, list(e.shape),
                             sorted([list(c.box.offsets), list(c.box.sizes), c.checksum] for c in e.chunks)]).encode())
    return h.digest()


def load_config(source: str, *, config: str | None = None) -> ModelConfig:
    """The ModelConfig of an outlast checkpoint: its ``serve_config``, else the ``config.json`` given.

    Raises:
        ModelLoadError: neither is there.
    """
    import outlast
    from ..errors import IncompatibleStateError

    try:
        plain = outlast.read(source, keys="serve_config").get("serve_config")
    except IncompatibleStateError:  # no such entry: the config must come from --config
        plain = None
    if plain is not None:
        return ModelConfig.from_json(plain)
    if config is not None:
        path = os.path.join(config, "config.json") if os.path.isdir(config) else config
        return _config_from_hf_file(path, os.path.basename(source.rstrip("/")))
    raise ModelLoadError(f"{source} holds no serve_config; pass the model's config.json (--config)")


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
        cfg = load_config(source, config=config)
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

"""Read a Llama-family GGUF file into fp32 tensors under Hugging Face names.

The ``gguf`` package parses the file and dequantises each tensor (Q4_1, Q8_0, ...).
llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so its RoPE can rotate
adjacent pairs; :func:`unpermute_rows` undoes that so every source feeds the runtime
the same (Hugging Face, rotate-half) layout.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .config import ModelConfig
from .errors import ModelLoadError

__all__ = ["read_gguf", "unpermute_rows", "GGUF_NAMES"]

# GGUF tensor name (per layer "blk.{i}.X") -> Hugging Face name ("model.layers.{i}.Y").
GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> rotate-half halves).

    Args:
        w: ``[n_head * head_dim, in]`` weight as stored in the GGUF file.
        n_head: heads of this projection (``num_kv_heads`` for K).

    Returns:
        The weight in Hugging Face row order.

    Example:
        >>> q = unpermute_rows(gguf_q, cfg.num_heads)
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read the config and dequantised fp32 weights of a Llama-family GGUF file.

    Args:
        path: a ``.gguf`` file.

    Returns:
        ``(config, state_dict)`` with Hugging Face tensor names.

    Example:
        >>> cfg, sd = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = os.fspath(path)
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: architecture {arch!r} is not supported (only 'llama'-family decoders)")
    p = "llama."
    heads = int(_field(reader, p + "attention.head_count"))
    kv_heads = int(_field(reader, p + "attention.head_count_kv", heads))
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    vocab = _field(reader, p + "vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    try:
        cfg = _config(reader, p, path, heads, kv_heads, names, eos, vocab)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy: F32 tensors are read-only mmap views
        parts = t.name.split(".")
        if parts[0] == "blk":
            layer, kind = parts[1], parts[2]
            if kind not in GGUF_NAMES:
                raise ModelLoadError(f"{path}: unexpected tensor {t.name}")
            if kind == "attn_q":
                arr = unpermute_rows(arr, heads)
            elif kind == "attn_k":
                arr = unpermute_rows(arr, kv_heads)
            name = f"model.layers.{layer}.{GGUF_NAMES[kind]}.weight"
        elif t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            continue  # rope_freqs: read into the config above
        sd[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return cfg, sd


def _rope_scaling(reader, p: str, path: str) -> dict | None:
    """llama.cpp's ``rope.scaling.*`` keys as a Hugging Face ``rope_scaling`` dict (linear only)."""
    kind = _field(reader, p + "rope.scaling.type", "none")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise ModelLoadError(
            f"{path}: RoPE scaling type {kind!r} is not supported (linear, and Llama 3's frequency "
            "factors, are); serving the model without it would give wrong outputs"
        )
    factor = _field(reader, p + "rope.scaling.factor", 1.0)
    return {"rope_type": "linear", "factor": float(factor)}


def _rope_freq_factors(reader, path: str) -> tuple[float, ...]:
    """The ``rope_freqs`` tensor (Llama 3.1+ GGUF files: the inverse frequencies' divisors)."""
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            return tuple(float(x) for x in np.asarray(t.data, dtype=np.float32).reshape(-1))
    return ()


def _config(reader, p: str, path: str, heads: int, kv_heads: int, names: set, eos, vocab) -> ModelConfig:
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=int(_field(reader, p + "embedding_length")),
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_layers=int(_field(reader, p + "block_count")),
        num_heads=heads, num_kv_heads=kv_heads,
        rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        max_position=int(_field(reader, p + "context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=os.path.basename(path),
        rope_scaling=_rope_scaling(reader, p, path),
        rope_freq_factors=_rope_freq_factors(reader, path),
    )

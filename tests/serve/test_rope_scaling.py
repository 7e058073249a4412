"""RoPE scaling (linear, Llama 3's) is applied as transformers applies it, and other kinds are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from outlast.serve import ModelLoadError
from outlast.serve.config import EngineConfig, ModelConfig
from outlast.serve.sampler import SamplingParams

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def _hf_config(rope: dict | None, **kw):
    from transformers import LlamaConfig

    params = {"rope_type": "default", "rope_theta": 10000.0} if rope is None else {**rope, "rope_theta": 10000.0}
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.5, rope_parameters=params)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.mark.parametrize("rope", [LLAMA3, {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_inverse_frequencies_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for head_dim, theta in ((16, 10000.0), (64, 500000.0), (128, 500000.0)):
        hf = _hf_config(rope, hidden_size=head_dim * 4, max_position_embeddings=8192)
        hf.rope_parameters["rope_theta"] = theta
        want, attention_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
        got = ModelConfig.from_hf(hf.to_dict()).rope_inv_freq()
        assert attention_factor == 1.0
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
        plain = ModelConfig.from_hf(_hf_config(None, hidden_size=head_dim * 4).to_dict())
        assert not torch.allclose(plain.rope_inv_freq(), got)  # the scaling changed something


def test_greedy_tokens_equal_transformers_with_llama3_scaling(tmp_path, tokenizer):
    """A small random Llama with Llama 3 scaling, saved as a Hugging Face directory and served: the
    same greedy tokens as transformers' generate past the original context; the same model
    without its scaling would give other tokens (so the check can fail)."""
    from transformers import LlamaForCausalLM

    from outlast.serve.engine import LLMEngine
    from outlast.serve.weights import load_weights

    torch.manual_seed(0)
    hf = LlamaForCausalLM(_hf_config(LLAMA3)).eval()
    hf.save_pretrained(tmp_path / "m", safe_serialization=True)
    cfg, sd = load_weights(str(tmp_path / "m"))
    assert cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "llama3"
    eng = LLMEngine(cfg, sd, tokenizer, EngineConfig(num_blocks=64, token_budget=256))
    prompt = [int(x) for x in np.random.default_rng(1).integers(0, 96, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ours = eng.generate([prompt], params)[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, 40:].tolist()
    assert ours == ref
    plain = LlamaForCausalLM(_hf_config(None)).eval()
    plain.load_state_dict(hf.state_dict())
    with torch.no_grad():
        unscaled = plain.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, 40:].tolist()
    assert unscaled != ref


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_unsupported_scaling_is_refused_naming_it(tmp_path, kind):
    import json

    from outlast.serve.weights import load_weights

    d = _hf_config(None).to_dict()
    d["rope_parameters"] = {"rope_type": kind, "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ModelLoadError, match=f"RoPE scaling type '{kind}' is not supported") as e:
        load_weights(str(tmp_path / "m"))
    assert "config.json" in str(e.value)


def test_gguf_rope_freqs_and_linear_scaling_are_read(tmp_path):
    """A GGUF file written with llama.cpp's keys: its rope_freqs tensor divides the inverse
    frequencies; rope.scaling.type linear becomes the linear scaling; yarn is refused."""
    import gguf

    from outlast.serve.gguf import read_gguf

    def write(path, scaling=None, freqs=None):
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_uint32("llama.vocab_size", 32)
        w.add_uint32("llama.embedding_length", 16)
        w.add_uint32("llama.feed_forward_length", 32)
        w.add_uint32("llama.block_count", 1)
        w.add_uint32("llama.attention.head_count", 2)
        w.add_uint32("llama.attention.head_count_kv", 2)
        w.add_uint32("llama.context_length", 128)
        w.add_float32("llama.rope.freq_base", 10000.0)
        if scaling:
            w.add_string("llama.rope.scaling.type", scaling)
            w.add_float32("llama.rope.scaling.factor", 2.0)
        rng = np.random.default_rng(0)
        shapes = {"token_embd.weight": (32, 16), "output_norm.weight": (16,), "blk.0.attn_norm.weight": (16,),
                  "blk.0.ffn_norm.weight": (16,), "blk.0.attn_q.weight": (16, 16), "blk.0.attn_k.weight": (16, 16),
                  "blk.0.attn_v.weight": (16, 16), "blk.0.attn_output.weight": (16, 16),
                  "blk.0.ffn_gate.weight": (32, 16), "blk.0.ffn_up.weight": (32, 16), "blk.0.ffn_down.weight": (16, 32)}
        for name, shape in shapes.items():
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
        if freqs is not None:
            w.add_tensor("rope_freqs.weight", np.asarray(freqs, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(tmp_path / "f.gguf", freqs=[1.0, 2.0, 4.0, 8.0])
    cfg, sd = read_gguf(tmp_path / "f.gguf")
    assert cfg.rope_freq_factors == (1.0, 2.0, 4.0, 8.0) and "rope_freqs.weight" not in sd
    base = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    torch.testing.assert_close(cfg.rope_inv_freq(), base / torch.tensor([1.0, 2.0, 4.0, 8.0]))
    assert ModelConfig.from_json(cfg.to_json()) == cfg  # survives serve_config's JSON

    write(tmp_path / "l.gguf", scaling="linear")
    cfg, _ = read_gguf(tmp_path / "l.gguf")
    torch.testing.assert_close(cfg.rope_inv_freq(), base / 2.0)

    write(tmp_path / "y.gguf", scaling="yarn")
    with pytest.raises(ModelLoadError, match="'yarn' is not supported") as e:
        read_gguf(tmp_path / "y.gguf")
    assert "y.gguf" in str(e.value)

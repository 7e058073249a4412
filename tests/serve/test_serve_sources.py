"""Model sources other than GGUF, end to end through the HTTP server: a Hugging Face directory
(config.json + safetensors + tokenizer files) and an outlast checkpoint that carries no
``serve_config`` (its config comes from ``config=``). Both must give the GGUF engine's greedy tokens."""

from __future__ import annotations

import json

import openai
import pytest

from serve_data import PROMPTS


def hf_config(cfg) -> dict:
    """A Llama ``config.json`` for ``cfg`` (what ``save_pretrained`` writes, the keys outlast reads)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position,
            "tie_word_embeddings": cfg.tie_word_embeddings, "eos_token_id": list(cfg.eos_token_ids)}


@pytest.fixture(scope="module")
def hf_dir(weights, tokenizer, tmp_path_factory) -> str:
    from safetensors.torch import save_file

    cfg, sd = weights
    d = tmp_path_factory.mktemp("hf")
    (d / "config.json").write_text(json.dumps(hf_config(cfg)))
    half = len(sd) // 2  # two shard files, as large models ship
    names = sorted(sd)
    save_file({k: sd[k].contiguous() for k in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k].contiguous() for k in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    tokenizer.hf.save_pretrained(d)
    return str(d)


def serve_and_chat(eng, prompts: list[str]) -> list[tuple[str, int]]:
    """Start ``eng`` behind the HTTP server, ask each prompt greedily, return (text, prompt tokens)."""
    from outlast.serve.loop import EngineLoop
    from outlast.serve.server import ServerThread

    loop = EngineLoop(eng)
    loop.start()
    srv = ServerThread(loop, "m").start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["m"]
        out = []
        for p in prompts:
            r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}], max_tokens=8,
                                               temperature=0, extra_body={"ignore_eos": True})
            out.append((r.choices[0].message.content, r.usage.prompt_tokens))
        return out
    finally:
        srv.close()
        loop.close()


def test_hugging_face_directory_serves_the_gguf_engines_greedy_tokens(hf_dir, tokenizer, prompt_ids, alone_outputs):
    from outlast.serve import EngineConfig, load_engine

    eng = load_engine(hf_dir, EngineConfig(num_blocks=64, max_num_seqs=4))
    assert eng.tokenizer.chat([{"role": "user", "content": PROMPTS[3]}]) == prompt_ids[3]  # template from the dir
    got = serve_and_chat(eng, [PROMPTS[0], PROMPTS[3]])
    assert got == [(tokenizer.decode(alone_outputs[i]), len(prompt_ids[i])) for i in (0, 3)]


def test_outlast_checkpoint_without_serve_config_serves_with_a_config_json(weights, hf_dir, tokenizer, prompt_ids,
                                                                          alone_outputs, tmp_path):
    import outlast
    from outlast.serve import EngineConfig, load_engine
    from outlast.serve.errors import ModelLoadError

    _, sd = weights
    ckpt = str(tmp_path / "ckpt")
    outlast.save({"model": sd, "step": 7}, ckpt)  # what a trainer writes: weights, no serve_config
    with pytest.raises(ModelLoadError, match="--config"):
        load_engine(ckpt, tokenizer=hf_dir)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_engine(ckpt, config=hf_dir)
    eng = load_engine(ckpt, EngineConfig(num_blocks=64, max_num_seqs=4), config=hf_dir + "/config.json",
                      tokenizer=hf_dir)
    got = serve_and_chat(eng, [PROMPTS[5]])
    assert got == [(tokenizer.decode(alone_outputs[5]), len(prompt_ids[5]))]

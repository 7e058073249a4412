"""The runtime against transformers on the same GGUF: weights, logits and greedy tokens.

Greedy identity is checked two ways: ``transformers.generate`` on a few prompts, and for
every prompt a teacher-forced transformers forward over prompt + our tokens whose argmax at
each position must be our next token (what greedy decoding by transformers would pick).
Then the same tokens must come out batched with chunked prefill, with prefix hits, with
preemption forced and with KV spilled to disk and loaded back.
"""

from __future__ import annotations

import os

import torch

from serve_data import MAX_NEW, PROMPTS
from outlast.serve.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def test_gguf_weights_match_transformers_dequantisation(weights, hf_model):
    cfg, sd = weights
    ref = hf_model.state_dict()
    assert cfg.num_layers == 30 and cfg.num_heads == 9 and cfg.num_kv_heads == 3 and cfg.rope_theta == 100000.0
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        # Q/K equal only if llama.cpp's row permutation was undone exactly as transformers does.
        assert torch.equal(sd[name], ref[name]), name


def test_greedy_tokens_match_transformers_generate(alone_outputs, prompt_ids, hf_model):
    for i in (0, 5, 19):
        ids = torch.tensor([prompt_ids[i]])
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                    eos_token_id=None, pad_token_id=2)
        assert out[0, ids.shape[1]:].tolist() == alone_outputs[i], PROMPTS[i]


def test_greedy_tokens_are_transformers_argmax_for_every_prompt(alone_outputs, prompt_ids, hf_model):
    assert len(prompt_ids) >= 20
    for ids, ours in zip(prompt_ids, alone_outputs):
        assert len(ours) == MAX_NEW
        full = torch.tensor([ids + ours])
        with torch.no_grad():
            logits = hf_model(full).logits[0]
        picks = logits[len(ids) - 1 : -1].argmax(-1).tolist()
        assert picks == ours


def test_batched_with_chunked_prefill_gives_the_same_tokens(make_engine, prompt_ids, alone_outputs):
    eng = make_engine(num_blocks=256, token_budget=48, max_num_seqs=8, enable_prefix_caching=False)
    reqs = [eng.add_request(f"r{i}", ids, GREEDY) for i, ids in enumerate(prompt_ids)]
    chunked = mixed = 0
    while eng.has_work():
        computed = {r.request_id: r.num_computed_tokens for r in reqs}
        eng.step()
        grew = [r.num_computed_tokens - computed[r.request_id] for r in reqs]
        chunked += any(0 < g < len(r.prompt_token_ids) and computed[r.request_id] + g < len(r.prompt_token_ids)
                       for r, g in zip(reqs, grew))
        mixed += (1 in grew) and any(g > 1 for g in grew)
    assert chunked > 0 and mixed > 0  # prompts were split, and decodes ran beside prefills
    assert [r.output_token_ids for r in reqs] == alone_outputs
    assert eng.kv.pool.num_free == eng.kv.num_blocks


def test_prefix_hits_give_the_same_tokens(make_engine, prompt_ids, alone_outputs):
    eng = make_engine(num_blocks=256, token_budget=512, max_num_seqs=8)
    first = eng.generate(prompt_ids[:4], GREEDY)
    hits_before = eng.kv.prefix_hits
    again = eng.generate(prompt_ids[:4], GREEDY)
    assert first == again == alone_outputs[:4]
    # Every prompt's full blocks were published by the first pass, so the second finds them.
    expected = sum((len(p) - 1) // eng.kv.block_size * eng.kv.block_size for p in prompt_ids[:4])
    assert eng.kv.prefix_hits - hits_before >= expected > 0
    assert all(b.ref_cnt == 0 for b in eng.kv.pool.blocks)


def test_preemption_by_recompute_gives_the_same_tokens(make_engine, prompt_ids, alone_outputs):
    bs = 4  # every sequence needs two more blocks while it decodes its 8 tokens
    picks = [2, 9, 14, 17]
    # A pool that holds exactly the prompts: all start at once, then the newest must give way.
    num_blocks = sum(-(-len(prompt_ids[i]) // bs) for i in picks)
    eng = make_engine(num_blocks=num_blocks, block_size=bs, token_budget=512, max_num_seqs=8,
                      enable_prefix_caching=False)
    out = eng.generate([prompt_ids[i] for i in picks], GREEDY)
    assert eng.scheduler.num_preemptions > 0
    assert out == [alone_outputs[i] for i in picks]
    assert eng.kv.pool.num_free == eng.kv.num_blocks


def test_spilled_blocks_reload_from_disk_and_bad_ones_are_recomputed(make_engine, prompt_ids, alone_outputs,
                                                                     tokenizer, tmp_path):
    disk = str(tmp_path / "kv")
    a_ids = prompt_ids[20]
    b_ids = tokenizer.encode(" ".join(PROMPTS[:6]))  # no chat template: shares no block with A
    need = -(-(max(len(a_ids), len(b_ids)) + MAX_NEW) // 16)
    eng = make_engine(num_blocks=need, token_budget=512, max_num_seqs=1, kv_disk_dir=disk)
    a = eng.generate([a_ids], GREEDY)[0]
    eng.generate([b_ids], GREEDY)  # takes every block: A's cached blocks are evicted and spill to disk
    assert eng.kv.disk.stores > 0 and len(os.listdir(disk)) > 0
    loads = eng.kv.disk.loads
    again = eng.generate([a_ids], GREEDY)[0]
    assert eng.kv.disk.loads > loads and eng.kv.disk_hits > 0
    assert a == again == alone_outputs[20]
    # Damage every spilled file: none may be used, the answer is recomputed and still right.
    eng.generate([b_ids], GREEDY)
    for name in os.listdir(disk):
        with open(os.path.join(disk, name), "r+b") as f:
            f.seek(100)
            f.write(b"\x7f" * 8)
    loads, corrupt = eng.kv.disk.loads, eng.kv.disk.corrupt
    third = eng.generate([a_ids], GREEDY)[0]
    assert eng.kv.disk.corrupt > corrupt and eng.kv.disk.loads == loads
    assert third == alone_outputs[20]


def test_outlast_checkpoint_and_hf_dir_serve_the_same_weights(make_engine, weights, tokenizer, gguf_path, hf_model,
                                                              prompt_ids, alone_outputs, tmp_path):
    from click.testing import CliRunner

    from outlast.cli import main
    from outlast.serve import EngineConfig, load_engine
    from outlast.serve.weights import load_weights, weights_identity

    cfg, sd = weights
    ckpt = str(tmp_path / "ckpt")
    r = CliRunner().invoke(main, ["convert", gguf_path, ckpt, "--from", "gguf", "--to", "outlast"])
    assert r.exit_code == 0, r.output
    eng = load_engine(ckpt, EngineConfig(num_blocks=64), tokenizer=gguf_path)
    assert eng.identity == weights_identity(cfg, sd)
    assert eng.generate([prompt_ids[3]], GREEDY)[0] == alone_outputs[3]
    hf_dir = str(tmp_path / "hf")
    # transformers refuses to save a GGUF-loaded model as quantized; its weights are plain fp32 by now.
    quantizer, qcfg = hf_model.hf_quantizer, getattr(hf_model.config, "quantization_config", None)
    hf_model.hf_quantizer = None
    if qcfg is not None:
        del hf_model.config.quantization_config
    try:
        hf_model.save_pretrained(hf_dir)
    finally:
        hf_model.hf_quantizer = quantizer
        if qcfg is not None:
            hf_model.config.quantization_config = qcfg
    cfg2, sd2 = load_weights(hf_dir)
    assert cfg2.rope_theta == cfg.rope_theta and cfg2.num_kv_heads == cfg.num_kv_heads
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight"):
        assert torch.equal(sd2[name], sd[name])


def test_bf16_weights_run_every_gemm_in_bf16_and_part_from_fp32_only_at_near_ties(weights, tokenizer, prompt_ids,
                                                                                   alone_outputs, hf_model,
                                                                                   monkeypatch):
    import pytest

    from outlast.serve.config import EngineConfig
    from outlast.serve.engine import LLMEngine

    cfg, sd = weights
    with pytest.raises(ValueError, match="weight_dtype"):
        EngineConfig(weight_dtype="float16")
    with pytest.raises(ValueError, match="oneDNN"):
        EngineConfig(weight_dtype="bfloat16", gemm_backend="numpy")
    # Two torch threads and gemv_blas_threads=2, as the engine process sets them: bf16 GEMVs are oneDNN's,
    # on torch's threads, so a lone decode must not drop torch to one thread for BLAS' sake.
    threads = torch.get_num_threads()
    eng = LLMEngine(cfg, sd, tokenizer, EngineConfig(weight_dtype="bfloat16", num_blocks=256, token_budget=512,
                                                     gemv_blas_threads=2, torch_threads=2))
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    rt = eng.runtime
    assert len(rt.packed) == 1 + 4 * cfg.num_layers  # the LM head and every layer's four matrices
    assert all(t.dtype == torch.bfloat16 for p in rt.packed.values() for t in p.parts)
    assert eng.kv.salt != eng.identity  # fp32 and bf16 K/V never share prefix-cache entries

    def fp32_gemm(*args, **kw):
        raise AssertionError("a GEMM fell back to fp32 numpy")

    rt.gemm = fp32_gemm  # prefill chunks, batched and one-row decode steps must all take the packed bf16 path
    alone = [eng.generate([ids], GREEDY)[0] for ids in prompt_ids]
    assert set_to == []
    monkeypatch.undo()
    torch.set_num_threads(threads)
    batched = eng.generate(prompt_ids, GREEDY)
    assert batched == alone
    same = 0
    for ids, ours, ref in zip(prompt_ids, alone, alone_outputs):
        assert len(ours) == MAX_NEW
        if ours == ref:
            same += 1
            continue
        d = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + ref[:d]])).logits[0, -1]
        top = logits.topk(3)
        margin = float(top.values[0] - top.values[1])
        # bf16's rounding may flip a near tie of fp32's logits, never a clear winner
        assert margin < 0.5 and ours[d] in top.indices.tolist(), (d, margin, ours[d], top.indices.tolist())
    assert same >= len(prompt_ids) // 2, same  # 16 of 21 on the AVX512-BF16 EPYC
    # A hot reload packs the new runtime after its swap (LLMEngine.prepare -> LlamaRuntime.pack): bf16
    # there too. Packed the other way (whole <-> halves of the columns), the tokens stay the same.
    halves = rt._packed_halves
    eng.prepare(rt)  # already packed as the engine wants: kept
    assert rt._packed_halves == halves
    rt.pack(halves=not halves, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for p in rt.packed.values() for t in p.parts)
    assert any(len(p.parts) == (1 if halves else 2) for p in rt.packed.values())
    assert eng.generate(prompt_ids[:4], GREEDY) == alone[:4]


def test_the_engine_processs_kernels_give_the_same_tokens_alone_and_batched(weights, tokenizer, prompt_ids,
                                                                           alone_outputs):
    """The engine process's set-up (steps on torch's two threads): the compiled kernels' GEMMs on
    panels, decode attention and fused layer ops give the tokens checked against transformers
    above, each prompt alone and all batched with chunked prefill (decodes beside prefills)."""
    from outlast.serve.config import EngineConfig
    from outlast.serve.engine import LLMEngine

    cfg, sd = weights
    before = torch.get_num_threads()
    try:
        eng = LLMEngine(cfg, sd, tokenizer, EngineConfig(compute_threads=1, torch_threads=2, gemv_blas_threads=2,
                                                         num_blocks=256, token_budget=48, max_num_seqs=8))
        rt = eng.runtime
        assert eng.gemm_backend() == "panel" and rt._packed_halves == "panel"
        assert rt.layer_ops is not None
        assert [eng.generate([ids], GREEDY)[0] for ids in prompt_ids] == alone_outputs
        assert eng.generate(prompt_ids, GREEDY) == alone_outputs
    finally:
        torch.set_num_threads(before)

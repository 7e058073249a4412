"""``outlast.serve``: continuous-batching inference with a paged, prefix-sharing KV cache and an
OpenAI-compatible HTTP server, for Llama-family models read from GGUF, Hugging Face or outlast
checkpoints. See ``docs/serve.md``.

Example:
    >>> from outlast.serve import load_engine, SamplingParams
    >>> eng = load_engine("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> ids = eng.tokenizer.chat([{"role": "user", "content": "Hi"}])
    >>> eng.tokenizer.decode(eng.generate([ids], SamplingParams(temperature=0, max_tokens=16))[0])
"""

from __future__ import annotations

import os

from .config import EngineConfig, ModelConfig
from .engine import LLMEngine, StepOutput
from .errors import BadRequestError, ModelLoadError, OverloadedError, ServeError
from .sampler import SamplingParams

__all__ = ["load_engine", "LLMEngine", "EngineConfig", "ModelConfig", "SamplingParams", "StepOutput",
           "ServeError", "ModelLoadError", "BadRequestError", "OverloadedError"]


def load_engine(source: str, engine_config: EngineConfig | None = None, *, prefix: str = "model",
                config: str | None = None, tokenizer: str | None = None) -> LLMEngine:
    """Load weights, config and tokenizer and build an :class:`LLMEngine`.

    Args:
        source: a ``.gguf`` file, a Hugging Face directory or an outlast checkpoint.
        engine_config: limits and cache sizes.
        prefix: the model's sub-tree in an outlast checkpoint.
        config: a config.json for an outlast checkpoint that has no ``serve_config``.
        tokenizer: a GGUF file or HF directory to take the tokenizer from (default: ``source``
            for GGUF/HF; required for an outlast checkpoint unless it names one in ``serve_config``).

    Returns:
        The engine.

    Example:
        >>> eng = load_engine("ckpt/step-00001000", tokenizer="model.gguf")
    """
    from .tokenizer import load_tokenizer
    from .weights import load_weights

    cfg, sd = load_weights(source, prefix=prefix, config=config)
    tok_src = tokenizer or source
    if os.path.isdir(tok_src) and os.path.exists(os.path.join(tok_src, "manifest.json")):
        raise ModelLoadError(f"{source} is an outlast checkpoint: pass tokenizer= (a GGUF file or HF directory)")
    return LLMEngine(cfg, sd, load_tokenizer(tok_src), engine_config)

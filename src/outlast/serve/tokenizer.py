"""Tokenizer and chat template for the served model, through ``transformers``.

A GGUF file carries its own vocabulary, merges and chat template; ``transformers`` builds a
fast tokenizer from them (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``). A Hugging
Face directory has its tokenizer files. :class:`Tokenizer` is the small surface the engine
and server use: encode, decode, render a chat, and the end-of-turn ids.
"""

from __future__ import annotations

import os

from .errors import BadRequestError, ModelLoadError

__all__ = ["Tokenizer", "load_tokenizer"]


class Tokenizer:
    """Wraps a ``transformers`` tokenizer.

    Example:
        >>> tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
        >>> ids = tok.chat([{"role": "user", "content": "Hi"}])
    """

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        eos = {hf_tokenizer.eos_token_id} if hf_tokenizer.eos_token_id is not None else set()
        self.eos_token_ids = tuple(sorted(eos))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template, ending with the assistant's turn."""
        if not getattr(self.hf, "chat_template", None):
            raise BadRequestError("this model has no chat template; use /v1/completions", param="messages")
        try:
            out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # jinja errors on odd messages
            raise BadRequestError(f"messages could not be rendered with the chat template: {e}", param="messages") from None
        if hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)


def load_tokenizer(source: str) -> Tokenizer:
    """Load the tokenizer of a GGUF file or a Hugging Face directory.

    Args:
        source: a ``.gguf`` file or a directory with tokenizer files.

    Returns:
        A :class:`Tokenizer`.

    Example:
        >>> tok = load_tokenizer("model.gguf")
    """
    from transformers import AutoTokenizer

    source = os.fspath(source)
    try:
        if os.path.isfile(source) and source.endswith(".gguf"):
            hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(source)), gguf_file=os.path.basename(source))
        else:
            hf = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"no tokenizer could be loaded from {source}: {e}") from None
    return Tokenizer(hf)

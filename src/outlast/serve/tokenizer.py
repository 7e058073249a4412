"""Tokenizer and chat template for the served model, through ``transformers``.

A GGUF file carries its own vocabulary, merges and chat template; ``transformers`` builds a
fast tokenizer from them (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``). A Hugging
Face directory has its tokenizer files. :class:`Tokenizer` is the small surface the engine
and server use: encode, decode, render a chat, and the end-of-turn ids.

Building the tokenizer from a GGUF file is slow (7-23 s for SmolLM2's 49k vocabulary on the
2-core box: transformers converts the vocabulary and merges in Python), and every server,
replica and test process would pay it. The result is therefore cached as an ordinary
tokenizer directory (``tokenizer.json``, ``tokenizer_config.json``, the chat template: JSON
and text, no pickle) under ``$OUTLAST_CACHE_DIR`` (default ``$XDG_CACHE_HOME/outlast`` or
``~/.cache/outlast``), keyed by the xxh3 hash of the whole GGUF file (about 40 ms for the
135M model), so an edited or replaced file never finds a stale entry. Loading from the
cache takes about 0.5 s. ``OUTLAST_CACHE_DIR=off`` (or an unwritable directory) turns it off.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from .errors import BadRequestError, ModelLoadError

__all__ = ["Tokenizer", "load_tokenizer", "cache_dir"]

log = logging.getLogger("outlast.serve")


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

    def stream(self) -> "DecodeStream":
        """An incremental decoder for one request's output tokens (see :class:`DecodeStream`)."""
        return DecodeStream(self)

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


class DecodeStream:
    """Text of a growing token sequence, a token at a time, without decoding the whole sequence again.

    Backed by ``tokenizers.decoders.DecodeStream`` (about 1 us a token) when the tokenizer is a fast
    one; otherwise the whole sequence is decoded each time. A token that ends inside a multi-byte
    character yields ``""`` until the character completes, so the chunks never hold a partial one;
    their concatenation is ``Tokenizer.decode`` of the tokens, except that bytes still pending at the
    end are not there (decode the whole sequence once at the end to get them as U+FFFD).

    Example:
        >>> ds = tok.stream(); text = "".join(ds.step(t) for t in ids)
    """

    def __init__(self, tok: Tokenizer):
        backend = getattr(tok.hf, "backend_tokenizer", None)
        self._tok = tok
        self._ids: list[int] = []
        self._sent = 0
        self._backend = backend
        if backend is not None:
            from tokenizers.decoders import DecodeStream as _Stream

            self._stream = _Stream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        """The text that ``token_id`` completes ("" while a character is incomplete)."""
        if self._backend is not None:
            return self._stream.step(self._backend, token_id) or ""
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        end = len(text) - (1 if text.endswith("\ufffd") else 0)
        out, self._sent = text[self._sent : max(end, self._sent)], max(end, self._sent)
        return out


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
            hf = _from_gguf(source)
        else:
            hf = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"no tokenizer could be loaded from {source}: {e}") from None
    return Tokenizer(hf)


def cache_dir() -> str | None:
    """Where built tokenizers are cached (None: caching is off)."""
    env = os.environ.get("OUTLAST_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "none") else env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "outlast")


def _file_key(path: str) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _from_gguf(source: str):
    from transformers import AutoTokenizer

    root = cache_dir()
    entry = None
    if root is not None:
        entry = os.path.join(root, "tokenizers", f"gguf-{_file_key(source)}")
        if os.path.isfile(os.path.join(entry, "tokenizer.json")):
            try:
                return AutoTokenizer.from_pretrained(entry)
            except Exception as e:  # noqa: BLE001 - a damaged entry (tokenizers raises plain Exception): rebuild it
                log.warning("the cached tokenizer at %s could not be loaded (%s); rebuilding it from %s", entry, e, source)
                shutil.rmtree(entry, ignore_errors=True)
    hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(source)), gguf_file=os.path.basename(source))
    if entry is not None:
        _store(hf, entry)
    return hf


def _store(hf, entry: str) -> None:
    """Save ``hf`` at ``entry`` atomically (a complete directory or none); failures only warn."""
    parent = os.path.dirname(entry)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        hf.save_pretrained(tmp)
        os.rename(tmp, entry)  # another process may have won the race: then keep its copy
        tmp = None
    except OSError as e:
        if not os.path.isdir(entry):
            log.warning("could not cache the tokenizer under %s (%s); the next start builds it again "
                        "(set OUTLAST_CACHE_DIR to a writable directory, or to 'off')", parent, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

"""The tokenizer cache: a GGUF's tokenizer is built once, then loaded from a plain tokenizer directory."""

from __future__ import annotations

import logging
import os

from outlast.serve import tokenizer as tk

TEXTS = ["Hello world, how are you?", "  leading spaces and ünïcödé — 日本語 🙂", "def f(x):\n    return x ** 2\n"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def _entry(gguf_path: str) -> str:
    return os.path.join(tk.cache_dir(), "tokenizers", f"gguf-{tk._file_key(gguf_path)}")


def _same(a: tk.Tokenizer, b: tk.Tokenizer) -> None:
    for t in TEXTS:
        assert a.encode(t) == b.encode(t)
        assert a.decode(a.encode(t)) == b.decode(b.encode(t))
    assert a.chat(CHAT) == b.chat(CHAT)
    assert a.eos_token_ids == b.eos_token_ids and a.eos_token_ids


def test_gguf_tokenizer_is_cached_and_loads_identically(gguf_path, tokenizer):
    entry = _entry(gguf_path)  # the session fixture built it from the GGUF and stored it
    assert os.path.isfile(os.path.join(entry, "tokenizer.json")), os.listdir(os.path.dirname(entry))
    again = tk.load_tokenizer(gguf_path)
    assert os.path.abspath(again.hf.name_or_path) == os.path.abspath(entry)  # from the cache, not the GGUF
    _same(tokenizer, again)


def test_a_damaged_cache_entry_is_rebuilt_not_used(gguf_path, tokenizer, caplog):
    entry = _entry(gguf_path)
    with open(os.path.join(entry, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "model": ')  # torn
    with caplog.at_level(logging.WARNING, logger="outlast.serve"):
        rebuilt = tk.load_tokenizer(gguf_path)
    assert "could not be loaded" in caplog.text and entry in caplog.text
    _same(tokenizer, rebuilt)
    assert os.path.abspath(tk.load_tokenizer(gguf_path).hf.name_or_path) == os.path.abspath(entry)  # stored again


def test_cache_key_follows_the_file_content(tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    a.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    b.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    c.write_bytes(b"GGUF" + bytes(range(256)) * 99 + bytes(range(255)) + b"\x00")
    assert tk._file_key(str(a)) == tk._file_key(str(b)) != tk._file_key(str(c))


def test_cache_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("OUTLAST_CACHE_DIR", "off")
    assert tk.cache_dir() is None
    monkeypatch.delenv("OUTLAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tk.cache_dir() == os.path.join(str(tmp_path), "outlast")

"""Import a Llama-family GGUF file as an outlast checkpoint (``outlast convert --from gguf``).

The tensors are dequantised to fp32 under Hugging Face names (llama.cpp's Q/K row
permutation undone) and saved with the public :func:`outlast.save` under ``prefix``, next
to a ``serve_config`` value that ``outlast serve`` reads back, so the checkpoint serves
without the GGUF file (the tokenizer still comes from it or an HF directory).
"""

from __future__ import annotations

import os

from .core import ConvertResult

__all__ = ["convert_gguf"]


def convert_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, prefix: str | None = "model",
                 overwrite: bool = False) -> ConvertResult:
    """Write the GGUF file ``src`` as an outlast checkpoint at ``dst``.

    Args:
        src: a ``.gguf`` file of a Llama-family model.
        dst: the checkpoint directory to create.
        prefix: the sub-tree to nest the weights under (default ``model``).
        overwrite: replace an existing checkpoint at ``dst``.

    Returns:
        What was written.

    Example:
        >>> convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "ckpt/smollm2")
    """
    import outlast
    from outlast.serve.gguf import read_gguf

    prefix = prefix or "model"
    cfg, sd = read_gguf(src)
    m = outlast.save({prefix: sd, "serve_config": cfg.to_json()}, dst, overwrite=overwrite).manifest
    return ConvertResult(src=os.fspath(src), dst=os.fspath(dst), src_format="gguf", dst_format="outlast",
                         tensors=len(sd), nbytes=sum(t.numel() * 4 for t in sd.values()),
                         files=sorted(m.files), plain_dropped=[])

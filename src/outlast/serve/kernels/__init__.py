"""Compiled kernels of the serve runtime, built on first use and cached.

:func:`load` gives the module: decode attention over the decode copy (one call per layer, K/V read once per KV head at each sequence's exact length), the layers' GEMMs
on weights packed in panels (``pack_panels``, ``panel_mm``), and the element-wise ops fused
(``rms_norm``, ``add_rms_norm``, ``rope_kv_write``, ``silu_mul``). The runtime uses them in steps on
torch's threads (the engine process), in place of oneDNN and ~40 small torch ops per layer. It is
built with torch's C++ extension tooling, so it needs a C++ compiler and ``ninja`` (in the serve
and test extras); the build (~40 s on 2 cores) happens once per machine and is cached under
``$OUTLAST_KERNEL_DIR`` or ``~/.cache/outlast/kernels``, keyed by the sources, torch's version and
the CPU's flags (it is compiled for this CPU). Where it cannot build, :func:`load` returns None,
says why in a warning once, and the runtime keeps oneDNN and torch ops.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import warnings

import torch

log = logging.getLogger(__name__)

_SRCS = [os.path.join(os.path.dirname(__file__), n) for n in ("decode_attn.cpp", "layer_ops.cpp")]
_HEADERS = [os.path.join(os.path.dirname(__file__), "vexp.h")]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def kernel_dir() -> str:
    """Where the built kernels are cached (``$OUTLAST_KERNEL_DIR`` or ``~/.cache/outlast/kernels``)."""
    return os.environ.get("OUTLAST_KERNEL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "outlast", "kernels")


HEAD_DIMS = (8, 16, 32, 64, 128, 256)
"""The head sizes the kernel is built for."""
MAX_GROUP = 16
"""The most query heads per KV head it takes."""


def supports(head_dim: int, group: int) -> bool:
    """Whether :func:`decode_attention` takes this head size and query heads per KV head."""
    return head_dim in HEAD_DIMS and 1 <= group <= MAX_GROUP


@functools.cache
def load():
    """The compiled module, or None where it cannot build (a ``RuntimeWarning`` says why, once).

    Its ops (fp32; out-of-range indices raise ``RuntimeError`` before anything is written):

    - ``decode_attention(q, k, v, rows, slots, lens, scale, out)``: for each decoding sequence
      ``b``, ``out[rows[b]] = softmax(q[rows[b]] k^T * scale) v`` over ``k``/``v``
      ``[slots[b], h, :lens[b]]``, query heads ``h*G .. h*G+G-1`` sharing KV head ``h``. ``q``,
      ``out``: ``[T, H, D]`` (each head's values contiguous, e.g. a view of the step's fused QKV);
      ``k``, ``v``: ``[slots, kv_heads, capacity, D]``; ``rows``, ``slots``, ``lens``: ``[B]``
      int64, each length >= 1;
    - ``pack_panels(w)`` and ``panel_mm(x, wp, n)``: ``x @ w`` for a ``[in, n]`` matrix packed once
      in panels of 32 columns;

    and the element-wise parts of a decoder layer, fused (each replaces 3-12 small torch ops, whose
    dispatch cost more than their arithmetic at a decode step's few rows):

    - ``rms_norm(x, w, eps)``: RMSNorm of each row of ``x`` (``[rows, hidden]`` fp32), a new tensor;
    - ``add_rms_norm(x, d, w, eps)``: ``x += d`` in place (the residual add), then its RMSNorm;
    - ``silu_mul(gu)``: ``silu(gate) * up`` of ``[rows, 2 * inter]`` (gate first), a new tensor;
    - ``rope_kv_write(qkv, cos, sin, positions, H, kvh, kpool, vpool, slot_mapping, dk, dv, drows,
      dslots, dpos)``: RoPE on the query and key heads of the fused QKV in place, then every row's
      key and value heads to its slot of one layer's paged pool, and decode ``b``'s (row
      ``drows[b]``) to position ``dpos[b]`` of slot ``dslots[b]`` of one layer's decode copy
      (empty index tensors: no decode copy).

    Example:
        >>> ops = load()
        >>> if ops is not None:
        ...     h = ops.rms_norm(x, w, 1e-5)
    """
    if sys.platform != "linux":
        return None
    src = b"".join(open(p, "rb").read() for p in _SRCS + _HEADERS)
    key = hashlib.sha256(src + torch.__version__.encode() + _cpu_flags().encode() + sys.version.encode()).hexdigest()[:16]
    name = f"outlast_serve_kernels_{key}"
    build = os.path.join(kernel_dir(), name)
    path = os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load as build_extension

        if shutil.which("ninja") is None:  # pip's ninja, where its venv's bin is not on PATH
            try:
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
            except ImportError:
                pass
        os.makedirs(build, exist_ok=True)
        if not any(n.endswith(".so") for n in os.listdir(build)):
            log.warning("building the serve kernels into %s (once per machine, ~30-40 s)", build)
        return build_extension(name=name, sources=_SRCS, build_directory=build, verbose=False,
                               extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja, a read-only cache...: torch ops instead
        warnings.warn(f"outlast: the serve kernels did not build ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else e!r}); decode attention and the "
                      f"layers' element-wise ops run on torch ops, slower. Install a C++ compiler and `pip install "
                      f"ninja`, or set OUTLAST_KERNEL_DIR to a writable directory.", RuntimeWarning, stacklevel=2)
        return None
    finally:
        os.environ["PATH"] = path


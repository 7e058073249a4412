"""The Llama-family decoder runtime over one packed, ragged batch per engine step.

Every scheduled token of every sequence goes through one forward: the projections and MLP
run as single GEMMs over all tokens (``[T, hidden]``), attention reads each sequence's
context from the paged KV cache through its block table, and the LM head runs only on
the rows where a token is sampled. Weights are fused (QKV, gate+up) and kept transposed
as numpy arrays because OpenBLAS' GEMM beats torch's default path on the AMD CPUs this
was tuned on (``bench/serve.py --gemm`` measures it); every other op is torch.
"""

from __future__ import annotations

import functools
import itertools
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import ModelLoadError

__all__ = ["LlamaRuntime", "StepInput", "SeqSlice"]


@dataclass
class SeqSlice:
    """One sequence's share of a packed step: ``q_len`` new tokens at rows ``[q_start, q_start+q_len)``.

    ``ctx_len`` counts the tokens in the KV cache once this step's are written (so the new
    tokens sit at positions ``ctx_len - q_len .. ctx_len - 1``); ``block_table`` lists the
    KV blocks holding positions ``0 .. ctx_len - 1`` in order. ``key`` names the sequence across
    steps for the decode copy of its K/V; it must change whenever the sequence's cached K/V could
    (None: no decode copy, its decodes gather from the pool).
    """

    q_start: int
    q_len: int
    ctx_len: int
    block_table: list[int]
    key: object = None


@dataclass
class StepInput:
    """Everything one forward needs: packed tokens, their positions and KV slots, and where to sample."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset
    seqs: list[SeqSlice]
    logits_rows: torch.Tensor  # [S] int64 rows of the packed batch to run the LM head on


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()

ROW_SPLIT_MIN = 256
"""Fewest packed rows for which a GEMM splits its rows over the two threads; from 2 rows up to
this it splits the inner dimension instead (a single row stays one GEMV on one thread)."""


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _worker() -> ThreadPoolExecutor:
    """The process's one compute worker: the second core's share of every split op.

    A plain thread that sleeps on a queue (no spinning), so a busy second core slows a step to
    about one thread's speed instead of collapsing it, as OpenBLAS' or OpenMP's spinning
    workers did on a shared 2-core host. Shared by every runtime in the process: it never
    waits on anything, so callers cannot deadlock on it.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            # torch's thread count in the worker as in the process: a new thread's OpenMP count
            # is the CPU count until something sets it in that thread, so oneDNN's GEMMs in a
            # fresh worker ran on two OpenMP threads beside the engine thread's (a microbenchmark
            # of 120 packed GEMMs at 16 rows: 44.7 ms on the two threads, 37.7 ms with this).
            _POOL = ThreadPoolExecutor(1, thread_name_prefix="outlast-compute",
                                       initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        return _POOL


def _np_mm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.matmul(a, b, out=out)


def _torch_mm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        return torch.mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    torch.mm(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out))
    return out


GEMM_BACKENDS = {"numpy": _np_mm, "torch": _torch_mm, "onednn": _np_mm, "panel": _np_mm}
"""The GEMMs a step can use: numpy's (OpenBLAS), torch's (MKL), oneDNN's on weights packed once
into its blocked layout (:class:`_Packed`, which :meth:`LlamaRuntime._mm` takes wherever a runtime
holds packed copies; where it does not yet, and for one-row steps, ``"onednn"`` is numpy's GEMM),
and the compiled GEMM on weights packed in panels (:class:`_Panel`; numpy's until they are packed).
Which is faster depends on the CPU: see :func:`default_gemm_backend` and :class:`_Panel`."""

PACK_ROWS_HINT = 32
"""The row count oneDNN's packed layout is chosen for. Measured on the 2-core AVX-512 EPYC (one
576x3072 matrix in cache): packing for 1 row made 16-row GEMMs 1.4x slower, for 16, 32 or 128
rows all sizes ran within 5% of each other."""


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (``torch.ops.mkldnn``)."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def _rows(parts: tuple[torch.Tensor, ...], a: int, b: int) -> torch.Tensor:
    """Rows ``a:b`` of the parts stacked (``torch.cat(parts)[a:b]``), fp32, copying only where the
    rows span parts or need converting."""
    got, off = [], 0
    for t in parts:
        n = int(t.shape[0])
        lo, hi = max(a, off), min(b, off + n)
        if lo < hi:
            got.append(t[lo - off:hi - off])
        off += n
    out = got[0] if len(got) == 1 else torch.cat(got)
    return out if out.dtype == torch.float32 else out.float()


class _Packed:
    """A weight packed for oneDNN, whole or as two halves of its output columns (each thread of a
    split step computes one half of the outputs, reading half the weights).

    Built from the ``[out_i, in]`` parts a matrix is fused from (Hugging Face's layout, the
    checkpoint's: reordering those contiguous rows ran at 3.1 GB/s on the AVX-512 EPYC, against 1.5
    from the serving layout's transposed view, which :meth:`from_array` takes). Packing copies the
    weights: the packed halves live beside the numpy array, which one-row steps (GEMVs, where
    numpy's OpenBLAS was the faster) and a reload's buffer reuse still use.
    """

    __slots__ = ("parts", "cut", "dtype")

    def __init__(self, parts: tuple[torch.Tensor, ...], halves: bool, dtype: torch.dtype = torch.float32):
        n = sum(int(t.shape[0]) for t in parts)
        self.cut = (n // 2 + 15) // 16 * 16 if halves and n >= 32 else n
        self.dtype = dtype
        bounds = [(0, self.cut)] + ([(self.cut, n)] if self.cut < n else [])
        self.parts = [torch.ops.mkldnn._reorder_linear_weight(_rows(parts, a, b).to(dtype), PACK_ROWS_HINT)
                      for a, b in bounds]

    @classmethod
    def from_array(cls, w: np.ndarray, halves: bool, dtype: torch.dtype = torch.float32) -> "_Packed":
        """From a ``[in, out]`` serving-layout array (its transposed view)."""
        return cls((torch.from_numpy(w).t(),), halves, dtype)

    @property
    def one_row(self) -> bool:
        """Whether one-row steps use it: bf16 copies only (fp32 GEMVs were faster on numpy's)."""
        return self.dtype != torch.float32

    def __call__(self, x: torch.Tensor, parallel: bool) -> torch.Tensor:
        """``x @ w``, fp32 in and out; bf16 weights take ``x`` rounded to bf16 and give bf16
        products, widened back to fp32 (oneDNN accumulates in fp32)."""
        lin = torch.ops.mkldnn._linear_pointwise
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        if len(self.parts) == 1:
            y = lin(x, self.parts[0], None, "none", [], "")
        elif not parallel:
            y = torch.cat([lin(x, p, None, "none", [], "") for p in self.parts], 1)
        else:
            fut = _worker().submit(lin, x, self.parts[1], None, "none", [], "")
            first = lin(x, self.parts[0], None, "none", [], "")
            y = torch.cat([first, fut.result()], 1)
        return y if y.dtype == torch.float32 else y.float()


class _Panel:
    """A weight packed in panels of 32 columns for the compiled GEMM (``panel_mm`` of
    :func:`outlast.serve.kernels.load`), the ``"panel"`` backend: every step's GEMMs, one-row
    steps included, on torch's threads.

    Measured on the 2-core AVX-512 EPYC, SmolLM2-135M's 120 layer matrices from DRAM (best of 2 x 5,
    ms at 1 / 2 / 8 / 16 / 32 / 512 rows): panels 10.2 / 13.0 / 11.0 / 18.9 / 34.5 / 542, oneDNN's
    packed GEMMs 23.2 / 26.0 / 20.6 / 25.3 / 41.5 / 548, numpy's (OpenBLAS) 19.4 / 38.8 / 43.9 / 53.5
    / 70.2 / 652. Up to 32 rows that is 180-197 GFLOP/s, the two cores' fp32 FMA peak, and a lone
    decode's GEMVs read the weights at ~40 GB/s: each panel is streamed once per 8 rows, against
    16 vector accumulators.
    """

    __slots__ = ("w", "n", "mm")
    dtype = torch.float32
    one_row = True

    def __init__(self, w: np.ndarray, ops):
        self.w = ops.pack_panels(torch.from_numpy(w))
        self.n = int(w.shape[1])
        self.mm = ops.panel_mm

    def __call__(self, x: torch.Tensor, parallel: bool) -> torch.Tensor:
        return self.mm(x, self.w, self.n)


@functools.cache
def default_gemm_backend() -> str:
    """``"onednn"`` where this torch build has it; else ``"torch"`` (MKL) on Intel CPUs and
    ``"numpy"`` (OpenBLAS) elsewhere.

    Measured on the 2-core AMD EPYC with AVX-512 for one step's 120 layer GEMMs of SmolLM2-135M
    (weights in DRAM, one thread, ms at 2 / 4 / 16 / 32 rows): oneDNN on packed weights 39 / 25 /
    44 / 76, OpenBLAS 58 / 61 / 79 / 114, MKL 40 / 60 / 81 / 118; at one row OpenBLAS was the
    fastest (23 against 33 for oneDNN), which is why one-row steps stay on it. This is vLLM's choice
    on x86 CPUs too (oneDNN on prepacked weights). Earlier, without packing: MKL was the faster on
    the 2-core Xeon (42 / 72 / 90 ms at 2 / 16 / 32 rows against OpenBLAS's 75 / 99 / 111), and
    OpenBLAS on the EPYC without AVX-512; oneDNN was not measured on those hosts.
    """
    if onednn_available():
        return "onednn"
    try:
        with open("/proc/cpuinfo") as f:
            intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        intel = False
    return "torch" if intel else "numpy"


def _linear(x: torch.Tensor, w: np.ndarray, parallel: bool = True, mm=_np_mm) -> torch.Tensor:
    """``x @ w`` through ``mm`` (one of :data:`GEMM_BACKENDS`); ``w`` is ``[in, out]`` C-contiguous fp32.

    With ``parallel``, the compute worker takes half of the work while the caller does the other
    half (both GEMMs release the GIL): from :data:`ROW_SPLIT_MIN` rows up, half the rows;
    below it, half the inner dimension (each thread reads half the weights, which is what bounds
    a decode step; the halves of ``w`` are contiguous views, and the two partial products are
    added). Measured on the 2-core EPYC for one step's 120 layer GEMMs of SmolLM2-135M (weights
    in DRAM): 1 row 22 ms on one thread (two threads were no faster), 16 rows 72 -> 44 ms,
    32 rows 107 -> 80 ms, 512 rows 1280 -> 668 ms (row split; 842 splitting the inner dimension).
    """
    xn = x.numpy()
    m, k = xn.shape
    if not parallel or m < 2:
        return torch.from_numpy(mm(xn, w))
    if m >= ROW_SPLIT_MIN:
        out = np.empty((m, w.shape[1]), np.float32)
        h = m // 2
        fut = _worker().submit(mm, xn[h:], w, out[h:])
        mm(xn[:h], w, out[:h])
        fut.result()
        return torch.from_numpy(out)
    h = k // 2
    fut = _worker().submit(mm, xn[:, h:], w[h:])
    out = mm(xn[:, :h], w[:h])
    out += fut.result()
    return torch.from_numpy(out)


_BLAS = None


def _set_blas_threads(n: int) -> None:
    """numpy's BLAS threads, process-wide (a C call through threadpoolctl's controller, made once)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController().select(user_api="blas").lib_controllers
    for lib in _BLAS:
        lib.set_num_threads(n)


def _both(f, a, b):
    """``(f(*a), f(*b))`` with ``b`` on the compute worker (torch ops release the GIL)."""
    fut = _worker().submit(_in_inference_mode, f, b)
    return f(*a), fut.result()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
            out: torch.Tensor | None = None, omp: bool = False) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` over a batch: q ``[b, G, D]``, k/v ``[b, L, D]`` (any batch
    stride), bias ``[b, G, L]`` or None; into ``out`` (``[b, G, D]``, contiguous) when given.

    The batched products are numpy's (OpenBLAS, one GEMM per batch item, the GIL released), except
    the scores when ``omp`` (the step runs on torch's OpenMP threads, and nothing else splits
    it): there ``torch.baddbmm`` on both threads was the faster. torch's ``bmm`` goes through MKL,
    which on the AMD EPYC ran these shapes slower. Measured there, 30 layers of 32 sequences x 3
    KV heads x 320 positions (data in DRAM), ms: scores numpy 20.2 on one thread, torch 27.2 on
    one and 14.9-16.1 on two; values numpy 14.7 on one thread, torch 43.4 on one and 22.1 on two."""
    if omp:
        s = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale) if bias is not None else \
            torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    else:
        s = torch.from_numpy(np.matmul(q.numpy(), k.numpy().transpose(0, 2, 1)))
        s.mul_(scale)
        if bias is not None:
            s.add_(bias)
    p = torch.softmax(s, -1).numpy()
    if out is None:
        return torch.from_numpy(np.matmul(p, v.numpy()))
    np.matmul(p, v.numpy(), out=out.numpy())
    return out


def _in_inference_mode(f, args):
    with torch.inference_mode():  # thread-local: the worker enters it as the engine thread has
        return f(*args)


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _empty(shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new CPU tensor; fp32 ones from numpy, whose allocator asks the kernel for transparent huge
    pages on large arrays (torch's does not): touching 540 MB of new memory took 0.06-0.08 s that
    way against 0.15 s for ``torch.empty`` on the 2-core EPYC, and far more where 4 KiB faults are
    slow (on a new VM, ~11 us each)."""
    if dtype == torch.float32:
        return torch.from_numpy(np.empty(shape, np.float32))
    return torch.empty(shape, dtype=dtype)


def _lazy_zeros(shape: tuple) -> torch.Tensor:
    """A zeroed fp32 tensor whose pages are mapped as they are first written, from an anonymous
    ``mmap`` advised for transparent huge pages (``MADV_HUGEPAGE``), for large buffers filled bit by bit.

    numpy's ``zeros`` (calloc) made those first writes the slowest part of a first burst on the
    2-core EPYC VM: giving 32 new sequences of 160 positions their place in the decode copy
    (:class:`_DecodeKV`, 2 GiB) took 0.58-1.14 s against 0.05-0.07 s this way, and a fresh
    engine's first six steps of a burst of 32 requests took 5.2-6.7 s against 3.4-3.8 s; decode
    steps over the mapped memory ran as fast as before. Falls back to numpy where ``mmap`` cannot do
    this (not Linux)."""
    n = int(np.prod(shape))
    try:
        m = mmap.mmap(-1, max(n, 1) * 4)
        m.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):
        return torch.from_numpy(np.zeros(shape, np.float32))
    return torch.from_numpy(np.frombuffer(m, np.float32, count=n).reshape(shape))  # the array keeps m alive


def _fuse_t(*parts: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """``[out_i, in]`` parts (any float dtype) -> one C-contiguous fp32 ``[in, sum(out_i)]``: fuses,
    converts and transposes in one pass, into ``out`` when it has that shape (a retired runtime's
    array, whose pages are already mapped), else into a new array.

    The kernel per shape is the fastest of those measured on the 2-core AMD EPYC this was tuned on
    (single-threaded, GB/s of source): numpy's strided copy in bands of 128 rows for matrices with
    576 columns (7.3-7.9, against 4.6-5.0 with 512-row bands), 512-row bands for the 113 MB LM head
    (3.6 against 3.1), torch's transposing copy for rows of 1536 (5.4 against 1.7 for numpy).
    """
    shape = (parts[0].shape[1], sum(t.shape[0] for t in parts))
    if out is None or out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        out = np.empty(shape, np.float32)
    col = 0
    for t in parts:
        rows, cols = t.shape
        if t.dtype != torch.float32 or cols > 1024 or not t.is_contiguous():
            torch.from_numpy(out)[:, col:col + rows].copy_(t.t())
        else:
            a = t.numpy()
            band = 512 if rows > 8192 else 128
            for r in range(0, rows, band):
                b = a[r:r + band]
                out[:, col + r:col + r + b.shape[0]] = b.T
        col += rows
    return out


PREFILL_ROWS = 128
"""Query rows per prefill attention job: each job attends only to the context its last row sees."""


def _prefill_jobs(prefills: list["SeqSlice"], threads: int) -> list[list[tuple]]:
    """Prefill attention as jobs of at most :data:`PREFILL_ROWS` query rows, shared out over ``threads``.

    A job ``(seq index, r0, r1, n, mask)`` computes rows ``r0..r1`` of a chunk against the first
    ``n`` positions of its context, the last that row ``r1 - 1`` may see: under a causal mask the
    rows of a long chunk need less and less of the context going up, so cutting it into jobs skips
    most of the masked half that one SDPA over the whole chunk computes (5/8 of the work with 4
    jobs). Jobs go largest first to the thread with the least work.
    """
    jobs = []
    for i, s in enumerate(prefills):
        start = s.ctx_len - s.q_len
        for r0 in range(0, s.q_len, PREFILL_ROWS):
            r1 = min(r0 + PREFILL_ROWS, s.q_len)
            n = start + r1
            mask = torch.arange(n)[None, :] <= torch.arange(start + r0, start + r1)[:, None]
            jobs.append((i, r0, r1, n, mask))
    out: list[list[tuple]] = [[] for _ in range(max(threads, 2))]
    work = [0] * threads
    for job in sorted(jobs, key=lambda j: -(j[2] - j[1]) * j[3]):
        t = work.index(min(work))
        out[t].append(job)
        work[t] += (job[2] - job[1]) * job[3]
    return out


PAD_COST = 256
"""A sequence attended on its own costs about as much as this many padded positions of the
batched pass (one call's overhead against the bytes of one position of K and V)."""


def _pad_length(slots: int, lens: list[int]) -> int:
    """The padded length of the batched decode attention that costs least: ``slots`` rows padded
    to it, plus every longer sequence on its own (its length and :data:`PAD_COST`)."""
    ls = sorted(lens)
    best, best_cost = ls[-1], slots * ls[-1]
    tail = 0
    for i in range(len(ls) - 1, 0, -1):  # pad to ls[i - 1]: sequences i.. go alone
        tail += ls[i] + PAD_COST
        cost = slots * ls[i - 1] + tail
        if cost < best_cost:
            best, best_cost = ls[i - 1], cost
    return best


class _DecodeKV:
    """Each decoding sequence's K/V kept contiguous, so decode attention reads it in place.

    The paged pool stays the truth (prefix sharing, spill, preemption); this is a copy of the
    running decodes' contexts, ``[layers, slots, kv_heads, capacity, head_dim]``, appended one
    token per step. Without it every decode step gathered every sequence's blocks out of the
    pool in every layer: at batch 32 and ~300 tokens of context that copy was 55 of 285 ms.

    A sequence gets a slot the first step it decodes (one gather of its context, all layers at
    once) and loses it the first step it is not decoding (finished, preempted, aborted, or not
    scheduled). Its key must change whenever its cached K/V could (the engine passes its request
    serial and preemption count).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_bytes: int, slots: int,
                 max_len: int):
        self.args = (num_layers, num_kv_heads, head_dim, max_bytes, slots, max_len)
        per_position = 2 * num_layers * slots * num_kv_heads * head_dim * 4
        cap = min(-(-max_len // 256) * 256, max_bytes // per_position // 256 * 256)
        # Sized once, from the budget: growing it copied the whole copy (up to 2 GiB) while the
        # contexts grew, which made the first minute of serving at 32 sequences ~30% slower.
        # Pages are mapped as slots first use them (see _lazy_zeros).
        self.k = _lazy_zeros((num_layers, slots, num_kv_heads, max(cap, 0), head_dim))
        self.v = _lazy_zeros((num_layers, slots, num_kv_heads, max(cap, 0), head_dim))
        self.slot_of: dict[object, int] = {}
        self.lens: list[int] = [0] * slots  # tokens held per slot (0 = free)
        self.fallbacks = 0  # steps whose decodes did not fit and gathered instead

    def reset(self) -> "_DecodeKV":
        """Free every slot (the next decode of each sequence gathers its context again)."""
        self.slot_of.clear()
        self.lens = [0] * len(self.lens)
        return self

    def prepare(self, decodes: list["SeqSlice"], k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor | None:
        """Give every decode a slot holding its first ``ctx_len - 1`` positions; returns the slot
        index per decode, or None (the step falls back to gathering) when there are more decodes
        than slots or a context is longer than the copy's capacity."""
        live = {s.key for s in decodes}
        for key in [k for k in self.slot_of if k not in live]:
            self.lens[self.slot_of.pop(key)] = 0
        used = set(self.slot_of.values())
        lowest_free = (i for i in itertools.count() if i not in used)
        fresh = set()
        for s in decodes:
            if s.key not in self.slot_of:
                self.slot_of[s.key] = next(lowest_free)
                fresh.add(s.key)
        bs = k_cache.shape[3]
        longest = -(-max(s.ctx_len for s in decodes) // bs) * bs  # slots are filled in whole blocks
        if max(self.slot_of.values()) >= self.k.shape[1] or longest > self.k.shape[3]:
            for key in fresh:
                del self.slot_of[key]
            self.fallbacks += 1
            return None
        for s in decodes:
            n, slot = s.ctx_len - 1, self.slot_of[s.key]
            if (s.key in fresh or self.lens[slot] != n) and n > 0:
                blocks = torch.tensor(s.block_table[: -(-n // bs)], dtype=torch.int64)
                for src, dst in ((k_cache, self.k), (v_cache, self.v)):
                    # One gather for all layers, straight into the slot (whole blocks: the positions
                    # past n are masked, and position n is written by this step).
                    L, _, KVH, _, D = dst.shape
                    into = dst[:, slot, :, : len(blocks) * bs].view(L, KVH, len(blocks), bs, D)
                    torch.index_select(src, 2, blocks, out=into)
            self.lens[slot] = s.ctx_len
        return torch.tensor([self.slot_of[s.key] for s in decodes], dtype=torch.int64)


class LlamaRuntime:
    """A Llama-family decoder ready to run packed steps against a paged KV cache.

    Args:
        config: the model's shape.
        state_dict: fp32 (or castable) tensors under Hugging Face names.
        into: a retired runtime's :meth:`arrays`, overwritten with these weights where shapes match
            (a hot reload builds into the weights it swapped out: no new memory, no page faults).
            Nothing may still compute with them.
        pack: also pack every matrix for oneDNN (:class:`_Packed`) from the parts as given, on the
            build's threads: True in halves of the output columns (steps on two threads), False
            whole, None not at all (:meth:`pack` can do it later, from the built arrays).
        pack_dtype: the packed copies' dtype. ``torch.bfloat16`` halves the bytes every GEMM reads
            and runs them on the CPU's bf16 dot products where it has them (AVX512-BF16, AMX): the
            GEMMs of every step, one-row steps included, then go through oneDNN, their inputs
            rounded to bf16; everything else (norms, attention, the KV cache, the residual
            stream) stays fp32.

    Example:
        >>> rt = LlamaRuntime(cfg, sd)
        >>> logits = rt.forward(step, kv_cache)   # [len(step.logits_rows), vocab]
    """

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], *,
                 into: dict | None = None, pack: bool | None = None, pack_dtype: torch.dtype = torch.float32):
        self.nbytes = sum(int(t.numel()) * 4 for t in state_dict.values())
        into = into or {}

        def take(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise ModelLoadError(f"weights lack {name!r} (have e.g. {sorted(state_dict)[:3]})")
            return state_dict[name].detach()

        self.borrowed: dict = {}
        """``{arrays() key: state_dict name}`` of the tensors held as the caller gave them (fp32,
        contiguous: the embedding and the norms, used as they are). They are the caller's memory,
        so :meth:`arrays` of a retired runtime is reused only without them (a reload that owns the
        tensors it built from hands them over and empties this)."""

        def own(name: str, key) -> torch.Tensor:
            t = take(name)
            if t.dtype == torch.float32 and t.is_contiguous():
                self.borrowed[key] = name
                return t
            dst = into.get(key)  # converted: into the retired array when one fits
            if dst is None or tuple(dst.shape) != tuple(t.shape) or dst.dtype != torch.float32:
                dst = _empty(tuple(t.shape))
            return dst.copy_(t)

        t0 = time.monotonic()
        self.config = c = config
        self.embed = own("model.embed_tokens.weight", "embed")
        if tuple(self.embed.shape) != (c.vocab_size, c.hidden_size):
            raise ModelLoadError(f"model.embed_tokens.weight has shape {tuple(self.embed.shape)}, "
                                 f"config says {(c.vocab_size, c.hidden_size)}")
        head = state_dict.get("lm_head.weight") if not c.tie_word_embeddings else None
        self.final_norm = own("model.norm.weight", "final_norm")
        # Every matrix is fused and transposed on its own, so they are built in parallel (numpy's
        # and torch's copies release the GIL): 0.20-0.23 s against 0.35-0.51 s on one thread for
        # SmolLM2-135M on 2 cores, the same arrays. The slowest part of a hot reload.
        jobs = {"lm_head": (head if head is not None else self.embed,)}
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "attn_norm": own(p + "input_layernorm.weight", (i, "attn_norm")),
                "mlp_norm": own(p + "post_attention_layernorm.weight", (i, "mlp_norm")),
            })
            jobs[(i, "wqkv")] = tuple(take(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            jobs[(i, "wo")] = (take(p + "self_attn.o_proj.weight"),)
            jobs[(i, "wgu")] = (take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight"))
            jobs[(i, "wdown")] = (take(p + "mlp.down_proj.weight"),)
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="outlast-build") as pool:
            built = pool.map(lambda kv: _fuse_t(*kv[1], out=into.get(kv[0])), jobs.items())
            # oneDNN's packing from the same parts, on the same threads (``pack``: halves or not)
            packs = pool.map(lambda parts: _Packed(parts, pack, pack_dtype), jobs.values()) if pack is not None else None
            built = dict(zip(jobs, built))
            self.packed: dict[int, _Packed] = {}
            """oneDNN's packed copy of each matrix, by ``id`` of its numpy array (see :meth:`pack`)."""
            self._packed_halves = None
            if packs is not None:
                self.packed = {id(built[k]): p for k, p in zip(jobs, packs)}
                self._packed_halves = pack
        self.lm_head = built.pop("lm_head")
        for (i, name), w in built.items():
            self.layers[i][name] = w
        inv_freq = c.rope_inv_freq()
        freqs = torch.arange(c.max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], -1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.build_seconds = time.monotonic() - t0  # fuse + transpose, for the reload's timings
        self.parallel = _usable_cpus() >= 2
        """Run each step on two threads (see :func:`_linear`); the engine sets it from its config."""
        self.single_row_blas_threads = 0
        """BLAS threads for a one-token step (0: leave BLAS alone); see :meth:`configure`."""
        self.gemm = self._step_gemm = _np_mm
        """The GEMM of every layer (one of :data:`GEMM_BACKENDS`); see :meth:`configure`."""
        self.pack_seconds = 0.0
        self.decode_kv: _DecodeKV | None = None
        """The decode copy of running sequences' K/V (None: gather from the pool every step); the
        engine sets it up with :meth:`configure`."""
        self.layer_ops = None
        """The compiled module (:func:`outlast.serve.kernels.load`), in steps that do not split work
        with the compute worker: its decode attention over the decode copy, and its fused norms,
        RoPE with the K/V writes, and SiLU-and-multiply in place of the layers' small torch ops;
        None: torch ops. Set by :meth:`configure`."""

    def arrays(self) -> dict:
        """Every weight buffer this runtime owns, keyed as ``LlamaRuntime(into=...)`` takes them."""
        out = {"embed": self.embed, "final_norm": self.final_norm, "lm_head": self.lm_head}
        for i, layer in enumerate(self.layers):
            out.update({(i, name): a for name, a in layer.items()})
        return out

    def configure(self, *, parallel: bool, decode_kv_bytes: int, max_seqs: int, max_len: int,
                  single_row_blas_threads: int = 0, gemm: str = "numpy",
                  reuse_decode_kv: "_DecodeKV | None" = None, kernels: bool = False) -> "LlamaRuntime":
        """Set how steps run: on two threads or one, and the decode copy (``decode_kv_bytes`` of
        memory for ``max_seqs`` sequences of up to ``max_len`` tokens; 0 bytes turns it off).

        ``single_row_blas_threads`` > 1: a step of one token (a lone decode: every GEMM is a GEMV,
        which our own worker cannot speed up, the hand-off costing what the split saves) runs its
        GEMVs on that many of numpy's BLAS threads (whatever ``gemm`` says), and sets BLAS back to
        one thread after it (``EngineConfig.gemv_blas_threads`` says when this pays). 0 leaves
        numpy's BLAS alone. Not with bf16 packed weights, whose GEMVs are oneDNN's on torch's threads.

        ``gemm``: the GEMM backend of steps of two tokens or more, a key of :data:`GEMM_BACKENDS`.
        ``"onednn"`` uses the packed weights once there are some (the constructor's ``pack``, or
        :meth:`pack`, which can run on another thread while this runtime serves); until then its
        GEMMs are numpy's. ``"panel"`` likewise with :meth:`pack_panels`, for every step, one-row
        ones included; it needs the compiled kernels and steps on torch's threads (``parallel``
        False, ``kernels``), else its GEMMs stay numpy's. Any other backend drops the packed copies.

        ``reuse_decode_kv``: the decode copy of the runtime this one replaces, taken over (emptied)
        when it has the size asked for, so a weight swap maps no new memory for it.

        ``kernels``: decode attention over the decode copy and the layers' element-wise ops run in
        the compiled kernels (:attr:`layer_ops`, :mod:`outlast.serve.kernels`, built on first use;
        torch ops where they cannot build) when steps do not split work with the compute worker
        (``parallel`` False). Measured on the 2-core EPYC in the engine process's set-up (two
        OpenMP threads, 150-token contexts, GEMMs on panels both ways): the parts of a step other
        than its GEMMs took 12.8-13.9 ms at 16 sequences and 27.7-33.1 at 32, against 18.4-21.2
        and 36.8-43.4 with torch ops and the attention kernel alone (docs/serve.md, session 30).
        """
        if gemm not in GEMM_BACKENDS:
            raise ValueError(f"unknown GEMM backend {gemm!r}; use one of {sorted(GEMM_BACKENDS)}")
        self.parallel = parallel
        self.single_row_blas_threads = single_row_blas_threads
        self.gemm = GEMM_BACKENDS[gemm]
        if (gemm == "panel") != (self._packed_halves == "panel") or gemm not in ("onednn", "panel"):
            self.packed, self._packed_halves = {}, None  # packed for another backend
        c = self.config
        self.layer_ops = None
        if kernels and not parallel:
            from . import kernels as kern

            if kern.supports(c.head_dim, c.num_heads // c.num_kv_heads):
                self.layer_ops = kern.load()
        self.decode_kv = None
        if decode_kv_bytes > 0:
            args = (c.num_layers, c.num_kv_heads, c.head_dim, decode_kv_bytes, max_seqs, max_len)
            old = reuse_decode_kv
            self.decode_kv = old.reset() if old is not None and old.args == args else _DecodeKV(*args)
        return self

    def pack(self, halves: bool, dtype: torch.dtype = torch.float32) -> "LlamaRuntime":
        """Pack every layer matrix and the LM head for the ``"onednn"`` backend (:class:`_Packed`),
        in halves of their columns when steps run on two threads, from the built arrays, as
        ``dtype`` (see the constructor's ``pack_dtype``); done once for each way of packing.

        It may run on another thread while this runtime serves: the packed copies are put in place
        in one assignment, and steps use numpy's GEMMs until then. A hot reload does that after
        its swap: packing 540 MB took 0.25-2.3 s on the 2-core EPYC (into new memory, with the
        host's load), which before the swap would have delayed the new weights. The time it took
        is ``pack_seconds``."""
        if self.packed and self._packed_halves == halves and self._packed_dtype() == dtype:
            return self
        ws = [self.lm_head] + [L[n] for L in self.layers for n in ("wqkv", "wo", "wgu", "wdown")]
        t0 = time.monotonic()
        with ThreadPoolExecutor(max(1, min(2, _usable_cpus())), thread_name_prefix="outlast-pack") as pool:
            self.packed = dict(zip(map(id, ws), pool.map(lambda w: _Packed.from_array(w, halves, dtype), ws)))
        self._packed_halves = halves
        self.pack_seconds = time.monotonic() - t0
        return self

    def pack_panels(self) -> "LlamaRuntime":
        """Pack every layer matrix and the LM head in panels for the ``"panel"`` backend
        (:class:`_Panel`), from the built arrays, once; a no-op where the compiled kernels cannot
        build (steps keep numpy's GEMMs). Like :meth:`pack`, it may run on another thread while
        this runtime serves; ``pack_seconds`` is the time it took."""
        if self.packed and self._packed_halves == "panel":
            return self
        from . import kernels

        ops = kernels.load()
        if ops is None:
            return self
        ws = [self.lm_head] + [L[n] for L in self.layers for n in ("wqkv", "wo", "wgu", "wdown")]
        t0 = time.monotonic()
        with ThreadPoolExecutor(max(1, min(2, _usable_cpus())), thread_name_prefix="outlast-pack") as pool:
            packed = dict(zip(map(id, ws), pool.map(lambda w: _Panel(w, ops), ws)))
        self.packed, self._packed_halves = packed, "panel"
        self.pack_seconds = time.monotonic() - t0
        return self

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, path: str, prefix: str = "model", *,
                        staging: dict | None = None, into: dict | None = None,
                        direct_io: bool = False) -> "LlamaRuntime":
        """Read an outlast checkpoint (every chunk's checksum checked) and build the serving layout.

        One read of every tensor the model needs through one reader, as :func:`outlast.read` does,
        then the constructor's fuse-and-transpose. On the result, ``load_seconds`` is the time
        spent reading and verifying and ``manifest`` the manifest the reads were checked against
        (so an identity taken from it names exactly the bytes served).

        Reading layer by layer into a cache-sized scratch instead was measured and dropped: 61
        smaller reads (each planned and dispatched to the reader's threads) were slower than one,
        in process and in ``outlast serve --watch`` (docs/fleet.md, "Reload, measured on its own").

        A hot reload passes ``staging`` (a dict it keeps: the read's destination tensors, reused
        by name when shape and dtype match, added otherwise; the ones the runtime keeps as they are
        are replaced by the retired arrays of the same keys) and ``into`` (the retired runtime's
        :meth:`arrays`), so that it maps no new memory: on the 2-core EPYC, first-touch page faults
        made a read into new tensors 0.3-1.7 s and a build 0.2-1.0 s, against 0.10 and 0.23 s into
        mapped ones. ``direct_io`` reads with O_DIRECT (:attr:`outlast.reader.CheckpointReader.direct_io`):
        for a step just committed with O_DIRECT, which is not in the page cache.

        Raises:
            ModelLoadError: a tensor the model needs is missing, or has an unsupported dtype.
            outlast.errors.CheckpointError: a checksum fails, or the files are damaged.

        Example:
            >>> rt = LlamaRuntime.from_checkpoint(cfg, "runs/exp1/step-00000200")
        """
        from ..reader import CheckpointReader, ReadRequest
        from ..regions import Box

        t0 = time.monotonic()
        with CheckpointReader(path, direct_io=direct_io) as reader:
            entries = {".".join(map(str, e.path[1:])): (fqn, e) for fqn, e in reader.manifest.tensors.items()
                       if len(e.path) > 1 and e.path[0] == prefix}
            sd = {}
            for name, (fqn, e) in entries.items():
                dtype = _DTYPES.get(e.dtype)
                if dtype is None:
                    raise ModelLoadError(f"{prefix}.{name} in {path} has dtype {e.dtype}; serving reads "
                                         f"{sorted(_DTYPES)}")
                shape = tuple(e.shape)
                t = staging.get(name) if staging is not None else None
                if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                    t = _empty(shape, dtype)
                    if staging is not None:
                        staging[name] = t
                sd[name] = t
            reader.read_regions([ReadRequest(entries[n][0], Box.full(tuple(t.shape)), t) for n, t in sd.items()])
            rt = cls(config, sd, into=into)
            rt.manifest = reader.manifest
        if staging is not None:
            # The runtime keeps the staging tensors it uses as they are; the retired arrays of the
            # same keys take their place as the next read's destinations (no copy either way).
            for key, name in rt.borrowed.items():
                spare = (into or {}).get(key)
                if spare is not None and spare.shape == staging[name].shape and spare.dtype == staging[name].dtype:
                    staging[name] = spare
                else:
                    del staging[name]
            rt.borrowed = {}
        rt.load_seconds = time.monotonic() - t0 - rt.build_seconds
        return rt

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.config.rms_norm_eps))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def _packed_dtype(self) -> torch.dtype | None:
        """The packed copies' dtype (None: not packed). bf16 copies serve one-row steps too: there
        is no bf16 GEMV to fall back on, and the fp32 arrays would change the numerics."""
        return next(iter(self.packed.values())).dtype if self.packed else None

    def _mm(self, x: torch.Tensor, w: np.ndarray) -> torch.Tensor:
        packed = self.packed.get(id(w)) if self.packed else None  # "onednn" or "panel" (configure)
        if packed is not None and (x.shape[0] > 1 or packed.one_row):
            return packed(x.contiguous(), self.parallel)
        return _linear(x, w, self.parallel, self._step_gemm)

    @torch.inference_mode()
    def forward(self, step: StepInput, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Run one packed step, writing its K/V into the cache.

        Args:
            step: the packed batch.
            k_cache, v_cache: ``[num_layers, num_kv_heads, num_blocks, block_size, head_dim]``. Heads
                come before blocks so that a sequence's blocks, gathered (one ``index_select`` on
                dim 1 of a layer's slice), give each head's context as one contiguous
                ``[ctx, head_dim]`` matrix.

        Decode rows (one new token) whose :attr:`SeqSlice.key` is set attend over the decode
        copy (:class:`_DecodeKV`) in place, as batched GEMMs; other decode rows gather their
        blocks each layer; prefill chunks run SDPA over their gathered context.

        Returns:
            ``[len(step.logits_rows), vocab_size]`` fp32 logits.
        """
        packed = next(iter(self.packed.values()), None)
        if (self.single_row_blas_threads > 1 and int(step.token_ids.shape[0]) == 1
                and not (packed is not None and packed.one_row)):  # bf16 and panel GEMVs run on torch's threads
            # torch down to one thread for the step: OpenBLAS' two threads beside torch's spinning
            # OpenMP workers made one-row steps 330 ms instead of 40.
            torch_threads = torch.get_num_threads()
            if torch_threads > 1:
                torch.set_num_threads(1)
            _set_blas_threads(self.single_row_blas_threads)
            self._step_gemm = _np_mm  # GEMVs on BLAS' threads
            try:
                return self._forward(step, k_cache, v_cache)
            finally:
                _set_blas_threads(1)
                if torch_threads > 1:
                    torch.set_num_threads(torch_threads)
        self._step_gemm = self.gemm
        return self._forward(step, k_cache, v_cache)

    def _forward(self, step: StepInput, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        c = self.config
        H, KVH, D = c.num_heads, c.num_kv_heads, c.head_dim
        G = H // KVH
        T = int(step.token_ids.shape[0])
        num_blocks, bs = k_cache.shape[2], k_cache.shape[3]
        par = self.parallel
        omp = not par and torch.get_num_threads() > 1  # the step's ops on torch's OpenMP threads
        ops = self.layer_ops
        x = self.embed[step.token_ids]
        if ops is None:  # the fused RoPE reads the tables by position itself
            cos = self.cos[step.positions][:, None, :]
            sin = self.sin[step.positions][:, None, :]
        decodes = [s for s in step.seqs if s.q_len == 1]
        prefills = [s for s in step.seqs if s.q_len > 1]
        resident = gathered = None
        if decodes:
            starts = [s.q_start for s in decodes]
            B = len(decodes)
            rows = slice(0, B) if starts == list(range(B)) else torch.tensor(starts)
            slot_idx = None
            if self.decode_kv is not None and all(s.key is not None for s in decodes):
                slot_idx = self.decode_kv.prepare(decodes, k_cache, v_cache)
            if slot_idx is not None:
                # One batched pass over every slot below the highest in use, padded to `pad`
                # positions (a free slot in between attends to one stale position and is
                # dropped); sequences longer than `pad` are then computed one by one at their
                # exact length: one long context no longer pads all the others up to it.
                top = int(slot_idx.max()) + 1
                lens_now = [s.ctx_len for s in decodes]
                pos = torch.tensor([n - 1 for n in lens_now])
                if ops is not None:
                    # The compiled kernel: each decode's row of q and of the output in place, its
                    # slot at its exact length.
                    exact = (torch.tensor(starts, dtype=torch.int64), torch.tensor(lens_now, dtype=torch.int64))
                    resident = (rows, slot_idx, pos, top, None, exact)
                else:
                    pad = _pad_length(top, lens_now)
                    lens = torch.tensor(self.decode_kv.lens[:top]).clamp_(1, pad)
                    bias = torch.zeros(top, pad)
                    bias.masked_fill_(torch.arange(pad)[None, :] >= lens[:, None], float("-inf"))
                    bias = bias[:, None, None, :].expand(top, KVH, G, pad).reshape(top * KVH, G, pad)
                    longs = [(int(slot), n) for slot, n in zip(slot_idx.tolist(), lens_now) if n > pad]
                    cut = top // 2 if par and top >= 2 else top
                    shares = ([(0, cut)], [(cut, top)] if cut < top else [])
                    work = [cut * pad, (top - cut) * pad]
                    for slot, n in sorted(longs, key=lambda t: -t[1]):  # longest first, to the lighter thread
                        t = 0 if not shares[1] or work[0] <= work[1] else 1
                        shares[t].append((slot, n))
                        work[t] += n + PAD_COST
                    resident = (rows, slot_idx, pos, top, (pad, bias, shares), None)
            else:
                # Padded block index and additive mask built once per step; the gather buffers
                # are reused by every layer.
                nb = max(len(s.block_table) for s in decodes)
                flat = torch.zeros(B, nb, dtype=torch.int64)
                for i, s in enumerate(decodes):
                    flat[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int64)
                ctx = torch.tensor([s.ctx_len for s in decodes])
                bias = torch.zeros(B, nb * bs)
                bias.masked_fill_(torch.arange(nb * bs)[None, :] >= ctx[:, None], float("-inf"))
                bias = bias[None, :, None, :].expand(KVH, B, G, nb * bs).reshape(KVH * B, G, nb * bs)
                kbuf = torch.empty(KVH, B * nb, bs, D)
                vbuf = torch.empty(KVH, B * nb, bs, D)
                gathered = (B, rows, flat.view(-1), bias, nb, kbuf, vbuf)
        pre = [(s, torch.tensor(s.block_table[: -(-s.ctx_len // bs)], dtype=torch.int64)) for s in prefills]
        pre_jobs = _prefill_jobs(prefills, 2 if par else 1)
        slots = step.slot_mapping
        scale = D ** -0.5
        inter = c.intermediate_size
        sdpa = F.scaled_dot_product_attention

        eps = c.rms_norm_eps
        if ops is not None:
            # The fused path: one call each for the residual add with the next norm, RoPE with
            # every K/V write, and SiLU-and-multiply (see outlast.serve.kernels.load).
            h = ops.rms_norm(x, self.layers[0]["attn_norm"], eps)
            none, dnone = torch.empty(0, dtype=torch.int64), torch.empty(0)
            # the decodes' rows, slots and positions in the decode copy (kept with the kernel)
            dwrite = (resident[5][0], resident[1], resident[2]) if resident is not None else (none, none, none)
        for li, L in enumerate(self.layers):
            kc, vc = k_cache[li], v_cache[li]  # [KVH, blocks, bs, D]
            if resident is not None:
                dk, dv = self.decode_kv.k[li], self.decode_kv.v[li]  # [slots, KVH, cap, D]
            if ops is None:
                h = self._rms(x, L["attn_norm"])
            qkv = self._mm(h, L["wqkv"])
            if ops is not None:
                ops.rope_kv_write(qkv, self.cos, self.sin, step.positions, H, KVH, kc, vc, slots,
                                  *((dk, dv) if resident is not None else (dnone, dnone)), *dwrite)
                q = qkv[:, : H * D].view(T, H, D)
                v = qkv[:, (H + KVH) * D :].view(T, KVH, D)
            else:
                qk = self._rope(qkv[:, : (H + KVH) * D].view(T, H + KVH, D), cos, sin)
                q, k = qk[:, :H], qk[:, H:]
                v = qkv[:, (H + KVH) * D :].view(T, KVH, D)
                kc.view(KVH, num_blocks * bs, D).index_copy_(1, slots, k.transpose(0, 1))
                vc.view(KVH, num_blocks * bs, D).index_copy_(1, slots, v.transpose(0, 1))
            out = torch.empty(T, H, D)
            if resident is not None:
                rows, slot_idx, pos, top, padded, exact = resident
                if ops is None:
                    dk[slot_idx, :, pos] = k[rows]
                    dv[slot_idx, :, pos] = v[rows]
                if exact is not None:
                    ops.decode_attention(q, dk, dv, exact[0], slot_idx, exact[1], scale, out)
                else:
                    pad, bias, shares = padded
                    qs = torch.zeros(top, H, D)
                    qs[slot_idx] = q[rows]
                    qs = qs.view(top * KVH, G, D)
                    o = torch.empty(top * KVH, G, D)
                    kk = dk[:top, :, :pad].reshape(top * KVH, pad, D)  # views: no copy
                    vv = dv[:top, :, :pad].reshape(top * KVH, pad, D)

                    def run(share):
                        (lo, hi), *longs = share
                        a, b = lo * KVH, hi * KVH
                        _attend(qs[a:b], kk[a:b], vv[a:b], bias[a:b], scale, o[a:b], omp)
                        done = []
                        for slot, n in longs:  # exact length, no mask; written after both threads' passes
                            a = slot * KVH
                            done.append((a, _attend(qs[a:a + KVH], dk[slot, :, :n], dv[slot, :, :n], None, scale,
                                                    omp=omp)))
                        return done

                    for a, r in itertools.chain(*(_both(run, (shares[0],), (shares[1],)) if shares[1]
                                                  else (run(shares[0]),))):
                        o[a:a + KVH] = r
                    out[rows] = o.view(top, H, D)[slot_idx]
            elif gathered is not None:
                B, rows, flat, bias, nb, kbuf, vbuf = gathered
                torch.index_select(kc, 1, flat, out=kbuf)
                torch.index_select(vc, 1, flat, out=vbuf)
                qq = q[rows].view(B, KVH, G, D).transpose(0, 1).reshape(KVH * B, G, D)
                o = _attend(qq, kbuf.view(KVH * B, nb * bs, D), vbuf.view(KVH * B, nb * bs, D), bias, scale, omp=omp)
                out[rows] = o.view(KVH, B, G, D).transpose(0, 1).reshape(B, H, D)
            if pre:
                ctxs = [(kc[:, bt].view(KVH, -1, D)[None, :, : s.ctx_len], vc[:, bt].view(KVH, -1, D)[None, :, : s.ctx_len])
                        for s, bt in pre]

                def run(jobs):
                    for i, r0, r1, n, mask in jobs:
                        s = pre[i][0]
                        kk, vv = ctxs[i]
                        qq = q[s.q_start + r0 : s.q_start + r1].transpose(0, 1)[None]
                        o = sdpa(qq, kk[:, :, :n], vv[:, :, :n], attn_mask=mask, enable_gqa=True)
                        out[s.q_start + r0 : s.q_start + r1] = o[0].transpose(0, 1)

                if pre_jobs[1]:
                    _both(run, (pre_jobs[0],), (pre_jobs[1],))
                else:
                    run(pre_jobs[0])
            if ops is not None:
                h = ops.add_rms_norm(x, self._mm(out.view(T, H * D), L["wo"]), L["mlp_norm"], eps)
                d = self._mm(ops.silu_mul(self._mm(h, L["wgu"])), L["wdown"])
                if li + 1 < len(self.layers):
                    h = ops.add_rms_norm(x, d, self.layers[li + 1]["attn_norm"], eps)
                else:
                    x += d
                continue
            x = x + self._mm(out.view(T, H * D), L["wo"])
            h = self._rms(x, L["mlp_norm"])
            gu = self._mm(h, L["wgu"])
            x = x + self._mm(F.silu(gu[:, :inter]) * gu[:, inter:], L["wdown"])
        x = x[step.logits_rows]
        h = ops.rms_norm(x, self.final_norm, eps) if ops is not None else self._rms(x, self.final_norm)
        return self._mm(h.contiguous(), self.lm_head)

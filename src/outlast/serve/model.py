"""The Llama-family decoder runtime over one packed, ragged batch per engine step.

Every scheduled token of every sequence goes through one forward: the projections and MLP
run as single GEMMs over all tokens (``[T, hidden]``), attention reads each sequence's
context from the paged KV cache through its block table, and the LM head runs only on
the rows where a token is sampled. Weights are fused (QKV, gate+up) and kept transposed
as numpy arrays because OpenBLAS' GEMM beats torch's default path on the AMD CPUs this
was tuned on (``bench/serve.py --gemm`` measures it); every other op is torch.
"""

from __future__ import annotations

import os
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
    KV blocks holding positions ``0 .. ctx_len - 1`` in order.
    """

    q_start: int
    q_len: int
    ctx_len: int
    block_table: list[int]


@dataclass
class StepInput:
    """Everything one forward needs: packed tokens, their positions and KV slots, and where to sample."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset
    seqs: list[SeqSlice]
    logits_rows: torch.Tensor  # [S] int64 rows of the packed batch to run the LM head on


def _linear(x: torch.Tensor, w: np.ndarray) -> torch.Tensor:
    """``x @ w`` through numpy's BLAS; ``w`` is ``[in, out]`` C-contiguous fp32."""
    return torch.from_numpy(np.matmul(x.numpy(), w))


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _fuse_t(*parts: torch.Tensor) -> np.ndarray:
    """``[out_i, in]`` parts (any float dtype) -> one C-contiguous fp32 ``[in, sum(out_i)]``: fuses,
    converts and transposes in one pass.

    The kernel per shape is the fastest of those measured on the 2-core AMD EPYC this was tuned on
    (single-threaded, GB/s of source): numpy's strided copy in bands of 128 rows for matrices with
    576 columns (7.3-7.9, against 4.6-5.0 with 512-row bands), 512-row bands for the 113 MB LM head
    (3.6 against 3.1), torch's transposing copy for rows of 1536 (5.4 against 1.7 for numpy).
    """
    out = np.empty((parts[0].shape[1], sum(t.shape[0] for t in parts)), np.float32)
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


class LlamaRuntime:
    """A Llama-family decoder ready to run packed steps against a paged KV cache.

    Args:
        config: the model's shape.
        state_dict: fp32 (or castable) tensors under Hugging Face names.

    Example:
        >>> rt = LlamaRuntime(cfg, sd)
        >>> logits = rt.forward(step, kv_cache)   # [len(step.logits_rows), vocab]
    """

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor]):
        self.nbytes = sum(int(t.numel()) * 4 for t in state_dict.values())

        def take(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise ModelLoadError(f"weights lack {name!r} (have e.g. {sorted(state_dict)[:3]})")
            return state_dict[name].detach()

        t0 = time.monotonic()
        self.config = c = config
        self.embed = take("model.embed_tokens.weight").to(torch.float32).contiguous()
        if tuple(self.embed.shape) != (c.vocab_size, c.hidden_size):
            raise ModelLoadError(f"model.embed_tokens.weight has shape {tuple(self.embed.shape)}, "
                                 f"config says {(c.vocab_size, c.hidden_size)}")
        head = state_dict.get("lm_head.weight") if not c.tie_word_embeddings else None
        self.final_norm = take("model.norm.weight").to(torch.float32).contiguous()
        # Every matrix is fused and transposed on its own, so they are built in parallel (numpy's
        # and torch's copies release the GIL): 0.20-0.23 s against 0.35-0.51 s on one thread for
        # SmolLM2-135M on 2 cores, the same arrays. The slowest part of a hot reload.
        jobs = {"lm_head": (head if head is not None else self.embed,)}
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "attn_norm": take(p + "input_layernorm.weight").to(torch.float32).contiguous(),
                "mlp_norm": take(p + "post_attention_layernorm.weight").to(torch.float32).contiguous(),
            })
            jobs[(i, "wqkv")] = tuple(take(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            jobs[(i, "wo")] = (take(p + "self_attn.o_proj.weight"),)
            jobs[(i, "wgu")] = (take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight"))
            jobs[(i, "wdown")] = (take(p + "mlp.down_proj.weight"),)
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="outlast-build") as pool:
            built = dict(zip(jobs, pool.map(lambda parts: _fuse_t(*parts), jobs.values())))
        self.lm_head = built.pop("lm_head")
        for (i, name), w in built.items():
            self.layers[i][name] = w
        inv_freq = c.rope_inv_freq()
        freqs = torch.arange(c.max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], -1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.build_seconds = time.monotonic() - t0  # fuse + transpose, for the reload's timings

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, path: str, prefix: str = "model") -> "LlamaRuntime":
        """Read an outlast checkpoint (every chunk's checksum checked) and build the serving layout.

        One read of every tensor the model needs through one reader, as :func:`outlast.read` does,
        then the constructor's fuse-and-transpose. On the result, ``load_seconds`` is the time
        spent reading and verifying and ``manifest`` the manifest the reads were checked against
        (so an identity taken from it names exactly the bytes served).

        Reading layer by layer into a cache-sized scratch instead was measured and dropped: 61
        smaller reads (each planned and dispatched to the reader's threads) were slower than one,
        in process and in ``outlast serve --watch`` (docs/fleet.md, "Reload, measured on its own").

        Raises:
            ModelLoadError: a tensor the model needs is missing, or has an unsupported dtype.
            outlast.errors.CheckpointError: a checksum fails, or the files are damaged.

        Example:
            >>> rt = LlamaRuntime.from_checkpoint(cfg, "runs/exp1/step-00000200")
        """
        from ..reader import CheckpointReader, ReadRequest
        from ..regions import Box

        t0 = time.monotonic()
        with CheckpointReader(path) as reader:
            entries = {".".join(map(str, e.path[1:])): (fqn, e) for fqn, e in reader.manifest.tensors.items()
                       if len(e.path) > 1 and e.path[0] == prefix}
            sd = {}
            for name, (fqn, e) in entries.items():
                dtype = _DTYPES.get(e.dtype)
                if dtype is None:
                    raise ModelLoadError(f"{prefix}.{name} in {path} has dtype {e.dtype}; serving reads "
                                         f"{sorted(_DTYPES)}")
                sd[name] = torch.empty(tuple(e.shape), dtype=dtype)
            reader.read_regions([ReadRequest(entries[n][0], Box.full(tuple(t.shape)), t) for n, t in sd.items()])
            rt = cls(config, sd)
            rt.manifest = reader.manifest
        rt.load_seconds = time.monotonic() - t0 - rt.build_seconds
        return rt

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.config.rms_norm_eps))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    @torch.inference_mode()
    def forward(self, step: StepInput, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Run one packed step, writing its K/V into the cache.

        Args:
            step: the packed batch.
            k_cache, v_cache: ``[num_layers, num_kv_heads, num_blocks, block_size, head_dim]``. Heads
                come before blocks so that gathering a sequence's blocks (one ``index_select`` on
                dim 1 of a layer's slice) yields each head's context as one contiguous
                ``[ctx, head_dim]`` matrix: decode attention then runs as batched GEMMs on the
                gathered buffer, without per-head transpose copies or GQA expansion.

        Returns:
            ``[len(step.logits_rows), vocab_size]`` fp32 logits.
        """
        c = self.config
        H, KVH, D = c.num_heads, c.num_kv_heads, c.head_dim
        G = H // KVH
        T = int(step.token_ids.shape[0])
        num_blocks, bs = k_cache.shape[2], k_cache.shape[3]
        x = self.embed[step.token_ids]
        cos = self.cos[step.positions][:, None, :]
        sin = self.sin[step.positions][:, None, :]
        decodes = [s for s in step.seqs if s.q_len == 1]
        prefills = [s for s in step.seqs if s.q_len > 1]
        dec = None
        if decodes:
            # All single-token rows attend in one batch of GEMMs over a gathered, padded context:
            # the padded block index and the additive mask are built once per step, the gather
            # buffers once per step and reused by every layer.
            B = len(decodes)
            nb = max(len(s.block_table) for s in decodes)
            flat = torch.zeros(B, nb, dtype=torch.int64)
            for i, s in enumerate(decodes):
                flat[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int64)
            ctx = torch.tensor([s.ctx_len for s in decodes])
            bias = torch.zeros(B, nb * bs)
            bias.masked_fill_(torch.arange(nb * bs)[None, :] >= ctx[:, None], float("-inf"))
            bias = bias[None, :, None, :].expand(KVH, B, G, nb * bs).reshape(KVH * B, G, nb * bs)
            starts = [s.q_start for s in decodes]
            rows = slice(0, B) if starts == list(range(B)) else torch.tensor(starts)
            kbuf = torch.empty(KVH, B * nb, bs, D)
            vbuf = torch.empty(KVH, B * nb, bs, D)
            dec = (B, flat.view(-1), bias, rows, nb, kbuf, vbuf)
        pre = []
        for s in prefills:
            nb = -(-s.ctx_len // bs)
            bt = torch.tensor(s.block_table[:nb], dtype=torch.int64)
            qpos = torch.arange(s.ctx_len - s.q_len, s.ctx_len)
            mask = torch.arange(s.ctx_len)[None, :] <= qpos[:, None]
            pre.append((s, bt, mask))
        slots = step.slot_mapping
        scale = D ** -0.5
        inter = c.intermediate_size
        for li, L in enumerate(self.layers):
            h = self._rms(x, L["attn_norm"])
            qkv = _linear(h, L["wqkv"])
            qk = self._rope(qkv[:, : (H + KVH) * D].view(T, H + KVH, D), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, (H + KVH) * D :].view(T, KVH, D)
            kc, vc = k_cache[li], v_cache[li]  # [KVH, blocks, bs, D]
            kc.view(KVH, num_blocks * bs, D).index_copy_(1, slots, k.transpose(0, 1))
            vc.view(KVH, num_blocks * bs, D).index_copy_(1, slots, v.transpose(0, 1))
            out = torch.empty(T, H, D)
            if dec is not None:
                B, flat, bias, rows, nb, kbuf, vbuf = dec
                torch.index_select(kc, 1, flat, out=kbuf)
                torch.index_select(vc, 1, flat, out=vbuf)
                qq = q[rows].view(B, KVH, G, D).transpose(0, 1).reshape(KVH * B, G, D)
                scores = torch.baddbmm(bias, qq, kbuf.view(KVH * B, nb * bs, D).transpose(1, 2), alpha=scale)
                o = torch.bmm(torch.softmax(scores, -1), vbuf.view(KVH * B, nb * bs, D))
                out[rows] = o.view(KVH, B, G, D).transpose(0, 1).reshape(B, H, D)
            for s, bt, mask in pre:
                kk = kc[:, bt].view(KVH, -1, D)[None, :, : s.ctx_len]
                vv = vc[:, bt].view(KVH, -1, D)[None, :, : s.ctx_len]
                qq = q[s.q_start : s.q_start + s.q_len].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=True)
                out[s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1)
            x = x + _linear(out.view(T, H * D), L["wo"])
            h = self._rms(x, L["mlp_norm"])
            gu = _linear(h, L["wgu"])
            x = x + _linear(F.silu(gu[:, :inter]) * gu[:, inter:], L["wdown"])
        h = self._rms(x[step.logits_rows], self.final_norm)
        return _linear(h.contiguous(), self.lm_head)

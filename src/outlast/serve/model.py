"""The Llama-family decoder runtime over one packed, ragged batch per engine step.

Every scheduled token of every sequence goes through one forward: the projections and MLP
run as single GEMMs over all tokens (``[T, hidden]``), attention reads each sequence's
context from the paged KV cache through its block table, and the LM head runs only on
the rows where a token is sampled. Weights are fused (QKV, gate+up) and kept transposed
as numpy arrays because OpenBLAS' GEMM beats torch's default path on the AMD CPUs this
was tuned on (``bench/serve.py --gemm`` measures it); every other op is torch.
"""

from __future__ import annotations

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
        self.config = c = config
        sd = {k: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items()}

        def take(name: str) -> torch.Tensor:
            if name not in sd:
                raise ModelLoadError(f"weights lack {name!r} (have e.g. {sorted(sd)[:3]})")
            return sd[name]

        def np_t(*parts: torch.Tensor) -> np.ndarray:
            # [out_i, in] parts -> one C-contiguous [in, sum(out_i)]: fuses and transposes in one pass,
            # in bands of rows that stay in cache (a plain transposing copy of the 113 MB LM head took
            # 4x longer; this is most of the time a hot reload spends building the runtime)
            out = np.empty((parts[0].shape[1], sum(t.shape[0] for t in parts)), np.float32)
            col = 0
            for t in parts:
                a = t.numpy()
                for r in range(0, a.shape[0], 512):
                    band = a[r:r + 512]
                    out[:, col + r:col + r + band.shape[0]] = band.T
                col += a.shape[0]
            return out

        self.embed = take("model.embed_tokens.weight")
        if tuple(self.embed.shape) != (c.vocab_size, c.hidden_size):
            raise ModelLoadError(f"model.embed_tokens.weight has shape {tuple(self.embed.shape)}, "
                                 f"config says {(c.vocab_size, c.hidden_size)}")
        head = sd.get("lm_head.weight") if not c.tie_word_embeddings else None
        self.lm_head = np_t(head if head is not None else self.embed)
        self.final_norm = take("model.norm.weight")
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            q, k, v = (take(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            gate, up = take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")
            self.layers.append({
                "attn_norm": take(p + "input_layernorm.weight"),
                "mlp_norm": take(p + "post_attention_layernorm.weight"),
                "wqkv": np_t(q, k, v),
                "wo": np_t(take(p + "self_attn.o_proj.weight")),
                "wgu": np_t(gate, up),
                "wdown": np_t(take(p + "mlp.down_proj.weight")),
            })
        inv_freq = c.rope_inv_freq()
        freqs = torch.arange(c.max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], -1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.nbytes = sum(int(t.numel()) * 4 for t in sd.values())

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

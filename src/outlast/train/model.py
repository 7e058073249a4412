"""A small, readable decoder-only transformer for the reference trainer.

The model is GPT-shaped (token embedding, pre-norm blocks of causal
self-attention and an MLP, a final norm and a head tied to the embedding) with
two choices made for packed training: positions are rotary (RoPE) and are
*given per token*, so they can restart at 0 at every document start, and
attention is causal **and** block-diagonal by document, built from a per-token
``doc_ids`` tensor, so a token never sees another document that happens to share
its micro-batch. Together with :func:`next_token_loss`, which returns a summed
loss and a token count, this makes a packed micro-batch compute exactly what the
same documents would compute one at a time — the property the packing tests pin.
The mask is a dense ``[T, T]`` boolean (O(T^2) memory), which is fine at the
sizes the reference trainer runs; a kernel with variable-length attention would
replace it at scale without changing the interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PRESETS",
    "ModelConfig",
    "Transformer",
    "document_mask",
    "next_token_labels",
    "next_token_loss",
]

# Label value that F.cross_entropy skips; used for tokens that predict nothing.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a :class:`Transformer`.

    Example:
        >>> ModelConfig.preset("tiny").d_model
        128
        >>> ModelConfig(d_model=100, n_heads=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ModelConfig.d_model=100 must be divisible by n_heads=3 ...
    """

    vocab_size: int = 256
    """Number of token ids; 256 is byte-level text (ids are the bytes 0..255)."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; must divide d_model, and the head size must be even for RoPE."""
    d_ff: int = 512
    """Hidden width of the MLP (conventionally 4 * d_model)."""
    max_seq_len: int = 1024
    """Most tokens one forward call may see in a row (one packed stream or one batch row)."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches, in [0, 1); 0 keeps runs deterministic."""
    tie_embeddings: bool = True
    """Use the token embedding matrix as the output head (saves vocab_size * d_model weights)."""
    rope_base: float = 10000.0
    """Base of the RoPE frequencies."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            # bool is an int subclass; ModelConfig(n_layers=True) is a bug, not a 1-layer model.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r} must be a positive int")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                f"(each head gets d_model // n_heads channels); pick n_heads among the divisors of d_model"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} gives an odd head size {self.d_model // self.n_heads}; "
                f"RoPE rotates channel pairs, so d_model // n_heads must be even"
            )
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"ModelConfig.dropout={self.dropout!r} must be a number in [0, 1)")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1.0):
            raise ValueError(f"ModelConfig.rope_base={self.rope_base!r} must be a number > 1")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.d_model // self.n_heads

    def num_params(self) -> int:
        """Number of trainable parameters, computed from the shape without building the model.

        Returns:
            The exact count that ``sum(p.numel() for p in Transformer(cfg).parameters())`` gives.

        Example:
            >>> ModelConfig.preset("tiny").num_params()
            1018624
        """
        d, f = self.d_model, self.d_ff
        per_layer = 4 * d * d + 2 * d * f + 2 * (2 * d)  # qkv+out, up+down, two LayerNorms (w, b)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + 2 * d + head

    @classmethod
    def preset(cls, name: str, **overrides: object) -> "ModelConfig":
        """Return a named configuration, optionally with some fields changed.

        Args:
            name: One of ``PRESETS``: "tiny" (~1M parameters), "small" (~10M), "base" (~85M,
                GPT-2-small shape), "medium" (~300M, GPT-2-medium shape), "1b" (~1B).
            **overrides: Fields to replace, e.g. ``max_seq_len=256``.

        Returns:
            A validated ``ModelConfig``.

        Example:
            >>> ModelConfig.preset("small", max_seq_len=512).max_seq_len
            512
        """
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {unknown}; fields are {sorted(known)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, ModelConfig] = {
    # Byte-level vocabulary keeps embeddings small, so nearly all parameters sit in the blocks.
    "tiny": ModelConfig(d_model=128, n_layers=5, n_heads=4, d_ff=512),
    "small": ModelConfig(d_model=256, n_layers=13, n_heads=4, d_ff=1024),
    "base": ModelConfig(d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=2048),
    "medium": ModelConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=4096, max_seq_len=2048),
    "1b": ModelConfig(d_model=2048, n_layers=20, n_heads=16, d_ff=8192, max_seq_len=2048),
}


def document_mask(doc_ids: Tensor) -> Tensor:
    """Boolean attention mask that is causal and block-diagonal by document.

    A document is a *run* of equal consecutive ids, so two runs that reuse an id
    are still separate documents (the mask never needs ids to be unique).

    Args:
        doc_ids: ``[T]`` or ``[B, T]`` integer ids, one per token.

    Returns:
        ``[T, T]`` or ``[B, T, T]`` bool; ``mask[..., i, j]`` is True where query i may attend key j.

    Example:
        >>> document_mask(torch.tensor([0, 0, 1])).int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    # Number each run: the id of a run is how many id changes precede it.
    change = torch.zeros_like(doc_ids, dtype=torch.long)
    change[..., 1:] = (doc_ids[..., 1:] != doc_ids[..., :-1]).long()
    run = change.cumsum(-1)
    t = doc_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return (run.unsqueeze(-1) == run.unsqueeze(-2)) & causal


def _rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate channel pairs of ``x`` ([B, H, T, hd]) by angles ``positions * inv_freq``."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, T, hd/2]
    cos = angles.cos().unsqueeze(1).to(x.dtype)  # [B, 1, T, hd/2], broadcast over heads
    sin = angles.sin().unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    # Interleave the rotated pairs back so channel 2k, 2k+1 stay a pair.
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE, through ``scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)
        # Not persistent: derived from the config, so it stays out of checkpoints.
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape
        h, hd = self.cfg.n_heads, self.cfg.head_dim
        q, k, v = self.qkv(x).view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)  # each [B, H, T, hd]
        q, k = _rope(q, positions, self.inv_freq), _rope(k, positions, self.inv_freq)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.unsqueeze(1), dropout_p=self.cfg.dropout if self.training else 0.0
        )
        return self.resid_drop(self.out(y.transpose(1, 2).reshape(b, t, d)))


class MLP(nn.Module):
    """Two linear layers with a GELU between them."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), positions, mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Decoder-only transformer over packed documents.

    Args:
        cfg: The model shape.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = Transformer(ModelConfig.preset("tiny"))
        >>> tokens = torch.tensor([72, 105, 33, 79, 107])       # "Hi!" and "Ok" packed
        >>> positions = torch.tensor([0, 1, 2, 0, 1])
        >>> doc_ids = torch.tensor([0, 0, 0, 1, 1])
        >>> model(tokens, positions, doc_ids).shape
        torch.Size([5, 256])
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise weights GPT-2 style: N(0, 0.02), output projections scaled by depth."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02
                # Each block adds two residual branches; shrinking their last layer keeps
                # the residual stream's variance roughly independent of depth.
                if name.endswith(("attn.out.weight", "mlp.down.weight")):
                    std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def forward(self, tokens: Tensor, positions: Tensor, doc_ids: Tensor) -> Tensor:
        """Logits for every token of a packed stream or a batch of streams.

        Args:
            tokens: ``[T]`` (one packed stream) or ``[B, T]`` integer token ids in ``[0, vocab_size)``.
            positions: same shape; each token's position within its own document (0 at a document start).
            doc_ids: same shape; equal for consecutive tokens of one document (see :func:`document_mask`).

        Returns:
            ``[T, vocab_size]`` or ``[B, T, vocab_size]`` logits; position i scores the token after i.

        Example:
            >>> m = Transformer(ModelConfig.preset("tiny"))
            >>> m(torch.zeros(2, 3, dtype=torch.long), torch.arange(3).repeat(2, 1), torch.zeros(2, 3)).shape
            torch.Size([2, 3, 256])
        """
        if tokens.shape != positions.shape or tokens.shape != doc_ids.shape:
            raise ValueError(
                f"tokens {tuple(tokens.shape)}, positions {tuple(positions.shape)} and doc_ids "
                f"{tuple(doc_ids.shape)} must have the same shape, [T] or [B, T]"
            )
        if tokens.dim() not in (1, 2):
            raise ValueError(f"tokens must be [T] or [B, T], got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or positions.dtype.is_floating_point:
            raise ValueError(f"tokens ({tokens.dtype}) and positions ({positions.dtype}) must be integer tensors")
        if tokens.shape[-1] > self.cfg.max_seq_len:
            raise ValueError(
                f"{tokens.shape[-1]} tokens exceed ModelConfig.max_seq_len={self.cfg.max_seq_len}; "
                f"pack with a smaller token budget or raise max_seq_len"
            )
        unbatched = tokens.dim() == 1
        if unbatched:
            tokens, positions, doc_ids = tokens[None], positions[None], doc_ids[None]
        mask = document_mask(doc_ids)
        x = self.drop(self.embed(tokens))
        for block in self.blocks:
            x = block(x, positions, mask)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        return logits[0] if unbatched else logits


def next_token_labels(tokens: Tensor, doc_ids: Tensor) -> Tensor:
    """Label of each token: the next token of the same document, or ``IGNORE_INDEX``.

    The last token of every document (and of every row) predicts nothing, so a packed
    stream never learns to predict one document's start from another's end.

    Args:
        tokens: ``[T]`` or ``[B, T]`` token ids.
        doc_ids: same shape, document ids as for :meth:`Transformer.forward`.

    Returns:
        ``tokens``-shaped int64 labels.

    Example:
        >>> next_token_labels(torch.tensor([5, 6, 7, 8]), torch.tensor([0, 0, 1, 1])).tolist()
        [6, -100, 8, -100]
    """
    labels = torch.full_like(tokens, IGNORE_INDEX, dtype=torch.long)
    same_doc = doc_ids[..., 1:] == doc_ids[..., :-1]
    labels[..., :-1] = torch.where(same_doc, tokens[..., 1:].long(), IGNORE_INDEX)
    return labels


def next_token_loss(logits: Tensor, tokens: Tensor, doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy within documents, and how many tokens it covers.

    Returning a sum and a count (not a mean) is what makes micro-batching exact: the
    mean over a whole global batch is ``sum(loss_sums) / sum(counts)`` over all
    micro-batches and ranks, whatever way the documents were grouped. To train, scale
    each micro-batch's ``loss_sum`` by ``1 / global_count`` before ``backward()``.

    Args:
        logits: ``[T, V]`` or ``[B, T, V]`` from :meth:`Transformer.forward`.
        tokens: the ``[T]`` or ``[B, T]`` input tokens.
        doc_ids: the matching document ids.

    Returns:
        ``(loss_sum, count)``: a float32 scalar and an int64 scalar.

    Example:
        >>> logits = torch.zeros(4, 256)
        >>> s, n = next_token_loss(logits, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 0, 1]))
        >>> int(n), round(float(s / n), 4) == round(math.log(256), 4)
        (2, True)
    """
    labels = next_token_labels(tokens, doc_ids)
    # float32 for the reduction even if the model runs in bf16: the sum must be exact enough
    # to compare against the unpacked computation.
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()

"""Frozen configuration dataclasses for the serving engine: the model's shape and the engine's limits.

``ModelConfig`` describes a Llama-family decoder and is built from a GGUF file's metadata
or a Hugging Face ``config.json``; ``EngineConfig`` holds the scheduler and KV-cache knobs
the CLI exposes. Both validate in ``__post_init__`` and name the bad field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

# RoPE scaling kinds the runtime implements (Hugging Face ``rope_type`` names). Others change
# more than the frequencies (yarn and longrope scale the attention too, dynamic depends on the
# sequence length) and are refused by name rather than served wrong.
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position: int = 2048
    tie_word_embeddings: bool = True
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"
    rope_scaling: dict | None = field(default=None, hash=False)
    """Hugging Face style: ``{"rope_type": "linear" | "llama3", "factor": ..., ...}``; None: plain RoPE."""
    rope_freq_factors: tuple[float, ...] = ()
    """Per-frequency divisors of the inverse frequencies (a GGUF file's ``rope_freqs`` tensor)."""

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_position"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"ModelConfig.{f} must be positive, got {getattr(self, f)!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ModelConfig.hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ValueError(
                    f"ModelConfig.rope_scaling: RoPE scaling type {kind!r} is not supported (supported: "
                    f"{', '.join(ROPE_TYPES)}); serving the model without it would give wrong outputs"
                )
            if kind != "default" and not float(rs.get("factor", 0)) > 0:
                raise ValueError(f"ModelConfig.rope_scaling: {kind!r} needs a positive 'factor', got {rs.get('factor')!r}")
        if self.rope_freq_factors and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(
                f"ModelConfig.rope_freq_factors has {len(self.rope_freq_factors)} values; head_dim "
                f"{self.head_dim} needs {self.head_dim // 2}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def rope_inv_freq(self) -> torch.Tensor:
        """The ``head_dim // 2`` inverse frequencies of RoPE, scaled as the config says (fp32).

        ``linear`` divides every frequency by ``factor``; ``llama3`` divides the low ones
        (wavelength above ``original_max_position_embeddings / low_freq_factor``) by ``factor``,
        keeps the high ones and interpolates between, as Llama 3.1+ and transformers do.
        """
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind == "linear":
            inv = inv / float(rs["factor"])
        elif kind == "llama3":
            factor = float(rs["factor"])
            low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
            old = float(rs.get("original_max_position_embeddings", 8192))
            low_wavelen, high_wavelen = old / low, old / high
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = torch.where(medium, smoothed, scaled)
        if self.rope_freq_factors:
            inv = inv / torch.tensor(self.rope_freq_factors, dtype=torch.float32)
        return inv

    def to_json(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["rope_freq_factors"] = list(self.rope_freq_factors)
        if d["rope_scaling"] is None:
            del d["rope_scaling"]  # configs without scaling keep the JSON (and weights identity) they had
        if not d["rope_freq_factors"]:
            del d["rope_freq_factors"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["rope_freq_factors"] = tuple(float(x) for x in d.get("rope_freq_factors", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, cfg: dict, name: str = "model") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict of a Llama-family model.

        Example:
            >>> ModelConfig.from_hf(json.load(open("dir/config.json")))
        """
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        theta = cfg.get("rope_theta")
        if theta is None:
            theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        # transformers < 5 writes "rope_scaling"; 5 writes "rope_parameters" (with rope_theta inside).
        scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=float(theta),
            max_position=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids, name=name, rope_scaling=scaling,
        )


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one serving engine."""

    max_num_seqs: int = 32
    """Most sequences decoding at once."""
    token_budget: int = 512
    """Most tokens (decode + prefill chunks) computed in one engine step."""
    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV blocks in the pool; default from ``kv_cache_gib``."""
    kv_cache_gib: float = 1.0
    """Memory for the KV pool when ``num_blocks`` is not given."""
    max_model_len: int | None = None
    """Longest prompt + completion; default the model's context length."""
    enable_prefix_caching: bool = True
    kv_disk_dir: str | None = None
    """Directory of the disk tier for evicted prefix blocks; None turns it off."""
    kv_disk_gib: float = 4.0
    """Most bytes the disk tier holds before dropping its oldest blocks."""
    max_waiting: int = 256
    """Bounded queue: more waiting requests than this are refused (HTTP 429)."""
    torch_threads: int | None = 1
    """torch's intra-op threads (process-wide; None leaves it). The GEMMs run in numpy's BLAS;
    torch's OpenMP workers spinning beside it slowed decode steps 4-10x on a 2-core host."""
    blas_threads: int | None = 1
    """numpy's BLAS threads (process-wide, via threadpoolctl; None leaves it). On a shared 2-core
    host two OpenBLAS threads made steps 3-10x slower than one (bench/serve.py --gemm measures)."""

    compute_threads: int | None = None
    """Threads a step runs on: 1, or 2 (the engine thread and one worker that takes half of every
    GEMM of two rows or more, half of the decode attention and half of the prefill attention). None: 2
    when the process may use 2 or more CPUs. The worker sleeps rather than spins, so a busy second
    core slows a step toward one thread's speed instead of collapsing it."""
    gemv_blas_threads: int = 1
    """numpy's BLAS threads for a step of one token (a lone decode: every GEMM a GEMV), set for that
    step and back to ``blas_threads`` after it; applies when ``blas_threads`` is 1. On the 2-core
    Xeon one thread read the weights at 12-15 GB/s and two at ~25, so 2 made a lone decode step
    1.3x faster on an idle host (57 -> 44 ms; ~1.1x through the server), but 2.1x *slower* with the
    other core busy (OpenBLAS' second thread spins and waits for a core). Off (1) by default."""
    gemm_backend: str | None = None
    """The layers' GEMMs: ``"panel"`` (the compiled GEMM of :mod:`outlast.serve.kernels` on weights
    packed in panels of 32 columns, a second copy of them in memory; every step, one-row steps
    included, on torch's threads; needs ``compute_threads=1`` and ``compiled_kernels``),
    ``"onednn"`` (oneDNN on weights packed once, a second copy; one-row steps stay on numpy's
    GEMV), ``"numpy"`` (OpenBLAS) or ``"torch"`` (MKL, unpacked). None: panel where it applies and
    the kernels build (fp32 weights on one compute thread, the engine process's set-up), else onednn
    where torch has it, else torch on Intel CPUs and numpy elsewhere (see
    ``outlast.serve.model._Panel`` and ``default_gemm_backend`` for what was measured). All give the
    same results up to float rounding."""
    weight_dtype: str = "float32"
    """The dtype the GEMMs read their weights in: ``"float32"``, or ``"bfloat16"`` (oneDNN only: every
    GEMM, one-row steps included, on weights packed in bf16, its input rounded to bf16; the norms,
    attention, KV cache and residual stream stay fp32). bf16 halves the bytes a decode reads and,
    on CPUs with AVX512-BF16 or AMX, doubles the GEMMs' arithmetic rate; the logits move by the
    rounding (greedy tokens may differ from an fp32 run's after a near tie)."""
    compiled_kernels: bool = True
    """The compiled kernels (:mod:`outlast.serve.kernels`: built on first use, ~40 s, cached; need a
    C++ compiler and ninja, else torch ops with a warning) in steps on torch's threads, as the
    engine process runs them: decode attention, the fused element-wise layer ops, and the
    ``"panel"`` GEMMs where ``gemm_backend`` is None. False: none of them."""
    decode_kv_gib: float = 2.0
    """Memory for the decode copy of running sequences' K/V (contiguous per sequence, so decode
    attention reads it in place instead of gathering blocks every step); 0 turns it off. A step
    whose decodes do not fit falls back to gathering."""

    def __post_init__(self) -> None:
        if self.compute_threads is not None and self.compute_threads not in (1, 2):
            raise ValueError(f"EngineConfig.compute_threads must be 1, 2 or None, got {self.compute_threads!r}")
        if self.gemv_blas_threads not in (1, 2):
            raise ValueError(f"EngineConfig.gemv_blas_threads must be 1 or 2, got {self.gemv_blas_threads!r}")
        if self.gemm_backend not in (None, "numpy", "torch", "onednn", "panel"):
            raise ValueError(f"EngineConfig.gemm_backend must be 'numpy', 'torch', 'onednn', 'panel' or None, "
                             f"got {self.gemm_backend!r}")
        if self.weight_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"EngineConfig.weight_dtype must be 'float32' or 'bfloat16', got {self.weight_dtype!r}")
        if self.weight_dtype == "bfloat16" and self.gemm_backend not in (None, "onednn"):
            raise ValueError(f"EngineConfig.weight_dtype 'bfloat16' needs the oneDNN GEMMs; drop gemm_backend="
                             f"{self.gemm_backend!r} or serve float32")
        if self.decode_kv_gib < 0:
            raise ValueError(f"EngineConfig.decode_kv_gib must be >= 0, got {self.decode_kv_gib}")
        for f in ("max_num_seqs", "token_budget", "block_size", "max_waiting"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"EngineConfig.{f} must be positive, got {getattr(self, f)!r}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"EngineConfig.num_blocks must be at least 2, got {self.num_blocks}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"EngineConfig.kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if self.kv_disk_gib <= 0:
            raise ValueError(f"EngineConfig.kv_disk_gib must be positive, got {self.kv_disk_gib}")

"""Configuration of the reference trainer: one frozen dataclass per component.

A run is described by a :class:`TrainConfig` holding a :class:`ModelSection`,
:class:`DataConfig`, :class:`OptimConfig`, :class:`CheckpointConfig` and
:class:`DistConfig`. Every field is documented where it is declared and checked in
``__post_init__``; a bad value raises :class:`ConfigError` naming the field
(``data.docs_per_step=0 must be ...``). A TOML file maps one table per section
(``[model]``, ``[data]``, ...) plus top-level keys, and :func:`load_config` reads it
with the standard library's ``tomllib`` — there is no config framework here.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .balance import METHODS as BALANCE_METHODS
from .model import PRESETS, ModelConfig
from .packing import METHODS as PACKING_METHODS

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "ModelSection",
    "OptimConfig",
    "TrainConfig",
    "load_config",
]


class ConfigError(ValueError):
    """A training configuration value is wrong; the message names the field and the fix."""


def _name(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _int(section: str, name: str, value: Any, *, minimum: int = 0) -> None:
    # bool is an int subclass, and `steps = true` in a TOML file is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{_name(section, name)}={value!r} must be an int >= {minimum}")


def _num(section: str, name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise ConfigError(f"{_name(section, name)}={value!r} must be a number {bound}")


def _choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{_name(section, name)}={value!r} must be one of {list(choices)}")


@dataclass(frozen=True)
class ModelSection:
    """Which model to train: a preset of :class:`~outlast.train.model.ModelConfig`, with changes."""

    preset: str = "tiny"
    """Name of a preset in ``outlast.train.model.PRESETS`` (tiny, small, base, medium, 1b)."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields to change, e.g. ``{"n_layers": 2, "max_seq_len": 256}``; in TOML,
    every key of ``[model]`` other than ``preset``."""

    def __post_init__(self) -> None:
        _choice("model", "preset", self.preset, tuple(PRESETS))
        try:
            self.build()
        except ValueError as e:
            # ModelConfig names its own field; say where it came from.
            raise ConfigError(f"[model]: {e}") from None

    def build(self) -> ModelConfig:
        """The validated :class:`ModelConfig`."""
        return ModelConfig.preset(self.preset, **self.overrides)


@dataclass(frozen=True)
class DataConfig:
    """What each step trains on: how many documents, cut and packed how, split across ranks how."""

    seed: int = 0
    """Seed of the document shuffle (:class:`~outlast.train.data.DocumentStream`)."""
    docs_per_step: int = 16
    """Documents in one global batch. Fixed whatever the world size, so a run resumed on
    fewer or more ranks takes the same optimisation steps. Must be >= the world size."""
    max_doc_tokens: int = 0
    """Cut every document to its first this-many tokens (0 keeps whole documents). Whole
    Shakespeare scenes run to tens of thousands of bytes; a cap keeps CPU runs quick."""
    token_budget: int = 512
    """Most tokens in one micro-batch (one forward/backward). Longer documents are cut into
    pieces of this size. Must be <= model.max_seq_len. Smaller means less memory, more
    micro-batches (gradient accumulation), the same update."""
    packing: str = "next_fit"
    """How documents are packed into micro-batches: ``next_fit`` or ``first_fit_decreasing``."""
    balance: str = "kk"
    """How a global batch's documents are split across ranks by estimated compute:
    ``kk`` (Karmarkar-Karp), ``lpt`` (greedy) or ``naive`` (equal counts in order)."""

    def __post_init__(self) -> None:
        _int("data", "seed", self.seed)
        _int("data", "docs_per_step", self.docs_per_step, minimum=1)
        _int("data", "max_doc_tokens", self.max_doc_tokens)
        _int("data", "token_budget", self.token_budget, minimum=2)
        _choice("data", "packing", self.packing, PACKING_METHODS)
        _choice("data", "balance", self.balance, BALANCE_METHODS)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-3
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = 0.1
    """Decoupled weight decay of AdamW (applied to every parameter, as nanoGPT's simplest form)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    warmup_steps: int = 10
    """Steps of linear warmup from ``lr / warmup_steps`` to ``lr``."""
    min_lr_ratio: float = 0.1
    """The final learning rate as a fraction of ``lr`` (cosine decay ends there at ``steps``)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    offload_dir: str = ""
    """Keep AdamW's state in files under this directory (``outlast.offload.OffloadAdamW``,
    one ``rank<N>`` folder per rank) instead of in memory; empty: in memory. Relative to
    run_dir. Results equal the in-memory run bit for bit; checkpoints are the same, so a
    run can be resumed with or without it. Put it on a local NVMe disk. DDP only."""
    offload_overlap_forward: bool = False
    """With ``offload_dir``: let each optimizer step finish during the next forward
    (``OffloadAdamW(overlap_forward=True)``), so the state's disk I/O overlaps it. Same
    results; checkpoints finish the step before they read the weights."""
    fused: bool = False
    """torch's fused AdamW kernel (``fused=True``), in memory or offloaded: one pass over the
    state instead of about ten. Results equal ``torch.optim.AdamW(fused=True)`` and differ
    from the default kernel in the last bit of some parameters, so a run resumed with the
    other setting goes on from the same checkpoint but not bit for bit."""

    def __post_init__(self) -> None:
        if not isinstance(self.offload_dir, str):
            raise ConfigError(f"optim.offload_dir={self.offload_dir!r} must be a string (a directory)")
        if not isinstance(self.offload_overlap_forward, bool):
            raise ConfigError(f"optim.offload_overlap_forward={self.offload_overlap_forward!r} must be true or false")
        if not isinstance(self.fused, bool):
            raise ConfigError(f"optim.fused={self.fused!r} must be true or false")
        _num("optim", "lr", self.lr, low=0.0, low_open=True)
        _num("optim", "weight_decay", self.weight_decay, low=0.0)
        _num("optim", "beta1", self.beta1, low=0.0, high=1.0)
        _num("optim", "beta2", self.beta2, low=0.0, high=1.0)
        _num("optim", "eps", self.eps, low=0.0, low_open=True)
        _int("optim", "warmup_steps", self.warmup_steps)
        _num("optim", "min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _num("optim", "grad_clip", self.grad_clip, low=0.0)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The multiplier of ``lr`` for optimizer step ``step`` (0-based), as LambdaLR wants it.

        Example:
            >>> o = OptimConfig(warmup_steps=2, min_lr_ratio=0.0)
            >>> [round(o.lr_factor(s, 6), 3) for s in range(6)]
            [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
        """
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class CheckpointConfig:
    """When and where checkpoints go (``outlast.Checkpointer``)."""

    directory: str = ""
    """Where ``step-NNNNNNNN/`` checkpoints are written; empty means ``<run_dir>/checkpoints``.
    A string, not a Path, so remote URLs would survive. A relative path is relative to run_dir."""
    every: int = 50
    """Save every this-many steps (and always after the last step and at ``stop_after``)."""
    keep_last: int = 3
    """Committed checkpoints to keep; older ones are deleted once a newer one commits."""

    def __post_init__(self) -> None:
        if not isinstance(self.directory, str):
            raise ConfigError(f"checkpoint.directory={self.directory!r} must be a string")
        _int("checkpoint", "every", self.every, minimum=1)
        _int("checkpoint", "keep_last", self.keep_last, minimum=1)


@dataclass(frozen=True)
class DistConfig:
    """How ranks share the work. The world size comes from torchrun, not from here."""

    mode: str = "ddp"
    """``ddp`` (every rank holds the whole model; gradients all-reduced) or ``fsdp``
    (FSDP2 ``fully_shard``: parameters, gradients and optimizer state sharded)."""
    backend: str = "auto"
    """torch.distributed backend: ``auto`` (nccl with CUDA, else gloo), ``gloo`` or ``nccl``."""
    timeout_s: float = 120.0
    """Timeout of every collective, in seconds: a rank whose peer died fails after this
    long instead of hanging forever."""
    threads: int = 0
    """CPU threads per rank for torch (0: the cores divided by the ranks on this machine).
    Kept fixed across a resume at the same world size, because the thread count can change
    the order of floating-point sums and so the bits of the result."""

    def __post_init__(self) -> None:
        _choice("dist", "mode", self.mode, ("ddp", "fsdp"))
        _choice("dist", "backend", self.backend, ("auto", "gloo", "nccl"))
        _num("dist", "timeout_s", self.timeout_s, low=0.0, low_open=True)
        _int("dist", "threads", self.threads)


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run.

    Example:
        >>> cfg = TrainConfig(steps=20, data=DataConfig(docs_per_step=4))
        >>> cfg.checkpoint_dir == os.path.join("runs/outlast", "checkpoints")
        True
        >>> TrainConfig(steps=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        outlast.train.config.ConfigError: steps=0 must be an int >= 1
    """

    run_dir: str = "runs/outlast"
    """Where the run writes: ``losses.jsonl`` (one JSON line per step and event), the
    checkpoints (unless ``checkpoint.directory`` says otherwise) and ``config.json``."""
    steps: int = 200
    """Optimizer steps of the whole run; the LR schedule ends here."""
    stop_after: int = 0
    """End this invocation after this step, saving a checkpoint, as if preempted (0: run to
    ``steps``). A later invocation with the same config resumes and continues."""
    seed: int = 0
    """Seed of the model's initialisation and of each rank's torch RNG."""
    log_every: int = 1
    """Print a line every this-many steps (every step is always written to losses.jsonl)."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ConfigError(f"run_dir={self.run_dir!r} must be a non-empty string")
        _int("", "steps", self.steps, minimum=1)
        _int("", "stop_after", self.stop_after)
        _int("", "seed", self.seed)
        _int("", "log_every", self.log_every, minimum=1)
        if self.optim.offload_dir and self.dist.mode != "ddp":
            raise ConfigError(
                f"optim.offload_dir is set but dist.mode={self.dist.mode!r}: offloaded AdamW needs whole "
                "(DDP) parameters; use dist.mode='ddp' or clear optim.offload_dir"
            )
        if not isinstance(self.progress, bool):
            raise ConfigError(f"progress={self.progress!r} must be true or false")
        if self.stop_after > self.steps:
            raise ConfigError(f"stop_after={self.stop_after} must be <= steps={self.steps} (0 runs to the end)")
        mc = self.model.build()
        if self.data.token_budget > mc.max_seq_len:
            raise ConfigError(
                f"data.token_budget={self.data.token_budget} exceeds the model's max_seq_len={mc.max_seq_len}; "
                f"lower data.token_budget or set max_seq_len under [model]"
            )

    @property
    def checkpoint_dir(self) -> str:
        """Where checkpoints go: ``checkpoint.directory`` resolved against ``run_dir``."""
        d = self.checkpoint.directory or "checkpoints"
        return d if os.path.isabs(d) or "://" in d else os.path.join(self.run_dir, d)

    def to_dict(self) -> dict:
        """A JSON-able dict that :meth:`from_dict` turns back into an equal config."""
        out = asdict(self)
        out["model"] = {"preset": self.model.preset, **self.model.overrides}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict shaped like the TOML file (sections as sub-dicts).

        Raises:
            ConfigError: an unknown section or key (named), or a bad value.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a training config must be a table/dict, got {type(d).__name__}")
        sections = {"data": DataConfig, "optim": OptimConfig, "checkpoint": CheckpointConfig, "dist": DistConfig}
        top = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in top:
                raise ConfigError(f"unknown config key {key!r}; top-level keys are {sorted(top)}")
            if key == "model":
                if not isinstance(value, dict):
                    raise ConfigError("[model] must be a table")
                value = dict(value)
                kwargs["model"] = ModelSection(preset=value.pop("preset", "tiny"), overrides=value)
            elif key in sections:
                klass = sections[key]
                if not isinstance(value, dict):
                    raise ConfigError(f"[{key}] must be a table")
                known = {f.name for f in fields(klass)}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise ConfigError(f"unknown key(s) {unknown} in [{key}]; known keys are {sorted(known)}")
                kwargs[key] = klass(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a TOML training config.

    Args:
        path: A ``.toml`` file (see ``examples/shakespeare_tiny.toml``).

    Returns:
        The validated :class:`TrainConfig`.

    Raises:
        ConfigError: the file is missing, is not valid TOML, or holds a bad value (named).

    Example:
        >>> cfg = load_config("examples/shakespeare_tiny.toml")  # doctest: +SKIP
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {os.fspath(path)} is not valid TOML: {e}") from None
    return TrainConfig.from_dict(raw)

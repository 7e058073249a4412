"""Read a DeepSpeed ZeRO (stage 1, 2, 3) checkpoint as full logical tensors, without DeepSpeed.

DeepSpeed saves each data-parallel rank's slice of one flat fp32 buffer per parameter
group, plus that rank's slice of the optimizer state, so its checkpoints only reload at the
world size that wrote them. In outlast's terms a ZeRO flat partition is just a map from
rank-local flat ranges to regions of logical tensors; this module computes that map from
the metadata DeepSpeed writes (``param_shapes``, paddings, partition sizes) and assembles
each parameter's full tensor -- model weights, fp32 master weights and Adam moments --
keyed by its fully qualified name (FQN), ready to resume at any world size.

On disk (DeepSpeed 0.10 .. 0.19; ``<tag>`` is e.g. ``global_step100``, ``latest`` names it)::

    <save_dir>/latest
    <save_dir>/<tag>/mp_rank_00_model_states.pt                      # stage 1/2: full module
    <save_dir>/<tag>/zero_pp_rank_<r>_mp_rank_00_model_states.pt     # stage 3: one per rank
    <save_dir>/<tag>/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   # one per rank

Security: DeepSpeed files are pickles. They are opened only with
``torch.load(weights_only=True)``. The optimizer files name three DeepSpeed classes
(``LossScaler``, ``ZeroStageEnum``, ``fragment_address``); instead of importing DeepSpeed
(converting must not need it) or loosening ``weights_only``, those dotted names are mapped,
for the duration of one load, to inert local stand-ins that only hold attributes. See
``_DEEPSPEED_STAND_INS``.

Not supported (each raises :class:`DeepSpeedFormatError`): ZeRO stage 0, tensor or
pipeline parallel checkpoints (``mp_rank_01``, ``layer_*``), MoE expert files, DeepSpeed's
own "universal" checkpoint folders, ZeRO-3 optimizer sub-groups that do not match the
parameter groups.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

import torch

from ..errors import CheckpointError


class DeepSpeedFormatError(CheckpointError):
    """A DeepSpeed checkpoint is missing, incomplete, or in a layout this reader does not know.

    The message names the directory, the file and what to do about it.
    """


# ---------------------------------------------------------------------------------------
# Safe unpickling
# ---------------------------------------------------------------------------------------


class _PickledAttrs:
    """Inert stand-in for a DeepSpeed object: unpickling only fills ``__dict__``.

    ``weights_only`` unpickling creates it with ``cls.__new__`` and sets attributes from
    the pickled state; no DeepSpeed code runs and no method of ours does anything else.
    """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__!r})"


class _LossScaler(_PickledAttrs):
    """``deepspeed.runtime.fp16.loss_scaler.LossScaler``: ``cur_scale``, ``dynamic``."""


class _FragmentAddress(_PickledAttrs):
    """``deepspeed.utils.tensor_fragment.fragment_address``: ``start``, ``numel``."""


def _zero_stage_enum(value: int) -> int:
    """``deepspeed.runtime.zero.config.ZeroStageEnum(value)`` pickles as a call; keep the int."""
    if not isinstance(value, int):
        raise TypeError(f"ZeroStageEnum value must be an int, got {type(value).__name__}")
    return value


# Dotted name in DeepSpeed's pickles -> the local stand-in torch may build for it.
_DEEPSPEED_STAND_INS: list[tuple[Any, str]] = [
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_zero_stage_enum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
]


def _load(path: str) -> dict:
    """``torch.load`` one DeepSpeed file safely: weights_only, mmap, CPU.

    ``torch.serialization.safe_globals`` edits a process-wide allow-list for the
    duration of the ``with``; it is not thread-safe, so do not load concurrently
    with other code that changes torch's safe globals.
    """
    try:
        with torch.serialization.safe_globals(_DEEPSPEED_STAND_INS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises UnpicklingError/RuntimeError for refused globals
        raise DeepSpeedFormatError(
            f"cannot read {path} with torch.load(weights_only=True): {e}. outlast never "
            "unpickles arbitrary objects; if a newer DeepSpeed pickles another class, add an "
            "inert stand-in for it to _DEEPSPEED_STAND_INS in outlast/convert/deepspeed.py."
        ) from e
    if not isinstance(obj, dict):
        raise DeepSpeedFormatError(f"{path} holds a {type(obj).__name__}, not a DeepSpeed state dict")
    return obj


# ---------------------------------------------------------------------------------------
# Layout: which rank-local flat ranges make up each logical tensor (pure, no I/O)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatChunk:
    """``length`` elements at ``rank_offset`` in rank ``rank``'s flat buffer ``group``
    are the elements at ``param_offset`` of the flattened logical tensor."""

    group: int
    rank: int
    rank_offset: int
    param_offset: int
    length: int


def zero12_layout(
    param_shapes: list[dict[str, tuple[int, ...]]],
    rank_numels: list[list[int]],
    alignment_paddings: list[list[int]] | None = None,
) -> dict[str, list[FlatChunk]]:
    """Chunks of every parameter under ZeRO stage 1/2.

    Each parameter group is one flat buffer: its parameters back to back (each followed by
    its alignment padding, if any) and cut into consecutive per-rank slices. The slices are
    saved without their trailing padding, so ``rank_numels[g][r]`` -- the saved length --
    is exactly what each rank holds.

    Args:
        param_shapes: per group, FQN -> shape, in flat-buffer order.
        rank_numels: per group, the saved flat length of each rank.
        alignment_paddings: per group, per parameter, padding after it (DeepSpeed >= 0.18).

    Returns:
        FQN -> chunks ordered by ``param_offset``.

    Example:
        >>> zero12_layout([{"w": (3,)}], [[2, 1]])["w"]  # doctest: +NORMALIZE_WHITESPACE
        [FlatChunk(group=0, rank=0, rank_offset=0, param_offset=0, length=2),
         FlatChunk(group=0, rank=1, rank_offset=0, param_offset=2, length=1)]
    """
    if len(param_shapes) != len(rank_numels):
        raise ValueError(f"{len(param_shapes)} groups of shapes but {len(rank_numels)} groups of partitions")
    layout: dict[str, list[FlatChunk]] = {}
    for g, shapes in enumerate(param_shapes):
        starts = [0]
        for n in rank_numels[g]:
            starts.append(starts[-1] + n)
        pads = alignment_paddings[g] if alignment_paddings else [0] * len(shapes)
        if len(pads) != len(shapes):
            raise ValueError(f"group {g}: {len(shapes)} parameters but {len(pads)} alignment paddings")
        offset = 0
        for (fqn, shape), pad in zip(shapes.items(), pads):
            numel = math.prod(shape)
            if offset + numel > starts[-1]:
                raise ValueError(
                    f"group {g}: parameter {fqn} ends at flat offset {offset + numel} but the "
                    f"ranks hold only {starts[-1]} elements"
                )
            chunks = []
            for r in range(len(rank_numels[g])):
                lo, hi = max(offset, starts[r]), min(offset + numel, starts[r + 1])
                if lo < hi:
                    chunks.append(FlatChunk(g, r, lo - starts[r], lo - offset, hi - lo))
            layout[fqn] = chunks
            offset += numel + pad
    return layout


def zero3_layout(param_shapes: list[dict[str, tuple[int, ...]]], world_size: int) -> dict[str, list[FlatChunk]]:
    """Chunks of every parameter under ZeRO stage 3.

    Each parameter is split on its own: rank ``r`` holds elements
    ``[r*c, (r+1)*c)`` (``c = ceil(numel / world_size)``, the last rank zero-padded), and
    each rank packs its pieces of all parameters back to back in one flat buffer (the
    concatenation of its per-group buffers, ``group`` 0 here).

    Example:
        >>> [c.length for c in zero3_layout([{"a": (3,), "b": (2,)}], 2)["b"]]
        [1, 1]
    """
    layout: dict[str, list[FlatChunk]] = {}
    offset = 0
    for shapes in param_shapes:
        for fqn, shape in shapes.items():
            numel = math.prod(shape)
            per_rank = math.ceil(numel / world_size)
            chunks = []
            for r in range(world_size):
                length = min(per_rank, numel - r * per_rank)
                if length > 0:
                    chunks.append(FlatChunk(0, r, offset, r * per_rank, length))
            layout[fqn] = chunks
            offset += per_rank
    return layout


def _assemble(chunks: list[FlatChunk], flats: list[list[torch.Tensor]], shape: tuple[int, ...]) -> torch.Tensor:
    """Copy the chunks out of ``flats[rank][group]`` into one new contiguous tensor."""
    pieces = [flats[c.rank][c.group].narrow(0, c.rank_offset, c.length) for c in chunks]
    if not pieces:
        raise ValueError("no chunks")
    return torch.cat(pieces).view(shape) if len(pieces) > 1 else pieces[0].clone().view(shape)


# ---------------------------------------------------------------------------------------
# Locating files
# ---------------------------------------------------------------------------------------

_MODEL_Z12 = "mp_rank_00_model_states.pt"
_MODEL_Z3 = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
_OPTIM = "{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _resolve_tag_dir(path: str, tag: str | None) -> str:
    if not os.path.isdir(path):
        raise DeepSpeedFormatError(f"DeepSpeed checkpoint directory {path!r} does not exist")
    if tag is not None:
        tag_dir = os.path.join(path, str(tag))
        if not os.path.isdir(tag_dir):
            raise DeepSpeedFormatError(
                f"{path}: no checkpoint tag {tag!r} (no folder {tag_dir}); tags present: "
                f"{_list_tags(path) or 'none'}. Pass one of them as tag=."
            )
        return tag_dir
    if _has_model_file(path):  # the user pointed at the tag folder itself
        return path
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        raise DeepSpeedFormatError(
            f"{path}: missing file 'latest', so the checkpoint tag is unknown; tags present: "
            f"{_list_tags(path) or 'none'}. Pass tag= explicitly or point at the tag folder."
        )
    with open(latest) as f:
        tag = f.read().strip()
    tag_dir = os.path.join(path, tag)
    if not os.path.isdir(tag_dir):
        raise DeepSpeedFormatError(
            f"{latest} names tag {tag!r} but folder {tag_dir} does not exist; tags present: "
            f"{_list_tags(path) or 'none'}. Pass one of them as tag=."
        )
    return tag_dir


def _has_model_file(d: str) -> bool:
    return os.path.isfile(os.path.join(d, _MODEL_Z12)) or os.path.isfile(
        os.path.join(d, _MODEL_Z3.format(rank=0))
    )


def _list_tags(path: str) -> list[str]:
    return sorted(e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)) and _has_model_file(os.path.join(path, e)))


def _require(tag_dir: str, name: str, why: str) -> str:
    p = os.path.join(tag_dir, name)
    if not os.path.isfile(p):
        raise DeepSpeedFormatError(
            f"{tag_dir}: missing file {name} ({why}). Every data-parallel rank writes its own "
            "file; copy the complete checkpoint folder from where it was saved, or pick "
            "another tag."
        )
    return p


def _check_unsupported_files(tag_dir: str) -> None:
    for name in os.listdir(tag_dir):
        if re.match(r"(.*_)?mp_rank_(0[1-9]|[1-9]\d)", name) or name.startswith("layer_") or "expert_" in name:
            raise DeepSpeedFormatError(
                f"{tag_dir}: file {name} belongs to a tensor-parallel, pipeline-parallel or MoE "
                "checkpoint; only pure data-parallel ZeRO checkpoints are supported. Convert "
                "it with DeepSpeed's ds_to_universal first."
            )


# ---------------------------------------------------------------------------------------
# The state
# ---------------------------------------------------------------------------------------

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class DeepSpeedState:
    """A DeepSpeed ZeRO checkpoint seen as full logical tensors.

    Tensors are assembled on first access of ``model`` / ``master`` / ``optim_state``
    (then cached), or one at a time by :meth:`iter_tensors` (not cached), reading from the
    memory-mapped rank files so a converter never holds more than one extra tensor.

    Attributes:
        path: the tag folder read.
        zero_stage: 1, 2 or 3.
        world_size: data-parallel world size that wrote it.
        step: DeepSpeed's ``global_steps`` (optimizer steps taken, skipped ones included).
        model_dtype: dtype of the module parameters (``torch.bfloat16`` for bf16 runs).
        param_groups: optimizer hyperparameters, JSON-able, ``"params"`` as FQN lists.
        shared: tied parameter FQN -> the FQN holding its data (from ``shared_params``).
        unresolved: module entries that have no data anywhere in the checkpoint. ZeRO-3
            does not record ties, so a tied alias (e.g. ``lm_head.weight``) lands here;
            tie it again in your model.
        ds_version: DeepSpeed version that wrote it.
    """

    path: str
    zero_stage: int
    world_size: int
    step: int | None
    model_dtype: torch.dtype
    param_groups: list[dict]
    shared: dict[str, str]
    unresolved: list[str]
    ds_version: str | None
    _layout: dict[str, list[FlatChunk]] = field(repr=False)
    _shapes: dict[str, tuple[int, ...]] = field(repr=False)
    _fp32_flats: list[list[torch.Tensor]] = field(repr=False)
    _state_flats: dict[str, list[list[torch.Tensor]]] = field(repr=False)
    _steps: list[Any] = field(repr=False)  # per group (stage 1/2) / one entry (stage 3)
    _group_of: dict[str, int] = field(repr=False)
    _module: dict[str, torch.Tensor] = field(repr=False)  # full tensors present as-is (buffers, z1/2 module)
    _frozen: dict[str, torch.Tensor] = field(repr=False)  # z3 frozen params, already assembled

    # -- per-tensor access ----------------------------------------------------------------

    @property
    def trainable_fqns(self) -> list[str]:
        """FQNs held in ZeRO's flat partitions (and so in the optimizer), in flat order."""
        return list(self._layout)

    def master_tensor(self, fqn: str) -> torch.Tensor:
        """The full fp32 master weight of one trainable parameter."""
        return _assemble(self._layout[fqn], self._fp32_flats, self._shapes[fqn])

    def model_tensor(self, fqn: str, *, copy: bool = True) -> torch.Tensor:
        """The full module tensor (parameter or buffer) in the model's dtype.

        ``copy=False`` may return the reader's own (memory-mapped) tensor: for streaming
        consumers that only read it, it saves a copy of the bytes.
        """
        fqn = self.shared.get(fqn, fqn)
        if fqn in self._module:
            return self._module[fqn].clone() if copy else self._module[fqn]
        if fqn in self._frozen:
            return self._frozen[fqn].clone() if copy else self._frozen[fqn]
        # ZeRO-3 saves no module weights; DeepSpeed's own bf16/fp16 weights are this cast
        # of the master (it copies fp32 -> low precision after every step).
        return self.master_tensor(fqn).to(self.model_dtype)

    def optim_tensors(self, fqn: str) -> dict[str, torch.Tensor]:
        """``{"step", "exp_avg", "exp_avg_sq", ...}`` of one trainable parameter, full shape."""
        out: dict[str, torch.Tensor] = {}
        step = self._steps[self._group_of[fqn]]
        if step is not None:
            out["step"] = step.clone() if torch.is_tensor(step) else torch.tensor(float(step))
        for key, flats in self._state_flats.items():
            out[key] = _assemble(self._layout[fqn], flats, self._shapes[fqn])
        return out

    def model_fqns(self) -> list[str]:
        """Every module entry that has data: buffers, parameters, frozen ones, tied aliases."""
        names = list(self._module)
        names += [n for n in self._frozen if n not in self._module]
        names += [n for n in self._layout if n not in self._module]
        names += [n for n in self.shared if n not in names]
        return names

    # -- whole dicts ----------------------------------------------------------------------

    @cached_property
    def model(self) -> dict[str, torch.Tensor]:
        """FQN -> full tensor in the model's dtype (buffers keep theirs). Aliases share data."""
        out = {n: self.model_tensor(n) for n in self.model_fqns() if n not in self.shared}
        for alias, src in self.shared.items():
            out[alias] = out[src]
        return out

    @cached_property
    def master(self) -> dict[str, torch.Tensor]:
        """FQN -> full fp32 master weight, for trainable parameters only."""
        return {n: self.master_tensor(n) for n in self._layout}

    @cached_property
    def optim_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """FQN -> {"step", "exp_avg", "exp_avg_sq"}, full shaped, fp32."""
        return {n: self.optim_tensors(n) for n in self._layout}

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time without caching, for streaming converters.

        Names are ``model.<fqn>``, ``master.<fqn>`` and ``optim.state.<fqn>.<key>``.
        Tied aliases are yielded under their own name too (same values), because a live
        model's ``state_dict()`` lists both names and a strict load needs both.
        """
        for n in self.model_fqns():
            yield f"model.{n}", self.model_tensor(n, copy=False)
        for n in self._layout:
            yield f"master.{n}", self.master_tensor(n)
        for n in self._layout:
            for key, t in self.optim_tensors(n).items():
                yield f"optim.state.{n}.{key}", t

    def tensor_specs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(name, safetensors dtype, shape)`` of everything :meth:`iter_tensors` yields, in
        the same order, without assembling any tensor (so a converter can write headers
        first and stream each tensor once)."""
        from .. import dtypes

        def st(dt: torch.dtype) -> str:
            return dtypes.to_safetensors(dt)

        out = []
        for n in self.model_fqns():
            src = self.shared.get(n, n)
            t = self._module.get(src, self._frozen.get(src))
            if t is not None:
                out.append((f"model.{n}", st(t.dtype), tuple(t.shape)))
            else:
                out.append((f"model.{n}", st(self.model_dtype), self._shapes[src]))
        master_dt = self._fp32_flats[0][0].dtype
        for n in self._layout:
            out.append((f"master.{n}", st(master_dt), self._shapes[n]))
        for n in self._layout:
            step = self._steps[self._group_of[n]]
            if step is not None:
                t = step if torch.is_tensor(step) else torch.tensor(float(step))
                out.append((f"optim.state.{n}.step", st(t.dtype), tuple(t.shape)))
            for key, flats in self._state_flats.items():
                out.append((f"optim.state.{n}.{key}", st(flats[0][0].dtype), self._shapes[n]))
        return out

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The optimizer state as ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``
        returns it: ``{"state": {fqn: {...}}, "param_groups": [{..., "params": [fqn, ...]}]}``.

        Example:
            >>> sd = read_deepspeed("ckpts/run1").optimizer_state_dict()  # doctest: +SKIP
            >>> set_optimizer_state_dict(model, optim, sd)  # doctest: +SKIP
        """
        return {"state": self.optim_state, "param_groups": [dict(g) for g in self.param_groups]}


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def read_deepspeed(path: str, tag: str | None = None) -> DeepSpeedState:
    """Read a DeepSpeed ZeRO stage 1/2/3 checkpoint as full, FQN-keyed tensors.

    Args:
        path: the ``save_dir`` given to ``engine.save_checkpoint`` (holding ``latest``),
            or a tag folder itself.
        tag: the tag to read; default: the one named in ``<path>/latest``.

    Returns:
        A :class:`DeepSpeedState`; tensors are assembled lazily from memory-mapped files.

    Raises:
        DeepSpeedFormatError: a missing ``latest``, tag or rank file, or an unsupported layout.

    Example:
        >>> st = read_deepspeed("checkpoints/", tag="global_step1000")  # doctest: +SKIP
        >>> model.load_state_dict(st.model, strict=False)  # doctest: +SKIP
    """
    tag_dir = _resolve_tag_dir(path, tag)
    _check_unsupported_files(tag_dir)

    if os.path.isfile(os.path.join(tag_dir, _MODEL_Z12)):
        model_sd = _load(os.path.join(tag_dir, _MODEL_Z12))
        is_z3 = False
    else:
        model_sd = _load(_require(tag_dir, _MODEL_Z3.format(rank=0), "rank 0 model states"))
        is_z3 = True
    for key in ("module", "param_shapes"):
        if key not in model_sd:
            raise DeepSpeedFormatError(f"{tag_dir}: model states file has no {key!r}; not a DeepSpeed ZeRO checkpoint")
    world_size = int(model_sd.get("dp_world_size") or 0)
    if world_size < 1:
        raise DeepSpeedFormatError(f"{tag_dir}: model states file has no dp_world_size")
    if int(model_sd.get("mp_world_size") or 1) != 1:
        raise DeepSpeedFormatError(f"{tag_dir}: mp_world_size={model_sd['mp_world_size']}; tensor parallel checkpoints are not supported")

    prefix = _optim_prefix(tag_dir)
    optim_sds = []
    for r in range(world_size):
        name = _OPTIM.format(prefix=prefix, rank=r)
        osd = _load(_require(tag_dir, name, f"optimizer states of rank {r} of {world_size}"))
        if "optimizer_state_dict" not in osd:
            raise DeepSpeedFormatError(f"{tag_dir}/{name} has no 'optimizer_state_dict'")
        optim_sds.append(osd["optimizer_state_dict"])

    stage = optim_sds[0].get("zero_stage")
    if stage not in (1, 2, 3) or (stage == 3) != is_z3:
        raise DeepSpeedFormatError(
            f"{tag_dir}: unsupported ZeRO stage {stage!r} (model files say stage "
            f"{'3' if is_z3 else '1/2'}); only stages 1, 2 and 3 are supported."
        )

    module = model_sd["module"]
    param_shapes = [{k: tuple(v) for k, v in g.items()} for g in model_sd["param_shapes"]]
    shapes = {k: v for g in param_shapes for k, v in g.items()}
    shared = dict(model_sd.get("shared_params") or {})
    buffer_names = list(model_sd.get("buffer_names") or [])
    model_dtype = _model_dtype(module, shapes, tag_dir)

    if stage in (1, 2):
        fp32_flats = [list(o["single_partition_of_fp32_groups"]) for o in optim_sds]
        rank_numels = [[fp32_flats[r][g].numel() for r in range(world_size)] for g in range(len(param_shapes))]
        try:
            layout = zero12_layout(param_shapes, rank_numels, optim_sds[0].get("param_alignment_paddings"))
        except ValueError as e:
            raise DeepSpeedFormatError(f"{tag_dir}: flat partitions do not match param_shapes: {e}") from e
        group_of = {n: g for g, s in enumerate(param_shapes) for n in s}
        state_flats, steps, hyper = _zero12_optimizer(optim_sds, fp32_flats, tag_dir)
        # ZeRO 1/2 keep the full module on rank 0: buffers and frozen params come from it.
        kept = {n: t for n, t in module.items() if n not in shared}
        frozen: dict[str, torch.Tensor] = {}
    else:
        # Concatenating a rank's group buffers gives the one flat run ZeRO-3 packs per rank.
        fp32_flats = [[torch.cat(list(o["fp32_flat_groups"]))] for o in optim_sds]
        layout = zero3_layout(param_shapes, world_size)
        expected = sum(math.ceil(math.prod(s) / world_size) for s in shapes.values())
        if fp32_flats[0][0].numel() != expected:
            raise DeepSpeedFormatError(
                f"{tag_dir}: ZeRO-3 rank 0 holds {fp32_flats[0][0].numel()} fp32 elements but "
                f"param_shapes imply {expected}"
            )
        group_of = {n: 0 for n in shapes}
        state_flats, steps, hyper = _zero3_optimizer(optim_sds, fp32_flats, tag_dir)
        kept = {n: module[n] for n in buffer_names if n in module}
        frozen = _zero3_frozen(tag_dir, model_sd, world_size)

    if len(hyper) != len(param_shapes):
        raise DeepSpeedFormatError(
            f"{tag_dir}: optimizer has {len(hyper)} param groups but param_shapes has "
            f"{len(param_shapes)} (ZeRO-3 sub-groups?); not supported"
        )
    param_groups = [
        {**_jsonable(h), "params": list(s)} for h, s in zip(hyper, param_shapes)
    ]
    known = set(kept) | set(frozen) | set(shapes) | set(shared)
    unresolved = [n for n in module if n not in known]

    return DeepSpeedState(
        path=tag_dir,
        zero_stage=stage,
        world_size=world_size,
        step=model_sd.get("global_steps"),
        model_dtype=model_dtype,
        param_groups=param_groups,
        shared=shared,
        unresolved=unresolved,
        ds_version=model_sd.get("ds_version"),
        _layout=layout,
        _shapes=shapes,
        _fp32_flats=fp32_flats,
        _state_flats=state_flats,
        _steps=steps,
        _group_of=group_of,
        _module=kept,
        _frozen=frozen,
    )


def _optim_prefix(tag_dir: str) -> str:
    """bf16 runs name optimizer files ``bf16_zero_pp_rank_*``; others ``zero_pp_rank_*``."""
    for prefix in ("", "bf16_"):
        if os.path.isfile(os.path.join(tag_dir, _OPTIM.format(prefix=prefix, rank=0))):
            return prefix
    others = sorted(n for n in os.listdir(tag_dir) if n.endswith("_optim_states.pt"))
    if others:  # rank 0 missing but others present: name the missing one
        prefix = "bf16_" if others[0].startswith("bf16_") else ""
        _require(tag_dir, _OPTIM.format(prefix=prefix, rank=0), "optimizer states of rank 0")
    raise DeepSpeedFormatError(
        f"{tag_dir}: no *_optim_states.pt files (missing {_OPTIM.format(prefix='', rank=0)}). "
        "The checkpoint holds no ZeRO optimizer state (ZeRO stage 0, or saved without "
        "optimizer); only stage 1/2/3 checkpoints are supported."
    )


def _model_dtype(module: dict, shapes: dict, tag_dir: str) -> torch.dtype:
    for n in shapes:
        if n in module and torch.is_tensor(module[n]):
            return module[n].dtype
    raise DeepSpeedFormatError(f"{tag_dir}: module state has none of the trainable parameters")


def _per_param_state(state: dict, g: int, length: int, where: str) -> tuple[dict, Any]:
    """Split one group's optimizer state into flat tensors cut to ``length`` and its step."""
    flats, step = {}, state.get("step")
    for key, value in state.items():
        if key == "step":
            continue
        if torch.is_tensor(value) and value.dim() == 1:
            if value.numel() < length:
                raise DeepSpeedFormatError(f"{where}: group {g} {key} has {value.numel()} elements, fewer than the {length} of its weights")
            flats[key] = value.narrow(0, 0, length)  # drop the partition padding
    return flats, step


def _zero12_optimizer(optim_sds, fp32_flats, tag_dir):
    """(per-key per-rank per-group flats, per-group step, per-group hyperparameters)."""
    keys: dict[str, list[list[torch.Tensor]]] = {}
    steps: list[Any] = []
    for r, osd in enumerate(optim_sds):
        base = osd.get("base_optimizer_state")
        where = f"{tag_dir} rank {r}"
        if isinstance(base, dict):  # rigid: the torch optimizer's own state_dict (padded)
            groups_state = [base["state"].get(g, {}) for g in range(len(fp32_flats[r]))]
            hyper = base["param_groups"]
        elif isinstance(base, list):  # elastic: one lean dict per group; step saved apart
            groups_state = base
            hyper = optim_sds[0].get("param_groups") or [{} for _ in base]
        else:
            raise DeepSpeedFormatError(f"{where}: no base_optimizer_state")
        for g, st in enumerate(groups_state):
            flats, step = _per_param_state(st, g, fp32_flats[r][g].numel(), where)
            if step is None:
                step = osd.get("base_optimizer_state_step")
            if r == 0:
                steps.append(step)
            for key, t in flats.items():
                keys.setdefault(key, [[] for _ in optim_sds])[r].append(t)
    return keys, steps, hyper


def _zero3_optimizer(optim_sds, fp32_flats, tag_dir):
    keys: dict[str, list[list[torch.Tensor]]] = {}
    step = None
    hyper = None
    for r, osd in enumerate(optim_sds):
        inner = osd.get("optimizer_state_dict")
        if not isinstance(inner, dict) or "state" not in inner:
            raise DeepSpeedFormatError(f"{tag_dir} rank {r}: ZeRO-3 optimizer file has no optimizer_state_dict.state")
        hyper = hyper or inner["param_groups"]
        groups = [o.numel() for o in osd["fp32_flat_groups"]]
        per_key: dict[str, list[torch.Tensor]] = {}
        for g, n in enumerate(groups):
            flats, s = _per_param_state(inner["state"].get(g, {}), g, n, f"{tag_dir} rank {r}")
            step = s if step is None else step
            for key, t in flats.items():
                per_key.setdefault(key, []).append(t)
        for key, ts in per_key.items():
            if len(ts) != len(groups):
                raise DeepSpeedFormatError(f"{tag_dir} rank {r}: {key} missing for some parameter groups")
            keys.setdefault(key, [[] for _ in optim_sds])[r].append(torch.cat(ts))
    return keys, [step], hyper


def _zero3_frozen(tag_dir: str, model_sd0: dict, world_size: int) -> dict[str, torch.Tensor]:
    """ZeRO-3 frozen parameters: each rank's model file holds its 1/world_size piece."""
    frozen_shapes = model_sd0.get("frozen_param_shapes") or {}
    if not frozen_shapes:
        return {}
    pieces: dict[str, list[torch.Tensor]] = {n: [] for n in frozen_shapes}
    for r in range(world_size):
        sd = model_sd0 if r == 0 else _load(_require(tag_dir, _MODEL_Z3.format(rank=r), f"model states of rank {r}"))
        fragments = sd.get("frozen_param_fragments") or {}
        for n in frozen_shapes:
            if n not in fragments:
                raise DeepSpeedFormatError(f"{tag_dir}: rank {r} model states lack the fragment of frozen parameter {n}")
            pieces[n].append(fragments[n])
    out = {}
    for n, shape in frozen_shapes.items():
        numel = math.prod(shape)
        out[n] = torch.cat(pieces[n]).narrow(0, 0, numel).reshape(tuple(shape)).clone()
    return out


def _jsonable(hyper: dict) -> dict:
    """Hyperparameters as JSON values: tuples -> lists, drop the torch "params" indices."""
    out = {}
    for k, v in hyper.items():
        if k == "params":
            continue
        if isinstance(v, tuple):
            v = list(v)
        if torch.is_tensor(v):
            v = v.item()
        out[k] = v
    return out

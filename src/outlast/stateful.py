"""Stateful wrappers that make a model and its optimizer savable in any layout.

``torch.distributed.checkpoint.state_dict.get_state_dict`` returns a model's and an
optimizer's state keyed by parameter name (FQN) with every tensor in the model's live
layout: DTensors under FSDP2 / tensor parallel, plain tensors under DDP or in one
process. Optimizer state keyed by FQN rather than by parameter index is what lets a
checkpoint saved under one parallelism resume under another, so the wrapper below is
the recommended way to put a model and optimizer into outlast state.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ModelOptimizerState"]


class ModelOptimizerState:
    """A model and its optimizer(s) as one Stateful object, keyed by parameter FQN.

    ``state_dict()`` returns ``{"model": ..., "optim": ...}`` from ``get_state_dict``
    (optimizer state is initialised first if the optimizer has not stepped, so a fresh
    optimizer has tensors of the right layout to load into); ``load_state_dict`` hands
    the filled dicts to ``set_state_dict``. Works in one process, under DDP, FSDP2 and
    tensor parallel; save under one, load under another, at any world size.

    Args:
        model: the (possibly wrapped / sharded) module.
        optimizers: an optimizer, a sequence of them, or None for the model only.
        options: a ``torch.distributed.checkpoint.state_dict.StateDictOptions``; the
            default (sharded, not full state dicts) is what outlast wants.

    Example:
        >>> state = {"train": outlast.ModelOptimizerState(model, optim), "step": step}
        >>> outlast.save(state, f"ckpt/step-{step:08d}")      # on every rank
        >>> outlast.load(state, "ckpt/step-00001200")          # any world size
    """

    def __init__(self, model: torch.nn.Module, optimizers: Any = None, *, options: Any = None):
        self.model = model
        if optimizers is None:
            self.optimizers: tuple = ()
        elif isinstance(optimizers, torch.optim.Optimizer):
            self.optimizers = (optimizers,)
        else:
            self.optimizers = tuple(optimizers)
        self.options = options

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if not self.optimizers:
            return {"model": get_model_state_dict(self.model, options=self.options)}
        optims: Any = self.optimizers[0] if len(self.optimizers) == 1 else self.optimizers
        msd, osd = get_state_dict(self.model, optims, options=self.options)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if not self.optimizers:
            set_model_state_dict(self.model, state["model"], options=self.options)
            return
        optims: Any = self.optimizers[0] if len(self.optimizers) == 1 else self.optimizers
        set_state_dict(
            self.model, optims, model_state_dict=state["model"], optim_state_dict=state["optim"], options=self.options
        )



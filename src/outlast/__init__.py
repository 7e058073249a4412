"""outlast: keep large-model training going on hardware that fails and changes.

Public surface::

    outlast.save(state, path, *, step=None, overwrite=False, process_group=None)
    outlast.load(state, path, *, strict=True, process_group=None)  -> LoadReport
    outlast.read(path, keys=None)                                  -> dict
    outlast.prepare_save(state) / outlast.persist(prepared, path)  the two halves of save
    outlast.FlatShard(local, global_shape, start)                  a ZeRO / FSDP1 flat slice
    outlast.ModelOptimizerState(model, optim)                      model + optimizer, FQN-keyed
    outlast.Checkpointer(directory, keep_last=...)                 steps, async saves, tiers, retention
    outlast.errors                                                 the exception hierarchy

``save`` and ``load`` are collective when torch.distributed is initialised.
"""

__version__ = "0.1.0"

from . import errors  # noqa: E402
from .api import LoadReport, PreparedSave, SaveReport, load, manifest_of, persist, prepare_save, read, save  # noqa: E402
from .layouts import FlatShard  # noqa: E402
from .stateful import ModelOptimizerState  # noqa: E402
from .checkpointer import Checkpointer, SaveMetrics  # noqa: E402

__all__ = [
    "save",
    "load",
    "read",
    "prepare_save",
    "persist",
    "manifest_of",
    "LoadReport",
    "SaveReport",
    "PreparedSave",
    "FlatShard",
    "ModelOptimizerState",
    "Checkpointer",
    "SaveMetrics",
    "errors",
    "__version__",
]

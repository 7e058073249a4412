"""outlast: keep large-model training going on hardware that fails and changes.

Public surface::

    outlast.save(state, path, *, step=None, overwrite=False, process_group=None) -> SaveReport
    outlast.load(state, path, *, strict=True, process_group=None)  -> LoadReport
    outlast.read(path, keys=None)                                  -> dict
    outlast.prepare_save(state) / outlast.persist(prepared, path)  the two halves of save
    outlast.FlatShard(local, global_shape, start)                  a ZeRO / FSDP1 flat slice
    outlast.ModelOptimizerState(model, optim)                      model + optimizer, FQN-keyed
    outlast.convert_checkpoint(src, dst, *, src_format, dst_format, prefix=None) -> ConvertResult
    outlast.merge_checkpoints(srcs, dst, *, method="mean", ...)      -> Manifest
    outlast.CheckpointWriter(path, specs, ...)                     streaming writer (TensorSpec per tensor)
    outlast.Checkpointer(directory, keep_last=...)                 steps, async saves, tiers, retention
        .save(state, step)                                         same argument order as outlast.save
    outlast.Manifest                                               a committed checkpoint's manifest
    outlast.errors                                                 the exception hierarchy

``save`` and ``load`` are collective when torch.distributed is initialised.

``outlast.convert`` and ``outlast.merge`` are the subpackage and module of those names
(``import outlast.merge`` and ``outlast.merge`` are the same object). Calling them like
functions, ``save`` results used as a ``Manifest`` and ``Checkpointer.save(step, state)``
are the spellings before 0.2: they still work and raise a ``DeprecationWarning``.
"""

__version__ = "0.1.0"

from . import errors  # noqa: E402
from .api import LoadReport, PreparedSave, SaveReport, load, manifest_of, persist, prepare_save, read, save  # noqa: E402
from . import convert, merge  # noqa: E402  (modules; calling them still works, deprecated)
from .convert import ConvertResult, convert_checkpoint  # noqa: E402
from .format import Manifest  # noqa: E402
from .layouts import FlatShard  # noqa: E402
from .merge import merge_checkpoints  # noqa: E402
from .stateful import ModelOptimizerState  # noqa: E402
from .writer import CheckpointWriter, TensorSpec  # noqa: E402
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
    "convert_checkpoint",
    "ConvertResult",
    "merge_checkpoints",
    "Manifest",
    "CheckpointWriter",
    "TensorSpec",
    "Checkpointer",
    "SaveMetrics",
    "errors",
    "__version__",
]

"""outlast: keep large-model training going on hardware that fails and changes.

Public surface::

    outlast.save(state, path, *, step=None, overwrite=False)
    outlast.load(state, path, *, strict=True)  -> LoadReport
    outlast.read(path, keys=None)              -> dict
    outlast.Checkpointer(directory, keep_last=...)  steps, async saves, tiers, retention
    outlast.errors                             the exception hierarchy
"""

__version__ = "0.1.0"

from . import errors  # noqa: E402
from .api import LoadReport, load, manifest_of, read, save  # noqa: E402
from .checkpointer import Checkpointer, SaveMetrics  # noqa: E402

__all__ = ["save", "load", "read", "manifest_of", "LoadReport", "Checkpointer", "SaveMetrics", "errors", "__version__"]

"""outlast: keep large-model training going on hardware that fails and changes.

Public surface::

    outlast.save(state, path, *, step=None, overwrite=False)
    outlast.load(state, path, *, strict=True)  -> LoadReport
    outlast.read(path, keys=None)              -> dict
    outlast.convert(src, dst, *, src_format, dst_format, prefix=None) -> ConvertResult
    outlast.merge(srcs, dst, *, method="mean", weights=None, decay=None, last_k=None) -> Manifest
    outlast.CheckpointWriter(path, specs, ...)  streaming writer (TensorSpec per tensor)
    outlast.errors                             the exception hierarchy
"""

__version__ = "0.1.0"

from . import errors  # noqa: E402
from .api import LoadReport, load, manifest_of, read, save  # noqa: E402
from .convert.core import ConvertResult, convert  # noqa: E402
from .merge import merge  # noqa: E402
from .writer import CheckpointWriter, TensorSpec  # noqa: E402

__all__ = [
    "save", "load", "read", "manifest_of", "LoadReport", "errors", "__version__",
    "convert", "ConvertResult", "merge", "CheckpointWriter", "TensorSpec",
]

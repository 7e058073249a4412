"""Other checkpoint formats in and out: Hugging Face, PyTorch DCP, ``torch.save``, DeepSpeed, GGUF.

The entry point is :func:`convert_checkpoint` (also ``outlast.convert_checkpoint``); the
sources and sinks live in :mod:`.core`, :mod:`.hf`, :mod:`.dcp`, :mod:`.torch_save`,
:mod:`.deepspeed` and :mod:`.gguf`. ``outlast.convert`` is this package; calling it like a
function (the spelling before 0.2) still works and warns.
"""

from .core import ConvertResult, convert_checkpoint  # noqa: F401
from .._deprecated import make_module_callable

__all__ = ["convert_checkpoint", "ConvertResult"]

make_module_callable(__name__, convert_checkpoint, "outlast.convert(...)", "outlast.convert_checkpoint(...)")

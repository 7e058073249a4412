"""``torch.save`` files as a conversion source, read with ``weights_only=True`` only.

``torch.load(weights_only=True)`` refuses to build arbitrary Python objects, so a
stranger's ``.pt`` file cannot run code here; a file that needs more than tensors and
plain containers is refused with a hint to re-save a ``state_dict()``. Files in the zip
format (torch >= 1.6) are memory-mapped, so tensors are paged in as they are converted
rather than loaded all at once.
"""

from __future__ import annotations


import torch

from ..errors import CorruptCheckpointError, SerializationError, UnsupportedFormatError
from ..format import PlainEntry
from ..tree import flatten
from ..writer import TensorSpec
from .core import Source


class TorchSaveSource(Source):
    """A ``torch.save`` file holding a dict (``state_dict()`` or nested training state)."""

    format = "torch"

    def __init__(self, path: str):
        super().__init__(path)
        obj = _load(path)
        if isinstance(obj, torch.Tensor):
            obj = {"tensor": obj}
        if not isinstance(obj, dict):
            raise UnsupportedFormatError(
                f"{path} holds a {type(obj).__name__}; outlast converts torch.save files that hold a dict "
                "(e.g. torch.save(model.state_dict(), path))"
            )
        try:
            flat = flatten(obj)
        except SerializationError as e:
            raise UnsupportedFormatError(f"{path}: {e}") from None
        self._tensors = {fqn: leaf.value for fqn, leaf in flat.tensors.items()}
        self.specs = [TensorSpec.of(fqn, leaf.value, leaf.path) for fqn, leaf in flat.tensors.items()]
        self.plain = {fqn: PlainEntry(leaf.path, leaf.value) for fqn, leaf in flat.plain.items()}
        step = obj.get("step")
        self.step = step if isinstance(step, int) and not isinstance(step, bool) else None

    def read(self, fqn: str) -> torch.Tensor:
        # A view into a shared (possibly mmap'd) storage becomes a contiguous tensor of its own.
        return self._tensors[fqn].detach().contiguous()

    def close(self) -> None:
        self._tensors.clear()


def _load(path: str):
    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(True)
        except RuntimeError as e:
            # Legacy (pre-zip) files cannot be memory-mapped; read them whole.
            if "mmap" not in str(e):
                raise
            return load(False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path} is not a readable torch.save file: {e}") from None
    except Exception as e:  # noqa: BLE001 - narrowed below
        # weights_only refusals are pickle.UnpicklingError; matched by name so this module
        # has no business importing pickle at all.
        if type(e).__name__ != "UnpicklingError":
            raise
        raise UnsupportedFormatError(
            f"{path} holds objects that torch.load(weights_only=True) refuses to build ({e}); "
            "outlast never unpickles arbitrary objects. Re-save only tensors and plain values, "
            "e.g. torch.save(model.state_dict(), path), from code you trust."
        ) from None

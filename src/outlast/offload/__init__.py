"""Offload: train when the optimizer state does not fit in memory.

:class:`OffloadAdamW` keeps AdamW's state (and optionally fp32 master weights) in files
on a local disk (or in pinned host memory next to an accelerator) and streams it through
a fixed pool of aligned buffers each step, with reads, the update and writes
overlapped. Its results equal ``torch.optim.AdamW`` bit for bit, and ``outlast.save``
writes its state straight from the files. See ``docs/offload.md``.
"""

from .adamw import OffloadAdamW
from .files import DirectIOWarning, StateFiles
from .layout import StateLayout
from .pool import BufferPool

__all__ = ["OffloadAdamW", "DirectIOWarning", "StateFiles", "StateLayout", "BufferPool"]

"""Offload: train when the optimizer state does not fit in memory.

:class:`OffloadAdamW` keeps AdamW's state (and optionally fp32 master weights) in files
on a local disk (or in pinned host memory next to an accelerator) and streams it through
a fixed pool of aligned buffers each step, with reads, the update and writes
overlapped (with ``overlap_backward=True`` also with the backward pass). Its results
equal ``torch.optim.AdamW`` bit for bit, and ``outlast.save`` and the ``Checkpointer``
write its state straight from the files. See ``docs/offload.md``.
"""

from .adamw import OffloadAdamW, StatePin
from .files import DirectIOWarning, StateFiles
from .layout import StateLayout
from .pool import BufferPool

__all__ = ["OffloadAdamW", "StatePin", "DirectIOWarning", "StateFiles", "StateLayout", "BufferPool"]

"""The memory tier: in-memory snapshots with cross-node redundancy (docs/memory.md).

``topology`` (pure placement and recovery planning), ``parity`` (XOR arithmetic),
``store`` (the files in shared memory) and ``tier`` (:class:`MemoryTier`, the collective
snapshot and restore a :class:`~outlast.Checkpointer` built with ``memory_every`` uses).
"""

from .store import clean_dead, list_jobs
from .tier import MemoryConfig, MemoryTier

__all__ = ["MemoryConfig", "MemoryTier", "clean_dead", "list_jobs"]

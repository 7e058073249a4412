"""The exceptions outlast raises.

Every error a user can cause or meet is a :class:`CheckpointError`; the subclasses say
what kind of trouble it is so scripts can react (retry, fall back to an older
checkpoint, fix their state). Messages name the checkpoint, the file and the tensor at
fault, and say what to do next.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CorruptCheckpointError",
    "UnsupportedFormatError",
    "IncompatibleStateError",
    "SerializationError",
    "CheckpointExistsError",
    "StorageError",
    "DistributedError",
]


class CheckpointError(Exception):
    """Base class of every outlast error."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist or holds no checkpoint."""


class IncompleteCheckpointError(CheckpointError):
    """A checkpoint directory without a committed manifest (a save that never finished)."""


class CorruptCheckpointError(CheckpointError):
    """Bytes on disk do not match what the manifest promises (checksum, size, header).

    ``problems`` lists every fault found, each a one-line string naming file and tensor.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class UnsupportedFormatError(CheckpointError):
    """The manifest is of a format or version this outlast does not read."""


class IncompatibleStateError(CheckpointError):
    """The live state does not match the checkpoint (shape, dtype, missing or extra keys)."""


class SerializationError(CheckpointError, TypeError):
    """A leaf of the state cannot be saved (not a tensor, not JSON, not Stateful)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """Saving onto a committed checkpoint without ``overwrite=True``."""


class StorageError(CheckpointError, OSError):
    """Writing or reading bytes failed (disk full, permission, I/O error)."""


class DistributedError(CheckpointError):
    """Ranks disagree or a collective timed out during a distributed save or load."""

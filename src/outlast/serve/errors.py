"""The exceptions :mod:`outlast.serve` raises.

They subclass :class:`outlast.errors.CheckpointError` so a script that already catches
outlast's errors keeps working; the HTTP layer maps :class:`BadRequestError` to a 400
and :class:`OverloadedError` to a 429 with ``Retry-After``.
"""

from __future__ import annotations

from ..errors import CheckpointError

__all__ = ["ServeError", "ModelLoadError", "StepNotFoundError", "BadRequestError", "OverloadedError",
           "AdminAuthError", "NoReplicaError"]


class ServeError(CheckpointError):
    """Base class of every serving error."""


class ModelLoadError(ServeError):
    """The weights, config or tokenizer could not be read or do not describe a supported model."""


class BadRequestError(ServeError, ValueError):
    """A request the engine cannot serve as asked (too long, bad sampling values, ...).

    ``param`` names the offending request field (OpenAI's error body carries it).
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class OverloadedError(ServeError):
    """The bounded request queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class StepNotFoundError(ModelLoadError):
    """A reload asked for a step the watched run directory has not committed."""


class AdminAuthError(ServeError):
    """An admin request without the right bearer token (HTTP 401), or admin is off (HTTP 403)."""

    def __init__(self, message: str, status: int = 401, code: str = "invalid_token"):
        super().__init__(message)
        self.status = status
        self.code = code


class NoReplicaError(ServeError):
    """The router has no healthy replica left to send a request to (HTTP 503)."""

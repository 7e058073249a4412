"""The replicator: a run's committed steps copied to a remote tier, and fetched back.

A :class:`~outlast.Checkpointer` with ``remote=`` hands every committed step to a
:class:`Replicator`. On the rank that uploads (rank 0) it queues the step on an
:class:`~outlast.storage.remote.Uploader` (its own thread, retries with backoff) and
applies the retention rule to the remote tier after each upload; on every rank it lists
the remote steps and, for a restore, fetches one into the local directory. The bytes on
the wire and the commit order on an object store (manifest last) are
:mod:`outlast.storage.remote`'s business; this module is only the policy around them.
"""

from __future__ import annotations

import logging
from typing import Callable

from .errors import CheckpointError
from .steps import Retention, step_dir_name, step_of
from .storage.remote import RemoteTier, Uploader

log = logging.getLogger("outlast")

__all__ = ["Replicator"]


class Replicator:
    """Copies of committed steps on ``tier``, with the run's retention rule applied there.

    Args:
        tier: the remote tier.
        retention: the rule applied after each successful upload.
        upload: start an upload thread (True on the one rank that uploads).
        retries: extra tries of a failed upload.
        backoff_s: seconds before the first retry; each further one waits twice as long.
        on_done: ``on_done(step, seconds, error)`` after every upload ends (on the upload thread).

    Example:
        >>> rep = Replicator(RemoteTier("memory://rep-demo"), Retention(keep_last=1))
        >>> rep.submit(100, "runs/exp1/step-00000100")
        >>> rep.flush(timeout=60); rep.close(timeout=60)
        >>> rep.scan()
        ([100], [])
    """

    def __init__(
        self,
        tier: RemoteTier,
        retention: Retention,
        *,
        upload: bool = True,
        retries: int = 3,
        backoff_s: float = 1.0,
        on_done: Callable[[int, float, BaseException | None], None] | None = None,
    ) -> None:
        self.tier = tier
        self.retention = retention
        self.uploader: Uploader | None = None
        if upload:
            self.uploader = Uploader(tier, retries=retries, backoff_s=backoff_s,
                                     after_each=self.apply_retention, on_done=on_done)

    @property
    def url(self) -> str:
        return self.tier.url

    # ------------------------------------------------------------------ uploading
    def submit(self, step: int, local_dir: str) -> None:
        """Queue ``local_dir`` (step ``step``, committed) for upload; returns at once."""
        if self.uploader is None:
            raise CheckpointError(f"this replicator to {self.url} does not upload (upload=False); "
                                  "only the rank that uploads submits steps")
        self.uploader.submit(step, local_dir)

    def pending_steps(self) -> set[int]:
        """Steps queued or being uploaded: their local folders must stay until then."""
        return self.uploader.pending_steps() if self.uploader is not None else set()

    def flush(self, timeout: float | None) -> None:
        """Block until every upload submitted so far has ended (CheckpointError on timeout)."""
        if self.uploader is not None:
            self.uploader.flush(timeout)

    def close(self, timeout: float | None) -> None:
        """Stop the upload thread (after the uploads already queued)."""
        if self.uploader is not None:
            self.uploader.close(timeout)

    # ------------------------------------------------------------------ listing and retention
    def present(self) -> list[int]:
        """Steps with a folder on the remote tier, valid or not."""
        return [s for s in map(step_of, self.tier.names()) if s is not None]

    def scan(self) -> tuple[list[int], list[int]]:
        """``(valid, invalid)`` remote steps (manifest present and well formed), oldest first."""
        valid, invalid = [], []
        for name in self.tier.names():
            s = step_of(name)
            if s is None:
                continue
            try:
                self.tier.manifest(name)
                valid.append(s)
            except CheckpointError:
                invalid.append(s)
        return sorted(valid), sorted(invalid)

    def apply_retention(self) -> None:
        """Delete the remote steps the retention rule dooms."""
        valid, invalid = self.scan()
        for s in self.retention.doomed(valid, invalid):
            self.tier.delete(step_dir_name(s))
            log.info("outlast: retention removed %s/%s", self.url, step_dir_name(s))

    # ------------------------------------------------------------------ restoring
    def fetch(self, step: int, local_dir: str) -> str:
        """Download step ``step`` into ``local_dir`` after checking its remote manifest;
        raises the tier's CheckpointError when it is missing or incomplete there."""
        name = step_dir_name(step)
        self.tier.manifest(name)
        log.info("outlast: downloading %s/%s to %s", self.url, name, local_dir)
        return self.tier.download(name, local_dir)

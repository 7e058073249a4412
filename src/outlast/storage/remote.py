"""A remote tier for committed checkpoints, on any fsspec filesystem.

The remote tier holds copies of local checkpoints under the same folder names
(``step-00001200``). Object stores have no atomic directory rename, so the commit point
is the order of the upload: every data file first, ``manifest.json`` last. A checkpoint
whose upload was cut short has no manifest and is never taken as valid; deleting one
removes the manifest first for the same reason, and so does uploading a step again (an
old manifest beside new data files would otherwise pass the size check).

:class:`Uploader` runs the uploads of a :class:`~outlast.Checkpointer` on a thread and
queue of their own, in order, retrying failures with exponential backoff, so training
never waits for the network. Downloads land in a hidden local
``.tmp-`` directory that is renamed into place only when complete.

Paths stay ``str`` (not ``pathlib.Path``): ``Path`` would turn ``s3://b/x`` into ``s3:/b/x``.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from typing import Callable

import fsspec

from ..errors import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError, StorageError
from ..format import DATA_DIR, MANIFEST_NAME, Manifest
from .commit import Transaction

log = logging.getLogger("outlast")

__all__ = ["RemoteTier", "STEP_DIR", "Uploader"]

STEP_DIR = re.compile(r"^step-(\d+)$")


class RemoteTier:
    """Copies of committed checkpoints at an fsspec URL (``file://``, ``memory://``, ``s3://``...).

    Example:
        >>> tier = RemoteTier("memory://exp1")
        >>> sent = tier.upload("runs/exp1/step-00000100")
        >>> tier.names()
        ['step-00000100']
    """

    def __init__(self, url: str, **storage_options) -> None:
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        except (ValueError, ImportError) as e:
            raise StorageError(f"cannot open remote tier {url!r}: {e}. Check the URL and that its fsspec backend is installed") from e
        self.root = self.root.rstrip("/")

    def _p(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _err(self, what: str, e: Exception) -> StorageError:
        return StorageError(f"remote tier {self.url}: {what} failed: {e}")

    def upload(self, local_dir: str) -> int:
        """Copy a committed local checkpoint; the manifest goes last. Returns bytes sent.

        A copy already on the tier under the same name is deleted first, its manifest
        before anything else, so an upload cut short never leaves the old manifest
        vouching for a mix of old and new files."""
        name = os.path.basename(os.path.normpath(local_dir))
        sent = 0
        self.delete(name)
        try:
            self.fs.makedirs(self._p(name, DATA_DIR), exist_ok=True)
            data = os.path.join(local_dir, DATA_DIR)
            for f in sorted(os.listdir(data)):
                src = os.path.join(data, f)
                self.fs.put_file(src, self._p(name, DATA_DIR, f))
                sent += os.path.getsize(src)
            # The commit point: only now is the remote copy valid.
            self.fs.put_file(os.path.join(local_dir, MANIFEST_NAME), self._p(name, MANIFEST_NAME))
            sent += os.path.getsize(os.path.join(local_dir, MANIFEST_NAME))
        except OSError as e:
            raise self._err(f"uploading {local_dir}", e) from e
        return sent

    def names(self) -> list[str]:
        """Every ``step-N`` folder on the tier, valid or not."""
        try:
            if not self.fs.exists(self.root):
                return []
            entries = self.fs.ls(self.root, detail=False)
        except OSError as e:
            raise self._err("listing", e) from e
        out = []
        for e in entries:
            n = e.rstrip("/").rsplit("/", 1)[-1]
            if STEP_DIR.match(n):
                out.append(n)
        return out

    def manifest(self, name: str) -> Manifest:
        """The manifest of ``name``, checked against the files present (names and sizes).

        Raises IncompleteCheckpointError (no manifest) or CorruptCheckpointError.
        """
        mpath = self._p(name, MANIFEST_NAME)
        where = f"{self.url}/{name}/{MANIFEST_NAME}"
        try:
            if not self.fs.exists(mpath):
                raise IncompleteCheckpointError(f"{self.url}/{name} has no {MANIFEST_NAME}: its upload never finished")
            data = self.fs.cat_file(mpath)
        except OSError as e:
            raise self._err(f"reading {where}", e) from e
        m = Manifest.loads(data, where)
        for rel, size in m.files.items():
            try:
                info = self.fs.info(self._p(name, rel))
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{self.url}/{name}/{rel} is missing") from None
            if info.get("size") != size:
                raise CorruptCheckpointError(
                    f"{self.url}/{name}/{rel} has {info.get('size')} bytes, the manifest says {size}"
                )
        return m

    def download(self, name: str, local_dir: str) -> str:
        """Fetch ``name`` into ``local_dir`` atomically (hidden temp dir, then rename)."""
        # The same transaction as a save: files fsync'd, manifest last, atomic publish.
        tx = Transaction(local_dir, overwrite=True)
        with tx:
            try:
                for f in self.fs.ls(self._p(name, DATA_DIR), detail=False):
                    base = f.rstrip("/").rsplit("/", 1)[-1]
                    self.fs.get_file(self._p(name, DATA_DIR, base), os.path.join(tx.tmp, DATA_DIR, base))
                tx.commit(self.fs.cat_file(self._p(name, MANIFEST_NAME)))
            except OSError as e:
                raise self._err(f"downloading {name}", e) from e
        return local_dir

    def delete(self, name: str) -> None:
        """Remove ``name``; the manifest first, so a half-deleted copy is never valid."""
        try:
            mpath = self._p(name, MANIFEST_NAME)
            if self.fs.exists(mpath):
                self.fs.rm_file(mpath)
            if self.fs.exists(self._p(name)):
                self.fs.rm(self._p(name), recursive=True)
        except OSError as e:
            raise self._err(f"deleting {name}", e) from e


class Uploader:
    """Uploads to a :class:`RemoteTier` on a thread of their own, one at a time, in order.

    Each upload is tried ``1 + retries`` times, sleeping ``backoff_s``, then twice that,
    and so on between tries (an object store's throttling or a network blip usually
    passes). ``after_each()`` runs after each successful upload (remote retention);
    ``on_done(step, seconds, error)`` reports every upload's end, ``error`` None or the
    last failure. NOT thread-safe beyond that contract: one thread submits and flushes.

    Example:
        >>> up = Uploader(RemoteTier("memory://exp1"), retries=3, backoff_s=1.0)
        >>> up.submit(100, "runs/exp1/step-00000100")
        >>> up.flush(timeout=600)
        >>> up.close(timeout=60)
    """

    def __init__(
        self,
        tier: RemoteTier,
        *,
        retries: int = 3,
        backoff_s: float = 1.0,
        after_each: Callable[[], None] | None = None,
        on_done: Callable[[int, float, BaseException | None], None] | None = None,
    ) -> None:
        self.tier = tier
        self.retries = retries
        self.backoff_s = backoff_s
        self.after_each = after_each
        self.on_done = on_done
        self.attempts = 0  # tries made so far, all uploads together
        self._q: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._pending: list[int] = []  # steps queued or being uploaded (a step may be there twice)
        self._thread = threading.Thread(target=self._loop, name="outlast-upload", daemon=True)
        self._thread.start()

    def submit(self, step: int, local_dir: str) -> None:
        with self._cond:
            self._pending.append(step)
        self._q.put((step, local_dir))

    def pending_steps(self) -> set[int]:
        """Steps queued or being uploaded (local retention must keep their folders)."""
        with self._cond:
            return set(self._pending)

    def flush(self, timeout: float | None) -> None:
        """Block until every upload submitted so far has ended; CheckpointError on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._pending, timeout):
                raise CheckpointError(
                    f"timed out after {timeout:g} s waiting for uploads of step(s) {sorted(self._pending)} "
                    f"to {self.tier.url}; the remote is unreachable or slow. The local checkpoints are "
                    "committed; raise the Checkpointer's timeout= or check the remote"
                )

    def close(self, timeout: float | None) -> None:
        self._q.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise CheckpointError(
                f"timed out after {timeout:g} s waiting for the upload thread to {self.tier.url} to stop"
            )

    def _upload(self, step: int, local_dir: str) -> None:
        for attempt in range(self.retries + 1):
            self.attempts += 1
            try:
                self.tier.upload(local_dir)
                return
            except Exception as e:  # noqa: BLE001 - retried, then reported
                if attempt == self.retries:
                    raise StorageError(
                        f"uploading {local_dir} to {self.tier.url} failed {attempt + 1} time(s), the last "
                        f"with: {e}. The local checkpoint is committed and intact; check the remote's "
                        "credentials, space and network"
                    ) from e
                delay = self.backoff_s * (2 ** attempt)
                log.warning("outlast: upload of step %d to %s failed (%s); retrying in %.1f s", step, self.tier.url, e, delay)
                time.sleep(delay)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            step, local_dir = item
            t0 = time.perf_counter()
            err: BaseException | None = None
            try:
                self._upload(step, local_dir)
                if self.after_each is not None:
                    self.after_each()
            except BaseException as e:  # noqa: BLE001 - handed back through on_done
                err = e
            try:
                if self.on_done is not None:
                    self.on_done(step, time.perf_counter() - t0, err)
            finally:
                with self._cond:
                    self._pending.remove(step)
                    self._cond.notify_all()

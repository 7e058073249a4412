"""A remote tier for committed checkpoints, on any fsspec filesystem.

The remote tier holds copies of local checkpoints under the same folder names
(``step-00001200``). Object stores have no atomic directory rename, so the commit point
is the order of the upload: every data file first, ``manifest.json`` last. A checkpoint
whose upload was cut short has no manifest and is never taken as valid; deleting one
removes the manifest first for the same reason. Downloads land in a hidden local
``.tmp-`` directory that is renamed into place only when complete.

Paths stay ``str`` (not ``pathlib.Path``): ``Path`` would turn ``s3://b/x`` into ``s3:/b/x``.
"""

from __future__ import annotations

import os
import re

import fsspec

from ..errors import CorruptCheckpointError, IncompleteCheckpointError, StorageError
from ..format import DATA_DIR, MANIFEST_NAME, Manifest
from .commit import Transaction

__all__ = ["RemoteTier", "STEP_DIR"]

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
        """Copy a committed local checkpoint; the manifest goes last. Returns bytes sent."""
        name = os.path.basename(os.path.normpath(local_dir))
        sent = 0
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

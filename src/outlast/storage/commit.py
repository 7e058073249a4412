"""The one commit transaction every outlast writer uses: stage, make durable, publish.

A :class:`Transaction` owns a hidden staging directory ``.<name>.tmp-<token>`` beside the
destination. Writers put their files in it; :meth:`Transaction.commit` then

1. fsyncs every file under it (cheap for files already synced by their writer) and
   writes and fsyncs ``manifest.json`` last, if given;
2. fsyncs every directory under it, bottom-up, so the entries are durable;
3. publishes it: ``rename`` onto a free name, else ``renameat2(RENAME_EXCHANGE)`` with
   the old checkpoint (one atomic step), else, where the filesystem has no exchange
   (NFS, some FUSE mounts), two renames: the old checkpoint aside to
   ``.<name>.old-<token>``, then the new one into place;
4. fsyncs the parent directory (and, when the staging directory's parents had to be
   created, each new parent's own parent, so the path itself survives a power cut).

A crash between the two renames of step 3 leaves no directory at the final name but a
complete old checkpoint under ``.<name>.old-<token>``: :func:`recover` (called by every
open of a missing checkpoint and by the Checkpointer's scan) renames it back. Nothing
here knows about tensors or manifests beyond their bytes: save, the collective save's
rank 0, the streaming writer, convert/merge outputs and remote downloads all commit
through this one path, so their fsync coverage cannot drift apart.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil

from ..errors import CheckpointExistsError, StorageError

__all__ = ["Transaction", "recover", "is_temp_name", "fsync_dir", "makedirs_durable"]

MANIFEST_NAME = "manifest.json"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def is_temp_name(name: str) -> bool:
    """A staging directory (``.x.tmp-…``) of a commit that has not happened (never loaded)."""
    return name.startswith(".") and ".tmp-" in name


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, fsyncing the parent of every directory it creates."""
    path = os.path.abspath(path)
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            continue
        fsync_dir(os.path.dirname(d))


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2). False if the platform or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), a)


def recover(final: str) -> bool:
    """Finish what a crash between the two renames of a commit left behind.

    If ``final`` is missing and a complete ``.<name>.old-<token>`` sibling (one with a
    manifest) exists, the old checkpoint is renamed back to ``final``. Returns True if it
    did. The interrupted new copy stays under its ``.tmp-`` name (incomplete, never
    loaded; the Checkpointer removes such leftovers).
    """
    final = os.path.abspath(final)
    if os.path.lexists(final):
        return False
    parent, name = os.path.split(final)
    try:
        entries = os.listdir(parent)
    except OSError:
        return False
    # A commit removes the manifest of every stale moved-aside copy before it moves the
    # current one aside, so at most one has a manifest; the newest manifest wins regardless.
    olds = []
    for e in entries:
        if e.startswith(f".{name}.old-"):
            try:
                olds.append((os.stat(os.path.join(parent, e, MANIFEST_NAME)).st_mtime_ns, e))
            except OSError:
                continue
    if not olds:
        return False
    try:
        os.rename(os.path.join(parent, max(olds)[1]), final)
        fsync_dir(parent)
    except OSError:
        return False
    return True


def _retire(path: str) -> None:
    """Delete a moved-aside copy so that no crash midway leaves it loadable: manifest first."""
    try:
        os.unlink(os.path.join(path, MANIFEST_NAME))
        fsync_dir(path)
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


class Transaction:
    """Stage a checkpoint (or any output directory) and publish it atomically at ``final``.

    Example:
        >>> with Transaction("ckpt/step-10") as tx:
        ...     write_files(tx.tmp)
        ...     tx.commit(manifest_bytes)

    Leaving the ``with`` block by an exception before :meth:`commit` removes the staging
    directory; ``final`` is untouched.
    """

    def __init__(self, final: str | os.PathLike, *, overwrite: bool = False, tmp: str | None = None):
        self.final = os.path.abspath(os.fspath(final))
        self.overwrite = overwrite
        self.committed = False
        if tmp is not None:  # adopt a staging directory another rank created
            self.tmp = tmp
            return
        parent, name = os.path.split(self.final)
        try:
            makedirs_durable(parent)
            self.tmp = os.path.join(parent, f".{name}.tmp-{secrets.token_hex(4)}")
            os.mkdir(self.tmp)
            os.mkdir(os.path.join(self.tmp, "data"))
        except OSError as e:
            raise StorageError(f"creating a staging directory for {self.final} failed: {e.strerror}") from e

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def abort(self) -> None:
        """Remove the staging directory; ``final`` is left as it was."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self, manifest: bytes | None = None) -> None:
        """Make everything staged durable, write ``manifest`` last, and publish at ``final``."""
        try:
            self._sync_tree(manifest)
            self._publish()
        except OSError as e:
            if isinstance(e, (StorageError, CheckpointExistsError)):
                raise
            raise StorageError(f"committing {self.final} failed: {e.strerror or e}") from e
        self.committed = True

    def _sync_tree(self, manifest: bytes | None) -> None:
        dirs = []
        for dirpath, _, files in os.walk(self.tmp):
            dirs.append(dirpath)
            for f in files:
                _fsync_file(os.path.join(dirpath, f))
        if manifest is not None:
            p = os.path.join(self.tmp, MANIFEST_NAME)
            with open(p, "wb") as f:
                f.write(manifest)
                f.flush()
                os.fsync(f.fileno())
        for d in sorted(dirs, key=len, reverse=True):
            fsync_dir(d)

    def _publish(self) -> None:
        parent = os.path.dirname(self.final)
        if not os.path.lexists(self.final):
            os.rename(self.tmp, self.final)
            fsync_dir(parent)
            return
        if not self.overwrite:
            raise CheckpointExistsError(f"{self.final} already exists; pass overwrite=True to replace it")
        if _exchange(self.tmp, self.final):
            fsync_dir(parent)
            shutil.rmtree(self.tmp, ignore_errors=True)  # tmp now holds the old checkpoint
            return
        # No atomic exchange on this filesystem: move the old one aside first. A crash in
        # between leaves the old checkpoint complete under .old- (recover() renames it back)
        # and the new one complete under .tmp-.
        name = os.path.basename(self.final)
        for e in os.listdir(parent):  # stale copies from an earlier cut commit: never recover those
            if e.startswith(f".{name}.old-"):
                _retire(os.path.join(parent, e))
        old = os.path.join(parent, f".{name}.old-{secrets.token_hex(4)}")
        os.rename(self.final, old)
        fsync_dir(parent)
        os.rename(self.tmp, self.final)
        fsync_dir(parent)
        _retire(old)

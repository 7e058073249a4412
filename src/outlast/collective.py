"""The few torch.distributed operations outlast uses, with errors every rank sees.

A distributed save or load must never leave some ranks raising while others wait in a
collective. The rule here: a step that can fail on one rank (reading the manifest,
validating the state, writing a file) is followed by :func:`Group.raise_together`, an
``all_gather_object`` of each rank's outcome; every rank then raises the *same* outlast
error class — the class of the first failing rank's error (an ``OSError`` counts as
:class:`~outlast.errors.StorageError`, anything else that is not an outlast error as
:class:`~outlast.errors.DistributedError`) — naming the failing rank and its message, with
the rank's own exception chained as ``__cause__`` where it had one. A script can then
``except StorageError`` once and see the same thing on every rank. Metadata travels with object collectives (they pickle, but only between
the job's own processes; the checkpoint format itself stays pickle-free); tensor bytes
travel with ``isend``/``irecv``. Every collective runs under the process group's
timeout (``init_process_group(timeout=...)``), and a collective that fails or times out
is raised as :class:`~outlast.errors.DistributedError`.
"""

from __future__ import annotations

import builtins
import datetime
from dataclasses import dataclass
from typing import Any

from . import errors
from .errors import CheckpointError, DistributedError, StorageError

__all__ = ["Group", "group_of", "raise_gathered", "outlast_class", "group_timeout"]


@dataclass
class Group:
    """A process group with this process's rank and the group's size."""

    pg: Any
    rank: int
    size: int

    def _global(self, r: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.pg, r) if self.pg is not dist.group.WORLD else r

    def all_gather(self, obj: Any, what: str) -> list:
        """Every rank's ``obj``, in rank order (identical on every rank)."""
        import torch.distributed as dist

        out: list = [None] * self.size
        try:
            dist.all_gather_object(out, obj, group=self.pg)
        except Exception as e:  # noqa: BLE001 - any collective failure becomes one error
            raise DistributedError(
                f"{what}: exchanging metadata failed on rank {self.rank} ({type(e).__name__}: {e}). "
                "Another rank probably failed, exited or timed out; see its error."
            ) from e
        return out

    def broadcast(self, obj: Any, what: str, src: int = 0) -> Any:
        import torch.distributed as dist

        box = [obj]
        try:
            dist.broadcast_object_list(box, src=self._global(src), group=self.pg)
        except Exception as e:  # noqa: BLE001
            raise DistributedError(
                f"{what}: broadcast from rank {src} failed on rank {self.rank} ({type(e).__name__}: {e}). "
                "Another rank probably failed, exited or timed out; see its error."
            ) from e
        return box[0]

    def raise_together(self, local: BaseException | None, what: str) -> None:
        """Raise on every rank if ``local`` is an error on any rank; else return."""
        mine = None if local is None else (type(local).__name__, str(local))
        raise_gathered(local, self.all_gather(mine, what), what)

    def isend(self, tensor, dst: int, tag: int):
        import torch.distributed as dist

        return dist.isend(tensor, dst=self._global(dst), group=self.pg, tag=tag)

    def irecv(self, tensor, src: int, tag: int):
        import torch.distributed as dist

        return dist.irecv(tensor, src=self._global(src), group=self.pg, tag=tag)


def group_of(process_group: Any = None) -> Group | None:
    """The group to run collectively on, or None for a one-process save/load."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        dist = None
    if dist is None or not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise DistributedError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (or drop process_group)"
            )
        return None
    pg = process_group if process_group is not None else dist.group.WORLD
    return Group(pg, dist.get_rank(pg), dist.get_world_size(pg))


def outlast_class(name: str) -> type[CheckpointError]:
    """The outlast error class every rank raises for an error of class ``name``.

    An outlast class stays itself; a built-in ``OSError`` (or subclass: disk full,
    permission denied) becomes :class:`StorageError`; anything else (a ``TypeError``
    from a user's ``state_dict()``, a ``RuntimeError`` from torch) :class:`DistributedError`.
    """
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, CheckpointError):
        return cls
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, OSError):
        return StorageError
    return DistributedError


def raise_gathered(local: BaseException | None, outcomes: list, what: str) -> None:
    """Given every rank's outcome (None, or (error class name, message)), raise if any failed.

    Every rank raises the same outlast class, :func:`outlast_class` of the first failing
    rank's error, naming that rank and its message. A rank whose own error is already
    of that class re-raises it unchanged (its traceback intact); a rank with another
    error raises the common class from its own (``__cause__``), so the local detail is
    never lost.
    """
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    r, (name, msg) = failed[0]
    cls = outlast_class(name)
    if local is not None and type(local) is cls:
        raise local
    detail = msg if cls.__name__ == name else f"{name}: {msg}"
    more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    raise cls(f"{what} failed on rank {r}{more}: {detail}") from local


def group_timeout(pg: Any = None) -> datetime.timedelta | None:
    """The timeout of ``pg`` (default: the world group), as given to ``init_process_group``.

    Groups made with ``new_group()`` do not inherit it (torch gives them its 30-minute
    default), so outlast passes it on to the groups it creates; None where the backend
    does not say.
    """
    import torch
    import torch.distributed as dist

    pg = pg if pg is not None else dist.group.WORLD
    for dev in ("cpu", "cuda"):
        try:
            t = pg._get_backend(torch.device(dev)).options._timeout
        except Exception:  # noqa: BLE001 - private API, absent backends: fall back to torch's default
            continue
        if isinstance(t, datetime.timedelta):
            return t
    return None

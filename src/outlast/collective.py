"""The few torch.distributed operations outlast uses, with errors every rank sees.

A distributed save or load must never leave some ranks raising while others wait in a
collective. The rule here: a step that can fail on one rank (reading the manifest,
validating the state, writing a file) is followed by :func:`Group.raise_together`, an
``all_gather_object`` of each rank's outcome; every rank then raises — the failing rank
its own exception, the others the same outlast error class naming the failing rank and
its message. Metadata travels with object collectives (they pickle, but only between
the job's own processes; the checkpoint format itself stays pickle-free); tensor bytes
travel with ``isend``/``irecv``. Every collective runs under the process group's
timeout (``init_process_group(timeout=...)``), and a collective that fails or times out
is raised as :class:`~outlast.errors.DistributedError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import errors
from .errors import CheckpointError, DistributedError

__all__ = ["Group", "group_of"]


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


def raise_gathered(local: BaseException | None, outcomes: list, what: str) -> None:
    """Given every rank's outcome (None, or (error class name, message)), raise if any failed.

    The failing rank re-raises its own exception; the others raise the same outlast error
    class (DistributedError for anything else) naming the first failing rank and its cause.
    """
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    if local is not None:
        raise local
    r, (name, msg) = failed[0]
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, CheckpointError)):
        cls = DistributedError
    more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    raise cls(f"{what} failed on rank {r}{more}: {msg}")

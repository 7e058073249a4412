"""The host-memory tier: offloaded state in (pinned) host memory instead of files.

On a machine with an accelerator this is the ZeRO-Offload shape: parameters and
gradients on the device, fp32 master weights and AdamW state in page-locked host memory,
the update on the CPU. It has the interface of :class:`~outlast.offload.files.StateFiles`
so the same pipeline drives it; reads and writes are memory copies, and there is one
generation (host memory does not fill up half way through a step).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layout import StateLayout

__all__ = ["HostState"]


class HostState:
    """State kinds as flat fp32 host tensors (pinned when CUDA is available).

    Args:
        layout: the :class:`StateLayout` of the parameters.
        kinds: the state kinds.
        pin: page-locked memory; default: when CUDA is available.

    Example:
        >>> from outlast.offload.layout import StateLayout
        >>> hs = HostState(StateLayout.build([5], 1024), ("exp_avg",), pin=False)
        >>> hs.mapped("exp_avg", 0).shape
        torch.Size([1024])
    """

    direct = False
    directory = "<host memory>"

    def __init__(self, layout: StateLayout, kinds: Sequence[str], *, pin: bool | None = None):
        self.layout = layout
        self.kinds = tuple(kinds)
        pin = torch.cuda.is_available() if pin is None else pin
        self._t = {k: torch.zeros(layout.total, dtype=torch.float32, pin_memory=pin) for k in self.kinds}
        self.generation = 0
        self.steps = [0] * len(layout.numels)

    @property
    def nbytes(self) -> int:
        return len(self.kinds) * self.layout.nbytes

    def path(self, kind: str, generation: int) -> str:
        return f"<host memory: {kind}>"

    def read(self, kind: str, generation: int, start: int, buf: torch.Tensor) -> None:
        n = buf.numel() // 4
        buf.view(torch.float32).copy_(self._t[kind][start : start + n])

    def write(self, kind: str, generation: int, start: int, buf: torch.Tensor) -> None:
        n = buf.numel() // 4
        self._t[kind][start : start + n].copy_(buf.view(torch.float32))

    def flush(self, generation: int) -> None:
        pass

    def commit(self, generation: int, steps: Sequence[int]) -> None:
        self.steps = list(steps)

    def next_generation(self) -> int:
        return 0

    def mapped(self, kind: str, generation: int) -> torch.Tensor:
        return self._t[kind]

    def release(self, kind: str, generation: int) -> None:
        """Nothing to drop: the disk tier frees a file's mapping and page cache here, host memory
        is the state itself."""

    def close(self) -> None:
        self._t = {}

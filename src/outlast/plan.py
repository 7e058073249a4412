"""Save plans: which writer writes which region (pure: no I/O, no torch.distributed).

Balancing is the longest-processing-time rule: regions sorted by size, largest first,
each to the writer with the fewest bytes so far. It is within 4/3 of optimal and, for
the many-regions case of model state, close to perfect balance.
"""

from __future__ import annotations

import heapq
from typing import Sequence


def balance(sizes: Sequence[int], n_writers: int) -> list[int]:
    """Assign item ``i`` (of ``sizes[i]`` bytes) to a writer in ``range(n_writers)``.

    Deterministic: ties go to the lower writer index, equal sizes keep input order.

    Example:
        >>> balance([10, 7, 5, 4], 2)
        [0, 1, 1, 0]
    """
    if n_writers < 1:
        raise ValueError("n_writers must be >= 1")
    heap = [(0, w) for w in range(n_writers)]
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, w = heapq.heappop(heap)
        out[i] = w
        heapq.heappush(heap, (load + sizes[i], w))
    return out

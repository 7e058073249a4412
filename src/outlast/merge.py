"""Checkpoint averaging: uniform, weighted, latest-k (LAWA) and EMA, one tensor at a time.

Averaging the weights of several checkpoints of one run (model soups, LAWA, an EMA over
saved checkpoints) improves generalisation for free. The merge opens every source with a
:class:`~outlast.reader.CheckpointReader`, and for each tensor reads it from each source
into one reused buffer, adds it with its weight into a float32 accumulator (float64 for
float64 tensors), casts back to the stored dtype and streams the result into a
:class:`~outlast.writer.CheckpointWriter`. Peak memory is about three times the largest
tensor, whatever the number and size of the checkpoints. Tensors that are not floating
point (step counters, token ids, masks) and plain values are copied from the newest
source: averaging them has no meaning.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch

from . import dtypes
from .errors import IncompatibleStateError
from .reader import CheckpointReader, ReadRequest
from .regions import Box
from .writer import DEFAULT_MAX_FILE_BYTES, CheckpointWriter, TensorSpec

__all__ = ["merge_checkpoints", "merge_weights", "METHODS"]

METHODS = ("mean", "weighted", "lawa", "ema")

_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def merge_weights(
    n: int,
    method: str,
    *,
    weights: Sequence[float] | None = None,
    decay: float | None = None,
    last_k: int | None = None,
) -> list[float]:
    """The weight of each of ``n`` sources, given oldest first, for ``method``. Sums to 1.

    ``lawa``: ``1/k`` for the last ``k`` sources, 0 before. ``ema``: the exponential
    moving average ``e = x0; e = decay*e + (1-decay)*x_i`` written out as weights
    (``decay**(n-1)`` for the oldest, ``(1-decay)*decay**(n-1-i)`` for source ``i>0``).

    Example:
        >>> merge_weights(3, "ema", decay=0.5)
        [0.25, 0.25, 0.5]
    """
    if n < 1:
        raise ValueError("merge needs at least one source checkpoint")
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if weights is not None and method != "weighted":
        raise ValueError(f"weights are only used by method='weighted', not {method!r}")
    if decay is not None and method != "ema":
        raise ValueError(f"decay is only used by method='ema', not {method!r}")
    if last_k is not None and method != "lawa":
        raise ValueError(f"last_k is only used by method='lawa', not {method!r}")
    if method == "mean":
        return [1.0 / n] * n
    if method == "weighted":
        if weights is None or len(weights) != n:
            raise ValueError(f"method='weighted' needs one weight per source: {n} source(s), got {weights!r}")
        w = [float(x) for x in weights]
        if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights!r}")
        total = sum(w)
        return [x / total for x in w]
    if method == "lawa":
        k = n if last_k is None else int(last_k)
        if not 1 <= k <= n:
            raise ValueError(f"last_k must be between 1 and the number of sources ({n}), got {last_k}")
        return [0.0] * (n - k) + [1.0 / k] * k
    if decay is None or not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"method='ema' needs decay in [0, 1), got {decay!r}")
    d = float(decay)
    return [d ** (n - 1)] + [(1 - d) * d ** (n - 1 - i) for i in range(1, n)]


def _check_agree(readers: list[CheckpointReader], ref: CheckpointReader) -> None:
    want = ref.manifest.tensors
    for r in readers:
        if r is ref:
            continue
        have = r.manifest.tensors
        for fqn, e in want.items():
            o = have.get(fqn)
            if o is None:
                raise IncompatibleStateError(
                    f"cannot merge: tensor {fqn!r} is in {ref.path} but not in {r.path}"
                )
            if tuple(o.shape) != tuple(e.shape) or o.dtype != e.dtype:
                raise IncompatibleStateError(
                    f"cannot merge: tensor {fqn!r} is {e.dtype} {list(e.shape)} in {ref.path} but "
                    f"{o.dtype} {list(o.shape)} in {r.path}; merge checkpoints of the same model"
                )
        extra = [k for k in have if k not in want]
        if extra:
            raise IncompatibleStateError(
                f"cannot merge: tensor {extra[0]!r} is in {r.path} but not in {ref.path}"
            )


class _Workspace:
    """Byte buffers reused across tensors, so memory does not grow with their number."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n:
            self._bufs.pop(name, None)
            del buf
            buf = torch.empty(max(n, 1), dtype=torch.uint8)
            self._bufs[name] = buf
        return buf[:n].view(dtype).view(shape)


def merge_checkpoints(
    srcs: Sequence[str | os.PathLike],
    dst: str | os.PathLike,
    *,
    method: str = "mean",
    weights: Sequence[float] | None = None,
    decay: float | None = None,
    last_k: int | None = None,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool | None = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
):
    """Average outlast checkpoints into a new one, streaming tensor by tensor.

    Floating-point tensors are averaged (accumulated in float32, or float64 for float64
    tensors, then cast back to their dtype). Tensors of other dtypes (ints, bools) and
    all plain values (step, config, data position) are taken from the newest source.
    Sources are ordered by their manifest ``step`` (oldest first); if any has no step,
    the given order is used and the last one counts as newest.

    Args:
        srcs: checkpoint directories of the same model (same names, shapes, dtypes).
        dst: the checkpoint directory to create.
        method: ``"mean"`` (uniform), ``"weighted"`` (``weights``, normalised),
            ``"lawa"`` (uniform mean of the ``last_k`` newest), ``"ema"`` (exponential
            moving average over the sources in step order with ``decay``).
        weights: one per source, in the order of ``srcs`` (method ``"weighted"``).
        decay: EMA decay in [0, 1) (method ``"ema"``): ``e = decay*e + (1-decay)*x``.
        last_k: how many of the newest sources LAWA averages (default all).
        overwrite: replace a committed checkpoint at ``dst``.
        verify: check the checksum of every chunk read.
        progress: show a progress bar on stderr (None: only on a terminal).
        max_file_bytes: bytes per output data file.

    Returns:
        The committed :class:`~outlast.format.Manifest` (its ``extra["merged_from"]``
        records sources, steps and weights).

    Raises:
        IncompatibleStateError: the sources disagree on a tensor's name, shape or dtype
            (the message names the tensor and both checkpoints).

    Example:
        >>> outlast.merge_checkpoints(["ckpt/step-800", "ckpt/step-900", "ckpt/step-1000"],
        ...                           "ckpt/lawa-1000", method="lawa", last_k=3)
    """
    from .convert.core import progress_bar

    paths = [os.fspath(p) for p in srcs]
    dst = os.fspath(dst)
    if not paths:
        raise ValueError("merge needs at least one source checkpoint")
    if any(os.path.abspath(p) == os.path.abspath(dst) for p in paths):
        raise ValueError(f"the destination {dst} is also a source; write the merge elsewhere")
    readers: list[CheckpointReader] = []
    try:
        for p in paths:
            readers.append(CheckpointReader(p))
        given_w = list(weights) if weights is not None else None
        order = list(range(len(readers)))
        if all(r.manifest.step is not None for r in readers):
            order.sort(key=lambda i: readers[i].manifest.step)
        w = merge_weights(
            len(order), method,
            weights=[given_w[i] for i in order] if given_w is not None and len(given_w) == len(order) else given_w,
            decay=decay, last_k=last_k,
        )
        used = [(readers[i], wi) for i, wi in zip(order, w) if not (method == "lawa" and wi == 0.0)]
        newest = readers[order[-1]]
        _check_agree([r for r, _ in used], newest)
        m = newest.manifest
        specs = [TensorSpec(fqn, e.dtype, tuple(e.shape), tuple(e.path)) for fqn, e in m.tensors.items()]
        extra = {"merged_from": {
            "method": method,
            "sources": [os.path.abspath(r.path) for r, _ in used],
            "steps": [r.manifest.step for r, _ in used],
            "weights": [wi for _, wi in used],
            **({"decay": decay} if decay is not None else {}),
        }}
        total = sum(s.nbytes * (len(used) if s.dtype in _FLOAT else 1) for s in specs)
        bar = progress_bar(total, f"merge ({method})", progress)
        ws = _Workspace()
        try:
            with CheckpointWriter(dst, specs, step=m.step, overwrite=overwrite, plain=m.plain,
                                  max_file_bytes=max_file_bytes, extra=extra) as out:
                for s in specs:
                    dtype = dtypes.from_safetensors(s.dtype)
                    buf = ws.get("read", s.shape, dtype)
                    box = Box.full(s.shape)
                    if s.dtype not in _FLOAT:
                        newest.read_regions([ReadRequest(s.fqn, box, buf)], verify=verify)
                        out.write(s.fqn, buf)
                        bar.update(s.nbytes)
                        continue
                    acc = ws.get("acc", s.shape, torch.float64 if s.dtype == "F64" else torch.float32)
                    acc.zero_()
                    for r, wi in used:
                        r.read_regions([ReadRequest(s.fqn, box, buf)], verify=verify)
                        acc.add_(buf, alpha=wi)
                        bar.update(s.nbytes)
                    if acc.dtype == dtype:
                        out.write(s.fqn, acc)
                    else:
                        res = ws.get("out", s.shape, dtype)
                        res.copy_(acc)
                        out.write(s.fqn, res)
            return out.committed
        finally:
            bar.close()
    finally:
        for r in readers:
            r.close()


def __getattr__(name: str) -> Any:
    # ``from outlast.merge import merge``: the name before 0.2 (see outlast._deprecated).
    if name == "merge":
        from ._deprecated import warn

        warn("outlast.merge.merge", "outlast.merge_checkpoints")
        return merge_checkpoints
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from ._deprecated import make_module_callable  # noqa: E402

make_module_callable(__name__, merge_checkpoints, "outlast.merge(...)", "outlast.merge_checkpoints(...)")

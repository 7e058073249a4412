"""AdamW whose state lives off the process's memory: in files on local disk or in host memory.

:class:`OffloadAdamW` is a ``torch.optim.Optimizer`` (param groups, LR schedulers, step
hooks, ``state_dict``/``load_state_dict`` in torch's own format) whose ``exp_avg`` and
``exp_avg_sq`` (and optionally fp32 master weights and amsgrad's maximum) are kept in
state files (:mod:`outlast.offload.files`) and streamed through a fixed buffer pool
(:mod:`outlast.offload.pool`) by the three-stage pipeline (:mod:`outlast.offload.stream`).

The update is torch's single-tensor AdamW (the path ``torch.optim.AdamW`` takes for CPU
tensors) applied op for op to each chunk's piece of each parameter. The ops are
elementwise, so the result is bit for bit that of ``torch.optim.AdamW`` (the tests
check it over many steps, odd sizes, several groups, weight decay, amsgrad, maximize).

``state_dict()`` returns the state as tensors memory-mapped from the current
generation's files: ``outlast.save`` writes them straight from the page cache, with no
copy of the whole state in the process's memory, and ``outlast.load`` writes restored
state straight into the files. A state dict from ``torch.optim.AdamW`` loads here and
this one loads there, so a run can move in and out of offload at any checkpoint.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import Any, Callable, Iterable

import torch
import torch.optim.optimizer as _torch_optimizer

from ..errors import IncompatibleStateError, StorageError
from .files import StateFiles
from .host import HostState
from .layout import ALIGN_ELEMS, ITEMSIZE, StateLayout
from .pool import BufferPool
from .overlap import ChunkStream
from .stream import run_pipeline

__all__ = ["OffloadAdamW", "synchronize_pending"]

# Optimizers with a step that overlap_forward left running (their parameters are partly
# updated until the next forward or synchronize()): outlast.save/load settle them first.
_PENDING: "weakref.WeakSet[OffloadAdamW]" = weakref.WeakSet()


def synchronize_pending() -> None:
    """Finish every step that ``overlap_forward`` left running in this process.

    ``outlast.save``, the ``Checkpointer`` and ``outlast.load`` call it before they read
    or write any tensor, so a checkpoint never holds half-updated parameters, even when
    the optimizer is not part of the saved state.
    """
    for opt in list(_PENDING):
        opt.synchronize()

DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_POOL_SETS = 4  # one more than read+update+write: the reader runs a chunk ahead over jitter
# torch's own hyperparameter keys, kept in param_groups so a state dict saved here loads
# into torch.optim.AdamW (whose step reads them) and back.
_TORCH_KEYS = dict(foreach=None, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True)


class OffloadAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW with its state in files (``tier="disk"``) or host memory (``tier="host"``).

    NOT thread-safe (like every torch optimizer); one optimizer per ``dir``.

    Args:
        params: parameters or param groups, as for torch.optim.AdamW. Fixed at
            construction (``add_param_group`` later is refused).
        lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.AdamW.
        dir: directory for the state files (a local NVMe disk). Needed for ``tier="disk"``.
        master_params: keep fp32 master weights in the tier too. The model's parameters
            may then be bf16/fp16 (or on an accelerator): the update runs on the fp32
            master and the result is cast into the parameter. Also makes a failed step
            fully undoable (the parameters are restored from the previous master).
        tier: ``"disk"`` (state files, O_DIRECT) or ``"host"`` (pinned host memory when
            CUDA is present: the ZeRO-Offload shape, gradients device->host, update on the
            CPU, parameters host->device).
        chunk_bytes: bytes of one state kind per chunk (rounded to 4096). Larger chunks
            mean fewer, longer I/Os; the pool holds ``pool_sets * kinds * chunk_bytes``.
        pool_sets: chunks in flight (3 overlap read, update and write; the default 4 lets
            the reader run one chunk ahead, which measured faster on a shared machine).
        reopen: continue from the state files a previous process left in ``dir``
            (validated: a missing or truncated file is an error naming it).
        update_threads: torch intra-op threads during the step (restored after it).
            Default: one fewer than torch's setting, at least 1, leaving a core to the
            reader and writer threads. Why: torch's parallel regions end in a barrier, and
            an intra-op worker preempted by an I/O thread stalls the whole region; on 2
            cores with 2 intra-op threads the update ran 8x slower with the I/O beside it
            than without (0.35 s against 3 s for 67M bf16 parameters with masters).
        overlap_backward: update each chunk of state during ``backward()``, as soon as the
            gradients of every parameter in it are final (post-accumulate-grad hooks), so the
            state's reads and writes overlap the backward pass instead of following it;
            ``step()`` then finishes the chunks left and commits. Same results, bit for bit.
            Because a parameter changes as soon as its gradient is accumulated, nothing may
            change a gradient between ``backward()`` and ``step()``: gradient clipping,
            unscaling, a closure and DDP are refused with an error saying so; with gradient
            accumulation, run the backward of every micro-batch but the last inside
            ``with opt.accumulating():``. See docs/offload.md.
        overlap_forward: let ``step()`` return before the update is done: the chunks left
            are read, updated and written while the next forward runs, each module's
            forward waiting (a forward pre-hook) until its own parameters are updated; the
            state's I/O then overlaps the forward too, and with ``overlap_backward`` the
            backward as well. Needs :meth:`attach` (the model whose modules get the
            hooks). Anything that reads the parameters other than through the attached
            modules' forward must call :meth:`synchronize` first (``outlast.save``,
            ``outlast.load``, ``state_dict()``, ``zero_grad(set_to_none=False)`` and the
            next ``step()`` do it themselves). Works with gradient clipping and DDP when
            ``overlap_backward`` is off. Same results, bit for bit.
        fused: as torch.optim.AdamW's ``fused``: the update of each piece is torch's fused
            AdamW kernel (one pass over the state instead of about ten), 2-3x faster, which
            leaves more of the CPU to the I/O threads. Results equal
            ``torch.optim.AdamW(fused=True)`` bit for bit; they differ from the default
            (unfused) AdamW in the last bit of some parameters, since the kernel rounds its
            final multiply-add differently. Per param group, like torch's.

    Example:
        >>> opt = OffloadAdamW(model.parameters(), lr=3e-4, dir="/nvme/run1/optim")  # doctest: +SKIP
        >>> loss.backward(); opt.step(); opt.zero_grad()                            # doctest: +SKIP
        >>> outlast.save({"model": model, "optim": opt}, "ckpt/step-00000100")      # doctest: +SKIP
        >>> opt.close()                                                             # doctest: +SKIP
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        dir: str | None = None,
        master_params: bool = False,
        tier: str = "disk",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        pool_sets: int = DEFAULT_POOL_SETS,
        reopen: bool = False,
        update_threads: int | None = None,
        overlap_backward: bool = False,
        overlap_forward: bool = False,
        fused: bool | None = None,
    ):
        if not 0.0 <= float(lr):
            raise ValueError(f"OffloadAdamW: lr={lr} must be >= 0")
        if not 0.0 <= eps:
            raise ValueError(f"OffloadAdamW: eps={eps} must be >= 0")
        for b in betas:
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"OffloadAdamW: betas={betas} must each be in [0, 1)")
        if tier not in ("disk", "host"):
            raise ValueError(f"OffloadAdamW: tier={tier!r} must be 'disk' or 'host'")
        if tier == "disk" and not dir:
            raise ValueError("OffloadAdamW: tier='disk' needs dir= (a directory on a local disk for the state files)")
        if pool_sets < 1:
            raise ValueError(f"OffloadAdamW: pool_sets={pool_sets} must be >= 1")
        if update_threads is not None and update_threads < 1:
            raise ValueError(f"OffloadAdamW: update_threads={update_threads} must be >= 1 (or None)")
        self.update_threads = update_threads
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        **{**_TORCH_KEYS, "fused": fused})
        self._building = True
        super().__init__(params, defaults)
        self._building = False
        self.master_params = bool(master_params)
        self.tier = tier
        self._params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        amsgrads = {bool(g["amsgrad"]) for g in self.param_groups}
        if len(amsgrads) > 1:
            raise ValueError("OffloadAdamW: amsgrad must be the same in every param group (its state is one file)")
        self.amsgrad = amsgrads.pop() if amsgrads else False
        for i, p in enumerate(self._params):
            self._check_param(i, p)
        self.kinds = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ()) + (
            ("master",) if self.master_params else ())
        chunk_elems = max(ALIGN_ELEMS, -(-int(chunk_bytes) // (ALIGN_ELEMS * ITEMSIZE)) * ALIGN_ELEMS)
        self.layout = StateLayout.build([p.numel() for p in self._params], chunk_elems)
        if tier == "disk":
            self.files: Any = StateFiles(dir, self.layout, self.kinds, reopen=reopen)
        else:
            self.files = HostState(self.layout, self.kinds)
        self._closed = False
        try:
            pin = torch.cuda.is_available() and any(p.device.type == "cuda" for p in self._params)
            self.pool = BufferPool(pool_sets, len(self.kinds), chunk_elems * ITEMSIZE, pin=pin)
            self._fviews = [[b.view(torch.float32) for b in s] for s in self.pool.sets]
            self._set_of = {id(s[0]): k for k, s in enumerate(self.pool.sets)}
            # Scratch for the denominator and for gradients that need a copy (another dtype,
            # device, or maximize): used by the update stage only, which is one thread.
            self._denom = torch.empty(chunk_elems, dtype=torch.float32)
            self._gbuf = torch.empty(chunk_elems, dtype=torch.float32, pin_memory=pin)
            if self.master_params and not reopen:
                self._init_master()
            elif self.master_params:
                self._params_from_master(self.files.generation)  # the masters are the truth
        except BaseException:
            self.files.close()
            raise
        self._failed: str | None = None
        self.overlap_backward = bool(overlap_backward)
        self._accumulating = False
        self._session: _Overlap | None = None
        self._grad_order: list[int] | None = None  # the order gradients were final in the last overlapped step
        self._hook_handles: list = []
        self._pins = [0, 0]  # per generation: saves still reading its files (see pin_state_files)
        self._pin_cond = threading.Condition()
        self.pin_timeout_s = 1800.0
        """The longest a step waits for a checkpoint still reading the generation it is about to write."""
        self.overlap_forward = bool(overlap_forward)
        self._deferred: _Overlap | None = None  # a step that overlap_forward left running
        self._early: list[int] = []  # final gradients seen before this step could begin (see _on_grad)
        self._attached = False
        self._fwd_trace: list[int] = []  # parameters in the order the attached forward reached them
        self._fwd_chunks: list[int] = list(range(len(self.layout.chunks)))  # the layout is in parameter order
        self._prefetch: ChunkStream | None = None  # the next step's reads, started by the forward
        self._prefetch_src = -1
        self.prefetch = True
        """With ``overlap_forward``: once the forward has updated every chunk, start reading the
        next step's state into the pool (the larger ``pool_sets``, the more of the backward it
        covers)."""
        self._chunks_of: list[list[int]] = [[] for _ in self._params]  # parameter -> its chunks
        for c in self.layout.chunks:
            for pc in c.pieces:
                self._chunks_of[pc.param].append(c.index)
        self._params_of = [sorted({pc.param for pc in c.pieces}) for c in self.layout.chunks]  # chunk -> parameters
        if self.overlap_backward:
            self._check_overlap_allowed()
            for i, p in enumerate(self._params):
                self._hook_handles.append(p.register_post_accumulate_grad_hook(_GradHook(self, i)))
        self.last_step_stats: dict = {}
        """Seconds the last step's stages spent (read_s, update_s, write_s, pool_wait_s,
        pipeline_s, commit_s, step_s) and its bytes moved: where the time of a step goes."""
        self._refresh_state()

    # ------------------------------------------------------------------ set-up
    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_building", False):
            raise ValueError(
                "OffloadAdamW fixes its parameters when it is built (they decide the layout of the state "
                "files); build a new optimizer with every param group instead of add_param_group"
            )
        super().add_param_group(param_group)

    def _check_param(self, i: int, p: torch.Tensor) -> None:
        if not p.is_contiguous() or p.layout != torch.strided:
            raise ValueError(f"OffloadAdamW: parameter {i} (shape {list(p.shape)}) must be a dense contiguous tensor")
        if torch.is_complex(p):
            raise ValueError(f"OffloadAdamW: parameter {i} is complex; offloaded AdamW supports real tensors only")
        if not self.master_params and (p.dtype != torch.float32 or p.device.type != "cpu"):
            raise ValueError(
                f"OffloadAdamW: parameter {i} is {p.dtype} on {p.device}; without master_params=True the update "
                "runs in place on fp32 CPU parameters. Pass master_params=True to keep fp32 masters in the tier."
            )

    def _init_master(self) -> None:
        """Fill the master file of the current generation with the parameters, as fp32."""
        g = self.files.generation
        mapped = self.files.mapped("master", g)
        for i, p in enumerate(self._params):
            off = self.layout.offsets[i]
            mapped[off : off + p.numel()].copy_(p.detach().reshape(-1))
        del mapped
        self.files.flush(g)
        self.files.release("master", g)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW update of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (as torch optimizers).

        Returns:
            The closure's loss, or None.

        Raises:
            StorageError: a read or write of the state failed (disk full, I/O error);
                the message names the file. The state of the previous step is intact.
        """
        if self.overlap_backward or self.overlap_forward:
            if closure is not None and self.overlap_backward:
                raise ValueError(
                    "OffloadAdamW(overlap_backward=True) updates the parameters during backward(), so step() "
                    "cannot re-evaluate the model with a closure; call backward() yourself, then step(), or build "
                    "the optimizer with overlap_backward=False"
                )
            loss = None
            if closure is not None:
                self.synchronize()  # the closure's forward must see this step's parameters
                with torch.enable_grad():
                    loss = closure()
            self._step_overlapped()
            return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_usable()
        params = self._params
        active = [p.grad is not None for p in params]
        for i, p in enumerate(params):
            if active[i] and p.grad.is_sparse:
                raise ValueError(f"OffloadAdamW: parameter {i} has a sparse gradient; AdamW does not support them")
        old_steps = list(self.files.steps)
        steps = [s + 1 if a else s for s, a in zip(old_steps, active)]
        hyper = [self._hyper(g) for g in self.param_groups]
        src, dst = self.files.generation, self.files.next_generation()
        self._wait_unpinned(dst)
        chunks = self.layout.chunks
        sets_of = self._set_of
        read, write = self._io(src, dst)

        def update(c: int, bufs: list[torch.Tensor]) -> None:
            f = self._fviews[sets_of[id(bufs[0])]]
            for pc in chunks[c].pieces:
                if active[pc.param]:
                    self._update_piece(pc, f, hyper[self._group_of[pc.param]], float(steps[pc.param]))

        stats: dict = {}
        t0 = time.perf_counter()
        try:
            with self._update_threads():
                run_pipeline(range(len(chunks)), self.pool, read, update, write, stats=stats)
            t1 = time.perf_counter()
            self.files.flush(dst)
            self.files.commit(dst, steps)
        except BaseException as e:
            self._after_failure(e, src)
            raise
        t2 = time.perf_counter()
        stats.update(pipeline_s=t1 - t0, commit_s=t2 - t1, step_s=t2 - t0, bytes=self.bytes_per_step)
        self.last_step_stats = stats
        self._refresh_state()
        return loss

    # ------------------------------------------------------------------ the step, overlapped with backward
    def _check_overlap_allowed(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError(
                "OffloadAdamW(overlap_backward=True) updates a parameter as soon as its local gradient is "
                "accumulated, before DDP's all-reduce has averaged it over the ranks; under torch.distributed "
                f"(world size {torch.distributed.get_world_size()}) use overlap_backward=False"
            )

    def accumulating(self) -> "_Accumulating":
        """Context manager for the backward passes of every micro-batch but the last: inside it the
        gradient hooks do nothing, so gradients accumulate and the update waits for the last
        backward (``overlap_backward=True`` only; with it off this does nothing).

        Example:
            >>> for mb in micro_batches[:-1]:                                # doctest: +SKIP
            ...     with opt.accumulating():
            ...         loss(model, mb).backward()
            >>> loss(model, micro_batches[-1]).backward(); opt.step()         # doctest: +SKIP
        """
        return _Accumulating(self)

    def _on_grad(self, i: int) -> None:
        """Post-accumulate-grad hook of parameter ``i``: its gradient is final for this step."""
        if self._accumulating or self._closed or self._failed:
            return
        s = self._session
        if s is None:
            d = self._deferred
            if d is not None and not d.stream.all_written() and i not in self._early:
                # The step before (overlap_forward) still writes its last chunks; committing it now
                # would stall this backward until they land. Take the gradient as final, update later.
                self._early.append(i)
                return
            s = self._begin(run_pre_hooks=True)
        if s.final[i]:
            e = ValueError(
                f"OffloadAdamW(overlap_backward=True): parameter {i} (shape {list(self._params[i].shape)}) got a "
                "second gradient before step(); its first one was taken as final. With gradient accumulation, run "
                "the backward of every micro-batch but the last inside `with opt.accumulating():`"
            )
            self._abort(e)
            raise e
        g = self._params[i].grad
        s.mark_final(i, g)
        self._pump(s)

    def _take_early(self, s: "_Overlap") -> None:
        """Mark final the gradients whose hooks fired while the step before was still writing."""
        early, self._early = self._early, []
        s.early = len(early)
        for j in early:
            g = self._params[j].grad
            if g is not None and not s.final[j]:
                s.mark_final(j, g)

    def _begin(self, *, run_pre_hooks: bool) -> "_Overlap":
        """Start an overlapped step: from here on the optimizer changes parameters."""
        self.synchronize()  # the step before, if the forward left any of it: this one reads what it wrote
        self._check_usable()
        if run_pre_hooks:
            # Step pre-hooks promise to run before the optimizer changes anything (the Checkpointer's
            # waits for its copy of the parameters and state): here that is now, inside backward().
            # step() runs them again, as torch's wrapper always does.
            pre = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", {})
            for hook in [*pre.values(), *self._optimizer_step_pre_hooks.values()]:
                hook(self, (self,), {})
        src, dst = self.files.generation, self.files.next_generation()
        self._wait_unpinned(dst)
        if not self.overlap_backward:
            order = self._forward_chunk_order()  # overlap_forward alone: the next forward needs them in this order
        else:
            order = self._backward_chunk_order()
        stream, self._prefetch = self._prefetch, None
        if stream is not None and self._prefetch_src != src:  # noqa: SIM114 - read another generation
            _close_quietly(stream)
            stream = None
        prefetched = 0
        if stream is not None:
            prefetched = stream.started
            stream.reorder(order)  # some chunks are read already: the backward or forward takes them first
        else:
            stream = ChunkStream(order, self.pool, *self._io(src, dst))
        s = _Overlap(self, src, dst, [self._hyper(g) for g in self.param_groups], stream, time.perf_counter())
        s.prefetched = prefetched
        self._take_early(s)
        self._session = s
        return s

    def _io(self, src: int, dst: int, after: ChunkStream | None = None) -> tuple[Callable, Callable]:
        """The read (from generation ``src``; once ``after`` has written the chunk, if given)
        and write (to ``dst``) stages of a chunk stream."""
        kinds, chunks = self.kinds, self.layout.chunks
        nk = len(kinds)

        def read(c: int, bufs: list[torch.Tensor]) -> None:
            if after is not None:
                after.wait_written(c)
            n = chunks[c].numel * ITEMSIZE
            for k in range(nk):
                self.files.read(kinds[k], src, chunks[c].start, bufs[k][:n])

        def write(c: int, bufs: list[torch.Tensor]) -> None:
            n = chunks[c].numel * ITEMSIZE
            for k in range(nk):
                self.files.write(kinds[k], dst, chunks[c].start, bufs[k][:n])

        return read, write

    def _start_prefetch(self, s: "_Overlap") -> None:
        """Every chunk of the deferred step ``s`` is updated (its writes may still run): start
        reading the next step's state now, into the pool sets as they free up, so the disk
        keeps working through the rest of the forward and the backward. Only reads: nothing
        is written before the next step() has committed ``s``."""
        order = self._fwd_chunks if not self.overlap_backward else self._backward_chunk_order()
        self._prefetch = ChunkStream(order, self.pool, *self._io(s.dst, s.src, after=s.stream))
        self._prefetch_src = s.dst

    def _backward_chunk_order(self) -> list[int]:
        """Chunks in the order their gradients were final in the last overlapped backward."""
        chunks = self.layout.chunks
        if self._grad_order is None:
            return list(range(len(chunks)))[::-1]  # backward usually reaches the last parameters first
        rank = {p: r for r, p in enumerate(self._grad_order)}
        last = len(self._params)
        return sorted(range(len(chunks)), key=lambda c: max(rank.get(pc.param, last) for pc in chunks[c].pieces)
                      if chunks[c].pieces else last)

    def _cancel_prefetch(self) -> None:
        stream, self._prefetch = self._prefetch, None
        if stream is not None:
            _close_quietly(stream)

    def _update_chunk(self, s: "_Overlap", c: int, bufs: list[torch.Tensor]) -> None:
        f = self._fviews[self._set_of[id(bufs[0])]]
        for pc in self.layout.chunks[c].pieces:
            if s.final[pc.param]:
                # the gradient the step took (zero_grad(set_to_none=True) may have dropped p.grad since)
                self._update_piece(pc, f, s.hyper[self._group_of[pc.param]], float(self.files.steps[pc.param] + 1),
                                   s.grads[pc.param])
        s.updated(c)

    @contextlib.contextmanager
    def _update_threads(self):
        """torch's intra-op threads for the update (``update_threads``), restored after it; and
        no autograd (the hooks that update run inside forward or backward)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.update_threads or max(1, threads - 1))
        try:
            with torch.no_grad():
                yield
        finally:
            torch.set_num_threads(threads)

    def _pump(self, s: "_Overlap") -> None:
        with self._update_threads():
            s.stream.pump(lambda c: s.pending[c] == 0, lambda c, b: self._update_chunk(s, c, b))

    def _step_overlapped(self) -> None:
        if self.overlap_forward and not self._attached:
            raise ValueError(
                "OffloadAdamW(overlap_forward=True) finishes each step during the next forward, so it must know "
                "the model: call opt.attach(model) once before training"
            )
        self.synchronize()  # a step before whose forward never ran (two step() calls in a row)
        s = self._session
        if s is None:  # no hook fired (overlap_forward alone, gradients set by hand, or none at all)
            s = self._begin(run_pre_hooks=False)
        self._session = None
        t0 = time.perf_counter()
        try:
            for i, p in enumerate(self._params):
                if p.grad is not None and p.grad.is_sparse:
                    raise ValueError(f"OffloadAdamW: parameter {i} has a sparse gradient; AdamW does not support them")
                if s.final[i]:
                    if p.grad is not s.grads[i] or p.grad._version != s.versions[i]:
                        raise ValueError(
                            f"OffloadAdamW(overlap_backward=True): the gradient of parameter {i} (shape "
                            f"{list(p.shape)}) changed between backward() and step() (gradient clipping, unscaling "
                            "or zero_grad?), but its update may already have used it. Clip or scale gradients "
                            "only with overlap_backward=False"
                        )
                elif p.grad is not None:  # a gradient no hook saw (set by hand): final now
                    s.mark_final(i, p.grad)
            hyper = [self._hyper(g) for g in self.param_groups]
            if hyper != s.hyper:
                raise ValueError(
                    "OffloadAdamW(overlap_backward=True): lr, betas, eps, weight_decay or maximize changed between "
                    "backward() and step(), after the update had begun with the old values; change them before "
                    "backward() (LR schedulers stepped after step() already do)"
                )
            s.overlapped = s.stream.updated  # chunks updated inside backward()
            s.steps = [n + 1 if f else n for n, f in zip(self.files.steps, s.final)]
            s.backward_s = t0 - s.t0
            self._grad_order = s.order
            if self.overlap_forward:
                # The rest runs in the next forward, in the order it needs the parameters.
                s.stream.reorder(self._forward_chunk_order())
                s.defer()
                s.t_deferred = time.perf_counter()
                s.step_s = s.t_deferred - t0
                self._deferred = s
                _PENDING.add(self)
                return
        except BaseException as e:
            self._abort(e, s)
            raise
        self._finish(s, t0)

    # ------------------------------------------------------------------ the step, finished in the next forward
    def attach(self, model: torch.nn.Module) -> "OffloadAdamW":
        """Give every module of ``model`` that owns parameters of this optimizer a forward
        pre-hook: with ``overlap_forward=True`` it waits until those parameters are updated
        (the rest of the step goes on while the module computes). Call once.

        Raises:
            ValueError: a parameter of this optimizer is in no module of ``model``.

        Example:
            >>> opt = OffloadAdamW(model.parameters(), dir="/nvme/optim", overlap_forward=True)  # doctest: +SKIP
            >>> opt.attach(model)                                                              # doctest: +SKIP
        """
        index = {id(p): i for i, p in enumerate(self._params)}
        handles, covered = [], set()
        for m in model.modules():
            idxs = sorted({index[id(p)] for p in m.parameters(recurse=False) if id(p) in index})
            if idxs:
                chunks = sorted({c for i in idxs for c in self._chunks_of[i]})
                handles.append(m.register_forward_pre_hook(_ForwardHook(self, idxs, chunks)))
                covered.update(idxs)
        missing = [i for i in range(len(self._params)) if i not in covered]
        if missing:
            for h in handles:
                h.remove()
            shapes = ", ".join(f"{i} {list(self._params[i].shape)}" for i in missing[:5])
            raise ValueError(
                f"OffloadAdamW.attach: parameters {shapes} of this optimizer are in no module of the model "
                f"({len(missing)} in all), so no forward would wait for their update; attach the model that "
                "holds every parameter, or build the optimizer with overlap_forward=False"
            )
        self._hook_handles.extend(handles)
        self._attached = True
        return self

    def synchronize(self) -> None:
        """Finish a step that ``overlap_forward`` left running: update the parameters not
        updated yet, write and commit the state. Call it before reading parameters other
        than through the attached modules' forward (an eval loop that calls submodules
        directly, your own logging); a no-op when nothing is left.

        Raises:
            StorageError: the step's reads or writes failed (see ``step()``).

        Example:
            >>> opt.step(); opt.synchronize(); print(model.fc.weight.norm())   # doctest: +SKIP
        """
        s = self._deferred
        if s is None:
            return
        self._deferred = None
        _PENDING.discard(self)
        self._finish(s, None)

    def _finish(self, s: "_Overlap", t_step: float | None) -> None:
        """Update the chunks of ``s`` left (waiting for their reads), write, commit, and record
        the step's stats. ``t_step``: when step() began, or None for a deferred step."""
        t0 = time.perf_counter()
        try:
            with self._update_threads():
                s.stream.drain(lambda c, b: self._update_chunk(s, c, b))
            t1 = time.perf_counter()
            self.files.flush(s.dst)
            self.files.commit(s.dst, s.steps)
        except BaseException as e:
            self._abort(e, s)
            raise
        t2 = time.perf_counter()
        stats = dict(s.stream.stats)
        stats.update(overlapped_chunks=s.overlapped, chunks=len(self.layout.chunks), backward_s=s.backward_s,
                     prefetched_chunks=s.prefetched, early_grads=s.early, drain_s=t1 - t0, commit_s=t2 - t1, pipeline_s=t2 - s.t0,
                     step_s=s.step_s if t_step is None else t2 - t_step, bytes=self.bytes_per_step)
        if t_step is None:
            stats.update(deferred_chunks=s.deferred_chunks, forward_chunks=s.forward_chunks,
                         forward_wait_s=s.forward_wait_s, deferred_s=t2 - s.t_deferred)
        self.last_step_stats = stats
        self._refresh_state()

    def _forward_chunk_order(self) -> list[int]:
        """Chunks in the order the last forward reached their parameters (parameter order at first)."""
        if self._fwd_trace:
            n = len(self._params)
            rank = {p: r for r, p in enumerate(dict.fromkeys(self._fwd_trace))}
            self._fwd_trace = []
            chunks = self.layout.chunks
            self._fwd_chunks = sorted(range(len(chunks)),
                                      key=lambda c: min((rank.get(i, n + i) for i in self._params_of[c]), default=2 * n))
        return self._fwd_chunks

    def _on_forward(self, idxs: list[int], chunks: list[int]) -> None:
        """Forward pre-hook of a module that owns parameters ``idxs`` (stored in ``chunks``)."""
        if len(self._fwd_trace) < 4 * len(self._params):
            self._fwd_trace.extend(idxs)
        s = self._deferred
        if s is None:
            return
        t0 = time.perf_counter()
        try:
            before = s.stream.updated
            with self._update_threads():
                s.stream.pull(chunks, lambda c, b: self._update_chunk(s, c, b))
            s.forward_chunks += s.stream.updated - before
            if s.stream.remaining == 0 and self._prefetch is None and self.prefetch:
                self._start_prefetch(s)
        except BaseException as e:
            self._deferred = None
            _PENDING.discard(self)
            self._abort(e, s)
            raise
        finally:
            s.forward_wait_s += time.perf_counter() - t0

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._deferred is not None and not set_to_none:
            self.synchronize()  # zeroing in place would change gradients the step still needs
        super().zero_grad(set_to_none)

    def _abort(self, e: BaseException, s: "_Overlap | None" = None) -> None:
        """Stop an overlapped step that failed; undo what it did, or say what cannot be undone."""
        s = s or self._session
        self._session = None
        self._early = []
        if s is not None:
            _close_quietly(s.stream)  # first: a read-ahead of the next step may wait for its writes
        self._cancel_prefetch()
        if s is None:
            return
        if s.stream.updated == 0:
            return  # nothing changed yet: the parameters and state are those of the previous step
        self._after_failure(e, s.src)

    @staticmethod
    def _hyper(group: dict) -> tuple:
        lr = group["lr"]
        lr = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
        b1, b2 = (float(b.item()) if isinstance(b, torch.Tensor) else float(b) for b in group["betas"])
        return (lr, b1, b2, float(group["eps"]), float(group["weight_decay"]), bool(group["maximize"]),
                bool(group.get("fused")))

    def _update_piece(self, pc, f: list[torch.Tensor], hyper: tuple, step: float,
                      grad_of: torch.Tensor | None = None) -> None:
        # torch.optim.adam._single_tensor_adam (decoupled weight decay, not capturable), op for op,
        # or with fused, torch's fused kernel (what torch.optim.AdamW(fused=True) runs).
        lr, beta1, beta2, eps, wd, maximize, fused = hyper
        n = pc.hi - pc.lo
        lo, hi, b = pc.lo, pc.hi, pc.buf_lo
        p = self._params[pc.param]
        grad = (p.grad if grad_of is None else grad_of).detach().reshape(-1)[lo:hi]
        if grad.device.type != "cpu" or grad.dtype != torch.float32:
            grad = self._gbuf[:n].copy_(grad)
        exp_avg, exp_avg_sq = f[0][b : b + n], f[1][b : b + n]
        if self.master_params:
            param = f[len(self.kinds) - 1][b : b + n]
        else:
            param = p.detach().view(-1)[lo:hi]
        if fused:
            # The kernel splits its work at multiples of 32768 elements and pieces start at
            # multiples of ALIGN_ELEMS from their parameter's start, so every element takes
            # the same (vectorised or tail) path as on the whole tensor: same bits.
            torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [f[2][b : b + n]] if self.amsgrad else [],
                                [torch.tensor(step, dtype=torch.float32)], lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=wd, eps=eps, amsgrad=self.amsgrad, maximize=maximize)
            if self.master_params:
                p.detach().view(-1)[lo:hi].copy_(param)
            return
        if maximize:
            grad = torch.neg(grad, out=self._gbuf[:n])
        if wd != 0:
            param.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = self._denom[:n]
        if self.amsgrad:
            mx = f[2][b : b + n]
            torch.maximum(mx, exp_avg_sq, out=mx)
            torch.sqrt(mx, out=denom)
        else:
            torch.sqrt(exp_avg_sq, out=denom)
        denom.div_(bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if self.master_params:
            p.detach().view(-1)[lo:hi].copy_(param)

    def _after_failure(self, e: BaseException, src: int) -> None:
        """Leave the previous state usable, or say exactly what is not."""
        where = self.files.directory
        if self.master_params:
            try:
                self._params_from_master(src)
            except BaseException as e2:  # noqa: BLE001
                self._failed = f"restoring the parameters from the master copy also failed ({e2})"
            else:
                _append(e, f"; the step was not applied: the optimizer state in {where} and the parameters "
                           "are those of the previous step, so training can go on once the cause is fixed")
                return
        else:
            self._failed = "the failed step left the parameters partly updated"
        _append(e, f"; the optimizer state in {where} is still that of the previous step, but "
                   f"{self._failed}: restore the last checkpoint before training on "
                   "(master_params=True makes a failed step fully undoable)")

    def _params_from_master(self, generation: int) -> None:
        mapped = self.files.mapped("master", generation)
        for i, p in enumerate(self._params):
            off = self.layout.offsets[i]
            p.detach().view(-1).copy_(mapped[off : off + p.numel()])
        del mapped
        self.files.release("master", generation)

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError("OffloadAdamW is closed")
        if self._failed:
            raise StorageError(f"OffloadAdamW cannot step: {self._failed}. Restore a checkpoint (load_state_dict) first.")

    # ------------------------------------------------------------------ state
    def _views(self, i: int, generation: int | None = None) -> dict[str, torch.Tensor]:
        g = self.files.generation if generation is None else generation
        off, n, p = self.layout.offsets[i], self.layout.numels[i], self._params[i]
        return {k: self.files.mapped(k, g)[off : off + n].view(p.shape) for k in self.kinds}

    def _refresh_state(self) -> None:
        # ``self.state`` mirrors torch's {param: {"step", "exp_avg", ...}} with views of the
        # files, so code that inspects optimizer.state (DCP's get_state_dict) sees it.
        st: dict = {}
        for i, p in enumerate(self._params):
            if self.files.steps[i] > 0:
                st[p] = {"step": torch.tensor(float(self.files.steps[i])), **self._views(i)}
        self.state = st  # type: ignore[assignment]

    def state_dict(self) -> dict:
        """torch's optimizer state dict; the state tensors are memory-mapped views of the files.

        Returns:
            ``{"state": {index: {"step", "exp_avg", "exp_avg_sq", ...}}, "param_groups": [...]}``,
            loadable by ``torch.optim.AdamW`` as well. The views stay valid until the next
            :meth:`step` (which writes the other generation): save before stepping.

        Example:
            >>> outlast.save({"optim": opt}, "ckpt/step-00000010")   # doctest: +SKIP
        """
        self.synchronize()
        state = {}
        for i in range(len(self._params)):
            if self.files.steps[i] > 0:
                state[i] = {"step": torch.tensor(float(self.files.steps[i])), **self._views(i)}
        groups = []
        idx = 0
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = list(range(idx, idx + len(g["params"])))
            idx += len(g["params"])
            groups.append(d)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from a state dict of this class or of ``torch.optim.AdamW``.

        Tensors are written into the current generation's files (through the page cache,
        a parameter at a time); tensors that already are this optimizer's mapped views
        (``outlast.load`` fills :meth:`state_dict`'s views in place) cost nothing.

        Raises:
            IncompatibleStateError: the groups, parameter counts or shapes differ.
        """
        if self._closed:
            raise ValueError("OffloadAdamW is closed")
        self.synchronize()
        self._cancel_prefetch()  # it read the files this load is about to write
        if self._session is not None:
            raise ValueError(
                "OffloadAdamW(overlap_backward=True): a backward() has begun this step's update; call step() "
                "before load_state_dict"
            )
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise IncompatibleStateError(
                f"optimizer state has {len(groups) if isinstance(groups, list) else 'no'} param groups, this "
                f"OffloadAdamW has {len(self.param_groups)}: it was saved for another model or grouping"
            )
        for gi, (saved, live) in enumerate(zip(groups, self.param_groups)):
            if len(saved.get("params", [])) != len(live["params"]):
                raise IncompatibleStateError(
                    f"param group {gi}: the saved state has {len(saved.get('params', []))} parameters, this "
                    f"optimizer {len(live['params'])}"
                )
            if bool(saved.get("amsgrad", False)) != self.amsgrad:
                raise IncompatibleStateError(
                    f"param group {gi}: saved with amsgrad={saved.get('amsgrad')}, this optimizer has "
                    f"amsgrad={self.amsgrad}; build it with the same amsgrad"
                )
        saved_state = state_dict.get("state", {})
        index_of = {}
        for saved, live in zip(groups, self.param_groups):
            for pid in saved["params"]:
                index_of[pid] = len(index_of)
        g = self.files.generation
        self._wait_unpinned(g)  # this writes the current generation in place
        steps = [0] * len(self._params)
        for pid, i in index_of.items():
            entry = saved_state.get(pid, saved_state.get(str(pid)))
            views = self._views(i, g)
            p = self._params[i]
            if not entry:
                for k, v in views.items():
                    if k == "master":
                        v.copy_(p.detach())
                    else:
                        v.zero_()
                continue
            steps[i] = int(float(entry["step"]))
            for k, v in views.items():
                value = entry.get(k)
                if value is None and k == "master":
                    value = p.detach()
                if value is None:
                    raise IncompatibleStateError(f"optimizer state of parameter {pid} has no {k!r}")
                if not isinstance(value, torch.Tensor) or value.numel() != v.numel():
                    raise IncompatibleStateError(
                        f"optimizer state {k!r} of parameter {pid} has shape "
                        f"{list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}, "
                        f"the parameter {list(p.shape)}"
                    )
                if value.data_ptr() != v.data_ptr():
                    v.copy_(value.reshape(v.shape))
        for gi, (saved, live) in enumerate(zip(groups, self.param_groups)):
            for k, val in saved.items():
                if k != "params" and k not in _TORCH_KEYS:
                    live[k] = val
        self.files.flush(g)
        self.files.commit(g, steps)
        self._failed = None
        self._refresh_state()

    # ------------------------------------------------------------------ checkpoint engines
    def pin_state_files(self) -> "StatePin | None":
        """Keep the current generation's files unchanged until the pin is released.

        For checkpoint engines that write in the background (the ``Checkpointer``): the
        tensors of :meth:`state_dict` are memory-mapped views of these files, so instead of
        copying them into staging memory (the size of the whole state) an engine can write
        them straight from the files, if nothing changes them meanwhile. The next step writes
        the other generation anyway; the one after would write this one, so it waits (at most
        ``pin_timeout_s``) until every pin on it is released.

        Returns:
            A :class:`StatePin` (``holds(tensor)``: is this tensor in the pinned files;
            ``release()``), or None when the state is not in files (``tier="host"``) or the
            optimizer is closed: then stage it as any tensor.

        Example:
            >>> pin = opt.pin_state_files()                              # doctest: +SKIP
            >>> direct = [t for t in tensors if pin.holds(t)]            # doctest: +SKIP
            >>> ...; pin.release()                                       # doctest: +SKIP
        """
        if self._closed or self.tier != "disk":
            return None
        self.synchronize()
        g = self.files.generation
        storages = {self.files.mapped(k, g).untyped_storage().data_ptr() for k in self.kinds}
        with self._pin_cond:
            self._pins[g] += 1
        return StatePin(self, g, storages)

    def wait_for_checkpoints(self) -> None:
        """Block until no save still writes the current state files (at most ``pin_timeout_s``).

        :meth:`state_dict` hands out views of the files, and ``outlast.load`` fills such views
        in place; it calls this first, so a load never changes bytes that an asynchronous
        save in flight is checksumming and writing.

        Example:
            >>> opt.wait_for_checkpoints()   # doctest: +SKIP
        """
        self.synchronize()
        self._wait_unpinned(self.files.generation)

    def _unpin(self, generation: int) -> None:
        with self._pin_cond:
            self._pins[generation] -= 1
            self._pin_cond.notify_all()

    def _wait_unpinned(self, generation: int) -> None:
        with self._pin_cond:
            if not self._pin_cond.wait_for(lambda: self._pins[generation] == 0, self.pin_timeout_s):
                raise StorageError(
                    f"OffloadAdamW: waited {self.pin_timeout_s:g} s for a checkpoint still writing the optimizer state "
                    f"from {self.files.path(self.kinds[0], generation)} (and the other files of generation "
                    f"{generation}); this step would overwrite them. Wait for the save to finish "
                    "(Checkpointer.wait()) or raise pin_timeout_s"
                )

    # ------------------------------------------------------------------ lifecycle
    @property
    def buffer_bytes(self) -> int:
        """Memory this optimizer allocated for itself: the pool plus the update's two scratch
        buffers. Fixed at construction, whatever the model size."""
        return self.pool.nbytes + self._denom.numel() * 4 + self._gbuf.numel() * 4

    @property
    def bytes_per_step(self) -> int:
        """Bytes read plus bytes written by one step (the I/O the tier must sustain)."""
        return 2 * len(self.kinds) * self.layout.nbytes

    def close(self) -> None:
        """Close the state files (they stay on disk; ``reopen=True`` continues from them)."""
        if not self._closed:
            if self._deferred is not None:
                try:
                    self.synchronize()  # finish the step: its state is committed, not lost
                except BaseException:  # noqa: BLE001 - the files stay as the failure left them (the previous step)
                    pass
            self._cancel_prefetch()
            if self._session is not None:
                self._abort(ValueError("OffloadAdamW closed between backward() and step()"))
            for h in self._hook_handles:
                h.remove()

            self._hook_handles = []
            self._closed = True
            self.state = {}  # type: ignore[assignment]
            self.files.close()

    def __enter__(self) -> "OffloadAdamW":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _close_quietly(stream: ChunkStream) -> None:
    try:
        stream.close()
    except BaseException:  # noqa: BLE001 - a failed step's first error is the one raised; a read-ahead's is unused
        pass


def _append(e: BaseException, text: str) -> None:
    if e.args and isinstance(e.args[0], str):
        e.args = (e.args[0] + text,) + e.args[1:]


class _Overlap:
    """One step overlapped with backward: which gradients are final, and the chunk stream."""

    def __init__(self, opt: OffloadAdamW, src: int, dst: int, hyper: list[tuple], stream: ChunkStream, t0: float):
        n = len(opt._params)
        self.src, self.dst, self.hyper, self.stream, self.t0 = src, dst, hyper, stream, t0
        self.final = [False] * n
        self.grads: list = [None] * n
        self.versions = [0] * n
        self.order: list[int] = []
        self.steps: list[int] = []
        self.overlapped = 0
        self.backward_s = self.step_s = self.forward_wait_s = 0.0
        self.forward_chunks = 0
        self.prefetched = 0  # chunks whose read had begun before this step began (the forward's read-ahead)
        self.early = 0  # gradients final before the step before had written its last chunks
        self.t_deferred = t0
        # parameters of each chunk whose gradient is not final yet (a chunk with none is updatable)
        self.pending = [len(ps) for ps in opt._params_of]
        self._chunks_of = opt._chunks_of
        self._params_of = opt._params_of
        self._left = [len(cs) for cs in opt._chunks_of]  # chunks of each parameter not updated yet
        self._deferring = False

    def updated(self, c: int) -> None:
        """Chunk ``c`` is updated. Once ``step()`` has returned, a gradient no chunk needs any
        more is let go, so the old gradients are freed during the forward, before the next
        backward allocates new ones (zero_grad(set_to_none=True) only dropped p.grad)."""
        for i in self._params_of[c]:
            self._left[i] -= 1
            if self._deferring and self._left[i] == 0:
                self.grads[i] = None

    def defer(self) -> None:
        self._deferring = True
        for i, n in enumerate(self._left):
            if n == 0:
                self.grads[i] = None

    @property
    def deferred_chunks(self) -> int:
        """Chunks left to the forward (not updated inside backward)."""
        return len(self.stream.order) - self.overlapped

    def mark_final(self, i: int, grad: torch.Tensor) -> None:
        self.final[i] = True
        self.grads[i] = grad
        self.versions[i] = grad._version
        self.order.append(i)
        for c in self._chunks_of[i]:
            self.pending[c] -= 1


class _GradHook:
    """The post-accumulate-grad hook of one parameter (holds the optimizer weakly)."""

    def __init__(self, opt: OffloadAdamW, i: int):
        self._opt = weakref.ref(opt)
        self._i = i

    def __call__(self, param: torch.Tensor) -> None:
        opt = self._opt()
        if opt is not None:
            opt._on_grad(self._i)


class _ForwardHook:
    """The forward pre-hook of one module (holds the optimizer weakly)."""

    def __init__(self, opt: OffloadAdamW, idxs: list[int], chunks: list[int]):
        self._opt = weakref.ref(opt)
        self._idxs, self._chunks = idxs, chunks

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        opt = self._opt()
        if opt is not None:
            opt._on_forward(self._idxs, self._chunks)


class _Accumulating:
    def __init__(self, opt: OffloadAdamW):
        self._opt = opt

    def __enter__(self) -> None:
        self._prev = self._opt._accumulating
        self._opt._accumulating = True

    def __exit__(self, *exc) -> None:
        self._opt._accumulating = self._prev


class StatePin:
    """A generation of state files kept unchanged for a checkpoint (:meth:`OffloadAdamW.pin_state_files`).

    Thread-safe: :meth:`release` may run on a background thread. Idempotent.
    """

    def __init__(self, opt: OffloadAdamW, generation: int, storages: set[int]):
        self._opt: OffloadAdamW | None = opt
        self.generation = generation
        self._storages = frozenset(storages)
        self._lock = threading.Lock()

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is (a view of) one of the pinned files."""
        t = getattr(tensor, "_local_tensor", tensor)
        return t.device.type == "cpu" and t.untyped_storage().data_ptr() in self._storages

    def release(self) -> None:
        with self._lock:
            opt, self._opt = self._opt, None
        if opt is not None:
            opt._unpin(self.generation)

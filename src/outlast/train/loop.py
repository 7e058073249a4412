"""The reference training loop: ``outlast train --config FILE`` under torchrun.

It reads top to bottom, nanoGPT-style: set up torch.distributed, load the corpus,
build the model (DDP or FSDP2), AdamW and a warmup+cosine LambdaLR, restore the
latest committed checkpoint if there is one, then for every step draw a fixed
global batch of documents, keep this rank's cost-balanced share, pack it into
micro-batches, accumulate gradients with the loss divided by the *global* token
count, step, log, and hand the state to an ``outlast.Checkpointer`` every
``checkpoint.every`` steps. Only outlast's public API touches checkpoints.

Exact resume: a checkpoint holds the model, the optimizer, the scheduler, the
document stream's position, every rank's RNG state and the step. Each step's
documents depend only on the stream position, never on the world size, and the
loss is a sum over tokens divided by a count all-reduced over ranks, so the update
is the same on any number of ranks up to floating-point summation order.

Fault injection (used by ``outlast demo`` and the tests): if the environment has
``OUTLAST_FAULT_STEP=K``, rank ``OUTLAST_FAULT_RANK`` (default 1) writes
``<run_dir>/fault.json`` and kills itself with SIGKILL at the start of step K.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import outlast

from .balance import CostModel, partition
from .config import ConfigError, TrainConfig
from .data import DocumentStream, load_documents
from .model import Transformer, next_token_loss
from .packing import pack
from .state import RNGState, rank_seed

__all__ = ["train", "LOSS_LOG", "FAULT_FILE", "read_log"]

LOSS_LOG = "losses.jsonl"
FAULT_FILE = "fault.json"
FAULT_STEP_ENV = "OUTLAST_FAULT_STEP"
FAULT_RANK_ENV = "OUTLAST_FAULT_RANK"


def read_log(run_dir: str) -> list[dict]:
    """Every record of ``<run_dir>/losses.jsonl``, in order (a torn last line is skipped).

    Step records look like ``{"step": 7, "loss": 4.12, "tokens": 3802, "lr": ..., "world_size": 2,
    "attempt": 1, "time": ...}``; event records have an ``"event"`` key (start, save, end).
    """
    path = os.path.join(run_dir, LOSS_LOG)
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a rank killed mid-write leaves at most one torn line, at the end
    return out


class _Log:
    """Rank 0's append-only JSON-lines log; each line is flushed as it is written."""

    def __init__(self, path: str | None) -> None:
        self.f = open(path, "a", encoding="utf-8") if path else None

    def write(self, **record: Any) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _init_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (or make a one-process group); pick the device."""
    use_cuda = torch.cuda.is_available() and cfg.dist.backend != "gloo"
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("dist.backend='nccl' needs CUDA; use 'gloo' (or 'auto') on CPU")
    timeout = _dt.timedelta(seconds=cfg.dist.timeout_s)
    if "RANK" in os.environ:  # launched by torchrun: env:// rendezvous
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timeout, device_id=device if use_cuda else None)
    else:
        # A plain `outlast train` is a world of one; a FileStore needs no port.
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        store = dist.FileStore(tempfile.mktemp(prefix="outlast-store-"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(cfg.dist.threads or max(1, (os.cpu_count() or 1) // local_world))
    return dist.get_rank(), dist.get_world_size(), device


def _make_checkpointer(cfg: TrainConfig) -> "outlast.Checkpointer":
    # Every rank builds it (collectively); it saves in the background, one checkpoint per
    # step-NNNNNNNN folder, and keeps the newest keep_last.
    return outlast.Checkpointer(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last)


def _maybe_inject_fault(cfg: TrainConfig, step: int, rank: int) -> None:
    """Die by SIGKILL at the start of step ``OUTLAST_FAULT_STEP`` on rank ``OUTLAST_FAULT_RANK``."""
    at = os.environ.get(FAULT_STEP_ENV)
    if at is None or int(at) != step or rank != int(os.environ.get(FAULT_RANK_ENV, "1")):
        return
    # Written (and fsynced) before dying so the demo can say when and where the fault hit.
    with open(os.path.join(cfg.run_dir, FAULT_FILE), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "step": step, "pid": os.getpid(), "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training run ``cfg`` describes, on this process's rank.

    Call it on every rank (torchrun), or in a plain process for a world of one.

    Args:
        cfg: The run's configuration.

    Returns:
        On every rank: ``{"start_step", "last_step", "world_size", "resumed", "losses"}``,
        where ``losses`` maps each step this invocation ran to its global mean loss.

    Example:
        >>> train(TrainConfig(steps=10, run_dir="runs/x"))  # doctest: +SKIP
    """
    # ---- processes, threads, device -------------------------------------------------
    rank, world_size, device = _init_distributed(cfg)
    is_main = rank == 0
    if cfg.data.docs_per_step < world_size:
        raise ConfigError(
            f"data.docs_per_step={cfg.data.docs_per_step} is less than the world size {world_size}; "
            "every rank needs at least one document per step (raise docs_per_step or use fewer ranks)"
        )
    os.makedirs(cfg.run_dir, exist_ok=True)
    log = _Log(os.path.join(cfg.run_dir, LOSS_LOG) if is_main else None)
    if is_main:
        with open(os.path.join(cfg.run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=2)

    # ---- data: every rank streams the same global batches -------------------------------
    documents = load_documents()
    if cfg.data.max_doc_tokens:
        documents = [d[: cfg.data.max_doc_tokens] for d in documents]
    stream = DocumentStream(documents, seed=cfg.data.seed)

    # ---- model, optimizer, schedule --------------------------------------------------------
    model_cfg = cfg.model.build()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP2 does not broadcast)
    model = Transformer(model_cfg).to(device)
    if cfg.dist.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        train_model = model
    else:
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    adamw = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                 weight_decay=cfg.optim.weight_decay, fused=True if cfg.optim.fused else None)
    if cfg.optim.offload_dir:
        from outlast.offload import OffloadAdamW

        # State files per rank; on an accelerator fp32 masters live in the tier as well.
        offload_dir = os.path.join(cfg.run_dir, cfg.optim.offload_dir, f"rank{rank}")
        optimizer: torch.optim.Optimizer = OffloadAdamW(
            model.parameters(), dir=offload_dir, master_params=device.type != "cpu",
            overlap_forward=cfg.optim.offload_overlap_forward, **adamw)
        if cfg.optim.offload_overlap_forward:
            optimizer.attach(model)  # each module's forward waits for its own parameters' update
    else:
        optimizer = torch.optim.AdamW(model.parameters(), **adamw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cfg.optim.lr_factor(s, cfg.steps))
    torch.manual_seed(rank_seed(cfg.seed, rank))  # each rank its own stream (dropout)
    rng = RNGState(rank, world_size, device, cfg.seed)
    meta = {"world_size": world_size, "config": cfg.to_dict()}

    # ---- restore the latest committed checkpoint, if any --------------------------------
    state = {
        # Model and optimizer keyed by parameter name in their live layout (plain tensors
        # under DDP, DTensor shards under FSDP2), so any layout and world size can load them.
        "train": outlast.ModelOptimizerState(model, optimizer),
        "scheduler": scheduler,
        "data": stream,
        "rng": rng,
        "meta": meta,
    }
    checkpointer = _make_checkpointer(cfg)
    t0 = time.time()
    # The newest valid checkpoint, loaded in place whatever layout and world size saved
    # it; None (and `state` untouched) on a fresh start.
    restored = checkpointer.restore(state)
    start_step = int(restored or 0)
    restore_s = time.time() - t0
    # outlast.load replaces plain values (so read them from `state`); record this run's values for later saves.
    saved_world = state["meta"].get("world_size", world_size) if restored else world_size
    state["meta"] = meta
    attempt = 1 + sum(1 for r in (read_log(cfg.run_dir) if is_main else []) if r.get("event") == "start")
    log.write(event="start", attempt=attempt, world_size=world_size, resumed_from=restored,
              saved_world_size=saved_world, restore_s=restore_s, rng_reseeded=rng.reseeded, time=time.time())
    if is_main and restored:
        print(f"outlast: resumed from step {restored} (saved on {saved_world} rank(s), now {world_size}) "
              f"in {restore_s:.2f}s", file=sys.stderr, flush=True)

    cost = CostModel.from_config(model_cfg)
    budget = cfg.data.token_budget

    def doc_cost(n: int) -> float:
        # Documents longer than the budget are cut into budget-sized pieces, and attention
        # is quadratic per piece, not per document.
        full, rest = divmod(n, budget)
        return full * cost(budget) + cost(rest)

    stop = cfg.stop_after or cfg.steps
    bar = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    losses: dict[int, float] = {}
    pending_save: tuple[int, float, int | None] | None = None  # (step, seconds save() blocked, bytes)

    # ---- the loop ------------------------------------------------------------------------
    for step in range(start_step + 1, stop + 1):
        _maybe_inject_fault(cfg, step, rank)
        t_step = time.time()

        # This step's global batch (the same on every rank) and this rank's balanced share.
        batch = [stream.documents[stream.next_index()] for _ in range(cfg.data.docs_per_step)]
        mine = partition([doc_cost(d.numel()) for d in batch], world_size, cfg.data.balance)[rank]
        micro_batches = pack([batch[i] for i in mine], budget, cfg.data.packing)

        # The loss is divided by the token count of the whole global batch, so gradients do
        # not depend on how documents are split over ranks and micro-batches. DDP and FSDP2
        # average gradients over ranks; multiplying by world_size turns that into a sum.
        local = sum(int(mb.num_tokens - len(mb.pieces)) for mb in micro_batches)  # = predicted tokens
        counts = torch.tensor([local, len(micro_batches)], dtype=torch.float64, device=device)
        n_tokens = counts[:1].clone()
        dist.all_reduce(n_tokens, op=dist.ReduceOp.SUM)
        n_micro = counts[1:].clone()
        dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)
        global_tokens, steps_micro = int(n_tokens.item()), int(n_micro.item())
        scale = world_size / max(1, global_tokens)

        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(steps_micro):
            last = i == steps_micro - 1
            # Ranks run the same number of forward/backward passes (FSDP2 collectives must
            # line up); a rank with fewer micro-batches adds passes of weight exactly zero.
            if cfg.dist.mode == "fsdp":
                train_model.set_requires_gradient_sync(last)
                sync_ctx = nullcontext()
            else:
                sync_ctx = nullcontext() if last else train_model.no_sync()
            with sync_ctx:
                if i < len(micro_batches):
                    mb = micro_batches[i]
                    tokens, positions, doc_ids = (t.to(device) for t in (mb.tokens, mb.positions, mb.doc_ids))
                    mb_loss, _ = next_token_loss(train_model(tokens, positions, doc_ids), tokens, doc_ids)
                    weight = scale
                else:
                    z = torch.zeros(1, dtype=torch.long, device=device)
                    mb_loss, weight = train_model(z, z, z).sum(), 0.0
                (mb_loss * weight).backward()
                if weight:
                    loss_sum += mb_loss.detach().double()

        # A pending asynchronous save must have copied the weights before they change.
        if pending_save is not None:
            t_wait = time.time()
            checkpointer.wait_staged()
            log.write(event="save", step=pending_save[0], stall_s=pending_save[1] + time.time() - t_wait,
                      nbytes=pending_save[2])
            pending_save = None
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        loss = float(loss_sum.item()) / max(1, global_tokens)
        losses[step] = loss
        log.write(step=step, loss=loss, tokens=global_tokens, micro_batches=steps_micro, lr=lr,
                  world_size=world_size, attempt=attempt, step_s=time.time() - t_step, time=time.time())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        elif is_main and step % cfg.log_every == 0:
            print(f"step {step}/{cfg.steps} loss {loss:.4f} lr {lr:.2e}", file=sys.stderr, flush=True)

        if step % cfg.checkpoint.every == 0 or step == stop:
            rng.capture(step)
            t_save = time.time()
            checkpointer.save(state, step=step)
            stall = time.time() - t_save
            # Each rank writes its share of the checkpoint (replicas are written once); sum them.
            nbytes = torch.tensor([checkpointer.last_metrics.nbytes], dtype=torch.float64, device=device)
            dist.all_reduce(nbytes, op=dist.ReduceOp.SUM)
            pending_save = (step, stall, int(nbytes.item()))

    # ---- finish: wait for the last save to commit ---------------------------------------
    t_close = time.time()
    checkpointer.close()
    if pending_save is not None:
        log.write(event="save", step=pending_save[0], stall_s=pending_save[1], nbytes=pending_save[2])
    log.write(event="end", last_step=stop, close_s=time.time() - t_close, time=time.time(),
              checkpointer=_jsonable(getattr(checkpointer, "metrics", None)))
    if bar is not None:
        bar.close()
    log.close()
    dist.barrier()
    # DDP's reducer holds the process group; if the reducer is the last holder, torch
    # destroys the group with the GIL held, which can deadlock with gloo's worker thread
    # (pytorch/pytorch#56297). Drop the reducer first; then the group dies GIL-free.
    if hasattr(optimizer, "close"):
        optimizer.close()  # OffloadAdamW's state files
    del train_model, state
    gc.collect()
    dist.destroy_process_group()
    return {"start_step": start_step, "last_step": stop, "world_size": world_size,
            "resumed": restored is not None, "losses": losses}


def _jsonable(x: Any) -> Any:
    """Checkpointer metrics as JSON (dataclass, dict or None), best effort."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "__dataclass_fields__"):
        from dataclasses import asdict

        x = asdict(x)
    try:
        json.dumps(x)
        return x
    except TypeError:
        return {k: v for k, v in x.items() if isinstance(v, (int, float, str, bool, type(None)))} if isinstance(x, dict) else str(x)


"""Iteration-level scheduling under one token budget per step (vLLM v1's rule, no phases).

Each step gives every request tokens until its computed count catches up with its tokens:
running requests first, in arrival order (so decodes are never skipped for a prefill),
then waiting requests FCFS with their prompts chunked into whatever budget is left.
When the KV pool runs out, the most recently started running request is preempted: its
blocks are freed and it goes back to the front of the queue to be recomputed later (its
generated tokens are kept, so the output continues where it stopped). The oldest request
is the last one ever preempted, so none starves.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .kv_cache import KVCacheManager
from .sampler import SamplingParams

__all__ = ["Request", "Scheduler", "SchedulerOutput"]

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Request:
    """One generation request and its progress."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_blocks: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    status: str = WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    # detokenizer state (engine-owned)
    text: str = ""
    sent_len: int = 0
    detok: object | None = None  # the tokenizer's DecodeStream, made at the first output token
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_cached_prompt_tokens: int = 0
    serial: int = 0
    """Unique in the process (request ids may be reused once a request is done)."""

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    def append_token(self, tok: int) -> None:
        self.output_token_ids.append(tok)
        self.all_token_ids.append(tok)


@dataclass
class SchedulerOutput:
    """What one step computes: ``(request, num_new_tokens)`` pairs, in batch order."""

    scheduled: list[tuple[Request, int]]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    """Chooses each step's tokens and owns the waiting queue and running list.

    Args:
        kv: the KV cache manager (blocks are allocated here).
        max_num_seqs: most running requests.
        token_budget: most tokens per step.

    Example:
        >>> s = Scheduler(kv, max_num_seqs=32, token_budget=512)
        >>> s.add(req); out = s.schedule(); ...; s.update(out, sampled)
    """

    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, token_budget: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.token_budget = token_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.admit_new = True
        """False while a weight swap waits for running requests to finish: waiting requests that
        never started stay queued (they will run on the new weights); preempted ones still resume."""

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is and free its blocks at once."""
        for req in self.running:
            if req.request_id == request_id:
                self.running.remove(req)
                break
        else:
            for req in self.waiting:
                if req.request_id == request_id:
                    self.waiting.remove(req)
                    break
            else:
                return None
        self.kv.free(req)
        req.status, req.finish_reason = FINISHED, "abort"
        return req

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running requests first, then waiting ones into the rest."""
        budget = self.token_budget
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()  # the newest request gives way
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append((req, n))
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: nothing after it is left
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                req = self.waiting[0]
                if not self.admit_new and not (req.output_token_ids or req.num_preemptions):
                    break
                prefix, cached = self.kv.lookup_prefix(req)
                n = min(req.num_tokens - cached, budget)
                req.num_computed_tokens = cached
                if not self.kv.allocate_slots(req, n, prefix=prefix):
                    self.kv.release(prefix)
                    req.num_computed_tokens = 0
                    break
                if not req.output_token_ids and req.num_preemptions == 0:
                    req.num_cached_prompt_tokens = cached
                self.waiting.popleft()
                req.status = RUNNING
                self.running.append(req)
                scheduled.append((req, n))
                budget -= n
        return SchedulerOutput(scheduled, preempted)

    def finish(self, req: Request, reason: str) -> None:
        """Mark ``req`` done, drop it from the running list and free its blocks."""
        req.status, req.finish_reason = FINISHED, reason
        if req in self.running:
            self.running.remove(req)
        self.kv.free(req)

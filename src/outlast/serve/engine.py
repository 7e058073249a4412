"""The serving engine: schedule a step, run the packed forward, sample, detokenize, stop.

:class:`LLMEngine` is synchronous and single-threaded (its loop thread is in
:mod:`outlast.serve.loop`). ``step()`` returns one :class:`StepOutput` per request that got a
token or finished, carrying the new text with partial UTF-8 characters and possible stop
string prefixes held back until they resolve.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from .config import EngineConfig, ModelConfig
from .errors import BadRequestError, ModelLoadError
from .kv_cache import KVCacheManager
from .kv_disk import DiskKVTier
from .metrics import ServeMetrics
from .model import LlamaRuntime, SeqSlice, StepInput, _usable_cpus, default_gemm_backend
from .sampler import SamplingParams, make_generator, sample
from .scheduler import Request, Scheduler
from .tokenizer import Tokenizer
from .weights import weights_identity

__all__ = ["LLMEngine", "StepOutput"]

_SERIALS = itertools.count()
"""Request serials, unique in the process: engines may share one runtime (and its decode copy)."""


@dataclass
class StepOutput:
    """What one request got from one step."""

    request_id: str
    new_token_ids: list[int]
    text: str
    """New text since the previous output."""
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    weights_version: str = ""
    """Which weights computed this request (``step-N`` for a checkpoint step): every token of one
    request comes from one version, because a swap waits for running requests to finish."""


class LLMEngine:
    """Continuous batching over a paged KV cache for one model.

    Args:
        config: the model's shape.
        state_dict: its weights under Hugging Face names.
        tokenizer: its tokenizer.
        engine_config: limits and cache sizes.
        metrics: where to record metrics (a fresh :class:`ServeMetrics` by default).

    Example:
        >>> eng = LLMEngine(cfg, sd, tok, EngineConfig())
        >>> eng.add_request("r1", tok.encode("Hello"), SamplingParams(temperature=0, max_tokens=8))
        >>> while eng.has_work(): outs = eng.step()
    """

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer,
                 engine_config: EngineConfig | None = None, metrics: ServeMetrics | None = None):
        self.model_config = config
        self.config = ec = engine_config or EngineConfig()
        if ec.torch_threads:
            torch.set_num_threads(ec.torch_threads)
        if ec.blas_threads:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=ec.blas_threads, user_api="blas")  # stays in force (not used as a context)
        self.tokenizer = tokenizer
        self.identity = weights_identity(config, state_dict)
        self.weights_version = "weights-" + self.identity.hex()[:12]
        self.runtime = LlamaRuntime(config, state_dict, pack=self.pack_mode(), pack_dtype=self.pack_dtype())
        self.metrics = metrics or ServeMetrics()
        block_bytes = 2 * config.num_layers * ec.block_size * config.num_kv_heads * config.head_dim * 4
        num_blocks = ec.num_blocks or max(2, int(ec.kv_cache_gib * (1 << 30)) // block_bytes)
        disk = None
        if ec.kv_disk_dir:
            disk = DiskKVTier(ec.kv_disk_dir, int(ec.kv_disk_gib * (1 << 30)),
                              (config.num_layers, ec.block_size, config.num_kv_heads, config.head_dim))
        self.kv = KVCacheManager(config.num_layers, config.num_kv_heads, config.head_dim, num_blocks=num_blocks,
                                 block_size=ec.block_size, salt=self._salt(self.identity),
                                 enable_prefix_caching=ec.enable_prefix_caching, disk=disk)
        self.scheduler = Scheduler(self.kv, max_num_seqs=ec.max_num_seqs, token_budget=ec.token_budget)
        self.max_model_len = min(ec.max_model_len or config.max_position, config.max_position,
                                 num_blocks * ec.block_size)
        self.prepare(self._configure(self.runtime))  # packs in panels ("panel"; oneDNN packs as it builds)
        eos = set(config.eos_token_ids) | set(tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.requests: dict[str, Request] = {}
        self.num_steps = 0
        self._prev_queries = self._prev_hits = self._prev_disk = self._prev_preempt = 0

    # -- weights -------------------------------------------------------------------------
    def pack_mode(self) -> bool | None:
        """How runtimes for this engine pack their weights for oneDNN: in halves (two threads a
        step) or whole; None when the GEMM backend is not oneDNN. The engine's first runtime is
        built with it (:class:`LlamaRuntime`'s ``pack``: packing from the weights as given, while
        it builds, reorders contiguous rows, twice as fast as packing the built arrays)."""
        if self.gemm_backend() != "onednn":
            if self.config.weight_dtype != "float32":
                raise ModelLoadError(f"weight_dtype {self.config.weight_dtype!r} needs oneDNN, which this torch build "
                                     f"({torch.__version__}) lacks; serve float32")
            return None
        return self._threads() >= 2

    def gemm_backend(self) -> str:
        """The layers' GEMMs (a key of :data:`outlast.serve.model.GEMM_BACKENDS`): the config's; or,
        where it names none, ``"panel"`` (the compiled GEMM, :class:`outlast.serve.model._Panel`)
        for fp32 weights on one compute thread (the engine process) when the compiled kernels
        build, else :func:`outlast.serve.model.default_gemm_backend`."""
        ec = self.config
        if ec.gemm_backend == "panel" and self._threads() >= 2:
            raise ValueError("gemm_backend 'panel' runs each step on torch's threads, not outlast's two-thread "
                             "split: set compute_threads=1 (--compute-threads 1), or pick another backend")
        if ec.gemm_backend:
            return ec.gemm_backend
        if ec.compiled_kernels and ec.weight_dtype == "float32" and self._threads() < 2:
            from . import kernels

            if kernels.load() is not None:  # cached: built once per machine, loaded once per process
                return "panel"
        return default_gemm_backend()

    def packs(self) -> bool:
        """Whether runtimes for this engine pack their weights (:meth:`prepare` does it)."""
        return self.gemm_backend() in ("onednn", "panel")

    def pack_dtype(self) -> torch.dtype:
        """The packed weights' dtype (``EngineConfig.weight_dtype``)."""
        return torch.bfloat16 if self.config.weight_dtype == "bfloat16" else torch.float32

    def _salt(self, identity: bytes) -> bytes:
        """The prefix cache's root: the weights' identity, and the GEMMs' dtype when it is not fp32
        (K/V computed through bf16 GEMMs are not the fp32 run's, so neither tier mixes them)."""
        dtype = self.config.weight_dtype
        return identity if dtype == "float32" else identity + b"/" + dtype.encode()

    def prepare(self, runtime: LlamaRuntime) -> LlamaRuntime:
        """Pack ``runtime``'s weights for oneDNN when that is the GEMM backend and it was not built
        packed (:meth:`LlamaRuntime.pack`). Safe on another thread before or after
        :meth:`swap_weights` (until it is done, steps use numpy's GEMMs), so neither the swap,
        between two steps, nor the new weights' first response waits for it."""
        if self.gemm_backend() == "panel":
            return runtime.pack_panels()
        mode = self.pack_mode()
        if mode is not None:
            runtime.pack(halves=mode, dtype=self.pack_dtype())
        return runtime

    def _threads(self) -> int:
        return self.config.compute_threads or min(2, _usable_cpus())

    def _configure(self, runtime: LlamaRuntime, replaces: LlamaRuntime | None = None) -> LlamaRuntime:
        ec = self.config
        threads = self._threads()
        # A lone decode's GEMVs on more BLAS threads when asked, where BLAS is otherwise held at one.
        gemv = ec.gemv_blas_threads if ec.gemv_blas_threads > 1 and ec.blas_threads == 1 else 0
        return runtime.configure(parallel=threads >= 2, decode_kv_bytes=int(ec.decode_kv_gib * (1 << 30)),
                                 max_seqs=ec.max_num_seqs, max_len=self.max_model_len, single_row_blas_threads=gemv,
                                 gemm=self.gemm_backend(),
                                 reuse_decode_kv=replaces.decode_kv if replaces is not None else None,
                                 kernels=ec.compiled_kernels)

    def swap_ready(self) -> bool:
        """True when no request is computing on the current weights (a swap may happen now)."""
        return not self.scheduler.running and not any(r.output_token_ids or r.num_preemptions
                                                      for r in self.scheduler.waiting)

    def swap_weights(self, runtime: LlamaRuntime, identity: bytes, version: str) -> None:
        """Serve from ``runtime`` from the next step on (call between steps, when :meth:`swap_ready`).

        The prefix cache's hashes are rooted in ``identity``, so blocks computed by the old weights
        are never matched again (they age out of the LRU); ``version`` tags every later output.
        """
        if self.scheduler.running:
            raise RuntimeError("swap_weights while requests are running on the old weights")
        old = self.runtime.config
        new = runtime.config
        if (old.num_layers, old.num_kv_heads, old.head_dim, old.vocab_size) != \
                (new.num_layers, new.num_kv_heads, new.head_dim, new.vocab_size):
            raise ModelLoadError(f"the new weights' shape (layers {new.num_layers}, kv heads {new.num_kv_heads}, "
                                 f"head dim {new.head_dim}, vocab {new.vocab_size}) differs from the served model's; "
                                 f"a hot reload keeps the architecture: restart the server for another model")
        self.runtime = self._configure(runtime, replaces=self.runtime)
        self.identity = identity
        self.kv.salt = self._salt(identity)
        self.weights_version = version
        self.scheduler.admit_new = True

    # -- requests ------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, prompt_param: str = "prompt") -> None:
        """Raise :class:`BadRequestError` if the request cannot be served as asked."""
        n = len(prompt_token_ids)
        if n == 0:
            raise BadRequestError("the prompt is empty", param=prompt_param)
        if any((not isinstance(t, int)) or t < 0 or t >= self.model_config.vocab_size for t in prompt_token_ids):
            raise BadRequestError(f"prompt token ids must be in [0, {self.model_config.vocab_size})", param=prompt_param)
        if n >= self.max_model_len:
            raise BadRequestError(f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens "
                                  f"(prompt + max_tokens)", param=prompt_param)
        if n + params.max_tokens > self.max_model_len:
            raise BadRequestError(f"max_tokens {params.max_tokens} + the prompt's {n} tokens exceed the context of "
                                  f"{self.max_model_len} tokens; ask for at most {self.max_model_len - n}",
                                  param="max_tokens")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival: float | None = None) -> Request:
        """Queue a request (validated); returns its :class:`Request`."""
        self.validate(prompt_token_ids, params)
        if request_id in self.requests:
            raise BadRequestError(f"request id {request_id!r} is already in use", param="request_id")
        req = Request(request_id, list(prompt_token_ids), params, arrival=arrival or time.monotonic(),
                      serial=next(_SERIALS))
        if not params.greedy:
            req.generator = make_generator(params)
        self.requests[request_id] = req
        self.scheduler.add(req)
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        return req

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its KV blocks are freed at once. False if it was not known."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        self.metrics.finished.labels("abort").inc()
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # -- one step ------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Schedule, compute and sample once; returns the outputs of requests that advanced."""
        sched = self.scheduler.schedule()
        outputs: list[StepOutput] = []
        if sched.scheduled:
            self._run(sched.scheduled, outputs)
        self.num_steps += 1
        self._update_gauges()
        return outputs

    def _run(self, scheduled: list[tuple[Request, int]], outputs: list[StepOutput]) -> None:
        bs = self.kv.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[SeqSlice] = []
        rows: list[int] = []
        samplers: list[Request] = []
        # Single-token rows first: the runtime then reads and writes decode rows as one slice.
        scheduled = sorted(scheduled, key=lambda rn: rn[1] > 1)
        for req, n in scheduled:
            start = req.num_computed_tokens
            table = self.kv.block_table(req)
            q_start = len(tokens)
            tokens.extend(req.all_token_ids[start : start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            seqs.append(SeqSlice(q_start, n, start + n, table, (req.serial, req.num_preemptions)))
            if start + n == req.num_tokens:
                rows.append(q_start + n - 1)
                samplers.append(req)
        step = StepInput(torch.tensor(tokens, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                         torch.tensor(slots, dtype=torch.int64), seqs, torch.tensor(rows, dtype=torch.int64))
        logits = self.runtime.forward(step, self.kv.k, self.kv.v)
        for req, n in scheduled:
            req.num_computed_tokens += n
            self.kv.cache_full_blocks(req)
        if not samplers:
            return
        new = sample(logits, [r.params for r in samplers], [r.generator for r in samplers])
        now = time.monotonic()
        for req, tok in zip(samplers, new):
            outputs.append(self._append(req, tok, now))

    def _append(self, req: Request, tok: int, now: float) -> StepOutput:
        p = req.params
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.ttft.observe(now - req.arrival)
        else:
            self.metrics.itl.observe(now - req.last_token_time)
        req.last_token_time = now
        self.metrics.generation_tokens.inc()
        reason = None
        hidden = (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids
        req.append_token(tok)
        if hidden:
            reason = "stop"
        text = req.text
        if not hidden:  # incremental: decoding every output token again each step grew with the output
            if req.detok is None:
                req.detok = self.tokenizer.stream()
            text += req.detok.step(tok)
        cut_by_stop = False
        if reason is None and p.stop:
            lo = max(0, len(req.text) - max(len(s) for s in p.stop))
            cut = min((i for i in (text.find(s, lo) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason, cut_by_stop = text[:cut], "stop", True
        if reason is None and (len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None and not cut_by_stop:  # the final text: bytes of an unfinished character as U+FFFD
            text = self.tokenizer.decode(req.output_token_ids[:-1] if hidden else req.output_token_ids)
        req.text = text
        # (the stream never ends inside a character, so only a stop string's start is held back)
        emit_to = len(text) - _stop_prefix_len(text, p.stop) if reason is None else len(text)
        delta = text[req.sent_len : max(emit_to, req.sent_len)]
        req.sent_len = max(emit_to, req.sent_len)
        if reason is not None:
            self.scheduler.finish(req, reason)
            self.requests.pop(req.request_id, None)
            self.metrics.finished.labels(reason).inc()
        return StepOutput(req.request_id, [tok], delta, reason is not None, reason, len(req.prompt_token_ids),
                          len(req.output_token_ids), req.num_cached_prompt_tokens, self.weights_version)

    def _update_gauges(self) -> None:
        m, kv = self.metrics, self.kv
        m.running.set(self.num_running)
        m.waiting.set(self.num_waiting)
        m.kv_usage.set(kv.usage)
        m.prefix_queries.inc(kv.prefix_queries - self._prev_queries)
        m.prefix_hits.inc(kv.prefix_hits - self._prev_hits)
        m.disk_hits.inc(kv.disk_hits - self._prev_disk)
        m.preemptions.inc(self.scheduler.num_preemptions - self._prev_preempt)
        self._prev_queries, self._prev_hits = kv.prefix_queries, kv.prefix_hits
        self._prev_disk, self._prev_preempt = kv.disk_hits, self.scheduler.num_preemptions

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion (offline use and tests); returns each one's output token ids.

        Example:
            >>> eng.generate([tok.encode("Hi")], SamplingParams(temperature=0, max_tokens=8))
        """
        ids = [f"gen-{self.num_steps}-{i}" for i in range(len(prompts))]
        reqs = [self.add_request(rid, p, params) for rid, p in zip(ids, prompts)]
        while any(r.status != "finished" for r in reqs):
            self.step()
        return [list(r.output_token_ids) for r in reqs]


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string (held back while streaming)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best

"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds.

A request with ``temperature == 0`` is greedy (argmax). Otherwise its logits are divided by
the temperature, cut to the ``top_k`` largest and to the smallest set whose probability
reaches ``top_p``, and one token is drawn with the request's own ``torch.Generator`` (seeded
from ``seed`` when given), so the same seed reproduces the same text whatever else is batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import BadRequestError

__all__ = ["SamplingParams", "sample"]


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1: no top-k cut."""
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= 1,
             "must be an integer >= 1"),
            ("temperature", _num(self.temperature) and 0.0 <= self.temperature <= 2.0, "must be between 0 and 2"),
            ("top_p", _num(self.top_p) and 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= -1,
             "must be an integer >= -1 (0 or -1: off)"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)), "must be an integer"),
            ("stop", isinstance(self.stop, list) and len(self.stop) <= 8 and all(isinstance(s, str) and s for s in self.stop),
             "must be a non-empty string or a list of at most 8 of them"),
            ("stop_token_ids", isinstance(self.stop_token_ids, list) and all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be a list of token ids"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise BadRequestError(f"{name} {why}, got {getattr(self, name)!r}", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def make_generator(params: SamplingParams) -> torch.Generator:
    g = torch.Generator()
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits``.

    Args:
        logits: ``[S, vocab]`` fp32.
        params: each row's sampling parameters.
        generators: each row's generator (used only when not greedy).

    Returns:
        The chosen token ids.

    Example:
        >>> sample(logits, [SamplingParams(temperature=0)], [None])
    """
    # numpy's argmax, not torch's: over 32 rows of SmolLM2's 49,152 logits it took 0.15 ms against
    # torch's 1.5-1.8 ms (one or two threads) on the 2-core EPYC, every decode step. Both give the
    # first of equal maxima, and the first NaN.
    out = np.argmax(logits.numpy(), -1).tolist() if logits.dtype == torch.float32 else logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, idx = torch.sort(row, descending=True)
            probs = sorted_logits.softmax(-1)
            # Keep the tokens whose preceding mass is below top_p (the top token always stays).
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            row = row.scatter(0, idx[drop], float("-inf"))
        probs = row.softmax(-1)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out

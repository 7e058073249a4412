"""Tests for outlast.train.model: config validation, presets, the document mask, forward, loss."""

import pytest
import torch

from outlast.train.model import (
    PRESETS,
    ModelConfig,
    Transformer,
    document_mask,
    next_token_labels,
    next_token_loss,
)

SMALL = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)


def make_model(cfg=SMALL, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"d_model": -8}, "d_model"),
        ({"n_layers": 1.5}, "n_layers"),
        ({"n_heads": True}, "n_heads"),
        ({"d_ff": 0}, "d_ff"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"d_model": 100, "n_heads": 3}, "d_model"),
        ({"d_model": 12, "n_heads": 4}, "n_heads"),  # head size 3 is odd: RoPE needs pairs
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"rope_base": 1.0}, "rope_base"),
    ],
)
def test_config_rejects_bad_fields_and_names_them(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(Exception):
        SMALL.d_model = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    "name, low, high",
    [("tiny", 0.5e6, 2e6), ("small", 5e6, 20e6), ("base", 60e6, 200e6), ("medium", 200e6, 500e6), ("1b", 0.8e9, 1.5e9)],
)
def test_presets_span_1m_to_1b_and_num_params_is_exact(name, low, high):
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):  # no memory: the 1b preset would need 4 GB
        model = Transformer(cfg)
    actual = sum(p.numel() for p in model.parameters())
    assert actual == cfg.num_params()
    assert low <= actual <= high


def test_num_params_counts_untied_head():
    untied = ModelConfig.preset("tiny", tie_embeddings=False)
    assert untied.num_params() == ModelConfig.preset("tiny").num_params() + 256 * 128
    assert sum(p.numel() for p in Transformer(untied).parameters()) == untied.num_params()


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="no field"):
        ModelConfig.preset("tiny", width=3)
    assert ModelConfig.preset("tiny", max_seq_len=77).max_seq_len == 77
    assert set(PRESETS) >= {"tiny", "small", "base", "1b"}


def test_document_mask_matches_brute_force():
    doc_ids = torch.tensor([4, 4, 4, 1, 1, 4, 4, 9])  # id 4 is reused by a later, separate run
    run = [0, 0, 0, 1, 1, 2, 2, 3]
    expected = torch.tensor([[j <= i and run[i] == run[j] for j in range(8)] for i in range(8)])
    assert torch.equal(document_mask(doc_ids), expected)
    batched = document_mask(torch.stack([doc_ids, torch.zeros(8, dtype=torch.long)]))
    assert torch.equal(batched[0], expected)
    assert torch.equal(batched[1], torch.ones(8, 8, dtype=torch.bool).tril())


def test_attention_never_crosses_documents_and_is_causal():
    model = make_model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (12,), generator=g)
    doc_ids = torch.tensor([0] * 5 + [1] * 7)
    positions = torch.tensor(list(range(5)) + list(range(7)))
    base = model(tokens, positions, doc_ids)
    changed = tokens.clone()
    changed[:5] = (changed[:5] + 1) % 256  # edit every token of document 0
    out = model(changed, positions, doc_ids)
    assert torch.equal(out[5:], base[5:])  # document 1 cannot see document 0
    assert not torch.allclose(out[:5], base[:5])
    later = tokens.clone()
    later[9] = (later[9] + 7) % 256  # a later token of document 1
    out = model(later, positions, doc_ids)
    assert torch.equal(out[:9], base[:9])  # earlier tokens cannot see it
    assert not torch.allclose(out[9:], base[9:])


def test_positions_are_used():
    model = make_model()
    tokens = torch.arange(6) + 60
    doc_ids = torch.zeros(6, dtype=torch.long)
    a = model(tokens, torch.arange(6), doc_ids)
    b = model(tokens, torch.arange(6) + 3, doc_ids)
    # RoPE is relative: a constant shift leaves attention scores equal (up to rounding)...
    assert torch.allclose(a, b, atol=1e-5)
    c = model(tokens, torch.tensor([0, 1, 2, 0, 1, 2]), doc_ids)
    # ...but different relative positions change the output.
    assert not torch.allclose(a[3:], c[3:], atol=1e-3)


def test_batched_forward_equals_row_by_row_and_is_deterministic():
    model = make_model()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (3, 10), generator=g)
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    positions = torch.stack([torch.tensor(list(range(4)) + list(range(6))), torch.arange(10), torch.zeros(10).long()])
    batched = model(tokens, positions, doc_ids)
    assert batched.shape == (3, 10, 256)
    for b in range(3):
        assert torch.allclose(batched[b], model(tokens[b], positions[b], doc_ids[b]), atol=1e-6)
    assert torch.equal(batched, make_model()(tokens, positions, doc_ids))


def test_forward_rejects_bad_inputs():
    model = make_model()
    t = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        model(t, torch.arange(4), t)
    with pytest.raises(ValueError, match="integer"):
        model(t.float(), t, t)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        long = torch.zeros(65, dtype=torch.long)
        model(long, long, long)
    with pytest.raises(ValueError, match=r"\[T\] or \[B, T\]"):
        cube = torch.zeros(1, 1, 5, dtype=torch.long)
        model(cube, cube, cube)


def test_labels_stay_within_documents():
    tokens = torch.tensor([10, 11, 12, 20, 21, 30])
    doc_ids = torch.tensor([0, 0, 0, 1, 1, 2])
    assert next_token_labels(tokens, doc_ids).tolist() == [11, 12, -100, 21, -100, -100]
    rows = next_token_labels(tokens.view(2, 3), doc_ids.view(2, 3))
    assert rows.tolist() == [[11, 12, -100], [21, -100, -100]]  # rows never continue each other


def test_loss_sum_and_count_match_reference_cross_entropy():
    model = make_model()
    tokens = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    doc_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    logits = model(tokens, positions, doc_ids)
    loss_sum, count = next_token_loss(logits, tokens, doc_ids)
    assert count.item() == 5 and count.dtype == torch.int64
    idx = torch.tensor([0, 1, 2, 4, 5])
    ref = torch.nn.functional.cross_entropy(logits[idx], tokens[idx + 1], reduction="sum")
    assert torch.allclose(loss_sum, ref, rtol=1e-6)


def test_dropout_only_in_training_mode():
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16, dropout=0.5)
    model = make_model(cfg).train()
    t = torch.arange(8)
    z = torch.zeros(8, dtype=torch.long)
    torch.manual_seed(0)
    a = model(t, t, z)
    torch.manual_seed(1)
    assert not torch.equal(a, model(t, t, z))
    model.eval()
    assert torch.equal(model(t, t, z), model(t, t, z))

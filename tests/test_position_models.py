"""attn_lib.position_models: every scheme decodes like its full pass; the task is right."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from attn_lib import KVCache
from attn_lib.position_models import (
    SCHEMES,
    PositionalTransformer,
    recency_batch,
    sequence_accuracy,
)


def _model(scheme, causal=True):
    torch.manual_seed(0)
    model = PositionalTransformer(
        11,
        16,
        4,
        2,
        scheme=scheme,
        causal=causal,
        max_len=32,
        max_distance=6,
        num_buckets=8,
    )
    with torch.no_grad():  # make the position tables matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_decoding_with_caches_equals_the_full_pass(scheme):
    model = _model(scheme)
    tokens = torch.randint(0, 11, (2, 13), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    caches = [KVCache() for _ in model.blocks]
    parts = [model(tokens[:, a:b], caches) for a, b in [(0, 5), (5, 6), (6, 13)]]
    assert_close(torch.cat(parts, dim=1), full)
    assert len(caches[0]) == 13


@pytest.mark.parametrize("scheme", SCHEMES)
def test_only_positionless_attention_is_blind_to_order(scheme):
    model = _model(scheme, causal=False)
    tokens = torch.randint(0, 11, (1, 9), generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    same = torch.allclose(model(tokens)[:, perm], model(tokens[:, perm]))
    assert same == (scheme == "none")


def test_recency_targets_are_the_most_recent_symbol():
    tokens, targets = recency_batch(
        8, 40, vocab_size=7, generator=torch.Generator().manual_seed(0)
    )
    assert tokens.shape == targets.shape == (8, 40)
    assert 0 < (tokens > 0).float().mean() < 0.5
    for row, target in zip(tokens.tolist(), targets.tolist(), strict=True):
        last = 0
        for token, expected in zip(row, target, strict=True):
            last = token if token > 0 else last
            assert expected == last


def test_sequence_accuracy_is_per_position():
    class Oracle(torch.nn.Module):
        def forward(self, tokens):
            return torch.nn.functional.one_hot(tokens, 16).float()

    tokens, targets = recency_batch(4, 10, generator=torch.Generator().manual_seed(0))
    acc = sequence_accuracy(Oracle(), targets, targets)
    assert acc.shape == (10,) and (acc == 1).all()
    assert (sequence_accuracy(Oracle(), targets, targets + 1) == 0).all()


def test_bad_arguments_are_named():
    with pytest.raises(
        ValueError, match=r"scheme must be one of 'none', .*; got 'abs'"
    ):
        PositionalTransformer(5, scheme="abs")
    with pytest.raises(ValueError, match=r"embed_dim must be divisible by num_heads"):
        PositionalTransformer(5, 10, 4)
    model = PositionalTransformer(5, 8, 2, 1, scheme="learned", max_len=4)
    with pytest.raises(ValueError, match=r"sequence length must be at most max_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"p_symbol must be in \[0, 1\); got 1.5"):
        recency_batch(2, 3, p_symbol=1.5)

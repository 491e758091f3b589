"""attn_lib.masks converters between PyTorch's True = blocked and our True = may attend."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randn, random_mask
from torch import nn

import attn_lib

T, S, E = 7, 13, 8


def test_converters_invert_and_round_trip(gen):
    ours = random_mask(gen, T, S)
    blocked = attn_lib.to_torch_mask(ours)
    assert blocked.dtype == torch.bool and torch.equal(blocked, ~ours)
    assert torch.equal(attn_lib.from_torch_mask(blocked), ours)
    pad = attn_lib.padding_mask([13, 5], S)
    kpm = attn_lib.to_torch_key_padding_mask(pad)
    assert kpm.shape == (2, S) and kpm[1].tolist() == [False] * 5 + [True] * 8
    assert torch.equal(attn_lib.from_torch_mask(key_padding_mask=kpm), pad)


def test_both_masks_combine_and_unfold_heads(gen):
    b, h = 2, 3
    attn_mask = random_mask(gen, b * h, T, S, p=0.3)  # True = blocked
    kpm = random_mask(gen, b, S, p=0.3)
    ours = attn_lib.from_torch_mask(attn_mask, kpm, num_heads=h)
    assert ours.shape == (b, h, T, S)
    expected = ~attn_mask.view(b, h, T, S) & ~kpm[:, None, None, :]
    assert torch.equal(ours, expected)
    assert attn_lib.from_torch_mask() is None


def test_same_output_as_sdpa_and_attention_after_conversion(gen, device):
    q, k, v = (randn(gen, 2, 1, n, 4, device=device) for n in (T, S, S))
    blocked = attn_lib.to_torch_mask(random_mask(gen, T, S, device=device))
    blocked[:, 0] = False  # every query keeps a key: SDPA would give nan otherwise
    ours = attn_lib.from_torch_mask(blocked)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=ours)
    torch.testing.assert_close(attn_lib.attention(q, k, v, mask=ours), expected)
    inverted = F.scaled_dot_product_attention(q, k, v, attn_mask=blocked)
    assert not torch.allclose(inverted, expected)  # the convention matters


def test_same_output_as_nn_multihead_attention_after_conversion(gen):
    mha = nn.MultiheadAttention(E, 1, batch_first=True).double().eval()
    layer = attn_lib.SelfAttention.from_torch(mha).eval()
    x = randn(gen, 2, T, E)
    blocked = ~random_mask(gen, T, T)
    blocked.fill_diagonal_(False)  # every query keeps itself
    kpm = torch.tensor([[False] * T, [False] * 4 + [True] * 3])
    expected, _ = mha(x, x, x, attn_mask=blocked, key_padding_mask=kpm)
    torch.testing.assert_close(
        layer(x, mask=attn_lib.from_torch_mask(blocked, kpm)), expected
    )


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (
            lambda: attn_lib.from_torch_mask(torch.zeros(3, 3)),
            TypeError,
            r"attn_mask must be a bool tensor \(True = blocked\); got torch.float32 "
            r"— a float mask is additive: pass it as bias=",
        ),
        (
            lambda: attn_lib.from_torch_mask(
                torch.zeros(5, 3, 3, dtype=torch.bool), num_heads=2
            ),
            ValueError,
            r"attn_mask must have a first dim B\*H divisible by num_heads=2; got shape \(5, 3, 3\)",
        ),
        (
            lambda: attn_lib.from_torch_mask(
                key_padding_mask=torch.zeros(3, dtype=torch.bool)
            ),
            ValueError,
            r"key_padding_mask must have shape \(B, S\); got shape \(3,\)",
        ),
        (
            lambda: attn_lib.to_torch_mask([[True]]),
            TypeError,
            r"mask must be a bool torch.Tensor; got list",
        ),
        (
            lambda: attn_lib.to_torch_key_padding_mask(
                torch.ones(2, 3, 4, dtype=torch.bool)
            ),
            ValueError,
            r"mask must have shape \(B, 1, 1, S\) or \(B, S\); got shape \(2, 3, 4\)",
        ),
    ],
)
def test_bad_masks_are_named(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()

"""attn_lib.masks: causal and padding masks."""

import pytest
import torch

import attn_lib


def test_causal_square_is_lower_triangle():
    expected = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    assert torch.equal(attn_lib.causal_mask(4), expected)


@pytest.mark.parametrize("t,s", [(2, 5), (5, 2), (7, 13), (1, 9)])
def test_causal_bottom_right_rule(t, s):
    m = attn_lib.causal_mask(t, s)
    assert m.shape == (t, s) and m.dtype == torch.bool
    for i in range(t):
        for j in range(s):
            assert bool(m[i, j]) == (j <= i + (s - t))
    assert m[-1].all()  # the last query always sees every key


def test_padding_mask_masks_keys_and_broadcasts_over_queries():
    m = attn_lib.padding_mask([2, 0, 3], 4)
    assert m.shape == (3, 1, 1, 4) and m.dtype == torch.bool
    assert m[:, 0, 0].int().tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    from_tensor = attn_lib.padding_mask(torch.tensor([2, 0, 3]), 4)
    assert torch.equal(m, from_tensor)


def test_padding_changes_no_real_output():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 4, generator=g) for n in (3, 3, 3))
    pad = torch.randn(1, 1, 2, 4, generator=g)
    k2, v2 = torch.cat([k, pad], -2), torch.cat([v, pad], -2)
    out = attn_lib.attention(q, k, v)
    padded = attn_lib.attention(q, k2, v2, mask=attn_lib.padding_mask([3], 5))
    torch.testing.assert_close(out, padded)


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (
            lambda: attn_lib.causal_mask(0),
            ValueError,
            r"t must be a positive int; got 0",
        ),
        (
            lambda: attn_lib.causal_mask(3, 2.0),
            ValueError,
            r"s must be a positive int; got 2.0",
        ),
        (
            lambda: attn_lib.padding_mask([1, 5], 4),
            ValueError,
            r"lengths must be in \[0, s=4\]; got min 1, max 5",
        ),
        (
            lambda: attn_lib.padding_mask([-1], 4),
            ValueError,
            r"lengths must be in \[0, s=4\]; got min -1, max -1",
        ),
        (
            lambda: attn_lib.padding_mask([1.5], 4),
            TypeError,
            r"lengths must be a 1-D integer tensor or a list of ints; got \[1.5\]",
        ),
        (
            lambda: attn_lib.padding_mask(torch.tensor([1.0]), 4),
            TypeError,
            r"lengths must be a 1-D integer tensor or a list of ints; got torch.float32 tensor of shape \(1,\)",
        ),
        (
            lambda: attn_lib.padding_mask([], 4),
            ValueError,
            r"lengths must hold at least one length; got an empty sequence",
        ),
    ],
)
def test_bad_arguments_are_named(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_get_device_returns_an_available_device():
    d = attn_lib.get_device()
    assert d.type in {"cuda", "mps", "cpu"}
    assert d.type == ("cuda" if torch.cuda.is_available() else d.type)
    torch.ones(1, device=d)  # usable

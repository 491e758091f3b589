"""attn_lib.modules: SelfAttention and CausalSelfAttention."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randn
from torch import nn

import attn_lib
from attn_lib import reference

E, T = 12, 7


def _mha(gen, embed_dim=E, bias=True):
    """A single-head, batch-first nn.MultiheadAttention with seeded, non-zero biases."""
    mha = nn.MultiheadAttention(embed_dim, 1, batch_first=True, bias=bias)
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return mha.double().eval()


def _qkv(layer, x):
    with torch.no_grad():
        return layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)


@pytest.mark.parametrize("cls", [attn_lib.SelfAttention, attn_lib.CausalSelfAttention])
def test_output_and_weight_shapes(cls, gen):
    layer = cls(E, head_dim=5).double().eval()
    out, w = layer(randn(gen, 3, T, E), return_weights=True)
    assert out.shape == (3, T, E) and w.shape == (3, T, T)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, T, dtype=torch.float64))


def test_self_attention_matches_numpy_reference(gen):
    layer = attn_lib.SelfAttention(E, head_dim=5).double().eval()
    x = randn(gen, 2, T, E)
    q, k, v = _qkv(layer, x)
    ref_out, ref_w = reference.scaled_dot_product_attention(
        q.numpy(), k.numpy(), v.numpy()
    )
    with torch.no_grad():
        expected = layer.out_proj(torch.from_numpy(ref_out))
        out, w = layer(x, return_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(w, torch.from_numpy(ref_w))


@pytest.mark.parametrize("causal", [False, True])
def test_matches_scaled_dot_product_attention(causal, gen, device):
    cls = attn_lib.CausalSelfAttention if causal else attn_lib.SelfAttention
    layer = cls(E, head_dim=5).double().to(device).eval()
    x = randn(gen, 2, T, E, device=device)
    q, k, v = _qkv(layer, x)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, T, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.out_proj(expected))


@pytest.mark.parametrize("causal", [False, True])
def test_matches_nn_multihead_attention_with_copied_weights(causal, gen):
    mha = _mha(gen)
    cls = attn_lib.CausalSelfAttention if causal else attn_lib.SelfAttention
    layer = cls.from_torch(mha).eval()
    assert type(layer) is cls and next(layer.parameters()).dtype == torch.float64
    x = randn(gen, 3, T, E)
    blocked = attn_lib.to_torch_mask(attn_lib.causal_mask(T)) if causal else None
    expected, expected_w = mha(x, x, x, attn_mask=blocked)
    out, w = layer(x, return_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(w, expected_w)


def test_padding_mask_matches_nn_multihead_attention(gen):
    mha = _mha(gen, bias=False)
    layer = attn_lib.SelfAttention.from_torch(mha).eval()
    x = randn(gen, 3, T, E)
    mask = attn_lib.padding_mask([7, 4, 1], T)
    kpm = attn_lib.to_torch_key_padding_mask(mask)
    expected, _ = mha(x, x, x, key_padding_mask=kpm)
    torch.testing.assert_close(layer(x, mask=mask), expected)


def test_permutation_equivariance_without_positions(gen):
    layer = attn_lib.SelfAttention(E).double().eval()
    x = randn(gen, 2, T, E)
    perm = torch.randperm(T, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm])


def test_causal_outputs_ignore_later_tokens(gen):
    layer = attn_lib.CausalSelfAttention(E).double().eval()
    x = randn(gen, 2, 13, E)
    changed = x.clone()
    changed[:, 5:] = randn(gen, 2, 8, E)
    with torch.no_grad():
        torch.testing.assert_close(layer(changed)[:, :5], layer(x)[:, :5])
        assert not torch.allclose(layer(changed)[:, 5:], layer(x)[:, 5:])


@pytest.mark.parametrize("chunks", [[1] * 13, [4, 1, 5, 3], [13]])
def test_cached_decoding_equals_full_pass(chunks, gen, device):
    layer = attn_lib.CausalSelfAttention(E, head_dim=5).double().to(device).eval()
    x = randn(gen, 2, 13, E, device=device)
    cache, outs, start = attn_lib.KVCache(), [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(layer(x[:, start : start + n], cache=cache))
            start += n
        assert len(cache) == 13
        torch.testing.assert_close(torch.cat(outs, 1), layer(x))


def test_cache_with_padding_mask_equals_full_pass(gen):
    layer = attn_lib.CausalSelfAttention(E).double().eval()
    x = randn(gen, 2, 9, E)
    pad = attn_lib.padding_mask([9, 6], 9)  # (B, 1, 1, S)
    cache = attn_lib.KVCache()
    with torch.no_grad():
        first = layer(x[:, :6], mask=pad[..., :6], cache=cache)
        rest = layer(x[:, 6:], mask=pad, cache=cache)
        full = layer(x, mask=pad)
    torch.testing.assert_close(torch.cat([first, rest], 1)[0], full[0])
    torch.testing.assert_close(first[1], full[1, :6])


def test_query_that_may_attend_to_nothing_gets_zero_attention(gen):
    layer = attn_lib.SelfAttention(E, bias=False).double()
    x = randn(gen, 1, T, E, dtype=torch.float64).requires_grad_()
    mask = torch.ones(T, T, dtype=torch.bool)
    mask[2] = False
    out, w = layer(x, mask=mask, return_weights=True)
    assert w[0, 2].eq(0).all() and out[0, 2].eq(0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_dropout_only_in_training_mode(gen):
    layer = attn_lib.SelfAttention(E, dropout=0.5).double()
    x = randn(gen, 2, T, E)
    torch.manual_seed(0)
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_backends_agree(gen):
    x = randn(gen, 2, T, E)
    math_layer = attn_lib.CausalSelfAttention(E, backend="math").double().eval()
    sdpa_layer = attn_lib.CausalSelfAttention(E, backend="sdpa").double().eval()
    sdpa_layer.load_state_dict(math_layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(math_layer(x), sdpa_layer(x))


def test_inputs_are_not_written_into(gen):
    layer = attn_lib.CausalSelfAttention(E).double().eval()
    x, mask = randn(gen, 2, T, E), attn_lib.causal_mask(T)
    x0, mask0 = x.clone(), mask.clone()
    layer(x, mask=mask)
    assert torch.equal(x, x0) and torch.equal(mask, mask0)


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (
            lambda: attn_lib.SelfAttention(0),
            ValueError,
            r"embed_dim must be a positive int; got 0",
        ),
        (
            lambda: attn_lib.SelfAttention(4, dropout=1.0),
            ValueError,
            r"dropout must be in \[0, 1\); got 1.0",
        ),
        (
            lambda: attn_lib.SelfAttention(4)(torch.ones(2, 3, 5)),
            ValueError,
            r"x must have shape \(B, T, 4\); got shape \(2, 3, 5\)",
        ),
        (
            lambda: attn_lib.SelfAttention(4)(
                torch.ones(2, 3, 4), mask=torch.ones(3, 3)
            ),
            TypeError,
            r"mask must be a bool tensor \(True = may attend\); got torch.float32",
        ),
        (
            lambda: attn_lib.SelfAttention(4)(
                torch.ones(2, 3, 4), mask=torch.ones(2, 3, 3, dtype=torch.bool)
            ),
            ValueError,
            r"mask must be broadcastable to \(2, 1, 3, 3\); got shape \(2, 3, 3\)",
        ),
        (
            lambda: attn_lib.CausalSelfAttention(4)(torch.ones(1, 3, 4), cache={}),
            TypeError,
            r"cache must be an attn_lib.KVCache or None; got dict",
        ),
        (
            lambda: attn_lib.SelfAttention.from_torch(
                nn.MultiheadAttention(4, 2, batch_first=True)
            ),
            ValueError,
            r"mha must be single-head and batch-first.*; got num_heads=2",
        ),
        (
            lambda: attn_lib.SelfAttention.from_torch(nn.Linear(4, 4)),
            TypeError,
            r"mha must be an nn.MultiheadAttention; got Linear",
        ),
    ],
)
def test_bad_arguments_are_named(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()

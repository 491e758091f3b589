"""attn_lib.multihead: head split/merge, MultiHeadAttention against PyTorch and NumPy."""

import numpy as np
import pytest
import torch
from conftest import randn, random_mask
from torch import nn

import attn_lib
from attn_lib import MultiHeadAttention, merge_heads, repeat_kv_heads, split_heads
from attn_lib.reference import scaled_dot_product_attention as np_attention

F64 = torch.float64


def torch_mha(embed_dim, num_heads, *, device, batch_first=True, **kwargs):
    """A seeded float64 nn.MultiheadAttention in eval mode, with non-zero biases."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(
        embed_dim, num_heads, batch_first=batch_first, dtype=F64, **kwargs
    )
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)  # PyTorch starts biases at 0; test them
    return mha.to(device).eval()


def call_torch(mha, x, k, v, **kwargs):
    """Run ``mha`` on batch-first tensors whatever its ``batch_first``."""
    if not mha.batch_first:
        x, k, v = (t.transpose(0, 1) for t in (x, k, v))
    out, weights = mha(x, k, v, average_attn_weights=False, **kwargs)
    return (out if mha.batch_first else out.transpose(0, 1)), weights


# ---------------------------------------------------------------- split, merge


@pytest.mark.parametrize("shape", [(2, 7, 12), (7, 12), (2, 3, 5, 12)])
@pytest.mark.parametrize("heads", [1, 3, 4])
def test_split_then_merge_is_the_identity(gen, shape, heads):
    x = randn(gen, *shape)
    parts = split_heads(x, heads)
    assert parts.shape == (*shape[:-2], heads, shape[-2], 12 // heads)
    torch.testing.assert_close(merge_heads(parts), x, rtol=0, atol=0)


def test_head_h_holds_features_h_of_every_token(gen):
    x = randn(gen, 2, 7, 12)
    parts = split_heads(x, 3)  # (2, 3, 7, 4)
    for h in range(3):
        torch.testing.assert_close(parts[:, h], x[..., 4 * h : 4 * (h + 1)])
    wrong = x.reshape(2, 3, 7, 4)  # a reshape without the transpose
    assert not torch.equal(wrong, parts)
    torch.testing.assert_close(wrong.reshape(2, 7, 12), x)  # and yet it round-trips


def test_repeat_kv_heads_groups_consecutive_query_heads():
    x = torch.arange(3.0).view(1, 3, 1, 1)  # 3 key/value heads
    assert repeat_kv_heads(x, 2).flatten().tolist() == [0, 0, 1, 1, 2, 2]
    assert repeat_kv_heads(x, 1) is x


def test_split_heads_checks_divisibility():
    with pytest.raises(
        ValueError,
        match=r"x.shape\[-1\] must be divisible by num_heads; "
        r"got x.shape\[-1\]=10, num_heads=4",
    ):
        split_heads(torch.ones(2, 3, 10), 4)


# ---------------------------------------------------- against nn.MultiheadAttention


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_matches_torch(gen, device, bias, batch_first):
    mha = torch_mha(12, 3, device=device, bias=bias, batch_first=batch_first)
    ours = MultiHeadAttention.from_torch(mha)
    assert not ours.training and ours.q_proj.weight.dtype == F64
    x = randn(gen, 2, 7, 12, device=device)
    expected, expected_weights = call_torch(mha, x, x, x)
    out, weights = ours(x, return_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)  # (B, H, T, S) per head


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kdim, vdim", [(None, None), (5, 5), (5, 11)])
def test_cross_attention_with_masks_matches_torch(gen, device, bias, kdim, vdim):
    mha = torch_mha(12, 4, device=device, bias=bias, kdim=kdim, vdim=vdim)
    ours = MultiHeadAttention.from_torch(mha)
    x = randn(gen, 2, 7, 12, device=device)
    keys_in = randn(gen, 2, 13, kdim or 12, device=device)
    values_in = keys_in if kdim == vdim else randn(gen, 2, 13, vdim, device=device)
    allowed = random_mask(gen, 7, 13, device=device)
    allowed[:, 0] = True  # every query may attend to something
    real = attn_lib.padding_mask([13, 9], 13, device=device)  # (B, 1, 1, S)

    expected, expected_weights = call_torch(
        mha, x, keys_in, values_in, attn_mask=~allowed, key_padding_mask=~real[:, 0, 0]
    )
    context = keys_in if kdim == vdim else (keys_in, values_in)
    out, weights = ours(x, context, mask=allowed & real, return_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)


def test_additive_bias_matches_torch_float_attn_mask(gen, device):
    mha = torch_mha(12, 3, device=device)
    ours = MultiHeadAttention.from_torch(mha)
    x, context = (
        randn(gen, 2, 7, 12, device=device),
        randn(gen, 2, 13, 12, device=device),
    )
    bias = randn(gen, 2, 3, 7, 13, device=device)  # (B, H, T, S)
    expected, _ = call_torch(mha, x, context, context, attn_mask=bias.flatten(0, 1))
    torch.testing.assert_close(ours(x, context, bias=bias), expected)


def test_causal_matches_torch_with_a_blocked_upper_triangle(gen, device):
    mha = torch_mha(12, 4, device=device)
    ours = MultiHeadAttention.from_torch(mha, causal=True)
    x = randn(gen, 3, 7, 12, device=device)
    blocked = ~attn_lib.causal_mask(7, device=device)  # PyTorch: True = blocked
    expected, _ = call_torch(mha, x, x, x, attn_mask=blocked)
    torch.testing.assert_close(ours(x), expected)


def test_from_torch_copies_dropout_and_training_mode(device):
    mha = torch_mha(12, 3, device=device, dropout=0.25).train()
    ours = MultiHeadAttention.from_torch(mha)
    assert ours.training and ours.dropout == 0.25


# ------------------------------------------------------------ against NumPy


def numpy_mha(module, x, context):
    """Multi-head attention with one NumPy attention call per head, then concat."""
    w = {n: p.detach().cpu().numpy() for n, p in module.named_parameters()}
    q = x @ w["q_proj.weight"].T + w["q_proj.bias"]  # (B, T, E)
    k = context @ w["k_proj.weight"].T + w["k_proj.bias"]  # (B, S, Hkv*D)
    v = context @ w["v_proj.weight"].T + w["v_proj.bias"]  # (B, S, Hkv*D)
    d, groups = module.head_dim, module.num_heads // module.num_kv_heads
    heads = []
    for h in range(module.num_heads):
        g = h // groups
        cols, kv_cols = slice(h * d, (h + 1) * d), slice(g * d, (g + 1) * d)
        out, _ = np_attention(q[..., cols], k[..., kv_cols], v[..., kv_cols])
        heads.append(out)  # (B, T, D)
    merged = np.concatenate(heads, axis=-1)  # (B, T, E)
    return merged @ w["out_proj.weight"].T + w["out_proj.bias"]


@pytest.mark.parametrize("num_kv_heads", [6, 3, 2, 1])
def test_matches_a_per_head_numpy_loop(gen, num_kv_heads):
    torch.manual_seed(0)
    ours = MultiHeadAttention(12, 6, num_kv_heads=num_kv_heads).to(F64)
    x, context = randn(gen, 2, 7, 12), randn(gen, 2, 13, 12)
    expected = numpy_mha(ours, x.numpy(), context.numpy())
    torch.testing.assert_close(ours(x, context), torch.from_numpy(expected))


# ------------------------------------------------------------ grouped-query


def test_gqa_with_as_many_kv_heads_as_heads_is_plain_mha(gen):
    mha = torch_mha(12, 4, device="cpu")
    plain = MultiHeadAttention.from_torch(mha)
    gqa = MultiHeadAttention(12, 4, num_kv_heads=4).to(F64)
    gqa.load_state_dict(plain.state_dict())
    x = randn(gen, 2, 7, 12)
    torch.testing.assert_close(gqa(x), plain(x))
    torch.testing.assert_close(gqa(x), call_torch(mha, x, x, x)[0])


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_gqa_equals_mha_with_kv_weights_repeated_per_group(gen, num_kv_heads):
    torch.manual_seed(0)
    gqa = MultiHeadAttention(12, 4, num_kv_heads=num_kv_heads).to(F64)
    mha = MultiHeadAttention(12, 4).to(F64)
    groups, d = 4 // num_kv_heads, gqa.head_dim
    state = dict(gqa.state_dict())
    for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
        per_head = state[name].unflatten(0, (num_kv_heads, d))  # (Hkv, D, ...)
        state[name] = per_head.repeat_interleave(groups, dim=0).flatten(0, 1)
    mha.load_state_dict(state)
    x = randn(gen, 2, 7, 12)
    torch.testing.assert_close(gqa(x), mha(x))


@pytest.mark.parametrize("num_kv_heads, kv_width", [(8, 64), (2, 16), (1, 8)])
def test_kv_projections_shrink_with_fewer_kv_heads(num_kv_heads, kv_width):
    module = MultiHeadAttention(64, 8, num_kv_heads=num_kv_heads)
    assert module.k_proj.weight.shape == (kv_width, 64)
    assert module.v_proj.weight.shape == (kv_width, 64)
    assert module.q_proj.weight.shape == module.out_proj.weight.shape == (64, 64)


# ------------------------------------------------------------ cache


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1]])
def test_cached_decoding_equals_the_full_causal_pass(gen, device, num_kv_heads, chunks):
    torch.manual_seed(0)
    module = MultiHeadAttention(12, 4, num_kv_heads=num_kv_heads, causal=True)
    module = module.to(device=device, dtype=F64).eval()
    x = randn(gen, 2, 9, 12, device=device)
    bias = randn(gen, 4, 9, 9, device=device)  # (H, T, S), e.g. a position bias
    full, full_weights = module(x, bias=bias, return_weights=True)

    cache, outs, start = attn_lib.KVCache(), [], 0
    for n in chunks:
        rows = slice(start, start + n)
        step_bias = bias[:, rows, : start + n]  # (H, n, S so far)
        out, w = module(x[:, rows], bias=step_bias, cache=cache, return_weights=True)
        torch.testing.assert_close(w, full_weights[:, :, rows, : start + n])
        outs.append(out)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full)
    assert cache.keys.shape == (2, num_kv_heads, 9, 3)  # (B, Hkv, S, D): not H


# ------------------------------------------------------------ behaviour


def test_dropout_applies_only_in_training(gen):
    torch.manual_seed(0)
    module = MultiHeadAttention(12, 3, dropout=0.5).to(F64)
    plain = MultiHeadAttention(12, 3).to(F64)
    plain.load_state_dict(module.state_dict())
    x = randn(gen, 2, 7, 12)
    module.eval()
    torch.testing.assert_close(module(x), plain(x))
    torch.testing.assert_close(module(x), module(x), rtol=0, atol=0)
    module.train()
    _, weights = module(x, return_weights=True)
    assert (weights == 0).any() and not torch.allclose(module(x), plain(x))


def test_a_query_that_may_attend_to_nothing_gets_only_the_output_bias(gen):
    torch.manual_seed(0)
    module = MultiHeadAttention(12, 3).to(F64)
    x = randn(gen, 2, 7, 12).requires_grad_()
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[2] = False  # query 2 sees nothing
    out = module(x, mask=mask)
    torch.testing.assert_close(out[:, 2], module.out_proj.bias.expand(2, 12))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_inputs_are_not_written_into(gen):
    module = MultiHeadAttention(12, 3).to(F64)
    x = randn(gen, 2, 7, 12)
    before = x.clone()
    module(x, mask=torch.ones(7, 7, dtype=torch.bool), cache=attn_lib.KVCache())
    assert torch.equal(x, before)


# ------------------------------------------------------------ errors


def test_constructor_errors_are_pinned():
    with pytest.raises(
        ValueError,
        match=r"embed_dim must be divisible by num_heads; got embed_dim=96, num_heads=5",
    ):
        MultiHeadAttention(96, 5)
    with pytest.raises(
        ValueError,
        match=r"num_heads must be divisible by num_kv_heads; "
        r"got num_heads=8, num_kv_heads=3",
    ):
        MultiHeadAttention(64, 8, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"num_kv_heads must be a positive int; got 0"):
        MultiHeadAttention(64, 8, num_kv_heads=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\); got 1.0"):
        MultiHeadAttention(64, 8, dropout=1.0)
    with pytest.raises(TypeError, match=r"causal must be a bool; got 'yes'"):
        MultiHeadAttention(64, 8, causal="yes")


def test_forward_errors_are_pinned():
    module = MultiHeadAttention(12, 3)
    with pytest.raises(
        ValueError, match=r"x must have shape \(B, L, 12\); got shape \(2, 7, 8\)"
    ):
        module(torch.ones(2, 7, 8))
    with pytest.raises(
        ValueError,
        match=r"context \(keys input\) must have shape \(2, L, 12\); "
        r"got shape \(3, 5, 12\)",
    ):
        module(torch.ones(2, 7, 12), torch.ones(3, 5, 12))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor \(True = may"):
        module(torch.ones(2, 7, 12), mask=torch.zeros(7, 7))
    with pytest.raises(
        ValueError, match=r"mask must be broadcastable to \(2, 3, 7, 7\)"
    ):
        module(torch.ones(2, 7, 12), mask=torch.ones(7, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cache must be None when context is given"):
        module(torch.ones(2, 7, 12), torch.ones(2, 5, 12), cache=attn_lib.KVCache())
    with pytest.raises(TypeError, match=r"cache must be an attn_lib.KVCache; got dict"):
        module(torch.ones(2, 7, 12), cache={})


def test_context_errors_are_pinned():
    x = torch.ones(2, 7, 12)
    with pytest.raises(
        ValueError,
        match=r"context must be given when kdim=5 or vdim=11 differs from "
        r"embed_dim=12; got None",
    ):
        MultiHeadAttention(12, 3, kdim=5, vdim=11)(x)
    with pytest.raises(
        TypeError,
        match=r"context must be a pair \(keys input, values input\) when kdim=5 "
        r"!= vdim=11; got a single tensor",
    ):
        MultiHeadAttention(12, 3, kdim=5, vdim=11)(x, torch.ones(2, 4, 5))
    with pytest.raises(
        ValueError,
        match=r"context \(keys input\) and context \(values input\) must have the "
        r"same length S; got 4 and 6",
    ):
        MultiHeadAttention(12, 3, kdim=5, vdim=11)(
            x, (torch.ones(2, 4, 5), torch.ones(2, 6, 11))
        )


def test_from_torch_refuses_what_it_cannot_copy():
    with pytest.raises(
        ValueError,
        match=r"mha must have add_bias_kv=False and add_zero_attn=False; "
        r"got add_bias_kv=True, add_zero_attn=False",
    ):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(TypeError, match=r"mha must be an nn.MultiheadAttention"):
        MultiHeadAttention.from_torch(nn.Linear(2, 2))


def test_input_of_another_dtype_is_named():
    mha = attn_lib.MultiHeadAttention(16, 4)
    with pytest.raises(
        TypeError,
        match=r"x must have the module's dtype torch.float32; got torch.float64",
    ):
        mha(torch.randn(2, 6, 16, dtype=torch.float64))

"""attn_lib.CrossAttention against the NumPy reference and nn.MultiheadAttention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randn
from torch import nn

from attn_lib import CrossAttention, padding_mask, reference

B, T, S, E, KDIM = 3, 7, 13, 8, 5


def _layer(kdim=KDIM, bias=True, dropout=0.0, device="cpu"):
    torch.manual_seed(0)
    return CrossAttention(E, kdim=kdim, bias=bias, dropout=dropout).to(
        dtype=torch.float64, device=device
    )


def _numpy_cross(layer, x, context, mask=None):
    """The same computation written with the NumPy reference, in float64."""

    def lin(proj, inp):
        w = proj.weight.detach().cpu().numpy()
        b = 0.0 if proj.bias is None else proj.bias.detach().cpu().numpy()
        return inp @ w.T + b

    x, c = x.detach().cpu().numpy(), context.detach().cpu().numpy()
    q, k, v = lin(layer.q_proj, x), lin(layer.k_proj, c), lin(layer.v_proj, c)
    m = None if mask is None else mask.cpu().numpy()[:, 0]  # (B, 1, S) or (B, T, S)
    out, weights = reference.scaled_dot_product_attention(q, k, v, m)
    return lin(layer.out_proj, out), weights


@pytest.mark.parametrize("kdim", [KDIM, E])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_numpy_reference_with_t_not_equal_s(device, gen, kdim, bias):
    layer = _layer(kdim, bias, device=device)
    x, c = randn(gen, B, T, E, device=device), randn(gen, B, S, kdim, device=device)
    out, weights = layer(x, c, return_weights=True)
    ref_out, ref_weights = _numpy_cross(layer, x, c)
    assert out.shape == (B, T, E) and weights.shape == (B, T, S)
    torch.testing.assert_close(out.cpu(), torch.from_numpy(ref_out))
    torch.testing.assert_close(weights.cpu(), torch.from_numpy(ref_weights))
    torch.testing.assert_close(layer(x, c), out)  # the fused path agrees


def test_matches_numpy_reference_with_padding_mask(device, gen):
    layer = _layer(device=device)
    x, c = randn(gen, B, T, E, device=device), randn(gen, B, S, KDIM, device=device)
    mask = padding_mask([S, 4, 9], S, device=device)
    out, weights = layer(x, c, mask=mask, return_weights=True)
    ref_out, ref_weights = _numpy_cross(layer, x, c, mask)
    torch.testing.assert_close(out.cpu(), torch.from_numpy(ref_out))
    torch.testing.assert_close(weights.cpu(), torch.from_numpy(ref_weights))


@pytest.mark.parametrize("kdim", [KDIM, E])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_multihead_attention_used_as_cross_attention(
    device, gen, kdim, bias
):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(
        E, 1, kdim=kdim, vdim=kdim, bias=bias, batch_first=True
    ).to(dtype=torch.float64, device=device)
    mha.eval()
    layer = CrossAttention.from_torch(mha)
    x, c = randn(gen, B, T, E, device=device), randn(gen, B, S, kdim, device=device)
    lengths = [S, 4, 9]
    mask = padding_mask(lengths, S, device=device)
    expected, expected_w = mha(x, c, c, key_padding_mask=~mask[:, 0, 0])
    out, weights = layer(x, c, mask=mask, return_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_w)


def test_from_torch_copies_without_sharing_storage():
    mha = nn.MultiheadAttention(E, 1, batch_first=True)
    layer = CrossAttention.from_torch(mha)
    with torch.no_grad():
        layer.q_proj.weight.zero_()
    assert mha.in_proj_weight[:E].abs().sum() > 0


def test_padded_source_tokens_get_zero_weight_and_padding_changes_nothing(gen):
    layer = _layer()
    lengths = [S, 4, 9]
    x = randn(gen, B, T, E)
    sentences = [randn(gen, 1, n, KDIM) for n in lengths]

    # Pad with large junk values: masked keys must not leak into the output.
    c = torch.full((B, S, KDIM), 1e3, dtype=torch.float64)
    for b, sentence in enumerate(sentences):
        c[b, : lengths[b]] = sentence[0]
    out, weights = layer(x, c, mask=padding_mask(lengths, S), return_weights=True)

    for b, n in enumerate(lengths):
        assert torch.all(weights[b, :, n:] == 0)
        torch.testing.assert_close(weights[b].sum(-1), torch.ones(T, dtype=c.dtype))
        alone = layer(x[b : b + 1], sentences[b])  # no padding, no mask
        torch.testing.assert_close(out[b : b + 1], alone)


def test_permuting_context_with_its_mask_leaves_output_unchanged(gen):
    layer = _layer()
    x, c = randn(gen, B, T, E), randn(gen, B, S, KDIM)
    mask = padding_mask([S, 4, 9], S)
    perm = torch.randperm(S, generator=gen)
    out = layer(x, c, mask=mask)
    torch.testing.assert_close(layer(x, c[:, perm], mask=mask[..., perm]), out)


def test_query_with_nothing_to_attend_gets_zero_weights_and_finite_grads(gen):
    layer = _layer()
    x = randn(gen, B, T, E)
    c = randn(gen, B, S, KDIM).requires_grad_()
    mask = padding_mask([S, 0, 9], S)  # sentence 1 is empty
    out, weights = layer(x, c, mask=mask, return_weights=True)
    assert torch.all(weights[1] == 0)
    torch.testing.assert_close(out[1], layer.out_proj.bias.expand(T, E))
    out.sum().backward()
    assert torch.isfinite(c.grad).all() and torch.all(c.grad[1] == 0)


def test_gradients_match_finite_differences(gen):
    layer = _layer()
    x = randn(gen, 2, 3, E).requires_grad_()
    c = randn(gen, 2, 5, KDIM).requires_grad_()
    mask = padding_mask([5, 2], 5)
    assert torch.autograd.gradcheck(lambda x, c: layer(x, c, mask=mask), (x, c))


def test_dropout_only_in_training(gen):
    layer = _layer(dropout=0.5)
    plain = _layer(dropout=0.0)  # same seed, same weights
    x, c = randn(gen, B, T, E), randn(gen, B, S, KDIM)
    layer.eval()
    torch.testing.assert_close(layer(x, c), plain(x, c))
    torch.testing.assert_close(layer(x, c), layer(x, c))
    layer.train()
    torch.manual_seed(0)
    _, weights = layer(x, c, return_weights=True)
    assert (weights == 0).any()  # some weights were dropped
    assert not torch.allclose(layer(x, c), plain(x, c))


def test_inputs_are_not_modified(gen):
    layer = _layer()
    x, c = randn(gen, B, T, E), randn(gen, B, S, KDIM)
    mask = padding_mask([S, 4, 9], S)
    before = [t.clone() for t in (x, c, mask)]
    layer(x, c, mask=mask, return_weights=True)
    for t, b in zip((x, c, mask), before, strict=True):
        assert torch.equal(t, b)


def test_numpy_reference_is_independent_of_torch_helpers(gen):
    # The oracle itself: the weights of one query are a softmax over S keys.
    layer = _layer()
    x, c = randn(gen, 1, T, E), randn(gen, 1, S, KDIM)
    _, w = _numpy_cross(layer, x, c)
    np.testing.assert_allclose(w.sum(-1), np.ones((1, T)))


def test_bad_arguments_are_named(gen):
    layer = _layer()
    x, c = randn(gen, B, T, E), randn(gen, B, S, KDIM)
    with pytest.raises(ValueError, match=r"embed_dim must be a positive int; got 0"):
        CrossAttention(0)
    with pytest.raises(ValueError, match=r"kdim must be a positive int; got -2"):
        CrossAttention(4, kdim=-2)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\); got 1.0"):
        CrossAttention(4, dropout=1.0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, 8\); got shape"):
        layer(x[0], c)
    with pytest.raises(
        ValueError, match=r"context must have shape \(B, S, 5\); got shape \(3, 13, 8\)"
    ):
        layer(x, x.new_zeros(B, S, E))
    with pytest.raises(ValueError, match=r"x and context must have the same batch"):
        layer(x, c[:2])
    with pytest.raises(TypeError, match=r"x and context must have the same dtype"):
        layer(x, c.float())
    with pytest.raises(TypeError, match=r"context must be a torch.Tensor; got list"):
        layer(x, [[1.0]])


def test_bad_masks_are_named(gen):
    layer = _layer()
    x, c = randn(gen, B, T, E), randn(gen, B, S, KDIM)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor .* bias="):
        layer(x, c, mask=torch.ones(B, 1, 1, S))
    with pytest.raises(
        ValueError, match=r"mask must be broadcastable to \(3, 1, 7, 13\); got shape"
    ):
        layer(x, c, mask=torch.ones(B, 1, 1, T, dtype=torch.bool))


def test_from_torch_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match=r"mha must have num_heads=1, batch_first"):
        CrossAttention.from_torch(nn.MultiheadAttention(8, 2, batch_first=True))
    with pytest.raises(ValueError, match=r"batch_first=False"):
        CrossAttention.from_torch(nn.MultiheadAttention(8, 1))
    with pytest.raises(TypeError, match=r"mha must be an nn.MultiheadAttention"):
        CrossAttention.from_torch(nn.Linear(2, 2))

"""attn_lib.attention on every backend: against the NumPy reference and PyTorch."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import numpy_reference, randn, random_mask

import attn_lib

BACKENDS = [b for b in attn_lib.available_backends() if b != "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 13), (13, 7), (1, 1), (2, 3, 7, 13)])
def test_matches_reference_on_unequal_lengths(backend, shape, gen, device):
    *lead, t, s = shape
    q = randn(gen, *lead, t, 5, device=device)
    k = randn(gen, *lead, s, 5, device=device)
    v = randn(gen, *lead, s, 3, device=device)
    out = attn_lib.attention(q, k, v, backend=backend)
    expected, _ = numpy_reference(q, k, v)
    torch.testing.assert_close(out.cpu(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_sdpa_with_mask_and_scale(backend, gen, device):
    q, k, v = (randn(gen, 2, 3, n, 8, device=device) for n in (7, 13, 13))
    mask = random_mask(gen, 2, 1, 7, 13, device=device)
    mask[..., 0] = True  # every query sees something: torch's own kernel would give nan
    out = attn_lib.attention(q, k, v, mask=mask, scale=0.3, backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_is_inverse_sqrt_d(backend, gen):
    q, k, v = randn(gen, 7, 16), randn(gen, 13, 16), randn(gen, 13, 4)
    default = attn_lib.attention(q, k, v, backend=backend)
    explicit = attn_lib.attention(q, k, v, scale=1 / math.sqrt(16), backend=backend)
    unscaled = attn_lib.attention(q, k, v, scale=1.0, backend=backend)
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default, unscaled)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_rows_sum_to_one_and_reproduce_output(backend, gen):
    q, k, v = randn(gen, 7, 4), randn(gen, 13, 4), randn(gen, 13, 2)
    out, w = attn_lib.attention(q, k, v, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(7, dtype=w.dtype))
    torch.testing.assert_close(out, w @ v)
    torch.testing.assert_close(out, attn_lib.attention(q, k, v, backend=backend))


# --- a query that may attend to nothing ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_query_gives_zero_output_from_issue_example(backend):
    q = torch.tensor([[1.0], [1.0]])
    k = torch.tensor([[1.0], [2.0]])
    v = torch.tensor([[10.0], [20.0]])
    mask = torch.tensor([[True, True], [False, False]])
    out = attn_lib.attention(q, k, v, mask=mask, scale=1.0, backend=backend)
    torch.testing.assert_close(out, torch.tensor([[17.310586], [0.0]]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("via", ["mask", "bias", "causal"])
def test_fully_masked_rows_have_zero_output_and_finite_zero_grads(
    backend, via, gen, device
):
    q = randn(gen, 2, 5, 4, device=device).requires_grad_()
    k = randn(gen, 2, 3, 4, device=device).requires_grad_()
    v = randn(gen, 2, 3, 2, device=device).requires_grad_()
    kwargs = {}
    empty_rows = [0, 1]
    if via == "mask":
        mask = torch.ones(2, 5, 3, dtype=torch.bool, device=device)
        mask[:, :2] = False
        kwargs["mask"] = mask
    elif via == "bias":
        bias = torch.zeros(5, 3, dtype=q.dtype, device=device)
        bias[:2] = float("-inf")
        kwargs["bias"] = bias
    else:  # T=5 > S=3: bottom-right alignment leaves the first two queries empty
        kwargs["is_causal"] = True
    out = attn_lib.attention(q, k, v, backend=backend, **kwargs)
    assert torch.isfinite(out).all()
    assert (out[:, empty_rows] == 0).all()
    out.square().sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(t.grad).all(), name
    assert (q.grad[:, empty_rows] == 0).all()


def test_fully_masked_rows_agree_with_and_without_weights(gen):
    q, k, v = randn(gen, 4, 3), randn(gen, 6, 3), randn(gen, 6, 2)
    mask = random_mask(gen, 4, 6)
    mask[2] = False
    plain = attn_lib.attention(q, k, v, mask=mask)
    out, w = attn_lib.attention(q, k, v, mask=mask, return_weights=True)
    torch.testing.assert_close(plain, out)
    assert (w[2] == 0).all() and (out[2] == 0).all()
    torch.testing.assert_close(
        w.sum(-1), torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=w.dtype)
    )


# --- causal alignment ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_is_bottom_right_aligned_issue_example(backend):
    q = torch.zeros(3, 1)
    k = torch.zeros(2, 1)
    v = torch.tensor([[1.0], [2.0]])
    out = attn_lib.attention(q, k, v, is_causal=True, backend=backend)
    torch.testing.assert_close(out, torch.tensor([[0.0], [1.0], [1.5]]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,s", [(7, 7), (7, 13), (13, 7)])
def test_causal_equals_explicit_bottom_right_mask(backend, t, s, gen, device):
    q, k, v = (
        randn(gen, t, 4, device=device),
        randn(gen, s, 4, device=device),
        randn(gen, s, 3, device=device),
    )
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    explicit = j <= i + (s - t)
    out = attn_lib.attention(q, k, v, is_causal=True, backend=backend)
    expected, _ = numpy_reference(q, k, v, explicit)
    torch.testing.assert_close(out.cpu(), expected)


def test_causal_differs_from_torch_top_left_when_lengths_differ(gen):
    q, k, v = randn(gen, 3, 4), randn(gen, 5, 4), randn(gen, 5, 2)
    ours = attn_lib.attention(q, k, v, is_causal=True)
    torch_top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(ours, torch_top_left)
    # with a square problem the two alignments agree
    torch.testing.assert_close(
        attn_lib.attention(q, q, q, is_causal=True),
        F.scaled_dot_product_attention(q, q, q, is_causal=True),
    )


# --- bias ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_is_added_to_scaled_scores(backend, gen):
    q, k, v = randn(gen, 2, 7, 4), randn(gen, 2, 13, 4), randn(gen, 2, 13, 3)
    bias = randn(gen, 7, 13)
    mask = random_mask(gen, 7, 13)
    mask[:, 0] = True
    out = attn_lib.attention(q, k, v, mask=mask, bias=bias, backend=backend)
    scores = q @ k.transpose(-2, -1) / 2.0 + bias
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(out, expected)


# --- low precision -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1.0, 30.0])
def test_low_precision_error_within_twice_torch(backend, dtype, magnitude, gen, device):
    q = randn(gen, 2, 4, 33, 64, device=device) * magnitude
    k = randn(gen, 2, 4, 47, 64, device=device) * magnitude
    v = randn(gen, 2, 4, 47, 64, device=device)
    golden = F.scaled_dot_product_attention(q, k, v)  # float64
    lo = [t.to(dtype) for t in (q, k, v)]
    ours = attn_lib.attention(*lo, backend=backend)
    theirs = F.scaled_dot_product_attention(*lo)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    our_err = (ours.double() - golden).abs().max().item()
    torch_err = (theirs.double() - golden).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-6, (our_err, torch_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_scores_that_overflow_stay_finite(backend, gen):
    q = torch.full((4, 64), 40.0, dtype=torch.float16)  # raw q.k = 102400 > fp16 max
    k = torch.full((6, 64), 40.0, dtype=torch.float16)
    v = randn(gen, 6, 8, dtype=torch.float16)
    out = attn_lib.attention(q, k, v, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.float(), v.float().mean(0).expand(4, 8), atol=2e-3, rtol=0
    )


# --- dropout -------------------------------------------------------------------------


def test_dropout_zero_is_deterministic_and_positive_dropout_changes_output(gen):
    q, k, v = randn(gen, 7, 4), randn(gen, 13, 4), randn(gen, 13, 3)
    a = attn_lib.attention(q, k, v)
    torch.testing.assert_close(a, attn_lib.attention(q, k, v))
    torch.manual_seed(1)
    dropped, w = attn_lib.attention(q, k, v, dropout_p=0.5, return_weights=True)
    assert not torch.allclose(dropped, a)
    assert ((w == 0).sum() > 0) and torch.allclose(dropped, w @ v)


# --- gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, gen):
    q = randn(gen, 2, 3, 4).requires_grad_()
    k = randn(gen, 2, 5, 4).requires_grad_()
    v = randn(gen, 2, 5, 2).requires_grad_()
    mask = random_mask(gen, 3, 5)
    mask[1] = False
    fn = lambda q, k, v: attn_lib.attention(q, k, v, mask=mask, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


# --- bad input -----------------------------------------------------------------------


def test_float_mask_is_refused_with_pointer_to_bias():
    q = torch.ones(2, 4)
    msg = r"mask must be a bool tensor \(True = may attend\); got torch.float32 — pass an additive mask as bias="
    with pytest.raises(TypeError, match=msg):
        attn_lib.attention(q, q, q, mask=torch.zeros(2, 2))
    with pytest.raises(
        TypeError, match=r"got torch.int64 — pass an additive mask as bias="
    ):
        attn_lib.attention(q, q, q, mask=torch.ones(2, 2, dtype=torch.long))


def test_unknown_and_unavailable_backends_name_the_available_ones():
    q = torch.ones(2, 4)
    with pytest.raises(
        ValueError,
        match=r"backend must be one of 'auto', 'math', 'sdpa', 'chunked', 'triton'; got 'flash'",
    ):
        attn_lib.attention(q, q, q, backend="flash")
    for name in set(attn_lib.functional.BACKENDS) - set(attn_lib.available_backends()):
        with pytest.raises(
            ValueError,
            match=r"backend must be one of the available backends \('auto', 'math', 'sdpa'",
        ):
            attn_lib.attention(q, q, q, backend=name)


def test_weights_need_math_backend():
    q = torch.ones(2, 4)
    with pytest.raises(
        ValueError,
        match=r"backend must be 'math' or 'auto' when return_weights=True .*; got 'sdpa'",
    ):
        attn_lib.attention(q, q, q, return_weights=True, backend="sdpa")


@pytest.mark.parametrize(
    "q,k,v,exc,msg",
    [
        (
            [[1.0]],
            torch.ones(1, 1),
            torch.ones(1, 1),
            TypeError,
            r"q must be a torch.Tensor; got list",
        ),
        (
            torch.ones(4),
            torch.ones(4),
            torch.ones(4),
            ValueError,
            r"q must have at least 2 dims; got shape \(4,\)",
        ),
        (torch.ones(2, 4, dtype=torch.long),) * 3
        + (TypeError, r"q must be a floating-point tensor; got torch.int64"),
        (
            torch.ones(2, 4),
            torch.ones(3, 5),
            torch.ones(3, 5),
            ValueError,
            r"q and k must have the same last dim D; got q \(2, 4\) and k \(3, 5\)",
        ),
        (
            torch.ones(2, 4),
            torch.ones(3, 4),
            torch.ones(2, 4),
            ValueError,
            r"k and v must have the same length S \(dim -2\); got k \(3, 4\) and v \(2, 4\)",
        ),
        (
            torch.ones(2, 2, 4),
            torch.ones(3, 3, 4),
            torch.ones(3, 3, 4),
            ValueError,
            r"q, k and v must have the same leading dims",
        ),
        (
            torch.ones(2, 4),
            torch.ones(3, 4, dtype=torch.float64),
            torch.ones(3, 4),
            TypeError,
            r"q and k must have the same dtype; got torch.float32 and torch.float64",
        ),
    ],
)
def test_bad_tensors_are_named(q, k, v, exc, msg):
    with pytest.raises(exc, match=msg):
        attn_lib.attention(q, k, v)


def test_bad_mask_bias_scale_dropout_are_named():
    q, k = torch.ones(2, 7, 4), torch.ones(2, 13, 4)
    with pytest.raises(
        ValueError,
        match=r"mask must be broadcastable to \(2, 7, 13\); got shape \(13, 7\)",
    ):
        attn_lib.attention(q, k, k, mask=torch.ones(13, 7, dtype=torch.bool))
    with pytest.raises(
        ValueError,
        match=r"mask must be broadcastable to \(2, 7, 13\); got shape \(3, 2, 7, 13\)",
    ):
        attn_lib.attention(q, k, k, mask=torch.ones(3, 2, 7, 13, dtype=torch.bool))
    with pytest.raises(
        TypeError, match=r"bias must be a floating-point tensor; got torch.bool"
    ):
        attn_lib.attention(q, k, k, bias=torch.ones(7, 13, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"scale must be a finite positive float; got -1.0"
    ):
        attn_lib.attention(q, k, k, scale=-1.0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\); got 1.0"):
        attn_lib.attention(q, k, k, dropout_p=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dim_mask_and_scalar_bias_broadcast_like_their_2d_forms(backend, gen):
    q, k, v = randn(gen, 2, 3, 11, 8), randn(gen, 2, 3, 13, 8), randn(gen, 2, 3, 13, 8)
    keys = torch.arange(13) < 9  # (S,)
    ramp = torch.arange(13, dtype=q.dtype) / 5  # (S,)
    expected = attn_lib.attention(q, k, v, mask=keys[None], backend="math")
    torch.testing.assert_close(
        attn_lib.attention(q, k, v, mask=keys, backend=backend), expected
    )
    torch.testing.assert_close(
        attn_lib.attention(q, k, v, bias=ramp, backend=backend),
        attn_lib.attention(q, k, v, bias=ramp[None], backend="math"),
    )
    torch.testing.assert_close(
        attn_lib.attention(
            q, k, v, bias=torch.tensor(1.0, dtype=q.dtype), backend=backend
        ),
        attn_lib.attention(q, k, v, backend="math"),
    )
    assert expected.shape == (2, 3, 11, 8)


def test_zero_head_dim_is_refused():
    with pytest.raises(
        ValueError, match=r"q must have a positive last dim D; got shape \(1, 2, 0\)"
    ):
        attn_lib.attention(
            torch.ones(1, 2, 0), torch.ones(1, 3, 0), torch.ones(1, 3, 2)
        )

"""Hard numerics: fp16/bf16 within 2x PyTorch's own error, fp16 overflow, gradcheck.

The low-precision rule (from PyTorch's and flash-attention's own tests): the
float64 result of the same inputs is the golden value; PyTorch's
``F.scaled_dot_product_attention`` in the same dtype sets the bar; attn_lib's
error may be at most twice PyTorch's (plus a hair for ties at tiny errors).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _contract import BACKENDS, MODULE_IDS, MODULES, build, call, inputs, need, runnable
from conftest import randn, random_mask

import attn_lib

LOW = [torch.float16, torch.bfloat16]
SHAPES = [(1, 7, 13, 8), (2, 3, 33, 47, 64), (2, 13, 7, 16)]


def _case(gen, shape, magnitude, device):
    *lead, t, s, d = shape
    magnitude = magnitude / d**0.25  # raw scores of about magnitude**2
    q = randn(gen, *lead, t, d, device=device) * magnitude
    k = randn(gen, *lead, s, d, device=device) * magnitude
    v = randn(gen, *lead, s, d, device=device)
    return q, k, v


@pytest.mark.parametrize("magnitude", [3.0, 300.0], ids=["normal", "overflowing"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_within_twice_torch(
    backend, dtype, shape, magnitude, gen, device
):
    q, k, v = _case(gen, shape, magnitude, device)
    lo = [x.to(dtype) for x in (q, k, v)]
    runnable(backend, lo[0])
    if magnitude > 100:  # the raw scores really leave fp16's range
        assert (q @ k.transpose(-2, -1)).abs().max() > 65504
    golden = F.scaled_dot_product_attention(q, k, v)  # float64
    ours = attn_lib.attention(*lo, backend=backend)
    theirs = F.scaled_dot_product_attention(*lo)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    our_err = (ours.double() - golden).abs().max().item()
    torch_err = (theirs.double() - golden).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-4, (our_err, torch_err)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_scores_with_masks_and_causal(backend, dtype, gen, device):
    q = torch.full((2, 5, 64), 40.0, dtype=dtype, device=device)  # q.k = 102400
    k = torch.full((2, 9, 64), 40.0, dtype=dtype, device=device)
    v = randn(gen, 2, 9, 8, dtype=dtype, device=device)
    runnable(backend, q)
    mask = random_mask(gen, 5, 9, device=device)
    mask[0] = False
    mask[1:, 2] = True
    out = attn_lib.attention(q, k, v, mask=mask, is_causal=True, backend=backend)
    allowed = mask & attn_lib.causal_mask(5, 9, device=device)
    counts = allowed.sum(-1, keepdim=True).clamp(min=1)
    expected = (allowed.double() @ v.double()) / counts  # equal scores: a mean
    assert torch.isfinite(out).all() and (out[:, 0] == 0).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", MODULES, ids=MODULE_IDS)
def test_modules_in_low_precision_stay_close_to_float64(case, dtype, gen, device):
    module = build(case, device=device).eval()
    x, context = inputs(case, gen, device=device)
    golden = call(case, module, x, context)
    low = build(case, device=device, dtype=dtype).eval()
    ctx_low = None if context is None else context.to(dtype)
    out = call(case, low, x.to(dtype), ctx_low)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 0.1 if dtype == torch.bfloat16 else 1e-2
    assert (out.double() - golden).abs().max() < tol


# --- gradcheck in float64 on every backend that supports autograd ------------------


@pytest.mark.parametrize("how", ["plain", "mask, causal and bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_every_backend(backend, how, gen):
    q = randn(gen, 2, 3, 4).requires_grad_()
    k = randn(gen, 2, 5, 4).requires_grad_()
    v = randn(gen, 2, 5, 2).requires_grad_()
    if backend == "triton":
        pytest.skip("backend='triton' computes in float32: no float64 gradcheck")
    kw = {}
    if how != "plain":
        kw["mask"] = random_mask(gen, 3, 5)
        kw["mask"][1] = False  # an empty row too
        kw["is_causal"] = True
        kw["bias"] = randn(gen, 3, 5)

    def fn(q, k, v):
        return attn_lib.attention(q, k, v, backend=backend, **kw)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_float64_bias_gradient(gen):
    q, k, v = randn(gen, 3, 4), randn(gen, 5, 4), randn(gen, 5, 2)
    bias = randn(gen, 3, 5).requires_grad_()
    backends = [b for b in BACKENDS if b != "triton"]
    for backend in backends:

        def fn(bias, backend=backend):
            return attn_lib.attention(q, k, v, bias=bias, backend=backend)

        assert torch.autograd.gradcheck(fn, (bias,))


def test_gradcheck_chunked_small_blocks(gen):
    chunked = need("chunked", "chunked_attention")
    q = randn(gen, 5, 3).requires_grad_()
    k = randn(gen, 7, 3).requires_grad_()
    v = randn(gen, 7, 2).requires_grad_()
    mask = random_mask(gen, 5, 7)
    mask[0] = False

    def fn(q, k, v):
        return chunked(q, k, v, mask=mask, is_causal=True, block_size=2)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("case", MODULES, ids=MODULE_IDS)
def test_gradcheck_float64_modules(case, gen):
    module = build(case).eval()
    x, context = inputs(case, gen, b=1, t=3, s=4)
    x.requires_grad_()
    mask = torch.ones(1, 1, 3, 4 if case.cross else 3, dtype=torch.bool)
    mask[..., 1, :] = False  # an empty row on every module

    def fn(x):
        return call(case, module, x, context, mask=mask)

    assert torch.autograd.gradcheck(fn, (x,))

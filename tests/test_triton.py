"""backend="triton": the kernel, run on the CPU through TRITON_INTERPRET=1 at tiny sizes.

Triton decides at decoration time whether to interpret, so the variable is set
here, before attn_lib builds the kernel. Skips cleanly without Triton.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import randn, random_mask  # noqa: E402

import attn_lib  # noqa: E402
from attn_lib import triton_kernel  # noqa: E402

AVAILABLE, WHY = triton_kernel.is_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY or "triton is not importable")


def _device():
    if torch.cuda.is_available():
        return "cuda"
    if not triton_kernel.interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    return "cpu"


@pytest.mark.parametrize(
    "kwargs", [{}, {"is_causal": True}, {"mask": True}, {"mask": True, "bias": True}]
)
@pytest.mark.parametrize("t,s", [(7, 13), (13, 7)])
def test_triton_matches_math_and_chunked(kwargs, t, s, gen):
    device = _device()
    q = randn(gen, 2, t, 5, dtype=torch.float32, device=device)
    k = randn(gen, 2, s, 5, dtype=torch.float32, device=device)
    v = randn(gen, 2, s, 3, dtype=torch.float32, device=device)
    extra = {"is_causal": kwargs.get("is_causal", False)}
    if "mask" in kwargs:
        extra["mask"] = random_mask(gen, 2, t, s, device=device)
        extra["mask"][:, 1] = False  # an empty row
    if "bias" in kwargs:
        extra["bias"] = randn(gen, t, s, dtype=torch.float32, device=device)
    out = attn_lib.attention(q, k, v, backend="triton", **extra)
    expected = attn_lib.attention(q, k, v, backend="math", **extra)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, attn_lib.chunked_attention(q, k, v, **extra))


def test_triton_backward_gives_the_chunked_gradients(gen):
    device = _device()
    q, k, v = (
        randn(gen, 1, 2, n, 4, dtype=torch.float32, device=device).requires_grad_()
        for n in (7, 13, 13)
    )
    grads = []
    for backend in ("triton", "math"):
        out = attn_lib.attention(q, k, v, is_causal=True, backend=backend)
        grads.append(torch.autograd.grad(out.sin().sum(), (q, k, v)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_triton_fp16_stays_finite_with_large_scores(gen):
    device = _device()
    q = torch.full((1, 5, 16), 40.0, dtype=torch.float16, device=device)
    v = randn(gen, 1, 5, 16, dtype=torch.float16, device=device)
    out = attn_lib.attention(q, q, v, backend="triton")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    expected = v.float().mean(1, keepdim=True).expand(1, 5, 16)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=0)


def test_triton_refuses_what_it_cannot_run_with_the_reason(gen):
    _device()
    q = randn(gen, 3, 4)  # float64
    with pytest.raises(
        ValueError, match=r"backend='triton' must be runnable here; got .*float64"
    ):
        attn_lib.attention(q, q, q, backend="triton")
    q32 = q.float()
    with pytest.raises(ValueError, match=r"dropout_p must be 0 with backend='triton'"):
        attn_lib.attention(q32, q32, q32, dropout_p=0.5, backend="triton")

"""A Triton kernel for the forward pass of attention (``backend="triton"``).

One program handles ``BLOCK_M`` queries of one (batch, head) pair and walks
over the keys ``BLOCK_N`` at a time with the online softmax, the same
algorithm as :func:`attn_lib.chunked_attention`, fused into one kernel. Triton
is imported only when the kernel is first used, so ``attn_lib`` works without
it. With the environment variable ``TRITON_INTERPRET=1`` the kernel runs on
CPU tensors through Triton's interpreter (slow: for tests at tiny sizes).

The backward pass reuses :mod:`attn_lib.chunked`'s recomputation from the
row log-sum-exp the kernel writes.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from . import _checks
from .chunked import _backward, _heads, default_block_size
from .functional import _compute_dtype, register_backend

_KERNELS: dict[bool, object] = {}


def is_available() -> tuple[bool, str]:
    """Whether Triton can be imported, and if not, why (without importing it)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'attn_lib[triton]')"
    return True, ""


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernel():
    """Import (once per interpreter mode) the module that jits the kernel."""
    mode = interpreting()
    if mode not in _KERNELS:
        import importlib

        from . import _triton_fwd  # imports triton; jits in the current mode

        if getattr(_triton_fwd, "INTERPRETED", mode) != mode:
            _triton_fwd = importlib.reload(_triton_fwd)
        _KERNELS[mode] = _triton_fwd.attention_fwd
    return _KERNELS[mode]


def _as_bh(x: torch.Tensor, lead: tuple[int, ...], rows: int, cols: int):
    """View ``x`` broadcast to ``(B, H, rows, cols)``; leading dims beyond 2 are merged."""
    x = x.expand(*lead, rows, cols)  # (..., rows, cols)
    if len(lead) < 2:
        return x.reshape(*(1,) * (2 - len(lead)), *lead, rows, cols)
    return x.reshape(-1, lead[-1], rows, cols)  # may copy when dims are broadcast


def _strides(x: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if x is None else tuple(x.stride())


def _launch(q, k, v, mask, bias, causal, scale):
    """Run the kernel on ``(B, H, T, D)`` views; return out and the row log-sum-exp."""
    lead, t, s = q.shape[:-2], q.shape[-2], k.shape[-2]
    q4, k4, v4 = (_as_bh(x, lead, x.shape[-2], x.shape[-1]) for x in (q, k, v))
    q4, k4, v4 = (x.contiguous() for x in (q4, k4, v4))  # (B, H, L, D)
    m4 = None if mask is None else _as_bh(mask, lead, t, s)  # (B, H, T, S)
    b4 = None if bias is None else _as_bh(bias, lead, t, s)
    nb, nh = q4.shape[:2]
    out = torch.empty((nb, nh, t, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((nb, nh, t), dtype=torch.float32, device=q.device)
    block_m = block_n = 16 if interpreting() else 64
    grid = (math.ceil(t / block_m), nb * nh)
    _kernel()[grid](
        q4, k4, v4, m4, b4, out, lse,
        *q4.stride()[:3], *k4.stride()[:3], *v4.stride()[:3],
        *_strides(m4), *_strides(b4), *out.stride()[:3],
        nh, t, s, q.shape[-1], v.shape[-1], scale,
        HAS_MASK=m4 is not None, HAS_BIAS=b4 is not None, CAUSAL=causal,
        BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, 1 << (q.shape[-1] - 1).bit_length()),
        BLOCK_DV=max(16, 1 << (v.shape[-1] - 1).bit_length()),
    )  # fmt: skip
    return out.reshape(*lead, t, v.shape[-1]), lse.reshape(*lead, t)


class _TritonAttention(torch.autograd.Function):
    """Forward by the Triton kernel; backward by chunked recomputation."""

    @staticmethod
    def forward(ctx, q, k, v, mask, bias, causal, scale):
        out, lse = _launch(q, k, v, mask, bias, causal, scale)
        ctx.save_for_backward(q, k, v, bias, mask, out, lse)
        ctx.options = (causal, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, bias, mask, out, lse = ctx.saved_tensors
        causal, scale = ctx.options
        lse = lse.to(_compute_dtype(q.dtype))
        grads = _backward(
            grad_out,
            q,
            k,
            v,
            mask,
            bias,
            out,
            lse,
            causal,
            scale,
            default_block_size(_heads(q)),
            None,
        )
        return (*(g.to(q.dtype) for g in grads), None, None, None, None)


def check_runnable(q: torch.Tensor, bias: torch.Tensor | None) -> str:
    """Why the kernel cannot run these inputs here (``""`` when it can)."""
    ok, why = is_available()
    if not ok:
        return why
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        return f"q is on {q.device.type}; the kernel needs CUDA (or TRITON_INTERPRET=1 on the CPU)"
    if q.dtype == torch.float64:
        return "the kernel computes in float32, not float64"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return "Triton's CPU interpreter gives wrong results for bfloat16"
    if bias is not None and bias.requires_grad:
        return "the kernel passes no gradient to bias"
    return ""


def triton_attention(q, k, v, allowed, bias, scale, dropout_p, *, is_causal=False):
    """What ``attention(..., backend="triton")`` runs (forward: the kernel)."""
    reason = check_runnable(q, bias)
    if reason:
        _checks.fail("backend='triton'", "be runnable here", reason)
    if dropout_p > 0.0:
        _checks.fail(
            "dropout_p", "be 0 with backend='triton' (it has no dropout)", dropout_p
        )
    return _TritonAttention.apply(q, k, v, allowed, bias, is_causal, scale)


def _runnable_here() -> bool:
    """The kernel needs a CUDA GPU, or Triton's CPU interpreter."""
    return torch.cuda.is_available() or interpreting()


if is_available()[0]:
    register_backend("triton", triton_attention, causal=True, runnable=_runnable_here)

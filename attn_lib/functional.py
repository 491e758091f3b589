"""``attention()``: one entry point, several backends, one set of conventions.

Shapes: q ``(..., T, D)``, k ``(..., S, D)``, v ``(..., S, Dv)``; masks and
biases broadcast to ``(..., T, S)``. Masks are boolean, True = may attend.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import _checks
from .masks import causal_mask

BACKENDS = ("auto", "math", "sdpa", "chunked", "triton")

Result = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

# name -> function(q, k, v, allowed, bias, scale, dropout_p) -> out; filled below
# and by the modules that add backends, so ``attention()`` knows what exists.
_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {}
# backends that take ``is_causal=`` themselves instead of a materialized (T, S) mask
_CAUSAL_AWARE: set[str] = set()
# backends that may be unable to run on this machine -> a check that says if they can
_RUNNABLE: dict[str, Callable[[], bool]] = {}


def register_backend(
    name: str,
    fn: Callable[..., torch.Tensor],
    *,
    causal: bool = False,
    runnable: Callable[[], bool] | None = None,
) -> None:
    """Make ``backend=name`` run ``fn(q, k, v, allowed, bias, scale, dropout_p)``.

    With ``causal=True`` the causal mask is not built: ``fn`` gets the user's
    mask as ``allowed`` and a keyword ``is_causal`` (so it can skip work).
    ``runnable()``, when given, says whether the backend can run on this
    machine at all (e.g. a GPU kernel without a GPU); :func:`available_backends`
    lists it only then.
    """
    _checks.choice(name, "backend", BACKENDS[1:])
    _IMPLEMENTATIONS[name] = fn
    if causal:
        _CAUSAL_AWARE.add(name)
    if runnable is not None:
        _RUNNABLE[name] = runnable


def available_backends() -> tuple[str, ...]:
    """The backends ``attention()`` can run on this machine, ``"auto"`` first.

    Example:
        >>> available_backends()[:3]
        ('auto', 'math', 'sdpa')
    """
    names = [b for b in BACKENDS[1:] if b in _IMPLEMENTATIONS]
    return ("auto",) + tuple(b for b in names if _RUNNABLE.get(b, lambda: True)())


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 scores are formed in float32: ``q @ k`` overflows fp16 near 65504."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that gives an all-zero row where every score is ``-inf``.

    ``torch.softmax`` returns ``nan`` for such a row (``0 / 0``) and its gradient
    is ``nan`` too. Here the row is first replaced by zeros (so the softmax is
    finite), then its weights are zeroed; both steps pass a zero gradient back.
    """
    _checks.tensor(scores, "scores", min_dim=1, floating=True)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (..., T, 1)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1)
    return weights.masked_fill(empty, 0.0)


def _math(q, k, v, allowed, bias, scale, dropout_p, *, return_weights=False):
    """Attention as written on paper: scores, softmax, weighted sum of values."""
    dtype = _compute_dtype(q.dtype)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale  # (..., T, S)
    if bias is not None:
        scores = scores + bias.to(dtype)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))

    weights = safe_softmax(scores)  # (..., T, S)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = (weights @ v.to(dtype)).to(q.dtype)  # (..., T, Dv)
    return (out, weights.to(q.dtype)) if return_weights else out


def _sdpa(q, k, v, allowed, bias, scale, dropout_p):
    """PyTorch's fused ``scaled_dot_product_attention``, with two repairs.

    1. Causal alignment is bottom-right: it arrives here inside ``allowed``
       rather than as SDPA's top-left ``is_causal``.
    2. A query that may attend to nothing would give ``nan`` (or, depending on
       the kernel, a uniform average). Its row is opened up before the call
       and its output zeroed after, so the forward and the gradient are finite
       and that query's output is exactly zero.
    """
    attn_mask, empty = None, None
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if allowed is not None:
            attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
        empty = torch.isneginf(attn_mask).all(dim=-1, keepdim=True)  # (..., T, 1)
        attn_mask = attn_mask.masked_fill(empty, 0.0)
    elif allowed is not None:
        empty = ~allowed.any(dim=-1, keepdim=True)  # (..., T, 1)
        attn_mask = allowed | empty

    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
    )  # (..., T, Dv)
    return out if empty is None else out.masked_fill(empty, 0.0)


register_backend("math", _math)
register_backend("sdpa", _sdpa)


_WARNED: set[str] = set()  # fallback reasons already reported


def _sdpa_fallback_reason(device: torch.device) -> str:
    """Why SDPA would not be fast here (``""`` when it is)."""
    if device.type != "cuda":
        return ""
    cuda = torch.backends.cuda
    kernels = ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "cudnn_sdp_enabled")
    if any(getattr(cuda, name, lambda: False)() for name in kernels):
        return ""
    return (
        "SDPA's fused CUDA kernels are all disabled, leaving its quadratic math kernel"
    )


def _choose_backend(q, return_weights, dropout_p, bias, mask, is_causal) -> str:
    """What ``backend="auto"`` runs, warning once with the reason when it falls back.

    Weights requested: ``"math"``, the only path that forms them. Otherwise
    ``"sdpa"``, PyTorch's fused kernels, the fastest path measured by
    ``python -m attn_lib.bench``; if SDPA cannot run fused here (and there is
    no dropout), ``"triton"`` when it can run these inputs, else ``"chunked"``.
    """
    if return_weights:
        return "math"
    reason = _sdpa_fallback_reason(q.device)
    if not reason or dropout_p > 0.0:
        return "sdpa"
    from .triton_kernel import check_runnable

    why_not = check_runnable(q, bias) if "triton" in _IMPLEMENTATIONS else "no triton"
    chosen = "chunked" if why_not else "triton"
    message = f"backend='auto' runs {chosen!r}, not 'sdpa': {reason}"
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return chosen


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    backend: str = "auto",
) -> Result:
    r"""Scaled dot-product attention on any device, with a choice of backend.

    .. math:: \mathrm{out} = \mathrm{softmax}\!\left(s\,q k^\top + b\right) v,
              \quad s = 1/\sqrt{D}

    where masked-out pairs get a score of ``-inf`` (weight exactly 0).

    Args:
        q: queries ``(..., T, D)``.
        k: keys ``(..., S, D)``, same leading dims, dtype and device as ``q``.
        v: values ``(..., S, Dv)``.
        mask: bool, broadcastable to ``(..., T, S)``; True = may attend. Float
            masks are refused: pass additive scores as ``bias=``.
        bias: float, broadcastable to ``(..., T, S)``, added to the scaled
            scores (``-inf`` entries act as a mask).
        is_causal: also apply :func:`attn_lib.causal_mask`, aligned bottom-right
            (query ``i`` sees key ``j`` iff ``j <= i + S - T``).
        scale: multiplies ``q k^T``; defaults to ``1/sqrt(D)``.
        dropout_p: dropout on the weights. Always applied when > 0, like
            ``F.scaled_dot_product_attention``: modules pass 0 in ``eval()``.
        return_weights: also return the weights ``(..., T, S)`` that were
            applied to ``v`` (after dropout).
        backend: ``"auto"``, ``"math"``, ``"sdpa"``, ``"chunked"`` or ``"triton"``;
            see :func:`available_backends`. ``"auto"`` runs ``"sdpa"``, or
            ``"math"`` when weights are requested.

    Returns:
        ``out`` ``(..., T, Dv)`` in ``q``'s dtype, or ``(out, weights)``.

    A query that may attend to nothing (all keys masked) gets an all-zero
    output and weight row, and zero gradients, on every backend.

    Example:
        >>> q = torch.ones(1, 2, 4); k = torch.ones(1, 3, 4); v = torch.arange(3.).view(1, 3, 1)
        >>> attention(q, k, v, is_causal=True).squeeze().tolist()
        [0.5, 1.0]
    """
    mask, bias = _checks.attention_args(
        q, k, v, attn_mask=mask, attn_bias=bias, softmax_scale=scale
    )
    t, s = q.shape[-2], k.shape[-2]
    _checks.flag(is_causal, "is_causal")
    _checks.flag(return_weights, "return_weights")
    dropout_p = _checks.probability(dropout_p, "dropout_p")
    _checks.choice(backend, "backend", BACKENDS)
    if backend != "auto" and backend not in _IMPLEMENTATIONS:
        _checks.fail(
            "backend",
            f"be one of the available backends {available_backends()}",
            repr(backend),
        )

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = backend
    if backend == "auto":
        chosen = _choose_backend(q, return_weights, dropout_p, bias, mask, is_causal)
    if chosen in _CAUSAL_AWARE and not return_weights:
        fn = _IMPLEMENTATIONS[chosen]
        return fn(q, k, v, mask, bias, scale, dropout_p, is_causal=bool(is_causal))
    allowed = mask
    if is_causal:
        causal = causal_mask(t, s, device=q.device)  # (T, S)
        allowed = causal if allowed is None else allowed & causal

    if return_weights:
        if chosen != "math":
            _checks.fail(
                "backend",
                "be 'math' or 'auto' when return_weights=True "
                "(fused kernels never form the weights)",
                repr(backend),
            )
        return _math(q, k, v, allowed, bias, scale, dropout_p, return_weights=True)
    return _IMPLEMENTATIONS[chosen](q, k, v, allowed, bias, scale, dropout_p)

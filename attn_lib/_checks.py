"""Argument checks shared by every public function of attn_lib.

Every message has one form, ``<what> must <rule>; got <actual>``, so that a
reader who passes something wrong learns what was expected and what arrived.
The checks raise; they never ``assert`` (asserts vanish under ``python -O``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import torch


def fail(
    what: str, rule: str, got: Any, *, exc: type[Exception] = ValueError
) -> NoReturn:
    """Raise ``exc`` with the project's one message form."""
    raise exc(f"{what} must {rule}; got {got}")


def tensor(
    x: Any, name: str, *, min_dim: int = 0, floating: bool = False
) -> torch.Tensor:
    """Check that ``x`` is a tensor with at least ``min_dim`` dims (and floating)."""
    if not isinstance(x, torch.Tensor):
        fail(name, "be a torch.Tensor", type(x).__name__, exc=TypeError)
    if x.dim() < min_dim:
        fail(name, f"have at least {min_dim} dims", f"shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        fail(name, "be a floating-point tensor", x.dtype, exc=TypeError)
    return x


def same_dtype_device(**tensors: torch.Tensor) -> None:
    """Check that all the named tensors share one dtype and one device."""
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        other = tensors[name]
        pair = f"{names[0]} and {name}"
        if other.dtype != first.dtype:
            fail(
                f"{pair}",
                "have the same dtype",
                f"{first.dtype} and {other.dtype}",
                exc=TypeError,
            )
        if other.device != first.device:
            fail(
                f"{pair}", "be on the same device", f"{first.device} and {other.device}"
            )


def qkv(q: Any, k: Any, v: Any) -> tuple[int, int]:
    """Check q ``(..., T, D)``, k ``(..., S, D)``, v ``(..., S, Dv)``; return (T, S)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        tensor(x, name, min_dim=2, floating=True)
    same_dtype_device(q=q, k=k, v=v)
    if q.shape[-1] == 0:
        fail("q", "have a positive last dim D", f"shape {tuple(q.shape)}")
    if q.shape[-1] != k.shape[-1]:
        fail(
            "q and k",
            "have the same last dim D",
            f"q {tuple(q.shape)} and k {tuple(k.shape)}",
        )
    if k.shape[-2] != v.shape[-2]:
        fail(
            "k and v",
            "have the same length S (dim -2)",
            f"k {tuple(k.shape)} and v {tuple(v.shape)}",
        )
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        fail(
            "q, k and v",
            "have the same leading dims",
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}",
        )
    return q.shape[-2], k.shape[-2]


def broadcastable(x: torch.Tensor, name: str, target: Sequence[int]) -> None:
    """Check that ``x`` broadcasts to ``target`` without enlarging it."""
    target = tuple(target)
    try:
        ok = torch.broadcast_shapes(tuple(x.shape), target) == target
    except RuntimeError:
        ok = False
    if not ok:
        fail(name, f"be broadcastable to {target}", f"shape {tuple(x.shape)}")


def mask(
    m: Any, target: Sequence[int], device: torch.device, name: str = "mask"
) -> None:
    """Check a boolean mask (True = may attend) that broadcasts to ``target``."""
    if not isinstance(m, torch.Tensor):
        fail(
            name,
            "be a bool torch.Tensor (True = may attend)",
            type(m).__name__,
            exc=TypeError,
        )
    if m.dtype != torch.bool:
        fail(
            name,
            "be a bool tensor (True = may attend)",
            f"{m.dtype} — pass an additive mask as bias=",
            exc=TypeError,
        )
    broadcastable(m, name, target)
    if m.device != device:
        fail(name, f"be on the device of q ({device})", m.device)


def bias(b: Any, target: Sequence[int], device: torch.device) -> None:
    """Check an additive float bias that broadcasts to ``target``."""
    tensor(b, "bias", floating=True)
    broadcastable(b, "bias", target)
    if b.device != device:
        fail("bias", f"be on the device of q ({device})", b.device)


def positive_int(value: Any, name: str) -> int:
    """Check a positive Python int (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(name, "be a positive int", repr(value))
    return value


def nonneg_int(value: Any, name: str) -> int:
    """Check a non-negative Python int (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        fail(name, "be a non-negative int", repr(value))
    return value


def flag(value: Any, name: str) -> bool:
    """Check a Python bool (a truthy tensor or string is refused)."""
    if not isinstance(value, bool):
        fail(name, "be a bool", repr(value), exc=TypeError)
    return value


def scale(value: Any) -> None:
    """Check an optional softmax scale: ``None`` or a finite positive number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail("scale", "be None or a positive float", repr(value), exc=TypeError)
    if not (0.0 < float(value) < float("inf")):
        fail("scale", "be a finite positive float", repr(value))


def probability(value: Any, name: str) -> float:
    """Check a dropout probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(name, "be a float in [0, 1)", repr(value), exc=TypeError)
    if not 0.0 <= float(value) < 1.0:
        fail(name, "be in [0, 1)", repr(value))
    return float(value)


def choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        fail(name, f"be one of {options}", repr(value))
    return value


def divisible(value: int, name: str, divisor: int, divisor_name: str) -> None:
    """Check that ``value`` is a multiple of ``divisor`` (both already checked ints)."""
    if value % divisor != 0:
        fail(
            name,
            f"be divisible by {divisor_name}",
            f"{name}={value}, {divisor_name}={divisor}",
        )


def attention_args(
    q: Any, k: Any, v: Any, *, attn_mask: Any, attn_bias: Any, softmax_scale: Any
) -> tuple[Any, Any]:
    """The checks every attention function shares.

    Returns the mask and bias with at least 2 dims: a ``(S,)`` mask or a
    scalar bias broadcasts like ``(1, S)`` or ``(1, 1)``, and the kernels
    slice the last two dims.
    """
    t, s = qkv(q, k, v)
    target = (*q.shape[:-2], t, s)
    if attn_mask is not None:
        mask(attn_mask, target, q.device)
        attn_mask = attn_mask.reshape((1,) * (2 - attn_mask.dim()) + attn_mask.shape)
    if attn_bias is not None:
        bias(attn_bias, target, q.device)
        attn_bias = attn_bias.reshape((1,) * (2 - attn_bias.dim()) + attn_bias.shape)
    scale(softmax_scale)
    return attn_mask, attn_bias

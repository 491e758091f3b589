"""NumPy reference implementations, in float64, written to be read.

These are the oracles the PyTorch code is tested against and the versions the
chapters build step by step. Shapes follow the book's legend: q ``(..., T, D)``,
k ``(..., S, D)``, v ``(..., S, Dv)``; masks are boolean with True = may attend.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from . import _checks


def softmax(x: ArrayLike, axis: int = -1) -> np.ndarray:
    r"""Numerically stable softmax along ``axis``.

    .. math:: \mathrm{softmax}(x)_i = \frac{e^{x_i - m}}{\sum_j e^{x_j - m}},
              \quad m = \max_j x_j

    Subtracting the maximum changes nothing mathematically but keeps every
    exponent at or below zero, so nothing overflows.

    Args:
        x: scores; ``-inf`` entries get weight exactly 0.
        axis: the axis that sums to one.

    Returns:
        An array of ``x``'s shape. A slice that is ``-inf`` everywhere (nothing
        to attend to) gets all zeros instead of the ``nan`` of ``0 / 0``.

    Example:
        >>> softmax([1000.0, 1000.0]).tolist()
        [0.5, 0.5]
    """
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # an all -inf slice: shift by 0
    e = np.exp(x - m)
    total = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def _check_arrays(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        _checks.fail(
            "q, k and v",
            "have at least 2 dims (..., length, dim)",
            f"q {q.shape}, k {k.shape}, v {v.shape}",
        )
    if q.shape[-1] != k.shape[-1]:
        _checks.fail(
            "q and k", "have the same last dim D", f"q {q.shape} and k {k.shape}"
        )
    if k.shape[-2] != v.shape[-2]:
        _checks.fail(
            "k and v", "have the same length S (dim -2)", f"k {k.shape} and v {v.shape}"
        )


def _check_mask(mask: np.ndarray, target: tuple[int, ...]) -> None:
    if mask.dtype != np.bool_:
        _checks.fail(
            "mask", "be a bool array (True = may attend)", mask.dtype, exc=TypeError
        )
    try:
        ok = np.broadcast_shapes(mask.shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        _checks.fail("mask", f"be broadcastable to {target}", f"shape {mask.shape}")


def scaled_dot_product_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Scaled dot-product attention in float64.

    .. math:: \mathrm{out} = \mathrm{softmax}\!\left(s \, q k^\top\right) v,
              \quad s = 1/\sqrt{D}

    Args:
        q: queries ``(..., T, D)``.
        k: keys ``(..., S, D)``.
        v: values ``(..., S, Dv)``.
        mask: bool, broadcastable to ``(..., T, S)``; True = may attend.
        scale: multiplies the scores; defaults to ``1/sqrt(D)``.

    Returns:
        ``(out, weights)``: ``out`` is ``(..., T, Dv)``, ``weights`` is
        ``(..., T, S)``. A query that may attend to nothing gets a zero row in
        both.

    Example:
        >>> q = k = np.eye(2); v = np.array([[1.0], [3.0]])
        >>> out, w = scaled_dot_product_attention(q, k, v, scale=100.0)
        >>> np.round(out, 3).tolist()
        [[1.0], [3.0]]
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    _check_arrays(q, k, v)
    _checks.scale(scale)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)

    scores = scale * (q @ np.swapaxes(k, -1, -2))  # (..., T, S)
    if mask is not None:
        mask = np.asarray(mask)
        _check_mask(mask, scores.shape)
        scores = np.where(mask, scores, -np.inf)

    weights = softmax(scores, axis=-1)  # (..., T, S)
    out = weights @ v  # (..., T, Dv)
    return out, weights

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


def _online_step(state, scores, v_block):
    """Fold one key block into the running (max, sum, weighted values) of each row."""
    m, total, acc = state
    m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))  # (..., T, 1)
    shift = np.where(np.isfinite(m_new), m_new, 0.0)  # a row with no key yet: 0
    p = np.exp(scores - shift)  # (..., T, block)
    alpha = np.exp(m - shift)  # rescales what was summed under the old max
    return m_new, alpha * total + p.sum(-1, keepdims=True), alpha * acc + p @ v_block


def tiled_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    scale: float | None = None,
    block_size: int = 4,
) -> np.ndarray:
    r"""Attention one block of keys at a time, with the online softmax, in float64.

    Each query row keeps a running maximum :math:`m`, a running sum
    :math:`\ell = \sum_j e^{s_j - m}` and a running weighted sum of values
    :math:`a = \sum_j e^{s_j - m} v_j`. A new block with maximum
    :math:`m' \ge m` rescales both by :math:`e^{m - m'}` before adding its
    own terms; at the end :math:`\mathrm{out} = a / \ell`. Only a
    ``(T, block_size)`` slice of scores ever exists.

    Args:
        q: queries ``(..., T, D)``.
        k: keys ``(..., S, D)``.
        v: values ``(..., S, Dv)``.
        mask: bool, broadcastable to ``(..., T, S)``; True = may attend.
        scale: multiplies the scores; defaults to ``1/sqrt(D)``.
        block_size: keys per block, a positive int.

    Returns:
        ``out`` ``(..., T, Dv)``, equal to
        :func:`scaled_dot_product_attention`'s; a query that may attend to
        nothing gets zeros.

    Example:
        >>> q = k = np.eye(3); v = np.arange(3.0)[:, None]
        >>> full, _ = scaled_dot_product_attention(q, k, v)
        >>> bool(np.allclose(tiled_attention(q, k, v, block_size=2), full))
        True
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    _check_arrays(q, k, v)
    _checks.scale(scale)
    _checks.positive_int(block_size, "block_size")
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    t, s = q.shape[-2], k.shape[-2]
    if mask is not None:
        mask = np.asarray(mask)
        _check_mask(mask, (*np.broadcast_shapes(q.shape[:-2], k.shape[:-2]), t, s))
        mask = np.broadcast_to(mask, mask.shape[:-2] + (t, s))  # (..., T, S)

    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    state = (
        np.full((*lead, t, 1), -np.inf),  # running max m
        np.zeros((*lead, t, 1)),  # running sum l
        np.zeros((*lead, t, v.shape[-1])),  # running weighted values a
    )
    for j in range(0, s, block_size):
        scores = scale * (q @ np.swapaxes(k[..., j : j + block_size, :], -1, -2))
        if mask is not None:  # scores: (..., T, block)
            scores = np.where(mask[..., j : j + block_size], scores, -np.inf)
        state = _online_step(state, scores, v[..., j : j + block_size, :])
    _, total, acc = state
    return acc / np.where(total > 0, total, 1.0)  # (..., T, Dv); empty rows stay 0

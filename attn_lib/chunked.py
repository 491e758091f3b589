"""Chunked attention: the online softmax over blocks of keys, in PyTorch ops.

Queries are cut into blocks of ``block_size`` rows and keys into blocks of
``block_size`` columns; only one ``(..., block, block)`` tile of scores exists
at a time, so extra memory grows linearly with the sequence length instead of
quadratically. The backward pass recomputes the tiles instead of storing them.

Shapes: q ``(..., T, D)``, k ``(..., S, D)``, v ``(..., S, Dv)``; masks and
biases broadcast to ``(..., T, S)``. Masks are boolean, True = may attend.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache
from itertools import groupby

import torch

from . import _checks
from .functional import _compute_dtype, attention, register_backend

DEFAULT_BLOCK_SIZE = 512

Block = tuple[int, int, int, int, bool]  # i0, i1, j0, j1, needs a causal mask


def _blocks(t: int, s: int, size: int, causal: bool) -> Iterator[Block]:
    """The (query block, key block) tiles to compute, skipping those above the diagonal.

    Causal alignment is bottom-right: query ``i`` sees key ``j`` iff
    ``j <= i + (S - T)``. A tile whose first key is beyond what its last query
    may see is skipped; a tile that straddles the diagonal needs a mask.
    """
    offset = s - t
    for i0 in range(0, t, size):
        i1 = min(i0 + size, t)
        stop = min(s, i1 + offset) if causal else s  # keys j < stop are visible
        for j0 in range(0, max(stop, 0), size):
            j1 = min(j0 + size, s)
            yield i0, i1, j0, j1, causal and j1 - 1 > i0 + offset


def _tile(x: torch.Tensor | None, i0: int, i1: int, j0: int, j1: int):
    """The ``[i0:i1, j0:j1]`` tile of a mask or bias, keeping broadcast dims of size 1."""
    if x is None:
        return None
    rows = slice(i0, i1) if x.shape[-2] != 1 else slice(None)
    cols = slice(j0, j1) if x.shape[-1] != 1 else slice(None)
    return x[..., rows, cols]


def _restrict(view, mask, bias, block: Block, offset: int) -> None:
    """Add the bias to a tile of scores and put ``-inf`` where it may not attend."""
    i0, i1, j0, j1, diagonal = block
    if bias is not None:
        view += _tile(bias, i0, i1, j0, j1)
    if mask is not None:
        view.masked_fill_(~_tile(mask, i0, i1, j0, j1), float("-inf"))
    if diagonal:
        view.masked_fill_(
            _future(i1 - i0, j1 - j0, i0 + offset - j0, view.device), float("-inf")
        )


@lru_cache(maxsize=16)
def _future(rows: int, cols: int, shift: int, device: torch.device) -> torch.Tensor:
    """``(rows, cols)``: True where key ``c`` lies after query ``r`` (``c > r + shift``).

    Tiles on the diagonal share a few such patterns, so they are built once.
    """
    i = torch.arange(rows, device=device)[:, None]  # (bq, 1)
    j = torch.arange(cols, device=device)[None, :]  # (1, bk)
    return j > i + shift


def _scores(qs, k1, shift, mask, bias, block: Block, lead, offset: int):
    """One tile of ``(scale q) k^T + bias - shift``, ``-inf`` where not allowed.

    ``qs`` ``(N, T, D)`` and ``k1`` ``(N, S, D + 1)`` have their leading dims
    flattened into ``N``; ``k1`` ends in a column of ones, so appending
    ``-shift`` ``(N, bq, 1)`` to the queries subtracts it inside the matmul:
    no extra pass over the tile (the backward pass shifts by the final
    log-sum-exp this way).
    """
    i0, i1, j0, j1, _ = block
    q1 = torch.cat([qs[:, i0:i1], -shift], -1)  # (N, bq, D + 1)
    scores = q1 @ k1[:, j0:j1].transpose(1, 2)  # (N, bq, bk)
    _restrict(scores.view(*lead, i1 - i0, j1 - j0), mask, bias, block, offset)
    return scores


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(..., L, D)`` -> ``(N, L, D)`` in the compute dtype."""
    return x.to(dtype).reshape(-1, *x.shape[-2:])  # (N, L, D)


def _with_ones(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(..., L, D)`` -> ``(N, L, D + 1)``: flattened, with a last column of ones."""
    x = _flat(x, dtype)  # (N, L, D)
    return torch.cat([x, x.new_ones(*x.shape[:2], 1)], -1)  # (N, L, D + 1)


def _row_block(qs_b, ks, v1, tensors, tiles, lead, offset):
    """The online softmax for one block of queries over its key tiles.

    Keeps a running row maximum ``m`` and ``acc = sum_j exp(s_j - m) [v_j, 1]``;
    when a tile raises the maximum, ``acc`` is rescaled by ``exp(m_old - m)``.
    The ones column of ``v1`` makes the weights' sum come out of the matmul.

    Returns:
        ``acc`` ``(N, bq, Dv + 1)`` and the final shift ``(N, bq, 1)`` (the row
        maximum, or 0 for a row that may attend to nothing).
    """
    mask, bias = tensors
    n, bq = qs_b.shape[:2]
    m = qs_b.new_full((n, bq, 1), float("-inf"))  # running row maximum
    acc = qs_b.new_zeros(n, bq, v1.shape[-1])  # (N, bq, Dv + 1)
    shift = torch.zeros_like(m)
    for block in tiles:
        j0, j1 = block[2], block[3]
        scores = torch.bmm(qs_b, ks[:, j0:j1].transpose(1, 2))  # (N, bq, bk)
        _restrict(scores.view(*lead, bq, j1 - j0), mask, bias, block, offset)
        new = torch.maximum(m, scores.amax(-1, keepdim=True))  # (N, bq, 1)
        shift = new.nan_to_num(neginf=0.0)  # no allowed key yet: shift by 0
        scores.sub_(shift).exp_()  # weights up to a common factor
        acc.mul_((m - shift).exp_()).baddbmm_(scores, v1[:, j0:j1])
        m = new
    return acc, shift


def _forward(q, k, v, mask, bias, causal, scale, size):
    """Online softmax over key tiles; ``out`` and row log-sum-exp in compute dtype."""
    dtype, lead = _compute_dtype(q.dtype), q.shape[:-2]
    qs = _flat(q, dtype) * scale  # (N, T, D)
    ks = _flat(k, dtype)  # (N, S, D); a tile's keys enter the matmul transposed
    v1 = _with_ones(v, dtype)  # (N, S, Dv + 1)
    tensors = (mask, None if bias is None else bias.to(dtype))
    n, t, s = qs.shape[0], qs.shape[1], ks.shape[1]
    out = qs.new_zeros(n, t, v.shape[-1])  # (N, T, Dv); rows seeing nothing stay 0
    lse = qs.new_full((n, t, 1), float("-inf"))  # (N, T, 1)

    for (i0, i1), tiles in groupby(_blocks(t, s, size, causal), lambda b: b[:2]):
        acc, shift = _row_block(qs[:, i0:i1], ks, v1, tensors, tiles, lead, s - t)
        total = acc[..., -1:]  # (N, bq, 1): sum of the unnormalised weights
        out[:, i0:i1] = acc[..., :-1] / total.masked_fill(total == 0, 1.0)
        lse[:, i0:i1] = shift + total.log()  # -inf for a row with no allowed key

    return out.view(*lead, t, v.shape[-1]), lse.view(*lead, t)  # (..., T, Dv), (..., T)


def _backward(grad_out, q, k, v, mask, bias, out, lse, causal, scale, size, dbias):
    """Gradients of q, k, v (and bias) by recomputing each tile's weights."""
    dtype, lead = _compute_dtype(q.dtype), q.shape[:-2]
    q, k, v, do = (_flat(x, dtype) for x in (q, k, v, grad_out))  # (N, L, D)
    qs, k1 = q * scale, torch.cat([k, k.new_ones(*k.shape[:2], 1)], -1)
    bias = None if bias is None else bias.to(dtype)
    delta = (do * _flat(out, dtype)).sum(-1, keepdim=True)  # (N, T, 1)
    lse = _flat(lse.unsqueeze(-1), dtype)  # (N, T, 1)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # empty row: p = 0
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    t, s = q.shape[1], k.shape[1]
    for block in _blocks(t, s, size, causal):
        i0, i1, j0, j1, _ = block
        p = _scores(qs, k1, lse[:, i0:i1], mask, bias, block, lead, s - t).exp_()
        dv[:, j0:j1].baddbmm_(p.transpose(1, 2), do[:, i0:i1])  # (N, bk, Dv)
        dp = do[:, i0:i1] @ v[:, j0:j1].transpose(1, 2)  # (N, bq, bk)
        ds = p.mul_(dp.sub_(delta[:, i0:i1]))  # d(loss)/d(score), in place
        dq[:, i0:i1].baddbmm_(ds, k[:, j0:j1], alpha=scale)  # (N, bq, D)
        dk[:, j0:j1].baddbmm_(ds.transpose(1, 2), q[:, i0:i1], alpha=scale)
        if dbias is not None:
            tile = _tile(dbias, i0, i1, j0, j1)
            tile += ds.view(*lead, i1 - i0, j1 - j0).sum_to_size(tile.shape)
    shapes = (x.shape for x in (q, k, v))
    return tuple(
        g.view(*lead, *sh[1:]) for g, sh in zip((dq, dk, dv), shapes, strict=True)
    )


class _ChunkedAttention(torch.autograd.Function):
    """Forward by tiles; backward recomputes the tiles (memory linear in length)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, causal, scale, size):
        out, lse = _forward(q, k, v, mask, bias, causal, scale, size)
        ctx.save_for_backward(q, k, v, bias, mask, out, lse)  # out: fp32 for fp16
        ctx.options = (causal, scale, size)
        return out.to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, bias, mask, out, lse = ctx.saved_tensors
        dbias = None
        if ctx.needs_input_grad[3]:
            dbias = torch.zeros(bias.shape, dtype=_compute_dtype(bias.dtype))
            dbias = dbias.to(bias.device)
        dq, dk, dv = _backward(
            grad_out, q, k, v, mask, bias, out, lse, *ctx.options, dbias
        )
        dbias = None if dbias is None else dbias.to(bias.dtype)
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            dbias,
            None,
            None,
            None,
            None,
        )


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    r"""Memory-efficient attention: the online softmax over tiles of queries and keys.

    .. math:: \mathrm{out} = \mathrm{softmax}\!\left(s\,q k^\top + b\right) v,
              \quad s = 1/\sqrt{D}

    computed one ``(block_size, block_size)`` tile of scores at a time. Each
    query row keeps a running maximum :math:`m`, a running sum
    :math:`\ell = \sum_j e^{x_j - m}` and a running weighted sum of values;
    a new tile with a larger maximum :math:`m'` rescales both by
    :math:`e^{m - m'}`. fp16/bf16 inputs are computed in float32 tile by tile.
    The backward pass recomputes each tile from ``q``, ``k`` and the saved
    row log-sum-exp, so training also needs memory linear in ``T`` and ``S``.

    Args:
        q: queries ``(..., T, D)``.
        k: keys ``(..., S, D)``, same leading dims, dtype and device as ``q``.
        v: values ``(..., S, Dv)``.
        mask: bool, broadcastable to ``(..., T, S)``; True = may attend.
        bias: float, broadcastable to ``(..., T, S)``, added to the scaled
            scores; it receives a gradient when it requires one.
        is_causal: query ``i`` sees key ``j`` iff ``j <= i + S - T``
            (bottom-right, as :func:`attn_lib.causal_mask`); tiles entirely
            above the diagonal are skipped, not computed and masked::

                T=S=6, block_size=2      x computed, . skipped
                x . .
                x x .
                x x x

        scale: multiplies ``q k^T``; defaults to ``1/sqrt(D)``.
        block_size: rows and columns per tile, a positive int.

    Shape:
        ``out`` is ``(..., T, Dv)`` in ``q``'s dtype.

    Returns:
        The attention output. A query that may attend to nothing gets zeros
        and passes back zero gradients.

    Limitations:
        No dropout and no weights are returned. A ``mask`` or ``bias`` given
        as a full ``(T, S)`` tensor is itself quadratic in size: prefer
        ``is_causal=True`` and broadcastable ``(B, 1, 1, S)`` padding masks.
        The gradient of ``bias`` is formed at ``bias``'s own shape.

    Example:
        >>> q = torch.ones(1, 2, 4); k = torch.ones(1, 3, 4); v = torch.arange(3.).view(1, 3, 1)
        >>> chunked_attention(q, k, v, is_causal=True, block_size=1).squeeze().tolist()
        [0.5, 1.0]
    """
    mask, bias = _checks.attention_args(
        q, k, v, attn_mask=mask, attn_bias=bias, softmax_scale=scale
    )
    _checks.flag(is_causal, "is_causal")
    _checks.positive_int(block_size, "block_size")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _backend(
        q,
        k,
        v,
        mask,
        bias,
        scale,
        0.0,
        is_causal=bool(is_causal),
        block_size=block_size,
    )


def _backend(
    q,
    k,
    v,
    allowed,
    bias,
    scale,
    dropout_p,
    *,
    is_causal=False,
    block_size=DEFAULT_BLOCK_SIZE,
):
    """What ``attention(..., backend="chunked")`` runs."""
    if dropout_p > 0.0:
        _checks.fail(
            "dropout_p", "be 0 with backend='chunked' (it has no dropout)", dropout_p
        )
    if (
        q.shape[-2] == 0 or k.shape[-2] == 0
    ):  # no tiles: the plain path's empty/zero result
        return attention(
            q,
            k,
            v,
            mask=allowed,
            bias=bias,
            is_causal=is_causal,
            scale=scale,
            backend="math",
        )
    return _ChunkedAttention.apply(q, k, v, bias, allowed, is_causal, scale, block_size)


register_backend("chunked", _backend, causal=True)

"""Chunked attention: the online softmax over tiles of queries and keys, in PyTorch ops.

Queries are cut into blocks of rows and keys into blocks of columns; only one
tile of scores per group of heads exists at a time, so extra memory grows
linearly with the sequence length instead of quadratically. The backward pass
recomputes the tiles instead of storing them.

Shapes: q ``(..., T, D)``, k ``(..., S, D)``, v ``(..., S, Dv)``; masks and
biases broadcast to ``(..., T, S)``. Masks are boolean, True = may attend.
The leading dims are flattened into ``N`` "heads" inside this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import NamedTuple

import torch

from . import _checks
from .functional import _compute_dtype, attention, register_backend

TILE_ELEMENTS = 1 << 19  # scores per tile, summed over heads: 2 MiB in float32
LOG2_E = 1.4426950408889634
MAX_WEIGHT = math.exp(8.0)  # per key, before a row's shift must move: about 3000

Block = tuple[int, int, int, int, bool]  # rows i0:i1, keys j0:j1, crosses the diagonal


def _row_blocks(
    t: int, s: int, rows: int, cols: int, causal: bool
) -> Iterator[tuple[int, int, list[Block]]]:
    """Each block of query rows ``[i0, i1)`` with its tiles, in order.

    A block's tiles take its rows by ``cols`` keys at a time. With ``causal``
    (bottom-right: query ``i`` sees key ``j`` iff ``j <= i + S - T``) they stop
    at the block's last visible key, so keys no query of the block may see are
    never computed, and a tile whose last key lies beyond what the block's first
    query sees is flagged for a mask.
    """
    offset = s - t
    for i0 in range(0, t, rows):
        i1 = min(i0 + rows, t)
        stop = min(s, i1 + offset) if causal else s  # keys j < stop are visible
        tiles = []
        for j0 in range(0, max(stop, 0), cols):
            j1 = min(j0 + cols, stop)
            tiles.append((i0, i1, j0, j1, causal and j1 - 1 > i0 + offset))
        yield i0, i1, tiles


def default_block_size(heads: int = 1) -> tuple[int, int]:
    """The ``(rows, cols)`` tiles :func:`chunked_attention` uses unless told.

    Tiles are 512 keys wide and take 256 query rows, except for calls with
    one head (1024 rows) or two (512 rows; heads are all leading dims of ``q``
    together), so that one group's tile still holds about ``TILE_ELEMENTS``
    scores: matmuls on a single head need the extra rows to keep every core
    busy.

    Example:
        >>> default_block_size(8), default_block_size(2), default_block_size(1)
        ((256, 512), (512, 512), (1024, 512))
    """
    _checks.positive_int(heads, "heads")
    return 256 * max(1, 4 // heads), 512


def tile_plan(
    t: int,
    s: int,
    *,
    block_size: int | tuple[int, int] | None = None,
    is_causal: bool = False,
    heads: int = 1,
) -> list[Block]:
    """The tiles :func:`chunked_attention` computes for ``T`` queries and ``S`` keys.

    Args:
        t, s: the numbers of queries and keys, non-negative ints.
        block_size: as in :func:`chunked_attention`.
        is_causal: as in :func:`chunked_attention`.
        heads: how many heads the call has (the product of ``q``'s leading
            dims); only the default ``block_size`` depends on it.

    Returns:
        ``(i0, i1, j0, j1, masked)`` per tile, in the order they are computed:
        queries ``i0:i1`` against keys ``j0:j1``; ``masked`` tiles cross the
        causal diagonal.

    Example:
        >>> tile_plan(4, 4, block_size=2, is_causal=True)
        [(0, 2, 0, 2, True), (2, 4, 0, 2, False), (2, 4, 2, 4, True)]
    """
    _checks.nonneg_int(t, "t")
    _checks.nonneg_int(s, "s")
    _checks.flag(is_causal, "is_causal")
    _checks.positive_int(heads, "heads")
    rows, cols = _block_size(block_size, heads)
    return list(_tiles(t, s, rows, cols, is_causal))


def _tiles(t: int, s: int, rows: int, cols: int, causal: bool) -> Iterator[Block]:
    for *_, tiles in _row_blocks(t, s, rows, cols, causal):
        yield from tiles


def _tile(x: torch.Tensor | None, i0: int, i1: int, j0: int, j1: int):
    """The ``[i0:i1, j0:j1]`` tile of a mask or bias, keeping broadcast dims of size 1."""
    if x is None:
        return None
    rows = slice(i0, i1) if x.shape[-2] != 1 else slice(None)
    cols = slice(j0, j1) if x.shape[-1] != 1 else slice(None)
    return x[..., rows, cols]


@lru_cache(maxsize=16)
def _future(rows: int, cols: int, shift: int, device: torch.device) -> torch.Tensor:
    """``(rows, cols)``: True where key ``c`` lies after query ``r`` (``c > r + shift``).

    Tiles on the diagonal share a few such patterns, so they are built once.
    """
    i = torch.arange(rows, device=device)[:, None]  # (bq, 1)
    j = torch.arange(cols, device=device)[None, :]  # (1, bk)
    return j > i + shift


def _restrict(scores, blocked, bias, block: Block, offset: int) -> bool:
    """Add the bias to a tile of scores and put ``-inf`` where it may not attend.

    Returns whether any ``-inf`` may have been written.
    """
    i0, i1, j0, j1, diagonal = block
    if bias is not None:
        scores += _tile(bias, i0, i1, j0, j1)
    if blocked is not None:
        scores.masked_fill_(_tile(blocked, i0, i1, j0, j1), float("-inf"))
    if diagonal:
        future = _future(i1 - i0, j1 - j0, i0 + offset - j0, scores.device)
        scores.masked_fill_(future, float("-inf"))
    return diagonal or blocked is not None


def _exp_(x: torch.Tensor, masked: bool) -> torch.Tensor:
    """``exp`` in place. On CPU, ``torch.exp`` slows down about tenfold on
    ``-inf`` and on inputs below about -87; ``exp2`` does not, so masked tiles
    take ``2 ** (x log2 e)`` instead.
    """
    return x.mul_(LOG2_E).exp2_() if masked else x.exp_()


def _unravel(n: int, shape: Sequence[int]) -> tuple[int, ...]:
    """The index into ``shape`` of flat (row-major) position ``n``."""
    index = []
    for size in reversed(shape):
        n, i = divmod(n, size)
        index.append(i)
    return tuple(reversed(index))


def _for_heads(x: torch.Tensor | None, lead, heads: range) -> torch.Tensor | None:
    """A mask's or bias's ``(G or 1, Tx, Sx)`` slices for flattened heads ``heads``.

    One view when every head in the group shares the same slice (say a
    ``(B, 1, 1, S)`` padding mask over the heads of one batch row); otherwise
    the group's slices are stacked, a copy ``G`` slices large.
    """
    if x is None:
        return None
    x = x.expand(*lead, *x.shape[-2:])  # a view: broadcast dims have stride 0
    parts = [x[_unravel(n, lead)] for n in heads]
    if all(p.data_ptr() == parts[0].data_ptr() for p in parts):
        return parts[0].unsqueeze(0)
    return torch.stack(parts)


def _groups(n: int, rows: int, cols: int) -> Iterator[range]:
    """Consecutive heads computed together: a tile of ``rows`` by ``cols``
    holds ``TILE_ELEMENTS`` scores (small enough for the CPU's cache, big
    enough for fast matmuls; short queries, as in decoding, batch many heads),
    and every thread gets at least one head's tile."""
    size = max(1, TILE_ELEMENTS // (rows * cols), torch.get_num_threads())
    for g0 in range(0, n, size):
        yield range(g0, min(g0 + size, n))


class _Keys(NamedTuple):
    """What every query block of a group of heads is scored against."""

    kt: torch.Tensor  # (G, D, S): keys, transposed (a view)
    vs: torch.Tensor  # (G, S, Dv): values
    scale: float
    blocked: torch.Tensor | None  # True = may not attend, (G or 1, T or 1, S or 1)
    bias: torch.Tensor | None  # (G or 1, T or 1, S or 1)
    offset: int  # S - T, for the causal diagonal
    buf: torch.Tensor  # room for one tile of scores


def _scores(q_b, keys: _Keys, block: Block):
    """One tile of scaled scores in ``keys.buf``, restricted; and whether it holds ``-inf``."""
    g, bq = q_b.shape[:2]
    j0, j1 = block[2], block[3]
    scores = keys.buf[: g * bq * (j1 - j0)].view(g, bq, j1 - j0)
    # beta=0: the buffer's old contents are ignored; alpha scales inside the matmul
    scores.baddbmm_(q_b, keys.kt[:, :, j0:j1], beta=0.0, alpha=keys.scale)
    return scores, _restrict(scores, keys.blocked, keys.bias, block, keys.offset)


def _row_block(q_b, keys: _Keys, tiles: list[Block]):
    """The online softmax for one block of query rows over its key tiles.

    Per query row it keeps a shift ``m``, the sum ``total`` of
    ``exp(score - m)`` and ``acc``, the sum of ``exp(score - m) v``. The first
    tile sets ``m`` to each row's maximum. A later tile is first exponentiated
    against the ``m`` it finds, without taking its maximum: when every row's
    weights sum to at most ``width * MAX_WEIGHT``, far from float32's
    overflow, they are added as they are. Otherwise some row's maximum grew:
    the tile is recomputed, ``m`` moves to the new maximum and ``total`` and
    ``acc`` are rescaled by ``exp(m_old - m_new)``. (A score far below ``m``
    underflows to weight 0, as it would against the true maximum.)

    Returns:
        ``acc`` ``(G, bq, Dv)``, ``total`` ``(G, bq, 1)`` and the final shift
        ``(G, bq, 1)`` (``m``, or 0 for a row that may attend to nothing).
    """
    m = shift = total = acc = None
    settled = False  # every row has a shift from a real maximum
    for block in tiles:
        j0, j1 = block[2], block[3]
        values = keys.vs[:, j0:j1]  # (G, bk, Dv)
        scores, masked = _scores(q_b, keys, block)
        if settled:  # try the shift we have
            weights = _exp_(scores.sub_(shift), masked)
            row_sums = weights.sum(-1, keepdim=True)  # (G, bq, 1)
            if bool((row_sums <= (j1 - j0) * MAX_WEIGHT).all()):
                total.add_(row_sums)
                acc.baddbmm_(weights, values)
                continue
            scores, masked = _scores(q_b, keys, block)
        top = scores.amax(-1, keepdim=True)  # (G, bq, 1)
        new = top if m is None else torch.maximum(m, top)
        new_shift = new.nan_to_num(neginf=0.0)  # no allowed key yet: shift by 0
        weights = _exp_(scores.sub_(new_shift), masked)
        row_sums = weights.sum(-1, keepdim=True)
        if m is None:
            total, acc = row_sums, torch.bmm(weights, values)  # (G, bq, Dv)
        else:
            rescale = (m - new_shift).exp_()  # m = -inf gives 0: acc was 0
            total.mul_(rescale).add_(row_sums)
            acc.mul_(rescale).baddbmm_(weights, values)
        m, shift = new, new_shift
        settled = not bool(torch.isneginf(m).any())  # -inf: no allowed key yet
    return acc, total, shift


def _key_groups(
    k: torch.Tensor, v: torch.Tensor, mask, bias, lead, t: int, scale: float, size
) -> Iterator[tuple[range, _Keys]]:
    """The groups of heads a call computes together, each with what it is scored against.

    ``k`` ``(N, S, D)`` and ``v`` ``(N, S, Dv)`` are flattened in the compute
    dtype, ``lead`` is the leading shape they came from; ``mask`` and ``bias``
    are as the caller gave them. One buffer for a tile of scores serves every
    group.
    """
    rows, cols = min(size[0], t), min(size[1], k.shape[1])
    blocked = None if mask is None else ~mask
    bias = None if bias is None else bias.to(k.dtype)
    buf = None
    for heads in _groups(k.shape[0], rows, cols):
        if buf is None:
            buf = k.new_empty(len(heads) * rows * cols)
        h = slice(heads.start, heads.stop)
        yield heads, _Keys(
            k[h].transpose(1, 2), v[h], scale, _for_heads(blocked, lead, heads),
            _for_heads(bias, lead, heads), k.shape[1] - t, buf,
        )  # fmt: skip


def _forward(q, k, v, mask, bias, causal, scale, size):
    """Online softmax over key tiles; ``out`` and row log-sum-exp in compute dtype."""
    dtype, lead = _compute_dtype(q.dtype), q.shape[:-2]
    qs, ks, vs = (_flat(x, dtype) for x in (q, k, v))  # (N, L, D); q scaled in matmuls
    (n, t, _), s = qs.shape, ks.shape[1]
    out = qs.new_zeros(n, t, v.shape[-1])  # (N, T, Dv); rows seeing nothing stay 0
    lse = qs.new_full((n, t, 1), float("-inf"))  # (N, T, 1)

    for heads, keys in _key_groups(ks, vs, mask, bias, lead, t, scale, size):
        h = slice(heads.start, heads.stop)
        for i0, i1, tiles in _row_blocks(t, s, *size, causal):
            if not tiles:  # no query here sees a key: out 0, lse -inf
                continue
            acc, total, shift = _row_block(qs[h, i0:i1], keys, tiles)
            torch.div(acc, total.masked_fill(total == 0, 1.0), out=out[h, i0:i1])
            lse[h, i0:i1] = shift + total.log()  # -inf for a row with no allowed key

    return out.view(*lead, t, v.shape[-1]), lse.view(*lead, t)  # (..., T, Dv), (..., T)


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(..., L, D)`` -> ``(N, L, D)`` in the compute dtype."""
    return x.to(dtype).reshape(-1, *x.shape[-2:])  # (N, L, D)


def _add_bias_grad(dbias, ds, lead, heads: range, block: Block) -> None:
    """Add a tile's score gradients ``ds`` ``(G, bq, bk)`` into ``dbias`` at its own shape."""
    i0, i1, j0, j1, _ = block
    own = dbias.shape[:-2]  # bias's leading dims, right-aligned with ``lead``
    for n, grad in zip(heads, ds, strict=True):
        index = _unravel(n, lead)[len(lead) - len(own) :]
        index = tuple(i if size > 1 else 0 for i, size in zip(index, own, strict=True))
        target = _tile(dbias[index], i0, i1, j0, j1)
        target += grad.sum_to_size(target.shape)


def _backward(grad_out, q, k, v, mask, bias, out, lse, causal, scale, size, dbias):
    """Gradients of q, k, v (and bias) by recomputing each tile's weights."""
    dtype, lead = _compute_dtype(q.dtype), q.shape[:-2]
    q, k, v, do = (_flat(x, dtype) for x in (q, k, v, grad_out))  # (N, L, D)
    delta = (do * _flat(out, dtype)).sum(-1, keepdim=True)  # (N, T, 1)
    lse = _flat(lse.unsqueeze(-1), dtype)  # (N, T, 1)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # empty row: p = 0
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    t, s = q.shape[1], k.shape[1]

    for heads, keys in _key_groups(k, v, mask, bias, lead, t, scale, size):
        h = slice(heads.start, heads.stop)
        for block in _tiles(t, s, *size, causal):
            i0, i1, j0, j1, _ = block
            p, masked = _scores(q[h, i0:i1], keys, block)  # (G, bq, bk)
            p = _exp_(p.sub_(lse[h, i0:i1]), masked)  # the weights, recomputed
            dv[h, j0:j1].baddbmm_(p.transpose(1, 2), do[h, i0:i1])  # (G, bk, Dv)
            dp = do[h, i0:i1] @ v[h, j0:j1].transpose(1, 2)  # (G, bq, bk)
            ds = p.mul_(dp.sub_(delta[h, i0:i1]))  # d(loss)/d(score), in place
            dq[h, i0:i1].baddbmm_(ds, k[h, j0:j1], alpha=scale)  # (G, bq, D)
            dk[h, j0:j1].baddbmm_(ds.transpose(1, 2), q[h, i0:i1], alpha=scale)
            if dbias is not None:
                _add_bias_grad(dbias, ds, lead, heads, block)
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
    block_size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    r"""Memory-efficient attention: the online softmax over tiles of queries and keys.

    .. math:: \mathrm{out} = \mathrm{softmax}\!\left(s\,q k^\top + b\right) v,
              \quad s = 1/\sqrt{D}

    computed one tile of scores (``rows`` queries by ``cols`` keys, for a
    group of heads) at a time. Each query row keeps a running maximum :math:`m`, a running sum
    :math:`\ell = \sum_j e^{x_j - m}` and a running weighted sum of values;
    a new tile with a larger maximum :math:`m'` rescales both by
    :math:`e^{m - m'}`, though only once the growth could overflow: smaller
    rises are summed as they are. fp16/bf16 inputs are computed in float32
    tile by tile.
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
            (bottom-right, as :func:`attn_lib.causal_mask`); keys that no
            query of a block may see are skipped, not computed and masked::

                T=S=8, block_size=(2, 4)   a line per block of 2 queries,
                xx.. ....                  a column per key:
                xxxx ....                  x computed (masked above the
                xxxx xx..                  diagonal), . never computed
                xxxx xxxx

        scale: multiplies ``q k^T``; defaults to ``1/sqrt(D)``.
        block_size: ``(rows, cols)``, query rows and key columns per tile,
            or one int for square tiles. The default,
            :func:`default_block_size`, suits CPUs: tiles that fit the cache
            and matmuls wide enough to run near peak speed.

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


def _heads(q: torch.Tensor) -> int:
    """How many heads ``q`` holds: the product of its leading dims (at least 1)."""
    return max(1, math.prod(q.shape[:-2]))


def _block_size(value, heads: int) -> tuple[int, int]:
    """``block_size`` as ``(rows, cols)``: one positive int, a pair of them, or
    ``None`` for the default for ``heads`` heads."""
    if value is None:
        return default_block_size(heads)
    if isinstance(value, tuple) and len(value) == 2:
        pair = value
    else:
        pair = (value, value)
    if any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in pair):
        _checks.fail(
            "block_size",
            "be a positive int or a (rows, cols) tuple of positive ints",
            repr(value),
        )
    return pair


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
    block_size=None,
):
    """What ``attention(..., backend="chunked")`` runs."""
    block_size = _block_size(block_size, _heads(q))
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

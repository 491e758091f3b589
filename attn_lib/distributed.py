"""Ring attention: one long sequence split across processes with ``torch.distributed``.

Each of ``P`` ranks holds one shard of the sequence: its queries, keys and
values ``(..., T_local, D)``. The key/value shards travel around a ring of
ranks, one hop per step, while every rank attends its own queries to the block
it holds and merges the partial result into a running output with the online
softmax. After ``P`` steps every rank holds exactly its shard of full attention.

The building blocks are public so the book can show them one at a time:

* :func:`block_attention` and :func:`merge_partials`: attention over one key
  block with its per-row log-sum-exp, and the exact merge of two such partials.
  (They are this module's own; ``attn_lib.chunked`` builds the same idea for one
  device.)
* :func:`shard_sequence` / :func:`unshard_sequence`: the ``"contiguous"`` and
  ``"zigzag"`` layouts of a sequence over ranks.
* :func:`ring_attention`: the distributed forward and backward.
* :func:`ring_schedule` / :func:`plot_ring_schedule`: which query-key pairs each
  rank scores at each step, for the diagrams.
* :func:`run_on_ranks` / :func:`ring_attention_on_rank`: start ``P`` local
  processes (gloo on the CPU) and run one ring attention in them.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import _checks

LAYOUTS = ("contiguous", "zigzag")

# A plan for one (query shard, key block) pair: the rows and columns that need
# scores, and the mask inside them (None = all allowed); None = nothing to do.
Plan = tuple[slice, slice, torch.Tensor | None] | None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 scores, outputs and log-sum-exps are kept in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with ``-inf`` (a row that saw no key) replaced by 0, safe to subtract."""
    return lse.masked_fill(torch.isneginf(lse), 0.0)


# ----------------------------------------------------------------------------
# One block, and the merge
# ----------------------------------------------------------------------------


def _block_forward(q, k, v, mask, scale):
    """Partial attention of ``q`` over one key block: ``(out, lse)`` in compute dtype.

    The score block is turned into weights in place, so one ``(T, S)`` block is
    alive at a time; autograd still works (no step saves what a later one edits).
    """
    dtype = _compute_dtype(q.dtype)
    scores = q.to(dtype) @ k.to(dtype).transpose(-2, -1)  # (..., T, S)
    scores.mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))

    # Shift by the row max (a constant: the gradient through it cancels), so
    # exp() never overflows; a row that saw no key has max -inf: shift by 0.
    row_max = _finite(scores.detach().amax(dim=-1, keepdim=True))  # (..., T, 1)
    weights = scores.sub_(row_max).exp_()  # (..., T, S), in place
    total = weights.sum(dim=-1)  # (..., T), 0 where the row saw no key
    seen = total > 0
    total = torch.where(seen, total, torch.ones_like(total))
    out = (weights @ v.to(dtype)) / total[..., None]  # (..., T, Dv)
    lse = row_max.squeeze(-1) + torch.log(total)  # (..., T)
    return out, lse.masked_fill(~seen, float("-inf"))


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Attention of ``q`` over one block of keys, with each row's log-sum-exp.

    .. math:: s = \mathrm{scale}\; q k^\top, \qquad
              \ell_i = \log \sum_j e^{s_{ij}}, \qquad
              \mathrm{out}_i = \sum_j e^{s_{ij} - \ell_i}\, v_j

    ``(out, lse)`` is a *partial result*: :func:`merge_partials` combines the
    partials of two disjoint key blocks into the partial of their union,
    exactly, so attention over all keys can be built one block at a time.

    Args:
        q: queries ``(..., T, D)``.
        k: one block of keys ``(..., S, D)``.
        v: its values ``(..., S, Dv)``.
        mask: bool, broadcastable to ``(..., T, S)``; True = may attend.
        scale: multiplies ``q k^T``; defaults to ``1/sqrt(D)``.

    Shape:
        ``out (..., T, Dv)``, ``lse (..., T)``.

    Returns:
        ``(out, lse)``, in float32 for fp16/bf16 inputs (partials are merged
        before rounding), else in the inputs' dtype. A row that may attend to
        no key of the block has ``out = 0`` and ``lse = -inf``, with finite
        gradients.

    Example:
        >>> q, k, v = torch.zeros(1, 4), torch.zeros(2, 4), torch.tensor([[1.], [3.]])
        >>> out, lse = block_attention(q, k, v)
        >>> out.item(), round(lse.item(), 4)  # two equal scores: mean, log 2
        (2.0, 0.6931)
    """
    t, s = _checks.qkv(q, k, v)
    if mask is not None:
        _checks.mask(mask, (*q.shape[:-2], t, s), q.device)
    _checks.scale(scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _block_forward(q, k, v, mask, scale)


def merge_partials(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Merge two partial attention results over disjoint key blocks (online softmax).

    .. math:: \ell = \log\left(e^{\ell_a} + e^{\ell_b}\right), \qquad
              \mathrm{out} = e^{\ell_a - \ell}\,\mathrm{out}_a
                           + e^{\ell_b - \ell}\,\mathrm{out}_b

    Each partial's weights were normalised by its own block's sum; the factors
    ``e^{l_a - l}`` and ``e^{l_b - l}`` renormalise them to the union's sum.
    A row whose ``lse`` is ``-inf`` (it saw no key) contributes nothing.

    Args:
        out_a: partial output ``(..., T, Dv)`` from :func:`block_attention`.
        lse_a: its log-sum-exp ``(..., T)``.
        out_b: the other partial output, same shape.
        lse_b: its log-sum-exp, same shape as ``lse_a``.

    Returns:
        ``(out, lse)`` of the union of the two key blocks.

    Example:
        >>> out, lse = merge_partials(torch.ones(1, 1), torch.zeros(1),
        ...                           3 * torch.ones(1, 1), torch.zeros(1))
        >>> out.item(), round(lse.item(), 4)
        (2.0, 0.6931)
    """
    for name, x in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b)):
        _checks.tensor(x, name, min_dim=1, floating=True)
    _checks.tensor(lse_b, "lse_b", floating=True)
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        _checks.fail(
            "the two partials",
            "have the same shapes",
            f"out {tuple(out_a.shape)} and {tuple(out_b.shape)}, "
            f"lse {tuple(lse_a.shape)} and {tuple(lse_b.shape)}",
        )
    if lse_a.shape != out_a.shape[:-1]:
        _checks.fail(
            "lse_a", "have the shape of out_a without its last dim", tuple(lse_a.shape)
        )
    return _merge(out_a, lse_a, out_b, lse_b)


def _merge(out_a, lse_a, out_b, lse_b):
    """:func:`merge_partials` without the checks."""
    lse = torch.logaddexp(lse_a, lse_b)  # (..., T)
    safe = _finite(lse)
    w_a = torch.exp(lse_a - safe)[..., None]  # (..., T, 1)
    w_b = torch.exp(lse_b - safe)[..., None]  # (..., T, 1)
    return w_a * out_a + w_b * out_b, lse


def _block_backward(q, k, v, dout, lse, delta, mask, scale):
    """Gradients of one block's share of the output: ``(dq, dk, dv)``.

    With ``p = exp(s - lse)`` the *global* weights of this block's keys and
    ``delta = rowsum(dout * out)``: ``dv = p^T dout``,
    ``ds = p * (dout v^T - delta)``, ``dq = scale ds k``, ``dk = scale ds^T q``.
    """
    dtype = lse.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scores = q @ k.transpose(-2, -1)  # (..., T, S)
    scores.mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    weights = scores.sub_(_finite(lse)[..., None]).exp_()  # (..., T, S), in place

    dv = weights.transpose(-2, -1) @ dout  # (..., S, Dv)
    dscores = dout @ v.transpose(-2, -1)  # (..., T, S): d out / d weights
    dscores.sub_(delta[..., None]).mul_(weights).mul_(scale)  # d out / d scores
    dq = dscores @ k  # (..., T, D)
    dk = dscores.transpose(-2, -1) @ q  # (..., S, D)
    return dq, dk, dv


# ----------------------------------------------------------------------------
# Layouts: which global positions a rank holds
# ----------------------------------------------------------------------------


def _positions(n: int, rank: int, size: int, layout: str) -> torch.Tensor:
    """Global positions ``(n,)`` of the ``n`` tokens that ``rank`` holds.

    ``"contiguous"``: rank ``r`` holds block ``r`` of ``P``.
    ``"zigzag"``: the sequence is cut into ``2P`` chunks and rank ``r`` holds
    chunks ``r`` and ``2P - 1 - r``, one early and one late.
    """
    if layout == "contiguous":
        return torch.arange(rank * n, (rank + 1) * n)
    c = n // 2
    late = 2 * size - 1 - rank
    return torch.cat(
        [torch.arange(rank * c, (rank + 1) * c), torch.arange(late * c, (late + 1) * c)]
    )


def _check_length(length: int, size: int, layout: str, what: str) -> None:
    parts = size if layout == "contiguous" else 2 * size
    if length % parts:
        _checks.fail(
            what,
            f"be divisible by {parts} (world_size={size}, layout={layout!r})",
            length,
        )


def shard_sequence(
    x: torch.Tensor, rank: int, world_size: int, *, layout: str = "contiguous"
) -> torch.Tensor:
    """The part of a sequence ``x (..., L, D)`` that ``rank`` holds (dim -2 is split).

    ``"contiguous"`` gives rank ``r`` tokens ``[r L/P, (r+1) L/P)``. ``"zigzag"``
    cuts the sequence into ``2P`` chunks and gives rank ``r`` chunks ``r`` and
    ``2P - 1 - r``, which balances causal work (see :func:`ring_attention`)::

        L=8, P=2     contiguous: rank 0 [0 1 2 3]   rank 1 [4 5 6 7]
                     zigzag:     rank 0 [0 1 6 7]   rank 1 [2 3 4 5]

    Args:
        x: the full sequence ``(..., L, D)``; ``L`` divisible by ``P`` (contiguous)
            or ``2P`` (zigzag).
        rank: which shard, in ``[0, world_size)``.
        world_size: number of ranks ``P``.
        layout: ``"contiguous"`` or ``"zigzag"``.

    Returns:
        A new tensor ``(..., L/P, D)``.

    Example:
        >>> shard_sequence(torch.arange(8.).view(8, 1), 0, 2, layout="zigzag").flatten().tolist()
        [0.0, 1.0, 6.0, 7.0]
    """
    _checks.tensor(x, "x", min_dim=2)
    _checks.positive_int(world_size, "world_size")
    _checks.nonneg_int(rank, "rank")
    if rank >= world_size:
        _checks.fail("rank", f"be below world_size={world_size}", rank)
    _checks.choice(layout, "layout", LAYOUTS)
    _check_length(x.shape[-2], world_size, layout, "the sequence length (dim -2)")
    n = x.shape[-2] // world_size
    return x[
        ..., _positions(n, rank, world_size, layout).to(x.device), :
    ]  # (..., n, D)


def unshard_sequence(
    shards: Sequence[torch.Tensor], *, layout: str = "contiguous"
) -> torch.Tensor:
    """Put the shards of all ranks, in rank order, back into one sequence.

    The inverse of :func:`shard_sequence`: ``unshard_sequence([shard_sequence(x,
    r, P, layout=l) for r in range(P)], layout=l)`` equals ``x``.

    Args:
        shards: ``P`` tensors ``(..., n, D)``, shard ``r`` from rank ``r``.
        layout: the layout they were sharded with.

    Returns:
        The full sequence ``(..., P n, D)``.
    """
    _checks.choice(layout, "layout", LAYOUTS)
    if len(shards) == 0:
        _checks.fail("shards", "hold at least one tensor", "an empty sequence")
    for r, x in enumerate(shards):
        _checks.tensor(x, f"shards[{r}]", min_dim=2)
    if len({tuple(x.shape) for x in shards}) > 1:
        shapes = [tuple(x.shape) for x in shards]
        _checks.fail("shards", "all have the same shape", shapes)
    if layout == "contiguous":
        return torch.cat(list(shards), dim=-2)  # (..., P n, D)
    if shards[0].shape[-2] % 2:
        _checks.fail("zigzag shards", "have an even length", shards[0].shape[-2])
    halves = [x.chunk(2, dim=-2) for x in shards]
    early = [h[0] for h in halves]
    late = [h[1] for h in reversed(halves)]
    return torch.cat(early + late, dim=-2)  # (..., P n, D)


def _plan(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> Plan:
    """Which scores a (query shard, key block) pair needs, given global positions.

    Without a causal mask: all of them. With one (query ``i`` sees key ``j`` iff
    ``j <= i``, the global ``T == S`` case): the smallest row and column ranges
    holding every allowed pair, with the mask inside them, or ``None`` when the
    whole block lies in the future and can be skipped.
    """
    if not causal:
        return slice(None), slice(None), None
    allowed = k_pos[None, :] <= q_pos[:, None]  # (T_local, S_local)
    rows = allowed.any(dim=1).nonzero().flatten()
    if rows.numel() == 0:
        return None
    cols = allowed.any(dim=0).nonzero().flatten()
    r = slice(int(rows[0]), int(rows[-1]) + 1)
    c = slice(int(cols[0]), int(cols[-1]) + 1)
    inside = allowed[r, c]
    return r, c, (None if bool(inside.all()) else inside)


# ----------------------------------------------------------------------------
# The ring
# ----------------------------------------------------------------------------


@dataclass
class RingStats:
    """What one rank's :func:`ring_attention` calls did (pass one as ``stats=``).

    Counters add up over calls, forward and backward.

    Attributes:
        forward_bytes_sent: bytes this rank sent in forward passes (key/value blocks).
        backward_bytes_sent: bytes sent in backward passes (key/value blocks and
            their gradient accumulators).
        bytes_received: bytes received, forward and backward.
        scores_computed: score entries ``q_i . k_j`` this rank computed in
            forward passes (all leading dims included).
        blocks_computed: key blocks attended to in forward passes.
        blocks_skipped: key blocks skipped because they lay wholly in the future.
    """

    forward_bytes_sent: int = 0
    backward_bytes_sent: int = 0
    bytes_received: int = 0
    scores_computed: int = 0
    blocks_computed: int = 0
    blocks_skipped: int = 0


@dataclass(frozen=True)
class _Ring:
    """This rank's place in the ring: its group rank and its neighbours' global ranks."""

    rank: int
    size: int
    group: Any
    send_to: int
    recv_from: int


def _ring_of(group: Any) -> _Ring:
    if not (dist.is_available() and dist.is_initialized()):
        _checks.fail(
            "the torch.distributed process group",
            "be initialised (torch.distributed.init_process_group, or "
            "attn_lib.distributed.run_on_ranks) before ring_attention",
            "torch.distributed.is_initialized() == False",
            exc=RuntimeError,
        )
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        _checks.fail(
            "group", "contain this process", f"rank {dist.get_rank()} outside it"
        )
    peer = (
        (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    )
    return _Ring(rank, size, group, peer((rank + 1) % size), peer((rank - 1) % size))


def _start_shift(ring: _Ring, x: torch.Tensor, stats, phase: str, tag: int = 0):
    """Post the send of ``x`` to the next rank and the receive from the previous one.

    Returns the pending works and the buffer being received into: the caller
    computes while the transfer runs and calls :func:`_wait` before reading it.
    On one rank there is nothing to send and ``x`` itself comes back.
    """
    if ring.size == 1:
        return [], x
    received = torch.empty_like(x)
    works = dist.batch_isend_irecv(
        [
            dist.P2POp(dist.isend, x, ring.send_to, ring.group, tag),
            dist.P2POp(dist.irecv, received, ring.recv_from, ring.group, tag),
        ]
    )
    if stats is not None:
        nbytes = x.numel() * x.element_size()
        name = f"{phase}_bytes_sent"
        setattr(stats, name, getattr(stats, name) + nbytes)
        stats.bytes_received += nbytes
    return works, received


def _wait(works) -> None:
    for work in works:
        work.wait()


def _plans(ring: _Ring, n_q: int, n_k: int, causal: bool, layout: str) -> list[Plan]:
    """The plan of every step: at step ``s`` this rank holds the block of rank ``r - s``."""
    q_pos = _positions(n_q, ring.rank, ring.size, layout)
    sources = [(ring.rank - step) % ring.size for step in range(ring.size)]
    return [
        _plan(q_pos, _positions(n_k, j, ring.size, layout), causal) for j in sources
    ]


def _forward_step(q, kv, d, out, lse, plan, scale, stats):
    """Attend to the held key/value block and merge into ``out``, ``lse`` in place."""
    if plan is None:
        if stats is not None:
            stats.blocks_skipped += 1
        return
    rows, cols, mask = plan
    k, v = kv[..., cols, :d], kv[..., cols, d:]  # (..., S', D), (..., S', Dv)
    mask = None if mask is None else mask.to(q.device)
    part = _block_forward(q[..., rows, :], k, v, mask, scale)
    out[..., rows, :], lse[..., rows] = _merge(out[..., rows, :], lse[..., rows], *part)
    if stats is not None:
        stats.blocks_computed += 1
        stats.scores_computed += part[0].shape[:-1].numel() * k.shape[-2]


def _ring_forward(q, k, v, scale, causal, layout, ring, stats):
    """Every step: send the held block on, attend to it, receive the next one."""
    dtype = _compute_dtype(q.dtype)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=dtype, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=dtype, device=q.device)
    kv = torch.cat([k, v], dim=-1)  # (..., S, D + Dv): one message per step
    plans = _plans(ring, q.shape[-2], k.shape[-2], causal, layout)
    for step, plan in enumerate(plans):
        works, incoming = [], kv
        if step < ring.size - 1:  # the last block goes nowhere
            works, incoming = _start_shift(ring, kv, stats, "forward")
        _forward_step(q, kv, k.shape[-1], out, lse, plan, scale, stats)
        _wait(works)
        kv = incoming
    return out, lse


def _backward_step(q, kv, d, dout, lse, delta, dq, plan, scale):
    """Gradients from the held block: adds into ``dq``, returns the block's ``dkv``."""
    dkv = torch.zeros(*kv.shape, dtype=dq.dtype, device=dq.device)  # (..., S, D + Dv)
    if plan is None:
        return dkv
    rows, cols, mask = plan
    mask = None if mask is None else mask.to(q.device)
    grads = _block_backward(
        q[..., rows, :], kv[..., cols, :d], kv[..., cols, d:],
        dout[..., rows, :], lse[..., rows], delta[..., rows], mask, scale,
    )  # fmt: skip
    dq[..., rows, :] += grads[0]
    dkv[..., cols, :] = torch.cat(grads[1:], dim=-1)  # (..., S', D + Dv)
    return dkv


def _ring_backward(dout, q, k, v, out, lse, scale, causal, layout, ring, stats):
    """The ring again: blocks travel as in the forward, each with its gradient.

    A block's gradient accumulator ``dkv`` travels one step behind the block
    (it is sent once this step's share is added), and one extra hop after the
    last step brings it home to the rank that owns the block.
    """
    dout = dout.to(out.dtype)
    delta = (dout * out).sum(dim=-1)  # (..., T)
    dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)  # (..., T, D)
    kv = torch.cat([k, v], dim=-1)  # (..., S, D + Dv)
    plans = _plans(ring, q.shape[-2], k.shape[-2], causal, layout)
    dkv_works, dkv = [], None
    for step, plan in enumerate(plans):
        kv_works, next_kv = [], kv
        if step < ring.size - 1:
            kv_works, next_kv = _start_shift(ring, kv, stats, "backward", tag=0)
        grad = _backward_step(q, kv, k.shape[-1], dout, lse, delta, dq, plan, scale)
        _wait(dkv_works)  # the accumulator of the block held now has arrived
        dkv = grad if dkv is None else dkv + grad
        dkv_works, dkv = _start_shift(ring, dkv, stats, "backward", tag=1)
        _wait(kv_works)
        kv = next_kv
    _wait(dkv_works)  # this rank's own block, with every rank's share
    d = k.shape[-1]
    return dq, dkv[..., :d], dkv[..., d:]


class _RingAttention(torch.autograd.Function):
    """Autograd cannot see through point-to-point messages: the backward is a second ring."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, layout, ring, stats):
        out, lse = _ring_forward(q, k, v, scale, causal, layout, ring, stats)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (scale, causal, layout, ring, stats)
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, *ctx.options)
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _local_problem(q, k, v, causal: bool, layout: str, ring: _Ring) -> str | None:
    """This rank's own complaint about its inputs, as ``"TypeError: ..."``, or None."""
    try:
        t, s = _checks.qkv(q, k, v)
        backend = dist.get_backend(ring.group)
        wanted = {"gloo": "cpu", "nccl": "cuda"}.get(backend, q.device.type)
        if q.device.type != wanted:
            _checks.fail(
                "q, k and v", f"be on {wanted} for the {backend} backend", q.device
            )
        if causal and t != s:
            _checks.fail(
                "q and k shards",
                "have the same length when is_causal=True (globally T == S)",
                f"T_local={t}, S_local={s}",
            )
        if layout == "zigzag" and t % 2:
            _checks.fail("the shard length", "be even for layout='zigzag'", t)
    except (TypeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _agree_on_inputs(q, k, v, causal: bool, layout: str, ring: _Ring) -> None:
    """Check the inputs on every rank at once, so that all ranks raise together.

    A rank that raised alone would leave the others waiting forever for its
    messages; here every rank shares its complaint (and its shapes) first.
    """
    problem = _local_problem(q, k, v, causal, layout, ring)
    shapes = None if problem else [tuple(x.shape) for x in (q, k, v)]
    everyone: list[Any] = [None] * ring.size
    dist.all_gather_object(everyone, (problem, shapes), group=ring.group)
    for rank, (problem, _) in enumerate(everyone):
        if problem:
            kind, message = problem.split(": ", 1)
            exc = TypeError if kind == "TypeError" else ValueError
            raise exc(f"{message} (on rank {rank})")
    if len({str(shapes) for _, shapes in everyone}) > 1:
        got = "; ".join(
            f"rank {r}: q {s[0]}, k {s[1]}, v {s[2]}"
            for r, (_, s) in enumerate(everyone)
        )
        _checks.fail("the q, k and v shards", "have the same shapes on every rank", got)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    layout: str = "contiguous",
    group: Any = None,
    stats: RingStats | None = None,
) -> torch.Tensor:
    r"""Attention over a sequence sharded across the ranks of a process group.

    Every rank passes its own shard; every rank gets back its shard of

    .. math:: \mathrm{out} = \mathrm{softmax}\!\left(\mathrm{scale}\; Q K^\top\right) V

    where ``Q``, ``K``, ``V`` are the whole sequences. At step ``s`` of ``P``,
    rank ``r`` holds the key/value shard of rank ``r - s (mod P)``: it posts the
    send of that block to rank ``r + 1`` and the receive of the next one from
    rank ``r - 1``, attends to the block while they travel (overlap), and merges
    the partial result with :func:`merge_partials`. The backward pass runs the
    ring again; gradients flow to ``q``, ``k`` and ``v``.

    With ``is_causal=True`` the global sequence is causal (``T == S``, so
    bottom-right and top-left alignment agree): query ``i`` sees key ``j`` iff
    ``j <= i``, in global positions. Blocks wholly in the future are skipped.
    With the contiguous layout that leaves rank ``r`` ``r + 1`` blocks of work,
    so the last rank sets the pace; the zig-zag layout (see
    :func:`shard_sequence`) gives every rank the same work::

        contiguous, P=4: work per rank 1, 2, 3, 4 blocks   (slowest: 4)
        zigzag,     P=4: work per rank 2.5 blocks each     (slowest: 2.5)

    Args:
        q: this rank's queries ``(..., T_local, D)``.
        k: this rank's keys ``(..., S_local, D)``; ``S_local == T_local`` when causal.
        v: this rank's values ``(..., S_local, Dv)``.
        is_causal: mask keys that come later in the global sequence.
        scale: multiplies ``q k^T``; defaults to ``1/sqrt(D)``.
        layout: how the sequence was sharded: ``"contiguous"`` or ``"zigzag"``
            (matters only when causal).
        group: the process group whose ranks form the ring; the default group
            if None.
        stats: a :class:`RingStats` to add this call's traffic and work to.

    Returns:
        This rank's output shard ``(..., T_local, Dv)``, in ``q``'s dtype.

    Example (in each of ``P`` processes)::

        q, k, v = (shard_sequence(x, rank, P) for x in (q_all, k_all, v_all))
        out = ring_attention(q, k, v, is_causal=True)  # == shard of full attention

    Limitations:
        No ``mask``, ``bias`` or dropout; first-order gradients only (the
        backward is not itself differentiable). Every rank must hold shards of the same
        shape, and the inputs are checked collectively (every rank raises the
        same error together rather than leave the others waiting). gloo needs
        CPU tensors and nccl CUDA tensors.
    """
    _checks.choice(layout, "layout", LAYOUTS)
    _checks.scale(scale)
    ring = _ring_of(group)
    _agree_on_inputs(q, k, v, is_causal, layout, ring)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, scale, bool(is_causal), layout, ring, stats)


# ----------------------------------------------------------------------------
# Pictures of the schedule
# ----------------------------------------------------------------------------


def ring_schedule(
    world_size: int,
    *,
    is_causal: bool = False,
    layout: str = "contiguous",
    shard_len: int = 4,
) -> np.ndarray:
    """Which rank scores each query-key pair at each step of the ring.

    Uses the same plans as :func:`ring_attention`, so the picture is the
    algorithm's own. Pairs masked out (causal) or not scored at a step are -1.

    Args:
        world_size: number of ranks ``P``.
        is_causal: skip and mask future keys.
        layout: ``"contiguous"`` or ``"zigzag"``.
        shard_len: tokens per rank (even for zigzag).

    Returns:
        An int array ``(P, L, L)``, ``L = P * shard_len``: entry ``[s, i, j]`` is
        the rank that computes the weight of query ``i`` on key ``j`` at step ``s``.
    """
    _checks.positive_int(world_size, "world_size")
    _checks.positive_int(shard_len, "shard_len")
    _checks.choice(layout, "layout", LAYOUTS)
    _check_length(shard_len * world_size, world_size, layout, "shard_len * world_size")
    size, n = world_size, shard_len
    grid = np.full((size, size * n, size * n), -1)
    for rank in range(size):
        ring = _Ring(rank, size, None, (rank + 1) % size, (rank - 1) % size)
        q_pos = _positions(n, rank, size, layout).numpy()
        for step, plan in enumerate(_plans(ring, n, n, is_causal, layout)):
            if plan is None:
                continue
            rows, cols, mask = plan
            k_pos = _positions(n, (rank - step) % size, size, layout).numpy()
            ok = np.ones((len(q_pos[rows]), len(k_pos[cols])), bool)
            ok = ok if mask is None else mask.numpy()
            grid[step][np.ix_(q_pos[rows], k_pos[cols])] = np.where(ok, rank, -1)
    return grid


def plot_ring_schedule(
    world_size: int,
    *,
    is_causal: bool = False,
    layout: str = "contiguous",
    shard_len: int = 4,
    axes: Any = None,
) -> Any:
    """Draw :func:`ring_schedule`: one panel per step, each pair coloured by its rank.

    Queries are on rows and keys on columns (global positions); white pairs are
    not scored at that step.

    Args:
        world_size, is_causal, layout, shard_len: as for :func:`ring_schedule`.
        axes: ``P`` matplotlib Axes to draw into; a new row of panels if None.

    Returns:
        The Axes, one per step.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    grid = ring_schedule(
        world_size, is_causal=is_causal, layout=layout, shard_len=shard_len
    )
    if axes is None:
        _, axes = plt.subplots(1, world_size, figsize=(2.6 * world_size, 2.9))
    axes = np.atleast_1d(axes)
    colours = ["white"] + [plt.get_cmap("tab10")(r) for r in range(world_size)]
    cmap = ListedColormap(colours)
    for step, ax in enumerate(axes):
        ax.imshow(grid[step], cmap=cmap, vmin=-1.5, vmax=world_size - 0.5)
        ax.set_title(f"step {step}")
        ax.set_xlabel("key position")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel("query position")
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=colours[r + 1]) for r in range(world_size)
    ]
    labels = [f"rank {r}" for r in range(world_size)]
    axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return axes


# ----------------------------------------------------------------------------
# Starting processes
# ----------------------------------------------------------------------------


def _rank_main(rank, world_size, backend, folder, fn, args, kwargs, timeout_s):
    """The body of each spawned process: join the group, run ``fn``, save its result."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on this machine
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.FileStore(os.path.join(folder, "store"), world_size)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        outcome = ("result", fn(*args, **kwargs))
        dist.barrier()
    except Exception as error:  # reported by the parent, with every other rank's
        outcome = ("error", f"{type(error).__name__}: {error}", traceback.format_exc())
    finally:
        dist.destroy_process_group()
    torch.save(outcome, os.path.join(folder, f"rank{rank}.pt"))


def _results(outcomes: list[tuple]) -> list[Any]:
    """The ranks' results, or one error that names every rank that failed."""
    failed = [(r, o) for r, o in enumerate(outcomes) if o[0] == "error"]
    if failed:
        got = "; ".join(f"rank {r}: {o[1]}" for r, o in failed)
        tracebacks = "\n".join(f"--- rank {r} ---\n{o[2]}" for r, o in failed)
        _checks.fail(
            "every rank",
            "finish without an error",
            f"{got}\n{tracebacks}",
            exc=RuntimeError,
        )
    return [o[1] for o in outcomes]


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in ``world_size`` new local processes, one per rank.

    Each process joins one process group (a file store in a temporary folder;
    gloo talks over the loopback interface on Linux), runs ``fn`` and returns
    its result here. Inside ``fn``, ``torch.distributed.get_rank()`` says which
    rank it is. ``torchrun`` does the same job from a shell, for scripts.

    Args:
        fn: a function defined in an importable module (not in a notebook cell):
            processes are *spawned*, fresh interpreters that import it by name.
        world_size: number of processes ``P``.
        *args: passed to ``fn`` (pickled: tensors are copied to every process).
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (one GPU per rank).
        timeout_s: how long a collective may wait before the group gives up.
        **kwargs: passed to ``fn``.

    Returns:
        The ``P`` results, in rank order.

    Raises:
        RuntimeError: when ``fn`` raised on some ranks. The message names
            each failing rank and its error, then their tracebacks; a rank
            whose neighbour failed often fails too, with "connection closed".
    """
    _checks.positive_int(world_size, "world_size")
    _checks.choice(backend, "backend", ("gloo", "nccl"))
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        _checks.fail(
            "world_size",
            f"be at most the number of GPUs ({torch.cuda.device_count()}) for nccl",
            world_size,
        )
    with tempfile.TemporaryDirectory() as folder:
        spawn_args = (world_size, backend, folder, fn, args, kwargs, float(timeout_s))
        torch.multiprocessing.start_processes(
            _rank_main, args=spawn_args, nprocs=world_size, start_method="spawn"
        )
        paths = [os.path.join(folder, f"rank{r}.pt") for r in range(world_size)]
        return _results([torch.load(p, weights_only=False) for p in paths])


def _status_kib(field: str) -> int | None:
    """A ``Vm...`` line of ``/proc/self/status`` in KiB (Linux), else None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> int | None:
    """Reset the resident-set high-water mark (Linux); return the current RSS in KiB."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def _warm_up(q, k, v, is_causal: bool, layout: str) -> None:
    """One tiny ring first: connections, thread pools and caches are set up outside
    the measurement, which then sees only what attention itself needs."""
    tiny = [x.detach()[..., :2, :].clone().requires_grad_() for x in (q, k, v)]
    out = ring_attention(*tiny, is_causal=is_causal, layout=layout)
    out.backward(torch.ones_like(out))  # the first backward(grad) imports ~30 MB


def ring_attention_on_rank(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    layout: str = "contiguous",
) -> dict[str, Any]:
    """Shard the full ``q, k, v``, run :func:`ring_attention` on this rank, report.

    Meant for :func:`run_on_ranks`: every rank gets the full tensors, keeps its
    own shard, runs the forward (and the backward with ``grad_out``'s shard),
    and returns what it computed and measured.

    Args:
        q, k, v: the whole sequences ``(..., L, D)``, ``(..., L, D)``, ``(..., L, Dv)``.
        grad_out: the gradient of a loss with respect to the whole output, or None.
        is_causal, layout: as for :func:`ring_attention`.

    Returns:
        dict: ``rank``, ``out`` (this rank's output shard), ``grad_q``,
        ``grad_k``, ``grad_v`` (shards, when ``grad_out`` is given), ``stats``
        (a :class:`RingStats`), and ``peak_bytes``: how far this process's
        resident memory rose above its level before the call (Linux; None
        elsewhere), a measurement of the working memory attention needed.
    """
    rank, size = dist.get_rank(), dist.get_world_size()
    shard = [shard_sequence(x, rank, size, layout=layout) for x in (q, k, v)]
    q, k, v = (x.requires_grad_(grad_out is not None) for x in shard)
    _warm_up(q, k, v, is_causal, layout)
    stats, before = RingStats(), _reset_peak_rss()
    out = ring_attention(q, k, v, is_causal=is_causal, layout=layout, stats=stats)
    if grad_out is not None:
        out.backward(shard_sequence(grad_out, rank, size, layout=layout))
    peak = _status_kib("VmHWM")
    result = {"rank": rank, "out": out.detach(), "stats": stats}
    result["peak_bytes"] = (
        None if before is None or peak is None else (peak - before) * 1024
    )
    if grad_out is not None:
        result.update(grad_q=q.grad, grad_k=k.grad, grad_v=v.grad)
    return result

"""Single-head cross-attention: queries from one sequence, keys and values from another.

Shapes use the book's legend: ``x`` ``(B, T, E)`` gives the queries, ``context``
``(B, S, E_ctx)`` gives the keys and values; ``T`` and ``S`` may differ.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .functional import attention

Result = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _check_inputs(x: torch.Tensor, context: torch.Tensor, embed_dim: int, kdim: int):
    """Check ``x (B, T, E)`` and ``context (B, S, E_ctx)`` against the module."""
    _checks.tensor(x, "x", floating=True)
    _checks.tensor(context, "context", floating=True)
    if x.dim() != 3 or x.shape[-1] != embed_dim:
        _checks.fail("x", f"have shape (B, T, {embed_dim})", f"shape {tuple(x.shape)}")
    if context.dim() != 3 or context.shape[-1] != kdim:
        _checks.fail(
            "context", f"have shape (B, S, {kdim})", f"shape {tuple(context.shape)}"
        )
    if context.shape[0] != x.shape[0]:
        _checks.fail(
            "x and context",
            "have the same batch size B",
            f"x {tuple(x.shape)} and context {tuple(context.shape)}",
        )
    _checks.same_dtype_device(x=x, context=context)


class CrossAttention(nn.Module):
    r"""Single-head cross-attention: each position of ``x`` reads from ``context``.

    .. math:: Q = x W_q^\top,\quad K = c\, W_k^\top,\quad V = c\, W_v^\top,\quad
              \mathrm{out} = \mathrm{softmax}\!\left(Q K^\top / \sqrt{E}\right)
              V\, W_o^\top

    Only the origin of the inputs differs from self-attention: the queries come
    from ``x``, the keys and values from ``context``. It has nothing to do with
    the number of heads (``attn_lib.MultiHeadAttention`` does cross-
    attention with many heads when given a ``context``). Each query is scored
    against every key, so the cost is :math:`O(T \cdot S \cdot E)`.

    Args:
        embed_dim: ``E``, the width of ``x``, of the queries and of the output.
        kdim: ``E_ctx``, the width of ``context``; defaults to ``embed_dim``.
            Same as ``nn.MultiheadAttention(kdim=kdim, vdim=kdim)``.
        bias: add a bias in the four projections.
        dropout: dropout probability on the weights, applied only in training.

    Shape:
        - x: ``(B, T, E)``; context: ``(B, S, E_ctx)``.
        - mask: bool, broadcastable to ``(B, 1, T, S)`` (one head), True = may
          attend; :func:`attn_lib.padding_mask` gives ``(B, 1, 1, S)``.
        - output: ``(B, T, E)``; weights: ``(B, T, S)``.

    Example:
        >>> layer = CrossAttention(8, kdim=4)
        >>> out = layer(torch.randn(2, 3, 8), torch.randn(2, 5, 4))
        >>> tuple(out.shape)
        (2, 3, 8)
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        kdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_dim = _checks.positive_int(embed_dim, "embed_dim")
        self.kdim = embed_dim if kdim is None else _checks.positive_int(kdim, "kdim")
        self.dropout = _checks.probability(dropout, "dropout")
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> Result:
        """Attend from ``x (B, T, E)`` to ``context (B, S, E_ctx)``.

        Returns ``out (B, T, E)``, or ``(out, weights (B, T, S))`` when
        ``return_weights`` is True. A query whose keys are all masked gets a
        zero weight row (its output is then the output projection's bias).
        """
        _check_inputs(x, context, self.embed_dim, self.kdim)
        q = self.q_proj(x).unsqueeze(1)  # (B, T, E) -> (B, 1, T, E)
        k = self.k_proj(context).unsqueeze(1)  # (B, S, E_ctx) -> (B, 1, S, E)
        v = self.v_proj(context).unsqueeze(1)  # (B, S, E_ctx) -> (B, 1, S, E)
        dropout_p = self.dropout if self.training else 0.0
        result = attention(
            q, k, v, mask=mask, dropout_p=dropout_p, return_weights=return_weights
        )
        if not return_weights:
            return self.out_proj(result.squeeze(1))  # (B, T, E)
        out, weights = result
        return self.out_proj(out.squeeze(1)), weights.squeeze(1)  # (B, T, S)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> CrossAttention:
        """A ``CrossAttention`` with the weights of a one-head ``nn.MultiheadAttention``.

        ``mha`` must have ``num_heads=1``, ``batch_first=True`` and
        ``kdim == vdim``; called as ``mha(x, context, context)`` it then gives
        the same output as the returned module called as ``layer(x, context)``.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            _checks.fail(
                "mha", "be an nn.MultiheadAttention", type(mha).__name__, exc=TypeError
            )
        if mha.num_heads != 1 or not mha.batch_first or mha.kdim != mha.vdim:
            _checks.fail(
                "mha",
                "have num_heads=1, batch_first=True and kdim == vdim",
                f"num_heads={mha.num_heads}, batch_first={mha.batch_first}, "
                f"kdim={mha.kdim}, vdim={mha.vdim}",
            )
        if mha.bias_k is not None or mha.add_zero_attn:
            _checks.fail(
                "mha", "have add_bias_kv=False and add_zero_attn=False", "extra keys"
            )
        layer = cls(
            mha.embed_dim,
            kdim=mha.kdim,
            bias=mha.in_proj_bias is not None,
            dropout=mha.dropout,
        )
        _copy_weights(mha, layer)
        return layer.to(mha.out_proj.weight)


def _copy_weights(mha: nn.MultiheadAttention, layer: CrossAttention) -> None:
    """Copy ``mha``'s projections into ``layer`` (no autograd, no shared storage)."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.split(e)  # 3 x (E, E)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.split(e)
    projections = (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj)
    weights = (*weights, mha.out_proj.weight)
    biases = (*biases, mha.out_proj.bias)
    with torch.no_grad():
        for proj, w, b in zip(projections, weights, biases, strict=True):
            proj.weight.copy_(w)
            if b is not None:
                proj.bias.copy_(b)

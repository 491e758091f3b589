"""Single-head self-attention modules: ``SelfAttention`` and ``CausalSelfAttention``.

Both take ``x`` ``(B, T, E)``. Inside, the one head is kept as a head dim of
size 1, ``(B, 1, T, D)``, so masks follow the library-wide rule: boolean,
True = may attend, broadcastable to ``(B, H, T, S)`` with ``H = 1``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .cache import KVCache
from .functional import BACKENDS, attention

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class SelfAttention(nn.Module):
    r"""Single-head self-attention: one sequence supplies queries, keys and values.

    .. math::
        q = x W_q, \quad k = x W_k, \quad v = x W_v, \quad
        \mathrm{out} = \mathrm{softmax}\!\left(\frac{q k^\top}{\sqrt{D}}\right) v \, W_o

    Every token attends to every token, itself included. Without positional
    information the layer is permutation-equivariant: permuting the tokens
    of ``x`` permutes the rows of the output the same way.

    Args:
        embed_dim: model width ``E`` of the input and the output.
        head_dim: width ``D`` of queries, keys and values; defaults to ``E``.
        bias: add biases to the four projections.
        dropout: dropout on the attention weights, applied only in training mode.
        backend: passed to :func:`attn_lib.attention` (``"auto"``, ``"math"``, ...).

    Shape:
        ``x`` ``(B, T, E)``; ``mask`` bool, broadcastable to ``(B, 1, T, T)``
        (for example :func:`attn_lib.causal_mask` ``(T, T)`` or
        :func:`attn_lib.padding_mask` ``(B, 1, 1, T)``); output ``(B, T, E)``;
        weights ``(B, T, T)``.

    Example:
        >>> layer = SelfAttention(8).eval()
        >>> out, w = layer(torch.randn(2, 5, 8), return_weights=True)
        >>> tuple(out.shape), tuple(w.shape)
        ((2, 5, 8), (2, 5, 5))
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        head_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.embed_dim = _checks.positive_int(embed_dim, "embed_dim")
        head_dim = embed_dim if head_dim is None else head_dim
        self.head_dim = _checks.positive_int(head_dim, "head_dim")
        self.dropout = _checks.probability(dropout, "dropout")
        self.backend = _checks.choice(backend, "backend", BACKENDS)
        self.q_proj = nn.Linear(embed_dim, head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, head_dim, bias=bias)
        self.out_proj = nn.Linear(head_dim, embed_dim, bias=bias)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, head_dim={self.head_dim}, dropout={self.dropout}"

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Project ``x`` to q, k, v, each with a head dim of size 1."""
        _checks.tensor(x, "x", floating=True)
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            _checks.fail(
                "x", f"have shape (B, T, {self.embed_dim})", f"shape {tuple(x.shape)}"
            )
        q = self.q_proj(x).unsqueeze(1)  # (B, T, E) -> (B, 1, T, D)
        k = self.k_proj(x).unsqueeze(1)  # (B, 1, T, D)
        v = self.v_proj(x).unsqueeze(1)  # (B, 1, T, D)
        return q, k, v

    def _attend(self, q, k, v, mask, causal: bool, return_weights: bool) -> Output:
        """Attention over the single head, then the output projection."""
        result = attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            return_weights=return_weights,
            backend="math" if return_weights else self.backend,
        )
        out, weights = result if return_weights else (result, None)
        out = self.out_proj(out.squeeze(1))  # (B, 1, T, D) -> (B, T, E)
        return (out, weights.squeeze(1)) if return_weights else out  # (B, T, S)

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> Output:
        """Attend from every token of ``x`` to every token of ``x``.

        Args:
            x: ``(B, T, E)``.
            mask: bool, True = may attend, broadcastable to ``(B, 1, T, T)``.
            return_weights: also return the weights ``(B, T, T)``.

        Returns:
            ``out`` ``(B, T, E)``, or ``(out, weights)``.
        """
        q, k, v = self._split(x)
        return self._attend(q, k, v, mask, False, return_weights)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> SelfAttention:
        """A copy of a single-head, batch-first ``nn.MultiheadAttention``.

        The returned layer gives the same output as ``mha(x, x, x)`` (and the
        causal subclass as ``mha`` with a causal ``attn_mask``).

        Limitations:
            Only ``num_heads=1``, ``batch_first=True``, equal ``kdim``/``vdim``
            and no ``add_bias_kv``/``add_zero_attn`` are supported.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            _checks.fail(
                "mha", "be an nn.MultiheadAttention", type(mha).__name__, exc=TypeError
            )
        plain = (
            mha.in_proj_weight is not None
            and mha.bias_k is None
            and not mha.add_zero_attn
        )
        if mha.num_heads != 1 or not mha.batch_first or not plain:
            _checks.fail(
                "mha",
                "be single-head and batch-first, with kdim = vdim = embed_dim "
                "and no add_bias_kv or add_zero_attn",
                f"num_heads={mha.num_heads}, batch_first={mha.batch_first}",
            )
        bias = mha.in_proj_bias is not None
        layer = cls(mha.embed_dim, bias=bias, dropout=mha.dropout)
        projections = (layer.q_proj, layer.k_proj, layer.v_proj)
        weights = mha.in_proj_weight.detach().chunk(3)  # 3 x (E, E)
        biases = mha.in_proj_bias.detach().chunk(3) if bias else (None,) * 3
        with torch.no_grad():
            for proj, w, b in zip(projections, weights, biases, strict=True):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            layer.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        return layer.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)


class CausalSelfAttention(SelfAttention):
    r"""Masked (causal) single-head self-attention, with an optional KV cache.

    Token ``i`` attends only to tokens ``j <= i``. The causal mask is aligned
    bottom-right, so with a :class:`attn_lib.KVCache` holding ``P`` earlier
    tokens, the ``T`` new queries are the last ``T`` of ``P + T`` positions::

        P=3 cached, T=2 new      keys ->
        query 3 (new)            1 1 1 1 0
        query 4 (new)            1 1 1 1 1

    Takes the same arguments as :class:`SelfAttention`.

    Shape:
        ``x`` ``(B, T, E)``; ``mask`` bool broadcastable to ``(B, 1, T, S)``
        where ``S = len(cache) + T``; output ``(B, T, E)``; weights ``(B, T, S)``.

    Example:
        >>> layer, cache = CausalSelfAttention(8).eval(), KVCache()
        >>> x = torch.randn(1, 4, 8)
        >>> steps = torch.cat([layer(x[:, i : i + 1], cache=cache) for i in range(4)], 1)
        >>> torch.allclose(steps, layer(x), atol=1e-6)
        True
    """

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_weights: bool = False,
    ) -> Output:
        """Attend from each token of ``x`` to itself and the tokens before it.

        Args:
            x: ``(B, T, E)``, the new tokens.
            mask: bool, True = may attend, broadcastable to ``(B, 1, T, S)``;
                combined with the causal mask.
            cache: a :class:`attn_lib.KVCache`; the new keys and values are
                appended to it and the queries attend over all it holds.
            return_weights: also return the weights ``(B, T, S)``.

        Returns:
            ``out`` ``(B, T, E)``, or ``(out, weights)``.
        """
        if cache is not None and not isinstance(cache, KVCache):
            _checks.fail(
                "cache",
                "be an attn_lib.KVCache or None",
                type(cache).__name__,
                exc=TypeError,
            )
        q, k, v = self._split(x)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, 1, S, D), S = cached + T
        return self._attend(q, k, v, mask, True, return_weights)

"""Multi-head attention, with grouped-query and multi-query variants.

Shapes follow the book's legend: ``B`` batch, ``H`` query heads, ``Hkv`` key/value
heads, ``T`` query length, ``S`` key/value length, ``D`` head dim, ``E = H*D``.
Masks are boolean with True = may attend.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import _checks
from .cache import KVCache
from .functional import attention

Context = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Cut the last dim into ``num_heads`` heads and move heads before the length.

    Args:
        x: ``(..., T, H*D)``.
        num_heads: ``H``; must divide the last dim of ``x``.

    Returns:
        ``(..., H, T, D)``: head ``h`` holds features ``h*D:(h+1)*D`` of every token.

    Example:
        >>> split_heads(torch.zeros(2, 7, 12), 3).shape
        torch.Size([2, 3, 7, 4])
    """
    _checks.tensor(x, "x", min_dim=2)
    _checks.positive_int(num_heads, "num_heads")
    _checks.divisible(x.shape[-1], "x.shape[-1]", num_heads, "num_heads")
    x = x.unflatten(-1, (num_heads, -1))  # (..., T, H*D) -> (..., T, H, D)
    return x.transpose(-3, -2)  # (..., H, T, D)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """Undo :func:`split_heads`: put the heads side by side again.

    Args:
        x: ``(..., H, T, D)``.

    Returns:
        ``(..., T, H*D)``; ``merge_heads(split_heads(x, h))`` equals ``x``.

    Example:
        >>> merge_heads(torch.zeros(2, 3, 7, 4)).shape
        torch.Size([2, 7, 12])
    """
    _checks.tensor(x, "x", min_dim=3)
    x = x.transpose(-3, -2)  # (..., H, T, D) -> (..., T, H, D)
    return x.flatten(-2)  # (..., T, H*D)


def repeat_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat each key/value head ``groups`` times, so query heads can share it.

    Query head ``h`` reads key/value head ``h // groups``: consecutive query
    heads form a group that shares one key/value head.

    Args:
        x: keys or values ``(..., Hkv, S, D)``.
        groups: query heads per key/value head, ``H // Hkv``.

    Returns:
        ``(..., Hkv*groups, S, D)``; ``x`` itself when ``groups == 1``.

    Example:
        >>> repeat_kv_heads(torch.arange(2.).view(1, 2, 1, 1), 2).flatten().tolist()
        [0.0, 0.0, 1.0, 1.0]
    """
    _checks.tensor(x, "x", min_dim=3)
    _checks.positive_int(groups, "groups")
    if groups == 1:
        return x
    return x.repeat_interleave(groups, dim=-3)  # (..., Hkv*groups, S, D)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        _checks.fail(name, "be a bool", repr(value), exc=TypeError)
    return value


def _optional_dim(value: Any, name: str, default: int) -> int:
    return default if value is None else _checks.positive_int(value, name)


class MultiHeadAttention(nn.Module):
    r"""Multi-head attention, batch-first, with optional grouped-query heads.

    .. math::
        \mathrm{head}_h = \mathrm{softmax}\!\left(
            \frac{(x W^Q_h)(c W^K_{g(h)})^\top}{\sqrt{D}} + b_h\right) c W^V_{g(h)},
        \qquad
        \mathrm{out} = [\mathrm{head}_1, \dots, \mathrm{head}_H]\, W^O

    where ``c`` is ``x`` itself (self-attention) or ``context`` (cross-attention)
    and ``g(h) = h // (H / Hkv)`` is the key/value head that query head ``h``
    reads. ``num_kv_heads == num_heads`` is ordinary multi-head attention,
    ``1 < num_kv_heads < num_heads`` grouped-query attention and
    ``num_kv_heads == 1`` multi-query attention.

    The projections are ``nn.Linear`` layers named ``q_proj`` ``(E -> E)``,
    ``k_proj`` ``(kdim -> Hkv*D)``, ``v_proj`` ``(vdim -> Hkv*D)`` and
    ``out_proj`` ``(E -> E)``, so weights can be copied in by name; see
    :meth:`from_torch`.

    Args:
        embed_dim: model width ``E``; must be divisible by ``num_heads``.
        num_heads: number of query heads ``H``; the head dim is ``D = E // H``.
        num_kv_heads: number of key/value heads ``Hkv`` (default ``H``); must
            divide ``num_heads``.
        kdim: width of the input the keys are made from (default ``E``).
        vdim: width of the input the values are made from (default ``E``).
        bias: give all four projections a bias.
        dropout: dropout probability on the attention weights, used only in
            training mode.
        causal: apply a causal mask aligned bottom-right, so that calls with a
            :class:`~attn_lib.KVCache` decode token by token.

    Shape:
        - ``x``: ``(B, T, E)``; ``context``: ``(B, S, kdim)``, or a pair
          ``(B, S, kdim)``, ``(B, S, vdim)`` when ``kdim != vdim``.
        - ``mask`` (bool) and ``bias`` (float): broadcastable to ``(B, H, T, S)``.
        - output ``(B, T, E)``; weights ``(B, H, T, S)``.

    Example:
        >>> mha = MultiHeadAttention(16, 4, num_kv_heads=2)
        >>> out, w = mha(torch.randn(2, 7, 16), return_weights=True)
        >>> tuple(out.shape), tuple(w.shape)
        ((2, 7, 16), (2, 4, 7, 7))

    Limitations:
        Keys and values have the same head dim ``D``. PyTorch's ``add_bias_kv``
        and ``add_zero_attn`` have no counterpart. A cache works only for
        self-attention (``context=None``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        _checks.positive_int(embed_dim, "embed_dim")
        _checks.positive_int(num_heads, "num_heads")
        _checks.divisible(embed_dim, "embed_dim", num_heads, "num_heads")
        num_kv_heads = _optional_dim(num_kv_heads, "num_kv_heads", num_heads)
        _checks.divisible(num_heads, "num_heads", num_kv_heads, "num_kv_heads")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_kv_heads, self.head_dim = num_kv_heads, embed_dim // num_heads
        self.kdim = _optional_dim(kdim, "kdim", embed_dim)
        self.vdim = _optional_dim(vdim, "vdim", embed_dim)
        self.dropout = _checks.probability(dropout, "dropout")
        self.causal = _flag(causal, "causal")
        _flag(bias, "bias")

        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, kv_width, bias=bias)
        self.v_proj = nn.Linear(self.vdim, kv_width, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"dropout={self.dropout}, causal={self.causal}"
        )

    def _check_input(self, x: Any, name: str, batch: int | None, width: int) -> None:
        _checks.tensor(x, name, floating=True)
        wanted = f"(B, L, {width})" if batch is None else f"({batch}, L, {width})"
        if x.dim() != 3 or x.shape[-1] != width or batch not in (None, x.shape[0]):
            _checks.fail(name, f"have shape {wanted}", f"shape {tuple(x.shape)}")
        dtype = self.q_proj.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled():
            _checks.fail(
                name, f"have the module's dtype {dtype}", x.dtype, exc=TypeError
            )

    def _key_value_inputs(
        self, x: torch.Tensor, context: Context
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors keys and values are made from, checked: ``(B, S, kdim/vdim)``."""
        if context is None:
            if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
                _checks.fail(
                    "context",
                    f"be given when kdim={self.kdim} or vdim={self.vdim} "
                    f"differs from embed_dim={self.embed_dim}",
                    "None",
                )
            return x, x
        if isinstance(context, torch.Tensor):
            if self.kdim != self.vdim:
                _checks.fail(
                    "context",
                    f"be a pair (keys input, values input) when kdim={self.kdim} "
                    f"!= vdim={self.vdim}",
                    "a single tensor",
                    exc=TypeError,
                )
            context = (context, context)
        if not isinstance(context, (tuple, list)) or len(context) != 2:
            _checks.fail(
                "context",
                "be a tensor or a pair of tensors",
                type(context).__name__,
                exc=TypeError,
            )
        keys_in, values_in = context
        self._check_input(keys_in, "context (keys input)", x.shape[0], self.kdim)
        self._check_input(values_in, "context (values input)", x.shape[0], self.vdim)
        if keys_in.shape[1] != values_in.shape[1]:
            _checks.fail(
                "context (keys input) and context (values input)",
                "have the same length S",
                f"{keys_in.shape[1]} and {values_in.shape[1]}",
            )
        return keys_in, values_in

    def _check_cache(self, cache: Any, context: Context) -> None:
        if cache is None:
            return
        if not isinstance(cache, KVCache):
            _checks.fail(
                "cache", "be an attn_lib.KVCache", type(cache).__name__, exc=TypeError
            )
        if context is not None:
            _checks.fail(
                "cache",
                "be None when context is given (a KVCache keeps self-attention "
                "keys and values)",
                repr(cache),
            )

    def forward(
        self,
        x: torch.Tensor,
        context: Context = None,
        *,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``x`` to itself, or to ``context``.

        Args:
            x: queries' input ``(B, T, E)``.
            context: ``None`` for self-attention; else the keys' and values'
                input ``(B, S, kdim)``, or a pair ``(keys input, values input)``.
            mask: bool, broadcastable to ``(B, H, T, S)``; True = may attend.
                With a cache, ``S`` counts the cached keys too.
            bias: float, broadcastable to ``(B, H, T, S)``, added to the scaled
                scores (e.g. ALiBi or T5 relative position biases).
            cache: an :class:`~attn_lib.KVCache` for this layer (self-attention
                only); the new keys and values ``(B, Hkv, T, D)`` are appended
                and the queries attend over all of them.
            return_weights: also return the per-head weights.

        Returns:
            ``out`` ``(B, T, E)``, or ``(out, weights)`` with weights
            ``(B, H, T, S)``.
        """
        self._check_input(x, "x", None, self.embed_dim)
        keys_in, values_in = self._key_value_inputs(x, context)
        self._check_cache(cache, context)

        q = split_heads(self.q_proj(x), self.num_heads)  # (B, H, T, D)
        k = split_heads(self.k_proj(keys_in), self.num_kv_heads)  # (B, Hkv, S, D)
        v = split_heads(self.v_proj(values_in), self.num_kv_heads)  # (B, Hkv, S, D)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, S_cached + T, D)

        groups = self.num_heads // self.num_kv_heads
        k = repeat_kv_heads(k, groups)  # (B, H, S, D)
        v = repeat_kv_heads(v, groups)  # (B, H, S, D)
        result = attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            is_causal=self.causal,
            dropout_p=self.dropout if self.training else 0.0,
            return_weights=return_weights,
        )  # (B, H, T, D), or that and weights (B, H, T, S)
        heads, weights = result if return_weights else (result, None)
        out = self.out_proj(merge_heads(heads))  # (B, H, T, D) -> (B, T, E)
        return (out, weights) if return_weights else out

    @classmethod
    def from_torch(
        cls, mha: nn.MultiheadAttention, *, causal: bool = False
    ) -> MultiHeadAttention:
        """A copy of PyTorch's ``nn.MultiheadAttention`` whose outputs match it.

        The copy is batch-first whatever ``mha.batch_first`` is, lives on
        ``mha``'s device and dtype, and is in the same train/eval mode. Masks
        must be converted: PyTorch's ``attn_mask`` and ``key_padding_mask`` use
        True = blocked, attn_lib uses True = may attend.

        Args:
            mha: the module to copy (``add_bias_kv`` and ``add_zero_attn`` off).
            causal: make the copy causal.

        Returns:
            A :class:`MultiHeadAttention` with ``num_kv_heads == num_heads``.

        Example:
            >>> torch_mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
            >>> x = torch.randn(1, 5, 8)
            >>> ours = MultiHeadAttention.from_torch(torch_mha)
            >>> torch.allclose(ours(x), torch_mha(x, x, x)[0], atol=1e-6)
            True
        """
        if not isinstance(mha, nn.MultiheadAttention):
            _checks.fail(
                "mha", "be an nn.MultiheadAttention", type(mha).__name__, exc=TypeError
            )
        if mha.bias_k is not None or mha.add_zero_attn:
            _checks.fail(
                "mha",
                "have add_bias_kv=False and add_zero_attn=False",
                f"add_bias_kv={mha.bias_k is not None}, "
                f"add_zero_attn={mha.add_zero_attn}",
            )
        has_bias = mha.in_proj_bias is not None
        ours = cls(
            mha.embed_dim,
            mha.num_heads,
            kdim=mha.kdim,
            vdim=mha.vdim,
            bias=has_bias,
            dropout=float(mha.dropout),
            causal=causal,
        )
        ours.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        _copy_torch_weights(ours, mha)
        return ours.train(mha.training)


def _copy_torch_weights(ours: MultiHeadAttention, mha: nn.MultiheadAttention) -> None:
    """Copy the four projections of ``mha`` into ``ours`` (same shapes)."""
    if mha.in_proj_weight is not None:
        weights = mha.in_proj_weight.chunk(3)  # 3 x (E, E)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    projections = (ours.q_proj, ours.k_proj, ours.v_proj)
    biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    with torch.no_grad():
        for layer, weight, bias in zip(projections, weights, biases, strict=True):
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        ours.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            ours.out_proj.bias.copy_(mha.out_proj.bias)

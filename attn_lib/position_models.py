"""Small models that differ only in how they know positions, and a task that needs them.

The positional-encoding chapter trains one tiny transformer per scheme on the
:func:`recency_batch` task and compares how well each one handles sequences
longer than any it was trained on.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .cache import KVCache
from .functional import attention
from .positions import (
    ALiBiBias,
    ShawRelativePositions,
    T5RelativeBias,
    apply_rope,
    shaw_attention,
    sinusoidal,
)

SCHEMES = ("none", "sinusoidal", "learned", "shaw", "t5", "alibi", "rope")


class PositionalSelfAttention(nn.Module):
    """Multi-head self-attention with one positional scheme built in.

    ``scheme`` is one of ``SCHEMES``. The absolute schemes
    (``"sinusoidal"``, ``"learned"``) and ``"none"`` add nothing here (the
    model adds absolute positions to its embeddings); ``"shaw"``, ``"t5"`` and
    ``"alibi"`` change the scores; ``"rope"`` rotates queries and keys.

    Args:
        embed_dim: ``E``; must be divisible by ``num_heads``.
        num_heads: ``H``.
        scheme: the positional scheme.
        causal: attend only to keys at or before the query (bottom-right).
        max_distance: the clipping distance for ``"shaw"`` and the clamp
            distance for ``"t5"``.
        num_buckets: the number of T5 buckets (``"t5"`` only).

    Shape:
        ``forward(x (B, T, E), cache=None) -> (B, T, E)``. With a
        :class:`attn_lib.KVCache`, the ``T`` new tokens follow the cached ones:
        positions continue from ``len(cache)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        scheme: str = "rope",
        causal: bool = True,
        max_distance: int = 128,
        num_buckets: int = 32,
    ) -> None:
        super().__init__()
        _checks.positive_int(num_heads, "num_heads")
        if _checks.positive_int(embed_dim, "embed_dim") % num_heads:
            _checks.fail(
                "embed_dim",
                "be divisible by num_heads",
                f"embed_dim={embed_dim}, num_heads={num_heads}",
            )
        self.scheme = _checks.choice(scheme, "scheme", SCHEMES)
        self.num_heads, self.causal = num_heads, causal
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out = nn.Linear(embed_dim, embed_dim)
        head_dim = embed_dim // num_heads
        if scheme == "t5":
            self.rel = T5RelativeBias(
                num_heads,
                bidirectional=not causal,
                num_buckets=num_buckets,
                max_distance=max_distance,
            )
        elif scheme == "alibi":
            self.rel = ALiBiBias(num_heads, bidirectional=not causal)
        elif scheme == "shaw":
            self.rel = ShawRelativePositions(head_dim, max_distance=max_distance)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, t, e = x.shape
        q, k, v = self.qkv(x).split(e, dim=-1)  # 3 x (B, T, E)
        q, k, v = (
            z.view(b, t, self.num_heads, -1).transpose(1, 2) for z in (q, k, v)
        )  # (B, H, T, D) each
        if self.scheme == "rope":
            start = 0 if cache is None else len(cache)
            positions = torch.arange(start, start + t, device=x.device)  # (T,)
            q, k = apply_rope(q, positions), apply_rope(k, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H, S, D) each
        s = k.shape[-2]

        if self.scheme == "shaw":
            out = shaw_attention(q, k, v, *self.rel(t, s), is_causal=self.causal)
        else:
            bias = self.rel(t, s) if self.scheme in ("t5", "alibi") else None
            out = attention(q, k, v, bias=bias, is_causal=self.causal)
        out = out.transpose(1, 2).reshape(b, t, e)  # (B, H, T, D) -> (B, T, E)
        return self.out(out)


class _Block(nn.Module):
    """Pre-norm residual block: attention, then a two-layer MLP."""

    def __init__(self, embed_dim: int, num_heads: int, **options) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attn = PositionalSelfAttention(embed_dim, num_heads, **options)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim),
            nn.GELU(),
            nn.Linear(4 * embed_dim, embed_dim),
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class PositionalTransformer(nn.Module):
    """A tiny transformer whose only difference between runs is the positional scheme.

    Token embeddings, plus a sinusoidal or learned position table for the
    absolute schemes; ``num_layers`` pre-norm blocks of
    :class:`PositionalSelfAttention`; a linear read-out to ``vocab_size``
    logits.

    Args:
        vocab_size: number of token ids.
        embed_dim, num_heads, num_layers: the model's size.
        scheme: one of ``SCHEMES``.
        causal: causal (decoder) attention.
        max_len: the longest sequence the ``"learned"`` table covers (and the
            sinusoidal table's length); other schemes have no limit.
        max_distance, num_buckets: passed to the attention layers
            (``"shaw"``, ``"t5"``).

    Shape:
        ``forward(tokens (B, T), caches=None) -> logits (B, T, vocab_size)``.
        ``caches`` is one :class:`attn_lib.KVCache` per layer, for decoding.

    Limitations:
        The ``"learned"`` table has no rows past ``max_len``, and rows that
        were never trained stay random: learned positions cannot extrapolate.

    Example:
        >>> model = PositionalTransformer(10, 16, 2, 1, scheme="alibi")
        >>> model(torch.zeros(3, 5, dtype=torch.long)).shape
        torch.Size([3, 5, 10])
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        *,
        scheme: str = "rope",
        causal: bool = True,
        max_len: int = 1024,
        max_distance: int = 128,
        num_buckets: int = 32,
    ) -> None:
        super().__init__()
        _checks.positive_int(vocab_size, "vocab_size")
        _checks.positive_int(num_layers, "num_layers")
        self.max_len = _checks.positive_int(max_len, "max_len")
        self.scheme = _checks.choice(scheme, "scheme", SCHEMES)
        self.tokens = nn.Embedding(vocab_size, embed_dim)
        if scheme == "learned":
            self.positions = nn.Embedding(max_len, embed_dim)
        elif scheme == "sinusoidal":
            table = sinusoidal(max_len, embed_dim)  # (max_len, E)
            self.register_buffer("positions", table, persistent=False)
        options = dict(
            scheme=scheme,
            causal=causal,
            max_distance=max_distance,
            num_buckets=num_buckets,
        )
        self.blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, **options) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab_size)

    def forward(
        self, tokens: torch.Tensor, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        start = 0 if caches is None else len(caches[0])
        t = tokens.shape[1]
        x = self.tokens(tokens)  # (B, T, E)
        if self.scheme in ("sinusoidal", "learned"):
            if start + t > self.max_len:
                _checks.fail(
                    "sequence length",
                    f"be at most max_len={self.max_len} with {self.scheme} positions",
                    start + t,
                )
            rows = torch.arange(start, start + t, device=tokens.device)  # (T,)
            table = self.positions
            x = x + (table(rows) if self.scheme == "learned" else table[rows])
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.norm(x))  # (B, T, V)


def recency_batch(
    batch: int,
    length: int,
    *,
    vocab_size: int = 16,
    p_symbol: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The "most recent symbol" task: a task that needs order, not just content.

    Token 0 is a blank; each position holds a symbol ``1 .. vocab_size - 1``
    with probability ``p_symbol``, else a blank. The target at position ``i``
    is the most recent symbol at or before ``i`` (0 if none yet). Content
    alone cannot answer it: every symbol seen so far is a candidate, and only
    order says which one is the most recent.

    Returns:
        ``(tokens, targets)``, both long ``(batch, length)``.

    Example:
        >>> tokens = torch.tensor([[0, 3, 0, 0, 5, 0]])
        >>> _recency_targets(tokens).tolist()
        [[0, 3, 3, 3, 5, 5]]
    """
    _checks.positive_int(batch, "batch")
    _checks.positive_int(length, "length")
    _checks.probability(p_symbol, "p_symbol")
    symbols = torch.randint(1, vocab_size, (batch, length), generator=generator)
    keep = torch.rand(batch, length, generator=generator) < p_symbol  # (B, T)
    tokens = torch.where(keep, symbols, 0)  # (B, T)
    return tokens, _recency_targets(tokens)


def _recency_targets(tokens: torch.Tensor) -> torch.Tensor:
    """The most recent non-blank token at or before each position (0 if none)."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)  # (B, T)
    last = torch.where(tokens > 0, positions, -1).cummax(dim=1).values  # (B, T)
    found = tokens.gather(1, last.clamp(min=0))  # (B, T)
    return torch.where(last >= 0, found, 0)


def sequence_accuracy(
    model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Per-position accuracy ``(T,)`` of ``model(tokens)`` against ``targets``."""
    with torch.no_grad():
        predicted = model(tokens).argmax(dim=-1)  # (B, T)
    return (predicted == targets).float().mean(dim=0)  # (T,)

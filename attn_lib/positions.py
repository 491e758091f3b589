"""Positions for attention: absolute tables, relative offsets, biases and rotations.

Attention by itself is blind to order: permuting the tokens only permutes the
outputs the same way. Every scheme here puts order back in.

- absolute: :func:`sinusoidal` (a fixed table added to the token embeddings);
- relative, as learned vectors: :class:`ShawRelativePositions` with
  :func:`shaw_attention` (Shaw et al., 2018);
- relative, as an additive bias on the scores: :func:`t5_bucket` with
  :class:`T5RelativeBias` (Raffel et al., 2020), and :func:`alibi_bias` with
  :class:`ALiBiBias` (Press et al., 2022);
- relative, as a rotation of queries and keys: :func:`apply_rope`
  (Su et al., 2024).

One convention everywhere: a relative position is ``key - query`` and
positions are aligned bottom-right, like :func:`attn_lib.causal_mask`: with
``T`` queries and ``S`` keys, query ``i`` sits at absolute position
``i + (S - T)``. That is what decoding with a :class:`attn_lib.KVCache` needs:
the one new query of a decoding step is the last position, so its row of
offsets (or bias) equals the last row of the full pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks
from .functional import attention

Device = str | torch.device | None


def sinusoidal(
    n: int, dim: int, *, base: float = 10000.0, device: Device = None
) -> torch.Tensor:
    r"""The sinusoidal position table of Vaswani et al. (2017).

    .. math:: P_{p,2i} = \sin(p\,\omega_i),\quad P_{p,2i+1} = \cos(p\,\omega_i),
              \quad \omega_i = \mathrm{base}^{-2i/\mathrm{dim}}

    Each pair of columns is a clock turning at its own speed, from one radian
    per position (columns 0, 1) down to about ``1/base`` radians per position.

    Args:
        n: number of positions (rows), ``0 .. n-1``.
        dim: width of each row; must be even (sines and cosines come in pairs).
        base: the wavelength scale (10000 in the paper).
        device: where to create the table.

    Returns:
        A float32 tensor ``(n, dim)``, added to token embeddings ``(B, n, dim)``.

    Example:
        >>> sinusoidal(2, 4).tolist()[0]
        [0.0, 1.0, 0.0, 1.0]
    """
    _checks.positive_int(n, "n")
    _even_dim(dim, "dim")
    _positive_float(base, "base")
    angles = _angles(torch.arange(n, dtype=torch.float64), dim, base)  # (n, dim/2)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (n, dim/2, 2)
    return table.reshape(n, dim).to(torch.float32).to(device)  # (n, dim)


def relative_positions(
    t: int, s: int | None = None, *, device: Device = None
) -> torch.Tensor:
    """Relative positions ``key - query``, aligned bottom-right.

    Query ``i`` sits at absolute position ``i + (S - T)`` and key ``j`` at
    ``j``, so entry ``[i, j]`` is ``j - i - (S - T)``: negative for keys in the
    past, 0 on the query's own position, positive for keys in the future::

        T=2, S=4 (two new queries after two cached keys)
        keys ->   0   1   2   3
        query 0: -2  -1   0   1
        query 1: -3  -2  -1   0

    Args:
        t: number of queries ``T``.
        s: number of keys ``S``; defaults to ``t``.
        device: where to create the tensor.

    Returns:
        A long tensor ``(T, S)``.

    Example:
        >>> relative_positions(1, 3).tolist()
        [[-2, -1, 0]]
    """
    _checks.positive_int(t, "t")
    s = t if s is None else _checks.positive_int(s, "s")
    query_pos = torch.arange(t, device=device) + (s - t)  # (T,)
    key_pos = torch.arange(s, device=device)  # (S,)
    return key_pos[None, :] - query_pos[:, None]  # (T, S)


def t5_bucket(
    rel: torch.Tensor,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """T5's buckets for relative positions: exact when near, logarithmic when far.

    With ``n = query - key`` (how far back the key is) and ``N`` buckets per
    direction (``num_buckets // 2`` when bidirectional, else ``num_buckets``):
    distances below ``N // 2`` get a bucket each; larger ones share buckets
    spaced logarithmically up to ``max_distance``; every distance from there
    on falls in the last bucket ``N - 1`` (the clamp). Bidirectional: keys
    after the query use buckets ``N .. 2N - 1``. Causal (``bidirectional=
    False``): keys after the query share bucket 0 with the query's own key
    (a causal mask hides them anyway).

    Args:
        rel: integer tensor of relative positions ``key - query``, any shape,
            e.g. :func:`relative_positions` ``(T, S)``.
        bidirectional: keep keys before and after the query apart.
        num_buckets: total number of buckets (even when bidirectional).
        max_distance: distances from here on share the last bucket.

    Returns:
        A long tensor shaped like ``rel``, values in ``[0, num_buckets)``.

    Example:
        >>> t5_bucket(torch.tensor([0, -1, 1, -200]), num_buckets=8, max_distance=16)
        tensor([0, 1, 5, 3])
    """
    half, exact = _t5_sizes(bidirectional, num_buckets, max_distance)
    _checks.tensor(rel, "rel")
    if rel.is_floating_point() or rel.is_complex() or rel.dtype == torch.bool:
        _checks.fail(
            "rel",
            "be an integer tensor of key - query offsets",
            rel.dtype,
            exc=TypeError,
        )
    back = -rel.long()  # how far back the key is
    offset = torch.zeros_like(back)
    if bidirectional:
        offset = torch.where(back < 0, half, 0)  # keys after the query
        back = back.abs()
    else:
        back = back.clamp(min=0)  # future keys share bucket 0

    far = back.clamp(min=exact).float() / exact  # >= 1, so the log is >= 0
    steps = torch.log(far) / math.log(max_distance / exact) * (half - exact)
    log_bucket = (exact + steps.long()).clamp(max=half - 1)
    return offset + torch.where(back < exact, back, log_bucket)


def alibi_slopes(num_heads: int, *, device: Device = None) -> torch.Tensor:
    """ALiBi's head slopes (Press et al., 2022), for any number of heads.

    For a power of two ``n`` the slopes are the geometric sequence
    ``2^(-8/n), 2^(-16/n), ..., 2^(-8)``. For other counts, take the slopes
    of the largest power of two ``p < n``, then add every other slope of
    ``2p`` heads (the odd-numbered ones) until there are ``n``.

    Args:
        num_heads: number of heads ``H``.
        device: where to create the tensor.

    Returns:
        A float32 tensor ``(H,)`` of positive slopes.

    Example:
        >>> alibi_slopes(6).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    """
    _checks.positive_int(num_heads, "num_heads")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(p) + geometric(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32, device=device)  # (H,)


def alibi_bias(
    num_heads: int,
    t: int,
    s: int | None = None,
    *,
    bidirectional: bool = False,
    device: Device = None,
) -> torch.Tensor:
    """ALiBi's additive bias ``slope * (key - query)``: a penalty growing with distance.

    Head ``h`` adds ``m_h * (j - i - (S - T))`` to the score of query ``i`` and
    key ``j`` (bottom-right aligned), so a key ``d`` positions back loses
    ``m_h * d``: steep heads look near, gentle heads look far. Because the
    alignment is bottom-right, the bias of a decoding step (``T = 1``) is the
    last row of the full pass's bias.

    Args:
        num_heads: number of heads ``H``.
        t: number of queries ``T``.
        s: number of keys ``S``; defaults to ``t``.
        bidirectional: use ``-slope * |key - query|`` so keys after the query
            are penalised too (for attention without a causal mask).
        device: where to create the tensor.

    Returns:
        A float32 tensor ``(H, T, S)``, to pass as ``bias=`` to
        :func:`attn_lib.attention`.

    Warning:
        With ``bidirectional=False`` keys *after* the query get a positive
        bias: ALiBi is meant for causal attention, where those keys are masked.

    Example:
        >>> alibi_bias(2, 1, 3).tolist()
        [[[-0.125, -0.0625, 0.0]], [[-0.0078125, -0.00390625, 0.0]]]
    """
    slopes = alibi_slopes(num_heads, device=device)  # (H,)
    rel = relative_positions(t, s, device=device).float()  # (T, S)
    if bidirectional:
        rel = -rel.abs()
    return slopes[:, None, None] * rel  # (H, T, S)


def rope_frequencies(
    dim: int, *, base: float = 10000.0, device: Device = None
) -> torch.Tensor:
    """RoPE's rotation speeds ``base^(-2i/dim)``, ``i = 0 .. dim/2 - 1``, in float64.

    Pair ``i`` of a query or key at position ``p`` is rotated by the angle
    ``p * base^(-2i/dim)``: the same speeds as the columns of
    :func:`sinusoidal`.

    Args:
        dim: the feature width ``D``; must be even.
        base: the wavelength scale (10000 in the paper).
        device: where to create the tensor.

    Returns:
        A float64 tensor ``(dim/2,)``.

    Example:
        >>> rope_frequencies(4).tolist()
        [1.0, 0.01]
    """
    _even_dim(dim, "dim")
    _positive_float(base, "base")
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim  # (dim/2,)
    return (base**-exponents).to(device)


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    base: float = 10000.0,
    interleaved: bool = False,
) -> torch.Tensor:
    r"""Rotary position embedding (RoPE, Su et al., 2024): rotate pairs of features.

    Each pair ``(a, b)`` of a vector at position ``p`` is turned by the angle
    ``p * omega_i`` (``omega_i`` from :func:`rope_frequencies`):

    .. math:: (a, b) \mapsto (a\cos p\omega_i - b\sin p\omega_i,\;
                               a\sin p\omega_i + b\cos p\omega_i)

    Rotate queries and keys (not values) this way and the score of a query at
    ``m`` and a key at ``n`` depends on the positions only through ``n - m``.

    Two pairing conventions exist. ``interleaved=True`` pairs features
    ``(2i, 2i+1)`` (the RoFormer paper, GPT-J); ``interleaved=False`` pairs
    ``(i, i + D/2)`` (GPT-NeoX, LLaMA). They are the same rotation up to a
    fixed permutation of the features: with ``perm = [0, 2, 4, ..., 1, 3, ...]``,
    ``apply_rope(x, p, interleaved=True)[..., perm] ==
    apply_rope(x[..., perm], p, interleaved=False)``. Scores agree when q and
    k use the same convention, but trained weights only carry over from one
    convention to the other after permuting their output features.

    Args:
        x: queries or keys ``(..., T, D)``, floating point, ``D`` even.
        positions: the absolute position of each of the ``T`` rows, a 1-D
            integer (or float) tensor ``(T,)`` on ``x``'s device. When decoding
            with a cache holding ``L`` tokens, pass ``arange(L, L + T)``.
        base: the wavelength scale (10000 in the paper).
        interleaved: the pairing convention, see above.

    Returns:
        A new tensor like ``x``; ``x`` is not modified. fp16/bf16 inputs are
        rotated in float32 and returned in their own dtype.

    Example:
        >>> x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        >>> apply_rope(x, torch.tensor([1])).round(decimals=4).tolist()
        [[0.5403, 0.8415]]
    """
    _check_rope(x, positions)
    d = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = _angles(positions.to(torch.float64), d, base)  # (T, D/2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # (T, D/2)

    y = x.to(dtype)
    if interleaved:
        a, b = y[..., 0::2], y[..., 1::2]  # (..., T, D/2) each
    else:
        a, b = y[..., : d // 2], y[..., d // 2 :]  # (..., T, D/2) each
    turned_a = a * cos - b * sin
    turned_b = a * sin + b * cos
    if interleaved:
        out = torch.stack([turned_a, turned_b], dim=-1).flatten(-2)  # (..., T, D)
    else:
        out = torch.cat([turned_a, turned_b], dim=-1)  # (..., T, D)
    return out.to(x.dtype)


# -- modules ---------------------------------------------------------------


class T5RelativeBias(nn.Module):
    """A learned bias per T5 bucket and per head (Raffel et al., 2020).

    ``forward(t, s)`` looks up ``t5_bucket(relative_positions(t, s))`` in a
    table ``(num_buckets, H)`` and returns the bias ``(H, T, S)``, ready for
    ``attention(..., bias=)``. The table starts at zero (no preference for any
    distance) and is shared by every layer that calls the module.

    Args:
        num_heads: number of heads ``H``.
        bidirectional, num_buckets, max_distance: as in :func:`t5_bucket`.

    Shape:
        ``forward(t, s=None) -> (H, T, S)``, bottom-right aligned: the bias of
        a decoding step ``forward(1, S)`` is the last row of ``forward(S, S)``.

    Example:
        >>> T5RelativeBias(4, num_buckets=8, max_distance=16)(3, 5).shape
        torch.Size([4, 3, 5])
    """

    def __init__(
        self,
        num_heads: int,
        *,
        bidirectional: bool = True,
        num_buckets: int = 32,
        max_distance: int = 128,
    ) -> None:
        super().__init__()
        _checks.positive_int(num_heads, "num_heads")
        _t5_sizes(bidirectional, num_buckets, max_distance)
        self.bidirectional = bidirectional
        self.max_distance = max_distance
        self.table = nn.Embedding(num_buckets, num_heads)
        nn.init.zeros_(self.table.weight)

    def forward(self, t: int, s: int | None = None) -> torch.Tensor:
        rel = relative_positions(t, s, device=self.table.weight.device)  # (T, S)
        buckets = t5_bucket(
            rel,
            bidirectional=self.bidirectional,
            num_buckets=self.table.num_embeddings,
            max_distance=self.max_distance,
        )  # (T, S)
        return self.table(buckets).permute(2, 0, 1)  # (T, S, H) -> (H, T, S)


class ALiBiBias(nn.Module):
    """:func:`alibi_bias` as a module (no parameters): ``forward(t, s) -> (H, T, S)``.

    Args:
        num_heads: number of heads ``H``; the slopes are :func:`alibi_slopes`.
        bidirectional: as in :func:`alibi_bias`.

    Example:
        >>> ALiBiBias(6)(1, 4)[:, 0, 0].tolist()  # the key 3 positions back
        [-0.75, -0.1875, -0.046875, -0.01171875, -1.5, -0.375]
    """

    def __init__(self, num_heads: int, *, bidirectional: bool = False) -> None:
        super().__init__()
        self.num_heads = _checks.positive_int(num_heads, "num_heads")
        self.bidirectional = bidirectional
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def forward(self, t: int, s: int | None = None) -> torch.Tensor:
        return alibi_bias(
            self.num_heads,
            t,
            s,
            bidirectional=self.bidirectional,
            device=self.slopes.device,
        )  # (H, T, S)


class ShawRelativePositions(nn.Module):
    """Learned key and value vectors per clipped relative distance (Shaw et al., 2018).

    Distances ``key - query`` are clipped to ``[-k, k]`` (``k = max_distance``),
    so ``2k + 1`` vectors of each kind are learned, shared by all heads.
    ``forward(t, s)`` returns ``(rel_k (T, S, D), rel_v (T, S, Dv))`` for
    :func:`shaw_attention`, bottom-right aligned like every offset here.

    Args:
        head_dim: ``D``, the width of the key vectors.
        max_distance: ``k``, the clipping distance.
        value_dim: ``Dv``; defaults to ``head_dim``.

    Example:
        >>> rel_k, rel_v = ShawRelativePositions(8, max_distance=2)(3, 5)
        >>> tuple(rel_k.shape), tuple(rel_v.shape)
        ((3, 5, 8), (3, 5, 8))
    """

    def __init__(
        self, head_dim: int, *, max_distance: int = 16, value_dim: int | None = None
    ) -> None:
        super().__init__()
        _checks.positive_int(head_dim, "head_dim")
        self.max_distance = _checks.positive_int(max_distance, "max_distance")
        value_dim = head_dim if value_dim is None else value_dim
        _checks.positive_int(value_dim, "value_dim")
        self.keys = nn.Embedding(2 * max_distance + 1, head_dim)
        self.values = nn.Embedding(2 * max_distance + 1, value_dim)
        nn.init.normal_(self.keys.weight, std=0.02)
        nn.init.normal_(self.values.weight, std=0.02)

    def forward(
        self, t: int, s: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.max_distance
        rel = relative_positions(t, s, device=self.keys.weight.device)  # (T, S)
        index = rel.clamp(-k, k) + k  # (T, S), in [0, 2k]
        return self.keys(index), self.values(index)  # (T, S, D), (T, S, Dv)


def shaw_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Attention with Shaw et al.'s relative key and value vectors.

    .. math:: s_{ij} = \frac{q_i \cdot (k_j + a^K_{ij})}{\sqrt{D}}, \qquad
              \mathrm{out}_i = \sum_j w_{ij}\,(v_j + a^V_{ij})

    The key term enters :func:`attn_lib.attention` as ``bias=``; the value
    term is added afterwards from the weights, so masks and ``is_causal``
    (bottom-right) behave exactly as there.

    Args:
        q, k, v: ``(..., T, D)``, ``(..., S, D)``, ``(..., S, Dv)``.
        rel_k: ``(T, S, D)``, e.g. from :class:`ShawRelativePositions`.
        rel_v: ``(T, S, Dv)``.
        mask, is_causal, scale: as in :func:`attn_lib.attention`.
        return_weights: also return the weights ``(..., T, S)``.

    Shape:
        ``T`` queries at absolute positions ``S - T .. S - 1`` (bottom-right),
        so a decoding step with a cache passes ``T = 1`` and the last row of
        the module's tables.

    Returns:
        ``out`` ``(..., T, Dv)``, or ``(out, weights)``.

    Example:
        >>> rel_k, rel_v = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)
        >>> q, k, v = torch.ones(1, 4), torch.ones(3, 4), torch.eye(3, 4)
        >>> shaw_attention(q, k, v, rel_k, rel_v).sum().item()
        1.0
    """
    t, s = _checks.qkv(q, k, v)
    for name, rel, width in (
        ("rel_k", rel_k, q.shape[-1]),
        ("rel_v", rel_v, v.shape[-1]),
    ):
        _checks.tensor(rel, name, floating=True)
        if tuple(rel.shape) != (t, s, width):
            _checks.fail(
                name,
                f"have shape (T, S, {width}) = {(t, s, width)}",
                f"shape {tuple(rel.shape)}",
            )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bias = torch.einsum("...td,tsd->...ts", q, rel_k.to(q.dtype)) * scale  # (..., T, S)
    out, weights = attention(
        q,
        k,
        v,
        bias=bias,
        mask=mask,
        is_causal=is_causal,
        scale=scale,
        return_weights=True,
    )  # (..., T, Dv), (..., T, S)
    out = out + torch.einsum("...ts,tsd->...td", weights, rel_v.to(v.dtype))
    return (out, weights) if return_weights else out


# -- checks and small pieces -------------------------------------------------


def _angles(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """``positions (T,)`` times the speeds ``(dim/2,)``: angles ``(T, dim/2)``, float64."""
    freqs = rope_frequencies(dim, base=base, device=positions.device)  # (dim/2,)
    return positions.to(torch.float64)[:, None] * freqs[None, :]  # (T, dim/2)


def _even_dim(dim: object, name: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
        _checks.fail(name, "be a positive even int (features come in pairs)", repr(dim))
    return dim


def _positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        _checks.fail(name, "be a positive number", repr(value))
    return float(value)


def _t5_sizes(
    bidirectional: bool, num_buckets: int, max_distance: int
) -> tuple[int, int]:
    """Check T5's sizes; return (buckets per direction, exactly-bucketed distances)."""
    _checks.positive_int(num_buckets, "num_buckets")
    _checks.positive_int(max_distance, "max_distance")
    if bidirectional and (num_buckets < 4 or num_buckets % 2):
        _checks.fail(
            "num_buckets", "be an even int >= 4 when bidirectional=True", num_buckets
        )
    if not bidirectional and num_buckets < 2:
        _checks.fail("num_buckets", "be >= 2 when bidirectional=False", num_buckets)
    half = num_buckets // 2 if bidirectional else num_buckets
    exact = half // 2
    if max_distance <= exact:
        _checks.fail(
            "max_distance",
            f"be greater than the {exact} exactly-bucketed "
            "distances (num_buckets per direction // 2)",
            max_distance,
        )
    return half, exact


def _check_rope(x: object, positions: object) -> None:
    _checks.tensor(x, "x", min_dim=2, floating=True)
    if x.shape[-1] % 2:
        _checks.fail(
            "x",
            "have an even last dim D (RoPE rotates pairs of features)",
            f"shape {tuple(x.shape)}",
        )
    _checks.tensor(positions, "positions")
    if positions.dtype == torch.bool or positions.is_complex():
        _checks.fail(
            "positions", "be an integer or float tensor", positions.dtype, exc=TypeError
        )
    t = x.shape[-2]
    if positions.dim() != 1 or positions.shape[0] != t:
        _checks.fail(
            "positions",
            f"have shape (T,) = ({t},), one per row of x",
            f"shape {tuple(positions.shape)}",
        )
    if positions.device != x.device:
        _checks.fail(
            "positions", f"be on the device of x ({x.device})", positions.device
        )

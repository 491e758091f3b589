"""Boolean attention masks. Convention: True = may attend.

Shapes use the book's legend: ``T`` queries, ``S`` keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks

Device = str | torch.device | None


def causal_mask(t: int, s: int | None = None, *, device: Device = None) -> torch.Tensor:
    """Causal mask aligned bottom-right: query ``i`` may see key ``j`` iff ``j <= i + (S - T)``.

    With ``T == S`` this is the usual lower triangle. With fewer queries than
    keys (decoding with a cache), the last query sees every key::

        T=2, S=4          T=4, S=2
        keys ->           keys ->
        1 1 1 0           0 0      <- sees nothing
        1 1 1 1           0 0      <- sees nothing
                          1 0
                          1 1

    PyTorch's ``is_causal=True`` aligns top-left instead (``j <= i``); the two
    agree only when ``T == S``.

    Args:
        t: number of queries ``T``.
        s: number of keys ``S``; defaults to ``t``.
        device: where to create the mask.

    Returns:
        A bool tensor ``(T, S)``.

    Example:
        >>> causal_mask(2, 3).int().tolist()
        [[1, 1, 0], [1, 1, 1]]
    """
    _checks.positive_int(t, "t")
    s = t if s is None else _checks.positive_int(s, "s")
    ones = torch.ones(t, s, dtype=torch.bool, device=device)
    return torch.tril(ones, diagonal=s - t)


def padding_mask(
    lengths: Sequence[int] | torch.Tensor, s: int, *, device: Device = None
) -> torch.Tensor:
    """Key padding mask from sequence lengths: True at real tokens.

    The result has shape ``(B, 1, 1, S)``: it broadcasts over heads and over
    queries, and masks *keys*, which is what padding means (a padded key must
    receive no weight from any query).

    Args:
        lengths: ``B`` ints, each in ``[0, S]``; the number of real tokens.
        s: padded length ``S``.
        device: where to create the mask (defaults to ``lengths``' device).

    Returns:
        A bool tensor ``(B, 1, 1, S)``.

    Example:
        >>> padding_mask([1, 3], 3)[:, 0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 1]]
    """
    _checks.positive_int(s, "s")
    if isinstance(lengths, torch.Tensor):
        if (
            lengths.dim() != 1
            or lengths.is_floating_point()
            or lengths.dtype == torch.bool
        ):
            _checks.fail(
                "lengths",
                "be a 1-D integer tensor or a list of ints",
                f"{lengths.dtype} tensor of shape {tuple(lengths.shape)}",
                exc=TypeError,
            )
        device = lengths.device if device is None else device
        lengths = lengths.to(device)
    else:
        lengths = list(lengths)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
            _checks.fail(
                "lengths",
                "be a 1-D integer tensor or a list of ints",
                repr(lengths),
                exc=TypeError,
            )
        lengths = torch.tensor(lengths, dtype=torch.long, device=device)
    if lengths.numel() == 0:
        _checks.fail("lengths", "hold at least one length", "an empty sequence")
    low, high = int(lengths.min()), int(lengths.max())
    if low < 0 or high > s:
        _checks.fail("lengths", f"be in [0, s={s}]", f"min {low}, max {high}")
    positions = torch.arange(s, device=lengths.device)  # (S,)
    keep = positions < lengths[:, None]  # (B, S)
    return keep[:, None, None, :]  # (B, 1, 1, S)


def _bool(m: object, name: str, meaning: str) -> torch.Tensor:
    """Check a boolean mask whose True means ``meaning``."""
    if not isinstance(m, torch.Tensor):
        _checks.fail(name, "be a bool torch.Tensor", type(m).__name__, exc=TypeError)
    if m.dtype != torch.bool:
        _checks.fail(
            name,
            f"be a bool tensor (True = {meaning})",
            f"{m.dtype} — a float mask is additive: pass it as bias=",
            exc=TypeError,
        )
    return m


def from_torch_mask(
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    *,
    num_heads: int = 1,
) -> torch.Tensor | None:
    """Turn ``nn.MultiheadAttention``'s masks (True = blocked) into ours (True = may attend).

    PyTorch's ``nn.MultiheadAttention`` and ``nn.Transformer*`` take
    ``attn_mask`` ``(T, S)`` or ``(B*H, T, S)`` and ``key_padding_mask``
    ``(B, S)``, where True means *blocked*.
    ``F.scaled_dot_product_attention`` and attn_lib use the opposite: True
    means *may attend*. The result combines both masks (a pair may attend
    only if neither blocks it)::

        torch attn_mask     ours
        F T T               T F F
        F F T      ->       T T F
        F F F               T T T

    Args:
        attn_mask: bool ``(T, S)`` or ``(B*H, T, S)``, True = blocked.
        key_padding_mask: bool ``(B, S)``, True = padding (blocked).
        num_heads: ``H``, used to unfold a ``(B*H, T, S)`` ``attn_mask``.

    Returns:
        The bool mask in attn_lib's convention (True = may attend), of shape
        ``(T, S)`` from a 2-D ``attn_mask`` alone, otherwise
        ``(B, H or 1, T or 1, S)``; ``None`` if both are ``None``.

    Example:
        >>> from_torch_mask(torch.tensor([[False, True]])).tolist()
        [[True, False]]
    """
    _checks.positive_int(num_heads, "num_heads")
    allowed = None
    if attn_mask is not None:
        _bool(attn_mask, "attn_mask", "blocked")
        if attn_mask.dim() == 3:
            if attn_mask.shape[0] % num_heads:
                _checks.fail(
                    "attn_mask",
                    f"have a first dim B*H divisible by num_heads={num_heads}",
                    f"shape {tuple(attn_mask.shape)}",
                )
            attn_mask = attn_mask.view(
                -1, num_heads, *attn_mask.shape[1:]
            )  # (B, H, T, S)
        elif attn_mask.dim() != 2:
            _checks.fail(
                "attn_mask",
                "have shape (T, S) or (B*H, T, S)",
                f"shape {tuple(attn_mask.shape)}",
            )
        allowed = ~attn_mask
    if key_padding_mask is not None:
        _bool(key_padding_mask, "key_padding_mask", "blocked")
        if key_padding_mask.dim() != 2:
            _checks.fail(
                "key_padding_mask",
                "have shape (B, S)",
                f"shape {tuple(key_padding_mask.shape)}",
            )
        keys = ~key_padding_mask[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
        allowed = keys if allowed is None else allowed & keys
    return allowed


def to_torch_mask(mask: torch.Tensor) -> torch.Tensor:
    """Turn our mask (True = may attend) into an ``attn_mask`` for ``nn.MultiheadAttention``.

    The inverse of :func:`from_torch_mask` for ``attn_mask``: True = blocked,
    same shape. A ``(T, S)`` mask is accepted by ``nn.MultiheadAttention`` as
    it is; a per-batch mask ``(B, H, T, S)`` must be reshaped to
    ``(B*H, T, S)`` first.

    Warning:
        ``nn.MultiheadAttention`` gives ``nan`` for a query whose keys are all
        blocked; attn_lib gives zeros.

    Example:
        >>> to_torch_mask(causal_mask(2)).tolist()
        [[False, True], [False, False]]
    """
    _bool(mask, "mask", "may attend")
    return ~mask


def to_torch_key_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """Turn a padding mask ``(B, 1, 1, S)`` or ``(B, S)`` (True = real) into ``key_padding_mask``.

    The result is ``(B, S)`` with True = padding, what ``nn.MultiheadAttention``
    expects.

    Example:
        >>> to_torch_key_padding_mask(padding_mask([1, 2], 2)).tolist()
        [[False, True], [False, False]]
    """
    _bool(mask, "mask", "may attend")
    if mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1:
        mask = mask[:, 0, 0, :]  # (B, 1, 1, S) -> (B, S)
    if mask.dim() != 2:
        _checks.fail(
            "mask", "have shape (B, 1, 1, S) or (B, S)", f"shape {tuple(mask.shape)}"
        )
    return ~mask

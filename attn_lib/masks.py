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

"""A small attention classifier for scikit-learn's bundled handwritten digits.

The 8x8 images of ``sklearn.datasets.load_digits`` (real scans, shipped with
scikit-learn, no download) become short sequences: either the 8 pixel rows, or
the 16 patches of 2x2 pixels. A stack of multi-head attention blocks reads the
sequence and a linear layer names the digit. The chapter on multi-head
attention trains it and looks at what each head attends to.

Requires scikit-learn (only :func:`load_digit_sequences` imports it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .multihead import MultiHeadAttention

TOKENS = ("rows", "patches")


def image_to_tokens(images: torch.Tensor, tokens: str = "rows") -> torch.Tensor:
    """Turn 8x8 images into sequences of tokens.

    Args:
        images: ``(N, 8, 8)``.
        tokens: ``"rows"`` (8 tokens of 8 pixels, top to bottom) or
            ``"patches"`` (16 tokens of 2x2 pixels, row by row).

    Returns:
        ``(N, 8, 8)`` for rows, ``(N, 16, 4)`` for patches.

    Example:
        >>> image_to_tokens(torch.zeros(3, 8, 8), "patches").shape
        torch.Size([3, 16, 4])
    """
    _checks.tensor(images, "images", min_dim=3)
    _checks.choice(tokens, "tokens", TOKENS)
    if tuple(images.shape[-2:]) != (8, 8):
        _checks.fail("images", "have shape (N, 8, 8)", f"shape {tuple(images.shape)}")
    if tokens == "rows":
        return images
    n = images.shape[0]
    grid = images.reshape(n, 4, 2, 4, 2)  # (N, patch row, y, patch col, x)
    grid = grid.permute(0, 1, 3, 2, 4)  # (N, patch row, patch col, y, x)
    return grid.reshape(n, 16, 4)  # (N, 16 patches, 4 pixels)


def load_digit_sequences(
    tokens: str = "rows", *, test_fraction: float = 0.25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1797 digits as token sequences, split at random into train and test.

    Pixel values (0 to 16) are scaled to [0, 1].

    Args:
        tokens: ``"rows"`` or ``"patches"``; see :func:`image_to_tokens`.
        test_fraction: share of the images held out for testing.
        seed: seeds the split, so it is the same on every run.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 sequences ``(N, T, F)``
        and int64 labels ``(N,)``.
    """
    from sklearn.datasets import load_digits

    _checks.probability(test_fraction, "test_fraction")
    _checks.nonneg_int(seed, "seed")
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)  # (N, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)  # (N,)
    x = image_to_tokens(images, tokens)  # (N, T, F)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    n_test = round(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    return x[train], labels[train], x[test], labels[test]


class _Block(nn.Module):
    """Pre-norm transformer block: attention, then an MLP, each with a residual."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attn = MultiHeadAttention(embed_dim, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, 2 * embed_dim),
            nn.GELU(),
            nn.Linear(2 * embed_dim, embed_dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, weights = self.attn(self.norm1(x), return_weights=True)  # (B, T, E)
        x = x + out
        x = x + self.mlp(self.norm2(x))  # (B, T, E)
        return x, weights  # weights (B, H, T, T)


class DigitsTransformer(nn.Module):
    """Classify a digit from its sequence of tokens with multi-head self-attention.

    Each token is embedded by a linear layer, a learned position embedding is
    added, ``num_layers`` pre-norm blocks (multi-head self-attention, then an
    MLP) mix the tokens, and the mean over tokens goes to a linear classifier.

    Args:
        num_tokens: sequence length ``T`` (8 for rows, 16 for patches).
        token_dim: features per token (8 for rows, 4 for patches).
        embed_dim: model width ``E``.
        num_heads: heads per attention layer.
        num_layers: number of blocks.
        dropout: dropout on attention weights and in the MLP (training only).
        num_classes: number of labels.

    Shape:
        input ``(B, T, token_dim)``; logits ``(B, num_classes)``; with
        ``return_weights=True`` also a list of ``num_layers`` weight tensors
        ``(B, H, T, T)``.

    Example:
        >>> model = DigitsTransformer(8, 8, embed_dim=16, num_heads=4)
        >>> logits, maps = model(torch.zeros(2, 8, 8), return_weights=True)
        >>> tuple(logits.shape), tuple(maps[0].shape)
        ((2, 10), (2, 4, 8, 8))
    """

    def __init__(
        self,
        num_tokens: int = 8,
        token_dim: int = 8,
        *,
        embed_dim: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        dropout: float = 0.1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        for value, name in ((num_tokens, "num_tokens"), (token_dim, "token_dim")):
            _checks.positive_int(value, name)
        _checks.positive_int(num_layers, "num_layers")
        self.embed = nn.Linear(token_dim, embed_dim)
        self.position = nn.Parameter(0.02 * torch.randn(num_tokens, embed_dim))
        self.blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.classify = nn.Linear(embed_dim, num_classes)

    def forward(
        self, x: torch.Tensor, *, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``(B, num_classes)``, and the attention weights of every layer."""
        _checks.tensor(x, "x", floating=True)
        if x.dim() != 3 or x.shape[1:] != (
            self.position.shape[0],
            self.embed.in_features,
        ):
            _checks.fail(
                "x",
                f"have shape (B, {self.position.shape[0]}, {self.embed.in_features})",
                f"shape {tuple(x.shape)}",
            )
        h = self.embed(x) + self.position  # (B, T, E)
        maps = []
        for block in self.blocks:
            h, weights = block(h)  # (B, T, E), (B, H, T, T)
            maps.append(weights)
        logits = self.classify(self.norm(h).mean(dim=1))  # (B, num_classes)
        return (logits, maps) if return_weights else logits


def classification_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of ``model(x)`` against labels ``y``: a ``loss_fn`` for ``fit``."""
    return F.cross_entropy(model(x), y)


def batch_sampler(
    x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 64, seed: int = 0
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``batches(step) -> (x_batch, y_batch)`` for :func:`attn_lib.train.fit`.

    Step ``i`` draws ``batch_size`` examples (with replacement) from a
    generator seeded with ``seed + i``, so a batch depends on its step only.
    """
    _checks.positive_int(batch_size, "batch_size")
    _checks.nonneg_int(seed, "seed")
    if len(x) != len(y):
        _checks.fail("x and y", "have the same length", f"{len(x)} and {len(y)}")

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed + step)
        index = torch.randint(len(y), (batch_size,), generator=g)  # (batch,)
        return x[index], y[index]

    return batches


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of examples whose predicted class (argmax of the logits) is ``y``."""
    was_training = model.training
    model.eval()
    predicted = model(x).argmax(dim=-1)  # (N,)
    model.train(was_training)
    return float((predicted == y).float().mean())

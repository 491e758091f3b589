"""Heatmaps of attention weights and masks: queries on rows, keys on columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _checks


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """A 2-D NumPy array from a tensor or array-like ``(T, S)``."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu")
        x = x.float() if x.is_floating_point() else x
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        _checks.fail(
            name, "be 2-D (T, S): queries on rows, keys on columns", f"shape {x.shape}"
        )
    return x


def _labels(ax, labels: Sequence[str] | None, n: int, axis: str, name: str) -> None:
    if labels is None:
        return
    labels = list(labels)
    if len(labels) != n:
        where = "column (key)" if axis == "x" else "row (query)"
        _checks.fail(
            name, f"have one label per {where}, {n} in all", f"{len(labels)} labels"
        )
    ticks = np.arange(n)
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=90)
    else:
        ax.set_yticks(ticks, labels)


def _heatmap(matrix, *, queries, keys, ax, title, cmap, vmin, vmax, colorbar, label):
    import matplotlib.pyplot as plt

    if ax is None:
        t, s = matrix.shape
        _, ax = plt.subplots(figsize=(min(1.5 + 0.4 * s, 10), min(1.2 + 0.4 * t, 8)))
    image = ax.imshow(
        matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest"
    )
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    _labels(ax, keys, matrix.shape[1], "x", "keys")
    _labels(ax, queries, matrix.shape[0], "y", "queries")
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=label, fraction=0.046, pad=0.04)
    return ax


def plot_attention(
    weights: Any,
    *,
    queries: Sequence[str] | None = None,
    keys: Sequence[str] | None = None,
    ax: Any = None,
    title: str | None = None,
    cmap: str = "viridis",
    colorbar: bool = True,
) -> Any:
    """Draw attention weights ``(T, S)`` as a labelled heatmap.

    Args:
        weights: a tensor or array ``(T, S)``; row ``i`` holds query ``i``'s
            weights over the keys.
        queries: optional ``T`` labels for the rows (e.g. tokens).
        keys: optional ``S`` labels for the columns.
        ax: a matplotlib Axes to draw into; a new figure if ``None``.
        title: optional title.
        cmap: matplotlib colour map.
        colorbar: draw a colour bar labelled "weight".

    Returns:
        The matplotlib Axes.

    Example:
        >>> import torch
        >>> ax = plot_attention(torch.full((2, 3), 1 / 3), keys=["a", "b", "c"])
        >>> ax.get_xlabel(), ax.get_ylabel()
        ('key', 'query')
    """
    matrix = _as_matrix(weights, "weights").astype(float)
    return _heatmap(
        matrix,
        queries=queries,
        keys=keys,
        ax=ax,
        title=title,
        cmap=cmap,
        vmin=0.0,
        vmax=max(float(matrix.max(initial=0.0)), 1e-12),
        colorbar=colorbar,
        label="weight",
    )


def plot_mask(
    mask: Any,
    *,
    queries: Sequence[str] | None = None,
    keys: Sequence[str] | None = None,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Draw a boolean mask ``(T, S)``: dark = may attend (True), light = blocked.

    Takes the same labels as :func:`plot_attention`; returns the Axes.
    """
    matrix = _as_matrix(mask, "mask")
    if matrix.dtype != np.bool_:
        _checks.fail(
            "mask", "be boolean (True = may attend)", matrix.dtype, exc=TypeError
        )
    return _heatmap(
        matrix.astype(float),
        queries=queries,
        keys=keys,
        ax=ax,
        title=title,
        cmap="Greys",
        vmin=0.0,
        vmax=1.0,
        colorbar=False,
        label="",
    )

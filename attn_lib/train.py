"""A small, deterministic training loop shared by the chapters' models."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import _checks


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a run can be repeated exactly."""
    _checks.nonneg_int(seed, "seed")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batches: Callable[[int], tuple[Any, ...]],
    *,
    steps: int,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    clip: float | None = 1.0,
    progress: bool = True,
    desc: str = "training",
) -> list[float]:
    """Train ``model`` with AdamW for a fixed number of steps; return the losses.

    A fixed step count (not a time budget) keeps runs repeatable.

    Args:
        model: put in ``train()`` mode for the loop and ``eval()`` mode after it.
        loss_fn: ``loss_fn(model, *batch) -> scalar loss``.
        batches: ``batches(step) -> batch``, a tuple of arguments for ``loss_fn``.
        steps: number of optimiser steps.
        lr: learning rate, decayed with a cosine schedule to 10% at the end.
        weight_decay: AdamW weight decay.
        clip: gradient-norm clipping threshold, or ``None`` for none.
        progress: show a tqdm progress bar with the running loss.
        desc: the progress bar's label.

    Returns:
        The loss of every step, as floats.
    """
    _checks.positive_int(steps, "steps")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps))
    )
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=5.0)
    for step in bar:
        loss = loss_fn(model, *batches(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
    model.eval()
    return losses

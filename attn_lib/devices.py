"""Picking a device."""

from __future__ import annotations

import torch


def get_device() -> torch.device:
    """The best device available: CUDA if present, else Apple's MPS, else the CPU.

    Example:
        >>> get_device().type in {"cuda", "mps", "cpu"}
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")

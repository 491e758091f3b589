"""Fixtures shared by the tests: devices, dtypes, seeded random tensors."""

from __future__ import annotations

import pytest
import torch

from attn_lib import reference

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="CUDA is not available"
        ),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device test runs on the CPU, and on CUDA when it is present."""
    return torch.device(request.param)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator per test: no state shared between cases."""
    return torch.Generator().manual_seed(0)


def randn(gen: torch.Generator, *shape: int, dtype=torch.float64, device="cpu"):
    """Seeded normal tensor created on the CPU, then moved (same values on every device)."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(
        dtype=dtype, device=device
    )


def random_mask(gen: torch.Generator, *shape: int, p: float = 0.7, device="cpu"):
    """Seeded bool mask, True with probability ``p``."""
    return (torch.rand(*shape, generator=gen) < p).to(device)


def numpy_reference(q, k, v, mask=None, scale=None):
    """The NumPy float64 reference ``(out, weights)``, as tensors on the CPU."""
    out, w = reference.scaled_dot_product_attention(
        q.double().cpu().numpy(),
        k.double().cpu().numpy(),
        v.double().cpu().numpy(),
        None if mask is None else mask.cpu().numpy(),
        scale=scale,
    )
    return torch.from_numpy(out), torch.from_numpy(w)

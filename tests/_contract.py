"""Shared pieces of the contract tests: backends, modules, guards for code still to land.

The contract tests (tests/test_contract_*.py) run every fault kind of issue 9
on every backend ``attn_lib.available_backends()`` reports and on every
attention module attn_lib exports. Parts of attn_lib that have not landed yet
are skipped with a reason by :func:`need`, so the same files become real tests
the moment the code arrives.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

# Triton decides at decoration time whether to interpret; without CUDA its
# kernel can run on CPU tensors only in the interpreter (tiny sizes are fine).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attn_lib  # noqa: E402


def need(module: str, attr: str | None = None):
    """``attn_lib.<module>`` (or one of its attributes), or skip: not landed yet."""
    try:
        mod = importlib.import_module(f"attn_lib.{module}")
    except ImportError:
        pytest.skip(f"attn_lib.{module} has not landed on this branch yet")
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        pytest.skip(f"attn_lib.{module}.{attr} has not landed on this branch yet")
    return getattr(mod, attr)


def has(module: str, attr: str | None = None) -> bool:
    """Whether ``attn_lib.<module>`` (and ``attr``) exists here."""
    try:
        mod = importlib.import_module(f"attn_lib.{module}")
    except ImportError:
        return False
    return attr is None or hasattr(mod, attr)


# --- backends --------------------------------------------------------------------

BACKENDS = list(attn_lib.available_backends())
CONCRETE = [b for b in BACKENDS if b != "auto"]


def runnable(backend: str, q: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Skip (with the reason) when ``backend`` cannot run these inputs here."""
    if backend == "triton":
        why = attn_lib.triton_kernel.check_runnable(q, bias)
        if why:
            pytest.skip(f"backend='triton' cannot run here: {why}")


def autograd_backends() -> list[str]:
    """Backends that pass gradients back (all of them today)."""
    return list(BACKENDS)


# --- modules ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleCase:
    """How to build and call one attention module of attn_lib.

    ``call(module, x, context, mask, return_weights)``; weights come back as
    ``(B, T, S)`` for single-head modules and ``(B, H, T, S)`` for multi-head
    ones. ``context`` is ``None`` for self-attention.
    """

    name: str
    where: tuple[str, str]  # (module, class name) in attn_lib
    build: Callable[..., torch.nn.Module]
    cross: bool = False
    causal: bool = False
    cache: bool = False
    heads: int = 1


E, CTX = 12, 10  # model width; width of a cross-attention context


def _self_attention(dropout=0.0):
    return attn_lib.modules.SelfAttention(E, dropout=dropout)


def _causal_self_attention(dropout=0.0):
    return attn_lib.modules.CausalSelfAttention(E, dropout=dropout)


def _cross_attention(dropout=0.0):
    return attn_lib.cross_attention.CrossAttention(E, kdim=CTX, dropout=dropout)


def _mha(**kw):
    def build(dropout=0.0):
        return attn_lib.multihead.MultiHeadAttention(E, 3, dropout=dropout, **kw)

    return build


MODULES = [
    ModuleCase("SelfAttention", ("modules", "SelfAttention"), _self_attention),
    ModuleCase(
        "CausalSelfAttention",
        ("modules", "CausalSelfAttention"),
        _causal_self_attention,
        causal=True,
        cache=True,
    ),
    ModuleCase(
        "CrossAttention",
        ("cross_attention", "CrossAttention"),
        _cross_attention,
        cross=True,
    ),
    ModuleCase("MHA", ("multihead", "MultiHeadAttention"), _mha(), heads=3),
    ModuleCase(
        "MHA-causal",
        ("multihead", "MultiHeadAttention"),
        _mha(causal=True),
        causal=True,
        cache=True,
        heads=3,
    ),
    ModuleCase(
        "MHA-gqa", ("multihead", "MultiHeadAttention"), _mha(num_kv_heads=1), heads=3
    ),
    ModuleCase(
        "MHA-cross",
        ("multihead", "MultiHeadAttention"),
        _mha(kdim=CTX, vdim=CTX),
        cross=True,
        heads=3,
    ),
]
MODULE_IDS = [m.name for m in MODULES]


def build(case: ModuleCase, *, dropout: float = 0.0, device="cpu", dtype=torch.float64):
    """Build ``case``'s module (seeded) or skip when it has not landed yet."""
    need(*case.where)
    torch.manual_seed(0)
    return case.build(dropout=dropout).to(device=device, dtype=dtype)


def call(case: ModuleCase, module, x, context=None, *, mask=None, **kw):
    """Call ``module`` the way ``case`` says (context positional for cross)."""
    if case.cross:
        return module(x, context, mask=mask, **kw)
    return module(x, mask=mask, **kw)


def inputs(case: ModuleCase, gen, b=2, t=5, s=7, *, dtype=torch.float64, device="cpu"):
    """``x (B, T, E)`` and, for cross-attention, ``context (B, S, CTX)``."""
    x = torch.randn(b, t, E, generator=gen, dtype=dtype).to(device)
    if not case.cross:
        return x, None
    context = torch.randn(b, s, CTX, generator=gen, dtype=dtype).to(device)
    return x, context


def key_length(case: ModuleCase, t: int, s: int) -> int:
    """S as the module sees it: the context's length, or T for self-attention."""
    return s if case.cross else t

"""attn_lib: the attention library of the book *Attention, step by step*.

NumPy references live in :mod:`attn_lib.reference`; everything else is PyTorch
and runs on CPU, CUDA or MPS. Shape legend: ``B`` batch, ``H`` heads, ``T``
query length, ``S`` key/value length, ``D`` head dim, ``E = H*D`` model width.
Masks are boolean with True = may attend.
"""

from . import costs, distributed, positions, reference, triton_kernel
from .cache import KVCache
from .chunked import chunked_attention
from .cross_attention import CrossAttention
from .devices import get_device
from .distributed import ring_attention
from .functional import attention, available_backends, safe_softmax
from .masks import causal_mask, padding_mask
from .plotting import plot_attention, plot_mask

__version__ = "0.1.0"

__all__ = [
    "CrossAttention",
    "KVCache",
    "attention",
    "available_backends",
    "causal_mask",
    "chunked_attention",
    "costs",
    "distributed",
    "get_device",
    "padding_mask",
    "plot_attention",
    "plot_mask",
    "positions",
    "reference",
    "ring_attention",
    "safe_softmax",
    "triton_kernel",
]

"""attn_lib: the attention library of the book *Attention, step by step*.

NumPy references live in :mod:`attn_lib.reference`; everything else is PyTorch
and runs on CPU, CUDA or MPS. Shape legend: ``B`` batch, ``H`` heads, ``T``
query length, ``S`` key/value length, ``D`` head dim, ``E = H*D`` model width.
Masks are boolean with True = may attend.
"""

from . import reference
from .cache import KVCache
from .devices import get_device
from .functional import attention, available_backends, safe_softmax
from .masks import causal_mask, padding_mask
from .multihead import MultiHeadAttention, merge_heads, repeat_kv_heads, split_heads
from .plotting import plot_attention, plot_mask

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "attention",
    "available_backends",
    "causal_mask",
    "get_device",
    "merge_heads",
    "padding_mask",
    "plot_attention",
    "plot_mask",
    "reference",
    "repeat_kv_heads",
    "safe_softmax",
    "split_heads",
]

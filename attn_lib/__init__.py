"""attn_lib: the attention library of the book *Attention, step by step*.

NumPy references live in :mod:`attn_lib.reference`; everything else is PyTorch
and runs on CPU, CUDA or MPS. Shape legend: ``B`` batch, ``H`` heads, ``T``
query length, ``S`` key/value length, ``D`` head dim, ``E = H*D`` model width.
Masks are boolean with True = may attend.
"""

from . import costs, distributed, lm, positions, reference, triton_kernel
from .cache import KVCache
from .chunked import chunked_attention
from .cross_attention import CrossAttention
from .devices import get_device
from .distributed import ring_attention
from .functional import attention, available_backends, safe_softmax
from .masks import (
    causal_mask,
    from_torch_mask,
    padding_mask,
    to_torch_key_padding_mask,
    to_torch_mask,
)
from .modules import CausalSelfAttention, SelfAttention
from .multihead import MultiHeadAttention, merge_heads, repeat_kv_heads, split_heads
from .plotting import plot_attention, plot_mask

__version__ = "0.1.0"

__all__ = [
    "CausalSelfAttention",
    "CrossAttention",
    "KVCache",
    "MultiHeadAttention",
    "SelfAttention",
    "attention",
    "available_backends",
    "causal_mask",
    "chunked_attention",
    "costs",
    "distributed",
    "from_torch_mask",
    "get_device",
    "lm",
    "merge_heads",
    "padding_mask",
    "plot_attention",
    "plot_mask",
    "positions",
    "reference",
    "repeat_kv_heads",
    "ring_attention",
    "safe_softmax",
    "split_heads",
    "to_torch_key_padding_mask",
    "to_torch_mask",
    "triton_kernel",
]

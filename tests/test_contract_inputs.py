"""Bad input: every public function checks what it is given, in one message form.

Each case pins the exact wording ``<what> must <rule>; got <actual>``. Devices
are tested with PyTorch's ``meta`` device, so the device checks run without
CUDA too.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _contract import need

import attn_lib
from attn_lib import reference

FORM = re.compile(r"^.+ must .+; got .+$", re.DOTALL)


def _raises(exc, pattern, fn, *args, **kwargs):
    """Call ``fn``; check the exception type, the project's form, and ``pattern``."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert FORM.match(message), f"not '<what> must <rule>; got <actual>': {message}"
    assert re.search(pattern, message), message


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


Q, K, V = _t(2, 7, 4), _t(2, 13, 4), _t(2, 13, 3)

ATTENTION_CASES = [
    (
        (np.zeros((7, 4)), K, V),
        {},
        TypeError,
        r"^q must be a torch.Tensor; got ndarray",
    ),
    ((_t(4), K, V), {}, ValueError, r"^q must have at least 2 dims; got shape \(4,\)"),
    (
        (_t(2, 7, 4, dtype=torch.int64), K, V),
        {},
        TypeError,
        r"^q must be a floating-point tensor; got torch.int64",
    ),
    ((Q, _t(2, 13, 5), V), {}, ValueError, r"^q and k must have the same last dim D"),
    ((Q, K, _t(2, 12, 3)), {}, ValueError, r"^k and v must have the same length S"),
    (
        (Q, _t(3, 13, 4), _t(3, 13, 3)),
        {},
        ValueError,
        r"^q, k and v must have the same leading",
    ),
    (
        (Q, K.double(), V),
        {},
        TypeError,
        r"^q and k must have the same dtype; got torch.float32 and torch.float64",
    ),
    (
        (Q, _t(2, 13, 4, device="meta"), V),
        {},
        ValueError,
        r"^q and k must be on the same device; got cpu and meta",
    ),
    ((Q, K, V), {"mask": [[True]]}, TypeError, r"^mask must be a bool torch.Tensor"),
    ((Q, K, V), {"mask": _t(7, 13)}, TypeError, r"^mask must be a bool tensor .*bias="),
    (
        (Q, K, V),
        {"mask": torch.ones(13, 7, dtype=torch.bool)},
        ValueError,
        r"^mask must be broadcastable to \(2, 7, 13\); got shape \(13, 7\)",
    ),
    (
        (Q, K, V),
        {"mask": torch.ones(3, 7, 13, dtype=torch.bool)},
        ValueError,
        r"^mask must be broadcastable to \(2, 7, 13\)",
    ),
    (
        (Q, K, V),
        {"mask": torch.ones(7, 13, dtype=torch.bool, device="meta")},
        ValueError,
        r"^mask must be on the device of q \(cpu\); got meta",
    ),
    (
        (Q, K, V),
        {"bias": torch.ones(7, 13, dtype=torch.bool)},
        TypeError,
        r"^bias must be a floating",
    ),
    (
        (Q, K, V),
        {"bias": _t(13, 7)},
        ValueError,
        r"^bias must be broadcastable to \(2, 7, 13\)",
    ),
    (
        (Q, K, V),
        {"bias": _t(7, 13, device="meta")},
        ValueError,
        r"^bias must be on the device",
    ),
    (
        (Q, K, V),
        {"scale": -1.0},
        ValueError,
        r"^scale must be a finite positive float; got -1.0",
    ),
    (
        (Q, K, V),
        {"scale": float("inf")},
        ValueError,
        r"^scale must be a finite positive",
    ),
    (
        (Q, K, V),
        {"scale": "0.5"},
        TypeError,
        r"^scale must be None or a positive float",
    ),
    (
        (Q, K, V),
        {"dropout_p": 1.0},
        ValueError,
        r"^dropout_p must be in \[0, 1\); got 1.0",
    ),
    (
        (Q, K, V),
        {"is_causal": "yes"},
        TypeError,
        r"^is_causal must be a bool; got 'yes'",
    ),
    (
        (Q, K, V),
        {"return_weights": 1},
        TypeError,
        r"^return_weights must be a bool; got 1",
    ),
    (
        (Q, K, V),
        {"backend": "flash"},
        ValueError,
        r"^backend must be one of 'auto', 'math'",
    ),
    (
        (Q, K, V),
        {"backend": "sdpa", "return_weights": True},
        ValueError,
        r"^backend must be 'math' or 'auto' when return_weights=True",
    ),
]


@pytest.mark.parametrize(
    "args,kwargs,exc,pattern",
    ATTENTION_CASES,
    ids=[c[3][1:30] for c in ATTENTION_CASES],
)
def test_attention_checks_its_arguments(args, kwargs, exc, pattern):
    _raises(exc, pattern, attn_lib.attention, *args, **kwargs)


def test_safe_softmax_checks_its_argument():
    _raises(
        TypeError,
        r"^scores must be a torch.Tensor; got list",
        attn_lib.safe_softmax,
        [1.0],
    )
    _raises(
        TypeError,
        r"^scores must be a floating-point tensor; got torch.int64",
        attn_lib.safe_softmax,
        torch.ones(2, 3, dtype=torch.int64),
    )


MASK_CASES = [
    (attn_lib.causal_mask, (0,), {}, ValueError, r"^t must be a positive int; got 0"),
    (
        attn_lib.causal_mask,
        (3, -1),
        {},
        ValueError,
        r"^s must be a positive int; got -1",
    ),
    (
        attn_lib.causal_mask,
        (2.0,),
        {},
        ValueError,
        r"^t must be a positive int; got 2.0",
    ),
    (
        attn_lib.padding_mask,
        ([1, 4], 3),
        {},
        ValueError,
        r"^lengths must be in \[0, s=3\]; got min 1, max 4",
    ),
    (
        attn_lib.padding_mask,
        ([-1, 2], 3),
        {},
        ValueError,
        r"^lengths must be in \[0, s=3\]; got min -1",
    ),
    (
        attn_lib.padding_mask,
        ([], 3),
        {},
        ValueError,
        r"^lengths must hold at least one length",
    ),
    (
        attn_lib.padding_mask,
        ([1.5], 3),
        {},
        TypeError,
        r"^lengths must be a 1-D integer tensor",
    ),
    (
        attn_lib.padding_mask,
        (torch.tensor([1.0, 2.0]), 3),
        {},
        TypeError,
        r"^lengths must be a 1-D integer tensor .*torch.float32",
    ),
    (
        attn_lib.padding_mask,
        ([1], 0),
        {},
        ValueError,
        r"^s must be a positive int; got 0",
    ),
]


@pytest.mark.parametrize(
    "fn,args,kwargs,exc,pattern", MASK_CASES, ids=[c[4][1:30] for c in MASK_CASES]
)
def test_masks_check_their_arguments(fn, args, kwargs, exc, pattern):
    _raises(exc, pattern, fn, *args, **kwargs)


def test_kv_cache_checks_every_update():
    cache = attn_lib.KVCache()
    _raises(TypeError, r"^k must be a torch.Tensor", cache.update, [1.0], _t(1, 2))
    _raises(
        ValueError,
        r"^k and v must agree in every dim but the last",
        cache.update,
        _t(2, 3, 4),
        _t(2, 5, 4),
    )
    _raises(
        TypeError,
        r"^k and v must have the same dtype",
        cache.update,
        _t(2, 3, 4),
        _t(2, 3, 4).double(),
    )
    _raises(
        ValueError,
        r"^k and v must be on the same device; got cpu and meta",
        cache.update,
        _t(2, 3, 4),
        _t(2, 3, 4, device="meta"),
    )
    assert len(cache) == 0  # nothing was stored by the refused updates
    cache.update(_t(2, 3, 4), _t(2, 3, 5))
    _raises(
        ValueError,
        r"^k must match the cached keys' shape",
        cache.update,
        _t(2, 1, 6),
        _t(2, 1, 5),
    )
    _raises(
        ValueError,
        r"^v must have the cached values' last dim 5",
        cache.update,
        _t(2, 1, 4),
        _t(2, 1, 4),
    )
    _raises(
        TypeError,
        r"^cached_keys and k must have the same dtype",
        cache.update,
        _t(2, 1, 4).double(),
        _t(2, 1, 5).double(),
    )


def test_reference_checks_its_arguments():
    q, k, v = np.zeros((7, 4)), np.zeros((13, 4)), np.zeros((13, 3))
    fn = reference.scaled_dot_product_attention
    _raises(ValueError, r"^q, k and v must have at least 2 dims", fn, np.zeros(4), k, v)
    _raises(
        ValueError,
        r"^q and k must have the same last dim D",
        fn,
        q,
        np.zeros((13, 5)),
        v,
    )
    _raises(
        ValueError, r"^k and v must have the same length S", fn, q, k, np.zeros((12, 3))
    )
    _raises(TypeError, r"^mask must be a bool array", fn, q, k, v, np.zeros((7, 13)))
    _raises(
        ValueError,
        r"^mask must be broadcastable to \(7, 13\)",
        fn,
        q,
        k,
        v,
        np.ones((13, 7), bool),
    )
    _raises(
        ValueError, r"^scale must be a finite positive float", fn, q, k, v, scale=0.0
    )


def test_tiled_reference_checks_block_size():
    tiled = need("reference", "tiled_attention")
    q, k, v = np.zeros((3, 2)), np.zeros((4, 2)), np.zeros((4, 1))
    for bad in (0, -2, 1.5, True):
        _raises(
            ValueError,
            r"^block_size must be a positive int",
            tiled,
            q,
            k,
            v,
            block_size=bad,
        )


def test_plotting_and_training_check_their_arguments():
    _raises(
        ValueError,
        r"^weights must be 2-D \(T, S\)",
        attn_lib.plot_attention,
        np.zeros((2, 3, 4)),
    )
    _raises(
        ValueError,
        r"^keys must have one label per column \(key\), 4 in all; got 3 labels",
        attn_lib.plot_attention,
        np.zeros((3, 4)),
        keys=["a", "b", "c"],
    )
    from attn_lib import train

    _raises(ValueError, r"^seed must be a non-negative int; got -1", train.set_seed, -1)
    model = torch.nn.Linear(1, 1)
    _raises(
        ValueError,
        r"^steps must be a positive int; got 0",
        train.fit,
        model,
        None,
        None,
        steps=0,
    )


def test_cross_attention_checks_its_arguments():
    cross = need("cross_attention", "CrossAttention")
    _raises(ValueError, r"^embed_dim must be a positive int; got 0", cross, 0)
    _raises(ValueError, r"^kdim must be a positive int; got -3", cross, 8, kdim=-3)
    _raises(ValueError, r"^dropout must be in \[0, 1\); got 1.5", cross, 8, dropout=1.5)
    layer = cross(8, kdim=4)
    x, c = _t(2, 3, 8), _t(2, 5, 4)
    _raises(
        ValueError,
        r"^x must have shape \(B, T, 8\); got shape \(2, 3, 4\)",
        layer,
        _t(2, 3, 4),
        c,
    )
    _raises(
        ValueError,
        r"^context must have shape \(B, S, 4\); got shape \(2, 5, 8\)",
        layer,
        x,
        _t(2, 5, 8),
    )
    _raises(
        ValueError,
        r"^x and context must have the same batch size B",
        layer,
        x,
        _t(3, 5, 4),
    )
    _raises(TypeError, r"^x and context must have the same dtype", layer, x, c.double())
    _raises(
        TypeError,
        r"^mask must be a bool tensor .*bias=",
        layer,
        x,
        c,
        mask=_t(2, 1, 3, 5),
    )
    _raises(
        ValueError,
        r"^mask must be broadcastable to \(2, 1, 3, 5\); got shape \(2, 1, 5, 3\)",
        layer,
        x,
        c,
        mask=torch.ones(2, 1, 5, 3, dtype=torch.bool),
    )
    _raises(
        TypeError, r"^mha must be an nn.MultiheadAttention", cross.from_torch, layer
    )


def test_multihead_checks_its_arguments():
    mha = need("multihead", "MultiHeadAttention")
    _raises(
        ValueError,
        r"^embed_dim must be divisible by num_heads; got embed_dim=96, num_heads=5",
        mha,
        96,
        5,
    )
    _raises(
        ValueError,
        r"^num_heads must be divisible by num_kv_heads; got num_heads=6, num_kv_heads=4",
        mha,
        12,
        6,
        num_kv_heads=4,
    )
    _raises(ValueError, r"^num_heads must be a positive int; got 0", mha, 12, 0)
    layer = mha(12, 3)
    _raises(
        ValueError,
        r"^x must have shape \(B, L, 12\); got shape \(2, 5, 8\)",
        layer,
        _t(2, 5, 8),
    )
    _raises(
        ValueError,
        r"^mask must be broadcastable to \(2, 3, 5, 5\)",
        layer,
        _t(2, 5, 12),
        mask=torch.ones(2, 5, dtype=torch.bool),
    )
    _raises(
        TypeError, r"^cache must be an attn_lib.KVCache", layer, _t(2, 5, 12), cache={}
    )
    split = need("multihead", "split_heads")
    _raises(
        ValueError,
        r"^x.shape\[-1\] must be divisible by num_heads",
        split,
        _t(2, 5, 12),
        5,
    )


def test_self_attention_modules_check_their_arguments():
    self_attention = need("modules", "SelfAttention")
    causal = need("modules", "CausalSelfAttention")
    _raises(ValueError, r"^embed_dim must be a positive int", self_attention, 0)
    _raises(ValueError, r"^backend must be one of", self_attention, 8, backend="fast")
    layer = causal(8)
    _raises(
        ValueError,
        r"^x must have shape \(B, T, 8\); got shape \(5, 8\)",
        layer,
        _t(5, 8),
    )
    _raises(
        TypeError, r"^cache must be an attn_lib.KVCache", layer, _t(1, 5, 8), cache=[]
    )


def test_positions_check_their_arguments():
    pos = need("positions")
    x = _t(7, 8)
    _raises(
        ValueError,
        r"^positions must have shape \(T,\) = \(7,\)",
        pos.apply_rope,
        x,
        torch.arange(6),
    )
    _raises(
        ValueError,
        r"^positions must be on the device of x",
        pos.apply_rope,
        x,
        torch.arange(7, device="meta"),
    )
    _raises(
        TypeError,
        r"^positions must be an integer or float tensor",
        pos.apply_rope,
        x,
        torch.ones(7, dtype=torch.bool),
    )
    _raises(
        ValueError,
        r"^x must have an even last dim D",
        pos.apply_rope,
        _t(7, 5),
        torch.arange(7),
    )
    _raises(
        ValueError, r"^num_heads must be a positive int; got 0", pos.alibi_slopes, 0
    )
    _raises(ValueError, r"^t must be a positive int", pos.relative_positions, 0, 3)
    _raises(TypeError, r"^rel must be an integer tensor", pos.t5_bucket, torch.zeros(3))
    _raises(
        ValueError,
        r"^num_buckets must be an even int >= 4",
        pos.t5_bucket,
        torch.zeros(3, dtype=torch.long),
        num_buckets=7,
    )
    _raises(
        ValueError,
        r"^max_distance must be greater than",
        pos.t5_bucket,
        torch.zeros(3, dtype=torch.long),
        num_buckets=32,
        max_distance=4,
    )
    _raises(ValueError, r"^dim must be a positive even int", pos.sinusoidal, 4, 7)


def test_chunked_checks_block_size_and_inputs():
    chunked = need("chunked", "chunked_attention")
    for bad in (0, -1, 2.5, True):
        _raises(
            ValueError,
            r"^block_size must be a positive int",
            chunked,
            Q,
            K,
            V,
            block_size=bad,
        )
    _raises(
        ValueError,
        r"^q and k must have the same last dim D",
        chunked,
        Q,
        _t(2, 13, 5),
        V,
    )
    _raises(
        ValueError,
        r"^dropout_p must be 0 with backend='chunked'",
        attn_lib.attention,
        Q,
        K,
        V,
        dropout_p=0.1,
        backend="chunked",
    )


def test_distributed_helpers_check_their_arguments():
    dist = need("distributed", "merge_partials")
    shard = need("distributed", "shard_sequence")
    _raises(
        ValueError,
        r"^the two partials must have the same shapes",
        dist,
        _t(2, 3),
        _t(2),
        _t(2, 4),
        _t(2),
    )
    _raises(
        ValueError, r"^rank must be below world_size=2; got 2", shard, _t(1, 8, 4), 2, 2
    )
    _raises(
        ValueError, r"^layout must be one of", shard, _t(1, 8, 4), 0, 2, layout="ring"
    )


def test_triton_refuses_what_it_cannot_run_here():
    kernel = need("triton_kernel")
    if "triton" not in attn_lib.available_backends():
        pytest.skip("Triton is not installed here")
    q = _t(2, 7, 4, dtype=torch.float64)
    reason = r"the kernel computes in float32, not float64"
    _raises(
        ValueError,
        r"^backend='triton' must be runnable here; got " + reason,
        attn_lib.attention,
        q,
        q,
        q,
        backend="triton",
    )
    if kernel.interpreting():
        bf16 = _t(2, 7, 4, dtype=torch.bfloat16)
        _raises(
            ValueError,
            r"interpreter gives wrong results for bfloat16",
            attn_lib.attention,
            bf16,
            bf16,
            bf16,
            backend="triton",
        )

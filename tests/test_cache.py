"""attn_lib.KVCache: appends along the length dim and checks what it is given."""

import pytest
import torch

import attn_lib


def test_update_appends_along_length_and_returns_everything():
    cache = attn_lib.KVCache()
    assert len(cache) == 0
    k1, v1 = torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 6)
    cache.update(k1, v1)
    k, v = cache.update(torch.ones(2, 3, 1, 5), torch.ones(2, 3, 1, 6))
    assert len(cache) == 5 and k.shape == (2, 3, 5, 5) and v.shape == (2, 3, 5, 6)
    assert k[..., -1, :].eq(1).all() and k[..., :4, :].eq(0).all()
    assert k1.eq(0).all()  # the caller's tensors are not written into
    cache.reset()
    assert len(cache) == 0


def test_cached_decoding_equals_full_causal_pass():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3)
    )
    full = attn_lib.attention(q, k, v, is_causal=True)
    cache = attn_lib.KVCache()
    steps = []
    for i in range(9):
        ks, vs = cache.update(k[..., i : i + 1, :], v[..., i : i + 1, :])
        steps.append(attn_lib.attention(q[..., i : i + 1, :], ks, vs, is_causal=True))
    torch.testing.assert_close(torch.cat(steps, dim=-2), full)


def test_bad_updates_are_named():
    cache = attn_lib.KVCache()
    with pytest.raises(
        ValueError, match=r"k and v must agree in every dim but the last"
    ):
        cache.update(torch.ones(1, 3, 4), torch.ones(1, 2, 4))
    cache.update(torch.ones(1, 3, 4), torch.ones(1, 3, 4))
    with pytest.raises(
        ValueError,
        match=r"k must match the cached keys' shape \(1, '\*', 4\); got shape \(2, 1, 4\)",
    ):
        cache.update(torch.ones(2, 1, 4), torch.ones(2, 1, 4))
    with pytest.raises(TypeError, match=r"cached_keys and k must have the same dtype"):
        cache.update(
            torch.ones(1, 1, 4, dtype=torch.float64),
            torch.ones(1, 1, 4, dtype=torch.float64),
        )

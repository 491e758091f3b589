"""Property tests (Hypothesis): the invariants attention keeps for any input.

Small shapes, a fixed number of derandomized examples (reproducible in CI).
Each property runs on every backend that can take the drawn inputs here.
"""

from __future__ import annotations

import pytest
import torch
from _contract import BACKENDS, MODULES, build, call, need
from hypothesis import given, settings
from hypothesis import strategies as st

import attn_lib

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True)
# backends that run any CPU float64 input (triton computes in float32)
F64_BACKENDS = [b for b in BACKENDS if b != "triton"]

dims = st.integers(1, 6)


@st.composite
def problems(draw, *, masked=True):
    """q, k, v (float64) and a bool mask (None or random, empty rows allowed)."""
    b, t, s, d, dv = (draw(dims) for _ in range(5))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.5, 3.0]))  # ordinary and peaked scores
    q = torch.randn(b, t, d, generator=gen, dtype=torch.float64) * scale
    k = torch.randn(b, s, d, generator=gen, dtype=torch.float64) * scale
    v = torch.randn(b, s, dv, generator=gen, dtype=torch.float64)
    mask = None
    if masked and draw(st.booleans()):
        mask = torch.rand(b, t, s, generator=gen) < draw(st.sampled_from([0.3, 0.8]))
    return q, k, v, mask


@PROPERTY
@given(problems(), st.sampled_from(F64_BACKENDS), st.booleans())
def test_weight_rows_sum_to_one_or_zero(problem, backend, causal):
    q, k, v, mask = problem
    out, w = attn_lib.attention(
        q, k, v, mask=mask, is_causal=causal, return_weights=True
    )
    sums = w.sum(-1)
    empty = sums == 0
    torch.testing.assert_close(sums[~empty], torch.ones_like(sums[~empty]))
    assert (w >= 0).all() and (out[empty] == 0).all()
    allowed = torch.ones(w.shape, dtype=torch.bool)
    if mask is not None:
        allowed &= mask
    if causal:
        allowed &= attn_lib.causal_mask(q.shape[-2], k.shape[-2])
    assert torch.equal(empty, ~allowed.any(-1))  # empty exactly when nothing allowed
    torch.testing.assert_close(
        attn_lib.attention(q, k, v, mask=mask, is_causal=causal, backend=backend), out
    )


@PROPERTY
@given(problems(), st.sampled_from(F64_BACKENDS), st.data())
def test_permuting_key_value_pairs_changes_nothing(problem, backend, data):
    q, k, v, mask = problem
    perm = torch.tensor(data.draw(st.permutations(range(k.shape[-2]))))
    out = attn_lib.attention(q, k, v, mask=mask, backend=backend)
    permuted_mask = None if mask is None else mask[..., perm]
    again = attn_lib.attention(
        q, k[:, perm], v[:, perm], mask=permuted_mask, backend=backend
    )
    torch.testing.assert_close(again, out)


@PROPERTY
@given(problems(masked=False), st.sampled_from(F64_BACKENDS), st.data())
def test_causal_prefix_ignores_later_tokens(problem, backend, data):
    q, k, v, _ = problem
    n = min(q.shape[-2], k.shape[-2])
    q, k, v = q[:, :n], k[:, :n], v[:, :n]  # a square causal problem
    t = data.draw(st.integers(1, n))
    out = attn_lib.attention(q, k, v, is_causal=True, backend=backend)
    prefix = attn_lib.attention(
        q[:, :t], k[:, :t], v[:, :t], is_causal=True, backend=backend
    )
    torch.testing.assert_close(prefix, out[:, :t])
    k2, v2 = k.clone(), v.clone()
    k2[:, t:] += 5.0
    v2[:, t:] -= 7.0
    later = attn_lib.attention(q, k2, v2, is_causal=True, backend=backend)
    torch.testing.assert_close(later[:, :t], out[:, :t])


@PROPERTY
@given(problems(masked=False), st.sampled_from(F64_BACKENDS), st.data())
def test_decoding_with_a_cache_equals_the_full_pass(problem, backend, data):
    q, k, v, _ = problem
    n = min(q.shape[-2], k.shape[-2])
    q, k, v = q[:, :n], k[:, :n], v[:, :n]
    full = attn_lib.attention(q, k, v, is_causal=True, backend=backend)
    cache, steps, start = attn_lib.KVCache(), [], 0
    while start < n:  # chunks of random sizes, like a prompt then single tokens
        size = data.draw(st.integers(1, n - start))
        end = start + size
        kk, vv = cache.update(k[:, start:end], v[:, start:end])
        steps.append(
            attn_lib.attention(q[:, start:end], kk, vv, is_causal=True, backend=backend)
        )
        start = end
    assert len(cache) == n
    torch.testing.assert_close(torch.cat(steps, 1), full)


@PROPERTY
@given(problems(masked=False), st.sampled_from(F64_BACKENDS), st.data())
def test_padding_changes_no_real_tokens_output(problem, backend, data):
    q, k, v, _ = problem
    b, s = k.shape[0], k.shape[-2]
    lengths = [data.draw(st.integers(1, s)) for _ in range(b)]
    extra = data.draw(st.integers(1, 4))
    pad_k = torch.randn(b, extra, k.shape[-1], dtype=k.dtype) * 100
    pad_v = torch.randn(b, extra, v.shape[-1], dtype=v.dtype) * 100
    real = []
    for i, n in enumerate(lengths):  # each sequence on its own, no padding
        real.append(attn_lib.attention(q[i], k[i, :n], v[i, :n], backend=backend))
    k_pad = torch.cat([k, pad_k], 1)  # (B, S + extra, D): padded beyond each length
    v_pad = torch.cat([v, pad_v], 1)
    for i, n in enumerate(lengths):
        k_pad[i, n:s] = pad_k[i, :1]  # garbage in the padded slots
        v_pad[i, n:s] = pad_v[i, :1]
    mask = attn_lib.padding_mask(lengths, s + extra)[:, 0]  # (B, 1, S + extra)
    out = attn_lib.attention(q, k_pad, v_pad, mask=mask, backend=backend)
    torch.testing.assert_close(out, torch.stack(real))


CAUSAL_MODULES = [m for m in MODULES if m.cache]


@pytest.mark.parametrize("case", CAUSAL_MODULES, ids=[m.name for m in CAUSAL_MODULES])
@settings(max_examples=10, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4))
def test_module_decoding_with_a_cache_equals_the_full_pass(case, sizes):
    need(*case.where)
    module = build(case).eval()
    n = sum(sizes)
    x = torch.randn(
        2, n, 12, generator=torch.Generator().manual_seed(n), dtype=torch.float64
    )
    full = call(case, module, x)
    cache, steps, start = attn_lib.KVCache(), [], 0
    for size in sizes:
        steps.append(call(case, module, x[:, start : start + size], cache=cache))
        start += size
    torch.testing.assert_close(torch.cat(steps, 1), full)

"""Issue 9's fault kinds about positions and the online softmax, one family each.

Families: RoPE pairing conventions and positions at decoding; ALiBi slopes for
non-power-of-two head counts and at the decoding step; T5 buckets (clamping,
direction, offset at decoding); online-softmax blocks that are fully masked
or hold very negative scores; relative positions when lengths differ.
Everything follows attn_lib's one convention: relative position = key -
query, aligned bottom-right.
"""

from __future__ import annotations

import math

import pytest
import torch
from _contract import BACKENDS, has, need, runnable
from conftest import randn, random_mask

import attn_lib
from attn_lib import reference


def _positions():
    return need("positions")


# === RoPE: pairing conventions and positions at decoding ===========================


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_pairs_features_as_documented(interleaved):
    pos = _positions()
    d, p = 8, 3
    x = torch.zeros(1, d, dtype=torch.float64)
    x[0, 0] = 1.0
    out = pos.apply_rope(x, torch.tensor([p]), interleaved=interleaved)[0]
    partner = 1 if interleaved else d // 2  # (2i, 2i+1) or (i, i + D/2)
    expected = torch.zeros(d, dtype=torch.float64)
    expected[0], expected[partner] = math.cos(p), math.sin(p)  # pair 0 turns 1 rad/pos
    torch.testing.assert_close(out, expected)


def test_rope_conventions_differ_by_a_fixed_permutation(gen):
    pos = _positions()
    x = randn(gen, 2, 7, 8)
    p = torch.arange(7)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    inter = pos.apply_rope(x, p, interleaved=True)
    half = pos.apply_rope(x[..., perm], p, interleaved=False)
    torch.testing.assert_close(inter[..., perm], half)
    assert not torch.allclose(inter, pos.apply_rope(x, p, interleaved=False))


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_is_a_rotation_and_scores_see_only_the_offset(interleaved, gen):
    pos = _positions()
    q, k = randn(gen, 1, 8), randn(gen, 1, 8)

    def score(m, n):
        qm = pos.apply_rope(q, torch.tensor([m]), interleaved=interleaved)
        kn = pos.apply_rope(k, torch.tensor([n]), interleaved=interleaved)
        return (qm @ kn.T).item()

    torch.testing.assert_close(
        pos.apply_rope(q, torch.tensor([5]), interleaved=interleaved).norm(), q.norm()
    )
    assert score(2, 7) == pytest.approx(score(10, 15), abs=1e-10)
    assert score(2, 7) != pytest.approx(score(2, 8), abs=1e-6)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_at_decoding_uses_the_absolute_position(interleaved, gen):
    pos = _positions()
    x = randn(gen, 2, 3, 9, 8)
    full = pos.apply_rope(x, torch.arange(9), interleaved=interleaved)
    for t in (0, 4, 8):
        step = pos.apply_rope(
            x[..., t : t + 1, :], torch.tensor([t]), interleaved=interleaved
        )
        torch.testing.assert_close(step, full[..., t : t + 1, :])
    restarted = pos.apply_rope(
        x[..., 8:, :], torch.tensor([0]), interleaved=interleaved
    )
    assert not torch.allclose(restarted, full[..., 8:, :])  # the slip: position 0


def test_rope_decoding_with_a_cache_equals_the_full_pass(gen):
    pos = _positions()
    q, k, v = randn(gen, 2, 9, 8), randn(gen, 2, 9, 8), randn(gen, 2, 9, 3)
    p = torch.arange(9)
    full = attn_lib.attention(
        pos.apply_rope(q, p), pos.apply_rope(k, p), v, is_causal=True
    )
    cache, steps = attn_lib.KVCache(), []
    for t in range(9):
        at = torch.tensor([len(cache)])  # the next absolute position
        kk, vv = cache.update(pos.apply_rope(k[:, t : t + 1], at), v[:, t : t + 1])
        qq = pos.apply_rope(q[:, t : t + 1], at)
        steps.append(attn_lib.attention(qq, kk, vv, is_causal=True))
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_rope_low_precision_keeps_dtype_and_accuracy(gen):
    pos = _positions()
    x = randn(gen, 2, 7, 16, dtype=torch.float32) * 20
    p = torch.arange(1000, 1007)
    exact = pos.apply_rope(x.double(), p)
    for dtype, tol in ((torch.float16, 0.05), (torch.bfloat16, 0.4)):
        out = pos.apply_rope(x.to(dtype), p)
        assert out.dtype == dtype
        assert (out.double() - exact).abs().max() < tol


# === ALiBi: non-power-of-two head counts and the decoding step ======================


def test_alibi_slopes_issue_example():
    pos = _positions()
    slopes = pos.alibi_slopes(6)
    assert slopes.tolist() == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 8, 12, 16, 24])
def test_alibi_slopes_for_any_head_count(n):
    pos = _positions()
    slopes = pos.alibi_slopes(n).double()
    p = 2 ** int(math.floor(math.log2(n)))

    def geometric(m):
        return torch.tensor([2.0 ** (-8.0 * (i + 1) / m) for i in range(m)]).double()

    expected = torch.cat([geometric(p), geometric(2 * p)[0::2][: n - p]])
    torch.testing.assert_close(slopes, expected)
    assert slopes.shape == (n,) and ((slopes > 0) & (slopes <= 1)).all()
    assert len(set(slopes.tolist())) == n  # no two heads share a slope


@pytest.mark.parametrize("h", [3, 6])
def test_alibi_bias_at_decoding_is_the_last_row(h):
    pos = _positions()
    full = pos.alibi_bias(h, 9, 9)  # (H, S, S)
    torch.testing.assert_close(pos.alibi_bias(h, 1, 9), full[:, -1:])
    torch.testing.assert_close(pos.alibi_bias(h, 4, 9), full[:, -4:])
    slopes = pos.alibi_slopes(h)
    back = torch.arange(8, -1, -1).float()  # distance of key j from query 8
    torch.testing.assert_close(full[:, -1], -slopes[:, None] * back)


def test_alibi_decoding_with_a_cache_equals_the_full_pass(gen):
    pos = _positions()
    q, k, v = (randn(gen, 1, 6, 9, 4, dtype=torch.float32) for _ in range(3))
    full = attn_lib.attention(q, k, v, bias=pos.alibi_bias(6, 9, 9), is_causal=True)
    for t in (0, 5, 8):
        bias = pos.alibi_bias(6, 1, t + 1)
        kk, vv = k[..., : t + 1, :], v[..., : t + 1, :]
        step = attn_lib.attention(
            q[..., t : t + 1, :], kk, vv, bias=bias, is_causal=True
        )
        torch.testing.assert_close(step, full[..., t : t + 1, :])


# === T5 buckets: clamping, direction, offset at decoding ============================


def _t5_oracle(rel: int, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of one offset, written from the paper's description (float64)."""
    n = -rel  # how far back the key is
    half = num_buckets // 2 if bidirectional else num_buckets
    base = half if (bidirectional and n < 0) else 0
    n = abs(n) if bidirectional else max(n, 0)
    exact = half // 2
    if n < exact:
        return base + n, False
    frac = math.log(n / exact) / math.log(max_distance / exact) * (half - exact)
    near_integer = abs(frac - round(frac)) < 1e-4
    return base + min(exact + int(frac), half - 1), near_integer


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (10, 20)])
def test_t5_buckets_match_the_formula(bidirectional, num_buckets, max_distance):
    pos = _positions()
    rel = torch.arange(-300, 301)
    got = pos.t5_bucket(
        rel,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    assert got.dtype == torch.long and got.shape == rel.shape
    assert got.min() >= 0 and got.max() < num_buckets
    for r, g in zip(rel.tolist(), got.tolist()):
        want, borderline = _t5_oracle(r, bidirectional, num_buckets, max_distance)
        assert g == want or borderline, (r, g, want)


def test_t5_buckets_clamp_and_keep_direction():
    pos = _positions()
    far = torch.tensor([-128, -1000, -(10**6)])
    assert pos.t5_bucket(far).tolist() == [15, 15, 15]  # the last "past" bucket
    assert pos.t5_bucket(-far).tolist() == [31, 31, 31]  # the last "future" bucket
    assert pos.t5_bucket(-far, bidirectional=False).tolist() == [0, 0, 0]
    assert pos.t5_bucket(far, bidirectional=False).tolist() == [31, 31, 31]
    rel = torch.arange(-50, 51)
    b = pos.t5_bucket(rel)
    assert (b[rel < 0] < 16).all() and (b[rel > 0] >= 16).all() and b[50] == 0
    past = pos.t5_bucket(-torch.arange(0, 500))
    assert (past.diff() >= 0).all()  # never closer for a farther key


def test_t5_issue_doc_example():
    pos = _positions()
    got = pos.t5_bucket(torch.tensor([0, -1, 1, -200]), num_buckets=8, max_distance=16)
    assert got.tolist() == [0, 1, 5, 3]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_offsets_at_decoding_are_the_last_row(bidirectional):
    pos = _positions()
    full = pos.t5_bucket(pos.relative_positions(40, 40), bidirectional=bidirectional)
    step = pos.t5_bucket(pos.relative_positions(1, 40), bidirectional=bidirectional)
    assert torch.equal(step, full[-1:])
    bias = pos.T5RelativeBias(4, bidirectional=bidirectional)
    with torch.no_grad():
        bias.table.weight.copy_(torch.randn(bias.table.weight.shape))
    torch.testing.assert_close(bias(1, 40), bias(40, 40)[:, -1:])
    torch.testing.assert_close(bias(3, 40), bias(40, 40)[:, -3:])


# === online-softmax blocks: fully masked, or very negative scores ===================


def _block_mask(t, s):
    """Rows 0-1 see nothing; rows 2-4 see only the last keys (early blocks empty)."""
    mask = torch.ones(t, s, dtype=torch.bool)
    mask[:2] = False
    mask[2:5, : s - 2] = False
    mask[5:, 3:9] = False  # a hole spanning whole blocks
    return mask


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 64])
def test_chunked_with_fully_masked_blocks(block_size, gen):
    chunked = need("chunked", "chunked_attention")
    q, k, v = randn(gen, 2, 9, 4), randn(gen, 2, 13, 4), randn(gen, 2, 13, 3)
    mask = _block_mask(9, 13)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = chunked(q, k, v, mask=mask, block_size=block_size)
    expected = attn_lib.attention(q, k, v, mask=mask, backend="math")
    torch.testing.assert_close(out, expected)
    assert (out[:, :2] == 0).all()
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(expected.sum(), (q, k, v))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_tiled_reference_with_fully_masked_blocks(block_size, gen):
    tiled = need("reference", "tiled_attention")
    q, k, v = (randn(gen, 2, n, 4).numpy() for n in (9, 13, 13))
    mask = _block_mask(9, 13).numpy()
    full, _ = reference.scaled_dot_product_attention(q, k, v, mask)
    out = tiled(q, k, v, mask, block_size=block_size)
    assert (out[:, :2] == 0).all()
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(full))


def _very_negative_bias(t, s):
    """Early key blocks far below, then far above, the later ones."""
    bias = torch.zeros(t, s)
    bias[:, :4] = -1e30  # finite but hopeless
    bias[::2, 4:8] = 80.0  # a big jump after the running max was set
    bias[1::2, 8:] = -200.0
    return bias


@pytest.mark.parametrize("backend", BACKENDS)
def test_very_negative_and_jumping_scores_on_every_backend(backend, gen, device):
    q = randn(gen, 2, 9, 4, dtype=torch.float32, device=device) * 10
    k = randn(gen, 2, 13, 4, dtype=torch.float32, device=device) * 10
    v = randn(gen, 2, 13, 3, dtype=torch.float32, device=device)
    bias = _very_negative_bias(9, 13).to(device)
    runnable(backend, q, bias)
    out = attn_lib.attention(q, k, v, bias=bias, backend=backend)
    golden = attn_lib.attention(
        q.double(), k.double(), v.double(), bias=bias.double(), backend="math"
    )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), golden, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_size", [1, 2, 5])
def test_chunked_very_negative_scores_in_small_blocks(block_size, gen):
    chunked = need("chunked", "chunked_attention")
    q, k, v = randn(gen, 9, 4) * 30, randn(gen, 13, 4) * 30, randn(gen, 13, 3)
    bias = _very_negative_bias(9, 13).double()
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = chunked(q, k, v, bias=bias, block_size=block_size)
    expected = attn_lib.attention(q, k, v, bias=bias, backend="math")
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(expected.sum(), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_chunked_causal_t_greater_than_s_has_empty_leading_blocks(gen):
    chunked = need("chunked", "chunked_attention")
    q, k, v = randn(gen, 13, 4), randn(gen, 7, 4), randn(gen, 7, 3)
    out = chunked(q, k, v, is_causal=True, block_size=2)
    assert (out[:6] == 0).all()
    torch.testing.assert_close(out, attn_lib.attention(q, k, v, is_causal=True))


def test_partials_merge_with_an_empty_block(gen):
    block_attention = need("distributed", "block_attention")
    merge = need("distributed", "merge_partials")
    q, k, v = randn(gen, 5, 4), randn(gen, 8, 4), randn(gen, 8, 3)
    mask = random_mask(gen, 5, 8)
    mask[:, :4] = False  # the first block is empty for every row
    mask[:, 4] = True
    mask[0] = False  # and row 0 sees nothing at all
    a = block_attention(q, k[:4], v[:4], mask=mask[:, :4])
    assert torch.isneginf(a[1]).all() and (a[0] == 0).all()
    b = block_attention(q, k[4:], v[4:], mask=mask[:, 4:])
    for out, _ in (merge(*a, *b), merge(*b, *a)):
        torch.testing.assert_close(out, attn_lib.attention(q, k, v, mask=mask))
        assert (out[0] == 0).all()


# === relative positions when lengths differ =========================================


@pytest.mark.parametrize("t,s", [(7, 13), (13, 7), (1, 9), (9, 9)])
def test_relative_positions_are_key_minus_query_bottom_right(t, s):
    pos = _positions()
    rel = pos.relative_positions(t, s)
    i = torch.arange(t)[:, None]
    j = torch.arange(s)[None, :]
    assert rel.shape == (t, s)
    assert torch.equal(rel, j - (i + s - t))
    assert rel[-1, -1] == 0  # the last query sits on the last key
    allowed = attn_lib.causal_mask(t, s)
    assert torch.equal(allowed, rel <= 0)  # same alignment as the causal mask


def test_relative_offsets_of_fewer_queries_are_the_last_rows():
    pos = _positions()
    square = pos.relative_positions(13, 13)
    for t in (1, 4, 7):
        assert torch.equal(pos.relative_positions(t, 13), square[-t:])
        torch.testing.assert_close(
            pos.alibi_bias(3, t, 13), pos.alibi_bias(3, 13, 13)[:, -t:]
        )


def test_shaw_relative_vectors_and_attention_when_lengths_differ(gen):
    pos = _positions()
    shaw = pos.ShawRelativePositions(4, max_distance=3).double()
    rel_k, rel_v = shaw(5, 9)
    full_k, full_v = shaw(9, 9)
    torch.testing.assert_close(rel_k, full_k[-5:])
    torch.testing.assert_close(rel_v, full_v[-5:])
    q, k, v = randn(gen, 2, 5, 4), randn(gen, 2, 9, 4), randn(gen, 2, 9, 4)
    out, w = pos.shaw_attention(
        q, k, v, rel_k, rel_v, is_causal=True, return_weights=True
    )
    scores = (q @ k.transpose(-2, -1) + torch.einsum("btd,tsd->bts", q, rel_k)) / 2.0
    scores = scores.masked_fill(~attn_lib.causal_mask(5, 9), float("-inf"))
    expected_w = scores.softmax(-1)
    torch.testing.assert_close(w, expected_w)
    expected = expected_w @ v + torch.einsum("bts,tsd->btd", expected_w, rel_v)
    torch.testing.assert_close(out, expected)
    q9 = torch.cat([randn(gen, 2, 4, 4), q], 1)  # the full pass; its last 5 rows
    full = pos.shaw_attention(q9, k, v, full_k, full_v, is_causal=True)
    torch.testing.assert_close(full[:, -5:], out)


def test_t5_bias_when_lengths_differ():
    pos = _positions()
    if not has("positions", "T5RelativeBias"):
        pytest.skip("attn_lib.positions.T5RelativeBias has not landed yet")
    bias = pos.T5RelativeBias(2, num_buckets=8, max_distance=16)
    assert bias(7, 13).shape == (2, 7, 13)
    assert bias(13, 7).shape == (2, 13, 7)

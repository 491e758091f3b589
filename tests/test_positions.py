"""attn_lib.positions: every scheme against a reference, its conventions, its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import randn
from torch.testing import assert_close

from attn_lib import KVCache, attention, causal_mask
from attn_lib.positions import (
    ALiBiBias,
    ShawRelativePositions,
    T5RelativeBias,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    relative_positions,
    rope_frequencies,
    shaw_attention,
    sinusoidal,
    t5_bucket,
)

T, S = 7, 13


# -- sinusoidal ------------------------------------------------------------


def test_sinusoidal_matches_the_formula_written_in_numpy():
    n, dim = 11, 10
    pos = np.arange(n)[:, None]
    omega = 10000.0 ** (-np.arange(0, dim, 2) / dim)
    expected = np.zeros((n, dim))
    expected[:, 0::2] = np.sin(pos * omega)
    expected[:, 1::2] = np.cos(pos * omega)
    table = sinusoidal(n, dim)
    assert table.dtype == torch.float32 and table.shape == (n, dim)
    assert_close(table, torch.tensor(expected, dtype=torch.float32))


def test_sinusoidal_dot_products_depend_only_on_the_distance():
    table = sinusoidal(40, 16).double()
    gram = table @ table.T  # (n, n)
    for shift in (1, 5, 17):
        assert_close(gram[0, shift], gram[10, 10 + shift])
        assert_close(gram[3, 3 + shift], gram[20, 20 + shift])


def test_sinusoidal_refuses_odd_dims_and_empty_tables():
    with pytest.raises(ValueError, match=r"dim must be a positive even int .*; got 7"):
        sinusoidal(4, 7)
    with pytest.raises(ValueError, match=r"n must be a positive int; got 0"):
        sinusoidal(0, 8)
    with pytest.raises(ValueError, match=r"base must be a positive number; got -1"):
        sinusoidal(3, 8, base=-1)


# -- relative positions ----------------------------------------------------


@pytest.mark.parametrize("t, s", [(T, S), (S, T), (5, 5), (1, 9)])
def test_relative_positions_are_key_minus_query_aligned_bottom_right(t, s):
    rel = relative_positions(t, s)
    assert rel.dtype == torch.long and rel.shape == (t, s)
    for i in range(t):
        for j in range(s):
            assert rel[i, j] == j - (i + s - t)
    # the causal mask is exactly "the key is not in the future"
    assert torch.equal(rel <= 0, causal_mask(t, s))


def test_relative_positions_at_a_decoding_step_are_rows_of_the_full_pass():
    full = relative_positions(S)
    assert torch.equal(relative_positions(1, S), full[-1:])
    assert torch.equal(relative_positions(T, S), full[S - T :])


def test_relative_positions_default_to_square_and_check_lengths():
    assert torch.equal(relative_positions(3), relative_positions(3, 3))
    with pytest.raises(ValueError, match=r"t must be a positive int; got 0"):
        relative_positions(0, 3)
    with pytest.raises(ValueError, match=r"s must be a positive int; got -2"):
        relative_positions(3, -2)


# -- T5 buckets ------------------------------------------------------------

T5_CONFIGS = [(True, 32, 128), (False, 32, 128), (True, 8, 20), (False, 6, 9)]


@pytest.mark.parametrize("bidirectional, num_buckets, max_distance", T5_CONFIGS)
def test_t5_bucket_matches_transformers_t5(bidirectional, num_buckets, max_distance):
    modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-400, 401)
    ours = t5_bucket(
        rel,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    theirs = modeling_t5.T5Attention._relative_position_bucket(
        rel,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    assert torch.equal(ours, theirs)


def _t5_python(rel, bidirectional, num_buckets, max_distance):
    """One offset at a time, straight from the rule in words."""
    half = num_buckets // 2 if bidirectional else num_buckets
    exact, back = half // 2, -rel
    offset = half if (bidirectional and back < 0) else 0
    back = abs(back) if bidirectional else max(back, 0)
    if back < exact:
        return offset + back
    steps = math.log(back / exact) / math.log(max_distance / exact) * (half - exact)
    return offset + min(exact + int(steps), half - 1)


@pytest.mark.parametrize("bidirectional, num_buckets, max_distance", T5_CONFIGS)
def test_t5_bucket_matches_the_rule_in_python(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-300, 301)
    ours = t5_bucket(
        rel,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    expected = [
        _t5_python(r, bidirectional, num_buckets, max_distance) for r in rel.tolist()
    ]
    assert ours.tolist() == expected


def test_t5_bucket_exact_near_clamped_far_and_directions_apart():
    back = torch.arange(0, 500)
    past = t5_bucket(-back)  # bidirectional, 16 buckets per direction
    future = t5_bucket(back)
    assert past[:8].tolist() == list(range(8))  # exact near
    assert (past[128:] == 15).all() and int(past.max()) == 15  # the clamp
    assert 8 < int((past < 15).sum()) < 128  # log buckets reach 15 before 128
    assert (past.diff() >= 0).all()  # farther never means a nearer bucket
    assert future[0] == 0 and (future[1:] >= 16).all()  # future: upper half
    assert torch.equal(future[1:] - 16, past[1:])
    causal = t5_bucket(back, bidirectional=False)
    assert (causal == 0).all()  # future keys share bucket 0
    causal_past = t5_bucket(-back, bidirectional=False)
    assert causal_past[:16].tolist() == list(range(16))
    assert (causal_past[128:] == 31).all() and int(causal_past.max()) == 31


def test_t5_buckets_at_decoding_steps_are_rows_of_the_full_pass():
    full = t5_bucket(relative_positions(200), bidirectional=False)
    for cached in (0, 5, 150, 199):
        step = t5_bucket(relative_positions(1, cached + 1), bidirectional=False)
        assert torch.equal(step, full[cached : cached + 1, : cached + 1])
    chunk = t5_bucket(relative_positions(T, 190), bidirectional=False)
    assert torch.equal(chunk, full[190 - T : 190, :190])


def test_t5_bucket_errors_are_named():
    with pytest.raises(TypeError, match=r"rel must be an integer tensor .*float32"):
        t5_bucket(torch.zeros(3))
    with pytest.raises(TypeError, match=r"rel must be a torch.Tensor; got list"):
        t5_bucket([0, 1])
    with pytest.raises(ValueError, match=r"num_buckets must be an even int >= 4"):
        t5_bucket(torch.zeros(3, dtype=torch.long), num_buckets=31)
    with pytest.raises(ValueError, match=r"num_buckets must be >= 2 when"):
        t5_bucket(torch.zeros(3, dtype=torch.long), bidirectional=False, num_buckets=1)
    with pytest.raises(ValueError, match=r"max_distance must be greater than the 8 "):
        t5_bucket(torch.zeros(3, dtype=torch.long), max_distance=8)


def test_t5_relative_bias_looks_up_one_learned_value_per_bucket_and_head():
    module = T5RelativeBias(3, bidirectional=False, num_buckets=8, max_distance=20)
    assert torch.equal(module(T, S), torch.zeros(3, T, S))  # starts neutral
    with torch.no_grad():
        module.table.weight.copy_(torch.arange(24.0).view(8, 3))
    bias = module(T, S)
    buckets = t5_bucket(
        relative_positions(T, S), bidirectional=False, num_buckets=8, max_distance=20
    )
    assert bias.shape == (3, T, S)
    for h in range(3):
        assert torch.equal(bias[h], (buckets * 3 + h).float())
    assert torch.equal(module(1, S), module(S, S)[:, -1:])  # decoding step
    bias.sum().backward()
    assert module.table.weight.grad.abs().sum() > 0


def test_t5_relative_bias_checks_its_arguments():
    with pytest.raises(ValueError, match=r"num_heads must be a positive int; got 0"):
        T5RelativeBias(0)
    with pytest.raises(ValueError, match=r"num_buckets must be an even int >= 4"):
        T5RelativeBias(2, num_buckets=9)


# -- ALiBi -----------------------------------------------------------------


def test_alibi_slopes_for_six_heads():
    assert alibi_slopes(6).tolist() == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_alibi_slopes_for_powers_of_two_are_geometric(n):
    slopes = alibi_slopes(n)
    expected = torch.tensor([2.0 ** (-8 * (i + 1) / n) for i in range(n)])
    assert slopes.dtype == torch.float32 and slopes.shape == (n,)
    assert_close(slopes, expected)


@pytest.mark.parametrize("n", [1, 3, 5, 6, 7, 8, 12, 20, 24])
def test_alibi_slopes_match_transformers_bloom(n):
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    # Bloom's tensor is slope * key position; key 1 of an all-ones mask is the slope
    alibi = bloom.build_alibi_tensor(torch.ones(1, 2), n, torch.float32)  # (H, 1, 2)
    assert_close(alibi_slopes(n), alibi[:, 0, 1])
    assert len(set(alibi_slopes(n).tolist())) == n  # every head its own slope


def test_alibi_bias_is_slope_times_key_minus_query():
    bias = alibi_bias(5, T, S)
    slopes = alibi_slopes(5)
    assert bias.shape == (5, T, S) and bias.dtype == torch.float32
    for i in range(T):
        for j in range(S):
            assert_close(bias[:, i, j], slopes * (j - i - (S - T)))


def test_alibi_bias_penalty_grows_with_distance_into_the_past():
    bias = alibi_bias(4, S)
    past = causal_mask(S)
    assert (bias[:, past] <= 0).all()
    assert (bias.diagonal(dim1=1, dim2=2) == 0).all()
    last = bias[:, -1]  # (H, S): the last query over every key
    assert (last.diff(dim=-1) > 0).all()  # nearer keys are penalised less


def test_alibi_bias_at_a_decoding_step_is_the_row_of_the_full_pass():
    full = alibi_bias(6, S)
    assert torch.equal(alibi_bias(6, 1, S), full[:, -1:])
    assert torch.equal(alibi_bias(6, T, S), full[:, S - T :])


def test_alibi_bidirectional_penalises_both_sides_and_the_module_agrees():
    both = alibi_bias(3, T, S, bidirectional=True)
    assert torch.equal(both, -alibi_bias(3, T, S).abs())
    assert torch.equal(ALiBiBias(3, bidirectional=True)(T, S), both)
    assert torch.equal(ALiBiBias(3)(T, S), alibi_bias(3, T, S))
    assert len(list(ALiBiBias(3).parameters())) == 0


def test_alibi_bias_in_causal_attention_decodes_like_the_full_pass(gen):
    h, d = 6, 8
    q, k, v = (randn(gen, h, S, d) for _ in range(3))
    full = attention(q, k, v, bias=alibi_bias(h, S).double(), is_causal=True)
    for i in (0, 4, S - 1):
        step = attention(
            q[:, i : i + 1],
            k[:, : i + 1],
            v[:, : i + 1],
            bias=alibi_bias(h, 1, i + 1).double(),
            is_causal=True,
        )
        assert_close(step, full[:, i : i + 1])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_alibi_refuses_a_bad_head_count(bad):
    with pytest.raises(ValueError, match=r"num_heads must be a positive int; got"):
        alibi_slopes(bad)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int; got"):
        alibi_bias(bad, 3, 3)


# -- RoPE ------------------------------------------------------------------


def _rope_numpy(x, positions, base=10000.0):
    """Interleaved RoPE with an explicit 2x2 rotation per pair, in float64."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    d = x.shape[-1]
    for t, p in enumerate(positions):
        for i in range(d // 2):
            angle = p * base ** (-2 * i / d)
            c, s = math.cos(angle), math.sin(angle)
            rot = np.array([[c, -s], [s, c]])
            out[..., t, 2 * i : 2 * i + 2] = x[..., t, 2 * i : 2 * i + 2] @ rot.T
    return out


def test_rope_interleaved_matches_explicit_rotations_in_numpy(gen):
    x = randn(gen, 2, T, 10)
    positions = torch.tensor([0, 1, 2, 5, 9, 30, 1000])
    out = apply_rope(x, positions, interleaved=True)
    assert_close(out, torch.tensor(_rope_numpy(x, positions.tolist())))


def test_rope_split_halves_matches_transformers_llama(gen):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = randn(gen, 2, 3, T, 16), randn(gen, 2, 3, T, 16)
    positions = torch.arange(4, 4 + T)
    angles = positions[:, None].double() * rope_frequencies(16)[None]  # (T, 8)
    emb = torch.cat([angles, angles], dim=-1)[None]  # (1, T, 16)
    q_ref, k_ref = llama.apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    assert_close(apply_rope(q, positions), q_ref)
    assert_close(apply_rope(k, positions), k_ref)


def test_rope_interleaved_matches_transformers_gptj(gen):
    gptj = pytest.importorskip("transformers.models.gptj.modeling_gptj")
    x = randn(gen, 2, T, 3, 12)  # GPT-J's layout: (B, T, H, D)
    positions = torch.arange(3, 3 + T)
    angles = positions[:, None].double() * rope_frequencies(12)[None]  # (T, 6)
    ref = gptj.apply_rotary_pos_emb(x, angles.sin()[None], angles.cos()[None])
    ours = apply_rope(x.transpose(1, 2), positions, interleaved=True)  # (B, H, T, D)
    assert_close(ours.transpose(1, 2), ref)


def test_rope_pairing_conventions_are_one_permutation_apart(gen):
    d = 12
    x = randn(gen, 3, T, d)
    positions = torch.arange(T) * 3
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    inter = apply_rope(x, positions, interleaved=True)
    split = apply_rope(x[..., perm], positions, interleaved=False)
    assert_close(inter[..., perm], split)
    assert not torch.allclose(inter, apply_rope(x, positions))  # not the same map


def test_rope_scores_depend_only_on_the_distance(gen):
    q, k = randn(gen, 16), randn(gen, 16)
    for interleaved in (False, True):

        def score(m, n, interleaved=interleaved):
            qm = apply_rope(q[None], torch.tensor([m]), interleaved=interleaved)
            kn = apply_rope(k[None], torch.tensor([n]), interleaved=interleaved)
            return (qm @ kn.T).item()

        for m, n in [(0, 3), (5, 1), (2, 2)]:
            for shift in (1, 17, 400):
                assert math.isclose(
                    score(m, n), score(m + shift, n + shift), abs_tol=1e-9
                )
        assert not math.isclose(score(0, 3), score(0, 4), abs_tol=1e-3)


def test_rope_keeps_norms_is_identity_at_zero_and_leaves_its_input_alone(gen):
    x = randn(gen, 4, T, 8)
    before = x.clone()
    out = apply_rope(x, torch.arange(T) * 7)
    assert torch.equal(x, before)
    assert_close(out.norm(dim=-1), x.norm(dim=-1))
    assert_close(apply_rope(x, torch.zeros(T, dtype=torch.long)), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rope_low_precision_keeps_dtype_and_stays_close(gen, device, dtype):
    x = randn(gen, 2, T, 32)
    positions = torch.arange(100, 100 + T)
    golden = apply_rope(x, positions)
    out = apply_rope(x.to(dtype=dtype, device=device), positions.to(device))
    assert out.dtype == dtype and out.device.type == device.type
    rounding = (x.to(dtype).double() - x).abs().max()
    assert (out.double().cpu() - golden).abs().max() <= 2 * rounding + 1e-6


def test_rope_positions_continue_when_decoding_with_a_cache(gen):
    h, d = 3, 8
    q, k, v = (randn(gen, 2, h, S, d) for _ in range(3))
    positions = torch.arange(S)
    full = attention(
        apply_rope(q, positions), apply_rope(k, positions), v, is_causal=True
    )
    cache, outs = KVCache(), []
    for start, stop in [(0, 5), (5, 6), (6, S)]:  # a prompt, a step, a chunk
        at = torch.arange(len(cache), len(cache) + stop - start)
        assert at[0] == start
        keys, values = cache.update(
            apply_rope(k[..., start:stop, :], at), v[..., start:stop, :]
        )
        outs.append(
            attention(
                apply_rope(q[..., start:stop, :], at), keys, values, is_causal=True
            )
        )
    assert_close(torch.cat(outs, dim=-2), full)


def test_rope_errors_are_named(gen):
    x = randn(gen, 2, 5, 8)
    with pytest.raises(
        ValueError, match=r"x must have an even last dim D .*\(2, 5, 7\)"
    ):
        apply_rope(randn(gen, 2, 5, 7), torch.arange(5))
    with pytest.raises(
        ValueError, match=r"positions must have shape \(T,\) = \(5,\).*got shape \(4,\)"
    ):
        apply_rope(x, torch.arange(4))
    with pytest.raises(
        ValueError, match=r"positions must have shape .*got shape \(1, 5\)"
    ):
        apply_rope(x, torch.arange(5)[None])
    with pytest.raises(
        TypeError, match=r"positions must be an integer or float tensor; got torch.bool"
    ):
        apply_rope(x, torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"positions must be a torch.Tensor; got list"):
        apply_rope(x, [0, 1, 2, 3, 4])
    with pytest.raises(
        TypeError, match=r"x must be a floating-point tensor; got torch.int64"
    ):
        apply_rope(torch.ones(5, 8, dtype=torch.long), torch.arange(5))
    with pytest.raises(ValueError, match=r"base must be a positive number; got 0"):
        apply_rope(x, torch.arange(5), base=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_rope_refuses_positions_on_another_device(gen):
    with pytest.raises(ValueError, match=r"positions must be on the device of x"):
        apply_rope(randn(gen, 5, 8, device="cuda"), torch.arange(5))


# -- Shaw et al. -----------------------------------------------------------


def _shaw_loop(q, k, v, rel_k, rel_v, allowed):
    """Shaw et al.'s equations one query at a time (float64)."""
    out = torch.zeros(q.shape[0], v.shape[-1], dtype=torch.float64)
    for i in range(q.shape[0]):
        scores = torch.stack(
            [q[i] @ (k[j] + rel_k[i, j]) for j in range(k.shape[0])]
        ) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~allowed[i], float("-inf"))
        w = torch.softmax(scores, dim=0)
        out[i] = sum(w[j] * (v[j] + rel_v[i, j]) for j in range(k.shape[0]))
    return out


@pytest.mark.parametrize("t, s", [(T, S), (S, S), (1, S)])
def test_shaw_attention_matches_the_equations_when_lengths_differ(gen, t, s):
    module = ShawRelativePositions(6, max_distance=3, value_dim=5).double()
    rel_k, rel_v = module(t, s)
    q, k, v = randn(gen, t, 6), randn(gen, s, 6), randn(gen, s, 5)
    out = shaw_attention(q, k, v, rel_k, rel_v, is_causal=True)
    assert_close(out, _shaw_loop(q, k, v, rel_k, rel_v, causal_mask(t, s)))


def test_shaw_vectors_follow_clipped_key_minus_query():
    module = ShawRelativePositions(4, max_distance=2)
    rel_k, rel_v = module(T, S)
    assert rel_k.shape == (T, S, 4) and rel_v.shape == (T, S, 4)
    rel = relative_positions(T, S).clamp(-2, 2) + 2
    assert torch.equal(rel_k, module.keys.weight[rel])
    assert torch.equal(rel_v, module.values.weight[rel])
    step_k, _ = module(1, S)
    assert torch.equal(step_k, module(S, S)[0][-1:])  # decoding step = last row


def test_shaw_attention_without_positions_is_plain_attention(gen):
    q, k, v = randn(gen, 2, T, 4), randn(gen, 2, S, 4), randn(gen, 2, S, 3)
    zeros_k, zeros_v = torch.zeros(T, S, 4).double(), torch.zeros(T, S, 3).double()
    out, w = shaw_attention(q, k, v, zeros_k, zeros_v, return_weights=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert_close(out, ref)
    assert_close(w.sum(-1), torch.ones(2, T).double())


def test_shaw_attention_checks_the_relative_tensors(gen):
    q, k, v = randn(gen, T, 4), randn(gen, S, 4), randn(gen, S, 3)
    good_v = torch.zeros(T, S, 3).double()
    with pytest.raises(
        ValueError,
        match=r"rel_k must have shape \(T, S, 4\) = \(7, 13, 4\); got shape \(13, 7, 4\)",
    ):
        shaw_attention(q, k, v, torch.zeros(S, T, 4).double(), good_v)
    with pytest.raises(ValueError, match=r"rel_v must have shape \(T, S, 3\)"):
        shaw_attention(q, k, v, torch.zeros(T, S, 4).double(), torch.zeros(T, S, 4))
    with pytest.raises(ValueError, match=r"max_distance must be a positive int; got 0"):
        ShawRelativePositions(4, max_distance=0)

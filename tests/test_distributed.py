"""attn_lib.distributed: block partials, layouts, and ring attention on real gloo groups.

The multi-process tests start 2 and 4 local processes once each (a
module-scoped fixture) and check every case from what the ranks returned.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import randn, random_mask

import attn_lib
from attn_lib import reference
from attn_lib.distributed import (
    RingStats,
    block_attention,
    merge_partials,
    ring_attention,
    ring_attention_on_rank,
    ring_schedule,
    run_on_ranks,
    shard_sequence,
    unshard_sequence,
)

CASES = [(False, "contiguous"), (True, "contiguous"), (True, "zigzag")]
LEAD, D, DV = (2, 3), 5, 3  # leading dims, head dim, value dim


# ---------------------------------------------------------------- one process


def test_block_attention_matches_full_attention_and_logsumexp(device, gen):
    q, k, v = (randn(gen, 2, 7, 5), randn(gen, 2, 13, 5), randn(gen, 2, 13, 3))
    mask = random_mask(gen, 2, 7, 13)
    mask[0, 3] = False  # a query that may attend to nothing
    q, k, v, mask = (x.to(device) for x in (q, k, v, mask))
    out, lse = block_attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, attn_lib.attention(q, k, v, mask=mask))
    scores = (q @ k.transpose(-2, -1) / 5**0.5).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))
    assert lse[0, 3] == float("-inf") and out[0, 3].eq(0).all()


def test_block_attention_gives_finite_gradients_to_a_row_that_sees_nothing(gen):
    q, k, v = (randn(gen, 3, 4).requires_grad_() for _ in range(3))
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    out, lse = block_attention(q, k, v, mask=mask)
    (out.sum() + lse[[0, 2]].sum()).backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert q.grad[1].eq(0).all()


def test_merging_key_blocks_equals_attention_over_all_keys(gen):
    q, k, v = (randn(gen, 2, 7, 5), randn(gen, 2, 13, 5), randn(gen, 2, 13, 3))
    parts = [block_attention(q, k[:, a:b], v[:, a:b]) for a, b in ((0, 5), (5, 13))]
    out, lse = merge_partials(*parts[0], *parts[1])
    expected, _ = reference.scaled_dot_product_attention(
        q.numpy(), k.numpy(), v.numpy()
    )
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(lse, block_attention(q, k, v)[1])
    swapped, _ = merge_partials(*parts[1], *parts[0])
    torch.testing.assert_close(swapped, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_partials_stay_within_twice_pytorchs_error(gen, dtype):
    q, k, v = (
        randn(gen, 2, 7, 16) * 4,
        randn(gen, 2, 13, 16) * 4,
        randn(gen, 2, 13, 8),
    )
    golden = F.scaled_dot_product_attention(q, k, v)
    ql, kl, vl = (x.to(dtype) for x in (q, k, v))
    parts = [block_attention(ql, kl[:, a:b], vl[:, a:b]) for a, b in ((0, 6), (6, 13))]
    out, lse = merge_partials(*parts[0], *parts[1])
    assert out.dtype == lse.dtype == torch.float32  # merged before rounding
    ours = (out.to(dtype).double() - golden).abs().max()
    theirs = (F.scaled_dot_product_attention(ql, kl, vl).double() - golden).abs().max()
    assert ours <= 2 * theirs + 1e-3


def test_merging_an_empty_partial_changes_nothing(gen):
    out, lse = randn(gen, 4, 3), randn(gen, 4)
    empty = (torch.zeros(4, 3, dtype=torch.float64), torch.full((4,), -float("inf")))
    merged, merged_lse = merge_partials(out, lse, *empty)
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)
    both_empty, both_lse = merge_partials(*empty, *empty)
    assert both_empty.eq(0).all() and torch.isneginf(both_lse).all()


def test_block_and_merge_errors_are_named(gen):
    q = randn(gen, 2, 7, 5)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor"):
        block_attention(q, q, q, mask=torch.ones(7, 7))
    with pytest.raises(ValueError, match=r"the two partials must have the same shapes"):
        merge_partials(q, q[..., 0], q[:, :3], q[:, :3, 0])
    with pytest.raises(ValueError, match=r"lse_a must have the shape of out_a"):
        merge_partials(q, q, q, q)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shard_then_unshard_gives_the_sequence_back(layout, world_size):
    x = torch.arange(2 * 24 * 3).view(2, 24, 3)
    shards = [
        shard_sequence(x, r, world_size, layout=layout) for r in range(world_size)
    ]
    assert all(s.shape == (2, 24 // world_size, 3) for s in shards)
    assert torch.equal(unshard_sequence(shards, layout=layout), x)
    shards[0].zero_()
    assert x[0, 1].ne(0).any()  # shards are new tensors, not views of x


def test_zigzag_gives_each_rank_an_early_and_a_late_chunk():
    x = torch.arange(8.0).view(8, 1)
    got = [
        shard_sequence(x, r, 2, layout="zigzag").flatten().tolist() for r in range(2)
    ]
    assert got == [[0.0, 1.0, 6.0, 7.0], [2.0, 3.0, 4.0, 5.0]]


def test_shard_errors_are_named():
    x = torch.zeros(2, 10, 3)
    with pytest.raises(ValueError, match=r"length \(dim -2\) must be divisible by 8"):
        shard_sequence(x, 0, 4, layout="zigzag")
    with pytest.raises(ValueError, match=r"rank must be below world_size=2; got 2"):
        shard_sequence(x, 2, 2)
    with pytest.raises(ValueError, match=r"shards must all have the same shape"):
        unshard_sequence([x, x[:, :4]])


@pytest.mark.parametrize("causal,layout", CASES + [(False, "zigzag")])
def test_schedule_scores_every_allowed_pair_exactly_once(causal, layout):
    grid = ring_schedule(4, is_causal=causal, layout=layout, shard_len=4)
    scored = (grid >= 0).sum(axis=0)  # (L, L): how often each pair is scored
    expected = np.tril(np.ones((16, 16))) if causal else np.ones((16, 16))
    np.testing.assert_array_equal(scored, expected)
    owner = grid.max(axis=0)  # the rank that scored each pair
    rows = np.array([shard_sequence(torch.arange(16.0)[:, None], r, 4, layout=layout)
                     .flatten().int().tolist() for r in range(4)])  # fmt: skip
    for rank in range(4):
        assert (owner[rows[rank]][expected[rows[rank]] > 0] == rank).all()


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    work = {
        layout: [
            (ring_schedule(4, is_causal=True, layout=layout) == r).sum()
            for r in range(4)
        ]
        for layout in ("contiguous", "zigzag")
    }
    assert work["contiguous"] == [10, 26, 42, 58]
    assert len(set(work["zigzag"])) == 1
    assert sum(work["zigzag"]) == sum(work["contiguous"])


def test_ring_attention_refuses_to_run_without_a_process_group(gen):
    q = randn(gen, 4, 3)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"process group must be initialised"):
        ring_attention(q, q, q)
    with pytest.raises(
        ValueError, match=r"layout must be one of 'contiguous', 'zigzag'"
    ):
        ring_attention(q, q, q, layout="striped")
    with pytest.raises(ValueError, match=r"world_size must be a positive int; got 0"):
        run_on_ranks(ring_attention_on_rank, 0)


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("rank one fails on purpose")
    return dist.get_rank()


# ------------------------------------------------------------- P processes


def _full(seed: int, t: int, s: int):
    """The whole problem: q, k, v and a gradient for the output, float64."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(t, D), (s, D), (s, DV), (t, DV)]
    return [randn(gen, *LEAD, *shape) for shape in shapes]


def _group_rings(q, k, v):
    """Split the world into rings of two (or one) ranks and attend within each."""
    rank, size = dist.get_rank(), dist.get_world_size()
    width = 2 if size > 2 else 1
    groups = [dist.new_group(list(range(a, a + width))) for a in range(0, size, width)]
    group = groups[rank // width]
    member = dist.get_rank(group)
    shards = [shard_sequence(x, member, width) for x in (q, k, v)]
    return ring_attention(*shards, is_causal=True, group=group)


def _errors():
    """Bad inputs on some ranks: every rank must raise the same error, none hang."""
    rank = dist.get_rank()
    x = torch.zeros(1, 4, 3, dtype=torch.float64)
    calls = {
        "lengths": lambda: ring_attention(
            x[:, : 2 + rank], x[:, : 2 + rank], x[:, : 2 + rank]
        ),
        "causal": lambda: ring_attention(x, x[:, :3], x[:, :3], is_causal=True),
        "zigzag": lambda: ring_attention(x[:, :3], x[:, :3], x[:, :3], layout="zigzag"),
        "one rank": lambda: ring_attention(x, x if rank != 1 else x[..., :2], x),
        "dtype": lambda: ring_attention(x if rank != 1 else x.long(), x, x),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = "no error"
        except (TypeError, ValueError) as error:
            messages[name] = f"{type(error).__name__}: {error}"
    return messages


def _worker(cross, square):
    """Everything the multi-process tests check, in one group of processes."""
    results = {
        "cross": ring_attention_on_rank(*cross, is_causal=False, layout="contiguous")
    }
    for causal, layout in CASES:
        results[causal, layout] = ring_attention_on_rank(
            *square, is_causal=causal, layout=layout
        )
    results["group"] = _group_rings(*square[:3])
    results["errors"] = _errors()
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"P{p}")
def ranks(request):
    """Run :func:`_worker` once on P gloo processes; return P, inputs, results."""
    size = request.param
    cross = _full(1, 7 * size, 13 * size)  # non-causal: T != S, odd shard lengths
    square = _full(2, 24, 24)  # causal: T == S, divisible by 2P for zigzag
    return (
        size,
        {"cross": cross, "square": square},
        run_on_ranks(_worker, size, cross, square),
    )


def _expected(q, k, v, grad_out, causal):
    """Full attention on one process, and its gradients, by autograd."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = attn_lib.attention(q, k, v, is_causal=causal, backend="math")
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("causal,layout", CASES)
def test_each_rank_holds_its_shard_of_full_attention_and_gradients(
    ranks, causal, layout
):
    size, inputs, results = ranks
    q, k, v, grad_out = inputs["square"]
    expected = _expected(q, k, v, grad_out, causal)
    for name, want in zip(("out", "grad_q", "grad_k", "grad_v"), expected, strict=True):
        got = unshard_sequence(
            [r[causal, layout][name] for r in results], layout=layout
        )
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # T == S here
    outs = unshard_sequence([r[causal, layout]["out"] for r in results], layout=layout)
    torch.testing.assert_close(outs, sdpa)


def test_cross_attention_with_unequal_shards_matches(ranks):
    size, inputs, results = ranks
    q, k, v, grad_out = inputs["cross"]
    expected = _expected(q, k, v, grad_out, False)
    assert results[0]["cross"]["out"].shape == (*LEAD, 7, DV)
    for name, want in zip(("out", "grad_q", "grad_k", "grad_v"), expected, strict=True):
        got = torch.cat([r["cross"][name] for r in results], dim=-2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    want, _ = reference.scaled_dot_product_attention(q.numpy(), k.numpy(), v.numpy())
    got = torch.cat([r["cross"]["out"] for r in results], dim=-2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_traffic_per_rank_is_what_the_ring_sends(ranks):
    size, _, results = ranks
    kv_bytes = np.prod(LEAD) * (24 // size) * (D + DV) * 8  # one key/value block
    for r in results:
        stats = r[True, "zigzag"]["stats"]
        assert isinstance(stats, RingStats)
        assert stats.forward_bytes_sent == (size - 1) * kv_bytes
        assert stats.backward_bytes_sent == (size - 1) * kv_bytes + size * kv_bytes
        assert (
            stats.bytes_received == stats.forward_bytes_sent + stats.backward_bytes_sent
        )


def test_causal_work_is_unbalanced_contiguous_and_balanced_zigzag(ranks):
    size, _, results = ranks
    n = 24 // size
    contiguous = [r[True, "contiguous"]["stats"] for r in results]
    assert [s.blocks_skipped for s in contiguous] == [size - 1 - r for r in range(size)]
    assert [s.scores_computed for s in contiguous] == [
        np.prod(LEAD) * (r + 1) * n * n for r in range(size)
    ]
    zigzag = [r[True, "zigzag"]["stats"].scores_computed for r in results]
    assert len(set(zigzag)) == 1 and max(zigzag) < contiguous[-1].scores_computed


def test_rings_over_subgroups_attend_within_their_group(ranks):
    size, inputs, results = ranks
    q, k, v, _ = inputs["square"]
    want = attn_lib.attention(q, k, v, is_causal=True)
    width = 2 if size > 2 else 1
    for start in range(0, size, width):
        got = torch.cat(
            [results[r]["group"] for r in range(start, start + width)], dim=-2
        )
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_the_same_error_on_every_rank(ranks):
    size, _, results = ranks
    expected = {
        "lengths": r"ValueError: the q, k and v shards must have the same shapes on "
        r"every rank; got rank 0: q \(1, 2, 3\), k \(1, 2, 3\), v \(1, 2, 3\); rank 1: q \(1, 3, 3\)",
        "causal": r"ValueError: q and k shards must have the same length when "
        r"is_causal=True \(globally T == S\); got T_local=4, S_local=3 \(on rank 0\)",
        "zigzag": r"ValueError: the shard length must be even for layout='zigzag'; "
        r"got 3 \(on rank 0\)",
        "one rank": r"ValueError: q and k must have the same last dim D; got q "
        r"\(1, 4, 3\) and k \(1, 4, 2\) \(on rank 1\)",
        "dtype": r"TypeError: q must be a floating-point tensor; got torch.int64 \(on rank 1\)",
    }
    for r in results:
        for name, pattern in expected.items():
            assert re.match(pattern, r["errors"][name]), (name, r["errors"][name])


def test_an_error_on_one_rank_reaches_the_caller():
    with pytest.raises(
        RuntimeError,
        match=r"every rank must finish without an error; got .*"
        r"rank 1: ValueError: rank one fails on purpose",
    ):
        run_on_ranks(_raise_on_rank_one, 2, timeout_s=20.0)

"""attn_lib.costs: FLOP and memory formulas, the timer and the memory meter."""

import sys

import pytest
import torch

import attn_lib
from attn_lib import costs


@pytest.mark.parametrize("t,s", [(4, 4), (7, 13), (13, 7), (1, 9)])
def test_allowed_pairs_counts_the_causal_mask(t, s):
    mask = attn_lib.causal_mask(t, s)
    assert costs.allowed_pairs(t, s, causal=True) == int(mask.sum())
    assert costs.allowed_pairs(t, s) == t * s


def test_attention_flops_counts_two_matmuls():
    # q k^T: T*S dot products of length D; weights @ v: T*S products per Dv.
    assert costs.attention_flops(2, 3, 7, 13, 5, 11) == 2 * 2 * 3 * 7 * 13 * (5 + 11)
    full = costs.attention_flops(1, 1, 8, 8, 4)
    assert costs.attention_flops(1, 1, 8, 8, 4, causal=True) == full * 36 // 64


def test_linear_flops_matches_a_matmul_count():
    assert costs.linear_flops(7, 5, 3) == 2 * 7 * 5 * 3


def test_byte_formulas_match_real_tensors():
    scores = torch.empty(2, 3, 7, 13, dtype=torch.float16)
    assert costs.score_bytes(2, 3, 7, 13, torch.float16) == scores.nbytes
    k = torch.empty(2, 1, 13, 5)
    assert costs.kv_cache_bytes(2, 1, 13, 5, layers=3) == 3 * 2 * k.nbytes


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: costs.allowed_pairs(0), "t must"),
        (lambda: costs.attention_flops(1, 1, 2, 2, 0), "d must"),
        (lambda: costs.score_bytes(1, 1, 2, -1), "s must"),
        (lambda: costs.kv_cache_bytes(1, 0, 2, 2), "kv_heads must"),
        (lambda: costs.time_calls({}, repeats=0), "repeats must"),
    ],
)
def test_bad_sizes_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_time_calls_interleaves_rounds_and_skips_warmup():
    order = []
    times = costs.time_calls(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")},
        repeats=3,
        warmup=1,
    )
    assert order == ["a", "b"] * 4
    assert [len(v) for v in times.values()] == [3, 3]
    assert all(t >= 0 for v in times.values() for t in v)


def test_median_ratio_is_taken_round_by_round():
    times = {"x": [2.0, 9.0, 4.0], "y": [1.0, 3.0, 4.0]}
    assert costs.median_ratio(times, "x", "y") == 2.0


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the meter reads Linux /proc"
)
def test_peak_memory_increase_sees_a_large_temporary():
    n = 64 * 2**20  # bytes: far above allocator reuse and page granularity
    grown = costs.peak_memory_increase(lambda: torch.ones(n // 4).sum())
    if grown is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert 0.9 * n <= grown <= 1.5 * n
    small = costs.peak_memory_increase(lambda: torch.ones(4).sum())
    assert small < n / 8


def test_time_calls_uses_the_given_clock():
    ticks = iter(range(100))
    times = costs.time_calls(
        {"a": lambda: None}, repeats=2, warmup=0, clock=lambda: next(ticks)
    )
    assert times == {"a": [1, 1]}

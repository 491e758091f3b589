"""What attention costs: FLOP and memory formulas, and two honest meters.

The formulas use the book's legend: ``B`` batch, ``H`` heads, ``T`` queries,
``S`` keys, ``D`` head dim, ``E = H*D`` model width. A multiply-add counts as
two FLOPs. The meters measure wall-clock time (median over interleaved
rounds) and the growth of this process's resident memory during one call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

import torch

from . import _checks


def allowed_pairs(t: int, s: int | None = None, *, causal: bool = False) -> int:
    """How many (query, key) pairs may attend: ``T*S``, fewer under a causal mask.

    The causal mask is aligned bottom-right (query ``i`` sees key ``j`` iff
    ``j <= i + S - T``), as in :func:`attn_lib.causal_mask`; with ``T == S``
    that is ``T*(T+1)/2``, a little over half.

    Example:
        >>> allowed_pairs(4), allowed_pairs(4, causal=True), allowed_pairs(2, 3, causal=True)
        (16, 10, 5)
    """
    _checks.positive_int(t, "t")
    s = t if s is None else _checks.positive_int(s, "s")
    if not causal:
        return t * s
    return sum(max(0, min(s, i + s - t + 1)) for i in range(t))


def attention_flops(
    b: int,
    h: int,
    t: int,
    s: int,
    d: int,
    dv: int | None = None,
    *,
    causal: bool = False,
) -> int:
    r"""Matmul FLOPs of the core :math:`\mathrm{softmax}(q k^\top / \sqrt{D})\, v`.

    .. math:: 2 B H\,P\,(D + D_v), \qquad P = T S \text{ (or the causal pairs)}

    ``q k^T`` costs ``2*D`` per pair and ``weights @ v`` ``2*Dv`` per pair. The
    softmax adds a few operations per pair, not counted here.

    Args:
        b, h, t, s, d: batch, heads, queries, keys, head dim.
        dv: value dim; defaults to ``d``.
        causal: count only the pairs a causal mask allows, which is what a
            kernel that skips masked pairs computes. A plain implementation
            that masks after computing every score does ``causal=False`` work.

    Example:
        >>> attention_flops(1, 1, 2, 3, 4)
        96
    """
    for value, name in ((b, "b"), (h, "h"), (d, "d")):
        _checks.positive_int(value, name)
    dv = d if dv is None else _checks.positive_int(dv, "dv")
    return 2 * b * h * allowed_pairs(t, s, causal=causal) * (d + dv)


def linear_flops(n: int, in_features: int, out_features: int) -> int:
    """FLOPs of ``nn.Linear(in_features, out_features)`` on ``n`` tokens, bias ignored.

    Example:
        >>> linear_flops(3, 4, 5)
        120
    """
    for value, name in ((n, "n"), (in_features, "in_features")):
        _checks.positive_int(value, name)
    return 2 * n * in_features * _checks.positive_int(out_features, "out_features")


def score_bytes(
    b: int, h: int, t: int, s: int, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of one score (or weight) tensor ``(B, H, T, S)`` in ``dtype``.

    A plain implementation holds at least one such tensor at a time; a fused
    kernel (flash attention) never forms it.

    Example:
        >>> score_bytes(2, 4, 8, 16)
        4096
    """
    for value, name in ((b, "b"), (h, "h"), (t, "t"), (s, "s")):
        _checks.positive_int(value, name)
    return b * h * t * s * torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(
    b: int,
    kv_heads: int,
    s: int,
    d: int,
    dtype: torch.dtype = torch.float32,
    *,
    layers: int = 1,
) -> int:
    """Bytes of a KV cache: keys and values ``(B, H_kv, S, D)`` for each layer.

    ``kv_heads`` is ``H`` for multi-head attention, fewer for grouped-query
    attention, and 1 for multi-query attention.

    Example:
        >>> kv_cache_bytes(1, 2, 10, 4)
        640
    """
    for value, name in ((b, "b"), (kv_heads, "kv_heads"), (s, "s"), (d, "d")):
        _checks.positive_int(value, name)
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * b * kv_heads * s * d * size


def time_calls(
    calls: Mapping[Hashable, Callable[[], object]],
    *,
    repeats: int = 7,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[Hashable, list[float]]:
    """Seconds taken by each call, measured in interleaved rounds.

    Each round runs every call once, in order, timed with ``clock``.
    Interleaving means a burst of load from other processes slows every call
    of a round alike, so ratios taken round by round (then their median) stay
    steady on a busy machine.

    Args:
        calls: name -> a function of no arguments.
        repeats: number of timed rounds.
        warmup: untimed rounds first (allocations, thread start-up).
        clock: ``time.perf_counter`` (wall clock, the default) or
            ``time.process_time`` (CPU time of this process: time spent
            waiting for a core shared with other programs is not counted,
            which suits a one-thread run on a busy machine).

    Returns:
        name -> the ``repeats`` times in seconds, round by round.
    """
    _checks.positive_int(repeats, "repeats")
    _checks.nonneg_int(warmup, "warmup")
    times: dict[Hashable, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            start = clock()
            call()
            if round_ >= warmup:
                times[name].append(clock() - start)
    return times


def median_ratio(
    times: Mapping[Hashable, list[float]], top: Hashable, bottom: Hashable
) -> float:
    """Median over rounds of ``times[top][i] / times[bottom][i]``."""
    pairs = zip(times[top], times[bottom], strict=True)
    return statistics.median(a / b for a, b in pairs)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    return int(match.group(1))


def _release_free_memory() -> None:
    """Hand memory that malloc keeps after ``free`` back to the kernel (glibc only)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_memory_increase(call: Callable[[], object]) -> int | None:
    """Bytes by which this process's peak resident memory rose during ``call()``.

    The Linux kernel keeps a high-water mark of resident memory (``VmHWM``);
    writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
    resident size. So: return freed memory to the kernel (glibc's
    ``malloc_trim``, so that the call cannot silently reuse pages that are
    already resident), reset the mark, note the resident size, call, read
    the mark.

    Returns:
        The increase in bytes, or ``None`` where ``/proc`` cannot do this
        (macOS, Windows, some containers).

    Limitations:
        It measures pages the process touched, at 4 KiB granularity, so it
        counts every temporary (not just the score matrix), and memory an
        allocator other than glibc's keeps for reuse can hide. Use it for
        tensors of a few MiB or more.
    """
    try:
        _release_free_memory()
        _CLEAR_REFS.write_text("5")
        before = _status_kib("VmRSS")
    except (OSError, AttributeError):
        return None
    call()
    return max(0, _status_kib("VmHWM") - before) * 1024

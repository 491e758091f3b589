"""``python -m attn_lib.bench``: time and peak memory of each attention path.

Time: the cases at one length (every backend, plain and causal) are timed in
one fresh Python process on the same inputs. Each runs once to warm up, then
they take turns, ``repeats`` rounds, and each keeps the median of its times;
a shared machine's drift thus reaches every case alike, and ``vs_sdpa`` is a
ratio of times taken side by side.

Peak memory: each case in a fresh process of its own (so that one case's
freed memory cannot hide the next one's peak), one warm-up call, then one
measured call:

* CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was
  allocated before the call.
* CPU (Linux): the process's peak resident memory ``VmHWM``, reset by writing
  ``5`` to ``/proc/self/clear_refs`` just before the call, minus ``VmRSS``
  then. That process's glibc ``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB, so that freed tensors go
  back to the system instead of being reused unseen; the timings run in a
  process with the allocator's defaults, which that setting would slow.
  ``tracemalloc`` is not used: it does not see PyTorch's allocations.
* Elsewhere: not measured (``None``), never guessed.

Throughput counts ``4 B H D`` floating-point operations per (query, key)
pair that may attend (two matmuls), so a causal case does about half the
work of a full one. ``vs_sdpa`` is a case's throughput over SDPA's with the
same causality, at the same length, in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("naive", "math", "sdpa", "chunked", "triton")
MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated minus allocated before the call",
    "cpu": "peak RSS (VmHWM after /proc/self/clear_refs) minus RSS before the "
    "call, in its own fresh process with MALLOC_MMAP_THRESHOLD_=65536",
}
IN_PROCESS_CPU = (
    "peak RSS (VmHWM after /proc/self/clear_refs) minus RSS before the call, "
    "in the benchmarking process itself, after other cases: a lower bound"
)


def _naive(q, k, v, causal):
    """Attention in plain torch ops: the full (T, S) scores, then softmax."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, H, T, S)
    if causal:
        t, s = scores.shape[-2:]
        keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, T, Dv)


def _case_fn(backend: str, causal: bool, block_size: Any) -> Callable[..., Any]:
    """The function one case times: ``fn(q, k, v)``."""
    import attn_lib

    if isinstance(block_size, list):  # a (rows, cols) pair after a JSON trip
        block_size = tuple(block_size)

    if backend == "naive":
        return lambda q, k, v: _naive(q, k, v, causal)
    if backend == "sdpa":  # PyTorch's own kernel: T == S, so top-left causal is right
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if backend == "chunked":
        return lambda q, k, v: attn_lib.chunked_attention(
            q, k, v, is_causal=causal, block_size=block_size
        )
    return lambda q, k, v: attn_lib.attention(
        q, k, v, is_causal=causal, backend=backend
    )


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1])


def _peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Extra peak memory of one call of ``fn`` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size
        before = _rss_kib("VmRSS")
        fn()
        return max(0, _rss_kib("VmHWM") - before) * 1024  # memory freed: 0 extra
    except OSError:
        return None


def _inputs(spec: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The case's q, k and v, the same for every case of one shape."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    b, h, n, d = spec["batch"], spec["heads"], spec["length"], spec["dim"]
    gen = torch.Generator().manual_seed(0)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    return tuple(
        torch.randn(b, h, n, d, generator=gen).to(device, dtype) for _ in "qkv"
    )


def _failed(spec: dict[str, Any], err: Exception) -> dict[str, Any]:
    return {**spec, "error": [f"{type(err).__name__}: {err}"]}


def time_cases(specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Time cases of one input shape in this process, taking turns.

    Every case runs once to warm up; then each round times every case once,
    ``repeats`` rounds in all, and each case keeps the median of its times.
    Taking turns means that a shared machine's drift (other loads, clock
    changes) reaches every case alike, so ratios between them are fair. A
    case that raises is reported with an ``error`` and leaves the rounds.
    """
    q, k, v = _inputs(specs[0])
    cuda = q.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results, fns = [dict(s) for s in specs], {}
    for i, spec in enumerate(specs):
        try:
            fn = _case_fn(spec["backend"], spec["causal"], spec["block_size"])
            fn(q, k, v)  # warm up
            fns[i] = fn
        except Exception as err:  # e.g. out of memory: the table says so
            results[i] = _failed(spec, err)
    times: dict[int, list[float]] = {i: [] for i in fns}
    for _ in range(specs[0]["repeats"]):
        for i, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn(q, k, v)
            sync()
            times[i].append(time.perf_counter() - start)
    for i, spent in times.items():
        spec, seconds = specs[i], statistics.median(spent)
        n = spec["length"]
        pairs = n * (n + 1) // 2 if spec["causal"] else n * n
        flops = 4 * spec["batch"] * spec["heads"] * spec["dim"] * pairs
        results[i] |= {"time_ms": seconds * 1e3, "gflops": flops / seconds / 1e9}
    return results


def peak_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """One case's extra peak memory in this process, after one warm-up call."""
    q, k, v = _inputs(spec)
    fn = _case_fn(spec["backend"], spec["causal"], spec["block_size"])
    fn(q, k, v)
    return {**spec, "peak_bytes": _peak_extra_bytes(lambda: fn(q, k, v), q.device)}


def _worker(job: dict[str, Any], env: dict[str, str]) -> Any:
    """One job (``time`` or ``peak``) in a fresh Python process with environment ``env``.

    Returns what the job returns, or the last line of its error output.
    """
    cmd = [sys.executable, "-m", "attn_lib.bench", "--worker", json.dumps(job)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _do(job: dict[str, Any]) -> Any:
    """What a worker runs."""
    if job["job"] == "time":
        return time_cases(job["specs"])
    try:
        return peak_memory(job["spec"])
    except Exception as err:
        return _failed(job["spec"], err)


def _time_isolated(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`time_cases` in a fresh process; a crash fails every case."""
    out = _worker({"job": "time", "specs": specs}, dict(os.environ))
    if isinstance(out, list) and all(isinstance(r, dict) for r in out):
        return out
    return [{**s, "error": out} for s in specs]


def _peak_isolated(spec: dict[str, Any]) -> int | None:
    """:func:`peak_memory` in a fresh process (on the CPU with a small mmap threshold)."""
    env = dict(os.environ)
    if spec["device"] == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = _worker({"job": "peak", "spec": spec}, env)
    return out.get("peak_bytes") if isinstance(out, dict) else None


def device_name(device: torch.device, threads: int | None = None) -> str:
    """A readable name for the hardware: the GPU's, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(x for x in f if x.startswith("model name"))
        name = model.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    n = threads or torch.get_num_threads()
    return f"{name} ({n} thread{'s' if n != 1 else ''})"


def _cases(backends: Sequence[str], device: torch.device) -> list[tuple[str, bool]]:
    """(backend, causal) pairs; SDPA runs both ways as the yardstick."""
    from .triton_kernel import check_runnable

    cases = []
    for backend in backends:
        if backend == "triton" and check_runnable(torch.empty(0, device=device), None):
            continue  # not runnable here (no CUDA or no triton): skipped, not faked
        cases.append((backend, False))
        if backend in ("sdpa", "chunked", "triton"):
            cases.append((backend, True))
    return cases


def run(
    lengths: Sequence[int] = (256, 512, 1024),
    *,
    batch: int = 1,
    heads: int = 8,
    dim: int = 64,
    dtype: str = "float32",
    backends: Sequence[str] = BACKENDS,
    device: str | None = None,
    repeats: int = 3,
    block_size: int | tuple[int, int] | None = None,
    threads: int | None = None,
    isolate: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark every (backend, causal) case at every length (see the module docs).

    Args:
        lengths: sequence lengths ``T = S`` to try.
        batch, heads, dim: ``B``, ``H`` and ``D`` of q, k and v.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        backends: any of ``BACKENDS``; ``"triton"`` is skipped where it cannot run.
        device: defaults to :func:`attn_lib.get_device`.
        repeats: timed calls per case (the median is kept).
        block_size: the tiles of ``"chunked"``, as its ``block_size``;
            ``None`` (reported as ``null``) keeps its default for the shape.
        threads: CPU threads per case (default: PyTorch's choice). On a busy
            shared machine one thread gives steadier numbers.
        isolate: time each length, and measure each case's memory, in fresh
            processes (about 2 s each). ``False`` runs everything here,
            faster, but memory freed by one case can then hide part of the
            next one's peak (the report says so).
        progress: show a tqdm progress bar.

    Returns:
        The report, a dict with ``device``, ``date``, ``torch``, ``memory_method`` and
        ``results``, one dict per case with ``time_ms``, ``gflops``,
        ``peak_bytes`` and ``vs_sdpa``. Cases that failed (for example, out
        of memory) carry an ``error`` instead.

    Example:
        >>> report = run([64], backends=("sdpa", "chunked"), repeats=1, progress=False)
        >>> sorted({r["backend"] for r in report["results"]})
        ['chunked', 'sdpa']
    """
    from tqdm import tqdm

    from .devices import get_device

    dev = torch.device(device) if device else get_device()
    base = {"batch": batch, "heads": heads, "dim": dim, "dtype": dtype}
    base |= {"device": str(dev), "repeats": repeats, "block_size": block_size}
    base |= {"threads": threads}
    specs = [
        {**base, "backend": b, "causal": c, "length": n}
        for n in lengths
        for b, c in _cases(backends, dev)
    ]
    timer = _time_isolated if isolate else time_cases
    peak = _peak_isolated if isolate else _peak_here
    results = []
    with tqdm(total=len(specs), disable=not progress) as bar:
        for n in lengths:
            for r in timer([s for s in specs if s["length"] == n]):
                if "error" not in r:
                    r["peak_bytes"] = peak(r)
                results.append(r)
                bar.update()
    _add_ratios(results)
    method = MEMORY_METHOD.get(dev.type, "not measured on this device")
    if not isolate and dev.type == "cpu":
        method = IN_PROCESS_CPU
    return {
        "device": device_name(dev, threads),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "memory_method": method,
        "results": results,
    }


def _peak_here(spec: dict[str, Any]) -> int | None:
    try:
        return peak_memory(spec)["peak_bytes"]
    except Exception:  # measured where it can be; the time still counts
        return None


def _add_ratios(results: list[dict[str, Any]]) -> None:
    """``vs_sdpa``: throughput over SDPA's with the same length and causality."""
    sdpa = {
        (r["length"], r["causal"]): r["gflops"]
        for r in results
        if r["backend"] == "sdpa" and "gflops" in r
    }
    for r in results:
        ref = sdpa.get((r["length"], r["causal"]))
        r["vs_sdpa"] = r["gflops"] / ref if ref and "gflops" in r else None


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table."""
    head = f"{'backend':<9}{'causal':>7}{'T=S':>7}{'ms':>10}{'GFLOP/s':>9}"
    head += f"{'peak MiB':>10}{'vs sdpa':>9}"
    lines = [f"# {report['device']}, torch {report['torch']}, {report['date']}", head]
    for r in report["results"]:
        row = f"{r['backend']:<9}{'yes' if r['causal'] else 'no':>7}{r['length']:>7}"
        if "error" in r:
            lines.append(row + f"  failed: {' '.join(r['error'])}")
            continue
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        ratio = "n/a" if r["vs_sdpa"] is None else f"{r['vs_sdpa']:.2f}x"
        lines.append(
            row + f"{r['time_ms']:>10.1f}{r['gflops']:>9.1f}{peak:>10}{ratio:>9}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the benchmark, print the table, write the JSON report."""
    p = argparse.ArgumentParser(prog="python -m attn_lib.bench", description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"]
    )
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--block-size", type=int, nargs="+", default=None, metavar="N",
        help="chunked tiles: one int, or query rows and key columns",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default="bench.json", help="report path")
    p.add_argument(
        "--in-process", action="store_true", help="faster, memory less exact"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one job, for run()
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_do(json.loads(args.worker))))
        return 0

    block = args.block_size
    if block is not None and len(block) > 2:
        p.error("--block-size takes one int, or two: query rows and key columns")
    for name in ("lengths", "block_size"):
        if any(x <= 0 for x in getattr(args, name) or ()):
            p.error(f"--{name.replace('_', '-')} must be positive ints")
    if args.repeats <= 0:
        p.error("--repeats must be a positive int")
    if block is not None:
        block = block[0] if len(block) == 1 else tuple(block)
    report = run(
        args.lengths, batch=args.batch, heads=args.heads, dim=args.dim,
        dtype=args.dtype, backends=args.backends, device=args.device,
        repeats=args.repeats, block_size=block, threads=args.threads,
        isolate=not args.in_process, progress=not args.no_progress,
    )  # fmt: skip
    print(format_table(report))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

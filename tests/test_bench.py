"""attn_lib.bench at tiny sizes: the report's shape, the table, the JSON, honesty."""

import json

import pytest
import torch

from attn_lib import bench

SPEC = {"batch": 1, "heads": 2, "length": 16, "dim": 8, "dtype": "float32"}
SPEC |= {"device": "cpu", "repeats": 2, "block_size": 4}


def test_time_one_case_in_process():
    (result,) = bench.time_cases([{**SPEC, "backend": "chunked", "causal": True}])
    assert result["time_ms"] > 0 and result["gflops"] > 0
    # 4 B H D flops per allowed (query, key) pair: 16 * 17 / 2 pairs when causal
    expected = 4 * 1 * 2 * 8 * 136 / (result["time_ms"] / 1e3) / 1e9
    assert result["gflops"] == pytest.approx(expected)
    peak = bench.peak_memory({**SPEC, "backend": "chunked", "causal": True})
    assert peak["peak_bytes"] is None or peak["peak_bytes"] >= 0


def test_cases_take_turns_after_one_warm_up_each(monkeypatch):
    calls = []

    def fake_case(backend, causal, block_size):
        return lambda q, k, v: calls.append(backend)

    monkeypatch.setattr(bench, "_case_fn", fake_case)
    specs = [{**SPEC, "repeats": 3, "backend": b, "causal": False} for b in "ab"]
    results = bench.time_cases(specs)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert [r["backend"] for r in results] == ["a", "b"]


def test_a_failing_case_leaves_the_others_timed():
    specs = [
        {**SPEC, "backend": "sdpa", "causal": False},
        {**SPEC, "backend": "chunked", "causal": False, "block_size": 0},
    ]
    sdpa, chunked = bench.time_cases(specs)
    assert sdpa["time_ms"] > 0 and "error" not in sdpa
    assert "time_ms" not in chunked
    assert chunked["error"][0].startswith("ValueError: block_size must be")


def test_naive_matches_sdpa_both_ways():
    q, k, v = (
        torch.randn(1, 2, 9, 4, generator=torch.Generator().manual_seed(i))
        for i in range(3)
    )
    for causal in (False, True):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal
        )
        torch.testing.assert_close(bench._naive(q, k, v, causal), expected)


def test_peak_memory_sees_a_large_allocation():
    size = 64 * 2**20  # 64 MiB, written so that its pages are resident
    peak = bench._peak_extra_bytes(lambda: torch.ones(size // 4), torch.device("cpu"))
    if peak is None:
        pytest.skip("peak resident memory is not readable on this system")
    assert size * 0.9 < peak < size * 1.5


def test_run_ratios_table_and_main_json(tmp_path, capsys):
    report = bench.run(
        [16],
        heads=2,
        dim=8,
        backends=("sdpa", "chunked", "naive"),
        repeats=1,
        block_size=8,
        isolate=False,
        progress=False,
    )
    assert report["device"] and report["date"]
    assert report["memory_method"].endswith(
        "in the benchmarking process itself, after other cases: a lower bound"
    )
    assert "fresh process" not in report["memory_method"]
    cases = {(r["backend"], r["causal"]) for r in report["results"]}
    assert cases == {
        ("sdpa", False),
        ("sdpa", True),
        ("chunked", False),
        ("chunked", True),
        ("naive", False),
    }
    for r in report["results"]:
        assert "error" not in r, r
        if r["backend"] == "sdpa":
            assert r["vs_sdpa"] == pytest.approx(1.0)
    table = bench.format_table(report)
    assert "vs sdpa" in table and "chunked" in table and report["device"] in table

    out = tmp_path / "r.json"
    assert (
        bench.main(
            [
                "--lengths",
                "16",
                "--heads",
                "1",
                "--dim",
                "8",
                "--backends",
                "sdpa",
                "--repeats",
                "1",
                "--json",
                str(out),
                "--no-progress",
                "--in-process",
            ]
        )
        == 0
    )
    saved = json.loads(out.read_text())
    assert saved["results"][0]["backend"] == "sdpa" and "date" in saved
    assert "GFLOP/s" in capsys.readouterr().out


def test_triton_is_skipped_not_faked_where_it_cannot_run():
    cases = bench._cases(("sdpa", "triton"), torch.device("cpu"))
    from attn_lib import triton_kernel

    runnable = not triton_kernel.check_runnable(torch.empty(0), None)
    assert (("triton", False) in cases) == runnable


def test_failed_case_is_reported_not_hidden():
    spec = {
        "batch": 1,
        "heads": 1,
        "length": 8,
        "dim": 4,
        "dtype": "float32",
        "device": "cpu",
    }
    spec |= {"repeats": 1, "block_size": 0, "backend": "chunked", "causal": False}
    (result,) = bench._time_isolated([spec])  # block_size 0 is refused in the worker
    assert (
        "error" in result and "block_size must be a positive int" in result["error"][0]
    )
    report = {"device": "x", "torch": "y", "date": "z", "results": [result]}
    assert (
        "failed: ValueError: block_size must be a positive int"
        in bench.format_table(report)
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--repeats", "0"], "--repeats must be a positive int"),
        (["--lengths", "16", "-5"], "--lengths must be positive ints"),
        (["--block-size", "4", "0"], "--block-size must be positive ints"),
        (["--block-size", "1", "2", "3"], "--block-size takes one int, or two"),
    ],
)
def test_command_line_refuses_bad_numbers_before_running(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_device_name_counts_threads_in_words():
    assert bench.device_name(torch.device("cpu"), 1).endswith("(1 thread)")
    assert bench.device_name(torch.device("cpu"), 2).endswith("(2 threads)")

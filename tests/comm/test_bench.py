"""`aiinfra bench comm`: rows, nccl-tests bus factors, the table, JSON and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aiinfra.cli import _parse_sizes, app
from aiinfra.comm.bench import BenchConfig, bus_factor, traffic_bytes


def test_bus_factors_are_nccl_tests() -> None:
    assert bus_factor("all_reduce", 4) == pytest.approx(2 * 3 / 4)
    assert bus_factor("all_gather", 4) == pytest.approx(3 / 4)
    assert bus_factor("reduce_scatter", 2) == pytest.approx(1 / 2)
    assert bus_factor("all_to_all", 3) == pytest.approx(2 / 3)
    assert bus_factor("broadcast", 8) == 1.0


def test_traffic_of_registered_two_shot_is_read_n_and_write_the_slices() -> None:
    n = 1 << 20
    # reduce reads n (p slices of n/p) and writes n/p; the gather copies (p-1) slices in and out
    assert traffic_bytes("all_reduce", "two_shot@shm", n, 2, registered=True) == n + n / 2 + n
    assert traffic_bytes("all_reduce", "ring@torch", n, 2, registered=False) is None


def test_traffic_of_cma_two_shot_is_three_and_a_half_n_at_world_2() -> None:
    n = 1 << 20
    # peer slice into scratch (n/2 read + n/2 written), reduce (n read, n/2 written), peer's
    # reduced slice into out (n/2 + n/2): no copy in, against 4.5 n through staging
    assert traffic_bytes("all_reduce", "cma_two_shot@shm", n, 2, registered=False) == 3.5 * n
    assert traffic_bytes("all_reduce", "two_shot@shm", n, 2, registered=False) == 4.5 * n


def test_sizes_parse_as_lists_and_power_of_two_ranges() -> None:
    assert _parse_sizes("8,1K,64M") == (8, 1024, 64 << 20)
    assert _parse_sizes("8:64") == (8, 16, 32, 64)
    assert _parse_sizes("8:256M")[-1] == 256 << 20 and len(_parse_sizes("8:256M")) == 26
    with pytest.raises(ValueError, match="sizes"):
        _parse_sizes("1X")


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"op \('all_sum'\)"):
        BenchConfig(op="all_sum")
    with pytest.raises(ValueError, match=r"repeats \(0\)"):
        BenchConfig(repeats=0)
    with pytest.raises(ValueError, match=r"block_warmup \(-1\)"):
        BenchConfig(block_warmup=-1)


def _count_block_calls(rank: int, world_size: int, out: str) -> None:
    from aiinfra.comm.bench import MAX_BLOCK_CALLS, time_interleaved

    calls = [0, 0]

    def fn(i: int) -> None:
        calls[i] += 1

    # iters above the cap: every block is exactly `iters` calls, whatever the first call cost
    iters = MAX_BLOCK_CALLS + 1
    time_interleaved([lambda: fn(0), lambda: fn(1)], 2, iters, 3, block_warmup=4)
    Path(out).write_text(json.dumps({"calls": calls, "iters": iters}))


@pytest.mark.distributed
def test_every_timed_block_follows_its_untimed_calls(tmp_path: Path) -> None:
    from aiinfra.comm.spawn import spawn_local

    out = tmp_path / "calls.json"
    spawn_local(_count_block_calls, 1, (str(out),), timeout_s=60)
    got = json.loads(out.read_text())
    # 2 up front, then 4 untimed calls before each of the 3 timed blocks
    assert got["calls"] == [2 + 3 * (4 + got["iters"])] * 2


@pytest.mark.distributed
def test_cli_runs_the_sweep_against_torch(tmp_path: Path) -> None:
    out, plot = tmp_path / "comm.json", tmp_path / "comm.png"
    args = [
        "bench",
        "comm",
        "--world-size",
        "2",
        "--sizes",
        "8,4K",
        "--impl",
        "torch,auto,ring@torch",
    ]
    args += ["--iters", "3", "--warmup", "1", "--tuning", str(tmp_path / "none.json")]
    result = CliRunner().invoke(app, [*args, "--json", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "vs torch" in result.output and "busbw" in result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["bytes"], r["impl"]) for r in rows] == [
        (size, impl) for size in (8, 4096) for impl in ("torch", "auto", "ring@torch")
    ]
    for r in rows:
        assert r["time_us"] > 0 and r["world_size"] == 2
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["time_us"] / 1e3)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * 2 * 1 / 2)
    assert rows[0]["algorithm"] == "torch" and rows[2]["algorithm"] == "ring@torch"
    assert plot.stat().st_size > 1000

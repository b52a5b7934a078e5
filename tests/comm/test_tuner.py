"""The cost model against the published formulas, the size-based choice, and the fit."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch.distributed as dist

from aiinfra.comm import CommConfig, CommGroup, LinkParams, algorithm_cost, choose_algorithm
from aiinfra.comm.tuner import (
    ALGORITHMS,
    CACHE_KNOTS,
    CALIBRATION_SIZES,
    CMA_BETA_FACTOR,
    CMA_CALL_BYTES,
    DEFAULT_PARAMS,
    REGISTERED_ONLY,
    SHM_ALGORITHMS,
    SHM_CHUNK_BYTES,
    TUNING_VERSION,
    Sample,
    _refit_without_outliers,
    algorithm_key,
    algorithm_params,
    calibrate,
    cost_terms,
    fit_algorithm_params,
    fit_link_params,
    load_params,
    save_params,
)
from tests.distributed import run_distributed

GLOO = LinkParams(alpha_s=100e-6, beta_s_per_byte=1e-9, gamma_s_per_byte=2e-10)


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_costs_match_the_published_formulas(p: int) -> None:
    a, b, g = GLOO.alpha_s, GLOO.beta_s_per_byte, GLOO.gamma_s_per_byte
    n = 3 << 20
    lg = math.log2(p)
    ring = 2 * (p - 1) * a + 2 * (p - 1) / p * n * b + (p - 1) / p * n * g
    doubling = lg * (a + n * b + n * g)
    rabenseifner = 2 * lg * a + 2 * (p - 1) / p * n * b + (p - 1) / p * n * g
    assert algorithm_cost("all_reduce", "ring", n, p, GLOO) == pytest.approx(ring)
    assert algorithm_cost("all_reduce", "recursive_doubling", n, p, GLOO) == pytest.approx(doubling)
    assert algorithm_cost("all_reduce", "rabenseifner", n, p, GLOO) == pytest.approx(rabenseifner)
    assert algorithm_cost("all_gather", "ring", n, p, GLOO) == pytest.approx(
        (p - 1) * a + (p - 1) / p * n * b
    )
    assert algorithm_cost("broadcast", "binomial_tree", n, p, GLOO) == pytest.approx(
        lg * (a + n * b)
    )


def test_every_algorithm_has_a_cost() -> None:
    for op in ALGORITHMS:
        for name in ALGORITHMS[op] + SHM_ALGORITHMS[op] + ("native",):
            for p in (1, 2, 3, 5, 8):
                assert algorithm_cost(op, name, 1 << 20, p, GLOO) >= 0
    with pytest.raises(ValueError, match="algorithm"):
        algorithm_cost("all_reduce", "pairwise", 8, 2, GLOO)


@pytest.mark.parametrize("p", [2, 3, 4, 8, 64])
def test_small_messages_pick_latency_bound_large_pick_bandwidth_bound(p: int) -> None:
    assert choose_algorithm("all_reduce", 8, p, GLOO) in (
        "recursive_doubling",
        "double_binary_tree",
    )
    assert choose_algorithm("all_reduce", 256 << 20, p, GLOO) in ("ring", "rabenseifner")
    if p >= 4:  # at 3 ranks folding costs two extra steps: the ring's 2 steps are cheaper
        assert choose_algorithm("all_gather", 8, p, GLOO) == "recursive_doubling"
    assert choose_algorithm("broadcast", 8, p, GLOO) == "binomial_tree"
    if p > 2:
        assert choose_algorithm("broadcast", 256 << 20, p, GLOO) == "scatter_allgather"
    assert choose_algorithm("all_reduce", 8, p, GLOO, ["ring"]) == "ring"


@pytest.mark.parametrize("p", [2, 4])
def test_shm_all_reduce_choice_follows_size(p: int) -> None:
    """One barrier for small messages; cma_two_shot (no gather copies, but a barrier per chunk
    and each process_vm_writev call costs as much as copying CMA_CALL_BYTES) only once the bytes
    dominate; on registered buffers push_two_shot (two barriers, no copy in)."""
    shm = DEFAULT_PARAMS["shm"]
    registered = list(SHM_ALGORITHMS["all_reduce"])
    assert choose_algorithm("all_reduce", 8, p, shm, registered) == "one_shot"
    assert choose_algorithm("all_reduce", 64 << 20, p, shm, registered) == "push_two_shot"
    direct = [a for a in registered if a not in REGISTERED_ONLY]  # ordinary tensors
    assert choose_algorithm("all_reduce", 8, p, shm, direct) == "one_shot"
    assert choose_algorithm("all_reduce", 64 << 10, p, shm, direct) != "cma_two_shot"
    if p == 2:  # 1n of CMA copies against two_shot's 1.5n of memcpy
        assert choose_algorithm("all_reduce", 64 << 20, p, shm, direct) == "cma_two_shot"
    # where barriers are expensive (a loaded machine; calibrate() fits alpha) it still wins: as
    # many barriers as staging two-shot's pipeline, fewer bytes
    slow_barriers = LinkParams(
        alpha_s=200e-6, beta_s_per_byte=shm.beta_s_per_byte, gamma_s_per_byte=shm.gamma_s_per_byte
    )
    assert choose_algorithm("all_reduce", 64 << 20, p, slow_barriers, direct) == "cma_two_shot"
    a, b, g = cost_terms("all_reduce", "cma_two_shot", 64 << 20, p)
    n, f = float(64 << 20), (p - 1) / p
    # a barrier per 8 MiB chunk and a closing one; a push per peer and chunk
    chunks = math.ceil(n / SHM_CHUNK_BYTES)
    assert a == chunks + 1
    pushed = (f * n + (p - 1) * chunks * CMA_CALL_BYTES) * CMA_BETA_FACTOR
    assert (b, g) == pytest.approx((f * n + pushed, f * n))


def test_link_params_validation_names_field() -> None:
    with pytest.raises(ValueError, match=r"beta_s_per_byte \(-1"):
        LinkParams(alpha_s=0, beta_s_per_byte=-1, gamma_s_per_byte=0)


def test_fit_recovers_the_parameters_that_generated_the_times(tmp_path: Path) -> None:
    truth = LinkParams(alpha_s=37e-6, beta_s_per_byte=1 / 3e9, gamma_s_per_byte=1 / 11e9)
    samples = [
        Sample(op, algo, n, p, algorithm_cost(op, algo, n, p, truth))
        for op, algo in [
            ("all_reduce", "ring"),
            ("all_reduce", "recursive_doubling"),
            ("all_gather", "ring"),
        ]
        for n in (8, 4096, 1 << 20, 64 << 20)
        for p in (2, 3, 4)
    ]
    fit = fit_link_params(samples)
    assert fit.alpha_s == pytest.approx(truth.alpha_s, rel=1e-6)
    assert fit.beta_s_per_byte == pytest.approx(truth.beta_s_per_byte, rel=1e-6)
    assert fit.gamma_s_per_byte == pytest.approx(truth.gamma_s_per_byte, rel=1e-6)
    path = tmp_path / "tuning.json"
    save_params(path, 2, {"shm": fit})
    assert load_params(path, 3) == {"shm": fit}  # nearest calibrated world size
    assert load_params(tmp_path / "missing.json", 2) is None


def test_byte_factor_interpolates_between_knots() -> None:
    curve = LinkParams(alpha_s=0, beta_s_per_byte=1e-10, gamma_s_per_byte=0,
                       byte_factors=((1 << 20, 0.5), (4 << 20, 0.8), (16 << 20, 1.0)))  # fmt: skip
    assert curve.byte_factor(8) == 0.5 and curve.byte_factor(1 << 20) == 0.5  # flat below
    assert curve.byte_factor(2 << 20) == pytest.approx(0.65)  # halfway in log2(size)
    assert curve.byte_factor(64 << 20) == 1.0  # flat above
    assert LinkParams(alpha_s=0, beta_s_per_byte=0, gamma_s_per_byte=0).byte_factor(8) == 1.0
    with pytest.raises(ValueError, match="byte_factors sizes"):
        LinkParams(alpha_s=0, beta_s_per_byte=0, gamma_s_per_byte=0,
                   byte_factors=((4 << 20, 1.0), (1 << 20, 0.5)))  # fmt: skip


def test_fit_per_algorithm_recovers_its_own_barriers_byte_cost_and_cache_curve() -> None:
    shared = LinkParams(alpha_s=8e-6, beta_s_per_byte=1 / 8e9, gamma_s_per_byte=1 / 5e9)
    # two_shot's own truth: dearer barriers, bytes 1.3x the shared price, and a cache curve with
    # two knees and a dip between (L2, then the last-level cache), as measured on this machine
    curve = ((64 << 10, 0.3), (256 << 10, 0.35), (1 << 20, 0.5), (4 << 20, 0.8),
             (16 << 20, 0.7), (64 << 20, 1.0))  # fmt: skip
    assert tuple(n for n, _ in curve) == CACHE_KNOTS
    truth = LinkParams(alpha_s=30e-6, beta_s_per_byte=1.3 / 8e9, gamma_s_per_byte=1.3 / 5e9,
                       byte_factors=curve)  # fmt: skip
    samples = [
        Sample(
            "all_reduce", "two_shot", n, 2, algorithm_cost("all_reduce", "two_shot", n, 2, truth)
        )
        for n in CALIBRATION_SIZES
    ]
    fit = fit_algorithm_params(samples, shared, knots=CACHE_KNOTS)
    assert fit.alpha_s == pytest.approx(truth.alpha_s, rel=1e-6)
    assert fit.beta_s_per_byte == pytest.approx(truth.beta_s_per_byte, rel=1e-6)
    assert fit.gamma_s_per_byte == pytest.approx(truth.gamma_s_per_byte, rel=1e-6)
    for (n, f), (m, g) in zip(fit.byte_factors, curve, strict=True):
        assert n == m and f == pytest.approx(g, rel=1e-6)
    # without the curve one scale cannot follow it: some size is missed by more than 25%
    flat = fit_algorithm_params(samples, shared)
    worst = max(abs(algorithm_cost(s.op, s.algorithm, s.nbytes, 2, flat) / s.seconds - 1)
                for s in samples)  # fmt: skip
    assert worst > 0.25
    # knots outside the samples' sizes are not fitted (nothing would pin them down)
    small = [s for s in samples if s.nbytes <= 1 << 20]
    partial_fit = fit_algorithm_params(small, shared, knots=CACHE_KNOTS)
    assert [n for n, _ in partial_fit.byte_factors] == [64 << 10, 256 << 10, 1 << 20]
    with pytest.raises(ValueError, match="mix algorithms"):
        fit_algorithm_params([*samples, Sample("all_reduce", "one_shot", 8, 2, 1e-5)], shared)


def test_calibration_fit_drops_a_sample_hit_by_a_scheduling_delay() -> None:
    truth = LinkParams(alpha_s=15e-6, beta_s_per_byte=1 / 8e9, gamma_s_per_byte=1 / 5e9)
    sizes = (8, 32, 128, 512, 2048, 8192, 1 << 15, 1 << 17, 1 << 19, 1 << 21, 1 << 23)
    samples = [
        Sample(
            "all_reduce", "one_shot", n, 2, algorithm_cost("all_reduce", "one_shot", n, 2, truth)
        )
        for n in sizes
    ]
    samples[0].seconds += 100e-6  # a rank descheduled during the 8-byte blocks
    fit = _refit_without_outliers(fit_link_params, samples)
    assert fit.alpha_s == pytest.approx(truth.alpha_s, rel=1e-6)
    assert fit.beta_s_per_byte + fit.gamma_s_per_byte == pytest.approx(
        truth.beta_s_per_byte + truth.gamma_s_per_byte, rel=1e-6
    )  # one algorithm's samples fix only the sum (one_shot at p=2 copies and adds n bytes each)


def test_per_algorithm_params_override_the_transport_and_round_trip(tmp_path: Path) -> None:
    shm = DEFAULT_PARAMS["shm"]
    slow = LinkParams(alpha_s=1e-3, beta_s_per_byte=shm.beta_s_per_byte * 10, gamma_s_per_byte=0)
    key = algorithm_key("shm", "all_reduce", "two_shot")
    params = {"shm": shm, key: slow}
    assert algorithm_params(params, "shm", "all_reduce", "two_shot") == slow
    assert algorithm_params(params, "shm", "all_reduce", "one_shot") == shm  # falls back
    direct = ["one_shot", "two_shot"]
    assert choose_algorithm("all_reduce", 64 << 20, 2, shm, direct) == "two_shot"
    assert (
        choose_algorithm("all_reduce", 64 << 20, 2, shm, direct, {"two_shot": slow}) == "one_shot"
    )
    path = tmp_path / "tuning.json"
    save_params(path, 2, params)
    assert json.loads(path.read_text())["version"] == TUNING_VERSION
    assert load_params(path, 2) == params
    # a version-1 file (transport entries only, no version field) still loads, and version 2's
    # one-knee cache terms are dropped
    path.write_text(json.dumps({"world_sizes": {"2": {"shm": asdict(shm)}}}))
    assert load_params(path, 2) == {"shm": shm}
    v2 = {**asdict(slow), "size_slope": 0.1, "size_ref_bytes": 1 << 20, "size_floor": 0.5}
    path.write_text(json.dumps({"version": 2, "world_sizes": {"2": {key: v2}}}))
    assert load_params(path, 2) == {key: slow}
    path.write_text(json.dumps({"version": TUNING_VERSION + 1, "world_sizes": {}}))
    with pytest.raises(ValueError, match="version"):
        load_params(path, 2)


def check_calibration_predicts(rank: int, world_size: int, path: str) -> None:
    import torch

    from aiinfra.comm import all_reduce
    from aiinfra.comm.bench import time_interleaved

    group = CommGroup(dist.group.WORLD, CommConfig(tuning_path=None), name="calib")
    sizes = tuple(8 << (2 * i) for i in range(9))  # 8 B .. 512 KiB
    fitted = calibrate(group, Path(path), sizes=sizes, iters=10)
    transports = {"shm", "shm_p2p", "torch", "native"}
    own = {algorithm_key("shm", "all_reduce", a) for a in SHM_ALGORITHMS["all_reduce"]}
    assert set(fitted) == transports | own | {algorithm_key("shm", "all_gather", "direct")}
    tuned = CommGroup(dist.group.WORLD, CommConfig(tuning_path=Path(path)), name="tuned")
    assert all(tuned.params[k] == v for k, v in fitted.items())
    # held-out sizes (not in the sweep): the model must predict the measured times
    errors = []
    # what auto picks between on one host: one-shot for small sizes, two-shot for large ones, and
    # torch's own collective
    cases = [("one_shot@shm", "one_shot", "shm", 3 << 10)]
    cases += [("two_shot@shm", "two_shot", "shm", 3 << 18)]
    cases += [("torch", "native", "native", n) for n in (3 << 10, 3 << 18)]
    for impl, algo, key, nbytes in cases:
        x = torch.ones(nbytes // 4)
        fn = lambda x=x, impl=impl: all_reduce(x, group, impl=impl)  # noqa: E731
        (measured,) = time_interleaved([fn], 2, 10, repeats=3)
        predicted = tuned.cost("all_reduce", algo, key, nbytes)  # the algorithm's own fit
        errors.append(abs(math.log(predicted / measured)))
    errors.sort()
    # factor 4: successive timing blocks of one impl already differ by up to 2x when other jobs
    # share the 2 cores, and the calibration ran seconds earlier under another load
    median = (errors[1] + errors[2]) / 2
    assert median < math.log(4), f"median |log(pred/measured)| {median:.2f} of {errors}"
    # with the fitted values, 8 bytes never go to a bandwidth-bound algorithm (gloo's own collective
    # may win on a loaded machine: it is latency-bound at that size too)
    small = tuned.choose("all_reduce", 8, torch.device("cpu"))[0]
    assert small not in ("ring", "rabenseifner", "two_shot", "double_binary_tree"), small
    group.destroy()
    tuned.destroy()


@pytest.mark.distributed
def test_calibrated_model_predicts_measured_times(tmp_path: Path) -> None:
    run_distributed(check_calibration_predicts, 2, str(tmp_path / "tuning.json"), timeout_s=300)

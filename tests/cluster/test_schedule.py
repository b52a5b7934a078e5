"""The pipeline simulator against the closed forms the step-time and memory models use."""

import pytest

from aiinfra.cluster.plots import plot_pipeline
from aiinfra.cluster.schedule import bubble_fraction, simulate, stage_actions


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), [(1, 4), (4, 8), (8, 8), (4, 2)])
def test_makespan_and_bubble(schedule, p, m):
    tf, tb = 1.0, 2.0
    actions = simulate(schedule, p, m, tf, tb)
    assert len(actions) == 2 * p * m
    # (m + p - 1) slots of (tf + tb): bubble fraction (p-1)/(m+p-1) (Narayanan et al. 2021)
    assert max(a.end for a in actions) == pytest.approx((m + p - 1) * (tf + tb))
    assert bubble_fraction(actions, p) == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize(("p", "m", "v"), [(4, 8, 2), (4, 8, 4), (4, 16, 2), (8, 16, 2), (2, 4, 3)])
def test_interleaved_bubble_shrinks_by_v(p, m, v):
    # interleaving v chunks per stage: the bubble is (p-1)/v micro-batch slots, which
    # training.step_time charges
    actions = simulate("interleaved", p, m, 1.0, 2.0, num_chunks=v)
    assert len(actions) == 2 * p * m * v
    assert max(a.end for a in actions) == pytest.approx((m + (p - 1) / v) * 3.0)
    assert bubble_fraction(actions, p) == pytest.approx((p - 1) / v / (m + (p - 1) / v))


def _peak_in_flight(order, v):
    live = peak = 0.0
    for kind, _, _ in order:
        live += (1 if kind == "F" else -1) / v  # a chunk holds 1/v of the stage's activations
        peak = max(peak, live)
    return peak


def test_in_flight_micro_batches_match_the_memory_model():
    p, m = 4, 12
    for i, order in enumerate(stage_actions("1f1b", p, m)):
        # 1F1B: stage i holds p - i micro-batches (the memory model's min(m, p) on stage 0)
        assert _peak_in_flight(order, 1) == min(p - i, m)
    for order in stage_actions("gpipe", p, m):
        assert _peak_in_flight(order, 1) == m
    for v in (2, 4):
        stage0 = stage_actions("interleaved", p, m, v)[0]
        # Korthikanti et al. 2022: interleaving holds p * (1 + (p-1)/(p*v)) micro-batches
        assert _peak_in_flight(stage0, v) == pytest.approx(p * (1 + (p - 1) / (p * v)))


def test_gantt_png_and_errors(tmp_path):
    actions = simulate("interleaved", 4, 8, 1.0, 2.0, num_chunks=2)
    plot_pipeline(actions, 4, "interleaved", tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="schedule"):
        simulate("zb", 4, 8, 1.0, 2.0)
    with pytest.raises(ValueError, match="num_micro_batches"):
        simulate("interleaved", 4, 6, 1.0, 2.0, num_chunks=2)
    with pytest.raises(ValueError, match="num_chunks"):
        simulate("1f1b", 4, 8, 1.0, 2.0, num_chunks=2)

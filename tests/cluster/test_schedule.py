"""The pipeline simulator against the closed forms the step-time model uses."""

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


def test_1f1b_bounds_in_flight_micro_batches():
    p, m = 4, 12
    for schedule, bound in (("1f1b", p), ("gpipe", m)):
        for i, order in enumerate(stage_actions(schedule, p, m)):
            live = peak = 0
            for kind, _ in order:
                live += 1 if kind == "F" else -1
                peak = max(peak, live)
            # 1F1B: stage i holds p - i micro-batches (the memory model's min(m, p) on stage 0)
            assert peak == (min(p - i, m) if schedule == "1f1b" else bound)


def test_gantt_png(tmp_path):
    actions = simulate("1f1b", 4, 8, 1.0, 2.0)
    plot_pipeline(actions, 4, "1f1b", tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="schedule"):
        simulate("zb", 4, 8, 1.0, 2.0)

"""A pipeline-schedule simulator: per-stage action lists for GPipe and 1F1B, timed by list
scheduling with the data dependencies between stages, for bubble checks and the Gantt chart."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True, slots=True)
class Action:
    stage: int
    kind: str  # "F" or "B"
    micro_batch: int
    start: float
    end: float


def stage_actions(schedule: str, num_stages: int, num_micro_batches: int) -> list[list[tuple]]:
    """Per stage, the ordered (kind, micro_batch) it runs. 1F1B: stage i warms up with
    p - i - 1 forwards, then alternates one forward and one backward, then drains backwards
    (Narayanan et al. 2021); GPipe runs all forwards, then all backwards."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule ({schedule!r}) must be one of {', '.join(SCHEDULES)}")
    p, m = num_stages, num_micro_batches
    if p <= 0 or m <= 0:
        raise ValueError(f"num_stages ({p}) and num_micro_batches ({m}) must be positive")
    stages = []
    for i in range(p):
        if schedule == "gpipe":
            stages.append([("F", j) for j in range(m)] + [("B", j) for j in range(m)])
            continue
        warmup = min(p - i - 1, m)
        order = [("F", j) for j in range(warmup)]
        for j in range(m - warmup):
            order += [("F", warmup + j), ("B", j)]
        order += [("B", j) for j in range(m - warmup, m)]
        stages.append(order)
    return stages


def simulate(
    schedule: str, num_stages: int, num_micro_batches: int, forward_s: float, backward_s: float
) -> list[Action]:
    """Start and end of every action: each stage runs its list in order, and F(i, j) waits for
    F(i-1, j), B(i, j) for B(i+1, j) (and its own F)."""
    lists = stage_actions(schedule, num_stages, num_micro_batches)
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * num_stages
    pos = [0] * num_stages
    actions = []
    progress = True
    while progress:
        progress = False
        for i, order in enumerate(lists):
            while pos[i] < len(order):
                kind, j = order[pos[i]]
                deps = [("F", i - 1, j)] if kind == "F" and i > 0 else []
                if kind == "B":
                    deps = [("F", i, j)] + ([("B", i + 1, j)] if i < num_stages - 1 else [])
                if any(d not in done for d in deps):
                    break
                start = max([clock[i]] + [done[d] for d in deps])
                end = start + (forward_s if kind == "F" else backward_s)
                done[(kind, i, j)] = end
                clock[i] = end
                actions.append(Action(i, kind, j, start, end))
                pos[i] += 1
                progress = True
    assert all(pos[i] == len(lists[i]) for i in range(num_stages)), "schedule deadlocked"
    return actions


def bubble_fraction(actions: list[Action], num_stages: int) -> float:
    """Idle share of the stages over the makespan."""
    makespan = max(a.end for a in actions)
    busy = sum(a.end - a.start for a in actions)
    return 1 - busy / (makespan * num_stages)

"""A pipeline-schedule simulator: per-stage action lists for GPipe, 1F1B and interleaved 1F1B,
timed by list scheduling with the data dependencies between stages, for bubble checks and the
Gantt chart (Narayanan et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True, slots=True)
class Action:
    stage: int
    kind: str  # "F" or "B"
    micro_batch: int
    start: float
    end: float
    chunk: int = 0  # model chunk (virtual stage) on this rank; 0 unless interleaved


def stage_actions(
    schedule: str, num_stages: int, num_micro_batches: int, num_chunks: int = 1
) -> list[list[tuple[str, int, int]]]:
    """Per stage, the ordered (kind, micro_batch, chunk) it runs.

    GPipe runs all forwards, then all backwards. 1F1B: stage i warms up with p - i - 1 forwards,
    then alternates one forward and one backward, then drains the backwards. Interleaved 1F1B
    gives each stage v chunks of layers and walks micro-batches in groups of p through chunk 0,
    then chunk 1, ... (backwards through the chunks in reverse); the warm-up grows to
    2(p - i - 1) + (v - 1)p forwards, as in Megatron-LM.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule ({schedule!r}) must be one of {', '.join(SCHEDULES)}")
    p, m, v = num_stages, num_micro_batches, num_chunks
    if p <= 0 or m <= 0 or v <= 0:
        raise ValueError(f"num_stages ({p}), num_micro_batches ({m}), num_chunks ({v}) must be > 0")
    if schedule != "interleaved" and v != 1:
        raise ValueError(f"num_chunks ({v}) needs schedule 'interleaved'")
    if schedule == "interleaved" and m % p:
        raise ValueError(f"num_micro_batches ({m}) must be a multiple of num_stages ({p})")
    stages = []
    for i in range(p):
        fwd = [("F", *_interleaved_slot(k, p, v, False)) for k in range(m * v)]
        bwd = [("B", *_interleaved_slot(k, p, v, True)) for k in range(m * v)]
        if schedule == "gpipe":
            stages.append(fwd + bwd)
            continue
        warmup = p - i - 1 if schedule == "1f1b" else 2 * (p - i - 1) + (v - 1) * p
        warmup = min(warmup, m * v)
        order = fwd[:warmup]
        for k in range(m * v - warmup):
            order += [fwd[warmup + k], bwd[k]]
        stages.append(order + bwd[m * v - warmup :])
    return stages


def _interleaved_slot(k: int, p: int, v: int, backward: bool) -> tuple[int, int]:
    """(micro_batch, chunk) of a stage's k-th forward or backward: groups of p micro-batches
    visit every chunk before the next group starts (v = 1 is plain micro-batch order)."""
    group, pos = divmod(k, p * v)
    chunk = pos // p
    if backward:
        chunk = v - 1 - chunk
    return group * p + pos % p, chunk


def simulate(
    schedule: str,
    num_stages: int,
    num_micro_batches: int,
    forward_s: float,
    backward_s: float,
    num_chunks: int = 1,
) -> list[Action]:
    """Start and end of every action; `forward_s`/`backward_s` are one micro-batch through one
    stage's layers (all its chunks). Each stage runs its list in order. A forward of (chunk c,
    stage i) waits for the same micro-batch's forward on the virtual stage before it
    (c, i-1) or (c-1, p-1); a backward for the virtual stage after it, and for its own forward."""
    p, v = num_stages, num_chunks
    lists = stage_actions(schedule, p, num_micro_batches, v)
    tf, tb = forward_s / v, backward_s / v
    done: dict[tuple[str, int, int, int], float] = {}
    clock, pos = [0.0] * p, [0] * p
    actions = []
    progress = True
    while progress:
        progress = False
        for i, order in enumerate(lists):
            while pos[i] < len(order):
                kind, j, c = order[pos[i]]
                deps = _deps(kind, i, j, c, p, v)
                if any(d not in done for d in deps):
                    break
                start = max([clock[i]] + [done[d] for d in deps])
                end = start + (tf if kind == "F" else tb)
                done[(kind, i, j, c)] = clock[i] = end
                actions.append(Action(i, kind, j, start, end, c))
                pos[i] += 1
                progress = True
    assert all(pos[i] == len(lists[i]) for i in range(p)), "schedule deadlocked"
    return actions


def _deps(kind: str, i: int, j: int, c: int, p: int, v: int) -> list[tuple[str, int, int, int]]:
    if kind == "F":
        if i > 0:
            return [("F", i - 1, j, c)]
        return [("F", p - 1, j, c - 1)] if c > 0 else []
    own = ("F", i, j, c)
    if i < p - 1:
        return [own, ("B", i + 1, j, c)]
    return [own, ("B", 0, j, c + 1)] if c < v - 1 else [own]


def bubble_fraction(actions: list[Action], num_stages: int) -> float:
    """Idle share of the stages over the makespan."""
    makespan = max(a.end for a in actions)
    busy = sum(a.end - a.start for a in actions)
    return 1 - busy / (makespan * num_stages)

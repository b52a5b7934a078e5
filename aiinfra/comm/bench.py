"""nccl-tests-style collective benchmark: time, algbw and busbw per (op, impl, size), baseline in
the same run.

busbw = algbw x the nccl-tests factor of the op (all_reduce 2(p-1)/p; all_gather, reduce_scatter,
all_to_all (p-1)/p; broadcast 1), so that it compares with the hardware's bandwidth whatever the op.
Rows of the shm algorithms also carry the fraction of the physical limit reached: the bytes each
rank must read and write for that algorithm over the machine's measured single-core memory-copy
bandwidth."""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from aiinfra.comm.spawn import spawn_local
from aiinfra.comm.tuner import (
    ALGORITHMS,
    DEFAULT_TUNING_PATH,
    REGISTERED_ONLY,
    SHM_CHUNK_BYTES,
    Sample,
)

BENCH_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
DEFAULT_SIZES = tuple(8 << i for i in range(26))  # 8 B .. 256 MiB
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bus_factor(op: str, world_size: int) -> float:
    p = world_size
    return {"all_reduce": 2 * (p - 1) / p, "broadcast": 1.0}.get(op, (p - 1) / p)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    op: str = "all_reduce"
    world_size: int = 2
    sizes: tuple[int, ...] = DEFAULT_SIZES  # bytes, nccl-tests convention (see tuner.py)
    impls: tuple[str, ...] = ("torch", "auto")
    registered: bool = False  # non-torch impls run on buffers comm allocated in shared memory
    dtype: str = "float32"
    warmup: int = 3
    # untimed calls right before every timed block: a block then times the impl in its own steady
    # state, as nccl-tests' back-to-back loop does, not in the cache state the impl before it left
    # (see time_interleaved)
    block_warmup: int = 1
    iters: int = 20  # calls per timed block; fewer above 8 MiB (128 MiB of payload per block)
    repeats: int = 5  # timed blocks per impl, taking turns; the median block is reported
    timeout_s: float = 600.0
    tuning_path: Path | None = DEFAULT_TUNING_PATH
    calibrate: bool = False  # fit the cost model on these ranks first and save it to tuning_path
    chunk_bytes: int = SHM_CHUNK_BYTES  # ShmConfig.chunk_bytes of the shm transport

    def __post_init__(self) -> None:
        if self.op not in BENCH_OPS:
            raise ValueError(f"op ({self.op!r}) must be one of {BENCH_OPS}")
        if self.world_size < 1:
            raise ValueError(f"world_size ({self.world_size}) must be >= 1")
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes ({self.sizes}) must be positive byte counts")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype ({self.dtype!r}) must be one of {list(_DTYPES)}")
        if not self.impls:
            raise ValueError("impls is empty")
        if self.warmup < 0 or self.block_warmup < 0 or self.iters < 1 or self.repeats < 1:
            raise ValueError(
                f"warmup ({self.warmup}) and block_warmup ({self.block_warmup}) must be >= 0,"
                f" iters ({self.iters}) and repeats ({self.repeats}) >= 1"
            )


@dataclass(slots=True)
class BenchRow:
    op: str
    impl: str
    world_size: int
    bytes: int
    time_us: float
    algbw_gbps: float
    busbw_gbps: float
    algorithm: str = ""  # what impl resolved to, e.g. auto -> two_shot@shm
    registered: bool = False
    limit_fraction: float | None = None  # physical-limit time / measured time (shm algorithms)


@dataclass(slots=True)
class BenchResult:
    rows: list[BenchRow]
    copy_gbps: float  # single-core memcpy: bytes read + written per second
    num_cores: int
    config: dict = field(default_factory=dict)


def run_bench(config: BenchConfig) -> BenchResult:
    """Spawn `world_size` gloo ranks on this host, run the sweep, return rank 0's averaged rows."""
    copy_gbps = memcpy_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        spawn_local(
            _worker,
            config.world_size,
            (config, str(out)),
            timeout_s=config.timeout_s,
            pg_timeout_s=600.0,
        )
        rows = [BenchRow(**r) for r in json.loads(out.read_text())]
    cores = os.cpu_count() or 1
    for row in rows:
        traffic = traffic_bytes(row.op, row.algorithm, row.bytes, row.world_size, row.registered)
        if traffic is not None and row.time_us > 0:
            ranks_per_core = math.ceil(row.world_size / cores)
            limit_s = traffic * ranks_per_core / (copy_gbps * 1e9)
            row.limit_fraction = limit_s / (row.time_us * 1e-6)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return BenchResult(rows=rows, copy_gbps=copy_gbps, num_cores=cores, config=cfg)


def _worker(rank: int, world_size: int, config: BenchConfig, out_path: str) -> None:
    from aiinfra.comm.collectives import CommConfig, CommGroup
    from aiinfra.comm.shm import ShmConfig
    from aiinfra.comm.tuner import calibrate

    world = dist.group.WORLD
    assert world is not None
    shm = ShmConfig(chunk_bytes=config.chunk_bytes)
    group = CommGroup(world, CommConfig(tuning_path=config.tuning_path, shm=shm), name="bench")
    if config.calibrate:
        calibrate(group, config.tuning_path)
        group.destroy()
        group = CommGroup(world, CommConfig(tuning_path=config.tuning_path, shm=shm), name="bench")
    dtype = _DTYPES[config.dtype]
    # one registered buffer per impl: sharing one let each impl start from the cache state the
    # previous impl's writes left (64 MiB, world 2: push_two_shot 9.3 ms on its own buffer, 10.4 ms
    # on the shared one, while staging-free two_shot after it gained the other way)
    registered = {
        impl: group.alloc(max(config.sizes) // 4 + 64, torch.float32)
        for impl in config.impls
        if config.registered and impl != "torch"
    }
    rows = []
    for nbytes in config.sizes:
        iters = max(1, min(config.iters, (128 << 20) // nbytes))
        made = {}
        for impl in config.impls:
            use_reg = registered.get(impl)
            made[impl] = (*_make_op(group, config.op, impl, nbytes, dtype, use_reg), use_reg)
        seconds = time_interleaved(
            [fn for fn, _, _ in made.values()],
            config.warmup,
            iters,
            config.repeats,
            block_warmup=config.block_warmup,
        )
        for impl, t in zip(config.impls, seconds, strict=True):
            _, algorithm, use_reg = made[impl]
            algbw = nbytes / t / 1e9
            rows.append(
                BenchRow(
                    op=config.op,
                    impl=impl,
                    world_size=world_size,
                    bytes=nbytes,
                    time_us=t * 1e6,
                    algbw_gbps=algbw,
                    busbw_gbps=algbw * bus_factor(config.op, world_size),
                    algorithm=algorithm,
                    registered=use_reg is not None,
                )
            )
    if rank == 0:
        Path(out_path).write_text(json.dumps([asdict(r) for r in rows]))
    group.destroy()


MIN_BLOCK_S = 5e-3  # shortest timed block; short calls get more than `iters` per block
MAX_BLOCK_CALLS = 1000


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    warmup: int,
    iters: int,
    repeats: int,
    *,
    block_warmup: int = 1,
) -> list[float]:
    """Seconds per call of each fn: blocks of >= `iters` calls (and >= MIN_BLOCK_S), impls taking
    turns `repeats` times so that they see the same load on a shared machine; median block per rank,
    mean over ranks.
    The order changes every round, because what ran just before a block shapes it: right after
    gloo's collective (whose threads may still hold a core) a 4 KiB shm call took 71 us instead of
    7, and an impl that follows itself finds its buffers in cache (64 MiB: 15-20% faster). With
    one fixed order, or reversing every other round, or rotating it, an impl keeps the same
    neighbours: rotation put `auto` right after `torch` in every round. So with 3 or more impls
    each round is a fresh permutation (seeded, the same on every rank); with 2 they alternate.
    What the impl before leaves in the caches still shapes a block's first calls, for several
    calls: after two of gloo's 64 MiB all_reduces, five of cma_two_shot took 18.5, 14.6, 12.8, 12.3
    and 12.4 ms against 12.4-13.4 after its own (world 2; L3 refills over several passes), and a
    64 MiB block is only 2 calls. So `block_warmup` untimed calls precede every timed block."""
    warm_s = []
    for fn in fns:
        start = time.perf_counter()
        for _ in range(max(1, warmup)):
            fn()
        warm_s.append((time.perf_counter() - start) / max(1, warmup))
    # a block lasts at least MIN_BLOCK_S: 20 calls of a 15 us collective are 0.3 ms, which one
    # descheduling of a busy-waiting rank doubles; the ranks agree on the longest count
    counts = torch.tensor(
        [max(iters, min(MAX_BLOCK_CALLS, math.ceil(MIN_BLOCK_S / max(t, 1e-9)))) for t in warm_s]
    )
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    blocks: list[list[float]] = [[] for _ in fns]
    turns = list(zip(fns, blocks, counts.tolist(), strict=True))
    for k in range(repeats):
        if len(turns) > 2:
            random.Random(k).shuffle(turns)
        elif k:
            turns.reverse()
        for fn, times, n in turns:
            for _ in range(block_warmup):
                fn()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - start) / n)
    medians = torch.tensor([sorted(b)[len(b) // 2] for b in blocks], dtype=torch.float64)
    dist.all_reduce(medians)
    return (medians / dist.get_world_size()).tolist()


def _make_op(
    group: object,
    op: str,
    impl: str,
    nbytes: int,
    dtype: torch.dtype,
    registered: torch.Tensor | None,
) -> tuple[Callable[[], object], str]:
    from aiinfra.comm import collectives as c

    assert isinstance(group, c.CommGroup)
    p, es = group.world_size, torch.empty((), dtype=dtype).element_size()
    numel = max(1, nbytes // es)
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        numel = max(p, numel - numel % p)
    if registered is not None and dtype == torch.float32 and op == "all_reduce":
        x = registered[:numel]
        x.fill_(1.0)
    else:
        x = torch.ones(numel, dtype=dtype)
    small = x[: numel // p] if op in ("all_gather", "reduce_scatter") else x
    registered_in_place = impl == "auto" and op == "all_reduce" and c.is_registered(group, x, x)
    name, transport = group.resolve(op, impl, numel * es, x.device, registered_in_place)
    algorithm = "torch" if transport == "native" else f"{name}@{transport}"
    out = torch.empty(numel, dtype=dtype)
    ops: dict[str, Callable[[], object]] = {
        "all_reduce": lambda: c.all_reduce(x, group, impl=impl),
        "all_gather": lambda: c.all_gather(out, small, group, impl=impl),
        "reduce_scatter": lambda: c.reduce_scatter(torch.empty_like(small), x, group, impl=impl),
        "broadcast": lambda: c.broadcast(x, group, 0, impl=impl),
        "all_to_all": lambda: c.all_to_all(out, x, group, impl=impl),
    }
    return ops[op], algorithm


def memcpy_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Best-of single-thread copy rate in GB/s of bytes read + written (a copy of n moves 2n)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.ones(nbytes // 4)
        b = torch.empty_like(a)
        b.copy_(a)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            b.copy_(a)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * nbytes / best / 1e9


def traffic_bytes(op: str, algorithm: str, nbytes: int, p: int, registered: bool) -> float | None:
    """Bytes one rank reads + writes in memory for an all_reduce by a shm direct algorithm."""
    n = float(nbytes)
    if op != "all_reduce" or p < 2:
        return None
    if algorithm == "push_two_shot@shm" and not registered:
        algorithm = "two_shot@shm"  # what it runs as
    if algorithm in ("two_shot@shm", "push_two_shot@shm"):
        # registered push: the same bytes, the p-1 slices copied out of this rank's own buffer
        gather = 2 * (p - 1) / p * n  # copy the p-1 peer slices
        if registered:
            return n + n / p + gather  # reduce: read p slices of n/p, write one
        return 2 * (p - 1) / p * n + n + n / p + gather + 2 * n / p  # + copy in, + own slice out
    if algorithm == "cma_two_shot@shm" and not registered:
        # per peer: its slice into staging (read + write n/p), reduce (read 2, write 1 slice); then
        # the reduced slice straight into the peer's out (read + write n/p)
        return (p - 1) * (2 + 3 + 2) * n / p
    if algorithm == "one_shot@shm":
        return 2 * n + p * n + n  # copy in; read p buffers, write the result
    return None


def format_table(result: BenchResult) -> str:
    rows = result.rows
    base = {(r.bytes, r.op): r for r in rows if r.impl == "torch"}
    head = f"{'op':<14} {'impl':<22} {'algorithm':<26} {'bytes':>11} {'time_us':>11} "
    head += f"{'algbw':>8} {'busbw':>8} {'vs torch':>9} {'limit':>6}"
    lines = [
        f"memcpy {result.copy_gbps:.1f} GB/s (read+write, 1 core), {result.num_cores} cores",
        head,
    ]
    for r in rows:
        ref = base.get((r.bytes, r.op))
        ratio = f"{r.busbw_gbps / ref.busbw_gbps:8.2f}x" if ref and ref.busbw_gbps > 0 else ""
        limit = f"{100 * r.limit_fraction:5.0f}%" if r.limit_fraction is not None else ""
        lines.append(
            f"{r.op:<14} {r.impl:<22} {r.algorithm:<26} {r.bytes:>11} {r.time_us:>11.1f} "
            f"{r.algbw_gbps:>8.3f} {r.busbw_gbps:>8.3f} {ratio:>9} {limit:>6}"
        )
    return "\n".join(lines)


def save_plot(result: BenchResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for impl in dict.fromkeys(r.impl for r in result.rows):
        rows = [r for r in result.rows if r.impl == impl]
        ax.plot([r.bytes for r in rows], [r.busbw_gbps for r in rows], marker="o", label=impl)
    first = result.rows[0]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(f"{first.op}, world size {first.world_size}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- calibration sweep (tuner.calibrate runs this on every rank) ----------------------------------

# Measured in this order, the shared-memory cases last: they take 7 s of the ~45 s and run at
# microsecond scale, where this VM's speed drifts by 10-20% within a minute, and `aiinfra bench comm
# --calibrate` sweeps right after calibrate() (with shm first, its samples were ~45 s old by then)
_CALIBRATION: dict[str, list[tuple[str, str, str]]] = {  # cost key -> (op, algorithm, impl)
    "native": [("all_reduce", "native", "torch"), ("all_gather", "native", "torch")],
    "torch": [
        ("all_reduce", "ring", "ring@torch"),
        ("all_reduce", "recursive_doubling", "recursive_doubling@torch"),
        ("all_gather", "ring", "ring@torch"),
    ],
    "shm_p2p": [
        ("all_reduce", "ring", "ring@shm"),
        ("all_reduce", "recursive_doubling", "recursive_doubling@shm"),
        ("all_gather", "ring", "ring@shm"),
    ],
    "shm": [
        ("all_reduce", "one_shot", "one_shot@shm"),
        ("all_reduce", "two_shot", "two_shot@shm"),
        ("all_reduce", "cma_two_shot", "cma_two_shot@shm"),
        ("all_reduce", "push_two_shot", "push_two_shot@shm"),  # on a registered buffer
        ("all_gather", "direct", "direct@shm"),
    ],
}


def measure_samples(group: object, sizes: Sequence[int], iters: int) -> dict[str, list[Sample]]:
    """Time each calibration case on `group` (collective); every rank returns the same samples."""
    from aiinfra.comm import collectives as c

    assert isinstance(group, c.CommGroup)
    samples: dict[str, list[Sample]] = {key: [] for key in _CALIBRATION}
    registered = group.alloc(max(sizes) // 4 + 64) if group.shm is not None else None
    for key, cases in _CALIBRATION.items():
        if key.startswith("shm") and group.shm is None:
            continue
        for nbytes in sizes:
            # The cases of one transport take turns, as impls do in the benchmark: timed alone, a
            # 64 MiB all_reduce kept its buffers in the shared L3 and ran 20-30% faster than in
            # a benchmark run beside other impls. Blocks as the benchmark's, too: a block starts
            # from a gloo barrier that leaves the ranks ~100 us apart, which a block of 5 small
            # calls shared (+20 us a call: the fit then priced 1 KiB at twice the measured time).
            fns = []
            for op, algorithm, impl in cases:
                assert algorithm == "native" or algorithm in ALGORITHMS[op] or "shm" in impl
                buffer = registered if algorithm in REGISTERED_ONLY else None
                fns.append(_make_op(group, op, impl, nbytes, torch.float32, buffer)[0])
            n = max(2, min(iters, (128 << 20) // nbytes))
            seconds = time_interleaved(fns, 3, n, repeats=5)  # median of 5 blocks each
            for (op, algorithm, _), t in zip(cases, seconds, strict=True):
                samples[key].append(Sample(op, algorithm, nbytes, group.world_size, t))
    return samples

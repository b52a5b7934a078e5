"""Direct collectives over shared memory: every rank reads its peers' staging buffers in place.

Data streams through two staging halves per rank (double buffering), chunk by chunk. Per chunk: copy
in, tick barrier, read what is needed from the peers' buffers, then release the half (a signal, no
wait: the next use of that half waits for it). Two-shot all-reduce is reduce-scatter + all-gather in
shared memory: rank r reduces slice r of the chunk from all peers, then everyone copies every
reduced slice."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from aiinfra.comm.algorithms import chunk_bounds, finish_avg
from aiinfra.comm.shm import SharedMemoryTransport
from aiinfra.comm.transport import describe


def _reduce_all(dst: torch.Tensor, srcs: Sequence[torch.Tensor], op: str) -> None:
    """dst = srcs[0] (op) srcs[1] (op) ...; dst may alias srcs[0] only (it is overwritten first)."""
    if len(srcs) == 1:
        dst.copy_(srcs[0])
        return
    fn = torch.add if op in ("sum", "avg") else torch.maximum if op == "max" else torch.minimum
    fn(srcs[0], srcs[1], out=dst)
    for src in srcs[2:]:
        fn(dst, src, out=dst)


def _chunks(
    sm: SharedMemoryTransport, numel: int, elem_bytes: int
) -> Iterator[tuple[int, int, int]]:
    """(index, start, end) of the chunks; at least one, so that empty calls still synchronize."""
    step = sm.config.chunk_bytes // elem_bytes
    for i, a in enumerate(range(0, max(numel, 1), step)):
        yield i, a, min(a + step, numel)


def _stage(
    sm: SharedMemoryTransport, half: int, numel: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    return sm.staging_views(half, numel, dtype)


class _Halves:
    """Alternates the staging halves across chunks and across calls (kept on the transport)."""

    def __init__(self, sm: SharedMemoryTransport) -> None:
        self.sm = sm

    def __enter__(self) -> int:
        self.half = self.sm.next_half()
        self.sm.acquire_half(self.half)
        return self.half

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.sm.release_half(self.half)


def one_shot_all_reduce(
    sm: SharedMemoryTransport, x: torch.Tensor, out: torch.Tensor, op: str
) -> None:
    """Every rank reads all p buffers and reduces the whole chunk: one barrier (small sizes)."""
    p, r = sm.world_size, sm.rank
    numel = x.numel()
    if numel * x.element_size() <= sm.config.chunk_bytes:
        # one chunk (every latency-bound call): in C where it was built (shm.one_shot_native);
        # else no slicing, generator or context manager, whose few microseconds each are a
        # visible share of an 8-byte call
        if sm.one_shot_native(x, out, op):
            return
        h = sm.next_half()
        sm.acquire_half(h)
        stage = sm.staging_views(h, numel, x.dtype)
        stage[r].copy_(x)
        # the argument check travels in the same barrier
        sm.barrier(describe("all_reduce", x, op), "all_reduce")
        _reduce_all(out, stage, op)
        # no release signal: a peer's next tick (of whatever comes next) follows its reads
        sm.free_half_at_next_tick(h)
        finish_avg(out, p, op)
        return
    desc = describe("all_reduce", x, op)
    for i, a, b in _chunks(sm, numel, x.element_size()):
        with _Halves(sm) as h:
            stage = _stage(sm, h, b - a, x.dtype)
            stage[r].copy_(x[a:b])
            sm.barrier(desc if i == 0 else None, "all_reduce")
            _reduce_all(out[a:b], stage, op)  # same order on every rank: bit-identical results
        finish_avg(out[a:b], p, op)


def two_shot_all_reduce(
    sm: SharedMemoryTransport, x: torch.Tensor, out: torch.Tensor, op: str
) -> None:
    """Reduce-scatter + all-gather through shared memory: each element is read ~2(p-1)/p times."""
    registered = sm.registered_peers(x) if x.data_ptr() == out.data_ptr() else None
    if registered is not None:
        _two_shot_registered(sm, x, registered[0], registered[1], op)
        return
    # Software-pipelined: one barrier per chunk. After barrier i every rank has copied chunk i in
    # and reduced chunk i-1, so each rank gathers chunk i-1 and reduces chunk i before the next.
    p, r = sm.world_size, sm.rank
    desc = describe("all_reduce", x, op)
    pending: tuple[int, int, int, list[int]] | None = None  # (half, start, end, slice bounds)
    chunks = list(_chunks(sm, x.numel(), x.element_size()))
    for i in range(len(chunks) + 1):
        current = None
        if i < len(chunks):
            _, a, b = chunks[i]
            h, sb = _stage_peer_slices(sm, x, a, b)
            current = (h, a, b, sb)
        sm.barrier(desc if i == 0 else None, "all_reduce")
        if pending is not None:
            _gather_slices(sm, out, *pending)
        if current is not None:
            h, a, b, sb = current
            stage = _stage(sm, h, b - a, x.dtype)
            lo, hi = sb[r], sb[r + 1]
            mine = stage[r][lo:hi]
            srcs = [x[a + lo : a + hi] if q == r else stage[q][lo:hi] for q in range(p)]
            _reduce_all(mine, srcs, op)
            finish_avg(mine, p, op)
        pending = current


def cma_two_shot_all_reduce(
    sm: SharedMemoryTransport, x: torch.Tensor, out: torch.Tensor, op: str
) -> None:
    """Two-shot whose all-gather is pushed with Cross Memory Attach: per chunk, each rank copies
    the slices its peers reduce into its staging half; after the chunk's barrier rank r reduces
    slice r (its own x and the peers' staging) straight into its `out` and writes the result into
    slice r of every peer's `out` (process_vm_writev). A barrier per chunk plus a closing one; no
    gather copies out of staging (3.5n bytes of memory traffic per rank at world 2 against
    two_shot's 4.5n). The reduce-scatter goes through staging because a memcpy moves a byte in half
    the time the kernel's CMA copy does (3.0 against 7.0 ms per 32 MiB here): pulling the slices
    with process_vm_readv instead ran 4-10% slower at 64 MiB, world 2. Falls back to staging
    two-shot where the kernel refuses CMA (decided once per group, the same on every rank)."""
    if not sm.cma:
        two_shot_all_reduce(sm, x, out, op)
        return
    p, r, es = sm.world_size, sm.rank, x.element_size()
    desc = describe("all_reduce", x, op)
    addrs: list[list[int]] = []
    for i, a, b in _chunks(sm, x.numel(), es):
        h, sb = _stage_peer_slices(sm, x, a, b)
        if i == 0:  # the output's address travels with the argument check
            addrs = sm.barrier(desc, "all_reduce", (out.data_ptr(),)) or []
        else:
            sm.barrier()
        # Slice r of every rank's out is written by rank r alone, and only after this chunk's
        # barrier: by then every peer has copied its part of x (even in place, where out is x).
        lo, hi = sb[r], sb[r + 1]
        stage = _stage(sm, h, b - a, x.dtype)
        mine = out[a + lo : a + hi]
        # x's own slice first: out may alias it (in place), and only srcs[0] may alias the output
        srcs = [x[a + lo : a + hi]] + [stage[q][lo:hi] for q in range(p) if q != r]
        _reduce_all(mine, srcs, op)  # one rank reduces each slice: every rank gets these bits
        finish_avg(mine, p, op)
        sm.release_half(h)  # done reading the peers' halves
        for q in range(p):
            if q != r:  # the source was just written by this core: the copy reads it from cache
                sm.peer_write(mine, q, addrs[q][0] + (a + lo) * es)
    sm.barrier()  # every slice has arrived everywhere


def _stage_peer_slices(
    sm: SharedMemoryTransport, x: torch.Tensor, a: int, b: int
) -> tuple[int, list[int]]:
    """The reduce-scatter's copy in for chunk [a, b) of x: the next staging half, once the
    peers are done with it, gets the slices the peers reduce (not our own). Returns the half and
    the slice bounds."""
    p, r = sm.world_size, sm.rank
    h = sm.next_half()
    sm.acquire_half(h)
    sb = chunk_bounds(b - a, p)
    own = _stage(sm, h, b - a, x.dtype)[r]
    own[: sb[r]].copy_(x[a : a + sb[r]])
    own[sb[r + 1] :].copy_(x[a + sb[r + 1] : b])
    return h, sb


def _gather_slices(
    sm: SharedMemoryTransport, out: torch.Tensor, half: int, a: int, b: int, sb: list[int]
) -> None:
    """Copy every rank's reduced slice of chunk [a, b) out of staging, then release our half."""
    stage = _stage(sm, half, b - a, out.dtype)
    for q in range(sm.world_size):
        out[a + sb[q] : a + sb[q + 1]].copy_(stage[q][sb[q] : sb[q + 1]])
    sm.release_half(half)


def _reduce_own_slice(
    sm: SharedMemoryTransport, x: torch.Tensor, offset: int, peers: list[torch.Tensor], op: str
) -> tuple[list[torch.Tensor], list[int]]:
    """The first shot of the registered two-shots: once every input is ready (the barrier, which
    also checks the arguments), rank r reduces slice r of every rank's buffer into its own.
    Returns the buffers as x's dtype and the slice bounds."""
    p, r = sm.world_size, sm.rank
    views = [v.view(x.dtype) for v in peers]
    sb = chunk_bounds(x.numel(), p)
    lo, hi = sb[r], sb[r + 1]
    sm.barrier(describe("all_reduce", x, op, extra=offset), "all_reduce")
    mine = views[r][lo:hi]  # the destination is also a source: it must be read first
    _reduce_all(mine, [mine] + [v[lo:hi] for q, v in enumerate(views) if q != r], op)
    finish_avg(mine, p, op)
    return views, sb


def _two_shot_registered(
    sm: SharedMemoryTransport, x: torch.Tensor, offset: int, peers: list[torch.Tensor], op: str
) -> None:
    """In place on buffers that already live in shared memory: no copy in, three barriers. Not
    chunked: on a shared CPU every barrier can cost a scheduling delay, so fewer is faster."""
    views, sb = _reduce_own_slice(sm, x, offset, peers, op)
    p, r = sm.world_size, sm.rank
    sm.barrier()
    for q in range(p):
        if q != r:
            views[r][sb[q] : sb[q + 1]].copy_(views[q][sb[q] : sb[q + 1]])
    sm.barrier()  # peers are done reading our slice: the caller may write the buffer again


def push_two_shot_all_reduce(
    sm: SharedMemoryTransport, x: torch.Tensor, out: torch.Tensor, op: str
) -> None:
    """Two-shot with a pushed all-gather, in place on a registered buffer: after one barrier
    (every input is ready) rank r reduces slice r of every rank's buffer and writes the result
    into slice r of every rank's buffer, then one barrier ends the call. Two barriers instead of
    registered two-shot's three, and the copies read the slice this rank just wrote (its own cache)
    rather than one another core wrote. Other tensors fall back to staging two-shot (the same on
    every rank: registered_peers is collective state)."""
    registered = sm.registered_peers(x) if x.data_ptr() == out.data_ptr() else None
    if registered is None:
        two_shot_all_reduce(sm, x, out, op)
        return
    # No conflicts: slice r of any buffer is read and written by rank r alone, and rank r writes
    # the peers' copies only after it has read all of slice r. The closing barrier is what lets the
    # caller read its buffer (every slice has arrived) and write it again (no rank still reads it).
    views, sb = _reduce_own_slice(sm, x, *registered, op)
    p, r = sm.world_size, sm.rank
    lo, hi = sb[r], sb[r + 1]
    mine = views[r][lo:hi]
    for q in range(p):
        if q != r:
            views[q][lo:hi].copy_(mine)
    sm.barrier()


def direct_all_gather(sm: SharedMemoryTransport, out: torch.Tensor, inp: torch.Tensor) -> None:
    p, r, m = sm.world_size, sm.rank, inp.numel()
    desc = describe("all_gather", inp)
    for i, a, b in _chunks(sm, m, inp.element_size()):
        with _Halves(sm) as h:
            stage = _stage(sm, h, b - a, inp.dtype)
            stage[r].copy_(inp[a:b])
            sm.barrier(desc if i == 0 else None, "all_gather")
            for q in range(p):
                out[q * m + a : q * m + b].copy_(stage[q])


def direct_reduce_scatter(
    sm: SharedMemoryTransport, out: torch.Tensor, inp: torch.Tensor, op: str
) -> None:
    """Each chunk stages p pieces (one per destination); rank r reduces piece r from every peer."""
    p, r, m = sm.world_size, sm.rank, out.numel()
    desc = describe("reduce_scatter", out, op)
    for i, a, b in _chunks(sm, m, inp.element_size() * p):
        k = b - a
        with _Halves(sm) as h:
            stage = _stage_pieces(sm, h, inp, m, a, b)
            sm.barrier(desc if i == 0 else None, "reduce_scatter")
            srcs = [
                inp[r * m + a : r * m + b] if q == r else stage[q][r * k : (r + 1) * k]
                for q in range(p)
            ]
            _reduce_all(out[a:b], srcs, op)
        finish_avg(out[a:b], p, op)


def _stage_pieces(
    sm: SharedMemoryTransport, h: int, inp: torch.Tensor, m: int, a: int, b: int
) -> list[torch.Tensor]:
    """Copy elements [a, b) of each destination's piece q (inp[q*m : (q+1)*m]) into this rank's
    staging slot, piece after piece; the own piece stays in inp. Returns every rank's slot."""
    p, r, k = sm.world_size, sm.rank, b - a
    stage = _stage(sm, h, p * k, inp.dtype)
    for q in range(p):
        if q != r:
            stage[r][q * k : (q + 1) * k].copy_(inp[q * m + a : q * m + b])
    return stage


def direct_broadcast(sm: SharedMemoryTransport, x: torch.Tensor, root: int) -> None:
    r = sm.rank
    desc = describe("broadcast", x, extra=root)
    for i, a, b in _chunks(sm, x.numel(), x.element_size()):
        with _Halves(sm) as h:
            if r == root:
                _stage(sm, h, b - a, x.dtype)[r].copy_(x[a:b])
            sm.barrier(desc if i == 0 else None, "broadcast")
            if r != root:
                x[a:b].copy_(_stage(sm, h, b - a, x.dtype)[root])


def direct_all_to_all(sm: SharedMemoryTransport, out: torch.Tensor, inp: torch.Tensor) -> None:
    p, r = sm.world_size, sm.rank
    m = inp.numel() // p
    desc = describe("all_to_all", inp)
    for i, a, b in _chunks(sm, m, inp.element_size() * p):
        k = b - a
        with _Halves(sm) as h:
            stage = _stage_pieces(sm, h, inp, m, a, b)
            sm.barrier(desc if i == 0 else None, "all_to_all")
            for q in range(p):
                src = inp[r * m + a : r * m + b] if q == r else stage[q][r * k : (r + 1) * k]
                out[q * m + a : q * m + b].copy_(src)


def direct_barrier(sm: SharedMemoryTransport) -> None:
    sm.barrier(describe("barrier", torch.empty(0)), "barrier")

"""Collective algorithms built from point-to-point messages on any `Transport`.

Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations in MPICH"
(2005); NCCL's double binary tree (Sanders, Speck and Traeff 2009). Every function works on flat
contiguous tensors, for any world size (non-powers of two fold the extra ranks in first) and any
element count (blocks differ by at most one element; empty blocks are skipped on both sides).
Reductions are done so that every rank ends with bit-identical results (each element is reduced
once, or in the same order)."""

from __future__ import annotations

import torch

from aiinfra.comm.transport import Transport, Work


def chunk_bounds(numel: int, parts: int) -> list[int]:
    """Offsets (parts + 1 of them) of `parts` near-equal blocks; the first numel % parts get one
    more."""
    base, extra = divmod(numel, parts)
    offsets = [0]
    for i in range(parts):
        offsets.append(offsets[-1] + base + (1 if i < extra else 0))
    return offsets


def reduce_(dst: torch.Tensor, src: torch.Tensor, op: str) -> None:
    """dst = dst (op) src, in place; avg accumulates a sum and is divided by finish_avg."""
    if op in ("sum", "avg"):
        dst.add_(src)
    elif op == "max":
        torch.maximum(dst, src, out=dst)
    else:
        torch.minimum(dst, src, out=dst)


def finish_avg(t: torch.Tensor, world_size: int, op: str) -> None:
    if op != "avg":
        return
    if t.is_floating_point():
        t.div_(world_size)
    else:
        t.div_(world_size, rounding_mode="floor")  # integer avg: floor of the sum / world size


def _exchange(tr: Transport, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> None:
    tr.wait_all([tr.irecv(recv, src), tr.isend(send, dst)])


# --- folding a non-power-of-two world into a power of two -----------------------------------------
# The first 2*rem ranks pair up (2v, 2v+1) and act as one virtual rank v; the others are
# v = r - rem. Virtual rank v then owns the contiguous blocks of its real ranks:
# [start(v), start(v+1)).


def _fold(world_size: int, rank: int) -> tuple[int, int, int]:
    """(power of two p2, rem, virtual rank or -1 for the even ranks that sit out)."""
    p2 = 1 << (world_size.bit_length() - 1)
    rem = world_size - p2
    if rank < 2 * rem:
        return p2, rem, rank // 2 if rank % 2 else -1
    return p2, rem, rank - rem


def _real(v: int, rem: int) -> int:
    return 2 * v + 1 if v < rem else v + rem


def _vstart(v: int, rem: int) -> int:
    return v + min(v, rem)


# --- all_reduce -----------------------------------------------------------------------------------


def ring_all_reduce(tr: Transport, x: torch.Tensor, op: str) -> None:
    """Reduce-scatter then all-gather around the ring: 2(p-1) steps of n/p bytes (bandwidth-
    optimal)."""
    p, r = tr.world_size, tr.rank
    if p > 1:
        off = chunk_bounds(x.numel(), p)
        tmp = torch.empty(off[1] - off[0], dtype=x.dtype, device=x.device)
        right, left = (r + 1) % p, (r - 1) % p
        for s in range(p - 1):
            si, ri = (r - s) % p, (r - s - 1) % p
            recv = tmp[: off[ri + 1] - off[ri]]
            _exchange(tr, x[off[si] : off[si + 1]], right, recv, left)
            reduce_(x[off[ri] : off[ri + 1]], recv, op)
        # rank r now holds the fully reduced block (r + 1) % p
        for s in range(p - 1):
            si, ri = (r - s + 1) % p, (r - s) % p
            _exchange(tr, x[off[si] : off[si + 1]], right, x[off[ri] : off[ri + 1]], left)
    finish_avg(x, p, op)


def rabenseifner_all_reduce(tr: Transport, x: torch.Tensor, op: str) -> None:
    """Recursive-halving reduce-scatter, then recursive-doubling all-gather: 2 lg p steps, ~2n
    bytes."""
    p, r = tr.world_size, tr.rank
    p2, rem, v = _fold(p, r)
    _fold_in(tr, x, op, rem)
    if v >= 0 and p2 > 1:
        off = chunk_bounds(x.numel(), p2)
        tmp = torch.empty(off[p2 // 2], dtype=x.dtype, device=x.device)  # largest kept half
        lo, hi, steps = 0, p2, []
        d = p2 // 2
        while d >= 1:
            partner = _real(v ^ d, rem)
            mid = (lo + hi) // 2
            keep, give = ((lo, mid), (mid, hi)) if v & d == 0 else ((mid, hi), (lo, mid))
            kept = x[off[keep[0]] : off[keep[1]]]
            recv = tmp[: kept.numel()]
            _exchange(tr, x[off[give[0]] : off[give[1]]], partner, recv, partner)
            reduce_(kept, recv, op)
            steps.append((partner, keep, give))
            lo, hi = keep
            d //= 2
        # virtual rank v holds reduced block v; gather back up in the reverse order
        for partner, keep, give in reversed(steps):
            send, recv = x[off[keep[0]] : off[keep[1]]], x[off[give[0]] : off[give[1]]]
            _exchange(tr, send, partner, recv, partner)
    _fold_out(tr, x, rem)
    finish_avg(x, p, op)


def recursive_doubling_all_reduce(tr: Transport, x: torch.Tensor, op: str) -> None:
    """Exchange the whole vector with partners at distance 1, 2, 4, ...: lg p steps (latency-
    optimal)."""
    p, r = tr.world_size, tr.rank
    p2, rem, v = _fold(p, r)
    _fold_in(tr, x, op, rem)
    if v >= 0:
        tmp = torch.empty_like(x)
        d = 1
        while d < p2:
            partner = _real(v ^ d, rem)
            _exchange(tr, x, partner, tmp, partner)
            reduce_(x, tmp, op)  # a (op) b == b (op) a bitwise, so both partners agree
            d *= 2
    _fold_out(tr, x, rem)
    finish_avg(x, p, op)


def _fold_in(tr: Transport, x: torch.Tensor, op: str, rem: int) -> None:
    r = tr.rank
    if r < 2 * rem:
        if r % 2 == 0:
            tr.send(x, r + 1)
        else:
            tmp = torch.empty_like(x)
            tr.recv(tmp, r - 1)
            reduce_(x, tmp, op)


def _fold_out(tr: Transport, x: torch.Tensor, rem: int) -> None:
    r = tr.rank
    if r < 2 * rem:
        if r % 2 == 1:
            tr.send(x, r - 1)
        else:
            tr.recv(x, r + 1)


def double_binary_tree_all_reduce(tr: Transport, x: torch.Tensor, op: str) -> None:
    """Half the vector reduces up and broadcasts down tree A, the other half tree B (A mirrored).

    Most inner nodes of A are leaves of B, so every rank both sends and receives in each phase
    (NCCL's trees). Trees are handled in a fixed order (A before B) with every independent send
    posted early, so the dependencies form no cycle across the two trees."""
    p, r = tr.world_size, tr.rank
    if p > 1:
        half = chunk_bounds(x.numel(), 2)
        parts = (x[half[0] : half[1]], x[half[1] : half[2]])
        roles = (_heap_role(r, p, mirror=False), _heap_role(r, p, mirror=True))
        tmps = [[torch.empty_like(parts[t]) for _ in roles[t][1]] for t in (0, 1)]
        recvs = [
            [tr.irecv(b, c) for b, c in zip(tmps[t], roles[t][1], strict=True)] for t in (0, 1)
        ]
        ups: list[Work | None] = [None, None]
        for t in (0, 1):  # reduce up: children's halves first, then on to the parent
            parent, kids = roles[t]
            if kids:
                tr.wait_all(recvs[t])
                for tmp in tmps[t]:
                    reduce_(parts[t], tmp, op)
            if parent >= 0:
                ups[t] = tr.isend(parts[t], parent)
        downs = []
        for t in (0, 1):  # broadcast down: the root's result, through every level
            parent, kids = roles[t]
            up = ups[t]
            if up is not None:
                tr.wait_all([up])
                tr.recv(parts[t], parent)
            downs += [tr.isend(parts[t], c) for c in kids]
        tr.wait_all(downs)
    finish_avg(x, p, op)


def _heap_role(rank: int, world_size: int, mirror: bool) -> tuple[int, list[int]]:
    """(parent or -1, children) of `rank` in the heap-ordered binary tree (mirrored: ids p-1-i)."""
    i = world_size - 1 - rank if mirror else rank

    def real(j: int) -> int:
        return world_size - 1 - j if mirror else j

    parent = real((i - 1) // 2) if i > 0 else -1
    kids = [real(c) for c in (2 * i + 1, 2 * i + 2) if c < world_size]
    return parent, kids


# --- all_gather (out holds p blocks of input's size; block r is this rank's) ----------------------


def ring_all_gather(tr: Transport, out: torch.Tensor, inp: torch.Tensor) -> None:
    p, r, m = tr.world_size, tr.rank, inp.numel()
    out[r * m : (r + 1) * m].copy_(inp)
    right, left = (r + 1) % p, (r - 1) % p
    for s in range(p - 1):
        si, ri = (r - s) % p, (r - s - 1) % p
        _exchange(tr, out[si * m : (si + 1) * m], right, out[ri * m : (ri + 1) * m], left)


def recursive_doubling_all_gather(tr: Transport, out: torch.Tensor, inp: torch.Tensor) -> None:
    """Exchange ever larger contiguous runs of blocks with partners at distance 1, 2, 4, ...."""
    p, r, m = tr.world_size, tr.rank, inp.numel()
    p2, rem, v = _fold(p, r)
    out[r * m : (r + 1) * m].copy_(inp)
    if r < 2 * rem:
        if r % 2 == 0:
            tr.send(inp, r + 1)
        else:
            tr.recv(out[(r - 1) * m : r * m], r - 1)
    if v >= 0:
        d = 1
        while d < p2:
            partner = _real(v ^ d, rem)
            mine_lo = v & ~(d - 1)
            theirs_lo = mine_lo ^ d
            a, b = _vstart(mine_lo, rem) * m, _vstart(mine_lo + d, rem) * m
            c, e = _vstart(theirs_lo, rem) * m, _vstart(theirs_lo + d, rem) * m
            _exchange(tr, out[a:b], partner, out[c:e], partner)
            d *= 2
    _fold_out(tr, out, rem)


# --- reduce_scatter (inp holds p blocks of out's size; this rank gets block r reduced) ------------


def ring_reduce_scatter(tr: Transport, out: torch.Tensor, inp: torch.Tensor, op: str) -> None:
    p, r, m = tr.world_size, tr.rank, out.numel()
    if p == 1:
        out.copy_(inp)
    else:
        tmp = torch.empty_like(out)
        accs = [torch.empty_like(out), torch.empty_like(out)]
        send = inp[((r - 1) % p) * m : ((r - 1) % p + 1) * m]
        right, left = (r + 1) % p, (r - 1) % p
        for s in range(p - 1):
            ri = (r - s - 2) % p
            _exchange(tr, send, right, tmp, left)
            acc = out if s == p - 2 else accs[s % 2]
            acc.copy_(inp[ri * m : (ri + 1) * m])
            reduce_(acc, tmp, op)
            send = acc
    finish_avg(out, p, op)


def recursive_halving_reduce_scatter(
    tr: Transport, out: torch.Tensor, inp: torch.Tensor, op: str
) -> None:
    """Halve the held range of blocks each step, reducing the kept half: lg p steps, ~n bytes."""
    p, r, m = tr.world_size, tr.rank, out.numel()
    p2, rem, v = _fold(p, r)
    if r < 2 * rem and r % 2 == 0:
        tr.send(inp, r + 1)
        tr.recv(out, r + 1)
    else:
        buf = inp.clone()
        if r < 2 * rem:
            tmp = torch.empty_like(inp)
            tr.recv(tmp, r - 1)
            reduce_(buf, tmp, op)
        lo, hi, d = 0, p2, p2 // 2
        tmp = torch.empty(inp.numel(), dtype=inp.dtype, device=inp.device)
        while d >= 1:
            partner = _real(v ^ d, rem)
            mid = (lo + hi) // 2
            keep, give = ((lo, mid), (mid, hi)) if v & d == 0 else ((mid, hi), (lo, mid))
            kept = buf[_vstart(keep[0], rem) * m : _vstart(keep[1], rem) * m]
            given = buf[_vstart(give[0], rem) * m : _vstart(give[1], rem) * m]
            recv = tmp[: kept.numel()]
            _exchange(tr, given, partner, recv, partner)
            reduce_(kept, recv, op)
            lo, hi = keep
            d //= 2
        out.copy_(buf[r * m : (r + 1) * m])
        if r < 2 * rem:
            tr.send(buf[(r - 1) * m : r * m], r - 1)
    finish_avg(out, p, op)


# --- broadcast ------------------------------------------------------------------------------------


def binomial_tree_broadcast(tr: Transport, x: torch.Tensor, root: int) -> None:
    """lg p rounds; in round k the 2^k ranks that have the data send it on (MPICH)."""
    p, r = tr.world_size, tr.rank
    rel = (r - root) % p
    mask = 1
    while mask < p:
        if rel & mask:
            tr.recv(x, (rel - mask + root) % p)
            break
        mask <<= 1
    mask >>= 1
    sends = []
    while mask > 0:
        if rel + mask < p:
            sends.append(tr.isend(x, (rel + mask + root) % p))
        mask >>= 1
    tr.wait_all(sends)


def scatter_allgather_broadcast(tr: Transport, x: torch.Tensor, root: int) -> None:
    """Binomial scatter of p blocks, then a ring all-gather: ~2n bytes per rank (van de Geijn)."""
    p, r = tr.world_size, tr.rank
    off = chunk_bounds(x.numel(), p)
    rel = (r - root) % p
    mask = 1
    while mask < p:
        if rel & mask:
            tr.recv(x[off[rel] : off[min(rel + mask, p)]], (rel - mask + root) % p)
            break
        mask <<= 1
    mask >>= 1
    sends = []
    while mask > 0:
        if rel + mask < p:
            block = x[off[rel + mask] : off[min(rel + 2 * mask, p)]]
            sends.append(tr.isend(block, (rel + mask + root) % p))
        mask >>= 1
    tr.wait_all(sends)
    right, left = (r + 1) % p, (r - 1) % p
    for s in range(p - 1):
        si, ri = (rel - s) % p, (rel - s - 1) % p
        _exchange(tr, x[off[si] : off[si + 1]], right, x[off[ri] : off[ri + 1]], left)


# --- all_to_all and barrier -----------------------------------------------------------------------


def pairwise_all_to_all(tr: Transport, out: torch.Tensor, inp: torch.Tensor) -> None:
    """Step s sends block (r+s) to rank r+s and receives block r from rank r-s: p-1 steps."""
    p, r = tr.world_size, tr.rank
    m = inp.numel() // p
    out[r * m : (r + 1) * m].copy_(inp[r * m : (r + 1) * m])
    for s in range(1, p):
        dst, src = (r + s) % p, (r - s) % p
        _exchange(tr, inp[dst * m : (dst + 1) * m], dst, out[src * m : (src + 1) * m], src)


def dissemination_barrier(tr: Transport) -> None:
    """Round k: signal rank r + 2^k, wait for rank r - 2^k; after lg p rounds all have arrived."""
    p, r = tr.world_size, tr.rank
    token, got = torch.zeros(1, dtype=torch.uint8), torch.empty(1, dtype=torch.uint8)
    d = 1
    while d < p:
        _exchange(tr, token, (r + d) % p, got, (r - d) % p)
        d *= 2

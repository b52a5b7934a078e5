"""Point-to-point transports that the collective algorithms are written against.

`Transport` is the small interface (isend/irecv/wait_all plus an argument check); `TorchTransport`
runs it on torch.distributed send/recv (gloo on CPU, NCCL on GPU, any number of hosts). shm.py has
the one-host transport."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.distributed as dist

# Reduction ops and dtypes travel between ranks as small integers (argument checks, descriptors).
REDUCE_OPS = ("sum", "avg", "max", "min")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.uint8)
OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "barrier")


class Work(Protocol):
    def wait(self) -> None: ...


class _DoneWork:
    """A transfer of zero bytes: both sides know the size, so neither sends anything."""

    def wait(self) -> None:
        return None


class Transport:
    """Send/recv between the ranks of one group; ranks are group ranks (0..world_size-1).

    `name` appears in every error so that a failure names the group; `timeout_s` bounds every wait.
    """

    rank: int
    world_size: int
    name: str
    timeout_s: float

    def isend(self, tensor: torch.Tensor, peer: int) -> Work:
        raise NotImplementedError

    def irecv(self, tensor: torch.Tensor, peer: int) -> Work:
        raise NotImplementedError

    def wait_all(self, works: Sequence[Work]) -> None:
        for w in works:
            w.wait()

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self.wait_all([self.isend(tensor, peer)])

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        self.wait_all([self.irecv(tensor, peer)])

    def check_args(self, op: str, desc: Sequence[int]) -> None:
        """Raise ValueError on every rank if the ranks called `op` with different arguments."""
        raise NotImplementedError


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (what travels: transports are dtype-blind)."""
    assert tensor.is_contiguous()
    return tensor.reshape(-1).view(torch.uint8)


def describe(op: str, tensor: torch.Tensor, reduce_op: str = "sum", extra: int = 0) -> list[int]:
    """The integers every rank must agree on for one call: op, element count, dtype, reduction,
    extra."""
    return [_OP_CODE[op], tensor.numel(), DTYPE_CODE[tensor.dtype], REDUCE_CODE[reduce_op], extra]


_OP_CODE = {op: i for i, op in enumerate(OPS)}
DTYPE_CODE = {dtype: i for i, dtype in enumerate(DTYPES)}
REDUCE_CODE = {op: i for i, op in enumerate(REDUCE_OPS)}


_DESC_FIELDS = ("op", "numel", "dtype", "reduce op", "root/offset")


def raise_on_mismatch(op: str, group: str, descs: Sequence[Sequence[int]]) -> None:
    """Compare the descriptors of all ranks; the error names the field and every rank's value."""
    for i, field in enumerate(_DESC_FIELDS):
        values = [int(d[i]) for d in descs]
        if len(set(values)) > 1:
            if field == "dtype":
                shown = [str(DTYPES[v]) if 0 <= v < len(DTYPES) else str(v) for v in values]
            elif field == "op":
                shown = [OPS[v] if 0 <= v < len(OPS) else str(v) for v in values]
            else:
                shown = [str(v) for v in values]
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
            raise ValueError(f"{op} on group {group}: ranks disagree on {field} ({per_rank})")


class Backoff:
    """Spin, then yield, then sleep: 4 ranks may share 2 cores, so a waiter must give its core away.

    Spinning (no system call) only pays when every rank has a core of its own, so `spin_s` is 0
    otherwise; `pause()` raises the exception made by `on_timeout` once past the deadline."""

    def __init__(
        self, timeout_s: float, on_timeout: Callable[[], Exception], spin_s: float = 0.0
    ) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self.spin_until = self.start + spin_s
        self.on_timeout = on_timeout
        self.rounds = 0

    def pause(self) -> None:
        self.rounds += 1
        now = time.monotonic()
        if now < self.spin_until:
            return
        if now > self.deadline:
            raise self.on_timeout()
        waited = now - self.start
        if waited < 2e-3:
            os.sched_yield()
        elif waited < 50e-3:
            time.sleep(20e-6)
        else:
            time.sleep(1e-3)


def spin_seconds(world_size: int) -> float:
    """How long a waiter spins before it yields: only if the ranks need no more cores than exist."""
    return 50e-6 if world_size <= (os.cpu_count() or 1) else 0.0


class TorchTransport(Transport):
    """torch.distributed point-to-point on `pg`: the transport for any backend and any number of
    hosts."""

    def __init__(self, pg: dist.ProcessGroup, name: str, timeout_s: float) -> None:
        self.pg = pg
        self.name = name
        self.timeout_s = timeout_s
        self.rank = dist.get_rank(pg)
        self.world_size = dist.get_world_size(pg)
        self._global = dist.get_process_group_ranks(pg)

    def isend(self, tensor: torch.Tensor, peer: int) -> Work:
        if tensor.numel() == 0:
            return _DoneWork()
        return _TorchWork(self, _p2p(dist.isend, tensor, self._global[peer], self.pg), peer)

    def irecv(self, tensor: torch.Tensor, peer: int) -> Work:
        if tensor.numel() == 0:
            return _DoneWork()
        return _TorchWork(self, _p2p(dist.irecv, tensor, self._global[peer], self.pg), peer)

    def check_args(self, op: str, desc: Sequence[int]) -> None:
        """Every rank sends its descriptor to every other rank: a rank that never arrives is named
        directly (a ring would only name its neighbour), and disagreeing arguments are caught."""
        p, me = self.world_size, self.rank
        device = "cuda" if dist.get_backend(self.pg) == "nccl" else "cpu"
        descs = torch.zeros(p, len(desc), dtype=torch.int64, device=device)
        descs[me] = torch.tensor(desc, dtype=torch.int64)
        peers = [q for q in range(p) if q != me]
        recvs = {q: _p2p(dist.irecv, descs[q], self._global[q], self.pg) for q in peers}
        sends = [_p2p(dist.isend, descs[me], self._global[q], self.pg) for q in peers]
        deadline = time.monotonic() + self.timeout_s
        missing = []
        for q, work in recvs.items():
            left = max(0.01, deadline - time.monotonic())
            try:
                work.wait(timeout=datetime.timedelta(seconds=left))
            except RuntimeError:
                missing.append(q)
        if missing:
            raise TimeoutError(
                f"group {self.name}: rank {me} waited {self.timeout_s:g}s for rank(s) {missing}"
            )
        for w in sends:
            w.wait()
        raise_on_mismatch(op, self.name, descs.tolist())


def _p2p(fn: Callable, tensor: torch.Tensor, peer: int, pg: dist.ProcessGroup) -> dist.Work:
    work = fn(as_bytes(tensor), peer, group=pg)
    assert work is not None  # None only for ranks outside pg
    return work


class _TorchWork:
    def __init__(self, transport: TorchTransport, work: dist.Work, peer: int) -> None:
        self.transport = transport
        self.work = work
        self.peer = peer

    def wait(self) -> None:
        t = self.transport
        try:
            self.work.wait(timeout=datetime.timedelta(seconds=t.timeout_s))
        except RuntimeError as e:
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                raise TimeoutError(
                    f"group {t.name}: rank {t.rank} waited {t.timeout_s:g}s for rank {self.peer}"
                ) from e
            raise RuntimeError(
                f"group {t.name}: rank {t.rank}: transfer with rank {self.peer} failed: {e}"
            ) from e

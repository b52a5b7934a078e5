"""Shared-memory transport for the ranks of a group on one host.

Each rank owns one segment in /dev/shm (control words, two staging halves for direct collectives,
one mailbox slot per peer) and maps every peer's: ranks read each other's buffers directly.
Synchronization is a per-rank monotonic tick counter in shared memory (signal = store, wait = poll
with backoff), not a socket. Segments are unlinked as soon as every rank has mapped them, so nothing
is left in /dev/shm after exit or a crash; a crash inside that window is cleaned by the next group
on the host (stale files of dead pids)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import mmap
import os
import platform
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from aiinfra.comm import native
from aiinfra.comm.native import FastPath
from aiinfra.comm.transport import (
    DTYPE_CODE,
    REDUCE_CODE,
    Backoff,
    Transport,
    Work,
    as_bytes,
    raise_on_mismatch,
    spin_seconds,
)
from aiinfra.comm.tuner import SHM_CHUNK_BYTES

SHM_DIR = "/dev/shm"
PREFIX = "aiinfra-comm-"
_ALIGN = 4096

# Control words (int64) at the start of every segment.
# a sleeping waiter publishes 1 + the rank it sleeps on and the tick it needs: signals wake only it;
# _BASE is the segment's address in its owner's address space (the cross-memory-attach probe reads
# the owner's _PID word through it)
_PID, _TICK, _WAIT_RANK, _WAIT_TICK, _BASE = 0, 1, 2, 3, 4
_DESC = 8  # two descriptor slots of 8 words, used alternately by consecutive collectives
_DESC_LEN = 5  # describe()'s integers; the slot's last 3 words carry addresses, not compared
# _SEND + q: messages this rank has put in its slot for q; _ACK + q: taken from q; _LEN + q: size
_SEND = 32


# A rank blocked on a peer's tick sleeps in the kernel (futex on the tick's low 32 bits, in shared
# memory) instead of burning a core another rank needs; every signal wakes the sleepers.
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex_wait(addr: int, expected: int, timeout_s: float) -> None:
    if _SYS_FUTEX is None:
        time.sleep(min(timeout_s, 50e-6))
        return
    ts = _Timespec(int(timeout_s), int(timeout_s % 1 * 1e9))
    value = ctypes.c_int32(expected & 0xFFFFFFFF).value
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), 0, value, ctypes.byref(ts), None, 0)


def _futex_wake(addr: int) -> None:
    if _SYS_FUTEX is not None:
        _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), 1, 0x7FFFFFFF, None, None, 0)


# Cross Memory Attach (process_vm_readv(2)): copy straight out of a peer's private memory, given its
# pid and an address there, in one kernel copy. Needs ptrace access to the peer (same uid and no
# Yama restriction, or CAP_SYS_PTRACE); probed once per group, which falls back to staging if not.
class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _cma_function(name: str) -> Any:
    fn = getattr(_libc, name, None)
    if fn is not None:
        iov = ctypes.POINTER(_Iovec)
        fn.argtypes = [ctypes.c_int, iov, ctypes.c_ulong, iov, ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_ssize_t
    return fn


_process_vm_readv = _cma_function("process_vm_readv")
_process_vm_writev = _cma_function("process_vm_writev")


def cma_read(pid: int, local_addr: int, remote_addr: int, nbytes: int) -> None:
    """Copy `nbytes` from `remote_addr` in process `pid` to `local_addr` here; OSError on failure
    (EPERM: no ptrace access, ESRCH: the process is gone, ENOSYS: not in this kernel)."""
    _cma_copy(_process_vm_readv, "process_vm_readv", pid, local_addr, remote_addr, nbytes)


def cma_write(pid: int, local_addr: int, remote_addr: int, nbytes: int) -> None:
    """Copy `nbytes` from `local_addr` here to `remote_addr` in process `pid` (as cma_read)."""
    _cma_copy(_process_vm_writev, "process_vm_writev", pid, local_addr, remote_addr, nbytes)


def _cma_copy(fn: Any, name: str, pid: int, local_addr: int, remote_addr: int, nbytes: int) -> None:
    if fn is None:
        raise OSError(38, f"{name} is not in this C library")
    done = 0
    while done < nbytes:  # the kernel may copy less than asked (it stops at a fault)
        local = _Iovec(local_addr + done, nbytes - done)
        remote = _Iovec(remote_addr + done, nbytes - done)
        got = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            err = ctypes.get_errno() if got < 0 else 14  # 0 bytes: EFAULT
            raise OSError(err, f"{name} with pid {pid}: {os.strerror(err)}")
        done += got


@dataclass(frozen=True, kw_only=True)
class ShmConfig:
    chunk_bytes: int = SHM_CHUNK_BYTES  # direct collectives stream through two halves of this size
    slot_bytes: int = 1 << 20  # point-to-point mailbox per (sender, receiver) pair
    cma: bool = True  # read peers' private tensors with process_vm_readv where the kernel allows
    # after spinning, a waiter calls sched_yield() this long before it sleeps in a futex: it stays
    # runnable, so a peer sharing its core hands over in a syscall instead of a wake-up (measured,
    # 8 B all_reduce at world 4 on 2 cores, C path: 34-60 us per call with 0.1-1 ms, 85-91 us
    # with 0: a futex wake-up costs tens of microseconds on this VM)
    yield_s: float = 1e-3
    # the tick wait and one-chunk one-shot all_reduce in C (comm/native.py), where a C compiler is
    # found; False keeps everything in Python (the reference)
    native: bool = True

    def __post_init__(self) -> None:
        for field in ("chunk_bytes", "slot_bytes"):
            value = getattr(self, field)
            if value < 4096 or value % 64:
                raise ValueError(f"{field} ({value}) must be >= 4096 and a multiple of 64")
        if not 0 <= self.yield_s < 1:
            raise ValueError(f"yield_s ({self.yield_s}) must be in [0, 1) seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead child its parent has not reaped yet is a zombie: dead for us
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_segments() -> list[str]:
    """Unlink segments whose creating process is gone (killed between create and unlink)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(SHM_DIR):
            if not entry.startswith(PREFIX):
                continue
            try:
                pid = int(entry[len(PREFIX) :].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SHM_DIR, entry))
                    removed.append(entry)
    return removed


class _Segment:
    """One mapped file: `data` is a uint8 tensor over all of it, `ctrl` an int64 numpy view of the
    header."""

    def __init__(self, path: str, nbytes: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, nbytes)
            self.mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self.mm, dtype=np.uint8)
        self.data = torch.from_numpy(self.array)
        self.ctrl = self.array[:_ALIGN].view(np.int64)


_own_paths: set[str] = set()


@atexit.register
def _unlink_own() -> None:
    for path in list(_own_paths):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def map_group_segments(pg: dist.ProcessGroup, nbytes: int) -> list[_Segment]:
    """Collective on `pg`: each rank creates its segment, maps all peers', then unlinks its own."""
    remove_stale_segments()
    path = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
    _own_paths.add(path)
    own = _Segment(path, nbytes, create=True)
    own.ctrl[_PID] = os.getpid()
    own.ctrl[_BASE] = own.data.data_ptr()
    paths: list[str | None] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(paths, path, group=pg)
    me = dist.get_rank(pg)
    segments = [
        own if r == me else _Segment(str(p), nbytes, create=False) for r, p in enumerate(paths)
    ]
    dist.barrier(group=pg)  # every rank has mapped every segment: the names can go
    os.unlink(path)
    _own_paths.discard(path)
    return segments


class SharedMemoryTransport(Transport):
    """Point-to-point mailboxes and tick barriers over shared memory, for ranks of `pg` on one host.

    Collective on `pg` to construct. The direct collectives in algorithms.py use `staging`,
    `barrier`, `acquire_half` / `release_half`; the point-to-point algorithms use isend/irecv like
    any transport."""

    def __init__(
        self, pg: dist.ProcessGroup, name: str, timeout_s: float, config: ShmConfig
    ) -> None:
        self.pg = pg
        self.name = name
        self.timeout_s = timeout_s
        self.config = config
        self.rank = dist.get_rank(pg)
        self.world_size = p = dist.get_world_size(pg)
        assert _SEND + 3 * p <= _ALIGN // 8, f"world size {p} too large for the control header"
        self._ack, self._len = _SEND + p, _SEND + 2 * p
        self._staging_off = _ALIGN
        self._slot_off = _ALIGN + 2 * config.chunk_bytes
        self.segments = map_group_segments(pg, self._slot_off + p * config.slot_bytes)
        self.ctrls = [s.ctrl for s in self.segments]
        self.pids = [int(c[_PID]) for c in self.ctrls]
        self._tick_addr = [s.data.data_ptr() + 8 * _TICK for s in self.segments]
        self._tick = 0
        self._spin_s = spin_seconds(p)
        self._calls = 0
        self._next_half = 1
        self._views: dict[tuple, list[torch.Tensor]] = {}
        self._half_free = [0, 0]  # tick every peer must reach before a staging half is reused
        self._sends: list[deque[_ShmWork]] = [deque() for _ in range(p)]
        self._recvs: list[deque[_ShmWork]] = [deque() for _ in range(p)]
        self._registered: list[tuple[int, int, list[_Segment]]] = []
        self.cma = config.cma and self._probe_cma()
        self.fast = self._load_fast_path() if config.native else None

    def _load_fast_path(self) -> FastPath | None:
        """Collective: the C path if every rank could load it (all ranks reduce the same way)."""
        lib = native.library() if self.world_size <= native.MAX_WORLD else None
        oks: list[bool | None] = [None] * self.world_size
        dist.all_gather_object(oks, lib is not None, group=self.pg)
        if lib is None or not all(oks):
            return None
        half0, half1 = (
            [self.staging(q, h).data_ptr() for q in range(self.world_size)] for h in (0, 1)
        )
        ctrl_addrs = [s.data.data_ptr() for s in self.segments]
        args = (self._spin_s, self.config.yield_s, self.timeout_s)
        return FastPath(lib, self.rank, ctrl_addrs, (half0, half1), *args)

    def _probe_cma(self) -> bool:
        """Collective: True if every rank can process_vm_readv every peer (all agree, or none)."""
        ok = True
        word = np.zeros(1, dtype=np.int64)
        for q in range(self.world_size):
            if q == self.rank:
                continue
            try:
                cma_read(self.pids[q], word.ctypes.data, int(self.ctrls[q][_BASE]) + 8 * _PID, 8)
                ok = ok and int(word[0]) == self.pids[q]
            except OSError:
                ok = False
        oks: list[bool | None] = [None] * self.world_size
        dist.all_gather_object(oks, ok, group=self.pg)
        return all(oks)

    def peer_write(self, src: torch.Tensor, rank: int, remote_addr: int) -> None:
        """Copy contiguous `src` to address `remote_addr` in rank `rank`'s process (CMA)."""
        self._peer_copy(cma_write, "write", src, rank, remote_addr)

    def _peer_copy(
        self, fn: Any, verb: str, local: torch.Tensor, rank: int, remote_addr: int
    ) -> None:
        nbytes = local.numel() * local.element_size()
        if nbytes:
            try:
                fn(self.pids[rank], local.data_ptr(), remote_addr, nbytes)
            except OSError as e:
                self._check_alive([rank])
                raise RuntimeError(
                    f"group {self.name}: rank {self.rank} could not {verb} rank {rank}'s memory:"
                    f" {e}"
                ) from e

    # --- ticks: signal = store own counter, wait = every peer's counter reached the value ---------

    def next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def signal(self, tick: int) -> None:
        if self.fast is not None:
            self.fast.signal(tick)
            return
        self.ctrls[self.rank][_TICK] = tick
        me = self.rank + 1
        if any(c[_WAIT_RANK] == me and c[_WAIT_TICK] <= tick for c in self.ctrls):
            _futex_wake(self._tick_addr[self.rank])

    def wait_tick(self, tick: int) -> None:
        if self.fast is not None and self.fast.wait(tick):
            return  # the same spin, yield and futex stages in C, for up to native.BUDGET_S
        ctrls = self.ctrls
        if all(c[_TICK] >= tick for c in ctrls):
            return
        now = start = time.monotonic()
        spin_until, next_check = start + self._spin_s, start + 0.1
        while now < spin_until:
            if all(c[_TICK] >= tick for c in ctrls):
                return
            now = time.monotonic()
        yield_until = now + self.config.yield_s
        while now < yield_until:
            os.sched_yield()
            if all(c[_TICK] >= tick for c in ctrls):
                return
            now = time.monotonic()
        while True:
            missing = [q for q, c in enumerate(ctrls) if c[_TICK] < tick]
            if not missing:
                return
            q = missing[0]
            own = ctrls[self.rank]
            own[_WAIT_TICK] = tick
            own[_WAIT_RANK] = q + 1
            seen = int(ctrls[q][_TICK])
            if seen < tick:
                # a wake-up lost to store/load reordering against signal() costs at most this 1 ms
                _futex_wait(self._tick_addr[q], seen, 1e-3)
            own[_WAIT_RANK] = 0
            now = time.monotonic()
            if now > next_check:
                next_check = now + 0.1
                self._check_alive(missing)
                if now - start > self.timeout_s:
                    raise self._timeout(tick)

    def barrier(
        self, desc: Sequence[int] | None = None, op: str = "barrier", publish: Sequence[int] = ()
    ) -> list[list[int]] | None:
        """All ranks arrive; with `desc`, also check that all ranks called `op` with the same
        arguments, and return every rank's `publish` words (up to 3, e.g. addresses)."""
        if desc is not None:
            slot = self._next_desc_slot()
            own = self.ctrls[self.rank]
            own[slot : slot + _DESC_LEN] = desc
            if publish:
                own[slot + _DESC_LEN : slot + _DESC_LEN + len(publish)] = publish
        tick = self.next_tick()
        self.signal(tick)
        self.wait_tick(tick)
        if desc is None:
            return None
        words = [c[slot : slot + _DESC_LEN + len(publish)].tolist() for c in self.ctrls]
        first = words[0][:_DESC_LEN]
        if any(w[:_DESC_LEN] != first for w in words):
            raise_on_mismatch(op, self.name, [w[:_DESC_LEN] for w in words])
        return [w[_DESC_LEN:] for w in words]

    def one_shot_native(self, x: torch.Tensor, out: torch.Tensor, op: str) -> bool:
        """direct.one_shot_all_reduce of one chunk (contiguous x, out), in C: the same halves,
        ticks and descriptor slot as the Python path. False (nothing done) where the C path is
        missing or slower (16-bit floats above 4 KiB, anything above 1 MiB)."""
        fast = self.fast
        if fast is None:
            return False
        dtype, reduce_op = DTYPE_CODE[x.dtype], REDUCE_CODE[op]
        if x.numel() * x.element_size() > fast.max_bytes.get((dtype, reduce_op), -1):
            return False
        h = self.next_half()
        slot = self._next_desc_slot()
        tick = self.next_tick()
        args = (x.data_ptr(), out.data_ptr(), x.numel(), dtype, reduce_op, tick, h, slot)
        rc = fast.one_shot(*args, self._half_free[h])
        if rc == 4:  # a peer still reads this half from two calls ago: wait in Python, retry
            self.acquire_half(h)
            rc = fast.one_shot(*args, self._half_free[h])
        if rc == 1:  # past the C wait's budget: the Python wait reports timeouts and dead peers
            self.wait_tick(tick)
            rc = fast.one_shot_finish()
        if rc == 2:
            words = [c[slot : slot + _DESC_LEN].tolist() for c in self.ctrls]
            raise_on_mismatch("all_reduce", self.name, words)
        assert rc == 0, f"shm_fast.c ai_one_shot returned {rc}"
        self.free_half_at_next_tick(h)
        return True

    def _next_desc_slot(self) -> int:
        """Consecutive described calls alternate between the two descriptor slots: a peer may
        still read this call's words while we write the next call's."""
        self._calls += 1
        return _DESC + 8 * (self._calls & 1)

    def check_args(self, op: str, desc: Sequence[int]) -> None:
        self.barrier(desc, op)

    def _timeout(self, tick: int) -> TimeoutError:
        missing = [r for r, c in enumerate(self.ctrls) if c[_TICK] < tick]
        return TimeoutError(
            f"group {self.name}: rank {self.rank} waited {self.timeout_s:g}s for rank(s) {missing}"
        )

    def _check_alive(self, ranks: Sequence[int]) -> None:
        dead = [r for r in ranks if not _pid_alive(self.pids[r])]
        if dead:
            raise RuntimeError(
                f"group {self.name}: rank(s) {dead} exited (pid {[self.pids[r] for r in dead]})"
            )

    # --- staging for direct collectives -----------------------------------------------------------

    def staging_views(self, half: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every rank's staging half as `numel` x `dtype` (cached: a slice costs ~3 us)."""
        key = (half, numel, dtype)
        views = self._views.get(key)
        if views is None:
            nbytes = numel * dtype.itemsize
            views = [self.staging(q, half)[:nbytes].view(dtype) for q in range(self.world_size)]
            if len(self._views) > 256:
                self._views.clear()
            self._views[key] = views
        return views

    def staging(self, rank: int, half: int) -> torch.Tensor:
        start = self._staging_off + half * self.config.chunk_bytes
        return self.segments[rank].data[start : start + self.config.chunk_bytes]

    def next_half(self) -> int:
        self._next_half ^= 1
        return self._next_half

    def acquire_half(self, half: int) -> None:
        """Wait until every peer has finished reading this rank's staging half from its last use."""
        self.wait_tick(self._half_free[half])

    def free_half_at_next_tick(self, half: int) -> None:
        """Instead of release_half's signal, when this rank is done with the half: every rank runs
        the same sequence of ticks, so a peer's next tick comes after its reads of this half (one
        signal, and possibly one futex wake, less per small collective)."""
        self._half_free[half] = self._tick + 1

    def release_half(self, half: int) -> None:
        tick = self.next_tick()
        self.signal(tick)
        self._half_free[half] = tick

    # --- registered buffers: tensors that live in shared memory, so peers read them in place ------

    def alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Collective: a tensor of `numel` elements in this rank's new shared segment (peers map
        it)."""
        nbytes = max(64, numel * torch.empty((), dtype=dtype).element_size())
        segments = map_group_segments(self.pg, nbytes)
        data = segments[self.rank].data
        self._registered.append((data.data_ptr(), nbytes, segments))
        return data[:nbytes].view(dtype)[:numel]

    def registered_peers(self, tensor: torch.Tensor) -> tuple[int, list[torch.Tensor]] | None:
        """(byte offset, every rank's uint8 view of the same region) if `tensor` is a registered
        buffer."""
        ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        for base, size, segments in self._registered:
            if base <= ptr and ptr + nbytes <= base + size and tensor.is_contiguous():
                off = ptr - base
                return off, [s.data[off : off + nbytes] for s in segments]
        return None

    # --- point-to-point: one mailbox slot per (sender, receiver); messages are chunked through it -

    def isend(self, tensor: torch.Tensor, peer: int) -> Work:
        return self._post(self._sends[peer], _ShmWork(as_bytes(tensor), peer))

    def irecv(self, tensor: torch.Tensor, peer: int) -> Work:
        return self._post(self._recvs[peer], _ShmWork(as_bytes(tensor), peer))

    def _post(self, queue: deque[_ShmWork], work: _ShmWork) -> _ShmWork:
        work.transport = self
        queue.append(work)
        self.progress()
        return work

    def progress(self) -> None:
        for peer in range(self.world_size):
            while self._sends[peer] and self._progress_send(self._sends[peer][0]):
                self._sends[peer].popleft()
            while self._recvs[peer] and self._progress_recv(self._recvs[peer][0]):
                self._recvs[peer].popleft()

    def _progress_send(self, w: _ShmWork) -> bool:
        mine, theirs, q = self.ctrls[self.rank], self.ctrls[w.peer], w.peer
        slot = self._slot(self.rank, q)
        while w.offset < w.nbytes or w.chunks == 0:
            if mine[_SEND + q] != theirs[self._ack + self.rank]:
                return False  # the receiver has not emptied the slot yet
            n = min(self.config.slot_bytes, w.nbytes - w.offset)
            slot[:n].copy_(w.buf[w.offset : w.offset + n])
            mine[self._len + q] = w.nbytes
            mine[_SEND + q] += 1
            w.offset += n
            w.chunks += 1
        w.done = True
        return True

    def _progress_recv(self, w: _ShmWork) -> bool:
        mine, theirs, q = self.ctrls[self.rank], self.ctrls[w.peer], w.peer
        slot = self._slot(q, self.rank)
        while w.offset < w.nbytes or w.chunks == 0:
            if theirs[_SEND + self.rank] == mine[self._ack + q]:
                return False
            if theirs[self._len + self.rank] != w.nbytes:
                raise ValueError(
                    f"group {self.name}: rank {q} sent {theirs[self._len + self.rank]} bytes,"
                    f" rank {self.rank} expected {w.nbytes}"
                )
            n = min(self.config.slot_bytes, w.nbytes - w.offset)
            w.buf[w.offset : w.offset + n].copy_(slot[:n])
            mine[self._ack + q] += 1
            w.offset += n
            w.chunks += 1
        w.done = True
        return True

    def _slot(self, sender: int, receiver: int) -> torch.Tensor:
        start = self._slot_off + receiver * self.config.slot_bytes
        return self.segments[sender].data[start : start + self.config.slot_bytes]

    def wait_all(self, works: Sequence[Work]) -> None:
        pending = [w for w in works if isinstance(w, _ShmWork)]
        self.progress()
        if all(w.done for w in pending):
            return
        backoff = Backoff(self.timeout_s, lambda: self._p2p_timeout(pending), self._spin_s)
        while True:
            self.progress()
            if all(w.done for w in pending):
                return
            backoff.pause()
            if backoff.rounds & 4095 == 0:
                self._check_alive([w.peer for w in pending if not w.done])

    def _p2p_timeout(self, works: Sequence[_ShmWork]) -> TimeoutError:
        peers = sorted({w.peer for w in works if not w.done})
        return TimeoutError(
            f"group {self.name}: rank {self.rank} waited {self.timeout_s:g}s for rank(s) {peers}"
        )

    def close(self) -> None:
        """Drop this rank's mappings (memory is freed when the last rank drops them)."""
        self.ctrls = []
        for seg in self.segments:
            seg.data = seg.array = seg.ctrl = None  # type: ignore[assignment]
        self.segments = []
        self._registered = []


class _ShmWork:
    __slots__ = ("buf", "peer", "nbytes", "offset", "chunks", "done", "transport")

    def __init__(self, buf: torch.Tensor, peer: int) -> None:
        self.buf = buf
        self.peer = peer
        self.nbytes = buf.numel()
        self.offset = 0
        self.chunks = 0  # a zero-byte message is still one (empty) chunk: both sides stay in step
        self.done = False
        self.transport: SharedMemoryTransport | None = None

    def wait(self) -> None:
        assert self.transport is not None
        self.transport.wait_all([self])

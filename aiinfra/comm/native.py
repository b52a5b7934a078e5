"""The C latency path of the shared-memory transport (csrc/shm_fast.c): the tick wait loop and the
one-chunk one-shot all_reduce, compiled on first use with the system C compiler (like Triton's
launchers) and called through ctypes. Without a compiler everything runs in Python (shm.py and
direct.py, the same protocol), which is also the reference the tests compare it with."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_SRC = Path(__file__).parent / "csrc" / "shm_fast.c"
_ARGS = 12  # argument words at the start of the context (see shm_fast.c)
MAX_WORLD = 64  # shm_fast.c's MAX_WORLD
BUDGET_S = 0.1  # a C wait returns after this at most, so Python can check timeouts and peers

_lib: ctypes.CDLL | None = None
_failed = False


def _build_dir() -> Path:
    root = os.environ.get("AIINFRA_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "aiinfra" / "torch_extensions"


def library() -> ctypes.CDLL | None:
    """The compiled shm_fast.c, or None (after one warning) where it cannot be built."""
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    try:
        flags = ["-O3", "-shared", "-fPIC"]
        key = _SRC.read_bytes() + " ".join([platform.machine(), *flags]).encode()
        tag = hashlib.sha1(key).hexdigest()[:12]
        build = _build_dir()
        build.mkdir(parents=True, exist_ok=True)
        path = build / f"comm_shm_fast_{tag}.so"
        if not path.exists():
            with open(build / "comm_shm_fast.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # every rank of a group starts here at once
                if not path.exists():
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    cc = os.environ.get("CC", "cc")
                    cmd = [cc, *flags, "-o", str(tmp), str(_SRC)]
                    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
                    os.replace(tmp, path)
        lib = ctypes.CDLL(str(path))
        packed = ("signal", "wait", "one_shot", "one_shot_finish")
        for name in packed:
            getattr(lib, f"ai_{name}_packed").restype = ctypes.c_int64
        for name in ("ai_supports", "ai_max_bytes"):
            getattr(lib, name).restype = ctypes.c_int64
        lib.ai_supports.argtypes = [ctypes.c_int64, ctypes.c_int64]
        lib.ai_max_bytes.argtypes = [ctypes.c_int64]
        _lib = lib
    except (OSError, subprocess.SubprocessError) as e:
        _failed = True
        detail = getattr(e, "stderr", b"") or b""
        reason = (detail.decode(errors="replace").strip() or str(e)).splitlines()[0][:200]
        logger.warning("comm: C latency path unavailable (%s); using Python", reason)
    return _lib


class FastPath:
    """The C entry points bound to one group's shared memory (addresses in this process)."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        rank: int,
        ctrl_addrs: Sequence[int],
        staging_addrs: tuple[Sequence[int], Sequence[int]],
        spin_s: float,
        yield_s: float,
        timeout_s: float,
    ) -> None:
        p = len(ctrl_addrs)
        self.budget_ns = int(min(BUDGET_S, timeout_s) * 1e9)
        words = [p, rank, int(spin_s * 1e9), int(yield_s * 1e9)]
        words += [*ctrl_addrs, *staging_addrs[0], *staging_addrs[1]]
        self._ctx = (ctypes.c_int64 * (_ARGS + len(words)))(*([0] * _ARGS + words))
        self._ptr = ctypes.c_void_p(ctypes.addressof(self._ctx))
        self._signal = lib.ai_signal_packed
        self._wait = lib.ai_wait_packed
        self._one_shot = lib.ai_one_shot_packed
        self._finish = lib.ai_one_shot_finish_packed
        # (dtype code, reduce op code) -> the largest one-shot all_reduce the C path takes
        self.max_bytes = {
            (d, o): lib.ai_max_bytes(d) for d in range(6) for o in range(4) if lib.ai_supports(d, o)
        }

    def signal(self, tick: int) -> None:
        """Publish this rank's tick and wake a peer that sleeps on it (a full fence between the
        two, so no wake-up is lost)."""
        struct.pack_into("q", self._ctx, 8 * 10, tick)
        self._signal(self._ptr)

    def wait(self, tick: int) -> bool:
        """True once every rank's tick reached `tick`; False after the budget (not yet)."""
        struct.pack_into("2q", self._ctx, 8 * 10, tick, self.budget_ns)
        return self._wait(self._ptr) == 0

    def one_shot(
        self,
        src: int,
        dst: int,
        numel: int,
        dtype: int,
        op: int,
        tick: int,
        half: int,
        slot: int,
        half_free: int,
    ) -> int:
        """shm_fast.c's ai_one_shot; its return code (0 done, 1 wait, 2 mismatch, 4 half busy)."""
        args = (src, dst, numel, dtype, op, tick, half, slot, half_free, self.budget_ns)
        struct.pack_into("10q", self._ctx, 0, *args)
        return self._one_shot(self._ptr)

    def one_shot_finish(self) -> int:
        """After a one_shot that returned 1 and a completed wait: check descriptors and reduce."""
        return self._finish(self._ptr)

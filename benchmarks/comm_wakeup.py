"""The latency floor of a cross-process collective on this machine: an 8-byte pipe ping-pong
between two processes (each hop is a kernel wake-up of a blocked process, as in any barrier whose
peer is not spinning). An 8-byte all_reduce needs at least one such hop; compare with
`aiinfra bench comm --sizes 8` run at the same load.

    python benchmarks/comm_wakeup.py [iterations]
"""

from __future__ import annotations

import os
import sys
import time


def round_trip_s(iterations: int) -> float:
    """Seconds per ping-pong (two wake-ups) between this process and a forked child."""
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for _ in range(iterations):
            os.read(a_r, 8)
            os.write(b_w, b"x" * 8)
        os._exit(0)
    start = time.perf_counter()
    for _ in range(iterations):
        os.write(a_w, b"x" * 8)
        os.read(b_r, 8)
    elapsed = time.perf_counter() - start
    os.waitpid(pid, 0)
    return elapsed / iterations


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    rt = round_trip_s(n)
    load = os.getloadavg()[0]
    print(f"pipe round trip {rt * 1e6:.1f} us, one hop {rt / 2 * 1e6:.1f} us (load {load:.1f})")

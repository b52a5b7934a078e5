"""run_distributed: run a module-level function on gloo ranks; fail, never hang, on error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiinfra.comm.spawn import free_port, spawn_local

__all__ = ["free_port", "run_distributed"]


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0
) -> None:
    """Run fn(rank, world_size, *args) on world_size gloo ranks; re-raise the first failure."""
    spawn_local(fn, world_size, args, timeout_s=timeout_s, pg_timeout_s=60.0)

"""Public collectives: all_reduce, all_gather, reduce_scatter, broadcast, all_to_all, barrier.

Each takes its `CommGroup` explicitly and an `impl`: "auto" (the cost model's cheapest correct
choice, torch.distributed's own collective included), "torch" (torch.distributed's own), an
algorithm name such as "ring", or "algorithm@transport" ("ring@torch", "two_shot@shm"). Tensors are
flat-viewed; shapes only matter through their element counts, so any count works, including ones not
divisible by the world size."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from aiinfra.comm import algorithms as alg
from aiinfra.comm import direct
from aiinfra.comm.shm import SharedMemoryTransport, ShmConfig
from aiinfra.comm.transport import DTYPES, REDUCE_OPS, TorchTransport, Transport, describe
from aiinfra.comm.tuner import (
    ALGORITHMS,
    DEFAULT_PARAMS,
    DEFAULT_TUNING_PATH,
    NATIVE,
    REGISTERED_ONLY,
    SHM_ALGORITHMS,
    SHM_CHUNK_BYTES,
    LinkParams,
    algorithm_cost,
    algorithm_params,
    load_params,
)


@dataclass(frozen=True, kw_only=True)
class CommConfig:
    timeout_s: float = 60.0  # a peer that has not arrived by then is named in a TimeoutError
    use_shm: bool = True  # shared-memory transport when every rank of the group is on this host
    shm: ShmConfig = field(default_factory=ShmConfig)
    check_args: bool = True  # p2p algorithms first compare (op, count, dtype) across ranks
    tuning_path: Path | None = DEFAULT_TUNING_PATH  # calibrate()'s output; defaults used if absent

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s ({self.timeout_s}) must be > 0")


class CommGroup:
    """The ranks of one torch.distributed group with their transports. Collective to construct.

    Owns the shared-memory segments (mapped now, unlinked from /dev/shm before this returns) and the
    cost-model parameters used by impl="auto"."""

    def __init__(
        self, pg: dist.ProcessGroup, config: CommConfig | None = None, name: str | None = None
    ) -> None:
        self.pg = pg
        self.config = config = config or CommConfig()
        self.rank = dist.get_rank(pg)
        self.world_size = dist.get_world_size(pg)
        self.ranks = dist.get_process_group_ranks(pg)
        self.name = name or f"ranks{self.ranks}"
        self.torch = TorchTransport(pg, self.name, config.timeout_s)
        hosts: list[str | None] = [None] * self.world_size
        dist.all_gather_object(hosts, socket.gethostname(), group=pg)
        self.shm: SharedMemoryTransport | None = None
        if config.use_shm and len(set(hosts)) == 1 and self.world_size > 1:
            self.shm = SharedMemoryTransport(pg, self.name, config.timeout_s, config.shm)
        fitted = load_params(config.tuning_path, self.world_size) if config.tuning_path else None
        self.params: dict[str, LinkParams] = {**DEFAULT_PARAMS, **(fitted or {})}
        self._choices: dict[tuple, tuple[str, str]] = {}

    def alloc(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Collective: a buffer in shared memory that peers read in place (like NCCL's registered
        buffers); all_reduce on it skips the copy into staging. Plain memory without shm."""
        if self.shm is None:
            return torch.empty(numel, dtype=dtype)
        return self.shm.alloc(numel, dtype)

    def destroy(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None

    def transport(self, name: str) -> Transport:
        if name == "shm":
            if self.shm is None:
                raise ValueError(f"impl transport 'shm' is not available on group {self.name}")
            return self.shm
        return self.torch

    def choose(
        self, op: str, nbytes: int, device: torch.device, registered: bool = False
    ) -> tuple[str, str]:
        """(algorithm, transport) with the lowest modelled time; NCCL's tuner on CUDA tensors.
        `registered`: the tensor is an in-place buffer from alloc(), which peers map."""
        key = (op, nbytes, device.type, registered)
        if key not in self._choices:
            cands = [(NATIVE, NATIVE)]
            if device.type == "cpu":
                cands += [(a, "torch") for a in ALGORITHMS[op]]
                if self.shm is not None:
                    # without a registered buffer (or CMA) these would run as staging two_shot
                    skip = (() if registered else REGISTERED_ONLY) + (() if self.shm.cma else CMA)
                    cands += [(a, "shm") for a in SHM_ALGORITHMS[op] + ALGORITHMS[op]]
                    cands = [c for c in cands if c[0] not in skip]
            self._choices[key] = min(cands, key=lambda c: self.cost(op, c[0], c[1], nbytes))
        return self._choices[key]

    def cost(self, op: str, algorithm: str, transport: str, nbytes: int) -> float:
        """Modelled seconds; point-to-point algorithms on shm use the mailbox parameters, and
        calibrated algorithms their own (see tuner.algorithm_params)."""
        key = "shm_p2p" if transport == "shm" and algorithm not in SHM_ALGORITHMS[op] else transport
        params = algorithm_params(self.params, key, op, algorithm)
        return algorithm_cost(op, algorithm, nbytes, self.world_size, params)

    def resolve(
        self, op: str, impl: str, nbytes: int, device: torch.device, registered: bool = False
    ) -> tuple[str, str]:
        if impl == "auto":
            return self.choose(op, nbytes, device, registered)
        if impl in ("torch", NATIVE):
            return NATIVE, NATIVE
        name, _, transport = impl.partition("@")
        valid = ALGORITHMS[op] + SHM_ALGORITHMS[op]
        if name not in valid or transport not in ("", "shm", "torch"):
            raise ValueError(
                f"impl ({impl!r}) must be auto, torch, or ALGORITHM[@shm|@torch] with ALGORITHM"
                f" in {list(valid)} for {op}"
            )
        if name in SHM_ALGORITHMS[op] and transport not in ("", "shm"):
            raise ValueError(f"impl ({impl!r}): {name} runs only on the shm transport")
        if not transport:
            transport = "shm" if self.shm is not None and device.type == "cpu" else "torch"
        if transport == "shm" and device.type != "cpu":
            raise ValueError(f"impl ({impl!r}): the shm transport needs CPU tensors, got {device}")
        return name, transport


CMA = ("cma_two_shot",)


def _check_tensor(field_name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{field_name} ({type(t).__name__}) must be a torch.Tensor")
    if t.dtype not in DTYPES:
        raise TypeError(f"{field_name}.dtype ({t.dtype}) must be one of {list(DTYPES)}")


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"op ({op!r}) must be one of {list(REDUCE_OPS)}")


def _run(group: CommGroup, name: str, fn: Callable[[], None]) -> None:
    """Adds the op name to transport errors, which already name the group and the ranks."""
    try:
        fn()
    except TimeoutError as e:
        raise TimeoutError(f"{name}: {e}") from e
    except RuntimeError as e:
        raise RuntimeError(f"{name}: {e}") from e


def _flat(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 1 and t.is_contiguous():
        return t  # a view costs ~1.5 us, a visible share of an 8-byte call
    return t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _native_op(op: str, dtype: torch.dtype) -> Any:
    if op == "avg" and dtype.is_floating_point:
        return dist.ReduceOp.AVG
    return {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM}.get(op) or (
        dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN
    )


def all_reduce(
    tensor: torch.Tensor,
    group: CommGroup,
    op: str = "sum",
    *,
    out: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Reduce `tensor` across `group` with op sum/avg/max/min (avg of integers floors); the result
    goes to `out` (same shape and dtype) or, without it, into `tensor`. Returns the result."""
    _check_tensor("tensor", tensor)
    _check_op(op)
    if out is None:
        out = tensor
    else:
        _check_tensor("out", out)
        if out.numel() != tensor.numel() or out.dtype != tensor.dtype:
            raise ValueError(
                f"out ({out.numel()} x {out.dtype}) must match"
                f" tensor ({tensor.numel()} x {tensor.dtype})"
            )
    nbytes = tensor.numel() * tensor.element_size()
    registered = impl == "auto" and is_registered(group, tensor, out)
    name, transport = group.resolve("all_reduce", impl, nbytes, tensor.device, registered)
    x, y = _flat(tensor), _flat(out)

    def run() -> None:
        if transport == NATIVE:
            if y.data_ptr() != x.data_ptr():
                y.copy_(x)
            if impl not in ("torch", NATIVE) and group.config.check_args:
                group.torch.check_args("all_reduce", describe("all_reduce", y, op))
            dist.all_reduce(y, op=_native_op(op, y.dtype), group=group.pg)
            if op == "avg" and not y.dtype.is_floating_point:
                alg.finish_avg(y, group.world_size, op)
        elif name in _DIRECT_ALL_REDUCE:
            assert group.shm is not None
            _DIRECT_ALL_REDUCE[name](group.shm, x, y, op)
        else:
            tr = group.transport(transport)
            if group.config.check_args:
                tr.check_args("all_reduce", describe("all_reduce", x, op))
            if y.data_ptr() != x.data_ptr():
                y.copy_(x)
            _P2P_ALL_REDUCE[name](tr, y, op)

    _run(group, "all_reduce", run)
    if not out.is_contiguous():
        out.copy_(y.view(out.shape))
    return out


def is_registered(group: CommGroup, tensor: torch.Tensor, out: torch.Tensor) -> bool:
    """True for an in-place all_reduce on a buffer from group.alloc() (peers map it)."""
    return (
        group.shm is not None
        and out.data_ptr() == tensor.data_ptr()
        and group.shm.registered_peers(tensor) is not None
    )


_DIRECT_ALL_REDUCE = {
    "one_shot": direct.one_shot_all_reduce,
    "two_shot": direct.two_shot_all_reduce,
    "cma_two_shot": direct.cma_two_shot_all_reduce,
    "push_two_shot": direct.push_two_shot_all_reduce,
}
_P2P_ALL_REDUCE = {
    "ring": alg.ring_all_reduce,
    "rabenseifner": alg.rabenseifner_all_reduce,
    "recursive_doubling": alg.recursive_doubling_all_reduce,
    "double_binary_tree": alg.double_binary_tree_all_reduce,
}


def _check_pair(
    op: str, big: torch.Tensor, small: torch.Tensor, p: int, names: tuple[str, str]
) -> None:
    _check_tensor(names[0], big)
    _check_tensor(names[1], small)
    if big.numel() != p * small.numel():
        raise ValueError(
            f"{op}: {names[0]}.numel() ({big.numel()}) must be world_size ({p}) x"
            f" {names[1]}.numel() ({small.numel()})"
        )
    if big.dtype != small.dtype:
        raise TypeError(f"{op}: {names[0]}.dtype ({big.dtype}) != {names[1]}.dtype ({small.dtype})")


def all_gather(
    output: torch.Tensor, input: torch.Tensor, group: CommGroup, *, impl: str = "auto"
) -> torch.Tensor:
    """output (world_size x input elements) gets every rank's `input`, rank order."""
    _check_pair("all_gather", output, input, group.world_size, ("output", "input"))
    name, transport = group.resolve(
        "all_gather", impl, output.numel() * output.element_size(), input.device
    )
    y, x = _flat(output), _flat(input)

    def run() -> None:
        if transport == NATIVE:
            if impl != "torch" and group.config.check_args:
                group.torch.check_args("all_gather", describe("all_gather", x))
            dist.all_gather_into_tensor(y, x, group=group.pg)
        elif name == "direct":
            direct.direct_all_gather(group.shm, y, x)  # type: ignore[arg-type]
        else:
            tr = group.transport(transport)
            if group.config.check_args:
                tr.check_args("all_gather", describe("all_gather", x))
            fn = alg.ring_all_gather if name == "ring" else alg.recursive_doubling_all_gather
            fn(tr, y, x)

    _run(group, "all_gather", run)
    if not output.is_contiguous():
        output.copy_(y.view(output.shape))
    return output


def reduce_scatter(
    output: torch.Tensor,
    input: torch.Tensor,
    group: CommGroup,
    op: str = "sum",
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """output gets block `rank` (of world_size equal blocks of `input`) reduced across the group."""
    _check_pair("reduce_scatter", input, output, group.world_size, ("input", "output"))
    _check_op(op)
    name, transport = group.resolve(
        "reduce_scatter", impl, input.numel() * input.element_size(), input.device
    )
    y, x = _flat(output), _flat(input)

    def run() -> None:
        if transport == NATIVE:
            if impl != "torch" and group.config.check_args:
                group.torch.check_args("reduce_scatter", describe("reduce_scatter", y, op))
            dist.reduce_scatter_tensor(y, x, op=_native_op(op, y.dtype), group=group.pg)
            if op == "avg" and not y.dtype.is_floating_point:
                alg.finish_avg(y, group.world_size, op)
        elif name == "direct":
            direct.direct_reduce_scatter(group.shm, y, x, op)  # type: ignore[arg-type]
        else:
            tr = group.transport(transport)
            if group.config.check_args:
                tr.check_args("reduce_scatter", describe("reduce_scatter", y, op))
            fn = alg.ring_reduce_scatter if name == "ring" else alg.recursive_halving_reduce_scatter
            fn(tr, y, x, op)

    _run(group, "reduce_scatter", run)
    if not output.is_contiguous():
        output.copy_(y.view(output.shape))
    return output


def broadcast(
    tensor: torch.Tensor, group: CommGroup, src: int = 0, *, impl: str = "auto"
) -> torch.Tensor:
    """Every rank's `tensor` gets the one of group rank `src`, in place."""
    _check_tensor("tensor", tensor)
    if not 0 <= src < group.world_size:
        raise ValueError(f"src ({src}) must be a group rank in [0, {group.world_size})")
    name, transport = group.resolve(
        "broadcast", impl, tensor.numel() * tensor.element_size(), tensor.device
    )
    x = _flat(tensor)

    def run() -> None:
        if transport == NATIVE:
            if impl != "torch" and group.config.check_args:
                group.torch.check_args("broadcast", describe("broadcast", x, extra=src))
            dist.broadcast(x, group.ranks[src], group=group.pg)
        elif name == "direct":
            direct.direct_broadcast(group.shm, x, src)  # type: ignore[arg-type]
        else:
            tr = group.transport(transport)
            if group.config.check_args:
                tr.check_args("broadcast", describe("broadcast", x, extra=src))
            fn = (
                alg.binomial_tree_broadcast
                if name == "binomial_tree"
                else alg.scatter_allgather_broadcast
            )
            fn(tr, x, src)

    _run(group, "broadcast", run)
    if not tensor.is_contiguous():
        tensor.copy_(x.view(tensor.shape))
    return tensor


def all_to_all(
    output: torch.Tensor, input: torch.Tensor, group: CommGroup, *, impl: str = "auto"
) -> torch.Tensor:
    """Block j of `input` (world_size equal blocks) goes to rank j; output block i comes from rank
    i."""
    p = group.world_size
    _check_tensor("input", input)
    _check_tensor("output", output)
    if input.numel() % p or output.numel() != input.numel() or output.dtype != input.dtype:
        raise ValueError(
            f"all_to_all: input ({input.numel()} x {input.dtype}) must split into world_size ({p})"
            f" equal blocks and match output ({output.numel()} x {output.dtype})"
        )
    if output.data_ptr() == input.data_ptr() and input.numel():
        raise ValueError("all_to_all: output must not be input (out of place only)")
    name, transport = group.resolve(
        "all_to_all", impl, input.numel() * input.element_size(), input.device
    )
    y, x = _flat(output), _flat(input)

    def run() -> None:
        if transport == NATIVE:
            if impl != "torch" and group.config.check_args:
                group.torch.check_args("all_to_all", describe("all_to_all", x))
            dist.all_to_all_single(y, x, group=group.pg)
        elif name == "direct":
            direct.direct_all_to_all(group.shm, y, x)  # type: ignore[arg-type]
        else:
            tr = group.transport(transport)
            if group.config.check_args:
                tr.check_args("all_to_all", describe("all_to_all", x))
            alg.pairwise_all_to_all(tr, y, x)

    _run(group, "all_to_all", run)
    if not output.is_contiguous():
        output.copy_(y.view(output.shape))
    return output


def barrier(group: CommGroup, *, impl: str = "auto") -> None:
    """Returns once every rank of `group` has called barrier."""
    name, transport = group.resolve("barrier", impl, 0, torch.device("cpu"))

    def run() -> None:
        if transport == NATIVE:
            dist.barrier(group=group.pg)
        elif name == "direct":
            direct.direct_barrier(group.shm)  # type: ignore[arg-type]
        else:
            alg.dissemination_barrier(group.transport(transport))

    _run(group, "barrier", run)


__all__ = [
    "CommConfig",
    "CommGroup",
    "SHM_CHUNK_BYTES",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "barrier",
    "broadcast",
    "reduce_scatter",
]

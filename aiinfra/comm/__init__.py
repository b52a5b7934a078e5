"""comm: collectives built from point-to-point on torch.distributed and shared memory, and their
tuner."""

from aiinfra.comm.collectives import (
    CommConfig,
    CommGroup,
    all_gather,
    all_reduce,
    all_to_all,
    barrier,
    broadcast,
    reduce_scatter,
)
from aiinfra.comm.mesh import ParallelDims, ParallelMesh
from aiinfra.comm.shm import SharedMemoryTransport, ShmConfig
from aiinfra.comm.transport import TorchTransport, Transport
from aiinfra.comm.tuner import LinkParams, algorithm_cost, calibrate, choose_algorithm

__all__ = [
    "CommConfig",
    "CommGroup",
    "LinkParams",
    "ParallelDims",
    "ParallelMesh",
    "SharedMemoryTransport",
    "ShmConfig",
    "TorchTransport",
    "Transport",
    "algorithm_cost",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "barrier",
    "broadcast",
    "calibrate",
    "choose_algorithm",
    "reduce_scatter",
]

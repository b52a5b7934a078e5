"""Collective time on a cluster: hierarchical (scale-up link inside a node, network across nodes),
each phase priced by comm's alpha-beta-gamma model (`aiinfra.comm.tuner`) for its best algorithm
and NCCL protocol; the protocol choice is the size-dependent efficiency."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from aiinfra.cluster.hardware import LinkSpec
from aiinfra.cluster.topology import ClusterSpec
from aiinfra.comm.tuner import LinkParams, algorithm_cost, choose_algorithm

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")

# NCCL's protocols trade latency for bandwidth: LL moves 8-byte flag+data words (half the link),
# LL128 keeps 120 of 128 bytes, Simple the whole link at a higher fixed cost. Each tuple is
# (name, latency multiplier, fraction of the link's bandwidth).
PROTOCOLS = (("LL", 1.0, 0.5), ("LL128", 2.0, 120 / 128), ("Simple", 4.0, 1.0))

# nccl-tests' bus-bandwidth factors: busbw = algbw * factor(n)
BUSBW_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "all_to_all": lambda n: (n - 1) / n,
}


@dataclass(frozen=True)
class Path:
    """One level of the hierarchy: a link's latency (s) and achievable bytes/s per GPU."""

    alpha_s: float
    bytes_per_s: float

    @classmethod
    def of(cls, link: LinkSpec) -> Path:
        return cls(link.latency_us * 1e-6, link.bytes_per_s)


def flat_time(op: str, nbytes: float, n: int, path: Path) -> float:
    """Best (algorithm, protocol) time of `op` on `n` ranks joined by one kind of link.
    GPU reductions run on the SMs pipelined with the transfers, so gamma is 0."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return _flat_time(op, int(nbytes), n, path.alpha_s, path.bytes_per_s)


@lru_cache(maxsize=65536)
def _flat_time(op: str, nbytes: int, n: int, alpha_s: float, bytes_per_s: float) -> float:
    best = float("inf")
    for _, alpha_mult, bw_frac in PROTOCOLS:
        params = LinkParams(
            alpha_s=alpha_s * alpha_mult,
            beta_s_per_byte=1.0 / (bytes_per_s * bw_frac),
            gamma_s_per_byte=0.0,
        )
        algorithm = choose_algorithm(op, nbytes, n, params)
        best = min(best, algorithm_cost(op, algorithm, nbytes, n, params))
    return best


def collective_time(
    cluster: ClusterSpec, op: str, nbytes: float, group_size: int, per_node: int
) -> float:
    """Seconds for `op` on `nbytes` (nccl-tests convention: the whole buffer; for all_gather the
    output) over `group_size` GPUs placed `per_node` to a node on consecutive nodes.

    Hierarchical: an all-reduce is a reduce-scatter inside each node, an all-reduce of 1/per_node
    of the data across nodes (per_node rails in parallel) and an all-gather inside the node.
    """
    if op not in OPS:
        raise ValueError(f"op ({op!r}) must be one of {', '.join(OPS)}")
    if group_size <= 0 or per_node <= 0 or group_size % per_node:
        raise ValueError(f"per_node ({per_node}) must divide group_size ({group_size})")
    if per_node > cluster.node.num_gpus:
        raise ValueError(f"per_node ({per_node}) exceeds {cluster.node.num_gpus} GPUs per node")
    num_nodes = group_size // per_node
    intra = Path.of(cluster.node.scale_up)
    inter = Path(cluster.node.nic.latency_us * 1e-6, cluster.network_bytes_per_s_per_gpu(num_nodes))
    if num_nodes == 1:
        return flat_time(op, nbytes, per_node, intra)
    if per_node == 1:
        return flat_time(op, nbytes, num_nodes, inter)
    g, k = per_node, num_nodes
    if op == "all_reduce":
        return (
            flat_time("reduce_scatter", nbytes, g, intra)
            + flat_time("all_reduce", nbytes / g, k, inter)
            + flat_time("all_gather", nbytes, g, intra)
        )
    if op == "all_gather":
        return flat_time("all_gather", nbytes / g, k, inter) + flat_time(
            "all_gather", nbytes, g, intra
        )
    if op == "reduce_scatter":
        return flat_time("reduce_scatter", nbytes, g, intra) + flat_time(
            "reduce_scatter", nbytes / g, k, inter
        )
    if op == "broadcast":
        return flat_time("broadcast", nbytes, k, inter) + flat_time("broadcast", nbytes, g, intra)
    # all_to_all: the (k-1)/k of each GPU's buffer bound for other nodes dominates
    return flat_time("all_to_all", nbytes, group_size, inter)


def p2p_time(cluster: ClusterSpec, nbytes: float, cross_node: bool) -> float:
    """One send/recv of `nbytes` between two GPUs, over NVLink or one network rail."""
    if nbytes <= 0:
        return 0.0
    link = cluster.node.nic if cross_node else cluster.node.scale_up
    bw = cluster.node.nic_bytes_per_s_per_gpu if cross_node else link.bytes_per_s
    return link.latency_us * 1e-6 + nbytes / bw


def bus_bandwidth_gbps(op: str, nbytes: float, n: int, seconds: float) -> float:
    """nccl-tests' busbw in GB/s for a measured or predicted time."""
    return nbytes / seconds * BUSBW_FACTOR[op](n) / 1e9

"""Cluster designs: NVLink domains joined by a rail-optimized leaf-spine or a (ToR) fat-tree with a
chosen oversubscription; switch/cable counts, bisection bandwidth, hops between two GPUs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from aiinfra.cluster.hardware import NodeSpec

FABRICS = ("rail-optimized", "fat-tree")

RAIL_EXPLANATION = (
    "Rail-optimized: NIC i of every node plugs into the leaf switches of rail i. In a 3D-parallel "
    "layout the DP and PP peers of a GPU have its tp rank, hence its local rank and its rail, so "
    "their rings run leaf-to-leaf inside one rail: one switch hop, never through the "
    "(oversubscribed) spine, for up to {rail_nodes} nodes, against {tor_nodes} nodes when every "
    "NIC of a node sits on one top-of-rack leaf. Traffic between different local ranks first "
    "crosses NVLink to the GPU on the right rail (PXN), so it still enters the network on one rail."
)


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """`num_nodes` scale-up domains of `node` joined by a folded-Clos network of `switch_radix`-port
    switches. `oversubscription` is leaf down:up bandwidth (1 = non-blocking); the parallel file
    system delivers `storage_bandwidth_gbps` GB/s in aggregate."""

    node: NodeSpec
    num_nodes: int
    fabric: Literal["rail-optimized", "fat-tree"] = "rail-optimized"
    oversubscription: float = 1.0
    switch_radix: int = 64
    storage_bandwidth_gbps: float = 200.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_nodes, int) or self.num_nodes <= 0:
            raise ValueError(f"num_nodes ({self.num_nodes!r}) must be a positive integer")
        if self.fabric not in FABRICS:
            raise ValueError(f"fabric ({self.fabric!r}) must be one of {', '.join(FABRICS)}")
        if not self.oversubscription >= 1:
            raise ValueError(f"oversubscription ({self.oversubscription!r}) must be >= 1")
        if not isinstance(self.switch_radix, int) or self.switch_radix < 4:
            raise ValueError(f"switch_radix ({self.switch_radix!r}) must be an integer >= 4")
        if self.storage_bandwidth_gbps <= 0:
            raise ValueError(
                f"storage_bandwidth_gbps ({self.storage_bandwidth_gbps!r}) must be positive"
            )
        if self.fabric == "fat-tree" and self.leaf_down_ports < self.node.num_nics:
            raise ValueError(
                f"switch_radix ({self.switch_radix}) leaves {self.leaf_down_ports} leaf down "
                f"ports, fewer than a node's {self.node.num_nics} NICs"
            )

    @classmethod
    def for_gpus(cls, node: NodeSpec, num_gpus: int, **kw: object) -> ClusterSpec:
        if num_gpus <= 0 or num_gpus % node.num_gpus:
            raise ValueError(
                f"num_gpus ({num_gpus}) must be a positive multiple of {node.name}'s "
                f"{node.num_gpus} GPUs"
            )
        return cls(node=node, num_nodes=num_gpus // node.num_gpus, **kw)  # type: ignore[arg-type]

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.node.num_gpus

    @property
    def leaf_down_ports(self) -> int:
        o = self.oversubscription
        return int(self.switch_radix * o / (1 + o))

    @property
    def leaf_domain_nodes(self) -> int:
        """Nodes whose same-rail GPUs reach each other through one leaf switch."""
        if self.fabric == "rail-optimized":
            return self.leaf_down_ports
        return self.leaf_down_ports // self.node.num_nics

    def network_bytes_per_s_per_gpu(self, num_nodes_spanned: int) -> float:
        """Per-GPU network bandwidth for a group spread over `num_nodes_spanned` consecutive nodes:
        the NIC share, divided by the oversubscription once traffic must cross the spine."""
        bw = self.node.nic_bytes_per_s_per_gpu
        if num_nodes_spanned > self.leaf_domain_nodes:
            bw /= self.oversubscription
        return bw


@dataclass(slots=True)
class TopologySizing:
    num_endpoints: int
    num_tiers: int
    num_leaf_switches: int
    num_spine_switches: int
    num_core_switches: int
    num_cables: int
    bisection_bandwidth_gbps: float
    leaf_domain_nodes: int

    @property
    def num_switches(self) -> int:
        return self.num_leaf_switches + self.num_spine_switches + self.num_core_switches


def size_topology(cluster: ClusterSpec) -> TopologySizing:
    """Switches and cables of the folded Clos. Leaves split their ports down:up by the
    oversubscription; two tiers while every spine can reach every leaf (leaves <= radix),
    else three tiers in pods of radix/2 leaves (Al-Fares et al. 2008's k-ary fat-tree when
    non-blocking)."""
    node, R = cluster.node, cluster.switch_radix
    E = cluster.num_nodes * node.num_nics
    down = cluster.leaf_down_ports
    up = R - down
    if cluster.fabric == "rail-optimized":
        leaves = node.num_nics * math.ceil(cluster.num_nodes / down)
    else:
        leaves = math.ceil(cluster.num_nodes / (down // node.num_nics))
    cables = E
    spines = cores = 0
    if leaves == 1:
        tiers = 1
    elif leaves <= R:
        tiers = 2
        spines = math.ceil(leaves * up / R)
        cables += leaves * up
    else:
        tiers = 3
        pods = math.ceil(leaves / (R // 2))
        if pods > R:
            raise ValueError(
                f"num_nodes ({cluster.num_nodes}) needs {pods} pods, more than a three-tier "
                f"network of radix {R} holds ({R})"
            )
        spines = pods * up  # aggregation switches: one per leaf uplink in each pod
        cores = math.ceil(spines * (R // 2) / R)
        cables += leaves * up + spines * (R // 2)
    nic_gbps = node.nic.bandwidth_gbps
    bisection = E * nic_gbps / 2 / (cluster.oversubscription if tiers > 1 else 1.0)
    return TopologySizing(
        num_endpoints=E,
        num_tiers=tiers,
        num_leaf_switches=leaves,
        num_spine_switches=spines,
        num_core_switches=cores,
        num_cables=cables,
        bisection_bandwidth_gbps=bisection,
        leaf_domain_nodes=cluster.leaf_domain_nodes,
    )


def hops_between(cluster: ClusterSpec, rank_a: int, rank_b: int) -> tuple[int, str]:
    """Network switches a message from GPU `rank_a` to GPU `rank_b` crosses, and the route.
    Ranks are numbered node-major (rank // gpus per node is the node)."""
    for name, r in (("rank_a", rank_a), ("rank_b", rank_b)):
        if not 0 <= r < cluster.num_gpus:
            raise ValueError(f"{name} ({r}) must be in [0, {cluster.num_gpus})")
    gpn = cluster.node.num_gpus
    node_a, node_b = rank_a // gpn, rank_b // gpn
    if node_a == node_b:
        return 0, "NVLink (one NVSwitch hop)" if rank_a != rank_b else "same GPU"
    sizing = size_topology(cluster)
    domain = cluster.leaf_domain_nodes
    pxn = ""
    if cluster.fabric == "rail-optimized" and rank_a % gpn != rank_b % gpn:
        pxn = "NVLink to the destination's rail (PXN), then "
    if node_a // domain == node_b // domain:
        return 1, pxn + "leaf"
    pod_nodes = domain * (cluster.switch_radix // 2)
    if sizing.num_tiers == 3 and node_a // pod_nodes != node_b // pod_nodes:
        return 5, pxn + "leaf - aggregation - core - aggregation - leaf"
    return 3, pxn + "leaf - spine - leaf"


def explain_rail_optimized(cluster: ClusterSpec) -> str:
    down = cluster.leaf_down_ports
    return RAIL_EXPLANATION.format(rail_nodes=down, tor_nodes=max(down // cluster.node.num_nics, 0))

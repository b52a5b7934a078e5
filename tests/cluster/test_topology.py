"""Topology sizing against the k-ary fat-tree's closed forms (Al-Fares et al. 2008) and leaf-spine
arithmetic; hops; the drawing."""

import pytest

from aiinfra.cluster.hardware import LINKS, NodeSpec, get_gpu, get_node
from aiinfra.cluster.plots import draw_topology
from aiinfra.cluster.topology import (
    ClusterSpec,
    explain_rail_optimized,
    hops_between,
    size_topology,
)


def one_gpu_node() -> NodeSpec:
    return NodeSpec(
        name="host",
        gpu=get_gpu("h100"),
        num_gpus=1,
        scale_up=LINKS["nvlink4"],
        nic=LINKS["ib-ndr"],
        num_nics=1,
        host_link=LINKS["pcie5"],
        host_cpu_cores=32,
    )


@pytest.mark.parametrize("k", [4, 8, 16, 48])
def test_k_ary_fat_tree_counts(k):
    # k pods of k/2 edge + k/2 aggregation switches, (k/2)^2 cores: 5k^2/4 switches for k^3/4 hosts
    hosts = k**3 // 4
    cluster = ClusterSpec(node=one_gpu_node(), num_nodes=hosts, fabric="fat-tree", switch_radix=k)
    s = size_topology(cluster)
    assert s.num_tiers == 3
    assert s.num_switches == 5 * k * k // 4
    assert s.num_core_switches == (k // 2) ** 2
    assert s.num_cables == 3 * hosts  # host, edge-aggregation and aggregation-core links
    assert s.bisection_bandwidth_gbps == hosts * 50 / 2


def test_leaf_spine_and_oversubscription():
    node = get_node("dgx-h100")  # 8 x 400G NICs
    # 128 nodes = 1024 NICs on radix-64 switches, 1:1: 32 leaves (32 down, 32 up), 16 spines
    s = size_topology(ClusterSpec(node=node, num_nodes=128))
    assert (s.num_tiers, s.num_leaf_switches, s.num_spine_switches) == (2, 32, 16)
    assert s.num_cables == 1024 + 32 * 32
    # 3:1 oversubscription: 48 down, 16 up per leaf; bisection drops 3x
    o = size_topology(ClusterSpec(node=node, num_nodes=120, oversubscription=3.0))
    assert o.num_leaf_switches == 8 * 3 and o.num_spine_switches == 6
    assert o.bisection_bandwidth_gbps == pytest.approx(960 * 50 / 2 / 3)
    with pytest.raises(ValueError, match="oversubscription"):
        ClusterSpec(node=node, num_nodes=2, oversubscription=0.5)


def test_hops_rail_optimized_vs_tor():
    node = get_node("dgx-h100")
    rail = ClusterSpec(node=node, num_nodes=64)
    tor = ClusterSpec(node=node, num_nodes=64, fabric="fat-tree")
    assert hops_between(rail, 0, 7)[0] == 0  # same node: NVLink
    # GPU 0 of node 0 and GPU 0 of node 20: same rail, one leaf (32 nodes per rail leaf)
    assert hops_between(rail, 0, 20 * 8)[0] == 1
    assert hops_between(tor, 0, 20 * 8)[0] == 3  # a ToR leaf holds only 4 nodes
    assert hops_between(rail, 0, 40 * 8)[0] == 3
    assert "PXN" in hops_between(rail, 0, 20 * 8 + 3)[1]
    assert "32 nodes" in explain_rail_optimized(rail)
    with pytest.raises(ValueError, match="rank_b"):
        hops_between(rail, 0, 64 * 8)


def test_draw_topology(tmp_path):
    for fabric in ("rail-optimized", "fat-tree"):
        path = tmp_path / f"{fabric}.png"
        draw_topology(ClusterSpec(node=get_node("h100"), num_nodes=64, fabric=fabric), path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

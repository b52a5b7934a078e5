"""Collective times on a topology: nccl-tests' published busbw, and the hierarchy's behaviour."""

import pytest

from aiinfra.cluster.collectives import Path, bus_bandwidth_gbps, collective_time, flat_time
from aiinfra.cluster.hardware import get_node
from aiinfra.cluster.topology import ClusterSpec
from aiinfra.comm.tuner import LinkParams, algorithm_cost


def test_nccl_tests_all_reduce_busbw_dgx_a100():
    # nccl-tests all_reduce_perf inside one 8xA100 NVLink node peaks near 230 GB/s busbw
    cluster = ClusterSpec(node=get_node("dgx-a100"), num_nodes=1)
    size = 2**30
    t = collective_time(cluster, "all_reduce", size, 8, 8)
    # the acceptance band: NVLink efficiency is a datasheet-level constant, not a fit
    assert bus_bandwidth_gbps("all_reduce", size, 8, t) == pytest.approx(230, rel=0.15)


def test_small_messages_are_latency_bound_and_protocols_help():
    cluster = ClusterSpec(node=get_node("dgx-a100"), num_nodes=1)
    small = collective_time(cluster, "all_reduce", 1024, 8, 8)
    big = collective_time(cluster, "all_reduce", 2**30, 8, 8)
    assert bus_bandwidth_gbps("all_reduce", 1024, 8, small) < 0.1 * bus_bandwidth_gbps(
        "all_reduce", 2**30, 8, big
    )
    # the protocol choice is never worse than the plain link (Simple) and wins for small sizes
    path = Path.of(cluster.node.scale_up)
    for size in (1024, 2**20, 2**30):
        simple = LinkParams(alpha_s=4 * path.alpha_s, beta_s_per_byte=1 / path.bytes_per_s,
                            gamma_s_per_byte=0.0)  # fmt: skip
        plain = algorithm_cost("all_reduce", "ring", size, 8, simple)
        assert flat_time("all_reduce", size, 8, path) <= plain * (1 + 1e-12)
    assert flat_time("all_reduce", 1024, 8, path) < 0.5 * algorithm_cost(
        "all_reduce", "ring", 1024, 8, simple
    )


def test_hierarchical_all_reduce_across_nodes():
    node = get_node("dgx-h100")
    cluster = ClusterSpec(node=node, num_nodes=16)
    size = 2**30
    intra = collective_time(cluster, "all_reduce", size, 8, 8)
    inter = collective_time(cluster, "all_reduce", size, 128, 8)
    assert inter > intra
    # large messages: the network phase moves 2(k-1)/k * S/8 per GPU over one rail each
    k = 16
    net = 2 * (k - 1) / k * size / 8 / node.nic_bytes_per_s_per_gpu
    assert inter == pytest.approx(intra + net, rel=0.02)  # latency terms are <2% at 1 GiB
    # one GPU per node (a DP group with tp=8): all on the network
    flat = collective_time(cluster, "all_reduce", size, 16, 1)
    assert flat == pytest.approx(2 * 15 / 16 * size / node.nic_bytes_per_s_per_gpu, rel=0.02)


def test_oversubscription_slows_groups_that_cross_the_spine():
    node = get_node("dgx-h100")
    plain = ClusterSpec(node=node, num_nodes=128, oversubscription=1.0)
    over = ClusterSpec(node=node, num_nodes=128, oversubscription=3.0)
    size = 2**28
    # a group inside one rail leaf domain (48 nodes at 3:1 with radix 64) is unaffected
    small_plain = collective_time(plain, "all_reduce", size, 16, 1)
    small_over = collective_time(over, "all_reduce", size, 16, 1)
    assert small_over == pytest.approx(small_plain)
    big_plain = collective_time(plain, "all_reduce", size, 128, 1)
    big_over = collective_time(over, "all_reduce", size, 128, 1)
    assert big_over > 2.5 * big_plain
    # a top-of-rack fat-tree only keeps 48 // 8 = 6 nodes under one leaf
    tor = ClusterSpec(node=node, num_nodes=128, oversubscription=3.0, fabric="fat-tree")
    assert collective_time(tor, "all_reduce", size, 16, 1) > 2.5 * small_over


def test_bad_arguments():
    cluster = ClusterSpec(node=get_node("dgx-a100"), num_nodes=2)
    with pytest.raises(ValueError, match="op"):
        collective_time(cluster, "gather", 1024, 8, 8)
    with pytest.raises(ValueError, match="per_node"):
        collective_time(cluster, "all_reduce", 1024, 12, 8)

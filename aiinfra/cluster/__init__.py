"""The planner: cluster designs, training and serving estimates, layout search.

ClusterSpec + ModelConfig + ParallelConfig -> estimate() -> Plan."""

from aiinfra.cluster.hardware import (
    CATALOGUE,
    Catalogue,
    GPUSpec,
    LinkSpec,
    NodeSpec,
    get_gpu,
    get_link,
    get_node,
    load_hardware,
)
from aiinfra.cluster.inference import ServingConfig, ServingPlan, plan_serving
from aiinfra.cluster.plan import Plan
from aiinfra.cluster.search import SearchResult, search
from aiinfra.cluster.topology import ClusterSpec, hops_between, size_topology
from aiinfra.cluster.training import EstimateOptions, estimate

__all__ = [
    "CATALOGUE",
    "Catalogue",
    "ClusterSpec",
    "EstimateOptions",
    "GPUSpec",
    "LinkSpec",
    "NodeSpec",
    "Plan",
    "SearchResult",
    "ServingConfig",
    "ServingPlan",
    "estimate",
    "get_gpu",
    "get_link",
    "get_node",
    "hops_between",
    "load_hardware",
    "plan_serving",
    "search",
    "size_topology",
]

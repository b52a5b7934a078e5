"""Helpers behind `aiinfra plan`: resolve a model and a cluster from command-line values, and
render plans as rich tables."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from aiinfra.cluster.collectives import bus_bandwidth_gbps, collective_time
from aiinfra.cluster.hardware import CATALOGUE, Catalogue, load_hardware
from aiinfra.cluster.search import SizeOption
from aiinfra.cluster.topology import (
    ClusterSpec,
    explain_rail_optimized,
    hops_between,
    size_topology,
)
from aiinfra.cluster.training import Plan
from aiinfra.models.config import PRESETS, ModelConfig, get_preset


def resolve_model(
    model: str | None,
    *,
    hidden: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    vocab: int | None = None,
    ffn_hidden: int | None = None,
    mlp: str | None = None,
) -> ModelConfig:
    """A preset name, an HF config.json (or its folder), or a custom shape; shape flags given with
    a preset or file override its fields."""
    if model is None:
        missing = [
            n for n, v in (("hidden", hidden), ("layers", layers), ("heads", heads)) if v is None
        ]
        if missing:
            raise ValueError(f"give --model or a custom shape (missing --{', --'.join(missing)})")
        assert hidden is not None and heads is not None and layers is not None
        kind = mlp or "gelu"
        return ModelConfig(
            vocab_size=vocab or 51200,
            hidden_size=hidden,
            intermediate_size=ffn_hidden or (4 * hidden if kind == "gelu" else 8 * hidden // 3),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads or heads,
            mlp=kind,  # type: ignore[arg-type]
        )
    base = get_preset(model) if model in PRESETS else None
    if base is None:
        if not Path(model).exists():
            raise ValueError(
                f"model ({model!r}) is neither a preset ({', '.join(PRESETS)}) nor a config.json"
            )
        base = ModelConfig.from_file(model)
    changes = {
        k: v
        for k, v in (
            ("hidden_size", hidden), ("num_layers", layers), ("num_heads", heads),
            ("num_kv_heads", kv_heads), ("vocab_size", vocab), ("intermediate_size", ffn_hidden),
            ("mlp", mlp),
        )
        if v is not None
    }  # fmt: skip
    return base.replace(**changes) if changes else base


def resolve_cluster(
    gpu: str,
    num_gpus: int | None,
    *,
    hardware: Path | None = None,
    fabric: str = "rail-optimized",
    oversubscription: float = 1.0,
    switch_radix: int = 64,
    storage_gbps: float = 200.0,
) -> ClusterSpec:
    catalogue: Catalogue = load_hardware(hardware) if hardware is not None else CATALOGUE
    node = catalogue.node(gpu)
    if num_gpus is None:  # one node
        num_gpus = node.num_gpus
    return ClusterSpec.for_gpus(
        node, num_gpus, fabric=fabric, oversubscription=oversubscription,
        switch_radix=switch_radix, storage_bandwidth_gbps=storage_gbps,
    )  # fmt: skip


def plans_table(plans: list[Plan], title: str) -> Table:
    table = Table(title=title)
    for col in ("layout", "step s", "TFLOP/s/GPU", "MFU", "tokens/s", "GB/GPU", "bubble s",
                "TP s", "DP s"):  # fmt: skip
        table.add_column(col, justify="left" if col == "layout" else "right")
    for p in plans:
        table.add_row(
            p.parallel.describe(), f"{p.step_time_s:.3f}", f"{p.tflops_per_gpu:.1f}",
            f"{100 * p.mfu:.1f}%", f"{p.tokens_per_s:,.0f}", f"{p.memory.total / 1e9:.1f}",
            f"{p.time.bubble:.3f}", f"{p.time.tp_comm:.3f}", f"{p.time.dp_comm:.3f}",
        )  # fmt: skip
    return table


def print_table(table: Table) -> None:
    Console(width=160).print(table)


def cluster_summary(cluster: ClusterSpec) -> dict[str, object]:
    """Sizing, example routes and predicted all-reduce bus bandwidth (1 GiB, nccl-tests style)
    inside a node and across the whole cluster."""
    sizing = size_topology(cluster)
    gpn, n = cluster.node.num_gpus, cluster.num_gpus
    size = float(2**30)
    intra = collective_time(cluster, "all_reduce", size, gpn, gpn)
    whole = collective_time(cluster, "all_reduce", size, n, gpn)
    far = n - 1
    same_rail = min(gpn * (cluster.leaf_domain_nodes - 1), n - gpn) if n > gpn else 0
    out: dict[str, object] = {
        "node": cluster.node.name,
        "num_nodes": cluster.num_nodes,
        "num_gpus": n,
        "fabric": cluster.fabric,
        "oversubscription": cluster.oversubscription,
        "tiers": sizing.num_tiers,
        "leaf_switches": sizing.num_leaf_switches,
        "spine_switches": sizing.num_spine_switches,
        "core_switches": sizing.num_core_switches,
        "switches": sizing.num_switches,
        "cables": sizing.num_cables,
        "bisection_bandwidth_gbps": sizing.bisection_bandwidth_gbps,
        "nodes_per_leaf_domain": sizing.leaf_domain_nodes,
        "hops_gpu0_to_last": _route(*hops_between(cluster, 0, far)),
        "hops_gpu0_to_same_rail": _route(*hops_between(cluster, 0, same_rail)),
        "all_reduce_busbw_node_gbps": bus_bandwidth_gbps("all_reduce", size, gpn, intra),
        "all_reduce_busbw_cluster_gbps": bus_bandwidth_gbps("all_reduce", size, n, whole)
        if n > gpn
        else bus_bandwidth_gbps("all_reduce", size, gpn, intra),
        # a DP ring of a tp=8 layout: one GPU per node over up to 32 nodes (the same rail)
        "all_reduce_busbw_dp_ring_32_nodes_gbps": _dp_ring_busbw(cluster, size),
        "why_rail_optimized": explain_rail_optimized(cluster),
    }
    return out


def parse_counts(text: str) -> list[int]:
    """`--num-gpus`: one count or a comma-separated list of counts to compare."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--num-gpus ({text!r}) must be integers separated by commas") from None
    if not counts or any(c <= 0 for c in counts):
        raise ValueError(f"--num-gpus ({text!r}) must be positive")
    return counts


def sizes_table(
    sizes: list[SizeOption], objective: str, price_per_gpu_hour: float | None, num_tokens: float
) -> Table:
    table = Table(title=f"cluster sizes by {objective}, {num_tokens:.3g} tokens")
    cols = ["GPUs", "best layout", "step s", "MFU", "days", "GPU-hours"]
    if price_per_gpu_hour is not None:
        cols.append("cost")
    for col in cols:
        table.add_column(col, justify="left" if col == "best layout" else "right")
    for o in sizes:
        best = o.result.best
        row = [str(o.num_gpus), best.parallel.describe() if best else o.result.explanation]
        row += [f"{best.step_time_s:.3f}", f"{100 * best.mfu:.1f}%"] if best else ["-", "-"]
        row += [f"{o.days:.1f}", f"{o.gpu_hours:,.0f}"]
        if price_per_gpu_hour is not None:
            row.append(f"{o.gpu_hours * price_per_gpu_hour:,.0f}")
        table.add_row(*row)
    return table


def summary_table(title: str, values: dict[str, object]) -> Table:
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", overflow="fold")
    for key, value in values.items():
        table.add_row(
            key.replace("_", " "), f"{value:,.4g}" if isinstance(value, float) else str(value)
        )
    return table


def _route(num_switches: int, path: str) -> str:
    return f"{num_switches} switch{'' if num_switches == 1 else 'es'} ({path})"


def _dp_ring_busbw(cluster: ClusterSpec, size: float) -> float | None:
    k = min(cluster.num_nodes, 32)
    if k == 1:  # one node: no network ring
        return None
    return bus_bandwidth_gbps(
        "all_reduce", size, k, collective_time(cluster, "all_reduce", size, k, 1)
    )

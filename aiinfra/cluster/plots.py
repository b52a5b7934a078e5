"""PNG drawings (matplotlib, Agg): the cluster network, a pipeline-schedule Gantt chart, and the
step-time breakdown of the planner's best layouts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from aiinfra.cluster.schedule import Action  # noqa: E402
from aiinfra.cluster.topology import ClusterSpec, size_topology  # noqa: E402
from aiinfra.cluster.training import Plan  # noqa: E402

MAX_NODES_DRAWN = 8


def draw_topology(cluster: ClusterSpec, path: str | Path) -> None:
    """Nodes (NVLink domains) at the bottom, leaves coloured by rail, spines on top; large
    designs draw their first MAX_NODES_DRAWN nodes and say how many more there are."""
    sizing = size_topology(cluster)
    node, nics = cluster.node, cluster.node.num_nics
    shown = min(cluster.num_nodes, MAX_NODES_DRAWN)
    fig, ax = plt.subplots(figsize=(12, 6))
    colors = plt.get_cmap("tab10")
    node_x = [i * (nics + 2) for i in range(shown)]
    for i, x in enumerate(node_x):
        ax.add_patch(plt.Rectangle((x - 0.5, -0.3), nics, 0.6, fc="#dde", ec="k"))
        ax.text(x + nics / 2 - 0.5, -0.6, f"node {i}\n{node.num_gpus}x {node.gpu.name}",
                ha="center", va="top", fontsize=7)  # fmt: skip
    width = node_x[-1] + nics if node_x else 1
    rail = cluster.fabric == "rail-optimized"
    num_leaves = min(sizing.num_leaf_switches, nics if rail else shown)
    leaf_x = [width * (k + 0.5) / num_leaves for k in range(num_leaves)]
    for k, lx in enumerate(leaf_x):
        ax.plot(lx, 2, "s", ms=12, color=colors(k % 10) if rail else "gray")
    for i, x in enumerate(node_x):
        for r in range(nics):
            k = (
                r
                if rail
                else min(i * nics // max(sizing.leaf_domain_nodes * nics, 1), num_leaves - 1)
            )
            ax.plot([x + r, leaf_x[k]], [0.3, 2], lw=0.6, color=colors(r % 10) if rail else "gray")
    if sizing.num_spine_switches:
        spines = min(sizing.num_spine_switches, 16)
        spine_x = [width * (k + 0.5) / spines for k in range(spines)]
        for sx in spine_x:
            ax.plot(sx, 4, "D", ms=10, color="k")
            for lx in leaf_x:
                ax.plot([lx, sx], [2, 4], lw=0.3, color="gray")
    more = f", first {shown} of {cluster.num_nodes} nodes" if cluster.num_nodes > shown else ""
    ax.set_title(
        f"{cluster.fabric} {sizing.num_tiers}-tier, {cluster.num_gpus} GPUs ({node.name}){more}: "
        f"{sizing.num_switches} switches, {sizing.num_cables} cables, "
        f"bisection {sizing.bisection_bandwidth_gbps / 1e3:.1f} TB/s, "
        f"oversubscription {cluster.oversubscription:g}:1",
        fontsize=9,
    )
    ax.set_ylim(-1.5, 4.8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pipeline(actions: list[Action], num_stages: int, title: str, path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 0.5 * num_stages + 1.5))
    colors = plt.get_cmap("tab20")
    for a in actions:
        shade = colors((2 * a.micro_batch) % 20 + (1 if a.kind == "B" else 0))
        ax.barh(a.stage, a.end - a.start, left=a.start, color=shade, edgecolor="k", lw=0.3)
        label = f"{a.kind}{a.micro_batch}" + (f".{a.chunk}" if a.chunk else "")
        ax.text((a.start + a.end) / 2, a.stage, label, ha="center", va="center", fontsize=6)
    ax.set_yticks(range(num_stages), [f"stage {i}" for i in range(num_stages)])
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_layouts(plans: list[Plan], path: str | Path, top: int = 10) -> None:
    """Stacked step-time terms of the `top` fastest layouts, with TFLOP/s per GPU."""
    plans = plans[:top]
    terms = ("compute", "tp_comm", "pp_comm", "dp_comm", "bubble", "optimizer")
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(plans) + 2))
    for i, plan in enumerate(plans):
        left = 0.0
        for k, term in enumerate(terms):
            width = getattr(plan.time, term)
            ax.barh(i, width, left=left, color=plt.get_cmap("tab10")(k),
                    label=term if i == 0 else None)  # fmt: skip
            left += width
        ax.text(left, i, f"  {plan.tflops_per_gpu:.0f} TFLOP/s, {plan.memory.total / 1e9:.0f} GB",
                va="center", fontsize=7)  # fmt: skip
    ax.set_yticks(range(len(plans)), [p.parallel.describe() for p in plans], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.3 * max(p.step_time_s for p in plans))  # room for the labels
    ax.set_xlabel("step time (s)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(terms))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_serving(
    curve: list[tuple[int, float, float]], chosen: int, tpot_s: float, path: str | Path
) -> None:
    """TPOT and output tokens/s per replica against the decode batch, with the TPOT target and the
    batch the planner chose; `curve` holds (batch, tpot_s, tokens_per_s)."""
    batches = [c[0] for c in curve]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(batches, [1e3 * c[1] for c in curve], color="tab:blue", label="TPOT (ms)")
    ax.axhline(1e3 * tpot_s, color="tab:blue", ls="--", lw=0.8, label="TPOT target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequences decoded together")
    ax.set_ylabel("TPOT (ms)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(batches, [c[2] for c in curve], color="tab:orange", label="tokens/s per replica")
    ax2.set_ylabel("output tokens/s per replica", color="tab:orange")
    if chosen:
        ax.axvline(chosen, color="k", lw=0.8)
        ax.text(chosen, ax.get_ylim()[1], f" batch {chosen}", va="top", fontsize=8)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

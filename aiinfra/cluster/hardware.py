"""Hardware catalogue for the planner: accelerators, links and node types (datasheet figures),
plus user-defined entries loaded from a TOML or JSON file."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True, kw_only=True)
class GPUSpec:
    """One accelerator. Peaks are dense (no 2:4 sparsity), in TFLOP/s; memory in GiB as the
    driver reports it (an "80 GB" A100 has 81920 MiB), bandwidth in GB/s (1e9 bytes/s).

    `matmul_efficiency` is the achievable fraction of the bf16 peak on large training GEMMs
    (cuBLAS/hipBLASLt at transformer shapes, kernel launch gaps included); `memory_efficiency`
    the achievable fraction of HBM bandwidth for element-wise kernels.
    """

    name: str
    bf16_tflops: float
    fp8_tflops: float | None
    memory_gib: float
    memory_bandwidth_gbps: float
    matmul_efficiency: float = 0.7
    memory_efficiency: float = 0.8

    def __post_init__(self) -> None:
        for name in ("bf16_tflops", "memory_gib", "memory_bandwidth_gbps"):
            _check_positive(name, getattr(self, name))
        if self.fp8_tflops is not None:
            _check_positive("fp8_tflops", self.fp8_tflops)
        for name in ("matmul_efficiency", "memory_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} ({value!r}) must be in (0, 1]")

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30

    def peak_flops(self, dtype: str = "bf16") -> float:
        if dtype == "bf16":
            return self.bf16_tflops * 1e12
        if dtype == "fp8":
            if self.fp8_tflops is None:
                raise ValueError(f"dtype ('fp8') is not supported by {self.name}")
            return self.fp8_tflops * 1e12
        raise ValueError(f"dtype ({dtype!r}) must be 'bf16' or 'fp8'")


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """A link as one GPU (or NIC port) sees it: bandwidth per direction in GB/s, one-way latency
    in microseconds as a collective step sees it (software included), and the achievable fraction
    of the raw bandwidth for large messages (protocol headers, flow control)."""

    name: str
    kind: Literal["scale-up", "scale-out", "host"]
    bandwidth_gbps: float
    latency_us: float
    efficiency: float = 0.9

    def __post_init__(self) -> None:
        if self.kind not in ("scale-up", "scale-out", "host"):
            raise ValueError(f"kind ({self.kind!r}) must be 'scale-up', 'scale-out' or 'host'")
        _check_positive("bandwidth_gbps", self.bandwidth_gbps)
        if self.latency_us < 0:
            raise ValueError(f"latency_us ({self.latency_us!r}) must be >= 0")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency ({self.efficiency!r}) must be in (0, 1]")

    @property
    def bytes_per_s(self) -> float:
        """Achievable bandwidth per direction in bytes/s."""
        return self.bandwidth_gbps * 1e9 * self.efficiency


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    """A scale-up domain: GPUs joined by `scale_up` (an NVLink/NVSwitch domain; 72 GPUs for GB200
    NVL72), `num_nics` compute NICs of type `nic` to the network, `storage_nics` more for the file
    system, and `host_cpu_cores` host cores (used for the DPU-offload term)."""

    name: str
    gpu: GPUSpec
    num_gpus: int
    scale_up: LinkSpec
    nic: LinkSpec
    num_nics: int
    host_link: LinkSpec
    host_cpu_cores: int
    storage_nics: int = 2

    def __post_init__(self) -> None:
        for name in ("num_gpus", "num_nics", "host_cpu_cores"):
            _check_positive(name, getattr(self, name))
        if self.storage_nics < 0:
            raise ValueError(f"storage_nics ({self.storage_nics!r}) must be >= 0")
        if self.nic.kind != "scale-out":
            raise ValueError(f"nic ({self.nic.name!r}) must be a scale-out link")

    @property
    def nic_bytes_per_s_per_gpu(self) -> float:
        """Network bandwidth per GPU (per direction) when all GPUs send at once."""
        return self.nic.bytes_per_s * self.num_nics / self.num_gpus


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{name} ({value!r}) must be positive")


# --- catalogue ------------------------------------------------------------------------------------
# Datasheet figures (NVIDIA/AMD). Efficiencies: ~0.7 of bf16 peak for large GEMMs on A100 and a
# little less on newer parts whose peak outruns their memory and launch overheads.

GPUS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        GPUSpec(name="a100-40gb", bf16_tflops=312, fp8_tflops=None, memory_gib=40,
                memory_bandwidth_gbps=1555),
        GPUSpec(name="a100-80gb", bf16_tflops=312, fp8_tflops=None, memory_gib=80,
                memory_bandwidth_gbps=2039),
        GPUSpec(name="h100", bf16_tflops=989, fp8_tflops=1979, memory_gib=79.6,
                memory_bandwidth_gbps=3350, matmul_efficiency=0.65),
        GPUSpec(name="h200", bf16_tflops=989, fp8_tflops=1979, memory_gib=140.4,
                memory_bandwidth_gbps=4800, matmul_efficiency=0.65),
        GPUSpec(name="b200", bf16_tflops=2250, fp8_tflops=4500, memory_gib=180,
                memory_bandwidth_gbps=8000, matmul_efficiency=0.6),
        GPUSpec(name="mi300x", bf16_tflops=1307, fp8_tflops=2615, memory_gib=192,
                memory_bandwidth_gbps=5300, matmul_efficiency=0.5),
    )
}  # fmt: skip

GPU_ALIASES = {"a100": "a100-80gb", "h100-sxm": "h100", "h200-sxm": "h200"}

LINKS: dict[str, LinkSpec] = {
    link.name: link
    for link in (
        # NVLink per GPU per direction: 12 x 25 GB/s (v3), 18 x 25 (v4), 18 x 50 (v5)
        LinkSpec(name="nvlink3", kind="scale-up", bandwidth_gbps=300, latency_us=1.0,
                 efficiency=0.8),
        LinkSpec(name="nvlink4", kind="scale-up", bandwidth_gbps=450, latency_us=1.0,
                 efficiency=0.8),
        LinkSpec(name="nvlink5", kind="scale-up", bandwidth_gbps=900, latency_us=1.0,
                 efficiency=0.8),
        LinkSpec(name="infinity-fabric", kind="scale-up", bandwidth_gbps=448, latency_us=1.5,
                 efficiency=0.7),
        LinkSpec(name="pcie4", kind="host", bandwidth_gbps=31.5, latency_us=2.0, efficiency=0.8),
        LinkSpec(name="pcie5", kind="host", bandwidth_gbps=63, latency_us=2.0, efficiency=0.8),
        # network ports: 200/400/800 Gb/s; latency is NCCL's per-step cost over the network
        LinkSpec(name="ib-hdr", kind="scale-out", bandwidth_gbps=25, latency_us=5.0,
                 efficiency=0.92),
        LinkSpec(name="ib-ndr", kind="scale-out", bandwidth_gbps=50, latency_us=5.0,
                 efficiency=0.92),
        LinkSpec(name="ib-xdr", kind="scale-out", bandwidth_gbps=100, latency_us=5.0,
                 efficiency=0.92),
        LinkSpec(name="roce-200", kind="scale-out", bandwidth_gbps=25, latency_us=6.0,
                 efficiency=0.88),
        LinkSpec(name="roce-400", kind="scale-out", bandwidth_gbps=50, latency_us=6.0,
                 efficiency=0.88),
    )
}  # fmt: skip

NODES: dict[str, NodeSpec] = {
    n.name: n
    for n in (
        NodeSpec(name="dgx-a100", gpu=GPUS["a100-80gb"], num_gpus=8, scale_up=LINKS["nvlink3"],
                 nic=LINKS["ib-hdr"], num_nics=8, host_link=LINKS["pcie4"], host_cpu_cores=128),
        NodeSpec(name="dgx-a100-40gb", gpu=GPUS["a100-40gb"], num_gpus=8,
                 scale_up=LINKS["nvlink3"], nic=LINKS["ib-hdr"], num_nics=8,
                 host_link=LINKS["pcie4"], host_cpu_cores=128),
        NodeSpec(name="dgx-h100", gpu=GPUS["h100"], num_gpus=8, scale_up=LINKS["nvlink4"],
                 nic=LINKS["ib-ndr"], num_nics=8, host_link=LINKS["pcie5"], host_cpu_cores=112),
        NodeSpec(name="hgx-h100-roce", gpu=GPUS["h100"], num_gpus=8, scale_up=LINKS["nvlink4"],
                 nic=LINKS["roce-400"], num_nics=8, host_link=LINKS["pcie5"],
                 host_cpu_cores=112),
        NodeSpec(name="hgx-h200", gpu=GPUS["h200"], num_gpus=8, scale_up=LINKS["nvlink4"],
                 nic=LINKS["ib-ndr"], num_nics=8, host_link=LINKS["pcie5"], host_cpu_cores=112),
        NodeSpec(name="dgx-b200", gpu=GPUS["b200"], num_gpus=8, scale_up=LINKS["nvlink5"],
                 nic=LINKS["ib-ndr"], num_nics=8, host_link=LINKS["pcie5"], host_cpu_cores=112),
        # one NVL72 rack: 18 trays x (2 Grace x 72 cores, 4 B200), one 400G NIC per GPU
        NodeSpec(name="gb200-nvl72", gpu=GPUS["b200"], num_gpus=72, scale_up=LINKS["nvlink5"],
                 nic=LINKS["ib-ndr"], num_nics=72, host_link=LINKS["pcie5"],
                 host_cpu_cores=2592, storage_nics=18),
        NodeSpec(name="mi300x-platform", gpu=GPUS["mi300x"], num_gpus=8,
                 scale_up=LINKS["infinity-fabric"], nic=LINKS["roce-400"], num_nics=8,
                 host_link=LINKS["pcie5"], host_cpu_cores=128),
    )
}  # fmt: skip

# the node a bare GPU name means on the command line
DEFAULT_NODE = {
    "a100-80gb": "dgx-a100",
    "a100-40gb": "dgx-a100-40gb",
    "h100": "dgx-h100",
    "h200": "hgx-h200",
    "b200": "dgx-b200",
    "mi300x": "mi300x-platform",
}


@dataclass(frozen=True)
class Catalogue:
    """Named GPUs, links and nodes; `CATALOGUE` holds the built-in ones and `load_hardware` returns
    a new catalogue with a file's entries added (no module state is changed)."""

    gpus: dict[str, GPUSpec]
    links: dict[str, LinkSpec]
    nodes: dict[str, NodeSpec]

    def gpu(self, name: str) -> GPUSpec:
        key = GPU_ALIASES.get(name.lower(), name.lower())
        if key not in self.gpus:
            raise ValueError(f"gpu ({name!r}) is unknown; available: {', '.join(self.gpus)}")
        return self.gpus[key]

    def link(self, name: str) -> LinkSpec:
        if name not in self.links:
            raise ValueError(f"link ({name!r}) is unknown; available: {', '.join(self.links)}")
        return self.links[name]

    def node(self, name: str) -> NodeSpec:
        """A node type by name, or the default node of a GPU name ("h100" -> dgx-h100)."""
        key = name.lower()
        if key in self.nodes:
            return self.nodes[key]
        gpu = GPU_ALIASES.get(key, key)
        if gpu in DEFAULT_NODE:
            return self.nodes[DEFAULT_NODE[gpu]]
        raise ValueError(
            f"node ({name!r}) is unknown; available: {', '.join(self.nodes)} "
            f"or a GPU: {', '.join(self.gpus)}"
        )


CATALOGUE = Catalogue(GPUS, LINKS, NODES)


def get_gpu(name: str) -> GPUSpec:
    return CATALOGUE.gpu(name)


def get_link(name: str) -> LinkSpec:
    return CATALOGUE.link(name)


def get_node(name: str) -> NodeSpec:
    return CATALOGUE.node(name)


def load_hardware(path: str | Path, base: Catalogue = CATALOGUE) -> Catalogue:
    """`base` plus user-defined entries from TOML or JSON: tables `gpus.NAME`, `links.NAME`,
    `nodes.NAME` with the dataclass fields (a node names its gpu, scale_up, nic and host_link).
    Unknown tables or keys raise ValueError; entries may override `base`'s."""
    path = Path(path)
    text = path.read_text()
    data: dict[str, Any] = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    unknown = set(data) - {"gpus", "links", "nodes"}
    if unknown:
        raise ValueError(f"{path}: unknown tables {sorted(unknown)}; expected gpus, links, nodes")
    cat = Catalogue(dict(base.gpus), dict(base.links), dict(base.nodes))
    for name, entry in data.get("gpus", {}).items():
        cat.gpus[name] = GPUSpec(name=name, **_known(GPUSpec, entry, f"gpus.{name}"))
    for name, entry in data.get("links", {}).items():
        cat.links[name] = LinkSpec(name=name, **_known(LinkSpec, entry, f"links.{name}"))
    for name, entry in data.get("nodes", {}).items():
        kw = _known(NodeSpec, entry, f"nodes.{name}")
        kw["gpu"] = cat.gpu(kw["gpu"])
        for key in ("scale_up", "nic", "host_link"):
            kw[key] = cat.link(kw[key])
        cat.nodes[name] = NodeSpec(name=name, **kw)
    return cat


def _known(cls: type, entry: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)} - {"name"}
    extra = set(entry) - names
    if extra:
        raise ValueError(f"{where}: unknown keys {sorted(extra)}; expected {sorted(names)}")
    return dict(entry)

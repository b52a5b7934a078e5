"""The hardware catalogue and user-defined entries."""

import json

import pytest

from aiinfra.cluster.hardware import CATALOGUE, get_gpu, get_node, load_hardware


def test_catalogue_datasheet_figures():
    assert get_gpu("a100").bf16_tflops == 312 and get_gpu("a100-40gb").memory_gib == 40
    # fp8 doubles the bf16 rate (datasheets round each figure on its own)
    assert get_gpu("h100").fp8_tflops == pytest.approx(2 * get_gpu("h100").bf16_tflops, rel=1e-3)
    assert get_node("h100").name == "dgx-h100" and get_node("gb200-nvl72").num_gpus == 72
    assert get_node("dgx-a100").nic_bytes_per_s_per_gpu == pytest.approx(25e9 * 0.92)
    for name in ("a100-80gb", "h100", "h200", "b200", "mi300x"):
        assert get_gpu(name).memory_bandwidth_gbps > 1000
    with pytest.raises(ValueError, match="fp8"):
        get_gpu("a100").peak_flops("fp8")
    with pytest.raises(ValueError, match="gpu"):
        get_gpu("tpu")


def test_load_toml_and_json(tmp_path):
    toml = tmp_path / "hw.toml"
    toml.write_text(
        """
[gpus.mygpu]
bf16_tflops = 500
fp8_tflops = 1000
memory_gib = 96
memory_bandwidth_gbps = 4000

[links.ib-gdr]
kind = "scale-out"
bandwidth_gbps = 200
latency_us = 4.0

[nodes.mynode]
gpu = "mygpu"
num_gpus = 4
scale_up = "nvlink4"
nic = "ib-gdr"
num_nics = 4
host_link = "pcie5"
host_cpu_cores = 64
"""
    )
    cat = load_hardware(toml)
    assert cat.node("mynode").gpu.memory_gib == 96 and cat.link("ib-gdr").bandwidth_gbps == 200
    assert "mynode" not in CATALOGUE.nodes  # the built-in catalogue is not changed
    js = tmp_path / "hw.json"
    js.write_text(
        json.dumps(
            {
                "gpus": {
                    "g": {
                        "bf16_tflops": 1,
                        "fp8_tflops": None,
                        "memory_gib": 1,
                        "memory_bandwidth_gbps": 1,
                        "colour": "red",
                    }
                }
            }
        )
    )
    with pytest.raises(ValueError, match="colour"):
        load_hardware(js)
    js.write_text(json.dumps({"switches": {}}))
    with pytest.raises(ValueError, match="switches"):
        load_hardware(js)
    js.write_text(
        json.dumps(
            {
                "gpus": {
                    "g": {
                        "bf16_tflops": -1,
                        "fp8_tflops": None,
                        "memory_gib": 1,
                        "memory_bandwidth_gbps": 1,
                    }
                }
            }
        )
    )
    with pytest.raises(ValueError, match="bf16_tflops"):
        load_hardware(js)

"""scripts/gpu_check.py end to end in its --smoke plan on CPU (the tiny model, a tiny workload), so
a GPU session that runs scripts/gpu_check.sh is known to get through every step."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "out" / "gpu_check.json"
    argv = ["--smoke", "--device", "cpu", "--json", str(out), "--model-dir", str(tmp_path / "m")]
    assert gpu_check.main(argv) == 0
    summary = json.loads(out.read_text())
    assert "error" not in summary and summary["device"] == "cpu"
    b1, tp = summary["batch1_decode"], summary["throughput"]
    assert b1["step_ms"] > 0 and b1["bytes_per_step"] > 0 and b1["bandwidth_utilization"] is None
    assert [b["batch_size"] for b in tp["baselines"]] == [4, 8]
    assert all(b["output_tokens"] == tp["output_tokens"] for b in tp["baselines"])
    best = max(b["output_tok_per_s"] for b in tp["baselines"])
    assert tp["ratio_vs_best_hf"] == pytest.approx(tp["output_tok_per_s"] / best)
    assert "throughput_vs_hf" in summary["targets"]  # reported; CPU has no bandwidth target
    assert gpu_check.main(argv) == 0  # a rerun reuses the model folder

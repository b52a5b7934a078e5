"""Workload generation equals the shared generator script; workload files are checked; the FLOP
count equals a hand count."""

import subprocess
import sys
from pathlib import Path

import pytest

from aiinfra.infer.bench import load_workload, make_workload, workload_flops
from aiinfra.models import get_preset

SHARED_SCRIPT = Path("/work/shared/bench/make_workload.py")


@pytest.mark.skipif(not SHARED_SCRIPT.exists(), reason="the shared workload script is not here")
def test_make_workload_equals_the_shared_script(tmp_path):
    out = tmp_path / "w.jsonl"
    args = ["20", "7", "3", "30", "2", "9", "500"]
    subprocess.run([sys.executable, str(SHARED_SCRIPT), str(out), *args], check=True)
    assert make_workload(20, 7, (3, 30), (2, 9), 500) == load_workload(out)


def test_make_workload_ranges():
    reqs = make_workload(50, 0, (64, 512), (32, 256), 8192)
    assert all(64 <= len(r["prompt_token_ids"]) <= 512 for r in reqs)
    assert all(32 <= r["max_tokens"] <= 256 for r in reqs)
    assert all(0 <= t < 8192 for r in reqs for t in r["prompt_token_ids"])


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"prompt_token_ids": [], "max_tokens": 3}', "prompt_token_ids"),
        ('{"prompt_token_ids": [1, "a"], "max_tokens": 3}', "prompt_token_ids"),
        ('{"prompt_token_ids": [1], "max_tokens": 0}', "max_tokens"),
    ],
)
def test_load_workload_rejects_bad_lines(tmp_path, line, match):
    path = tmp_path / "w.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        load_workload(path)


def test_workload_flops_hand_count():
    c = get_preset("tiny")
    h, f, L, V = c.hidden_size, c.intermediate_size, c.num_layers, c.vocab_size
    per_token = 2 * L * (h * c.q_size * 2 + 2 * h * c.kv_size + 3 * h * f)
    # 3 prompt tokens + 2 outputs: 4 tokens computed (positions 0..3 see 1..4 keys), 2 logits
    expected = 4 * per_token + L * 4 * c.q_size * (1 + 2 + 3 + 4) + 2 * 2 * h * V
    flops = workload_flops(c, [{"prompt_token_ids": [1, 2, 3], "max_tokens": 2}])
    assert flops == pytest.approx(expected)

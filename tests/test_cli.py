"""The CLI end to end: create a model folder, generate from it, compare with HF greedy generate."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers


def _aiinfra(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aiinfra.cli", *args], capture_output=True, text=True, timeout=300
    )


def _field(stdout: str, name: str) -> str:
    return next(line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith(name))


@pytest.mark.slow
def test_models_create_then_generate_equals_hf(tmp_path):
    out = _aiinfra("models", "create", "--preset", "bench-32m", "--seed", "0", str(tmp_path))
    assert out.returncode == 0, out.stderr
    gen = _aiinfra("generate", str(tmp_path), "--prompt-ids", "1,2,3", "--max-tokens", "8")
    assert gen.returncode == 0, gen.stderr
    ours = [int(x) for x in _field(gen.stdout, "output_token_ids").split(",")]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ref = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False)
    assert ours == ref[0, 3:].tolist()


def test_text_prompt_and_bad_input(tmp_path):
    assert _aiinfra("models", "create", "--preset", "tiny", str(tmp_path)).returncode == 0
    gen = _aiinfra("generate", str(tmp_path), "--prompt", "hi", "--max-tokens", "3")
    assert gen.returncode == 0, gen.stderr
    assert _field(gen.stdout, "prompt_token_ids") == "104,105"
    bad = _aiinfra("generate", str(tmp_path), "--prompt-ids", "1,x")
    assert bad.returncode == 2 and "--prompt-ids" in bad.stderr
    missing = _aiinfra("generate", str(tmp_path / "nope"), "--prompt-ids", "1")
    assert missing.returncode == 2 and "config.json" in missing.stderr
    preset = _aiinfra("models", "create", "--preset", "huge", str(tmp_path / "x"))
    assert preset.returncode == 2 and "huge" in preset.stderr

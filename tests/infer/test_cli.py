"""`aiinfra generate` runs on the engine and equals the no-cache greedy loop; `bench serve --model`
writes its JSON."""

import json

import pytest
from typer.testing import CliRunner

from aiinfra.cli import app
from aiinfra.models import generate_greedy, load_model


def test_generate_equals_the_greedy_loop(tiny_dir):
    model, config = load_model(tiny_dir)
    for prompt, extra in (([5, 6, 7, 8], []), ([1, 2], ["--ignore-eos"])):
        result = CliRunner().invoke(
            app,
            [
                "generate",
                tiny_dir,
                "--prompt-ids",
                ",".join(map(str, prompt)),
                "--max-tokens",
                "12",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        line = next(x for x in result.output.splitlines() if x.startswith("output_token_ids"))
        ids = [int(t) for t in line.split(":")[1].split(",")]
        eos = None if extra else config.eos_token_id
        assert ids == generate_greedy(model, prompt, 12, eos_token_id=eos)


def test_generate_rejects_out_of_vocabulary_ids(tiny_dir):
    result = CliRunner().invoke(app, ["generate", tiny_dir, "--prompt-ids", "1,100000"])
    assert result.exit_code == 2 and "100000" in result.output


def test_bench_serve_offline_json(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "serve",
            "--model",
            tiny_dir,
            "--num-prompts",
            "6",
            "--input-len",
            "4,20",
            "--output-len",
            "2,6",
            "--vocab",
            "256",
            "--baseline",
            "hf",
            "--hf-batch-size",
            "4",
            "--kv-cache-memory",
            "4MiB",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["output_tokens"] == r["baseline"]["output_tokens"]
    assert r["output_tok_per_s"] > 0 and r["ratio"] > 0
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["cuda_graphs"] is False


def test_generate_engine_flags(tiny_dir):
    args = ["generate", tiny_dir, "--prompt-ids", "5,6,7", "--max-tokens", "3"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    for flags, message in (
        (["--device", "tpu"], "device ('tpu')"),
        (["--dtype", "int8"], "dtype ('int8')"),
        (["--gpu-memory-utilization", "0"], "gpu_memory_utilization (0.0) must be in (0, 1]"),
        (["--gpu-memory-utilization", "1.5", "--enforce-eager"], "gpu_memory_utilization (1.5)"),
    ):
        result = CliRunner().invoke(app, [*args, *flags])
        assert result.exit_code == 2 and message in result.output, (flags, result.output)


def test_serve_rejects_bad_engine_flags(tiny_dir):
    pytest.importorskip("fastapi")  # the command imports the server first
    for flags, message in (
        (["--device", "tpu"], "device ('tpu')"),
        (["--gpu-memory-utilization", "2"], "gpu_memory_utilization (2.0) must be in (0, 1]"),
    ):
        result = CliRunner().invoke(app, ["serve", tiny_dir, "--port", "0", *flags])
        assert result.exit_code == 2 and message in result.output, (flags, result.output)

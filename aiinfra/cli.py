"""The `aiinfra` command line (typer). Commands import their subsystem lazily: `--help` is fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="aiinfra: the AI-infrastructure stack, real and runnable.",
)
models_app = typer.Typer(no_args_is_help=True, help="Create and inspect model folders (HF format).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks, each against its baseline.")
plan_app = typer.Typer(no_args_is_help=True, help="Plan clusters, training and serving layouts.")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
app.add_typer(plan_app, name="plan")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


# --- models ---------------------------------------------------------------------------------------


@models_app.command("create")
def models_create(
    out_dir: Annotated[
        Path, typer.Argument(help="Folder to write (config.json, safetensors, tokenizer).")
    ],
    preset: Annotated[str, typer.Option(help="Model preset, e.g. tiny or bench-32m.")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    architecture: Annotated[
        str | None,
        typer.Option(
            help="Override the architecture, e.g. MistralForCausalLM or Qwen2ForCausalLM."
        ),
    ] = None,
) -> None:
    """Write a seeded random model folder in HF format, with the byte tokenizer's files."""
    from aiinfra.models import create_random_model_dir, get_preset

    try:
        config = get_preset(preset)
        if architecture is not None:
            config = config.replace(
                architecture=architecture, qkv_bias=architecture == "Qwen2ForCausalLM"
            )
        create_random_model_dir(config, out_dir, seed=seed)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"wrote {preset} ({config.num_params() / 1e6:.1f}M parameters) to {out_dir}")


# --- generate -------------------------------------------------------------------------------------


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids ({text!r}) must be comma-separated integers") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Model folder (HF format).")],
    prompt: Annotated[str | None, typer.Option(help="Text prompt.")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="Prompt token ids, e.g. 1,2,3.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 16,
    ignore_eos: Annotated[bool, typer.Option(help="Keep generating past EOS.")] = False,
) -> None:
    """Offline greedy generation."""
    from aiinfra.models import generate_greedy, load_model, load_tokenizer

    if (prompt is None) == (prompt_ids is None):
        _fail("give exactly one of --prompt and --prompt-ids")
    if max_tokens <= 0:
        _fail(f"--max-tokens ({max_tokens}) must be positive")
    try:
        llm, config = load_model(model)
        tokenizer = load_tokenizer(model)
        ids = _parse_ids(prompt_ids) if prompt_ids is not None else tokenizer.encode(prompt or "")
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    eos = None if ignore_eos else config.eos_token_id
    out = generate_greedy(llm, ids, max_tokens, eos_token_id=eos)
    typer.echo(f"prompt_token_ids: {','.join(map(str, ids))}")
    typer.echo(f"output_token_ids: {','.join(map(str, out))}")
    typer.echo(f"text: {tokenizer.decode(out)!r}")


# --- serve (owner: serve) -------------------------------------------------------------------------


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Model folder (HF format) or models:/NAME@ALIAS.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Name in /v1/models.")] = None,
    max_waiting: Annotated[int, typer.Option(help="Waiting requests before 429.")] = 1024,
    kv_cache_memory: Annotated[str, typer.Option(help="KV cache budget, e.g. 2GiB.")] = "2GiB",
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences in one batch.")] = 256,
    tp: Annotated[int, typer.Option(help="Tensor-parallel degree.")] = 1,
) -> None:
    """Serve a model with an OpenAI-compatible HTTP API."""
    from aiinfra.serve.server import run_server

    try:
        run_server(
            model,
            host=host,
            port=port,
            api_key=api_key,
            served_model_name=served_model_name,
            max_waiting=max_waiting,
            kv_cache_memory=kv_cache_memory,
            max_num_seqs=max_num_seqs,
            tp=tp,
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


# --- bench serve (owners: infer for --model, serve for --url) -------------------------------------


@bench_app.command("serve")
def bench_serve(
    model: Annotated[
        str | None, typer.Option(help="Model folder: offline engine throughput.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible server: online benchmark.")
    ] = None,
    workload: Annotated[
        Path | None, typer.Option(help="JSON lines of {prompt_token_ids, max_tokens}.")
    ] = None,
    num_prompts: Annotated[int, typer.Option(help="Generated workload: number of requests.")] = 128,
    input_len: Annotated[
        str, typer.Option(help="Generated workload: prompt lengths LO,HI.")
    ] = "64,512",
    output_len: Annotated[
        str, typer.Option(help="Generated workload: output lengths LO,HI.")
    ] = "32,256",
    vocab: Annotated[int, typer.Option(help="Generated workload: token ids below this.")] = 8192,
    seed: Annotated[int, typer.Option(help="Generated workload: seed.")] = 0,
    baseline: Annotated[str | None, typer.Option(help="'hf': also run HF static batching.")] = None,
    hf_batch_size: Annotated[int, typer.Option(help="Batch size of the HF baseline.")] = 16,
    kv_cache_memory: Annotated[str, typer.Option(help="Engine KV cache budget.")] = "4GiB",
    max_num_seqs: Annotated[int, typer.Option(help="Engine: most sequences per batch.")] = 256,
    max_num_batched_tokens: Annotated[
        int, typer.Option(help="Engine: token budget per step.")
    ] = 4096,
    request_rate: Annotated[
        float, typer.Option(help="Online: Poisson rate (req/s); inf = all at once.")
    ] = float("inf"),
    max_concurrency: Annotated[
        int | None, typer.Option(help="Online: most requests in flight.")
    ] = None,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="Online: goodput TTFT SLO.")] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="Online: goodput TPOT SLO.")] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="Online: model name to request.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="Online: bearer key.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Online: latency CDF plot (PNG).")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON.")
    ] = None,
) -> None:
    """Serving throughput: offline engine (--model) or an online server (--url)."""
    from aiinfra.infer.bench import load_workload, make_workload

    if (model is None) == (url is None):
        _fail("give exactly one of --model (offline) and --url (online)")
    try:
        if workload is not None:
            requests = load_workload(workload)
        else:
            requests = make_workload(
                num_prompts,
                seed,
                _parse_range("--input-len", input_len),
                _parse_range("--output-len", output_len),
                vocab,
            )
        if model is not None:
            from aiinfra.infer.bench import run_offline_bench

            result = run_offline_bench(
                model,
                requests,
                baseline=baseline,
                hf_batch_size=hf_batch_size,
                kv_cache_memory=kv_cache_memory,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
            )
        else:
            from aiinfra.serve.bench import run_online_bench

            assert url is not None
            result = run_online_bench(
                url,
                requests,
                request_rate=request_rate,
                max_concurrency=max_concurrency,
                slo_ttft_ms=slo_ttft_ms,
                slo_tpot_ms=slo_tpot_ms,
                model=served_model_name,
                api_key=api_key,
                plot_path=plot,
            )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if json_path is not None:
        import json

        json_path.write_text(json.dumps(result, indent=2))


def _parse_range(flag: str, text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} ({text!r}) must be LO,HI") from None
    if not 0 < lo <= hi:
        raise ValueError(f"{flag} ({text!r}) must satisfy 0 < LO <= HI")
    return lo, hi


# --- bench comm (owner: comm) ---------------------------------------------------------------------

# --- plan (owner: cluster) ------------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()

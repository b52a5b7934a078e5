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


# engine flags (owner: infer), shared by generate, serve and bench serve; vLLM's names
DeviceOption = Annotated[
    str, typer.Option(help="Engine device: auto (cuda when available), cpu, cuda or cuda:N.")
]
DtypeOption = Annotated[
    str, typer.Option(help="Engine dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, ...")
]
GpuMemoryOption = Annotated[
    float,
    typer.Option(help="CUDA: fraction of GPU memory for weights, activations and the KV cache."),
]
EnforceEagerOption = Annotated[
    bool, typer.Option("--enforce-eager", help="CUDA: no CUDA graphs for decode steps.")
]


def _engine_fields(
    model: str,
    *,
    device: str,
    dtype: str,
    gpu_memory_utilization: float,
    enforce_eager: bool,
    kv_cache_memory: str | None,
    cpu_kv_cache_memory: str,
) -> dict[str, object]:
    """EngineConfig fields from the engine flags: no --kv-cache-memory means cpu_kv_cache_memory
    on CPU and the --gpu-memory-utilization budget on CUDA. Bad values raise ValueError."""
    from aiinfra.infer import EngineConfig

    fields: dict[str, object] = {
        "device": device,
        "dtype": dtype,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enforce_eager": enforce_eager,
        "kv_cache_memory": kv_cache_memory,
    }
    if kv_cache_memory is None:
        config = EngineConfig(model=model, **fields)  # type: ignore[arg-type]
        if config.torch_device.type == "cpu":
            fields["kv_cache_memory"] = cpu_kv_cache_memory
    return fields


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Model folder (HF format).")],
    prompt: Annotated[str | None, typer.Option(help="Text prompt.")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="Prompt token ids, e.g. 1,2,3.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 16,
    ignore_eos: Annotated[bool, typer.Option(help="Keep generating past EOS.")] = False,
    kv_cache_memory: Annotated[
        str | None, typer.Option(help="KV cache budget, e.g. 256MiB (CPU default 256MiB).")
    ] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    gpu_memory_utilization: GpuMemoryOption = 0.9,
    enforce_eager: EnforceEagerOption = False,
) -> None:
    """Offline greedy generation on the engine (paged KV cache)."""
    from aiinfra.infer import LLM, SamplingParams

    if (prompt is None) == (prompt_ids is None):
        _fail("give exactly one of --prompt and --prompt-ids")
    if max_tokens <= 0:
        _fail(f"--max-tokens ({max_tokens}) must be positive")
    try:
        fields = _engine_fields(
            model,
            device=device,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            kv_cache_memory=kv_cache_memory,
            cpu_kv_cache_memory="256MiB",
        )
        llm = LLM(model, **fields)
        ids = (
            _parse_ids(prompt_ids) if prompt_ids is not None else llm.tokenizer.encode(prompt or "")
        )
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        out = llm.generate([ids], params, use_tqdm=False)[0].outputs[0]
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"prompt_token_ids: {','.join(map(str, ids))}")
    typer.echo(f"output_token_ids: {','.join(map(str, out.token_ids))}")
    typer.echo(f"text: {out.text!r}")


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
    kv_cache_memory: Annotated[
        str | None, typer.Option(help="KV cache budget, e.g. 2GiB (CPU default 2GiB).")
    ] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences in one batch.")] = 256,
    tp: Annotated[int, typer.Option(help="Tensor-parallel degree.")] = 1,
    engine_process: Annotated[
        bool, typer.Option(help="Step the engine in its own process (else a thread).")
    ] = True,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    gpu_memory_utilization: GpuMemoryOption = 0.9,
    enforce_eager: EnforceEagerOption = False,
) -> None:
    """Serve a model with an OpenAI-compatible HTTP API."""
    from aiinfra.serve.engine_core import EngineStartupError
    from aiinfra.serve.server import run_server

    try:
        fields = _engine_fields(
            model,
            device=device,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            kv_cache_memory=kv_cache_memory,
            cpu_kv_cache_memory="2GiB",
        )
        run_server(
            model,
            host=host,
            port=port,
            api_key=api_key,
            served_model_name=served_model_name,
            max_waiting=max_waiting,
            max_num_seqs=max_num_seqs,
            tp=tp,
            engine_process=engine_process,
            **fields,  # type: ignore[arg-type]
        )
    except (ValueError, FileNotFoundError, EngineStartupError) as e:
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
    kv_cache_memory: Annotated[
        str | None,
        typer.Option(help="Engine KV cache budget (default 4GiB on CPU; CUDA: from GPU memory)."),
    ] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Engine: most sequences per batch.")] = 256,
    max_num_batched_tokens: Annotated[
        int, typer.Option(help="Engine: token budget per step.")
    ] = 4096,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    gpu_memory_utilization: GpuMemoryOption = 0.9,
    enforce_eager: EnforceEagerOption = False,
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
                device=device,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
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
                seed=seed,  # the Poisson arrivals follow the workload's seed
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


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise ValueError(f"--sizes: {text!r} is not a size like 8, 4K or 64M") from None


def _parse_sizes(text: str) -> tuple[int, ...]:
    """'8,1K,64M' (a list) or '8:256M' (powers of two from 8 B to 256 MiB)."""
    if ":" in text:
        lo, hi = (_parse_size(x) for x in text.split(":"))
        if not 0 < lo <= hi:
            raise ValueError(f"--sizes ({text!r}) must be LO:HI with 0 < LO <= HI")
        return tuple(lo << i for i in range((hi // lo).bit_length()) if lo << i <= hi)
    return tuple(_parse_size(x) for x in text.split(",") if x.strip())


@bench_app.command("comm")
def bench_comm(
    op: Annotated[str, typer.Option(help="all_reduce, all_gather, reduce_scatter, ...")] = (
        "all_reduce"
    ),
    world_size: Annotated[int, typer.Option(help="Local ranks to spawn (gloo).")] = 2,
    sizes: Annotated[str, typer.Option(help="Bytes: '8,1K,64M' or 'LO:HI' powers of 2.")] = (
        "8:256M"
    ),
    impl: Annotated[
        str, typer.Option(help="Comma list: torch (baseline), auto, ALG, ALG@shm, ALG@torch.")
    ] = "torch,auto",
    registered: Annotated[
        bool, typer.Option(help="Our impls use buffers comm allocated in shared memory.")
    ] = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    warmup: Annotated[int, typer.Option(help="Untimed calls per size, up front.")] = 3,
    block_warmup: Annotated[
        int, typer.Option(help="Untimed calls before every timed block (steady state).")
    ] = 1,
    iters: Annotated[int, typer.Option(help="Calls per timed block (fewer above 8 MiB).")] = 20,
    repeats: Annotated[
        int, typer.Option(help="Timed blocks per impl, impls taking turns; median reported.")
    ] = 5,
    calibrate: Annotated[
        bool, typer.Option(help="Fit the cost model on these ranks first and save it.")
    ] = False,
    tuning: Annotated[
        Path | None, typer.Option(help="Cost-model JSON (default ~/.cache/aiinfra/).")
    ] = None,
    chunk: Annotated[
        str, typer.Option(help="Staging chunk of the shm direct algorithms, e.g. 1M.")
    ] = "8M",
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the rows as JSON.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG of busbw against size per impl.")] = None,
) -> None:
    """Collective benchmark (nccl-tests style) against torch.distributed's own, in the same run."""
    from aiinfra.comm.bench import BenchConfig, format_table, run_bench, save_plot
    from aiinfra.comm.tuner import DEFAULT_TUNING_PATH

    try:
        config = BenchConfig(
            op=op,
            world_size=world_size,
            sizes=_parse_sizes(sizes),
            impls=tuple(x.strip() for x in impl.split(",") if x.strip()),
            registered=registered,
            dtype=dtype,
            warmup=warmup,
            block_warmup=block_warmup,
            iters=iters,
            repeats=repeats,
            calibrate=calibrate,
            tuning_path=tuning or DEFAULT_TUNING_PATH,
            chunk_bytes=_parse_size(chunk),
        )
        result = run_bench(config)
    except ValueError as e:
        _fail(str(e))
    typer.echo(format_table(result))
    if json_path is not None:
        import json
        from dataclasses import asdict

        json_path.write_text(json.dumps(asdict(result), indent=2))
    if plot is not None:
        save_plot(result, plot)


# --- plan (owner: cluster) ------------------------------------------------------------------------

_ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Preset (e.g. llama-3-70b) or HF config.json.")
]
_IntOpt = Annotated[int | None, typer.Option()]


def _plan_model(model, hidden, layers, heads, kv_heads, vocab, ffn_hidden, mlp):  # type: ignore[no-untyped-def]
    from aiinfra.cluster.report import resolve_model

    return resolve_model(
        model, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab,
        ffn_hidden=ffn_hidden, mlp=mlp,
    )  # fmt: skip


def _write_json(json_path: Path | None, data: object) -> None:
    import json

    if json_path is None:
        return
    text = json.dumps(data, indent=2)
    if str(json_path) == "-":
        typer.echo(text)
    else:
        json_path.write_text(text)


@plan_app.command("train")
def plan_train(
    model: _ModelOpt = None,
    hidden: Annotated[int | None, typer.Option(help="Custom shape: hidden size.")] = None,
    layers: Annotated[int | None, typer.Option(help="Custom shape: layers.")] = None,
    heads: Annotated[int | None, typer.Option(help="Custom shape: attention heads.")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="Custom shape: KV heads.")] = None,
    vocab: Annotated[int | None, typer.Option(help="Custom shape: vocabulary.")] = None,
    ffn_hidden: Annotated[int | None, typer.Option(help="Custom shape: MLP width.")] = None,
    mlp: Annotated[str | None, typer.Option(help="Custom shape: gelu | swiglu.")] = None,
    gpu: Annotated[str, typer.Option(help="GPU (a100, h100, ...) or node type.")] = "h100",
    num_gpus: Annotated[
        str, typer.Option(help="GPUs in the cluster, or sizes to compare: 256,512,1024.")
    ] = "8",
    objective: Annotated[str, typer.Option(help="Rank sizes by: time | cost.")] = "time",
    price_per_gpu_hour: Annotated[
        float | None, typer.Option(help="Price of a GPU-hour, for the cost column.")
    ] = None,
    hardware: Annotated[Path | None, typer.Option(help="TOML/JSON of extra hardware.")] = None,
    fabric: Annotated[str, typer.Option(help="rail-optimized | fat-tree.")] = "rail-optimized",
    oversubscription: Annotated[float, typer.Option(help="Leaf down:up ratio.")] = 1.0,
    tp: _IntOpt = None,
    pp: _IntOpt = None,
    dp: _IntOpt = None,
    zero: Annotated[int | None, typer.Option(help="ZeRO stage 0..3.")] = None,
    micro_batch: _IntOpt = None,
    global_batch: Annotated[int | None, typer.Option(help="Sequences per step.")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 4096,
    recompute: Annotated[str | None, typer.Option(help="none | selective | full.")] = None,
    interleave: Annotated[int | None, typer.Option(help="Virtual pipeline stages.")] = None,
    flash_attention: Annotated[bool, typer.Option(help="Fused attention kernels.")] = True,
    tokens: Annotated[float, typer.Option(help="Tokens to train on (time to train).")] = 1e12,
    top: Annotated[int, typer.Option(help="Layouts to show.")] = 10,
    plot: Annotated[Path | None, typer.Option(help="Layout comparison (PNG).")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write JSON ('-' for stdout).")
    ] = None,
) -> None:
    """Memory, step time and MFU of a training layout; searches layouts unless one is fixed."""
    from typing import Literal

    from aiinfra.cluster.report import (
        parse_counts,
        plans_table,
        print_table,
        resolve_cluster,
        sizes_table,
    )
    from aiinfra.cluster.search import compare_sizes, search
    from aiinfra.cluster.training import EstimateOptions, estimate
    from aiinfra.parallel.config import ParallelConfig

    sizes: list = []
    try:
        cfg = _plan_model(model, hidden, layers, heads, kv_heads, vocab, ffn_hidden, mlp)
        counts = parse_counts(num_gpus)
        cluster = resolve_cluster(
            gpu, counts[0], hardware=hardware, fabric=fabric, oversubscription=oversubscription
        )
        options = EstimateOptions(flash_attention=flash_attention)
        batch = global_batch or max(1, 4 * 2**20 // seq_len)  # ~4M tokens per step by default
        fixed = (tp, pp, dp, zero, micro_batch, recompute, interleave)
        if len(counts) > 1 and any(x is not None for x in fixed):
            raise ValueError("compare several --num-gpus only without a fixed layout")
        if len(counts) > 1:
            goal: Literal["time", "cost"] = "cost" if objective == "cost" else "time"
            if objective != goal:
                raise ValueError(f"--objective ({objective!r}) must be 'time' or 'cost'")
            sizes = compare_sizes(cfg, cluster, counts, batch, seq_len, tokens, goal, options)
            cluster = resolve_cluster(
                gpu, sizes[0].num_gpus, hardware=hardware, fabric=fabric,
                oversubscription=oversubscription,
            )  # fmt: skip
        if any(x is not None for x in fixed):
            t, p = tp or 1, pp or 1
            layout = ParallelConfig(
                tp=t, pp=p, dp=dp or max(1, counts[0] // (t * p)), zero_stage=zero or 0,
                micro_batch_size=micro_batch or 1, global_batch_size=batch, seq_len=seq_len,
                recompute=recompute or "none", interleave=interleave or 1,  # type: ignore[arg-type]
                sequence_parallel=t > 1,
            )  # fmt: skip
            plans = [estimate(cfg, layout, cluster, options)]
            explanation = "" if plans[0].fits else "this layout does not fit in memory"
            considered = 1
        else:
            result = sizes[0].result if sizes else search(cfg, cluster, batch, seq_len, options)
            plans, explanation, considered = result.plans, result.explanation, result.num_considered
    except ValueError as e:
        _fail(str(e))
    if sizes:
        print_table(sizes_table(sizes, objective, price_per_gpu_hour, tokens))
    title = f"{cluster.num_gpus}x {cluster.node.gpu.name}, {considered} layout(s) considered"
    print_table(plans_table(plans[:top], title))
    if explanation:
        typer.echo(explanation)
    if plans:
        best = plans[0]
        typer.echo(
            f"time to train on {tokens:.3g} tokens: {best.days_to_train(tokens):.1f} days; "
            f"checkpoint write {best.checkpoint_write_s:.0f} s; a DPU would free "
            f"{100 * best.host_cpu.dpu_freed_share:.1f}% of the host CPU"
        )
        if best.notes:
            typer.echo("notes: " + "; ".join(best.notes))
    if plot is not None and plans:
        from aiinfra.cluster.plots import plot_layouts

        plot_layouts(plans, plot, top=top)
    best_dict = plans[0].as_dict() if plans else None
    if best_dict is not None:
        best_dict["days_to_train"] = plans[0].days_to_train(tokens)
    headline = ("layout", "tflops_per_gpu", "mfu", "step_time_s", "memory_gb_per_gpu", "fits")
    top_level = {k: best_dict[k] for k in headline} if best_dict else {}
    _write_json(
        json_path,
        {**top_level, "best": best_dict, "explanation": explanation,
         "layouts": [p.as_dict() for p in plans[:top]],
         "sizes": [o.as_dict() for o in sizes]},
    )  # fmt: skip


@plan_app.command("infer")
def plan_infer(
    model: _ModelOpt = None,
    hidden: _IntOpt = None,
    layers: _IntOpt = None,
    heads: _IntOpt = None,
    kv_heads: _IntOpt = None,
    vocab: _IntOpt = None,
    ffn_hidden: _IntOpt = None,
    mlp: Annotated[str | None, typer.Option(help="gelu | swiglu.")] = None,
    gpu: Annotated[str, typer.Option(help="GPU or node type.")] = "h100",
    tp: Annotated[int, typer.Option(help="GPUs per replica.")] = 1,
    prompt_len: Annotated[int, typer.Option(help="Input tokens per request.")] = 1024,
    output_len: Annotated[int, typer.Option(help="Output tokens per request.")] = 256,
    rate: Annotated[float, typer.Option(help="Target requests/s.")] = 10.0,
    ttft_ms: Annotated[float, typer.Option(help="Time-to-first-token target.")] = 1000.0,
    tpot_ms: Annotated[float, typer.Option(help="Time-per-output-token target.")] = 50.0,
    fp8: Annotated[bool, typer.Option(help="fp8 weights and KV cache.")] = False,
    hardware: Annotated[Path | None, typer.Option(help="TOML/JSON of extra hardware.")] = None,
    plot: Annotated[Path | None, typer.Option(help="TPOT and tokens/s vs batch (PNG).")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write JSON ('-' for stdout).")
    ] = None,
) -> None:
    """KV capacity, prefill/decode roofline, tokens/s per replica and replicas for a load."""
    from aiinfra.cluster.inference import ServingConfig, plan_serving, serving_curve
    from aiinfra.cluster.report import print_table, resolve_cluster, summary_table

    try:
        cfg = _plan_model(model, hidden, layers, heads, kv_heads, vocab, ffn_hidden, mlp)
        cluster = resolve_cluster(gpu, None, hardware=hardware)
        nbytes = 1.0 if fp8 else 2.0
        serving = ServingConfig(
            tp=tp, prompt_len=prompt_len, output_len=output_len, request_rate=rate,
            ttft_s=ttft_ms / 1e3, tpot_s=tpot_ms / 1e3, weight_bytes=nbytes, kv_bytes=nbytes,
        )  # fmt: skip
        plan = plan_serving(cfg, cluster, serving)
    except ValueError as e:
        _fail(str(e))
    d = plan.as_dict()
    print_table(summary_table(f"{cfg.num_params() / 1e9:.1f}B on {tp}x {cluster.node.gpu.name}", d))
    if plot is not None:
        from aiinfra.cluster.plots import plot_serving

        curve = serving_curve(cfg, cluster, serving)
        plot_serving(curve, plan.batch_size, serving.tpot_s, plot)
    _write_json(json_path, d)


@plan_app.command("cluster")
def plan_cluster(
    gpu: Annotated[str, typer.Option(help="GPU or node type.")] = "h100",
    num_gpus: Annotated[int, typer.Option(help="GPUs in the cluster.")] = 1024,
    fabric: Annotated[str, typer.Option(help="rail-optimized | fat-tree.")] = "rail-optimized",
    oversubscription: Annotated[float, typer.Option(help="Leaf down:up ratio.")] = 1.0,
    switch_radix: Annotated[int, typer.Option(help="Ports per switch.")] = 64,
    hardware: Annotated[Path | None, typer.Option(help="TOML/JSON of extra hardware.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Topology drawing (PNG).")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write JSON ('-' for stdout).")
    ] = None,
) -> None:
    """Size a cluster network: switches, cables, bisection, hops, collective bandwidth."""
    from aiinfra.cluster.report import cluster_summary, print_table, resolve_cluster, summary_table

    try:
        cluster = resolve_cluster(
            gpu, num_gpus, hardware=hardware, fabric=fabric, oversubscription=oversubscription,
            switch_radix=switch_radix,
        )  # fmt: skip
        summary = cluster_summary(cluster)
    except ValueError as e:
        _fail(str(e))
    print_table(summary_table(f"{cluster.num_gpus}x {cluster.node.name}, {fabric}", summary))
    if plot is not None:
        from aiinfra.cluster.plots import draw_topology

        draw_topology(cluster, plot)
    _write_json(json_path, summary)


@plan_app.command("pipeline")
def plan_pipeline(
    pp: Annotated[int, typer.Option(help="Pipeline stages.")] = 4,
    micro_batches: Annotated[int, typer.Option(help="Micro-batches per step.")] = 8,
    schedule: Annotated[str, typer.Option(help="gpipe | 1f1b | interleaved.")] = "1f1b",
    interleave: Annotated[int, typer.Option(help="Chunks per stage (interleaved).")] = 1,
    forward_ms: Annotated[float, typer.Option(help="Forward time per stage.")] = 1.0,
    backward_ms: Annotated[float, typer.Option(help="Backward time per stage.")] = 2.0,
    plot: Annotated[Path | None, typer.Option(help="Gantt chart (PNG).")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write JSON ('-' for stdout).")
    ] = None,
) -> None:
    """Simulate a pipeline schedule: makespan, bubble, Gantt chart."""
    from aiinfra.cluster.schedule import bubble_fraction, simulate

    try:
        actions = simulate(
            schedule, pp, micro_batches, forward_ms / 1e3, backward_ms / 1e3, interleave
        )
    except ValueError as e:
        _fail(str(e))
    makespan = max(a.end for a in actions)
    bubble = bubble_fraction(actions, pp)
    slots = (pp - 1) / (interleave if schedule == "interleaved" else 1)
    typer.echo(
        f"{schedule}: pp={pp}, v={interleave}, {micro_batches} micro-batches: step "
        f"{makespan * 1e3:.2f} ms, bubble {100 * bubble:.1f}% (analytic (p-1)/v/(m+(p-1)/v) = "
        f"{100 * slots / (micro_batches + slots):.1f}%)"
    )
    if plot is not None:
        from aiinfra.cluster.plots import plot_pipeline

        title = f"{schedule}, pp={pp}, v={interleave}, m={micro_batches}, bubble {bubble:.1%}"
        plot_pipeline(actions, pp, title, plot)
    _write_json(
        json_path,
        {"schedule": schedule, "pp": pp, "interleave": interleave,
         "micro_batches": micro_batches, "step_time_s": makespan, "bubble_fraction": bubble,
         "actions": [[a.stage, a.kind, a.micro_batch, a.chunk, a.start, a.end] for a in actions]},
    )  # fmt: skip


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""The `aiinfra` command line (typer). Commands import their subsystem lazily so `--help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="aiinfra: the AI-infrastructure stack, real and runnable.")
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
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (config.json, safetensors, tokenizer).")],
    preset: Annotated[str, typer.Option(help="Model preset, e.g. tiny or bench-32m.")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    architecture: Annotated[str | None, typer.Option(
        help="Override the architecture (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM).")
    ] = None,
) -> None:
    """Write a seeded random model folder in HF format, with the byte tokenizer's files."""
    from aiinfra.models import create_random_model_dir, get_preset

    try:
        config = get_preset(preset)
        if architecture is not None:
            config = config.replace(architecture=architecture,
                                    qkv_bias=architecture == "Qwen2ForCausalLM")
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()

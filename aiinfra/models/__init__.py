"""Models: the Llama-family config, reference transformer, HF-format weights and tokenizers."""

import json
from pathlib import Path

import torch

from aiinfra.models.config import PRESETS, ModelConfig, get_preset
from aiinfra.models.llama import LlamaForCausalLM, generate_greedy
from aiinfra.models.tokenizer import ByteTokenizer, HFTokenizer, TokenizerLike, load_tokenizer
from aiinfra.models.weights import load_model, save_model


def build_model(
    config: ModelConfig,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A seeded random model; the same seed gives the same weights on any device."""
    model = LlamaForCausalLM(config)
    model.init_weights(seed)
    return model.to(device=device, dtype=dtype)


def create_random_model_dir(
    config: ModelConfig, out_dir: str | Path, *, seed: int = 0, max_shard_bytes: int | None = None
) -> Path:
    """Write a seeded random model in HF format with the byte tokenizer's files."""
    out = Path(out_dir)
    save_model(build_model(config, seed=seed), out, max_shard_bytes=max_shard_bytes)
    ByteTokenizer().save(out)
    gen = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


__all__ = [
    "PRESETS",
    "ByteTokenizer",
    "HFTokenizer",
    "LlamaForCausalLM",
    "ModelConfig",
    "TokenizerLike",
    "build_model",
    "create_random_model_dir",
    "generate_greedy",
    "get_preset",
    "load_model",
    "load_tokenizer",
    "save_model",
]

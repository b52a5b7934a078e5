"""Safetensors load/save in Hugging Face key layout (Llama, Mistral, Qwen2), single or sharded.

Loading checks every key and shape before any tensor is assigned: nothing is half-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aiinfra.models.config import ModelConfig
from aiinfra.models.llama import LlamaForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_TIED_KEY = "lm_head.weight"


def model_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The HF-layout state dict; a tied lm_head is left out, as transformers saves it."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop(_TIED_KEY, None)
    return state


def save_model(
    model: LlamaForCausalLM, out_dir: str | Path, *, max_shard_bytes: int | None = None
) -> None:
    """Write config.json and the weights; with max_shard_bytes, shards plus an index file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out)
    state = {k: v.cpu() for k, v in model_state_dict(model).items()}
    if max_shard_bytes is None or _nbytes(state.values()) <= max_shard_bytes:
        save_file(state, str(out / SINGLE_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": _nbytes(state.values())}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """key -> file holding it."""
    if (model_dir / INDEX_FILE).exists():
        weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
        return {k: model_dir / f for k, f in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def load_state_dict(
    model_dir: str | Path, expected: dict[str, torch.Size], *, tied: bool = False
) -> dict[str, torch.Tensor]:
    """Read exactly the expected keys with the expected shapes, or raise naming what differs."""
    model_dir = Path(model_dir)
    files = _weight_files(model_dir)
    wanted = set(expected) - ({_TIED_KEY} if tied else set())
    present = set(files) - ({_TIED_KEY} if tied else set())
    missing, unexpected = sorted(wanted - present), sorted(present - wanted)
    if missing or unexpected:
        raise ValueError(
            f"weights in {model_dir} do not match the model: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key in sorted(wanted):
        by_file.setdefault(files[key], []).append(key)
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for key in keys:
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[key]):
                    raise ValueError(
                        f"tensor {key} in {path.name} has shape {list(shape)}, "
                        f"the model expects {list(expected[key])}"
                    )
                state[key] = f.get_tensor(key)
    return state


def load_model(
    model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model for model_dir/config.json and load its safetensors weights."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    config = ModelConfig.from_file(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = load_state_dict(model_dir, expected, tied=config.tie_word_embeddings)
    if config.tie_word_embeddings:
        state[_TIED_KEY] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device=device, dtype=dtype)
    return model.eval(), config

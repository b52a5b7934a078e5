"""ModelConfig: one description of a Llama-family decoder (GQA, RoPE, RMSNorm, SwiGLU), its presets,
and the conversion from and to Hugging Face `config.json` (Llama, Mistral, Qwen2)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and hyper-parameters of a decoder-only transformer.

    `mlp="gelu"` (a 4h GELU MLP, Megatron's GPT) exists for the planner only; the reference
    model implements the Llama family (`mlp="swiglu"`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size}) "
                "unless head_dim is given"
            )
        if self.head_dim is not None and self.head_dim <= 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be positive")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture ({self.architecture!r}) is not supported; expected one of "
                f"{', '.join(ARCHITECTURES)}"
            )
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"mlp ({self.mlp!r}) must be 'swiglu' or 'gelu'")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) must be positive")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.dim_per_head

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.dim_per_head

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Exact parameter count of the model this config builds."""
        h, d = self.hidden_size, self.dim_per_head
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        ffn_mats = 3 if self.mlp == "swiglu" else 2
        mlp = ffn_mats * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        del d
        total = self.num_layers * per_layer + h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json ---------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config dict; unsupported architectures raise ValueError."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(hf.get("model_type"))
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"architecture {arch!r} in config.json is not supported; expected one of "
                f"{', '.join(ARCHITECTURES)}"
            )
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling not in (None, {}) and rope_scaling.get(
            "rope_type", rope_scaling.get("type")
        ) not in (None, "default"):
            raise ValueError(f"rope_scaling ({rope_scaling!r}) is not supported")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(
                f"hidden_act ({act!r}) is not supported; Llama-family models use 'silu'"
            )
        num_heads = hf["num_attention_heads"]
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        head_dim = hf.get("head_dim")
        if head_dim == hf["hidden_size"] // num_heads:
            head_dim = None
        sliding_window = hf.get("sliding_window") if arch == "MistralForCausalLM" else None
        if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window (True) is not supported for Qwen2")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=(arch == "Qwen2ForCausalLM") or bool(hf.get("attention_bias", False)),
            sliding_window=sliding_window,
            architecture=arch,
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
            initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_hf(self) -> dict[str, Any]:
        if self.mlp != "swiglu":
            raise ValueError(f"mlp ({self.mlp!r}) has no Hugging Face Llama-family equivalent")
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": _MODEL_TYPES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.dim_per_head,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.architecture == "LlamaForCausalLM":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        elif self.architecture == "MistralForCausalLM":
            if self.qkv_bias:
                raise ValueError("qkv_bias (True) is not expressible for MistralForCausalLM")
            hf["sliding_window"] = self.sliding_window
        else:
            if not self.qkv_bias:
                raise ValueError("qkv_bias (False) is not expressible for Qwen2ForCausalLM")
            hf["use_sliding_window"] = False
        return hf

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path) as f:
            return cls.from_hf(json.load(f))

    def save(self, out_dir: str | Path) -> None:
        with open(Path(out_dir) / "config.json", "w") as f:
            json.dump(self.to_hf(), f, indent=2)


def _first_id(value: int | list[int] | None) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _arch_from_model_type(model_type: str | None) -> str | None:
    for arch, mt in _MODEL_TYPES.items():
        if mt == model_type:
            return arch
    return model_type


# --- presets --------------------------------------------------------------------------------------
# tiny / bench-32m use the byte tokenizer's special ids (256 bos, 257 eos).

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=2048,
        bos_token_id=256,
        eos_token_id=257,
    ),
    "bench-32m": ModelConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=2048,
        bos_token_id=256,
        eos_token_id=257,
    ),
    # the GPU benchmark model: TinyLlama-1.1B's shape (1.10B parameters), random weights
    "bench-1b": ModelConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_layers=22,
        num_heads=32,
        num_kv_heads=8,
        max_position_embeddings=2048,
        bos_token_id=256,
        eos_token_id=257,
    ),
    # configuration-only presets of real models, for the planner
    "llama-3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3-70b": ModelConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3-405b": ModelConfig(
        vocab_size=128256,
        hidden_size=16384,
        intermediate_size=53248,
        num_layers=126,
        num_heads=128,
        num_kv_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # GPT-3 175B (Brown et al. 2020): h=12288, 96 layers, 96 heads, 4h GELU MLP, seq 2048
    "gpt3-175b": ModelConfig(
        vocab_size=51200,
        hidden_size=12288,
        intermediate_size=4 * 12288,
        num_layers=96,
        num_heads=96,
        num_kv_heads=96,
        max_position_embeddings=2048,
        mlp="gelu",
    ),
    # Megatron-LM's 1T model (Narayanan et al. 2021, Table 1)
    "megatron-1t": ModelConfig(
        vocab_size=51200,
        hidden_size=25600,
        intermediate_size=4 * 25600,
        num_layers=128,
        num_heads=160,
        num_kv_heads=160,
        max_position_embeddings=2048,
        mlp="gelu",
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset ({name!r}) is unknown; available: {', '.join(PRESETS)}")
    return PRESETS[name]

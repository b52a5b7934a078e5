"""The single-process reference transformer for the Llama family (Llama, Mistral, Qwen2).

Module names equal Hugging Face's (`model.layers.0.self_attn.q_proj`): a state dict is an HF
checkpoint. Positions are explicit and attention is pluggable: the engine passes a paged-KV `attn`
callable, pipeline stages run `layers` slices; with `attn=None` each batch row is one sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aiinfra.models.config import ModelConfig

# attn(layer_idx, q [B,T,H,D], k [B,T,Hkv,D], v [B,T,Hkv,D]) -> [B,T,H,D]; q and k already rotated
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in fp32 as HF does, then scale in the input dtype
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) in HF Llama's rotate-half layout; cos/sin from explicit positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        # a plain attribute, not a buffer: it stays fp32 whatever dtype the model is cast to
        self._inv_freq = self._compute_inv_freq(torch.device("cpu"))

    def _compute_inv_freq(self, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        return 1.0 / (self.theta ** (exponent / self.head_dim))

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._compute_inv_freq(positions.device)
        freqs = positions[..., None].float() * self._inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, T, H, D]; cos/sin: [B, T, D] broadcast over heads
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None = None
) -> torch.Tensor:
    """Plain causal attention over whole sequences, one per batch row: [B,T,H,D] -> [B,T,H,D]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    T = q.shape[2]
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if sliding_window is not None and sliding_window < T:
        i = torch.arange(T, device=q.device)
        dist = i[:, None] - i[None, :]
        mask = (dist >= 0) & (dist < sliding_window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """GQA self-attention. Head counts are read from the weight shapes, so a tensor-parallel shard
    (fewer local heads) runs the same code."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.dim_per_head
        self.layer_idx = layer_idx
        self.head_dim = d
        self.sliding_window = config.sliding_window
        self.q_proj = nn.Linear(h, config.q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, config.kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, config.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_size, h, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionFn | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if attn is None:
            y = causal_attention(q, k, v, self.sliding_window)
        else:
            y = attn(self.layer_idx, q, k, v)
        return self.o_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionFn | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm: token ids -> hidden states."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.dim_per_head, config.rope_theta)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn | None = None
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attn)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The Llama-family causal LM: `forward(input_ids [B,T], positions [B,T]) -> logits [B,T,V]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.mlp != "swiglu":
            raise ValueError(f"mlp ({config.mlp!r}) is for the planner only; the model is SwiGLU")
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn: AttentionFn | None = None,
    ) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(
                input_ids
            )
        return self.compute_logits(self.model(input_ids, positions, attn))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded random init: normal(0, initializer_range) for matrices, ones for norms (as HF)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


@torch.no_grad()
def generate_greedy(
    model: LlamaForCausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> list[int]:
    """The plain no-cache greedy loop: re-run the whole sequence for each new token.

    This is the reference the engine is tested against, so it stays deliberately simple.
    """
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], device=device)
        next_id = int(model(x)[0, -1].argmax())
        out.append(next_id)
        ids.append(next_id)
        if eos_token_id is not None and next_id == eos_token_id:
            break
    return out

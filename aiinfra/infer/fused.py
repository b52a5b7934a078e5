"""The fused decoder for inference on CUDA: merged q/k/v and gate/up projections and fused
element-wise ops (RMSNorm with the residual add, SiLU-and-mul, RoPE of q and k), as vLLM's Llama.

The reference layer (models/llama.py) launches ~40 kernels per layer: RMSNorm alone is 8 ops, RoPE
10. In a batch-1 decode step those tiny kernels cost more than the weight reads. The fused layer is
10 launches: norm, qkv, rope, (K/V write, attention), o_proj, add+norm, gate_up, silu_and_mul,
down. `fuse_for_inference(model)` swaps the modules in place, built from the loaded weights; the
element-wise ops are the torch references below (`REFERENCE_OPS`) or their Triton kernels
(triton_fused.py, `triton_ops()`), which keep the same signatures and are tested against them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aiinfra.models.llama import (
    AttentionFn,
    DecoderLayer,
    LlamaForCausalLM,
    RMSNorm,
    causal_attention,
    rotate_half,
)

logger = logging.getLogger(__name__)


# --- torch references ---------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """models.llama.RMSNorm as a function: normalize in fp32, round to x's dtype, scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused_add_rms_norm, out of place: new_residual = x + residual (in their dtype),
    returns (rms_norm(new_residual), new_residual)."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2F] -> [..., F]: silu(first half) * second half (the SwiGLU activation)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE in HF's rotate-half layout: q [..., H, D] and k [..., Hkv, D] of the tokens at
    `positions` [...]; cos_sin_cache [max_positions, D] holds cos in its first D/2 columns and sin
    in the last D/2, in q's dtype (see `make_cos_sin_cache`). Returns new (q, k)."""
    cos, sin = cos_sin_cache[positions].unsqueeze(-2).chunk(2, dim=-1)  # [..., 1, D/2]
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def make_cos_sin_cache(model: LlamaForCausalLM, max_positions: int) -> torch.Tensor:
    """[max_positions, D] cos | sin halves in the model's dtype, from the model's own
    RotaryEmbedding, so position p gets exactly the values the reference computes for it."""
    p = next(model.parameters())
    positions = torch.arange(max_positions, device=p.device)
    cos, sin = model.model.rotary_emb(positions, p.dtype)  # [P, D], both halves equal
    half = cos.shape[-1] // 2
    return torch.cat((cos[:, :half], sin[:, :half]), dim=-1).contiguous()


@dataclass(frozen=True)
class FusedOps:
    """One implementation of each element-wise op of the fused layer."""

    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    fused_add_rms_norm: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
    ]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    rotary_embedding: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        tuple[torch.Tensor, torch.Tensor],
    ]


REFERENCE_OPS = FusedOps(
    "reference", rms_norm_ref, fused_add_rms_norm_ref, silu_and_mul_ref, rotary_embedding_ref
)


def triton_ops() -> FusedOps:
    """The Triton kernels; raises ImportError where Triton is missing."""
    from aiinfra.infer import triton_fused as t

    return FusedOps(
        "triton",
        t.rms_norm_triton,
        t.fused_add_rms_norm_triton,
        t.silu_and_mul_triton,
        t.rotary_embedding_triton,
    )


def default_ops(device: torch.device) -> FusedOps:
    """Triton on CUDA when it imports, else the torch references."""
    if device.type == "cuda":
        try:
            return triton_ops()
        except ImportError as e:
            logger.warning("fused layer: Triton unavailable (%s); using the torch references", e)
    return REFERENCE_OPS


# --- fused modules --------------------------------------------------------------------------------


@torch.no_grad()
def merge_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the given Linears' outputs side by side (weights concatenated
    along the output dim); the caller drops the originals, which frees them."""
    first = linears[0]
    has_bias = first.bias is not None
    assert all((lin.bias is not None) == has_bias for lin in linears)
    merged = nn.Linear(
        first.in_features, sum(lin.out_features for lin in linears), bias=has_bias, device="meta"
    )
    merged.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
    if has_bias:
        merged.bias = nn.Parameter(
            torch.cat([lin.bias for lin in linears]),  # type: ignore[misc]
            requires_grad=False,
        )
    return merged


class FusedRMSNorm(nn.Module):
    """RMSNorm that also takes the residual stream: forward(x) -> normed, or
    forward(x, residual) -> (normed(x + residual), x + residual)."""

    def __init__(self, norm: RMSNorm, ops: FusedOps) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps
        self.ops = ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class FusedAttention(nn.Module):
    """GQA self-attention with one qkv matmul and one RoPE launch; same attn contract as the
    reference: attn(layer_idx, q [B,T,H,D], k [B,T,Hkv,D], v [B,T,Hkv,D]), q and k rotated."""

    def __init__(self, layer: DecoderLayer, cache: torch.Tensor, ops: FusedOps) -> None:
        super().__init__()
        ref = layer.self_attn
        self.layer_idx = ref.layer_idx
        self.head_dim = ref.head_dim
        self.sliding_window = ref.sliding_window
        self.q_size, self.kv_size = ref.q_proj.out_features, ref.k_proj.out_features
        self.qkv_proj = merge_linears([ref.q_proj, ref.k_proj, ref.v_proj])
        self.o_proj = ref.o_proj
        self.cos_sin_cache = cache  # shared by all layers; a plain attribute, not a buffer
        self.ops = ops

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, attn: AttentionFn | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        D = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.ops.rotary_embedding(
            positions, q.view(B, T, -1, D), k.view(B, T, -1, D), self.cos_sin_cache
        )
        v = v.view(B, T, -1, D)
        if attn is None:
            y = causal_attention(q, k, v, self.sliding_window)
        else:
            y = attn(self.layer_idx, q, k, v)
        return self.o_proj(y.reshape(B, T, -1))


class FusedMLP(nn.Module):
    def __init__(self, layer: DecoderLayer, ops: FusedOps) -> None:
        super().__init__()
        ref = layer.mlp
        self.gate_up_proj = merge_linears([ref.gate_proj, ref.up_proj])
        self.down_proj = ref.down_proj
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class FusedDecoderLayer(nn.Module):
    """The reference DecoderLayer with the residual stream carried separately (vLLM's layout):
    forward(positions, hidden, residual, attn) -> (hidden, residual), where the reference layer's
    output is hidden + residual; residual=None on the first layer (hidden is then the input).
    Carrying the sum lets each residual add ride in the next RMSNorm's kernel."""

    def __init__(self, layer: DecoderLayer, cache: torch.Tensor, ops: FusedOps) -> None:
        super().__init__()
        self.input_layernorm = FusedRMSNorm(layer.input_layernorm, ops)
        self.self_attn = FusedAttention(layer, cache, ops)
        self.post_attention_layernorm = FusedRMSNorm(layer.post_attention_layernorm, ops)
        self.mlp = FusedMLP(layer, ops)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        attn: AttentionFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            x = self.input_layernorm(hidden)
        else:
            x, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, x, attn)
        x, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(x), residual


class FusedLlamaModel(nn.Module):
    """Drop-in for models.llama.LlamaModel: forward(input_ids, positions, attn) -> hidden states."""

    def __init__(
        self, embed_tokens: nn.Embedding, layers: list[FusedDecoderLayer], norm: FusedRMSNorm
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn | None = None
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, attn)
        out = self.norm(hidden, residual)
        return out[0] if isinstance(out, tuple) else out


def is_fused(model: LlamaForCausalLM) -> bool:
    return isinstance(model.model, FusedLlamaModel)


def fuse_for_inference(
    model: LlamaForCausalLM, ops: FusedOps | None = None, max_positions: int | None = None
) -> LlamaForCausalLM:
    """Swap model.model for a FusedLlamaModel built from its weights, in place; returns model.

    Layer by layer, q/k/v and gate/up are concatenated into new weights and the reference layer
    is dropped, so the extra memory at any time is one layer's. The embedding (tied or not to
    lm_head), o_proj, down_proj and the norms are shared, not copied. RoPE reads a cos/sin cache of
    max_positions rows (default: config.max_position_embeddings): positions must stay below it.
    For inference only (the merged weights do not require grad), on the device the model is on
    (the cache is not a buffer: move the model before fusing). ops: default_ops(device).
    """
    if is_fused(model):
        return model
    device = next(model.parameters()).device
    ops = ops if ops is not None else default_ops(device)
    ref = model.model
    cache = make_cos_sin_cache(model, max_positions or model.config.max_position_embeddings)
    layers = []
    for i, layer in enumerate(ref.layers):
        assert isinstance(layer, DecoderLayer)
        layers.append(FusedDecoderLayer(layer, cache, ops))
        ref.layers[i] = nn.Identity()  # frees q/k/v and gate/up: only the merged copies remain
    fused = FusedLlamaModel(ref.embed_tokens, layers, FusedRMSNorm(ref.norm, ops))
    model.model = fused  # type: ignore[assignment]
    logger.info("fused decoder layers (%s element-wise ops)", ops.name)
    return model

"""The fused decoder (merged projections, fused element-wise ops) against the reference model.

Each Triton kernel is checked against its torch reference on odd shapes (interpreted on CPU,
TRITON_INTERPRET=1); the fused model, with the reference ops and with the interpreted kernels,
against the reference model's logits and the engine's greedy tokens; a dispatch-mode count of the
ops each layer launches stands in for the CUDA kernel count, which the gpu-marked tests measure.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    # read when the kernels are decorated, so before triton_fused is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from aiinfra.infer import LLM, SamplingParams  # noqa: E402
from aiinfra.infer.fused import (  # noqa: E402
    REFERENCE_OPS,
    FusedLlamaModel,
    FusedOps,
    fuse_for_inference,
    fused_add_rms_norm_ref,
    is_fused,
    make_cos_sin_cache,
    rms_norm_ref,
    rotary_embedding_ref,
    silu_and_mul_ref,
    triton_ops,
)
from aiinfra.models import ModelConfig, build_model, generate_greedy, load_model  # noqa: E402
from aiinfra.models.llama import LlamaForCausalLM  # noqa: E402

needs_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="CPU tensors need TRITON_INTERPRET=1",
)


def _triton() -> Any:
    pytest.importorskip("triton")
    from aiinfra.infer import triton_fused

    return triton_fused


# bf16/fp16: the kernels round where the references round, but reduce in another order (and numpy
# vs ATen exp/rsqrt), so a value at a rounding boundary may land one ulp away: bf16 ulp 2^-8,
# fp16 2^-11 (relative). fp32: only the summation order differs (~1e-7 seen).
TOLS = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}
DTYPES = list(TOLS)


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# --- kernels vs references ------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_kernels_match_ref(dtype):
    t = _triton()
    x = _randn(3, 5, 37, dtype=dtype, seed=0) * 3
    w = 1 + _randn(37, dtype=dtype, seed=1) * 0.5
    res = _randn(3, 5, 37, dtype=dtype, seed=2)
    torch.testing.assert_close(
        t.rms_norm_triton(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **TOLS[dtype]
    )
    out, new_res = t.fused_add_rms_norm_triton(x, res, w, 1e-5)
    ref_out, ref_res = fused_add_rms_norm_ref(x, res, w, 1e-5)
    # one rounded add: exact, except that Triton's interpreter casts fp32 to bf16 by truncation
    # (1-ulp differences seen) where torch and GPUs round to nearest
    exact = dtype != torch.bfloat16 or os.environ.get("TRITON_INTERPRET") != "1"
    torch.testing.assert_close(new_res, ref_res, **(dict(atol=0, rtol=0) if exact else TOLS[dtype]))
    torch.testing.assert_close(out, ref_out, **TOLS[dtype])
    # a strided row view (the last token of each sequence) and zero rows
    sl = x[:, -1]
    torch.testing.assert_close(
        t.rms_norm_triton(sl, w, 1e-6), rms_norm_ref(sl, w, 1e-6), **TOLS[dtype]
    )
    assert t.rms_norm_triton(x[:0], w, 1e-6).shape == (0, 5, 37)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_kernel_matches_ref(dtype):
    t = _triton()
    x = _randn(2, 3, 2 * 45, dtype=dtype, seed=3) * 4
    torch.testing.assert_close(t.silu_and_mul_triton(x), silu_and_mul_ref(x), **TOLS[dtype])
    wide = _randn(1, 2 * 1100, dtype=dtype, seed=4)  # more than one 1024-wide column block
    torch.testing.assert_close(t.silu_and_mul_triton(wide), silu_and_mul_ref(wide), **TOLS[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_kernel_matches_ref_on_qkv_views(dtype):
    t = _triton()
    model = build_model(_config(head_dim=12, max_position_embeddings=50), seed=0).to(dtype)
    cache = make_cos_sin_cache(model, 50)
    H, Hkv, D = 5, 3, 12  # odd head counts, D/2 = 6 (not a power of two)
    qkv = _randn(2, 7, (H + 2 * Hkv) * D, dtype=dtype, seed=5)
    q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k = q.view(2, 7, H, D), k.view(2, 7, Hkv, D)  # strided, as the fused layer passes them
    positions = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(6))
    out_q, out_k = t.rotary_embedding_triton(positions, q, k, cache)
    ref_q, ref_k = rotary_embedding_ref(positions, q, k, cache)
    torch.testing.assert_close(out_q, ref_q, **TOLS[dtype])
    torch.testing.assert_close(out_k, ref_k, **TOLS[dtype])


def test_rotary_ref_matches_the_models_rope():
    # the cache and the reference op reproduce models.llama's RoPE at arbitrary positions
    from aiinfra.models.llama import apply_rotary

    model = build_model(_config(), seed=0)
    cache = make_cos_sin_cache(model, 64)
    positions = torch.tensor([[3, 0, 63, 17]])
    q, k = (
        _randn(1, 4, 4, 16, dtype=torch.float32, seed=7),
        _randn(1, 4, 2, 16, dtype=torch.float32, seed=8),
    )
    cos, sin = model.model.rotary_emb(positions, torch.float32)
    ref_q, ref_k = rotary_embedding_ref(positions, q, k, cache)
    torch.testing.assert_close(ref_q, apply_rotary(q, cos, sin), atol=0, rtol=0)
    torch.testing.assert_close(ref_k, apply_rotary(k, cos, sin), atol=0, rtol=0)


# --- the fused model ------------------------------------------------------------------------------


def _config(**changes: Any) -> ModelConfig:
    base = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=88,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rope_theta=500.0,
    )
    return ModelConfig(**{**base, **changes})


def _random_model(config: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    """Seeded model with non-trivial norms and biases (init_weights makes them 1 and 0)."""
    model = build_model(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


MODEL_CASES = {
    "llama_gqa": dict(),
    "qwen2_bias_tied": dict(
        qkv_bias=True, tie_word_embeddings=True, architecture="Qwen2ForCausalLM"
    ),
}


def _ops(name: str) -> FusedOps:
    if name == "reference":
        return REFERENCE_OPS
    _triton()
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return triton_ops()


class RecordingAttention:
    """An `attn` callable that records what each layer passes and runs plain causal attention."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, layer_idx, q, k, v):
        from aiinfra.models.llama import causal_attention

        self.calls.append((layer_idx, q.clone(), k.clone(), v.clone()))
        return causal_attention(q, k, v)


@pytest.mark.parametrize("ops_name", ["reference", "triton"])
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_fused_model_gives_the_reference_logits(case, ops_name):
    ops = _ops(ops_name)
    ref = _random_model(_config(**MODEL_CASES[case]))
    fused = fuse_for_inference(copy.deepcopy(ref), ops=ops)
    assert is_fused(fused) and isinstance(fused.model, FusedLlamaModel)
    assert fuse_for_inference(fused, ops=ops) is fused  # idempotent
    modules = {n.split(".")[-1] for n, _ in fused.named_modules()}
    assert {"qkv_proj", "gate_up_proj"} <= modules
    assert not modules & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    # the merged weights replace the originals: same parameter count (tied counted once)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in ref.parameters())
    if ref.config.tie_word_embeddings:
        assert fused.lm_head.weight is fused.model.embed_tokens.weight
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9).expand(2, 9) + torch.tensor([[0], [40]])  # explicit, offset
    rec_ref, rec_fused = RecordingAttention(), RecordingAttention()
    with torch.inference_mode():
        want = ref.compute_logits(ref.model(ids, positions, rec_ref))
        got = fused.compute_logits(fused.model(ids, positions, rec_fused))
        # fp32; one merged matmul instead of three (other BLAS blocking) and, for Triton, other
        # reduction order and numpy exp/rsqrt: ~1e-6 here
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(fused(ids), ref(ids), atol=2e-5, rtol=2e-5)  # attn=None
    # the pluggable attention sees the same layer indices and rotated q, k (and v)
    assert [c[0] for c in rec_fused.calls] == [c[0] for c in rec_ref.calls] == [0, 1, 2]
    for a, b in zip(rec_fused.calls, rec_ref.calls, strict=True):
        for x, y in zip(a[1:], b[1:], strict=True):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)  # as the logits above


@needs_triton
def test_fused_model_bf16_close_to_reference():
    ops = _ops("triton")
    ref = _random_model(_config(qkv_bias=True)).to(torch.bfloat16)
    fused = fuse_for_inference(copy.deepcopy(ref), ops=ops)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, want = fused(ids).float(), ref(ids).float()
    # bf16: the kernels round like the reference ops; the merged matmul and the reductions differ
    # in order, a 1-ulp (2^-8) flip per layer at most, which 3 layers grow to ~1e-2 of the logits
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("ops_name", ["reference", "triton"])
def test_fused_engine_gives_the_greedy_tokens(tiny_dir, ops_name):
    ops = _ops(ops_name)
    reference, _ = load_model(tiny_dir)
    prompts = [[5, 17, 200, 3, 9], [1, 2], [44] * 11]
    llm = LLM(tiny_dir, block_size=4, kv_cache_memory="1MiB", max_num_seqs=2)
    model = llm.engine.model_runner.model
    assert not is_fused(model)  # the engine fuses on CUDA only
    fuse_for_inference(model, ops=ops)  # in place: the runner now runs the fused layers
    engine = llm.engine
    engine.model_runner.init_decode_graphs(  # and the graph runner's static-buffer path
        max_num_seqs=2,
        max_model_len=engine.max_model_len,
        scratch_block=engine.block_manager.num_blocks,
        capture=False,
    )
    outs = llm.generate(prompts, _greedy(5), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == generate_greedy(reference, prompt, 5)


# --- launches per layer ---------------------------------------------------------------------------

# ops that launch no kernel: views, allocations, metadata
_FREE_OPS = {
    "empty",
    "empty_like",
    "empty_strided",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "_unsafe_view",
    "detach",
    "lift_fresh",
}


class CountingMode(TorchDispatchMode):
    """Counts the aten ops that launch a kernel; `opaque(fn, n)` counts a call of fn as n launches
    (a Triton kernel, the paged attention) and hides the ops inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket.__name__
        if not self.paused and not func.is_view and packet not in _FREE_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def opaque(self, fn: Callable, n: int) -> Callable:
        def wrapped(*args, **kwargs):
            self.count += n
            self.paused, was = True, self.paused
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = was

        return wrapped


def _count_layer_launches(config: ModelConfig) -> tuple[int, int]:
    """(reference, fused) launches of one middle decoder layer on a decode-shaped input; the
    attention counts as 2 (K/V write + paged attention), each fused op as 1 kernel."""
    ref = _random_model(config)
    mode = CountingMode()
    attn = mode.opaque(lambda i, q, k, v: q.clone(), 2)
    ops = dataclasses.replace(
        REFERENCE_OPS,
        **{
            f.name: mode.opaque(getattr(REFERENCE_OPS, f.name), 1)
            for f in dataclasses.fields(FusedOps)
            if f.name != "name"
        },
    )
    fused = fuse_for_inference(copy.deepcopy(ref), ops=ops)
    x, res = torch.randn(1, 1, config.hidden_size), torch.randn(1, 1, config.hidden_size)
    positions = torch.tensor([[7]])
    with torch.inference_mode():
        cos, sin = ref.model.rotary_emb(positions, x.dtype)
        with mode:
            ref.model.layers[1](x, cos, sin, attn)
        n_ref, mode.count = mode.count, 0
        with mode:
            fused.model.layers[1](positions, x, res, attn)
    return n_ref, mode.count


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_layer_launches(qkv_bias):
    n_ref, n_fused = _count_layer_launches(_config(qkv_bias=qkv_bias))
    # fused: add+norm, qkv, rope, attention (2), o_proj, add+norm, gate_up, silu_and_mul, down
    assert n_fused == 10
    assert n_ref >= 35, n_ref  # RMSNorm 8 x 2, RoPE 10, 3 q/k/v matmuls, 2 adds, ...


# --- on a GPU (scripts/gpu_check.sh) --------------------------------------------------------------


def _cuda_launches(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(MODEL_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_matches_reference_and_launches_fewer_kernels(case, dtype):
    config = _config(**MODEL_CASES[case])
    ref = _random_model(config).to("cuda", dtype)
    fused = fuse_for_inference(copy.deepcopy(ref))  # default ops on CUDA: Triton
    assert fused.model.layers[0].mlp.ops.name == "triton"
    ids = torch.randint(
        0, 97, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    with torch.inference_mode():
        got, want = fused(ids).float(), ref(ids).float()
    # fp32: TF32 is off by default for matmuls, so summation order only; bf16 as the CPU test
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, want, **tol)
    one = ids[:, :1]
    pos = torch.tensor([[5]], device="cuda")
    n_ref = _cuda_launches(lambda: ref.model(one, pos))
    n_fused = _cuda_launches(lambda: fused.model(one, pos))
    L = config.num_layers
    # the causal attention (attn=None) is the same in both; a reference layer launches ~33 other
    # kernels in fp32 (no casts; ~37 in bf16), a fused one 8 (9 if the qkv bias is a separate add)
    assert n_fused <= n_ref - 20 * L, f"{n_ref} kernels in the reference, {n_fused} fused"


@pytest.mark.gpu
def test_cuda_engine_uses_the_fused_model(tiny_dir):
    reference, _ = load_model(tiny_dir)
    llm = LLM(
        tiny_dir,
        device="cuda",
        dtype="float32",
        block_size=4,
        kv_cache_memory="1MiB",
        max_num_seqs=4,
    )
    assert is_fused(llm.engine.model_runner.model)
    runner = llm.engine.model_runner.graph_runner
    assert runner is not None and runner.is_captured
    prompts = [[5, 17, 200, 3, 9], [1, 2], [44] * 11]
    outs = llm.generate(prompts, _greedy(8), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        # fp32, IEEE dots in the attention kernel: only summation order differs from the CPU loop
        assert out.outputs[0].token_ids == generate_greedy(reference, prompt, 8)

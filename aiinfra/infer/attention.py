"""Paged attention (Kwon et al. 2023, "Efficient Memory Management for LLM Serving with
PagedAttention").

K/V of every sequence live in fixed-size blocks of one shared pool; a block table maps a sequence's
logical blocks to pool blocks. `paged_attention_ref` is the plain-torch reference (CPU and GPU); the
fast paths (C++/OpenMP in csrc/ on CPU, triton_attention.py on CUDA) keep its signature and are
tested against it; `paged_attention` and `write_kv` pick one and fall back to the reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc" / "paged_attention.cpp"
# query tokens per C++ work item: rows x head_dim accumulators stay in L1 while a K/V tile is reused
CPU_TILE_TOKENS = 16
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the C++ kernel instantiates
_STALE_LOCK_S = 600  # a build takes ~1 min even on a busy machine

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step inputs of paged attention for a mixed prefill/decode batch.

    The queries of sequence s are its LAST (qsl[s+1] - qsl[s]) positions out of seq_lens[s]; query i
    at absolute position p attends causally to positions 0..p (its own K/V is written first).
    """

    slot_mapping: torch.Tensor  # [N] int64: block_id * block_size + offset of each new token
    block_tables: torch.Tensor  # [S, max_blocks_per_seq] int32, rows padded with 0
    query_start_loc: torch.Tensor  # [S+1] int32: cumulative new-token counts
    seq_lens: torch.Tensor  # [S] int32: context length after this step (cached + new)
    max_query_len: int  # python ints: kernels pick the decode-only path without a device sync
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def _to_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype ({dtype!r}) must be one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class KVCache:
    """Owns the paged K/V tensors of all layers.

    One tensor [num_layers, 2, num_blocks, num_kv_heads, block_size * head_dim]: per layer, K (index
    0) and V (index 1) are pools in which one kv head's block is one contiguous tile, so a kernel
    walking a sequence's blocks for one head streams memory. V tiles are [block_size, head_dim];
    K tiles are transposed, [head_dim, block_size], so a block's q.k scores are head_dim FMAs over
    block_size-wide vectors with no horizontal sums (the layout of vLLM's CPU kernel in spirit).
    Slot s of the pool is (block s // block_size, offset s % block_size).
    """

    def __init__(self, kv: torch.Tensor, block_size: int, head_dim: int) -> None:
        assert kv.dim() == 5 and kv.shape[1] == 2 and kv.shape[4] == block_size * head_dim
        self.kv = kv
        self.num_layers, _, self.num_blocks, self.num_kv_heads, _ = kv.shape
        self.block_size = block_size
        self.head_dim = head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype | str
    ) -> int:
        """Bytes one block costs across all layers (K and V)."""
        itemsize = torch.empty((), dtype=_to_dtype(dtype)).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    @classmethod
    def allocate(
        cls,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype | str,
        device: torch.device | str,
    ) -> KVCache:
        for name, value in (
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive int")
        shape = (num_layers, 2, num_blocks, num_kv_heads, block_size * head_dim)
        kv = torch.empty(shape, dtype=_to_dtype(dtype), device=device)
        if kv.device.type == "cpu" and (ext := cpu_extension()) is not None:
            ext.advise_hugepages(kv)  # before the first touch, so the pool faults in huge pages
        # zeros, not garbage: padded block-table entries point at block 0; keep it finite
        kv.zero_()
        return cls(kv, block_size, head_dim)

    def key_cache(self, layer_idx: int) -> torch.Tensor:
        """[num_blocks, num_kv_heads, head_dim, block_size] (transposed tiles), a view."""
        return self.kv[layer_idx, 0].view(
            self.num_blocks, self.num_kv_heads, self.head_dim, self.block_size
        )

    def value_cache(self, layer_idx: int) -> torch.Tensor:
        """[num_blocks, num_kv_heads, block_size, head_dim], a view."""
        return self.kv[layer_idx, 1].view(
            self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim
        )


def write_kv_ref(
    kv_cache: KVCache, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Plain-torch K/V write: token i goes to slot slot_mapping[i] of layer layer_idx."""
    bs = kv_cache.block_size
    block_ids = torch.div(slot_mapping, bs, rounding_mode="floor")
    offsets = slot_mapping - block_ids * bs
    # the two advanced indices are split by slices, so both indexed shapes are [N, Hkv, D]
    kv_cache.key_cache(layer_idx)[block_ids, :, :, offsets] = k.to(kv_cache.dtype)
    kv_cache.value_cache(layer_idx)[block_ids, :, offsets] = v.to(kv_cache.dtype)


def _extension_dir() -> Path:
    """Build cache keyed by the CPU: the kernel is compiled with -march=native."""
    root = os.environ.get("AIINFRA_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "aiinfra" / "torch_extensions"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, IndexError):  # no /proc: the machine name must do
        cpu += Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    tag = hashlib.sha1(f"{cpu}{torch.__version__}".encode()).hexdigest()[:12]
    return base / f"paged_attention_cpu_{tag}"


def _is_cpu_fast(kv_cache: KVCache) -> bool:
    return kv_cache.device.type == "cpu" and kv_cache.dtype in _CPU_DTYPES


_cpu_ext: ModuleType | None = None
_cpu_ext_failed = False


def cpu_extension() -> ModuleType | None:
    """The C++/OpenMP kernels, compiled on first use; None (after one warning) if that fails."""
    global _cpu_ext, _cpu_ext_failed
    if _cpu_ext is not None or _cpu_ext_failed:
        return _cpu_ext
    try:
        from torch.utils.cpp_extension import load

        build_dir = _extension_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = build_dir / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            # a build killed midway leaves its lock, and torch's loader would wait on it forever
            logger.warning("paged attention: removing stale build lock %s", lock)
            lock.unlink(missing_ok=True)
        flags = ["-O3", "-march=native", "-fopenmp"]
        capability = torch.backends.cpu.get_cpu_capability()
        if capability in ("AVX512", "AVX2"):
            # at::vec picks its SIMD width from this macro, as torch's own kernels do
            flags += [f"-DCPU_CAPABILITY_{capability}", f"-DCPU_CAPABILITY={capability}"]
        _cpu_ext = load(
            name="aiinfra_paged_attention_cpu",
            sources=[str(_CSRC)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, or a build error: the reference still works
        _cpu_ext_failed = True
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        logger.warning(
            "paged attention: C++ kernel unavailable (%s); using the torch reference", reason
        )
        logger.debug("C++ paged attention build error", exc_info=True)
    return _cpu_ext


_triton: ModuleType | None = None
_triton_failed = False


def triton_module() -> ModuleType | None:
    """aiinfra.infer.triton_attention, or None (after one warning) where Triton is missing."""
    global _triton, _triton_failed
    if _triton is None and not _triton_failed:
        try:
            from aiinfra.infer import triton_attention

            _triton = triton_attention
        except ImportError as e:
            _triton_failed = True
            logger.warning("paged attention: Triton unavailable (%s); using the torch reference", e)
    return _triton


def write_kv(
    kv_cache: KVCache, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write the new tokens' K/V ([N, Hkv, D]) at slot_mapping ([N] int64) of layer layer_idx."""
    if k.shape[0] == 0:
        return
    if _is_cpu_fast(kv_cache) and (ext := cpu_extension()) is not None:
        k_pool, v_pool = kv_cache.key_cache(layer_idx), kv_cache.value_cache(layer_idx)
        ext.write_kv(k_pool, v_pool, k, v, slot_mapping.to(torch.int64))
        return
    if kv_cache.device.type == "cuda" and (tri := triton_module()) is not None:
        tri.write_kv_triton(kv_cache, layer_idx, k, v, slot_mapping)
        return
    write_kv_ref(kv_cache, layer_idx, k, v, slot_mapping)


def _gather_sequence(blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A sequence's blocks [nb, Hkv, bs, D] -> its [Hkv, seq_len, D] (K: pass tiles transposed)."""
    Hkv, D = blocks.shape[1], blocks.shape[3]
    return blocks.transpose(0, 1).reshape(Hkv, -1, D)[:, :seq_len]


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: KVCache,
    layer_idx: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Reference paged attention: q [N, H, D] -> [N, H, D], one SDPA call per sequence.

    Computes in fp32 whatever the cache dtype, so it is also the reference for bf16/fp16 caches.
    """
    N, H, D = q.shape
    out = torch.empty_like(q)
    k_pool, v_pool = kv_cache.key_cache(layer_idx), kv_cache.value_cache(layer_idx)
    group = H // kv_cache.num_kv_heads
    bs = kv_cache.block_size
    qsl = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    for s, seq_len in enumerate(seq_lens):
        q_start, q_end = qsl[s], qsl[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // bs)
        block_ids = meta.block_tables[s, :num_blocks].long()
        k = _gather_sequence(k_pool[block_ids].transpose(2, 3), seq_len).float()
        v = _gather_sequence(v_pool[block_ids], seq_len).float()
        k = k.repeat_interleave(group, dim=0)  # GQA: q head h reads kv head h // group
        v = v.repeat_interleave(group, dim=0)
        qs = q[q_start:q_end].transpose(0, 1).float()  # [H, q_len, D]
        mask = None
        if q_len > 1:
            # query i sits at absolute position seq_len - q_len + i and sees keys 0..that position
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            k_pos = torch.arange(seq_len, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
        out[q_start:q_end] = o.transpose(0, 1).to(q.dtype)
    return out


def paged_attention(
    q: torch.Tensor,
    kv_cache: KVCache,
    layer_idx: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Paged attention on the fastest available path; same contract as `paged_attention_ref`."""
    if _is_cpu_fast(kv_cache) and (ext := cpu_extension()) is not None:
        return paged_attention_cpu(q, kv_cache, layer_idx, meta, scale, ext)
    if q.device.type == "cuda" and (tri := triton_module()) is not None:
        return tri.paged_attention_triton(q, kv_cache, layer_idx, meta, scale)
    return paged_attention_ref(q, kv_cache, layer_idx, meta, scale)


def paged_attention_cpu(
    q: torch.Tensor,
    kv_cache: KVCache,
    layer_idx: int,
    meta: AttentionMetadata,
    scale: float,
    ext: ModuleType | None = None,
) -> torch.Tensor:
    """The C++/OpenMP kernel: K/V read in place through the block table, online softmax."""
    ext = ext if ext is not None else cpu_extension()
    assert ext is not None, "the C++ paged attention kernel could not be built"
    out = ext.paged_attention(
        q,
        kv_cache.key_cache(layer_idx),
        kv_cache.value_cache(layer_idx),
        meta.block_tables.to(torch.int32),  # no-ops for the contract's int32
        meta.query_start_loc.to(torch.int32),
        meta.seq_lens.to(torch.int32),
        scale,
        CPU_TILE_TOKENS,
    )
    return out.to(q.dtype)


class PagedAttention:
    """The `attn` callable the model takes for one engine step.

    PagedAttention(kv_cache, meta, scale)(layer_idx, q [1,N,H,D], k [1,N,Hkv,D], v [1,N,Hkv,D])
    writes k/v at meta.slot_mapping of layer layer_idx, then attends: -> [1, N, H, D].
    """

    def __init__(self, kv_cache: KVCache, meta: AttentionMetadata, scale: float) -> None:
        self.kv_cache = kv_cache
        self.meta = meta
        self.scale = scale

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        if q.shape[0] != 1:
            raise ValueError(f"q batch dim ({q.shape[0]}) must be 1: the engine packs tokens in T")
        write_kv(self.kv_cache, layer_idx, k[0], v[0], self.meta.slot_mapping)
        out = paged_attention(q[0], self.kv_cache, layer_idx, self.meta, self.scale)
        return out.unsqueeze(0)

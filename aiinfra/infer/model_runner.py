"""ModelRunner: Batch -> flattened input tensors and attention metadata -> logits -> sampled ids.

All sequences of a step are packed into one row (B=1, T=N tokens), so the linear layers run one
big matmul for prefill chunks and decodes alike; logits are computed only for the last position of
each sequence that samples. The runner owns the KV cache and only reads the sequences. On CUDA,
decode-only steps replay CUDA graphs (cuda_graphs.py); everything else runs eagerly.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from aiinfra.infer.attention import AttentionMetadata, KVCache, PagedAttention
from aiinfra.infer.cuda_graphs import DecodeGraphRunner
from aiinfra.infer.sampler import Sampler, SamplerOutput
from aiinfra.infer.scheduler import Batch
from aiinfra.models import LlamaForCausalLM, ModelConfig


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, config: ModelConfig, kv_cache: KVCache) -> None:
        if config.sliding_window is not None:
            raise ValueError(
                f"sliding_window ({config.sliding_window}) is not supported by paged attention"
            )
        self.model = model
        self.config = config
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.scale = config.dim_per_head**-0.5
        self.sampler = Sampler()
        self.graph_runner: DecodeGraphRunner | None = None

    def init_decode_graphs(
        self, *, max_num_seqs: int, max_model_len: int, scratch_block: int, capture: bool
    ) -> None:
        """Run decode-only batches on static buffers from now on: replayed CUDA graphs with
        capture=True, the same padded buffers run eagerly with capture=False (CPU tests)."""
        self.graph_runner = DecodeGraphRunner(
            self.model,
            self.kv_cache,
            scale=self.scale,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            scratch_block=scratch_block,
            capture=capture,
        )

    def prepare(
        self, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """input_ids [N], positions [N], metadata, logits_indices [M] (rows of the sampling
        sequences' last tokens), built with whole-array numpy ops (no per-token Python loop)."""
        seqs = batch.seqs
        S = len(seqs)
        bs = self.kv_cache.block_size
        nums = np.asarray(batch.num_scheduled_tokens, dtype=np.int64)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=S)
        qsl = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(nums, out=qsl[1:])
        N = int(qsl[-1])
        seq_lens = starts + nums
        if N == S:  # one token per sequence (decodes): skip the slicing
            ids = np.fromiter(
                (s.token_ids[a] for s, a in zip(seqs, starts.tolist(), strict=True)),
                dtype=np.int64,
                count=S,
            )
            positions = starts
            seq_index = np.arange(S)
        else:
            chunks = (
                s.token_ids[a : a + n]
                for s, a, n in zip(seqs, starts.tolist(), nums.tolist(), strict=True)
            )
            ids = np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int64, count=N)
            seq_index = np.repeat(np.arange(S), nums)
            positions = np.arange(N) - np.repeat(qsl[:-1] - starts, nums)
        table_lens = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=S)
        block_tables = np.zeros((S, int(table_lens.max())), dtype=np.int32)
        block_tables[np.arange(block_tables.shape[1])[None, :] < table_lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(s.block_table for s in seqs),
            dtype=np.int32,
            count=int(table_lens.sum()),
        )
        slots = block_tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        logits_indices = qsl[1:][np.asarray(batch.is_sampling, dtype=bool)] - 1
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            block_tables=torch.from_numpy(block_tables).to(dev),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            max_query_len=int(nums.max()),
            max_seq_len=int(seq_lens.max()),
        )
        return (
            torch.from_numpy(ids).to(dev),
            torch.from_numpy(np.ascontiguousarray(positions)).to(dev),
            meta,
            torch.from_numpy(logits_indices).to(dev),
        )

    @torch.inference_mode()
    def compute_logits(self, batch: Batch) -> torch.Tensor:
        """Run the model on the batch (writing its K/V); logits [M, V] of the sampling rows."""
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.compute_logits(batch)
        input_ids, positions, meta, logits_indices = self.prepare(batch)
        attn = PagedAttention(self.kv_cache, meta, self.scale)
        hidden = self.model.model(input_ids[None], positions[None], attn=attn)
        return self.model.compute_logits(hidden[0, logits_indices])

    @torch.inference_mode()
    def run(self, batch: Batch) -> SamplerOutput:
        """One step: token ids for the sampling sequences, in batch order."""
        logits = self.compute_logits(batch)
        sampling = [s for s, flag in zip(batch.seqs, batch.is_sampling, strict=True) if flag]
        if not sampling:
            return SamplerOutput([], None)
        return self.sampler(logits, sampling)


def profile_kv_cache_memory(
    model: LlamaForCausalLM,
    *,
    gpu_memory_utilization: float,
    num_tokens: int,
    num_seqs: int,
    max_model_len: int,
    block_size: int,
) -> int:
    """Bytes the KV cache may take on the model's CUDA device (vLLM's profiling): the card's
    memory times gpu_memory_utilization, minus what is in use now (weights, CUDA context, other
    processes), minus the activation peak of a dummy step of num_tokens prompt tokens that
    samples num_seqs rows. May be negative (the caller reports it)."""
    device = next(model.parameters()).device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    profile_cache_bytes = _profile_step(model, num_tokens, num_seqs, max_model_len, block_size)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - profile_cache_bytes
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return int(total * gpu_memory_utilization) - (total - free) - peak


@torch.inference_mode()
def _profile_step(
    model: LlamaForCausalLM, num_tokens: int, num_seqs: int, max_model_len: int, block_size: int
) -> int:
    """A full-budget prefill step (sequences of at most max_model_len tokens, K/V in a small
    cache of their own) and its sampling; returns that cache's bytes."""
    config: ModelConfig = model.config
    p = next(model.parameters())
    lens = [min(max_model_len, num_tokens - i) for i in range(0, num_tokens, max_model_len)]
    nblocks = [-(-n // block_size) for n in lens]
    kv = KVCache.allocate(
        num_layers=config.num_layers,
        num_blocks=sum(nblocks),
        block_size=block_size,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.dim_per_head,
        dtype=p.dtype,
        device=p.device,
    )
    first = np.concatenate([[0], np.cumsum(nblocks)[:-1]])
    tables = first[:, None] + np.arange(max(nblocks))[None, :]
    positions = np.concatenate([np.arange(n) for n in lens])
    slots = np.repeat(first, lens) * block_size + positions
    qsl = np.concatenate([[0], np.cumsum(lens)])
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(slots).to(p.device),
        block_tables=torch.from_numpy(tables.astype(np.int32)).to(p.device),
        query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(p.device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=p.device),
        max_query_len=max(lens),
        max_seq_len=max(lens),
    )
    ids = torch.zeros(1, num_tokens, dtype=torch.int64, device=p.device)
    attn = PagedAttention(kv, meta, config.dim_per_head**-0.5)
    hidden = model.model(ids, torch.from_numpy(positions).to(p.device)[None], attn=attn)
    logits = model.compute_logits(hidden[0, -min(num_seqs, num_tokens) :])
    torch.softmax(logits.float(), dim=-1)  # the sampler's fp32 copies
    return kv.kv.nbytes

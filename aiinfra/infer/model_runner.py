"""ModelRunner: Batch -> flattened input tensors and attention metadata -> logits -> sampled ids.

All sequences of a step are packed into one row (B=1, T=N tokens), so the linear layers run one
big matmul for prefill chunks and decodes alike; logits are computed only for the last position of
each sequence that samples. The runner owns the KV cache and only reads the sequences.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from aiinfra.infer.attention import AttentionMetadata, KVCache, PagedAttention
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

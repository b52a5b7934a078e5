"""CUDA graphs for decode-only steps: static input buffers, batches padded to captured sizes.

Once a decode-only step (one new token per sequence) is padded to a captured batch size, its
shapes no longer depend on the sequences: block tables are padded to max_blocks_per_seq columns and
the attention kernels read context lengths from a tensor. So the forward (model and logits) is
captured once per size (1, 2, 4, ..., max_num_seqs) and replayed on new buffer contents, which
removes the per-kernel launch cost that dominates small decode steps. Padded rows decode token 0 at
position 0 into a scratch block that no sequence owns. With capture=False the same buffers and
padding run eagerly ("graph-compatible eager"): the CPU tests check this path against the plain one.
"""

from __future__ import annotations

import bisect
import itertools

import numpy as np
import torch

from aiinfra.infer.attention import AttentionMetadata, KVCache, PagedAttention
from aiinfra.infer.scheduler import Batch
from aiinfra.models import LlamaForCausalLM


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Powers of two below max_num_seqs, then max_num_seqs itself: [1, 2, 4, ..., max_num_seqs]."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs ({max_num_seqs}) must be >= 1")
    sizes = list(itertools.takewhile(lambda n: n < max_num_seqs, (1 << i for i in range(64))))
    return [*sizes, max_num_seqs]


def padded_size(sizes: list[int], num_seqs: int) -> int | None:
    """The smallest captured size >= num_seqs, or None when num_seqs exceeds them all."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


def is_decode_only(batch: Batch) -> bool:
    """One new token per sequence (decodes, or 1-token prefill chunks: same shapes)."""
    return batch.num_tokens == len(batch.seqs)


class DecodeGraphRunner:
    """Runs decode-only batches of up to max(sizes) sequences on static buffers.

    Owns the static device buffers (and, with capture=True, one CUDA graph per size and their
    output logits, which live in one shared memory pool: only one graph runs at a time). Writes
    the K/V of the padded rows into `scratch_block` of the cache, never into a sequence's block.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        *,
        scale: float,
        max_num_seqs: int,
        max_model_len: int,
        scratch_block: int,
        capture: bool,
    ) -> None:
        if not 0 <= scratch_block < kv_cache.num_blocks:
            raise ValueError(
                f"scratch_block ({scratch_block}) is not a block of the cache "
                f"(0..{kv_cache.num_blocks - 1})"
            )
        if capture and kv_cache.device.type != "cuda":
            raise ValueError(f"capture needs a CUDA cache, not {kv_cache.device}")
        self.model = model
        self.kv_cache = kv_cache
        self.scale = scale
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // kv_cache.block_size)
        self.scratch_block = scratch_block
        B, W = self.sizes[-1], self.max_blocks_per_seq
        pin = kv_cache.device.type == "cuda"  # async host-to-device copies
        # one host staging buffer and one device buffer per dtype, so a step costs two copies:
        # int64 rows (input ids, positions, slot mapping) and int32 (seq lens, then block tables)
        self._host64 = torch.zeros((3, B), dtype=torch.int64, pin_memory=pin)
        self._host32 = torch.zeros(B + B * W, dtype=torch.int32, pin_memory=pin)
        self._np64, self._np32 = self._host64.numpy(), self._host32.numpy()
        self._np_tables = self._np32[B:].reshape(B, W)
        self._fill_padding(0, B)
        dev = kv_cache.device
        self._dev64 = self._host64.to(dev)
        self._dev32 = self._host32.to(dev)
        self.input_ids, self.positions, self.slot_mapping = self._dev64.unbind(0)
        self.seq_lens = self._dev32[:B]
        self.block_tables = self._dev32[B:].view(B, W)
        # every row is one query token: the start offsets never change
        self.query_start_loc = torch.arange(B + 1, dtype=torch.int32, device=dev)
        # the async copies read the pinned staging buffers: the next step must not overwrite
        # them before they are done (a step with no sampling row never syncs the stream)
        self._copied = torch.cuda.Event() if pin else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self.capture()

    @property
    def is_captured(self) -> bool:
        return bool(self.graphs)

    def can_run(self, batch: Batch) -> bool:
        return is_decode_only(batch) and len(batch.seqs) <= self.sizes[-1]

    # --- static buffers ---------------------------------------------------------------------------

    def _fill_padding(self, start: int, end: int) -> None:
        """Rows start..end-1 decode token 0 at position 0 into slot 0 of the scratch block."""
        self._np64[0, start:end] = 0
        self._np64[1, start:end] = 0
        self._np64[2, start:end] = self.scratch_block * self.kv_cache.block_size
        self._np32[start:end] = 1
        self._np_tables[start:end] = 0
        self._np_tables[start:end, 0] = self.scratch_block

    def prepare(self, batch: Batch) -> int:
        """Write the batch into the host staging buffers, padded to a captured size; return it."""
        if self._copied is not None:
            self._copied.synchronize()
        seqs = batch.seqs
        S = len(seqs)
        size = padded_size(self.sizes, S)
        assert size is not None and is_decode_only(batch)
        bs = self.kv_cache.block_size
        positions = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=S)
        self._np64[0, :S] = np.fromiter(
            (s.token_ids[p] for s, p in zip(seqs, positions.tolist(), strict=True)),
            dtype=np.int64,
            count=S,
        )
        self._np64[1, :S] = positions
        table_lens = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=S)
        assert int(table_lens.max()) <= self.max_blocks_per_seq
        tables = self._np_tables[:S]
        tables[:] = 0
        tables[np.arange(self.max_blocks_per_seq)[None, :] < table_lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(s.block_table for s in seqs),
            dtype=np.int32,
            count=int(table_lens.sum()),
        )
        blocks = tables[np.arange(S), positions // bs].astype(np.int64)
        self._np64[2, :S] = blocks * bs + positions % bs
        self._np32[:S] = positions + 1
        self._fill_padding(S, size)
        return size

    def _copy_to_device(self) -> None:
        self._dev64.copy_(self._host64, non_blocking=True)
        self._dev32.copy_(self._host32, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    # --- forward ----------------------------------------------------------------------------------

    def forward(self, size: int) -> torch.Tensor:
        """The model on the first `size` rows of the device buffers: logits [size, V]."""
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # an upper bound: the real lengths are in seq_lens
        )
        attn = PagedAttention(self.kv_cache, meta, self.scale)
        hidden = self.model.model(self.input_ids[None, :size], self.positions[None, :size], attn)
        return self.model.compute_logits(hidden[0])

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per size, largest first (its pool then fits the smaller ones)."""
        pool = None
        for size in reversed(self.sizes):
            self.forward(size)  # warm-up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize(self.kv_cache.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.kv_cache.device)

    def compute_logits(self, batch: Batch) -> torch.Tensor:
        """Logits [M, V] of the batch's sampling rows, in batch order (as ModelRunner's)."""
        size = self.prepare(batch)
        self._copy_to_device()
        if self.graphs:
            self.graphs[size].replay()
            logits = self.outputs[size]
        else:
            logits = self.forward(size)
        S = len(batch.seqs)
        if all(batch.is_sampling):
            return logits[:S]
        rows = [i for i, flag in enumerate(batch.is_sampling) if flag]
        return logits[torch.tensor(rows, device=logits.device)]

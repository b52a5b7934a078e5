"""BlockManager: the paged KV cache's block pool, reference counts, block tables and prefix cache.

Prefix caching (vLLM's automatic prefix caching): each full block is named by a chained hash of
(parent block's hash, its token ids). A block whose K/V are computed is registered under its hash;
a new sequence reuses the longest run of registered blocks matching its tokens, verified against
the tokens stored with each block. Freed blocks go to an LRU queue but keep their hash, so they can
be hit again until a new allocation evicts them; unhashed free blocks are evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from aiinfra.infer.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    """Owns every block and every sequence's block table. Only the scheduler calls it.

    Resource pressure is a return value: `allocate` / `append_slots` return False and change
    nothing when the free blocks do not suffice.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) must be positive")
        if block_size <= 0:
            raise ValueError(f"block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref_count == 0 blocks in eviction order (first = evicted first)
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # --- queries ----------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_blocks(self, seq: Sequence) -> list[int]:
        """The longest registered prefix of seq's full blocks, leaving its last token uncomputed
        (the step that computes it samples the next token)."""
        if not self.enable_prefix_caching:
            return []
        self._hash_full_blocks(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        parent: int | None = None
        bs = self.block_size
        for i in range(min(max_blocks, len(seq.block_hashes))):
            block_id = self.hash_to_block.get(seq.block_hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            # verify: a hash collision must not serve another prefix's K/V
            if block.parent_hash != parent or block.token_ids != tuple(
                seq.token_ids[i * bs : (i + 1) * bs]
            ):
                break
            hits.append(block_id)
            parent = block.block_hash
        return hits

    # --- allocation ---------------------------------------------------------------------------

    def allocate(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Admit a sequence: share `cached_blocks` (from find_cached_blocks) and add blocks for
        `num_new_tokens` more tokens after them."""
        assert not seq.block_table
        num_needed = self.num_blocks_for(len(cached_blocks) * self.block_size + num_new_tokens)
        num_new_blocks = num_needed - len(cached_blocks)
        num_revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks + num_revived > len(self.free_queue):
            return False
        for b in cached_blocks:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free_queue[b]
            block.ref_count += 1
        seq.block_table = list(cached_blocks)
        seq.num_registered_blocks = len(cached_blocks)
        seq.block_table.extend(self._take_free_block() for _ in range(num_new_blocks))
        if self.enable_prefix_caching:
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += len(cached_blocks) * self.block_size
        return True

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow seq's block table to hold num_computed_tokens + num_new_tokens tokens."""
        num_needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        num_new_blocks = num_needed - len(seq.block_table)
        if num_new_blocks > len(self.free_queue):
            return False
        for _ in range(num_new_blocks):
            seq.block_table.append(self._take_free_block())
        return True

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; its tail blocks are evicted before its (more shareable) head."""
        for b in reversed(seq.block_table):
            block = self.blocks[b]
            assert block.ref_count > 0, f"block {b} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[b] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(b, last=False)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def cache_blocks(self, seq: Sequence) -> None:
        """Register seq's full, computed blocks under their hashes so later sequences can hit."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        self._hash_full_blocks(seq, num_full)
        bs = self.block_size
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            h = seq.block_hashes[i]
            if h in self.hash_to_block:
                continue  # same content computed twice in one step: keep the first copy
            block.block_hash = h
            block.parent_hash = seq.block_hashes[i - 1] if i else None
            block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            self.hash_to_block[h] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    # --- internals -------------------------------------------------------------------------------

    def _take_free_block(self) -> int:
        b, _ = self.free_queue.popitem(last=False)
        block = self.blocks[b]
        assert block.ref_count == 0
        if block.block_hash is not None:  # evict it from the prefix cache
            del self.hash_to_block[block.block_hash]
            block.block_hash, block.parent_hash, block.token_ids = None, None, ()
        block.ref_count = 1
        return b

    def _hash_full_blocks(self, seq: Sequence, limit: int | None = None) -> None:
        num_full = seq.num_tokens // self.block_size
        if limit is not None:
            num_full = min(num_full, limit)
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_full):
            parent = hashes[i - 1] if i else None
            hashes.append(hash((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))))

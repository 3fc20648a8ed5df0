"""The paged KV cache's bookkeeping: which blocks of the pool each sequence owns, and the prefix cache.

A full block is keyed by a hash of its tokens and of the key of the block before it, so a key stands for
the whole prefix up to the block's end. Blocks are shared between sequences with reference counts. A
freed block keeps its key while it waits in the free list (least recently freed first to be reused), so
a later request with the same prefix revives it instead of recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from flatstack.engine.sequence import Sequence


@dataclass
class Block:
    id: int
    ref_count: int = 0
    key: int | None = None  # set once the block is full and computed
    tokens: tuple[int, ...] = field(default=())  # the tokens behind `key`, to rule out hash collisions


def block_key(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.by_key: dict[int, int] = {}
        # prefix-cache counters, for metrics: prompt tokens asked for, and served from the cache
        self.prompt_tokens = 0
        self.cached_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None and self.by_key.get(block.key) == block_id:
            del self.by_key[block.key]  # its old contents are about to be overwritten
        block.key, block.tokens, block.ref_count = None, (), 1
        return block_id

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the pool that already hold this sequence's leading full blocks. The last token is
        always computed again (its logits are needed), so a block holding it is never reused."""
        if not self.prefix_caching:
            return []
        found, parent, bs = [], None, self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            key = block_key(parent, tokens)
            block_id = self.by_key.get(key)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            found.append(block_id)
            parent = key
        return found

    def can_allocate(self, seq: Sequence) -> bool:
        cached = self.cached_prefix(seq)
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return self.blocks_for(seq.num_tokens) - len(cached) + revived <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of the sequence's tokens, reusing cached prefix blocks."""
        cached = self.cached_prefix(seq)
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        fresh = [self.take_free() for _ in range(self.blocks_for(seq.num_tokens) - len(cached))]
        seq.block_table = cached + fresh
        seq.num_computed = len(cached) * self.block_size
        if seq.num_tokens == seq.num_prompt:  # a first admission, not a recompute after preemption
            seq.num_cached = seq.num_computed
            self.prompt_tokens += seq.num_tokens
            self.cached_tokens += seq.num_cached

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's next token has a slot (a new block is needed at a block boundary)."""
        return len(seq.block_table) * self.block_size >= seq.num_tokens or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        if len(seq.block_table) * self.block_size < seq.num_tokens:
            seq.block_table.append(self.take_free())

    def free_blocks(self, seq: Sequence) -> None:
        """Release the sequence's blocks; the last owner of a block puts it in the free list, key kept."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed = 0

    def register_computed(self, seq: Sequence, before: int) -> None:
        """Key the blocks that became full and computed since `before` tokens were computed."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(before // bs, seq.num_computed // bs):
            block = self.blocks[seq.block_table[i]]
            if block.key is not None:
                continue  # a shared prefix block, keyed when it was first computed
            parent = self.blocks[seq.block_table[i - 1]].key if i > 0 else None
            block.tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block.key = block_key(parent, block.tokens)
            self.by_key.setdefault(block.key, block.id)

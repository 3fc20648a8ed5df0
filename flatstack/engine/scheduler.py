"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step first gives each running sequence that is decoding its one token, then spends what is left
of the step's token budget on prompts: the rest of a prompt already started, then new requests in
arrival order. A long prompt is prefilled in chunks across steps, beside the decodes. When a decoding
sequence needs a block and none is free, the newest running sequence is preempted: its blocks go back
to the pool and it waits at the head of the queue, to be recomputed (prompt and output so far) later.
Nothing is ever dropped.
"""

from __future__ import annotations

from collections import deque

from flatstack.engine.block_manager import BlockManager
from flatstack.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute) pairs for the next step: decodes first, then prompt chunks."""
        budget = self.max_num_batched_tokens
        decodes: list[tuple[Sequence, int]] = []
        chunks: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            todo = seq.num_tokens - seq.num_computed
            if todo == 1:
                if not self.make_room(seq):
                    continue  # it preempted itself
                self.blocks.append_slot(seq)
                decodes.append((seq, 1))
                budget -= 1
            elif budget > 0:
                n = min(todo, budget)
                chunks.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            chunks.append((seq, n))
            budget -= n
        return decodes + chunks

    def make_room(self, seq: Sequence) -> bool:
        """Free blocks for `seq`'s next token by preempting the newest running sequences; False if `seq`
        was itself the newest and was preempted."""
        while not self.blocks.can_append(seq):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_blocks(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, scheduled: list[tuple[Sequence, int]]) -> list[Sequence]:
        """After the step's forward pass: its tokens are in the cache (the blocks they filled keyed for the
        prefix cache); -> the sequences whose whole context is now computed, which sample a token."""
        sampling = []
        for seq, n in scheduled:
            before = seq.num_computed
            seq.num_computed += n
            self.blocks.register_computed(seq, before)
            if seq.num_computed == seq.num_tokens:
                sampling.append(seq)
        return sampling

    def finish(self, seq: Sequence, reason: str) -> None:
        """A sequence leaves at once: its blocks return to the pool (kept in the prefix cache)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.free_blocks(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

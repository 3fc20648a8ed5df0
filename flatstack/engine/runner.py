"""The model runner: the paged KV pool, and one forward pass over a step's mixed batch.

The pool holds, per layer, keys and values for `num_blocks * block_size` token slots. A step packs the
new tokens of every scheduled sequence into one row (decodes first, then prompt chunks) and passes the
model a `PagedBatch`: the per-token positions, and an `attend` that writes the step's keys and values
into their slots and reads each sequence's context back through its block table. The model is the
training model, unchanged.
"""

from __future__ import annotations

import torch

from flatstack.engine.sequence import Sequence
from flatstack.model import Transformer, causal_mask


def kv_bytes_per_token(model: Transformer, dtype: torch.dtype) -> int:
    cfg = model.cfg
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class KVPool:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        cfg = model.cfg
        shape = (cfg.n_layers, num_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def slots(self, block_table: list[int], start: int, end: int, device) -> torch.Tensor:
        """Pool slots of token positions start..end of a sequence."""
        positions = torch.arange(start, end, device=device)
        blocks = torch.tensor(block_table, device=device)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size


class PagedBatch:
    """One step's view of the pool, handed to the model as its cache."""

    def __init__(self, pool: KVPool, scheduled: list[tuple[Sequence, int]], window: int | None, device):
        self.pool, self.window = pool, window
        positions, new_slots = [], []
        # the leading one-token entries (the scheduler puts decodes first) attend together, as decodes
        self.num_decodes = next((i for i, (_, n) in enumerate(scheduled) if n != 1), len(scheduled))
        contexts = []  # per sequence: pool slots of its whole context after this step
        for seq, n in scheduled:
            start, end = seq.num_computed, seq.num_computed + n
            positions.append(torch.arange(start, end, device=device))
            context = pool.slots(seq.block_table, 0, end, device)
            new_slots.append(context[start:])
            contexts.append(context)
        self.positions = torch.cat(positions)
        self.new_slots = torch.cat(new_slots)
        self.chunks = [(ctx, n) for ctx, (_, n) in zip(contexts[self.num_decodes :], scheduled[self.num_decodes :],
                                                         strict=True)]
        if self.num_decodes:
            # decodes attend together: contexts padded to the longest, padding masked out
            dec = contexts[: self.num_decodes]
            longest = max(len(c) for c in dec)
            self.decode_slots = torch.stack([torch.nn.functional.pad(c, (0, longest - len(c))) for c in dec])
            lengths = torch.tensor([len(c) for c in dec], device=device)[:, None]
            key_pos = torch.arange(longest, device=device)[None, :]
            visible = key_pos < lengths
            if window is not None:
                visible &= key_pos >= lengths - window
            self.decode_mask = visible[:, None, None, :]  # [B, 1, 1, S]

    def attend(self, layer: int, q, k, v, start: int, attend):
        """q [1, H, N, D]; k, v [1, Hkv, N, D] for the step's N packed tokens -> attention out [1, H, N, D]."""
        kp, vp = self.pool.k[layer], self.pool.v[layer]
        kp.index_copy_(0, self.new_slots, k[0].transpose(0, 1))
        vp.index_copy_(0, self.new_slots, v[0].transpose(0, 1))
        outs, offset = [], 0
        if self.num_decodes:
            B = self.num_decodes
            qd = q[0, :, :B].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
            kd = kp[self.decode_slots].permute(0, 2, 1, 3)  # [B, Hkv, S, D]
            vd = vp[self.decode_slots].permute(0, 2, 1, 3)
            outs.append(attend(qd, kd, vd, self.decode_mask).squeeze(2).transpose(0, 1).unsqueeze(0))
            offset = B
        for context, n in self.chunks:
            qc = q[:, :, offset : offset + n]
            kc = kp[context].transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
            vc = vp[context].transpose(0, 1).unsqueeze(0)
            mask = None if self.window is None else causal_mask(n, len(context), self.window, q.device)
            outs.append(attend(qc, kc, vc, mask))
            offset += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        self.model = model
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.pool = KVPool(model, num_blocks, block_size, self.dtype, self.device)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Forward the step's tokens; float32 logits [M, V] at the last token of each sequence whose
        whole context is computed after this step (the ones that sample), in scheduled order."""
        tokens = [t for seq, n in scheduled for t in seq.token_ids[seq.num_computed : seq.num_computed + n]]
        batch = PagedBatch(self.pool, scheduled, self.model.cfg.sliding_window, self.device)
        hidden = self.model.hidden(torch.tensor([tokens], device=self.device), cache=batch)[0]
        ends = torch.tensor([n for _, n in scheduled]).cumsum(0) - 1
        sampling = [i for i, (seq, n) in enumerate(scheduled) if seq.num_computed + n == seq.num_tokens]
        return self.model.logits(hidden[ends[sampling].to(self.device)]).float()

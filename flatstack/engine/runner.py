"""The model runner: the paged KV pool, and one forward pass over a step's mixed batch.

The pool holds, per layer, keys and values for `num_blocks * block_size` token slots. A step packs the
new tokens of every scheduled sequence into one row (decodes first, then prompt chunks) and passes the
model a `PagedBatch`: the per-token positions, and an `attend` that writes the step's keys and values
into their slots and reads each sequence's context back through its block table. The model is the
training `Transformer`; only its linears are swapped for inference ones (kernels/linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flatstack.engine.sequence import Sequence
from flatstack.kernels.linear import LINEARS, decode_step
from flatstack.kernels.paged_attention import gather_blocks, paged_decode_attention
from flatstack.model import Transformer


def kv_bytes_per_token(model: Transformer, dtype: torch.dtype) -> int:
    cfg = model.cfg
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class KVPool:
    """Per layer, keys and values [n_kv_heads, num_blocks, block_size, head_dim]: a sequence's context is
    whole blocks picked along one axis, and comes out head-major as attention wants it, without a
    transpose."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        cfg = model.cfg
        shape = (cfg.n_layers, cfg.n_kv_heads, num_blocks, block_size, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, N, D] into pool slots (block * block_size + offset) [N]."""
        for pool, new in ((self.k[layer], k), (self.v[layer], v)):
            pool.view(pool.shape[0], -1, pool.shape[-1]).index_copy_(1, slots, new)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of one sequence's blocks [n] -> [1, Hkv, n * block_size, D] each."""
        return tuple(gather_blocks(pool, blocks).flatten(1, 2).unsqueeze(0) for pool in (self.k[layer], self.v[layer]))


class PagedBatch:
    """One step's view of the pool, handed to the model as its cache."""

    def __init__(self, model: Transformer, pool: KVPool, scheduled: list[tuple[Sequence, int]], device):
        cfg = model.cfg
        self.pool = pool
        self.scale = model.layers[0].attn.scale
        self.softcap, self.window = cfg.attn_logit_softcap, cfg.sliding_window
        bs = pool.block_size
        positions, new_slots, tables, lengths = [], [], [], []
        for seq, n in scheduled:
            start, end = seq.num_computed, seq.num_computed + n
            pos = torch.arange(start, end)
            table = torch.tensor(seq.block_table[: -(-end // bs)])
            positions.append(pos)
            new_slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(table)
            lengths.append(end)
        self.positions = torch.cat(positions).to(device)
        self.new_slots = torch.cat(new_slots).to(device)
        # the leading one-token entries (the scheduler puts decodes first) attend together, as decodes
        self.num_decodes = next((i for i, (_, n) in enumerate(scheduled) if n != 1), len(scheduled))
        self.chunks = [(tables[i].to(device), lengths[i], n) for i, (_, n) in enumerate(scheduled)
                       if i >= self.num_decodes]
        if self.num_decodes:
            dec = tables[: self.num_decodes]
            longest = max(len(t) for t in dec)
            self.decode_tables = torch.stack([F.pad(t, (0, longest - len(t))) for t in dec]).to(device)
            self.decode_lengths = torch.tensor(lengths[: self.num_decodes], device=device)

    def attend(self, layer: int, q, k, v, start: int, attend):
        """q [1, H, N, D]; k, v [1, Hkv, N, D] for the step's N packed tokens -> attention out [1, H, N, D]."""
        self.pool.write(layer, self.new_slots, k[0], v[0])
        outs, offset = [], 0
        if self.num_decodes:
            B = self.num_decodes
            out = paged_decode_attention(q[0, :, :B].transpose(0, 1), self.pool.k[layer], self.pool.v[layer],
                                         self.decode_tables, self.decode_lengths, self.scale, self.softcap,
                                         self.window)
            outs.append(out.transpose(0, 1).unsqueeze(0))
            offset = B
        for table, length, n in self.chunks:
            kc, vc = self.pool.gather(layer, table)
            outs.append(attend(q[:, :, offset : offset + n], kc[:, :, :length], vc[:, :, :length]))
            offset += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def swap_linears(model: Transformer, kind: str) -> None:
    """Put the inference linears of `kind` (float, int8, int4; kernels/linear.py) in place of every
    nn.Linear in the blocks and of the LM head. MoE expert stacks and routers stay as they are."""
    make = LINEARS[kind]
    for block in model.layers:
        for parent in (block.attn, block.ffn):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, make(child.weight.data, None if child.bias is None else child.bias.data))
    model.inference_head = make(model.head_weight.data)


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, weights: str = "float"):
        if model.tok_embeddings.weight.device.type == "cpu" or weights != "float":
            swap_linears(model, weights)
        self.model = model
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.pool = KVPool(model, num_blocks, block_size, self.dtype, self.device)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Forward the step's tokens; float32 logits [M, V] at the last token of each sequence whose
        whole context is computed after this step (the ones that sample), in scheduled order."""
        tokens = [t for seq, n in scheduled for t in seq.token_ids[seq.num_computed : seq.num_computed + n]]
        batch = PagedBatch(self.model, self.pool, scheduled, self.device)
        ends = torch.tensor([n for _, n in scheduled]).cumsum(0) - 1
        sampling = [i for i, (seq, n) in enumerate(scheduled) if seq.num_computed + n == seq.num_tokens]
        with decode_step(batch.num_decodes == len(scheduled)):
            hidden = self.model.hidden(torch.tensor([tokens], device=self.device), cache=batch)[0]
            return self.model.logits(hidden[ends[sampling].to(self.device)]).float()

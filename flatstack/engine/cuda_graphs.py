"""Decode steps on a GPU as CUDA graphs: one graph per batch-size bucket, replayed each step (as
nano-vllm and gpt-fast do), so a step of a thousand small kernels costs one launch instead of a
thousand.

A graph replays fixed addresses, so a step's inputs live in static buffers sized for the largest bucket
(token ids, positions, KV slots, block tables as wide as the model's context, lengths); a step of n
sequences copies its inputs in, pads to the bucket with rows that attend to one position and write their
key and value into a scratch block no sequence owns, replays, and reads n rows of logits. Inside, every
layer writes its keys and values into the pool and attends through the block tables with the paged
decode kernel (Triton on GPUs), whose grid depends on shapes only, never on the lengths.

On the CPU the same step runs eagerly from the same buffers (`capture=False`): that is how its
correctness is tested without a GPU.
"""

from __future__ import annotations

import torch

from flatstack.kernels.paged_attention import decode_attention
from flatstack.model import Transformer


def buckets(max_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to max_seqs (which is always one)."""
    sizes = [b for b in (1, 2, 4) if b < max_seqs] + list(range(8, max_seqs, 8))
    return sizes + [max_seqs]


class StaticDecode:
    """The blocks' cache in a decode step: each layer writes the step's keys and values into their slots,
    then attends through the block tables."""

    def __init__(self, pool, slots, tables, lengths, scale: float, softcap: float | None, window: int | None,
                 temperature_len: int | None):
        self.pool, self.slots, self.tables, self.lengths = pool, slots, tables, lengths
        self.scale, self.softcap, self.window, self.temperature_len = scale, softcap, window, temperature_len

    def attend(self, layer: int, q, k, v, start: int, attend):
        """q [1, H, N, D]; k, v [1, Hkv, N, D]: the N sequences' one new token each."""
        self.pool.write(layer, self.slots, k[0], v[0])
        out = decode_attention(q[0].transpose(0, 1), self.pool.k[layer], self.pool.v[layer], self.tables,
                               self.lengths, self.scale, self.softcap, self.window, self.temperature_len)
        return out.transpose(0, 1).unsqueeze(0)


class GraphedDecode:
    def __init__(self, model: Transformer, pool, head, max_seqs: int, scratch_slot: int, capture: bool):
        self.model, self.pool, self.head, self.capture = model, pool, head, capture
        self.sizes = buckets(max_seqs)
        device, bs = pool.k.device, pool.block_size
        width = max(2, -(-model.cfg.max_seq_len // bs))  # as wide as any table PagedBatch makes

        def buffer(*shape):
            return torch.zeros(*shape, dtype=torch.long, device=device)

        self.tokens, self.positions, self.slots, self.lengths = (buffer(max_seqs) for _ in range(4))
        self.tables = buffer(max_seqs, width)
        self.scratch_slot = scratch_slot
        attn = model.layers[0].attn
        cfg = model.cfg
        self.attention = (attn.scale, cfg.attn_logit_softcap, cfg.sliding_window, cfg.attn_temperature_len)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_seqs(self) -> int:
        return self.sizes[-1]

    def forward(self, n: int) -> torch.Tensor:
        """The step over the first n rows of the buffers -> logits [n, V] in the model's dtype."""
        model = self.model
        x = model.embed(self.tokens[:n][None])
        cos, sin = model.rope(self.positions[:n], x.dtype)
        cache = StaticDecode(self.pool, self.slots[:n], self.tables[:n], self.lengths[:n], *self.attention)
        for layer in model.layers:
            x = layer(x, cos, sin, 0, cache)
        return model.logits(model.norm(x[0]), self.head)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket's graph, largest first, into one memory pool they share (only one runs at a
        time). Each is run once before its capture: Triton compiles and cuBLAS picks its kernels then."""
        if not self.capture or self.graphs:
            return
        self.lengths.fill_(1)
        self.slots.fill_(self.scratch_slot)
        mempool = torch.cuda.graph_pool_handle()
        for n in reversed(self.sizes):
            self.forward(n)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self.outputs[n] = self.forward(n)
            self.graphs[n] = graph
        torch.cuda.synchronize()

    def run(self, tokens: list[int], positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
            lengths: torch.Tensor) -> torch.Tensor:
        """A decode step of n <= max_seqs sequences (their tensors on the device, tables [n, w]) -> logits
        [n, V]."""
        n = len(tokens)
        size = next(b for b in self.sizes if b >= n)
        self.tokens[:n].copy_(torch.tensor(tokens), non_blocking=True)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.lengths[:n].copy_(lengths)
        self.tables[:n, : tables.shape[1]].copy_(tables)
        self.slots[n:size].fill_(self.scratch_slot)  # padding rows: one position, written where nobody reads
        self.lengths[n:size].fill_(1)
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:n]
        return self.forward(size)[:n]

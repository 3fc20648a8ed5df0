"""The model runner: the paged KV pool, and one forward pass over a step's mixed batch.

The pool holds, per layer, keys and values for `num_blocks * block_size` token slots. A step packs the
new tokens of every scheduled sequence into one row (decodes first, then prompt chunks) and passes the
model a `PagedBatch`: the per-token positions, and an `attend` that writes the step's keys and values
into their slots and reads each sequence's context back through its block table. The model is the
training `Transformer`; only its linears are swapped for inference ones (kernels/linear.py).

Decode steps of at most FEW_ROWS sequences on the CPU run the blocks compiled by TorchInductor, several
blocks to a graph: `Block.forward` unrolled over a group of consecutive layers (at most GROUP), one graph
serving every group, so a layer's norms, projections, RoPE, attention and FFN are C++ loops instead of
some forty eager ops. What a graph call costs beside its kernels grows with the tensors it takes (a
guard on each, a size check, the outputs it wraps), so the blocks' weights are stacked by name, one
[n_layers, ...] tensor each, with every block's own weights made views of it: a group's graph takes one
[G, ...] slice per weight name instead of every layer's own tensors. Inside the graph the pool is only
read; each layer's new keys and values come out of it and are written into the pool for all layers at
once after the step, since a compiled graph that wrote into the pool would copy it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from flatstack.allocator import keep_freed_memory
from flatstack.engine.sequence import Sequence
from flatstack.kernels.linear import FEW_ROWS, LINEARS, decode_step
from flatstack.kernels.paged_attention import decode_attention, decode_attention_before_write, gather_blocks
from flatstack.model import Block, Transformer


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


GROUP = 6  # blocks per compiled graph, at most (measured on SmolLM2's 30: int8 decode 98 -> 114 tok/s
# against one graph a block; 10 within noise of 6, 15 slower, and each block in a group adds ~4 s of compiling)


def group_size(n_layers: int) -> int:
    """The largest divisor of n_layers up to GROUP: groups of one size, so one graph serves them all."""
    return max(g for g in range(1, GROUP + 1) if n_layers % g == 0)


def stack_block_weights(layers: nn.ModuleList) -> dict[str, torch.Tensor]:
    """Each block tensor's name -> the tensors of that name in every block stacked [n_layers, ...]; every
    block's own tensor becomes a view of its row, so the weights are held once."""
    stacked = {}
    for name, _ in [*layers[0].named_parameters(), *layers[0].named_buffers()]:
        owner, leaf = name.rpartition(".")[::2]
        modules = [layer.get_submodule(owner) for layer in layers]
        stacked[name] = torch.stack([getattr(m, leaf).data for m in modules])
        for m, row in zip(modules, stacked[name], strict=True):
            if isinstance(getattr(m, leaf), nn.Parameter):
                getattr(m, leaf).data = row
            else:
                setattr(m, leaf, row)
    return stacked


def run_group(template: Block, weights: dict[str, torch.Tensor], x, cos, sin, start: int, cache,
              k_pools: torch.Tensor, v_pools: torch.Tensor):
    """The blocks of one group: `template`'s forward over each layer's row of the stacked weights and
    of the pools. -> x, and the group's new keys and values [G, Hkv, N, D] each."""
    new_k, new_v = [], []
    for i in range(k_pools.shape[0]):
        cache.layer_k_pool, cache.layer_v_pool = k_pools[i], v_pools[i]
        x = functional_call(template, {name: w[i] for name, w in weights.items()}, (x, cos, sin, start, cache))
        new_k.append(cache.layer_k)
        new_v.append(cache.layer_v)
    return x, torch.stack(new_k), torch.stack(new_v)


@functools.cache
def compiled_group():
    """`run_group` compiled once for all groups (weights and pools come in as tensors, so no layer index
    reaches the graph to be guarded on): one graph for one sequence, one for 2..FEW_ROWS."""
    return torch.compile(run_group)


class DecodeGroups:
    """The compiled decode path's view of the model: per group of blocks, its slices of the stacked
    weights and of the pool (views, made once)."""

    def __init__(self, model: Transformer, pool: KVPool):
        layers = model.layers
        G = group_size(len(layers))
        weights = stack_block_weights(layers)
        self.template = layers[0]
        self.groups = [({name: w[g : g + G] for name, w in weights.items()}, pool.k[g : g + G], pool.v[g : g + G])
                       for g in range(0, len(layers), G)]


class PagedBatch:
    """One step's view of the pool, handed to the model as its cache."""

    run_blocks = None  # the model calls its blocks itself, unless a compiled decode step sets this

    def __init__(self, model: Transformer, pool: KVPool, scheduled: list[tuple[Sequence, int]], device,
                 compiled: DecodeGroups | None = None):
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
            longest = max(2, *(len(t) for t in dec))  # never one block wide: compiled code would specialise on 1
            self.decode_tables = torch.stack([F.pad(t, (0, longest - len(t))) for t in dec]).to(device)
            self.decode_lengths = torch.tensor(lengths[: self.num_decodes], device=device)
        if compiled is not None:  # a step of FEW_ROWS decodes at most (ModelRunner.run decides)
            self.decode_groups = compiled
            self.run_blocks = self.run_compiled_groups
            torch._dynamo.maybe_mark_dynamic(self.decode_tables, 1)  # contexts grow: one graph for all widths
            self.context_lengths = self.decode_lengths - 1
            if self.num_decodes > 1:  # one graph for 2..FEW_ROWS sequences: what they size is symbolic
                torch._dynamo.maybe_mark_dynamic(self.decode_tables, 0)
                torch._dynamo.maybe_mark_dynamic(self.context_lengths, 0)

    def attend(self, layer: int, q, k, v, start: int, attend):
        """q [1, H, N, D]; k, v [1, Hkv, N, D] for the step's N packed tokens -> attention out [1, H, N, D]."""
        if self.run_blocks is not None:  # a compiled decode step: attend around the pool, write after the step
            self.layer_k, self.layer_v = k[0], v[0]  # an attribute set in a graph is set again after it runs
            out = decode_attention_before_write(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                                self.layer_k_pool, self.layer_v_pool, self.decode_tables,
                                                self.context_lengths, self.scale, self.softcap, self.window)
            return out.transpose(0, 1).unsqueeze(0)
        self.pool.write(layer, self.new_slots, k[0], v[0])
        outs, offset = [], 0
        if self.num_decodes:
            B = self.num_decodes
            out = decode_attention(q[0, :, :B].transpose(0, 1), self.pool.k[layer], self.pool.v[layer],
                                   self.decode_tables, self.decode_lengths, self.scale, self.softcap, self.window)
            outs.append(out.transpose(0, 1).unsqueeze(0))
            offset = B
        for table, length, n in self.chunks:
            kc, vc = self.pool.gather(layer, table)
            outs.append(attend(q[:, :, offset : offset + n], kc[:, :, :length], vc[:, :, :length]))
            offset += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def run_compiled_groups(self, x, cos, sin, start: int) -> torch.Tensor:
        if x.shape[1] > 1:  # as the tables in __init__: the step's activations and rotations
            for t, dim in ((x, 1), (cos, 0), (sin, 0)):
                torch._dynamo.maybe_mark_dynamic(t, dim)
        new_k, new_v = [], []
        for weights, k_pools, v_pools in self.decode_groups.groups:
            x, k, v = compiled_group()(self.decode_groups.template, weights, x, cos, sin, start, self, k_pools, v_pools)
            new_k.append(k)
            new_v.append(v)
        self.new_k, self.new_v = torch.cat(new_k), torch.cat(new_v)  # [n_layers, Hkv, N, D]
        return x

    def commit(self) -> None:
        """After a compiled decode step: every layer's new keys and values into their slots, in one copy."""
        if self.run_blocks is not None:
            for pool, new in ((self.pool.k, self.new_k), (self.pool.v, self.new_v)):
                L, Hkv, blocks, bs, D = pool.shape
                pool.view(L, Hkv, blocks * bs, D).index_copy_(2, self.new_slots, new)


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
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, weights: str = "float",
                 compile_decode: bool = True):
        cpu = model.tok_embeddings.weight.device.type == "cpu"
        if cpu:
            keep_freed_memory()  # a step's gathered keys and values would be fresh mmaps, page-faulted each step
        if cpu or weights != "float":
            swap_linears(model, weights)
        self.model = model
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        # MoE blocks route on data (a host sync per layer), which a compiled graph would break at
        self.compile_decode = compile_decode and cpu and not model.cfg.is_moe
        self.pool = KVPool(model, num_blocks, block_size, self.dtype, self.device)

    @functools.cached_property
    def decode_groups(self) -> DecodeGroups:
        """Made at the first compiled decode step (stacking copies the weights once), not at load: the
        first token of a cold start does not wait for it."""
        return DecodeGroups(self.model, self.pool)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Forward the step's tokens; float32 logits [M, V] at the last token of each sequence whose
        whole context is computed after this step (the ones that sample), in scheduled order."""
        tokens = [t for seq, n in scheduled for t in seq.token_ids[seq.num_computed : seq.num_computed + n]]
        few_decodes = len(scheduled) <= FEW_ROWS and all(n == 1 for _, n in scheduled)
        compiled = self.decode_groups if self.compile_decode and few_decodes else None
        batch = PagedBatch(self.model, self.pool, scheduled, self.device, compiled)
        ends = torch.tensor([n for _, n in scheduled]).cumsum(0) - 1
        sampling = [i for i, (seq, n) in enumerate(scheduled) if seq.num_computed + n == seq.num_tokens]
        with decode_step(batch.num_decodes == len(scheduled)):
            hidden = self.model.hidden(torch.tensor([tokens], device=self.device), cache=batch)[0]
            batch.commit()
            return self.model.logits(hidden[ends[sampling].to(self.device)]).float()

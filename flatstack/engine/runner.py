"""The model runner: the paged KV pool, and one forward pass over a step's mixed batch.

The pool holds, per layer, keys and values for `num_blocks * block_size` token slots. A step packs the
new tokens of every scheduled sequence into one row (decodes first, then prompt chunks) and composes the
model's parts around it: embedding, rotations at each token's own position, the blocks, the final norm,
the LM head. The blocks run eagerly with a `PagedBatch` as their cache (it writes the step's keys and
values into their slots and reads each sequence's context back through its block table), or, for decode
steps of at most FEW_ROWS sequences on the CPU, compiled several to a graph (decode_graphs.py) once
those graphs are ready. The model is the training `Transformer`; its linears are swapped for the
inference ones (kernels/linear.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flatstack.allocator import keep_freed_memory
from flatstack.engine.cuda_graphs import GraphedDecode
from flatstack.engine.decode_graphs import DecodeGraphs
from flatstack.engine.native_decode import NativeDecode
from flatstack.engine.sequence import Sequence
from flatstack.kernels import attention, moe
from flatstack.kernels.linear import FEW_ROWS, LINEARS, NATIVE_ROWS, decode_step
from flatstack.kernels.paged_attention import decode_attention, gather_blocks
from flatstack.model import Transformer, rope_cos_sin, rope_frequencies


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

    def write_all(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Every layer's new keys and values [n_layers, Hkv, N, D] into their slots, in one copy each."""
        for pool, new in ((self.k, k), (self.v, v)):
            L, Hkv, blocks, bs, D = pool.shape
            pool.view(L, Hkv, blocks * bs, D).index_copy_(2, slots, new)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of one sequence's blocks [n] -> [1, Hkv, n * block_size, D] each."""
        return tuple(gather_blocks(pool, blocks).flatten(1, 2).unsqueeze(0) for pool in (self.k[layer], self.v[layer]))


@dataclass(frozen=True)
class Planned:
    """What the runner needs of one scheduled sequence: the tokens to forward, the position of the first,
    the blocks its context fills, and whether it samples a token after this step (its whole context is
    then computed). Plain data, so a tensor-parallel step sends it to the other ranks as it is."""

    tokens: list[int]
    start: int
    table: list[int]
    samples: bool


def plan(scheduled: list[tuple[Sequence, int]], block_size: int) -> list[Planned]:
    step = []
    for seq, n in scheduled:
        start, end = seq.num_computed, seq.num_computed + n
        step.append(Planned(seq.token_ids[start:end], start, seq.block_table[: -(-end // block_size)],
                            end == seq.num_tokens))
    return step


class PagedBatch:
    """One step's view of the pool, handed to the blocks as their cache: per-token positions and slots,
    the decodes' block tables, the prompt chunks'. With `packed`, the prompt chunks attend together in one
    FlexAttention call over their contexts gathered at once (kernels/attention.py: packed), instead of
    one attention call per chunk."""

    def __init__(self, model: Transformer, pool: KVPool, step: list[Planned], device, packed: bool = False):
        cfg = model.cfg
        self.pool = pool
        self.scale, self.softcap, self.window = model.layers[0].attn.scale, cfg.attn_logit_softcap, cfg.sliding_window
        bs = pool.block_size
        positions, new_slots, tables, lengths = [], [], [], []
        for entry in step:
            end = entry.start + len(entry.tokens)
            pos = torch.arange(entry.start, end)
            table = torch.tensor(entry.table)
            positions.append(pos)
            new_slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(table)
            lengths.append(end)
        self.positions = torch.cat(positions).to(device)
        self.new_slots = torch.cat(new_slots).to(device)
        # the leading one-token entries (the scheduler puts decodes first) attend together, as decodes
        self.num_decodes = d = next((i for i, e in enumerate(step) if len(e.tokens) != 1), len(step))
        self.chunks = [(tables[i].to(device), lengths[i], len(e.tokens)) for i, e in enumerate(step) if i >= d]
        self.temperature_len = cfg.attn_temperature_len
        self.packed = packed_chunks(positions[d:], tables[d:], bs, device, self.window, self.temperature_len) \
            if packed and self.chunks else None
        if d:
            longest = max(2, *(len(t) for t in tables[:d]))  # never one block wide: compiled code would specialise on 1
            self.decode_tables = torch.stack([F.pad(t, (0, longest - len(t))) for t in tables[:d]]).to(device)
            self.decode_lengths = torch.tensor(lengths[:d], device=device)

    def attend(self, layer: int, q, k, v, start: int, attend):
        """q [1, H, N, D]; k, v [1, Hkv, N, D] for the step's N packed tokens -> attention out [1, H, N, D]."""
        self.pool.write(layer, self.new_slots, k[0], v[0])
        outs, B = [], self.num_decodes
        if B:
            out = decode_attention(q[0, :, :B].transpose(0, 1), self.pool.k[layer], self.pool.v[layer],
                                   self.decode_tables, self.decode_lengths, self.scale, self.softcap, self.window,
                                   self.temperature_len)
            outs.append(out.transpose(0, 1).unsqueeze(0))
        if self.packed is not None:
            blocks, block_mask, tau = self.packed
            kc, vc = self.pool.gather(layer, blocks)
            outs.append(attention.packed(q[:, :, B:], kc, vc, block_mask, self.scale, self.softcap, tau))
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        offset = B
        for table, length, n in self.chunks:
            kc, vc = self.pool.gather(layer, table)
            outs.append(attend(q[:, :, offset : offset + n], kc[:, :, :length], vc[:, :, :length]))
            offset += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def packed_chunks(positions: list[torch.Tensor], tables: list[torch.Tensor], block_size: int, device,
                  window: int | None, temperature_len: int | None = None):
    """What `attention.packed` needs for the prompt chunks: their blocks, gathered as one context, and the
    block mask built from each query's and each context slot's sequence (its index among the chunks) and
    position, once for every layer of the step."""
    q_seq = torch.cat([torch.full((len(p),), i) for i, p in enumerate(positions)])
    k_seq = torch.cat([torch.full((len(t) * block_size,), i) for i, t in enumerate(tables)])
    k_pos = torch.cat([torch.arange(len(t) * block_size) for t in tables])
    q_pos = torch.cat(positions).to(device)
    ids = (t.to(device) for t in (q_seq, q_pos, k_seq, k_pos))
    tau = None if temperature_len is None else attention.temperature_at(q_pos, temperature_len)
    return torch.cat(tables).to(device), attention.packed_mask(*ids, window), tau


def swap_linears(model: Transformer, kind: str, stored: dict[str, nn.Module] | None = None) -> nn.Module:
    """Put the inference linears of `kind` (float, int8, int4; kernels/linear.py) in place of every
    nn.Linear in the blocks; returns the LM head's. `stored`: weight name -> a linear already quantised
    (a GGUF file's own blocks), taken as it is. MoE expert stacks and routers stay as they are."""
    make, stored = LINEARS[kind], stored or {}
    names = {id(module): name for name, module in model.named_modules()}
    for block in model.layers:
        for parent in (block.attn, block.ffn, *([block.mlp] if hasattr(block, "mlp") else [])):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    bias = None if child.bias is None else child.bias.data
                    key = f"{names[id(child)]}.weight"
                    layer = stored[key] if key in stored and bias is None else make(child.weight.data, bias)
                    setattr(parent, name, layer)
    head = "tok_embeddings.weight" if model.cfg.tied_embeddings else "output.weight"
    return stored[head] if head in stored else make(model.head_weight.data)


def graph_safe(model: Transformer) -> bool:
    """Whether a decode step can be captured: no host sync inside (an MoE's experts grouped, kernels/moe.py)."""
    if not model.cfg.is_moe:
        return True
    ffn = model.layers[0].ffn
    return moe.grouped_ok(torch.empty(0, model.cfg.d_model, dtype=ffn.w_gate.dtype), ffn.w_gate)


class ModelRunner:
    """`gpu_paths` (default: on a GPU): decode steps as CUDA graphs (cuda_graphs.py; run eagerly from their
    static buffers elsewhere) and prompt chunks packed into one attention call. `ranks`: the other ranks of
    a tensor-parallel engine (tensor_parallel.py), whose model is this rank's shard."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, weights: str = "float",
                 compile_decode: bool = True, max_num_seqs: int = 64, gpu_paths: bool | None = None,
                 ranks=None, stored: dict[str, nn.Module] | None = None):
        cpu = model.tok_embeddings.weight.device.type == "cpu"
        gpu_paths = not cpu if gpu_paths is None else gpu_paths
        if cpu:
            keep_freed_memory()  # a step's gathered keys and values would be fresh mmaps, page-faulted each step
        self.head = swap_linears(model, weights, stored) if cpu or weights != "float" else None
        self.model = model
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        # on the GPU paths, one block more: the scratch the graphs' padding rows write into
        self.pool = KVPool(model, num_blocks + gpu_paths, block_size, self.dtype, self.device)
        self.packed = gpu_paths
        self.graphed = GraphedDecode(model, self.pool, self.head, max_num_seqs, num_blocks * block_size,
                                     capture=not cpu) if gpu_paths and compile_decode and graph_safe(model) else None
        # the C decode step: not under tensor parallelism, whose products end in collectives it does not make
        native = compile_decode and cpu and not gpu_paths and ranks is None and NativeDecode.supports(model, self.dtype)
        self.native = NativeDecode(model, self.pool.k, self.pool.v, self.head) if native else None
        # MoE blocks route on data (a host sync per layer), which a compiled graph would break at; the compiled
        # steps' attention takes no temperature
        self.graphs = DecodeGraphs(model, self.pool.k, self.pool.v) \
            if compile_decode and cpu and not gpu_paths and not model.cfg.is_moe and self.native is None \
            and model.cfg.attn_temperature_len is None else None
        self.compiling = None  # the thread compiling the graphs, once started
        self.ranks = ranks  # tensor parallel: the other ranks, sent each step (tensor_parallel.Ranks)
        self.inv_freq = rope_frequencies(model.cfg, self.device)  # once, not every step

    def start_compiling(self) -> None:
        """Compile the CPU's decode graphs on a thread of their own (once; decode steps run eagerly
        meanwhile), or capture the GPU's CUDA graphs (here: seconds, and no other work may run meanwhile)."""
        if self.graphed is not None:
            try:
                self.graphed.capture_all()
            except Exception as e:  # noqa: BLE001 - serve eagerly rather than fail every step
                warnings.warn(f"capturing the decode steps as CUDA graphs failed ({type(e).__name__}: {e}); "
                              "decoding eagerly", stacklevel=2)
                self.graphed = None
        if self.graphs is not None and self.compiling is None:
            self.compiling = self.graphs.warm_in_background()

    def wait_compiled(self) -> None:
        self.start_compiling()
        if self.compiling is not None:
            self.compiling.join()
            if self.graphs.error is not None:
                raise RuntimeError(f"compiling the decode graphs failed: {self.graphs.error}") from self.graphs.error

    @property
    def decode_path(self) -> str:
        """What serves decode steps now: "cuda_graphs" (GPU), "native" (the C step), "compiled", "compiling"
        (eager meanwhile) or "eager"."""
        if self.graphed is not None and self.graphed.graphs:
            return "cuda_graphs"
        if self.native is not None:
            return "native"
        if self.graphs is None or self.graphs.error is not None:
            return "eager"
        return "compiled" if self.graphs.ready.is_set() else "compiling"

    def run(self, scheduled: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Forward the step's tokens; float32 logits [M, V] at the last token of each sequence whose
        whole context is computed after this step (the ones that sample), in scheduled order. Under tensor
        parallelism, the other ranks are sent the same step first."""
        step = plan(scheduled, self.pool.block_size)
        if self.ranks is None:
            return self.execute(step)
        self.ranks.send(step)
        try:
            return self.execute(step)
        except BaseException:
            self.ranks.abort()  # the other ranks are left inside this step's collectives
            raise

    @torch.inference_mode()
    def execute(self, step: list[Planned]) -> torch.Tensor:
        model = self.model
        self.start_compiling()
        tokens = [t for entry in step for t in entry.tokens]
        decoding = len(tokens) == len(step)
        # every entry samples (a one-token prompt chunk may not: a budget of one token left)
        whole = all(entry.samples for entry in step)
        # the C step takes every step of decodes alone, and decodes beside prompt chunks up to NATIVE_ROWS
        # tokens in all; past that (and for prompts alone) torch's GEMM is faster than the C tiles
        mixed = len(tokens) <= NATIVE_ROWS and any(entry.start > 0 and len(entry.tokens) == 1 for entry in step)
        if self.native is not None and (decoding and whole or mixed):
            return self.native_step(step)
        batch = PagedBatch(model, self.pool, step, self.device, self.packed)
        if decoding and whole and self.graphed is not None and len(step) <= self.graphed.max_seqs:
            return self.graphed.run(tokens, batch.positions, batch.new_slots, batch.decode_tables,
                                    batch.decode_lengths).float()
        compiled = decoding and len(step) <= FEW_ROWS and self.decode_path == "compiled"
        x = model.embed(torch.tensor([tokens], device=self.device))
        cos, sin = rope_cos_sin(self.inv_freq, batch.positions, x.dtype)
        # eager steps take the fused few-row products only once the graphs (which compile them too) exist
        with decode_step(decoding and self.decode_path != "compiling"):
            if compiled:
                x, new_k, new_v = self.graphs.run(x, cos, sin, batch.decode_tables, batch.decode_lengths - 1)
                self.pool.write_all(batch.new_slots, new_k, new_v)
            else:
                for layer in model.layers:
                    x = layer(x, cos, sin, 0, batch)
            ends = torch.tensor([len(entry.tokens) for entry in step]).cumsum(0) - 1
            sampling = [i for i, entry in enumerate(step) if entry.samples]
            hidden = model.norm(x[0, ends[sampling].to(self.device)])
            return model.logits(hidden, self.head).float()

    def native_step(self, step: list[Planned]) -> torch.Tensor:
        """A step in one C call through the blocks (and the LM head, where the kernels read its format): a
        row per token, a prompt chunk's tokens each with its own position and its sequence's table; the
        head at the last row of each sequence that samples. Its inputs made in plain Python: a PagedBatch's
        tensor ops per sequence cost a tenth of a small model's step."""
        model, bs = self.model, self.pool.block_size
        width = max(2, *(len(entry.table) for entry in step))
        tokens, positions, slots, tables, heads = [], [], [], [], []
        for entry in step:
            table = entry.table + [0] * (width - len(entry.table))
            for p in range(entry.start, entry.start + len(entry.tokens)):
                positions.append(p)
                slots.append(entry.table[p // bs] * bs + p % bs)
                tables.append(table)
            tokens += entry.tokens
            if entry.samples:
                heads.append(len(tokens) - 1)
        x = model.embed(torch.tensor(tokens))
        cos, sin = rope_cos_sin(self.inv_freq, torch.tensor(positions), torch.float32)  # the step's activations'
        out = self.native.run(x, cos, sin, torch.tensor(slots), torch.tensor(tables), torch.tensor(positions) + 1,
                              torch.tensor(heads, dtype=torch.long))
        if self.native.vocab is not None:  # the head's product done: the multiplier and soft cap remain
            return model.logits(out, head=lambda logits: logits)
        with decode_step():
            return model.logits(model.norm(out[heads].to(self.dtype)), self.head).float()

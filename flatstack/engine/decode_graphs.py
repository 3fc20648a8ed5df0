"""Compiled decode steps on the CPU: the blocks run by TorchInductor, several to a graph.

A decode step of at most FEW_ROWS sequences runs `Block.forward` unrolled over a group of consecutive
layers (at most GROUP) in one graph, one graph serving every group, so a layer's norms, projections,
RoPE, attention and FFN are C++ loops instead of some forty eager ops. What a graph call costs beside
its kernels grows with the tensors it takes (a guard on each, a size check, the outputs it wraps), so
the blocks' weights are stacked by name, one [n_layers, ...] tensor each, and every block's own weights
become views of it (held once): a group's graph takes one [G, ...] slice per weight name.

Inside a graph the pool is only read (a graph that wrote into it would copy it): each layer attends
around the pool to its new key and value, which come out of the graph and are written into the pool for
all layers at once after the step. The graphs compile on a thread of their own (`warm`), while the
engine serves eagerly; `ready` says when the engine may switch to them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
import threading

import torch
from torch import nn
from torch.func import functional_call

from flatstack.kernels.linear import import_compiler
from flatstack.kernels.paged_attention import decode_attention_before_write
from flatstack.model import Block, Transformer

GROUP = 6  # blocks per graph, at most: more per graph costs compile time and was no faster when measured


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


class LayerView:
    """What one layer's attention sees inside a graph: its slice of the pool, read-only. `attend` keeps
    the layer's new key and value for `run_group` to return."""

    def __init__(self, k_pool, v_pool, tables, context_lengths, scale: float, softcap, window):
        self.k_pool, self.v_pool, self.tables, self.context_lengths = k_pool, v_pool, tables, context_lengths
        self.scale, self.softcap, self.window = scale, softcap, window

    def attend(self, layer: int, q, k, v, start: int, attend):
        """q [1, H, N, D]; k, v [1, Hkv, N, D]: the N sequences' one new token each."""
        self.k, self.v = k[0], v[0]
        out = decode_attention_before_write(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                            self.k_pool, self.v_pool, self.tables, self.context_lengths,
                                            self.scale, self.softcap, self.window)
        return out.transpose(0, 1).unsqueeze(0)


def run_group(template: Block, weights: dict[str, torch.Tensor], x, cos, sin, k_pools, v_pools, tables,
              context_lengths, scale: float, softcap, window):
    """`template`'s forward over each layer's row of the group's stacked weights and pool slices.
    -> x, and the group's new keys and values [G, Hkv, N, D] each."""
    new_k, new_v = [], []
    for i in range(k_pools.shape[0]):
        view = LayerView(k_pools[i], v_pools[i], tables, context_lengths, scale, softcap, window)
        x = functional_call(template, {name: w[i] for name, w in weights.items()}, (x, cos, sin, 0, view))
        new_k.append(view.k)
        new_v.append(view.v)
    return x, torch.stack(new_k), torch.stack(new_v)


@functools.cache
def compiled_group():
    """`run_group` compiled once for all groups (weights and pools come in as tensors, so no layer index
    reaches the graph to be guarded on): one graph for one sequence, one for 2..FEW_ROWS."""
    return torch.compile(run_group)


def yield_to_the_engine() -> float:
    """Run this thread (and the compiler processes it starts, which inherit it) at a lower CPU priority,
    and hand the GIL over more often while it compiles, so the steps the engine serves meanwhile are not
    held up by it. Returns the switch interval to restore."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, 0.001))
    return before


class DecodeGraphs:
    def __init__(self, model: Transformer, k_pool: torch.Tensor, v_pool: torch.Tensor):
        cfg, layers = model.cfg, model.layers
        G = group_size(len(layers))
        # functional_call swaps the template's tensors while it runs: a copy of its own, so the graphs
        # compiling on another thread never touch a block the engine is running eagerly meanwhile (copied
        # before stacking: a copy of a view would copy the whole stack)
        self.template = copy.deepcopy(layers[0])
        weights = stack_block_weights(layers)
        for module in self.template.modules():
            if hasattr(module, "in_graph"):
                module.in_graph = True  # its products take the fused reduction, inside the graph
        self.groups = [({name: w[g : g + G] for name, w in weights.items()}, k_pool[g : g + G], v_pool[g : g + G])
                       for g in range(0, len(layers), G)]
        self.attention = (layers[0].attn.scale, cfg.attn_logit_softcap, cfg.sliding_window)
        self.shape = (cfg.d_model, cfg.head_dim, model.tok_embeddings.weight.dtype, k_pool.device)
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self, x, cos, sin, tables, context_lengths):
        """x [1, N, D] of N decoding sequences; tables [N, width]; context_lengths [N] cached positions
        before the new token -> x, new keys and values [n_layers, Hkv, N, D]."""
        torch._dynamo.maybe_mark_dynamic(tables, 1)  # contexts grow: one graph for all widths
        if x.shape[1] > 1:  # one graph for 2..FEW_ROWS sequences: what they size is symbolic
            for t, dim in ((x, 1), (cos, 0), (sin, 0), (tables, 0), (context_lengths, 0)):
                torch._dynamo.maybe_mark_dynamic(t, dim)
        new_k, new_v = [], []
        for weights, k_pools, v_pools in self.groups:
            x, k, v = compiled_group()(self.template, weights, x, cos, sin, k_pools, v_pools, tables,
                                       context_lengths, *self.attention)
            new_k.append(k)
            new_v.append(v)
        return x, torch.cat(new_k), torch.cat(new_v)

    @torch.inference_mode()
    def warm(self) -> None:
        """Compile both graphs on stand-in inputs (reading block 0 of the pool), then set `ready`. A failure
        is kept in `error`, and the engine goes on eagerly."""
        D, head_dim, dtype, device = self.shape
        switch_interval = yield_to_the_engine()
        try:
            import_compiler()
            for n in (2, 1):
                x = torch.zeros(1, n, D, dtype=dtype, device=device)
                cos = torch.ones(n, head_dim, dtype=dtype, device=device)
                tables = torch.zeros(n, 2, dtype=torch.long, device=device)
                self.run(x, cos, torch.zeros_like(cos), tables, torch.ones(n, dtype=torch.long, device=device))
            self.ready.set()
        except Exception as e:  # noqa: BLE001 - the eager path serves on; `error` says why
            self.error = e
        finally:
            sys.setswitchinterval(switch_interval)

    def warm_in_background(self) -> threading.Thread:
        """Compile on a thread of its own: the engine serves eagerly meanwhile."""
        thread = threading.Thread(target=self.warm, name="flatstack-compile", daemon=True)
        thread.start()
        return thread

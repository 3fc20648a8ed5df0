"""The experts of an MoE layer: each token's k chosen experts run on it, their outputs weighted and summed.

Both forms sort the (token, slot) pairs by expert once, so each expert's tokens are one contiguous run.
`reference` then loops over the experts in Python, which needs each run's length on the host (a sync).
`grouped` runs the three expert products as grouped GEMMs over the runs (`torch._grouped_mm`, bf16):
no host sync and no data-dependent Python branch, so it compiles whole (fullgraph) and can be captured
in a CUDA graph. torch's grouped GEMM takes bf16 only, with 16-byte-aligned rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sort_by_expert(experts: torch.Tensor, weights: torch.Tensor, n_experts: int):
    """experts, weights [N, k] -> for the pairs in expert order: token index, weight, and the run ends
    per expert [E] (int32, on the device)."""
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # not bincount: a static shape
    return order // experts.shape[1], weights.flatten()[order], counts.cumsum(0, dtype=torch.int32)


@torch.compiler.disable  # a host sync per expert: compiled, each run's length would make graphs of its own
def reference(x, experts, weights, w_gate, w_up, w_down, act: Callable) -> torch.Tensor:
    """x [N, D]; experts, weights [N, k]; w_gate, w_up [E, F, D]; w_down [E, D, F] -> [N, D]."""
    token_of, weight_of, ends = sort_by_expert(experts, weights, w_gate.shape[0])
    out, begin = torch.zeros_like(x), 0
    for e, end in enumerate(ends.tolist()):
        if end == begin:
            continue
        idx = token_of[begin:end]
        h = act(x[idx] @ w_gate[e].T) * (x[idx] @ w_up[e].T)
        out.index_add_(0, idx, (h @ w_down[e].T) * weight_of[begin:end, None])
        begin = end
    return out


def grouped_ok(x: torch.Tensor, w_gate: torch.Tensor) -> bool:
    """Whether `grouped` can run: bf16, and rows of the products 16-byte aligned."""
    return x.dtype == w_gate.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and w_gate.shape[1] % 8 == 0


def grouped(x, experts, weights, w_gate, w_up, w_down, act: Callable) -> torch.Tensor:
    """`reference` as three grouped GEMMs over the expert runs; an expert with no token is an empty run."""
    token_of, weight_of, ends = sort_by_expert(experts, weights, w_gate.shape[0])
    h = x[token_of]
    gate = torch._grouped_mm(h, w_gate.transpose(-2, -1), offs=ends)
    up = torch._grouped_mm(h, w_up.transpose(-2, -1), offs=ends)
    y = torch._grouped_mm(act(gate) * up, w_down.transpose(-2, -1), offs=ends)
    return torch.zeros_like(x).index_add(0, token_of, y * weight_of[:, None])

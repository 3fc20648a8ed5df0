"""Linear layers for inference: float, weight-only int8 (per output channel) and int4 (group-wise).

Decoding multiplies a few rows by every weight matrix once per token, so it is bound by the bytes of
weight read, not by arithmetic. The BLAS matrix-vector path reads float32 weights well below the
memory bandwidth, and torch's packed int8/int4 CPU kernels slower still with float32 activations
(docs/design.md has the figures). The fast path here
is one fused reduction per product, compiled by TorchInductor into a vectorised C++ loop: each weight
byte is read once, and quantised weights are unpacked and scaled inside the loop, so int8 reads a
quarter and int4 an eighth of float32's bytes.
Products called outside a compiled graph (the int8 LM head of every decode step) run in a C loop
instead, kernels/int8_rows.c, which prefetches the weight rows ahead of the reduction.
Many rows (a prompt) are compute-bound: they go through the BLAS GEMM, on float weights (dequantised
for the call when quantised).

Each layer's `reference` is the plain torch form the tests hold the fast path to.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from flatstack.kernels import native

FEW_ROWS = 6  # at most this many rows take the fused reduction: past that, BLAS wins
INT4_GROUP = 32


def float_rows(x, w):
    return (x[:, None, :] * w[None]).sum(-1)


def int8_rows(x, q, scale):
    return (x[:, None, :] * q[None].float()).sum(-1) * scale


def int4_rows(x, packed, scale, low):
    # a group's byte j holds its weights j (low nibble) and j + g/2 (high): both halves of x are
    # contiguous runs, so the loop vectorises
    M, K = x.shape
    N, groups = scale.shape
    xg = x.view(M, 1, groups, 2, -1)
    p = packed.view(1, N, groups, -1)
    lo, hi = (p & 15).float(), (p >> 4).float()
    dot = (lo * xg[:, :, :, 0] + hi * xg[:, :, :, 1]).sum(-1)  # [M, N, groups]
    return (dot * scale.float() + xg.sum((-1, -2)) * low.float()).sum(-1)


ROWS = {"float": float_rows, "int8": int8_rows, "int4": int4_rows}


_compiler_imports = threading.Lock()


def import_compiler() -> None:
    """Import TorchDynamo and TorchInductor one thread at a time: two threads importing them at once (the
    decode graphs compiling on theirs, an eager step compiling a reduction on the engine's) can deadlock
    in the import system."""
    with _compiler_imports:
        import torch._dynamo  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401


@functools.cache
def compiled_rows(kind: str):
    """The reduction for one weight format compiled on its own (once per process, shapes symbolic)."""
    import_compiler()
    return torch.compile(ROWS[kind], dynamic=True)


def fused(kind: str, in_graph: bool):
    """Inside a compiled decode graph (engine/decode_graphs.py) the plain form, which TorchInductor fuses
    with the ops around it; called eagerly, the reduction compiled on its own."""
    return ROWS[kind] if in_graph else compiled_rows(kind)


# Eager decode steps opt in (only the engine's thread sets it). The decode graphs' own copies of the
# linears have `in_graph` set instead: they compile on another thread, and must not read this flag
# (nor torch.compiler.is_compiling(), which is one flag for every thread of the process).
_decoding = False


@contextlib.contextmanager
def decode_step(active: bool = True):
    """Within it, few-row products take the fused reduction. Only decode steps opt in: a short prompt's
    prefill stays on BLAS, so the first token never waits for the kernels to compile (that happens at
    the first decode step, once per process)."""
    global _decoding
    before = _decoding
    _decoding = active
    try:
        yield
    finally:
        _decoding = before


def use_fused(x: torch.Tensor, in_graph: bool) -> bool:
    return in_graph or (_decoding and x.device.type == "cpu" and x.numel() // x.shape[-1] <= FEW_ROWS
                        and not torch.is_grad_enabled())


def use_native(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Eager float32 int8 products go to the C kernel (kernels/native.py) if it built."""
    return x.dtype == torch.float32 and scale.dtype == torch.float32 and native.library() is not None


def rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class FloatLinear(nn.Module):
    """A float weight [N, K]; few rows through the fused reduction."""

    in_graph = False  # a copy inside a compiled decode graph (see `_decoding`)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)  # a buffer: dynamo keeps parameter shapes static
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_fused(x, self.in_graph):
            return F.linear(x, self.weight, self.bias)
        y = fused("float", self.in_graph)(rows(x), self.weight).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """Symmetric int8 weights with one float scale per output channel: w = q * scale."""

    in_graph = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("q", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return self.q.to(self.scale.dtype) * self.scale[:, None]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_fused(x, self.in_graph):
            return self.reference(x)
        if not self.in_graph and use_native(x, self.scale):  # called eagerly (the LM head): the C kernel
            y = native.int8_rows(rows(x), self.q, self.scale).view(*x.shape[:-1], -1)
        else:
            y = fused("int8", self.in_graph)(rows(x), self.q, self.scale).to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """Asymmetric int4 weights in groups of 32 along the input: w = low + q * scale, q in 0..15, two
    weights to a byte (a group's byte j: weight j in the low nibble, j + 16 in the high); scale and low
    in float16 per group."""

    in_graph = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group: int = INT4_GROUP):
        super().__init__()
        N, K = weight.shape
        if K % group:
            raise ValueError(f"int4 needs the input size ({K}) to be a multiple of the group size {group}")
        w = weight.float().view(N, K // group, group)
        low, high = w.amin(-1), w.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8).half()
        low = low.half()
        q = ((w - low.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
        half = group // 2
        self.register_buffer("packed", (q[..., :half] | (q[..., half:] << 4)).reshape(N, K // 2))
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_dtype = weight.dtype

    def dequantize(self) -> torch.Tensor:
        N, groups = self.scale.shape
        p = self.packed.view(N, groups, -1)
        q = torch.cat([p & 15, p >> 4], dim=-1).float()
        w = q * self.scale.float()[..., None] + self.low.float()[..., None]
        return w.view(N, -1).to(self.out_dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_fused(x, self.in_graph):
            return self.reference(x)
        y = fused("int4", self.in_graph)(rows(x).float(), self.packed, self.scale, self.low)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


LINEARS = {"float": FloatLinear, "int8": Int8Linear, "int4": Int4Linear}

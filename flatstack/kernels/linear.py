"""Linear layers for inference: float, int8 and int4 weights, the quantised ones in blocks of 32 along
the input with a float16 scale each (GGUF's Q8_0 and Q4_1 layouts, so those files load as they are).

Decoding multiplies a few rows by every weight matrix once per token, so it is bound by the bytes of
weight read (and, for quantised weights on two cores, by the arithmetic of unpacking them), not by a GEMM's
arithmetic. The BLAS matrix-vector path reads float32 weights well below the memory bandwidth, and
torch's packed int8/int4 CPU kernels are slower still with float32 activations (docs/design.md). The fast
path for 1 to NATIVE_ROWS float32 rows is the C kernel (kernels/linear_rows.c): each weight byte read once,
quantised weights against activations quantised per block on the fly, multiplied with VNNI's integer dot
products. Inside a compiled decode graph (bfloat16 models, engine/decode_graphs.py) the products are
instead fused reductions compiled by TorchInductor. Many rows (a prompt) are compute-bound: float weights
go through the BLAS GEMM, quantised ones through the C kernel up to NATIVE_ROWS rows and dequantised
for the GEMM past that.

Each layer's `reference` is the plain torch form the tests hold the fast paths to; `quantized_reference`
is the C kernel's own arithmetic (activations quantised as it quantises them) in torch.
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
NATIVE_ROWS = 64  # at most this many rows take the C kernels
BLOCK = 32  # quantisation block along the input, for int8 and int4 weights and for the activations


def float_rows(x, w):
    return (x[:, None, :] * w[None]).sum(-1)


def int8_rows(x, q, scale):
    M, K = x.shape
    N, groups = scale.shape
    dot = (x.view(M, 1, groups, -1) * q.view(1, N, groups, -1).float()).sum(-1)  # [M, N, groups]
    return (dot * scale.float()).sum(-1)


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
    """Within it, few-row float products take the C kernel (or the fused reduction where it cannot). Only
    decode steps opt in: a prompt's prefill stays on BLAS, and never waits for a reduction to compile."""
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


def use_native(x: torch.Tensor, layer: nn.Module, always: bool) -> bool:
    """Whether `layer` runs x through the C kernel: float32 CPU rows, up to NATIVE_ROWS of them, called
    eagerly, in a decode step unless `always` (quantised weights: the kernel also beats dequantising for a
    short prompt), and the layer's format one the kernel reads."""
    return (not layer.in_graph and x.dtype == torch.float32 and x.device.type == "cpu" and (always or _decoding)
            and x.numel() // x.shape[-1] <= NATIVE_ROWS and not torch.is_grad_enabled()
            and native.library() is not None and layer.kernel_weight() is not None)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the C kernel sees it: rounded to int8 per block of BLOCK with the block's absmax / 127
    as its scale (returned dequantised)."""
    blocks = x.float().view(*x.shape[:-1], -1, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.full_like(amax, 127.0).div(amax)  # a true division, as C's (127 / amax is a reciprocal times 127)
    q = torch.where(amax > 0, torch.round(blocks * inverse), torch.zeros_like(blocks))
    return (q * (amax / 127)).view(x.shape)


class KernelWeight:
    """A layer's weight described for the C kernel once (native.describe), renewed if its tensors change."""

    def __init__(self):
        self.tensors: tuple = ()
        self.struct = None
        self.bias = None  # the float32 bias the struct points at

    def get(self, kind: str, *tensors):
        """`tensors`: the weight's, as native.describe takes them, the bias (or None) last; the kernel adds
        a float32 bias, so a bfloat16 model's is copied once."""
        if len(self.tensors) != len(tensors) or any(a is not b for a, b in zip(self.tensors, tensors, strict=True)):
            *weight, bias = tensors
            self.bias = None if bias is None else bias.detach().float().contiguous()
            ok = weight[0].device.type == "cpu" and all(t is None or t.is_contiguous() for t in weight)
            self.struct = native.describe(kind, *weight, bias=self.bias) if ok else None
            self.tensors = tensors
        return self.struct


def rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class FloatLinear(nn.Module):
    """A float weight [N, K]; few rows through the C kernel (float32, bfloat16) or the fused reduction."""

    in_graph = False  # a copy inside a compiled decode graph (see `_decoding`)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)  # a buffer: dynamo keeps parameter shapes static
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel = KernelWeight()

    def kernel_weight(self):
        if self.weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        return self.kernel.get(str(self.weight.dtype).removeprefix("torch."), self.weight, None, None, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_native(x, self, always=False):
            return native.linear_rows(self.kernel_weight(), rows(x)).view(*x.shape[:-1], -1)
        if not use_fused(x, self.in_graph):
            return F.linear(x, self.weight, self.bias)
        y = fused("float", self.in_graph)(rows(x), self.weight).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: the dequantised reference, and the C kernel for few rows."""

    in_graph = False
    kind = ""

    def kernel_weight(self):
        if self.scale.shape[1] * BLOCK != self.in_features:
            return None  # per-channel scales (an input size that is no multiple of BLOCK): the torch paths
        return self.kernel.get(self.kind, *self.kernel_tensors(), self.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)

    def quantized_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The C kernel's arithmetic in torch: activations quantised per block, as it does."""
        return F.linear(quantize_activations(x).to(x.dtype), self.dequantize(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_native(x, self, always=True):
            return native.linear_rows(self.kernel_weight(), rows(x)).view(*x.shape[:-1], -1)
        if not use_fused(x, self.in_graph):
            return self.reference(x)
        y = fused(self.kind, self.in_graph)(rows(x).float(), *(t for t in self.kernel_tensors() if t is not None))
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def blocks_of(K: int) -> int:
    """The quantisation block for an input of K: BLOCK, or the whole row (one scale per output channel)
    where K is no multiple of it."""
    return BLOCK if K % BLOCK == 0 else K


class Int8Linear(QuantizedLinear):
    """Symmetric int8 weights in blocks of 32 along the input (GGUF's Q8_0): w = q * scale, one float16
    scale per block."""

    kind = "int8"

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None = None, *, q=None, scale=None):
        super().__init__()
        if weight is not None:
            N, K = weight.shape
            w = weight.float().view(N, K // blocks_of(K), -1)
            scale = (w.abs().amax(-1).clamp(min=1e-12) / 127).half()
            q = (w / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8).view(N, K)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_dtype = q.shape[1], torch.float32 if weight is None else weight.dtype
        self.kernel = KernelWeight()

    def kernel_tensors(self) -> tuple:
        return self.q, self.scale, None  # no offsets

    def dequantize(self) -> torch.Tensor:
        N, groups = self.scale.shape
        w = self.q.view(N, groups, -1).float() * self.scale.float()[..., None]
        return w.view(N, -1).to(self.out_dtype)


def int4_levels(w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15)


def fit_int4(w: torch.Tensor, rounds: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks w [..., BLOCK] -> float16 scale and low [...], levels q [..., BLOCK] uint8 with w ~ low + q * scale.
    From the blocks' min and max, then each block's (scale, low) refitted by least squares to its levels, and
    the levels reassigned, keeping per block the fit of least squared error (llama.cpp's k-quants refine
    the same way): a min-max grid wastes levels on outliers."""
    low, high = w.amin(-1), w.amax(-1)
    best_scale, best_low = ((high - low) / 15).clamp(min=1e-8).half().float(), low.half().float()
    best_err = ((int4_levels(w, best_scale, best_low) * best_scale[..., None] + best_low[..., None] - w) ** 2).sum(-1)
    scale, low = best_scale, best_low
    for _ in range(rounds):
        q = int4_levels(w, scale, low)
        n, sq, sw = w.shape[-1], q.sum(-1), w.sum(-1)
        det = n * (q * q).sum(-1) - sq * sq
        fitted = (n * (q * w).sum(-1) - sq * sw) / det.clamp(min=1e-12)
        scale = torch.where(det > 0, fitted, scale).clamp(min=1e-8).half().float()
        low = ((sw - scale * sq) / n).half().float()
        err = ((int4_levels(w, scale, low) * scale[..., None] + low[..., None] - w) ** 2).sum(-1)
        better = err < best_err
        best_scale, best_low, best_err = (torch.where(better, a, b) for a, b in ((scale, best_scale),
                                                                                (low, best_low), (err, best_err)))
    return best_scale.half(), best_low.half(), int4_levels(w, best_scale, best_low).to(torch.uint8)


class Int4Linear(QuantizedLinear):
    """Asymmetric int4 weights in blocks of 32 along the input (GGUF's Q4_1; Q4_0 is the case low =
    -8 * scale): w = low + q * scale, q in 0..15, two weights to a byte (a block's byte j: weight j in the
    low nibble, j + 16 in the high); scale and low in float16 per block."""

    kind = "int4"

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None = None, *, packed=None, scale=None,
                 low=None):
        super().__init__()
        if weight is not None:
            N, K = weight.shape
            if K % BLOCK:
                raise ValueError(f"int4 needs the input size ({K}) to be a multiple of the block size {BLOCK}")
            scale, low, q = fit_int4(weight.float().view(N, K // BLOCK, BLOCK))
            packed = (q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)).reshape(N, K // 2)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_dtype = 2 * packed.shape[1], torch.float32 if weight is None else weight.dtype
        self.kernel = KernelWeight()

    def kernel_tensors(self) -> tuple:
        return self.packed, self.scale, self.low

    def dequantize(self) -> torch.Tensor:
        N, groups = self.scale.shape
        p = self.packed.view(N, groups, -1)
        q = torch.cat([p & 15, p >> 4], dim=-1).float()
        w = q * self.scale.float()[..., None] + self.low.float()[..., None]
        return w.view(N, -1).to(self.out_dtype)


LINEARS = {"float": FloatLinear, "int8": Int8Linear, "int4": Int4Linear}

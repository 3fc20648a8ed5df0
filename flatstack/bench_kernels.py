"""`flatstack bench kernels`: the hot ops one by one, each beside its torch baseline measured in the same
run, and the device's ceilings (matmul FLOP/s in the op's dtype, memory read bandwidth) measured there too.

- attention, soft-capped (Grok's 48 query heads, 8 KV heads, head_dim 128, cap 30): FlexAttention against
  the eager reference, and beside both, SDPA without a cap (the fused path a cap rules out);
- the MoE layer's experts: the grouped GEMMs against the per-expert loop, bf16.

On a CPU at CPU shapes (T = 1,024; `small`: a quick check that it runs), on a GPU at T = 4,096 and 8,192.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flatstack.bench import device_name
from flatstack.ceilings import best_seconds, matmul_flops, memory_bandwidth
from flatstack.kernels import attention, moe


def entry(name: str, shape: dict, flops: float, ours: float, baseline_s: float, peak: float, **extra) -> dict:
    return {"op": name, "shape": shape, "seconds": ours, "baseline_seconds": baseline_s,
            "speedup_over_baseline": baseline_s / ours, "fraction_of_matmul_peak": flops / ours / peak, **extra}


def attention_entry(device: torch.device, T: int, heads: tuple[int, int, int], peak: float) -> dict:
    H, Hkv, D = heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, h, T, D, device=device, dtype=dtype) for h in (H, Hkv, Hkv))
    scale, cap = D**-0.5, 30.0
    with torch.no_grad():
        ours = best_seconds(lambda: attention.flex(q, k, v, scale, cap), device, 3)
        eager = best_seconds(lambda: attention.reference(q, k, v, scale, cap), device, 3)
        sdpa = best_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                   enable_gqa=True), device, 3)
    flops = 4 * H * T * T * D / 2  # causal: half the scores
    return entry("attention, soft cap 30, causal", {"T": T, "heads": H, "kv_heads": Hkv, "head_dim": D,
                                                    "dtype": str(dtype).removeprefix("torch.")},
                 flops, ours, eager, peak, baseline="eager reference", sdpa_without_cap_seconds=sdpa,
                 ratio_to_sdpa_without_cap=sdpa / ours)


def moe_entry(device: torch.device, tokens: int, dims: tuple[int, int, int, int], peak: float) -> dict:
    E, k, D, Fd = dims
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, D, device=device, generator=gen).bfloat16()
    w = [(torch.randn(E, *s, device=device, generator=gen) * 0.02).bfloat16() for s in ((Fd, D), (Fd, D), (D, Fd))]
    weights, experts = torch.randn(tokens, E, device=device, generator=gen).softmax(-1).topk(k, dim=-1)
    weights = weights.bfloat16()
    with torch.no_grad():
        ours = best_seconds(lambda: moe.grouped(x, experts, weights, *w, F.silu), device, 3)
        loop = best_seconds(lambda: moe.reference(x, experts, weights, *w, F.silu), device, 3)
    return entry("MoE experts, grouped GEMMs", {"tokens": tokens, "experts": E, "top_k": k, "d_model": D,
                                                "ffn_dim": Fd, "dtype": "bfloat16"},
                 6 * tokens * k * D * Fd, ours, loop, peak, baseline="per-expert loop")


def bench_kernels(device: str | None = None, small: bool = False) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    peaks = {dtype: matmul_flops(dev, dtype) for dtype in (torch.float32, torch.bfloat16)}
    heads = (8, 2, 64) if small else (48, 8, 128)
    lengths = [256] if small else ([4096, 8192] if gpu else [1024])
    attn_peak = peaks[torch.bfloat16 if gpu else torch.float32]
    ops = [attention_entry(dev, T, heads, attn_peak) for T in lengths]
    ops.append(moe_entry(dev, 256 if small else 4096, (8, 2, 64, 128) if small else (8, 2, 1024, 2048),
                         peaks[torch.bfloat16]))
    return {"benchmark": "kernels", "device": device_name(dev),
            "ceiling": {"matmul_flops_float32": peaks[torch.float32], "matmul_flops_bfloat16": peaks[torch.bfloat16],
                        "memory_read_bandwidth_bytes_per_s": memory_bandwidth(dev)},
            "ops": ops}

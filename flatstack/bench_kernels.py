"""`flatstack bench kernels`: the hot ops one by one, each beside its torch baseline measured in the same
run, and the device's ceilings measured there too (matmul FLOP/s in float32 and bf16, memory read
bandwidth, device-to-device copy bandwidth), as JSON.

- attention, soft-capped (Grok's 48 query heads, 8 KV heads, head_dim 128, cap 30), forward and
  forward+backward: FlexAttention against the eager reference, and beside both, SDPA without a cap (the
  fused path a cap rules out). On the CPU FlexAttention has no backward: that side is reported as
  unavailable, with torch's reason, and no number;
- paged decode attention, one decode step of one layer: `decode_attention` (the C kernel on the CPU, the
  Triton kernel on GPUs) against the gathered torch path, against the memory read bandwidth;
- the MoE layer's experts: the grouped GEMMs against the per-expert loop, bf16;
- RMSNorm: torch.compile of the model's module (the trainer compiles the model body) against the eager
  module, against the copy bandwidth;
- the fused LM head and loss, forward+backward: the chunked `linear_cross_entropy` against full logits
  then F.cross_entropy, with the peak memory of each on GPUs (the CPU has no per-call peak to read).

A side that cannot run (no backward on this device, out of memory) is reported with its reason and null
times, never a made-up number. Shapes: CPU shapes on the CPU, the spec's on GPUs (T = 4,096 and 8,192),
tiny ones with `small` (a quick check that every entry runs).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from flatstack.allocator import keep_freed_memory
from flatstack.bench import device_name
from flatstack.ceilings import copy_bandwidth, matmul_flops, memory_bandwidth, sync
from flatstack.kernels import attention, linear_cross_entropy, moe, native, paged_attention
from flatstack.model import RMSNorm

REPEATS, MAX_REPEATS, BUDGET_S = 3, 50, 1.0  # timed calls per side: at least, at most, seconds to spend
CAP = 30.0
# per device kind: attention lengths and heads (H, Hkv, D); decode (sequences, shortest and longest
# context); MoE (tokens, (experts, top k, d_model, ffn)); RMSNorm (rows, dim); loss (tokens, d, vocab).
# The memory-bound ops are sized past the CPU's 32 MiB L3, or they are timed against the cache rather than
# the memory their ceiling measures: Grok's heads for decode (135 MB of context, where the small model's
# 8 / 2 heads would be 17 MB), 16,384 rows for RMSNorm (4,096 x 1,024 read back at 1.3x the copy ceiling).
SHAPES = {
    "small": {"lengths": [128], "heads": (4, 2, 32), "decode": (4, 16, 64), "moe": (64, (4, 2, 32, 64)),
              "norm": (64, 128), "loss": (64, 32, 512)},
    "cpu": {"lengths": [1024], "heads": (48, 8, 128), "decode": (32, 384, 640), "moe": (4096, (8, 2, 1024, 2048)),
            "norm": (16384, 1024), "loss": (2048, 512, 32768)},
    "cuda": {"lengths": [4096, 8192], "heads": (48, 8, 128), "decode": (64, 512, 4096),
             "moe": (4096, (8, 2, 1024, 2048)), "norm": (8192, 4096), "loss": (8192, 4096, 131072)},
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow and fast else None


def entry(name: str, shape: dict, ours: float | None, baseline_s: float | None, baseline: str, **extra) -> dict:
    return {"op": name, "shape": shape, "seconds": ours, "baseline": baseline, "baseline_seconds": baseline_s,
            "speedup_over_baseline": ratio(baseline_s, ours), **extra}


def fractions(ceiling: str, work: float, per_s: float, ours: float | None, baseline_s: float | None) -> dict:
    """The fraction of a ceiling each side reaches: work (FLOPs or bytes) / seconds / the ceiling."""
    return {f"fraction_of_{ceiling}": work / ours / per_s if ours else None,
            f"baseline_fraction_of_{ceiling}": work / baseline_s / per_s if baseline_s else None}


def best_time(fn, device: torch.device) -> float:
    """Best seconds of fn after a warm-up call (compilation, allocation): at least REPEATS calls, more while
    they fit in BUDGET_S (up to MAX_REPEATS). On a shared machine the best of many short calls is the one
    that ran undisturbed, and a long call is not worth repeating more."""
    fn()
    sync(device)
    best, spent, calls = float("inf"), 0.0, 0
    while calls < REPEATS or (spent < BUDGET_S and calls < MAX_REPEATS):
        t0 = time.perf_counter()
        fn()
        sync(device)
        took = time.perf_counter() - t0
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best


def reasons(ours: str | None, baseline: str | None) -> dict:
    """The reasons a side did not run, under keys present only when it did not."""
    return {k: v for k, v in (("unavailable", ours), ("baseline_unavailable", baseline)) if v}


def attempt(fn, device: torch.device) -> tuple[float | None, str | None]:
    """Best seconds of fn, or None and the reason it cannot run here: torch's own words, so the report
    says why a side is missing rather than carrying a made-up number."""
    try:
        return best_time(fn, device), None
    except (NotImplementedError, torch.OutOfMemoryError) as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def peak_memory(fn, device: torch.device) -> int | None:
    """Bytes allocated above what was live before, at the peak of one call (GPUs; None elsewhere: the
    CPU allocator keeps no per-call peak, and the process's RSS high-water mark is not one)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def attention_calls(device: torch.device, T: int, heads: tuple[int, int, int], backward: bool) -> tuple[dict, dict]:
    """The three sides as callables (forward, or forward and the gradients of q, k, v), and the shape."""
    H, Hkv, D = heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, h, T, D, device=device, generator=gen).to(dtype).requires_grad_(backward)
               for h in (H, Hkv, Hkv))
    scale = D**-0.5
    sides = {"flex": lambda: attention.flex(q, k, v, scale, CAP),
             "reference": lambda: attention.reference(q, k, v, scale, CAP),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)}
    if backward:
        grad_out = torch.randn(q.shape, device=device, generator=gen).to(dtype)
        sides = {name: (lambda f=f: torch.autograd.grad(f(), (q, k, v), grad_out)) for name, f in sides.items()}
    return sides, {"T": T, "heads": H, "kv_heads": Hkv, "head_dim": D, "dtype": dtype_name(dtype)}


def attention_entry(device: torch.device, T: int, heads: tuple[int, int, int], peak: float, backward: bool) -> dict:
    sides, shape = attention_calls(device, T, heads, backward)
    with torch.set_grad_enabled(backward):
        (ours, why), (eager, eager_why), (sdpa, _) = (attempt(sides[s], device) for s in ("flex", "reference", "sdpa"))
    H, _, D = heads
    # causal: half the scores; the forward's two matmuls, and with the backward five more (the scores
    # recomputed, then dV, dP, dQ, dK): 3.5x the forward, FlashAttention's convention
    flops = 4 * H * T * T * D / 2 * (3.5 if backward else 1.0)
    name = "attention" + (" forward+backward" if backward else "") + ", soft cap 30, causal (FlexAttention)"
    return entry(name, shape, ours, eager, "eager reference", flops=flops,
                 **fractions("matmul_peak", flops, peak, ours, eager), sdpa_without_cap_seconds=sdpa,
                 ratio_to_sdpa_without_cap=ratio(sdpa, ours), **reasons(why, eager_why))


def paged_inputs(device: torch.device, sizes: tuple[int, int, int], heads: tuple[int, int, int],
                 dtype: torch.dtype, block_size: int = 16) -> tuple[tuple, torch.Tensor]:
    """A decode step's inputs: contexts of random lengths whose blocks lie scattered over the pool, as a
    pool that has served for a while leaves them (so no kernel gets to read one contiguous range)."""
    seqs, shortest, longest = sizes
    H, Hkv, D = heads
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(shortest, longest + 1, (seqs,), generator=gen)
    counts = [-(-int(n) // block_size) for n in lengths]
    blocks = sum(counts) + seqs  # a few free blocks, as a live pool has
    ids = torch.randperm(blocks, generator=gen)
    tables = torch.zeros(seqs, max(counts), dtype=torch.int64)
    start = 0
    for b, c in enumerate(counts):
        tables[b, :c] = ids[start:start + c]
        start += c
    q = torch.randn(seqs, H, D, generator=gen)
    k_pool, v_pool = (torch.randn(Hkv, blocks, block_size, D, generator=gen) for _ in range(2))
    cast = (q.to(device, dtype), k_pool.to(device, dtype), v_pool.to(device, dtype), tables.to(device),
            lengths.to(device))
    return cast, lengths


def decode_path(q: torch.Tensor, k_pool: torch.Tensor) -> str:
    """Which implementation `decode_attention` picks for these tensors (its own rule)."""
    if q.is_cuda:
        return "Triton kernel (kernels/paged_decode_triton.py)"
    if q.dtype == k_pool.dtype == torch.float32 and native.library() is not None:
        return "C kernel (kernels/paged_attention.c)"
    return "torch gathered path (the C kernel is for float32 with the native library built)"


def paged_decode_entry(device: torch.device, sizes: tuple[int, int, int], heads: tuple[int, int, int],
                       read_bandwidth: float) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args, lengths = paged_inputs(device, sizes, heads, dtype)
    scale = heads[2]**-0.5
    with torch.no_grad():
        ours, why = attempt(lambda: paged_attention.decode_attention(*args, scale, CAP), device)
        base, base_why = attempt(lambda: paged_attention.paged_decode_attention(*args, scale, CAP), device)
    # what a decode step must read: every context's keys and values (the query and output are ~1e-4 of it)
    nbytes = 2 * int(lengths.sum()) * heads[1] * heads[2] * args[1].element_size()
    shape = {"sequences": sizes[0], "context_min": int(lengths.min()), "context_max": int(lengths.max()),
             "context_mean": float(lengths.float().mean()), "heads": heads[0], "kv_heads": heads[1],
             "head_dim": heads[2], "block_size": args[1].shape[2], "softcap": CAP, "dtype": dtype_name(dtype)}
    return entry("paged decode attention, one step of one layer", shape, ours, base,
                 "paged_decode_attention (torch: gathered blocks, matmuls)", path=decode_path(*args[:2]),
                 bytes_read=nbytes, **fractions("memory_read_bandwidth", nbytes, read_bandwidth, ours, base),
                 **reasons(why, base_why))


def moe_entry(device: torch.device, tokens: int, dims: tuple[int, int, int, int], peak: float) -> dict:
    E, k, D, Fd = dims
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, D, device=device, generator=gen).bfloat16()
    w = [(torch.randn(E, *s, device=device, generator=gen) * 0.02).bfloat16() for s in ((Fd, D), (Fd, D), (D, Fd))]
    weights, experts = torch.randn(tokens, E, device=device, generator=gen).softmax(-1).topk(k, dim=-1)
    weights = weights.bfloat16()
    with torch.no_grad():
        ours, why = attempt(lambda: moe.grouped(x, experts, weights, *w, F.silu), device)
        loop, loop_why = attempt(lambda: moe.reference(x, experts, weights, *w, F.silu), device)
    flops = 6 * tokens * k * D * Fd
    return entry("MoE experts, grouped GEMMs", {"tokens": tokens, "experts": E, "top_k": k, "d_model": D,
                                                "ffn_dim": Fd, "dtype": "bfloat16"}, ours, loop, "per-expert loop",
                 flops=flops, **fractions("matmul_peak", flops, peak, ours, loop), **reasons(why, loop_why))


def rmsnorm_entry(device: torch.device, rows: int, dim: int, copy_per_s: float) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    norm = RMSNorm(dim, 1e-5).to(device)
    x = torch.randn(rows, dim, device=device, generator=torch.Generator(device=device).manual_seed(0)).to(dtype)
    # the form the model runs in training: the trainer compiles the model body, so the norm's casts and
    # F.rms_norm fuse into one pass; the eager module makes a pass per cast on bf16
    compiled = torch.compile(norm, dynamic=False)
    out = torch.empty_like(x)
    with torch.no_grad():
        ours, why = attempt(lambda: compiled(x), device)
        eager, eager_why = attempt(lambda: norm(x), device)
        # a copy of the same tensor, timed beside the op: the same roofline as the ceiling's 512 MiB copy,
        # at the op's size and moment (a shared machine's memory speed moves from minute to minute)
        copy, _ = attempt(lambda: out.copy_(x), device)
    nbytes = 2 * x.numel() * x.element_size() + dim * 4  # x read once, y written once, the weight
    shape = {"rows": rows, "dim": dim, "dtype": dtype_name(dtype)}
    return entry("RMSNorm, forward, torch.compile of model.RMSNorm", shape, ours, eager,
                 "eager model.RMSNorm (F.rms_norm in float32, cast back)", bytes_moved=nbytes,
                 **fractions("copy_bandwidth", nbytes, copy_per_s, ours, eager), same_size_copy_seconds=copy,
                 ratio_to_same_size_copy=ratio(copy, ours), **reasons(why, eager_why))


def loss_entry(device: torch.device, sizes: tuple[int, int, int], peak: float) -> dict:
    n, d, vocab = sizes
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, d, device=device, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(vocab, (n,), device=device, generator=gen)

    def run(loss):
        return lambda: torch.autograd.grad(loss(h, w, targets), (h, w))

    ours_fn, base_fn = run(linear_cross_entropy.linear_cross_entropy), run(linear_cross_entropy.reference)
    (ours, why), (base, base_why) = attempt(ours_fn, device), attempt(base_fn, device)
    flops = 6 * n * d * vocab  # logits, then the gradients of h and of the weight: three matmuls
    memory = {} if device.type != "cuda" else {"peak_memory_bytes": peak_memory(ours_fn, device) if ours else None,
                                               "baseline_peak_memory_bytes": peak_memory(base_fn, device)
                                               if base else None}
    shape = {"tokens": n, "d_model": d, "vocab": vocab, "dtype": dtype_name(dtype)}
    return entry("fused linear + cross-entropy, forward+backward (chunked)", shape, ours, base,
                 "full logits, then F.cross_entropy", flops=flops,
                 **fractions("matmul_peak", flops, peak, ours, base), **memory, **reasons(why, base_why))


def bench_kernels(device: str | None = None, small: bool = False) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    # as the trainer and the engine do: else every CPU output over a few MiB is a fresh mmap, and each call
    # of a memory-bound op is timed page-faulting its output in (RMSNorm: 4x slower), not running
    keep_freed_memory()
    s = SHAPES["small" if small else dev.type if dev.type in SHAPES else "cpu"]
    # small: a check that it runs, not a figure. Otherwise 20 tries at each ceiling, not 5: a ceiling is a
    # best case, and on a shared machine the best of a few may be one that was disturbed
    n, nbytes, tries = (256, 32 << 20, 3) if small else (None, None, 20)
    peaks = {dtype: matmul_flops(dev, dtype, n, tries) for dtype in (torch.float32, torch.bfloat16)}
    ceiling = {"matmul_flops_float32": peaks[torch.float32], "matmul_flops_bfloat16": peaks[torch.bfloat16],
               "memory_read_bandwidth_bytes_per_s": memory_bandwidth(dev, nbytes or 512 << 20, tries),
               "copy_bandwidth_bytes_per_s": copy_bandwidth(dev, nbytes, tries)}
    act_peak = peaks[torch.bfloat16 if gpu else torch.float32]  # the dtype the non-MoE ops run in here
    ops = [attention_entry(dev, T, s["heads"], act_peak, backward) for backward in (False, True)
           for T in s["lengths"]]
    ops.append(paged_decode_entry(dev, s["decode"], s["heads"], ceiling["memory_read_bandwidth_bytes_per_s"]))
    ops.append(moe_entry(dev, *s["moe"], peaks[torch.bfloat16]))
    ops.append(rmsnorm_entry(dev, *s["norm"], ceiling["copy_bandwidth_bytes_per_s"]))
    ops.append(loss_entry(dev, s["loss"], act_peak))
    return {"benchmark": "kernels", "device": device_name(dev), "ceiling": ceiling, "ops": ops}

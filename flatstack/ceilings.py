"""The ceilings of the machine this runs on, measured rather than looked up: matmul FLOP/s in a dtype,
which training and batched inference report MFU against, and memory read bandwidth, the roofline of
decoding.

Its own module because both the trainer and the benchmarks need it, and the benchmarks import the trainer.
"""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocation, kernel selection
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                 repeats: int = 5) -> float:
    """Best observed FLOP/s of an n x n x n matmul (n = 2048 on CPUs, 8192 on GPUs)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, device, repeats)


def memory_bandwidth(device: str | torch.device = "cpu", nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Best observed bytes/s of reading a buffer far larger than the caches (a float32 sum over 512 MiB):
    decoding is a read of every weight per token, so a read is the ceiling it is measured against."""
    device = torch.device(device)
    x = torch.ones(nbytes // 4, device=device)
    return nbytes / best_seconds(lambda: x.sum(), device, repeats)

"""The ceilings of the machine this runs on, measured rather than looked up: matmul FLOP/s in a dtype,
which training and batched inference report MFU against; memory read bandwidth, the roofline of
decoding; and copy bandwidth (read plus write), the roofline of a norm.

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


# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's data sheets, by what torch.cuda.get_device_name
# says: MFU against the card's own number, beside the matmul rate measured in the same run.
CARD_BF16_PEAKS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12}


def card_bf16_peak(name: str) -> float | None:
    """The data-sheet peak of the first card in CARD_BF16_PEAKS whose name is in `name` (None if unknown)."""
    return next((peak for card, peak in CARD_BF16_PEAKS.items() if card in name), None)


def copy_bandwidth(device: str | torch.device = "cpu", nbytes: int | None = None, repeats: int = 5) -> float:
    """Best observed bytes/s of a device-to-device copy (bytes read plus bytes written) of a buffer far larger
    than the caches (512 MiB on CPUs, 2 GiB on GPUs, where a smaller copy is over before the timer's own cost
    stops mattering): the ceiling of an op that reads its input once and writes its output once, a norm."""
    device = torch.device(device)
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (512 << 20))
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_seconds(lambda: dst.copy_(src), device, repeats)

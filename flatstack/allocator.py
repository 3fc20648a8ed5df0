"""The process's memory allocator, tuned for a loop that allocates the same large tensors every step."""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS. By default every tensor above a few
    MiB is a fresh mmap, so each step page-faults its activations, logits and gradients in again (a
    large share of a CPU training or batched decode step). Training and inference reuse the same sizes
    every step, so the process keeps the memory instead, as jemalloc or tcmalloc would. No-op off
    glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: do not shrink the heap when blocks are freed
    except (OSError, AttributeError):
        pass

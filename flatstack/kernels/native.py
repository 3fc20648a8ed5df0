"""The C kernels beside this file, built on first use with the machine's C compiler (the one TorchInductor
needs anyway on CPUs) for this CPU's instruction set into one library, cached by sources, flags and CPU,
and called through ctypes:
- int8_rows.c: the int8 products that run outside a compiled graph: the LM head of every decode step,
  and every linear under `--enforce-eager`. Inside the compiled decode blocks the products stay
  TorchInductor reductions, fused with the ops around them (a call out of the graph costs more than it
  saves there).
- paged_attention.c: decode attention through block tables for the decode steps that run eagerly (more
  than FEW_ROWS sequences), reading each context where it lies in the pool instead of a gathered copy.
Where no compiler works, `library()` is None and callers keep their torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("int8_rows.c", "paged_attention.c")]
HEADERS = [Path(__file__).with_name("vec.h")]
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC"]


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "flatstack" / "kernels"


def cpu_signature() -> str:
    """What -march=native compiles for: the CPU's feature flags (a cached build is not reused on another)."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def build(out: Path) -> None:
    compilers = [c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)]
    if not compilers:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    errors = []
    # OpenMP threads: the library then shares the OpenMP runtime torch has already loaded
    for compiler in compilers:
        for openmp in (["-fopenmp"], []):
            cmd = [compiler, "-x", "c", *map(str, SOURCES), *FLAGS, *openmp, "-lm", "-o", str(out)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode == 0:
                return
            errors.append(f"{' '.join(cmd)}: {result.stderr.strip()[-400:]}")
    raise RuntimeError("could not build the C kernels:\n" + "\n".join(errors))


@functools.cache
def library() -> ctypes.CDLL | None:
    sources = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(sources + " ".join(FLAGS).encode() + cpu_signature().encode()).hexdigest()[:16]
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"kernels-{key}.so"
        if not path.exists():
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, then renamed in: atomic
                built = Path(tmp) / path.name
                build(built)
                os.replace(built, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"the C kernels are unavailable, using the torch paths: {e}", stacklevel=2)
        return None
    lib.int8_rows.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.int8_rows.restype = None
    lib.paged_decode.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float] * 2
                                 + [ctypes.c_int64] * 2)
    lib.paged_decode.restype = None
    return lib


def int8_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32, q [N, K] int8, scale [N] float32 -> [M, N] float32 (the C kernel)."""
    lib = library()
    assert lib is not None, "int8_rows called without the native library"
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    y = torch.empty(x.shape[0], q.shape[0], dtype=torch.float32)
    lib.int8_rows(x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), x.shape[0], q.shape[0], q.shape[1])
    return y


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                 lengths: torch.Tensor, scale: float, softcap: float | None = None,
                 window: int | None = None, temperature_len: int | None = None) -> torch.Tensor:
    """`paged_decode_attention` (kernels/paged_attention.py) for float32 CPU pools: the C kernel."""
    lib = library()
    assert lib is not None, "paged_decode called without the native library"
    B, H, D = q.shape
    Hkv, num_blocks, bs, _ = k_pool.shape
    # the C loop indexes raw memory: contiguous float32 pools, int64 tables (no-ops for the engine's own)
    q, k_pool, v_pool = q.contiguous(), k_pool.contiguous(), v_pool.contiguous()
    tables, lengths = block_tables.long().contiguous(), lengths.long().contiguous()
    out = torch.empty_like(q)
    lib.paged_decode(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), tables.data_ptr(), lengths.data_ptr(),
                     out.data_ptr(), B, H, Hkv, D, num_blocks, bs, tables.shape[1], scale, softcap or 0.0, window or 0,
                     temperature_len or 0)
    return out

"""The C kernels beside this file, built on first use with the machine's C compiler (the one TorchInductor
needs anyway on CPUs) for this CPU's instruction set into one library, cached by sources, flags and CPU,
and called through ctypes:
- linear_rows.c: the products of 1 to 64 rows with float32, bfloat16, int8 or int4 weights (the decode
  steps' products and LM head), quantised ones against activations quantised on the fly (AVX-512 VNNI);
- paged_attention.c: decode attention through block tables, reading each context where it lies in the
  pool instead of a gathered copy;
- decode_step.c: a whole decode step through a dense model's blocks in one call (engine/native_decode.py).
Where no compiler works, `library()` is None and callers keep their torch paths; where the CPU lacks
AVX-512 VNNI the kernels are plain loops (correct, slower), with one warning.
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

SOURCES = [Path(__file__).with_name(name) for name in ("linear_rows.c", "paged_attention.c", "decode_step.c")]
HEADERS = [Path(__file__).with_name(name) for name in ("vec.h", "linear_rows.h")]
FORMATS = {"float32": 0, "bfloat16": 1, "int8": 2, "int4": 3}


class Linear(ctypes.Structure):
    """linear_rows.h's Linear: a weight as the kernels read it (its tensors are kept alive by the caller)."""

    _fields_ = [("format", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("w", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("low", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


def describe(kind: str, w: torch.Tensor, scale=None, low=None, bias=None) -> Linear:
    """The Linear struct of a weight [n, k] (int4: packed [n, k / 2]); every tensor must stay alive and
    contiguous while the struct is used."""
    k = w.shape[1] * (2 if kind == "int4" else 1)
    return Linear(FORMATS[kind], w.shape[0], k, w.data_ptr(), address(scale), address(low), address(bias))


def address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
FLAGS = ["-O3", "-ffp-contract=fast", "-shared", "-fPIC"]


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


def build(out: Path, march: str = "native") -> None:
    """The library for `march` (this CPU's instruction set by default) at `out`."""
    compilers = [c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)]
    if not compilers:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    errors = []
    # OpenMP threads: the library then shares the OpenMP runtime torch has already loaded
    for compiler in compilers:
        for openmp in (["-fopenmp"], []):
            cmd = [compiler, "-x", "c", *map(str, SOURCES), *FLAGS, f"-march={march}", *openmp, "-lm", "-o", str(out)]
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
        lib = load(path)
    except (OSError, RuntimeError) as e:
        warnings.warn(f"the C kernels are unavailable, using the torch paths: {e}", stacklevel=2)
        return None
    if not lib.linear_rows_vectorised():
        warnings.warn("this CPU lacks AVX-512 VNNI (or the compiler does): the C kernels run as plain loops, "
                      "correct but slower", stacklevel=2)
    return lib


def load(path: Path) -> ctypes.CDLL:
    """A built library, its functions' C signatures declared."""
    lib = ctypes.CDLL(str(path))
    lib.linear_rows.argtypes = [ctypes.POINTER(Linear), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.linear_rows.restype = None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.decode_step.argtypes = [pointer, pointer, size, pointer, pointer, pointer, pointer, size, pointer, pointer,
                                 size, pointer]
    lib.decode_step.restype = None
    lib.paged_decode.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float] * 2
                                 + [ctypes.c_int64] * 3)
    lib.paged_decode.restype = None
    return lib


def linear_rows(weight: Linear, x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, k] float32 times the weight `describe` gave -> [M, n] float32 (the C kernel; of `lib` if given)."""
    lib = lib or library()
    assert lib is not None, "linear_rows called without the native library"
    x = x.contiguous()
    y = torch.empty(x.shape[0], weight.n, dtype=torch.float32)
    lib.linear_rows(ctypes.byref(weight), x.data_ptr(), y.data_ptr(), x.shape[0])
    return y


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                 lengths: torch.Tensor, scale: float, softcap: float | None = None,
                 window: int | None = None, temperature_len: int | None = None) -> torch.Tensor:
    """`paged_decode_attention` (kernels/paged_attention.py) for float32 or bfloat16 CPU pools: the C
    kernel, in float32 (q's dtype out)."""
    lib = library()
    assert lib is not None, "paged_decode called without the native library"
    B, H, D = q.shape
    Hkv, num_blocks, bs, _ = k_pool.shape
    assert k_pool.dtype == v_pool.dtype and k_pool.dtype in (torch.float32, torch.bfloat16), k_pool.dtype
    # the C loop indexes raw memory: contiguous pools, int64 tables (no-ops for the engine's own)
    x, k_pool, v_pool = q.float().contiguous(), k_pool.contiguous(), v_pool.contiguous()
    tables, lengths = block_tables.long().contiguous(), lengths.long().contiguous()
    out = torch.empty_like(x)
    lib.paged_decode(x.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), tables.data_ptr(), lengths.data_ptr(),
                     out.data_ptr(), B, H, Hkv, D, num_blocks, bs, tables.shape[1], scale, softcap or 0.0, window or 0,
                     temperature_len or 0, k_pool.dtype == torch.bfloat16)
    return out.to(q.dtype)

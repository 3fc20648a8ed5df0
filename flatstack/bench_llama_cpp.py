"""llama.cpp beside `flatstack bench decode --llama-cpp`, at the precision flatstack runs: float32 weights
against an F32 GGUF file, bfloat16 against BF16, int8 against Q8_0, int4 against Q4_1 (or Q4_0, when the
source is stored so).

llama-cpp-python is a benchmark-only dependency (the `bench` extra) and nothing here imports it: llama.cpp
runs in processes of their own, the decode (two OpenMP-style thread pools in one process would compete
for the cores) and the re-save of the source file at another precision (llama_model_quantize), which is
written once into a cache and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

# kept equal to pyproject.toml's `bench` extra (tests/test_bench_logic.py): the version this was built with
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# this CPU's AVX-512 without -march=native, which would also build the AMX kernels
NO_AMX = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
          "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON")

# llama.h's llama_ftype values, which GGUF files store as general.file_type, for each flatstack weight
# format, preferred first. flatstack's int8 is Q8_0's layout (blocks of 32, a float16 scale each) and its
# int4 Q4_1's (a float16 scale and minimum a block); Q4_0 (a scale, no minimum) loads as int4 too.
LLAMA_FTYPES = {"float": {"ALL_F32": 0}, "bfloat16": {"MOSTLY_BF16": 32}, "int8": {"MOSTLY_Q8_0": 7},
                "int4": {"MOSTLY_Q4_1": 3, "MOSTLY_Q4_0": 2}}
UNQUANTISED = {0, 1, 32}  # ALL_F32, MOSTLY_F16, MOSTLY_BF16: a re-save from these loses nothing to dequantising
GUESSED = 1024  # llama.h's LLAMA_FTYPE_GUESSED, a flag on the type


def require_llama_cpp(model_path: str, device: str | None) -> None:
    """--llama-cpp's preconditions, checked before the model loads."""
    if not model_path.endswith(".gguf"):
        raise ValueError(f"--llama-cpp needs a .gguf file; got {model_path}")
    if device and torch.device(device).type != "cpu":
        raise ValueError("--llama-cpp compares on the CPU (llama-cpp-python's default build): drop --device")
    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError(f"--llama-cpp needs llama-cpp-python, a benchmark-only dependency: pip install -e '.[bench]' "
                         f"(or pip install {LLAMA_CPP_PYTHON}; it compiles llama.cpp, a few minutes)")


def llama_cpp_ftype(weights: str, source_ftype: int | None) -> tuple[str, int, bool]:
    """The llama.cpp file type to set beside flatstack's `weights` ("float", "bfloat16", "int8", "int4"), its
    value, and whether the source file already is of it (then it runs as stored)."""
    accepted = LLAMA_FTYPES[weights]
    stored = None if source_ftype is None else source_ftype & ~GUESSED
    for name, value in accepted.items():
        if value == stored:
            return name, value, True
    name, value = next(iter(accepted.items()))
    return name, value, False


def ftype_name(value: int | None) -> str:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(value & ~GUESSED).name
    except (TypeError, ValueError):
        return f"unknown ({value})"


def gguf_cache_path(source: Path, ftype: str, cache_dir: Path | None = None) -> Path:
    """Where the re-save of `source` as `ftype` is kept. The name carries a digest of the source's path,
    size and modification time, so a source that changed, or another file of the same name, is re-saved
    rather than compared against a stale file."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flatstack" / "gguf"
    return root / f"{source.name.removesuffix('.gguf')}-{key}-{ftype}.gguf"


def gguf_weight_bytes(tensors: dict[str, int]) -> int:
    """Bytes of weights one llama.cpp decode step reads, from a GGUF file's tensor sizes: every tensor once,
    but of the token embedding only a row (left out) when the file has an output matrix of its own;
    without one, the embedding is also the LM head and is read whole."""
    return sum(n for name, n in tensors.items() if name != "token_embd.weight" or "output.weight" not in tensors)


def gguf_summary(path: Path) -> tuple[int | None, dict[str, int], dict[str, int]]:
    """A GGUF file's general.file_type, its tensors' bytes by name and how many tensors of each type."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields.get("general.file_type")
    ftype = int(field.parts[field.data[0]][0]) if field is not None else None
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return ftype, {t.name: int(t.n_bytes) for t in reader.tensors}, dict(sorted(types.items()))


LLAMA_CPP_QUANTIZE = """
import ctypes, json, sys
import llama_cpp
source, out, ftype, value, threads = json.loads(sys.argv[1])
if getattr(llama_cpp, "LLAMA_FTYPE_" + ftype, None) != value:
    sys.exit(f"llama-cpp-python {llama_cpp.__version__} has no LLAMA_FTYPE_{ftype} = {value}")
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = value, threads
params.allow_requantize = True  # a quantised source: each tensor dequantised to float32, then written as ftype
if llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)) != 0:
    sys.exit(f"llama_model_quantize({source} -> {ftype}) failed")
"""


def resave_gguf(source: Path, out: Path, ftype: str, value: int) -> None:
    """llama_model_quantize(source, out as ftype) in a process of its own, written beside `out` and renamed
    into place, so an interrupted re-save leaves no file the next run would take for a whole one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        args = json.dumps([str(source), str(tmp), ftype, value, torch.get_num_threads()])
        run = subprocess.run([sys.executable, "-c", LLAMA_CPP_QUANTIZE, args], capture_output=True, text=True)
        if run.returncode != 0:
            raise ChildProcessError(f"re-saving {source} as {ftype} failed (exit {run.returncode}): "
                                    f"{run.stderr.strip()[-600:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def llama_cpp_gguf(source: str, weights: str, model, context: float, cache_dir: Path | None = None) -> dict:
    """The GGUF file llama.cpp runs beside flatstack's `weights`: the source as stored when it is of the
    matching type, else its re-save as that type (made once, then taken from the cache), with the bytes
    a token reads from it (its weights, and float32 keys and values at `context`, as `model` has them)."""
    from flatstack.engine import kv_bytes_per_token

    src = Path(source)
    stored, _, _ = gguf_summary(src)
    name, value, as_stored = llama_cpp_ftype(weights, stored)
    path = src if as_stored else gguf_cache_path(src, name, cache_dir)
    if not path.exists():
        resave_gguf(src, path, name, value)
    _, tensors, types = gguf_summary(path)
    if as_stored:
        note = "the source file as stored"
    else:
        note = f"re-saved by llama_model_quantize from the {ftype_name(stored)} source"
        if stored is None or stored & ~GUESSED not in UNQUANTISED:
            note += (": its values are the source's, dequantised (and quantised again for a quantised type), "
                     "as flatstack loads them from the same source")
    weight_bytes = gguf_weight_bytes(tensors)
    return {"path": str(path), "ftype": name, "source_ftype": ftype_name(stored), "note": note,
            "tensor_types": types, "weight_bytes": weight_bytes,
            "bytes_per_token": int(weight_bytes + context * kv_bytes_per_token(model, torch.float32))}


LLAMA_CPP_DECODE = """
import json, sys, time
from llama_cpp import GGML_TYPE_F32, Llama
path, prompt, max_tokens, threads = json.loads(sys.argv[1])
# keys and values in float32, as flatstack's CPU cache holds them (llama.cpp's default is float16)
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + max_tokens,
            n_batch=len(prompt), type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
def run():
    t0, stamps = time.perf_counter(), []
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == max_tokens:
            break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), stamps[0] - t0
run()  # warm-up
print(json.dumps(run()))
"""


def llama_cpp_decode(gguf: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """Greedy decode tokens/s and time to first token of llama.cpp on a GGUF file with as many threads as
    torch uses, in a process of its own, after a warm-up."""
    args = json.dumps([gguf, prompt, max_tokens, torch.get_num_threads()])
    out = subprocess.run([sys.executable, "-c", LLAMA_CPP_DECODE, args], capture_output=True, text=True)
    if out.returncode != 0:
        # llama.cpp built for this CPU takes its AMX kernels for quantised files where the CPU has AMX,
        # and those crash on some machines (a segfault in ggml_backend_amx_mul_mat)
        hint = (f"; on a CPU with AMX, rebuild llama.cpp without it: CMAKE_ARGS=\"{NO_AMX}\" pip install "
                f"--force-reinstall --no-deps --no-cache-dir {LLAMA_CPP_PYTHON}") if out.returncode == -11 else ""
        stderr = out.stderr.strip()[-600:]
        raise ChildProcessError(f"llama.cpp failed on {gguf} (exit {out.returncode}): {stderr}{hint}")
    tokens_per_s, first = json.loads(out.stdout.strip().splitlines()[-1])
    return tokens_per_s, first


def llama_cpp_report(gguf: dict, runs: list[dict], ours: list[dict]) -> dict:
    """llama.cpp's section of the decode report: its runs, each against the bandwidth measured around it and
    the bytes of its own file; its median run; flatstack's tokens/s over its, run by run and the median of
    those ratios (each pair ran a minute apart, the two medians' runs may not have)."""
    from importlib.metadata import version

    median = sorted(runs, key=lambda r: r["fraction_of_roofline"])[(len(runs) - 1) // 2]
    ratios = [a["decode_tokens_per_s"] / b["decode_tokens_per_s"] for a, b in zip(ours, runs, strict=True)]
    name = (f"llama.cpp (llama-cpp-python {version('llama-cpp-python')}), {gguf['ftype']} GGUF "
            f"({gguf['note']}), float32 KV cache, {torch.get_num_threads()} threads")
    return {"llama_cpp": {"name": name, "gguf": gguf, "decode_tokens_per_s": median["decode_tokens_per_s"],
                          "fraction_of_roofline": median["fraction_of_roofline"], "runs": runs},
            "ratio_to_llama_cpp": statistics.median(ratios), "ratios_to_llama_cpp_per_run": ratios}

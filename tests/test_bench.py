"""The benchmark harness runs and reports what it must (it asserts no timing: timings are for benchmarks)."""

import pytest

from flatstack.bench_train import bench_train


def test_bench_train_reports_ceiling_baseline_and_ratio():
    report = bench_train(small=True, batch=2, warmup=1, steps=1, compile=False, device="cpu")
    assert report["ceiling"]["matmul_flops"] > 0 and report["ceiling"]["dtype"] == "float32"
    assert [r["model"] for r in report["results"]] == ["dense", "moe"]
    for r in report["results"]:
        for side in ("baseline", "flatstack"):
            assert r[side]["tokens_per_s"] > 0 and 0 < r[side]["mfu"] and r[side]["peak_memory_bytes"] > 0
        assert r["speedup"] == pytest.approx(r["flatstack"]["tokens_per_s"] / r["baseline"]["tokens_per_s"])


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random Llama saved by transformers, with a byte-level tokenizer: both sides load it."""
    transformers = pytest.importorskip("transformers")
    from flatstack.tokenizer import byte_tokenizer

    folder = tmp_path_factory.mktemp("hf")
    tok = byte_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_bench_decode_reports_roofline_baseline_and_ratio(hf_llama):
    from flatstack.bench import bench_decode

    r = bench_decode(str(hf_llama), prompt_tokens=16, max_tokens=8, repeats=3)
    assert r["ceiling"]["memory_read_bandwidth_bytes_per_s"] > 0 and r["bytes_per_token"] > 0
    runs = r["flatstack"]["runs"]
    assert len(runs) == 3  # the summary is the run with the median fraction, each against its own bandwidth
    assert sorted(x["fraction_of_roofline"] for x in runs)[1] == r["flatstack"]["fraction_of_roofline"]
    for x in runs + [r["baseline"]]:
        assert x["fraction_of_roofline"] == pytest.approx(
            x["decode_tokens_per_s"] * r["bytes_per_token"] / x["memory_read_bandwidth_bytes_per_s"])
    assert r["roofline_tokens_per_s"] == pytest.approx(r["ceiling"]["memory_read_bandwidth_bytes_per_s"]
                                                       / r["bytes_per_token"])
    for side in ("flatstack", "baseline"):
        assert r[side]["decode_tokens_per_s"] > 0 and r[side]["fraction_of_roofline"] > 0
    assert r["ratio"] == pytest.approx(r["flatstack"]["decode_tokens_per_s"] / r["baseline"]["decode_tokens_per_s"])
    assert r["flatstack"]["warm_up_s"] > 0


def test_bench_throughput_reports_mfu_baseline_and_ratio(hf_llama):
    from flatstack.bench import bench_throughput

    r = bench_throughput(str(hf_llama), num_requests=6, prompt_range=(4, 12), output_range=(2, 6), baseline_batch=4)
    assert 6 * 2 <= r["output_tokens"] <= 6 * 6
    assert r["flatstack"]["mfu"] > 0 and r["baseline"]["mfu"] > 0
    assert r["ratio"] == pytest.approx(r["baseline"]["seconds"] / r["flatstack"]["seconds"])


def test_bench_decode_names_bad_options(hf_llama, capsys):
    from flatstack.cli import main

    assert main(["bench", "decode", "--model", str(hf_llama), "--repeats", "0"]) == 1
    assert "--repeats must be at least 1; got 0" in capsys.readouterr().err
    assert main(["bench", "decode", "--model", str(hf_llama), "--llama-cpp"]) == 1
    assert f"--llama-cpp needs a .gguf file; got {hf_llama}" in capsys.readouterr().err


def test_bench_kernels_reports_ceilings_baselines_and_ratios():
    import math

    from flatstack.bench_kernels import bench_kernels

    report = bench_kernels("cpu", small=True)
    assert set(report["ceiling"]) == {"matmul_flops_float32", "matmul_flops_bfloat16",
                                      "memory_read_bandwidth_bytes_per_s", "copy_bandwidth_bytes_per_s"}
    assert all(math.isfinite(v) and v > 0 for v in report["ceiling"].values())
    ops = {op["op"].split(",")[0]: op for op in report["ops"]}
    assert list(ops) == ["attention", "attention forward+backward", "paged decode attention", "MoE experts",
                         "RMSNorm", "fused linear + cross-entropy"]
    for op in report["ops"]:
        assert op["baseline"] and math.isfinite(op["baseline_seconds"]) and op["baseline_seconds"] > 0
        fractions = [v for k, v in op.items() if "fraction_of" in k and v is not None]
        assert fractions and all(math.isfinite(v) and v > 0 for v in fractions)
        if op["seconds"] is None:  # a side that cannot run here says why, and carries no number
            assert op["unavailable"] and op["speedup_over_baseline"] is None
        else:
            assert math.isfinite(op["seconds"]) and op["seconds"] > 0 and "unavailable" not in op
            assert op["speedup_over_baseline"] == op["baseline_seconds"] / op["seconds"]
    # the CPU's FlexAttention has no backward: the eager reference and SDPA are measured, flex is not
    backward = ops["attention forward+backward"]
    assert backward["seconds"] is None and "backward" in backward["unavailable"]
    assert backward["sdpa_without_cap_seconds"] > 0 and backward["flops"] == 3.5 * ops["attention"]["flops"]
    assert ops["paged decode attention"]["bytes_read"] > 0 and ops["paged decode attention"]["path"]
    assert ops["RMSNorm"]["bytes_moved"] > 0
    assert "peak_memory_bytes" not in ops["fused linear + cross-entropy"]  # no honest per-call peak on the CPU

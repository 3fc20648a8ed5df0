"""The benchmark harness runs and reports what it must (it asserts no timing: timings are for benchmarks)."""

import pytest

from flatstack.bench import bench_train


def test_bench_train_reports_ceiling_baseline_and_ratio():
    report = bench_train(small=True, batch=2, warmup=1, steps=1, compile=False, device="cpu")
    assert report["ceiling"]["matmul_flops"] > 0 and report["ceiling"]["dtype"] == "float32"
    assert [r["model"] for r in report["results"]] == ["dense", "moe"]
    for r in report["results"]:
        for side in ("baseline", "flatstack"):
            assert r[side]["tokens_per_s"] > 0 and 0 < r[side]["mfu"] and r[side]["peak_memory_bytes"] > 0
        assert r["speedup"] == pytest.approx(r["flatstack"]["tokens_per_s"] / r["baseline"]["tokens_per_s"])

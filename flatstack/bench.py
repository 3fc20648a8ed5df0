"""Benchmarks. Each prints JSON with the ceiling of the machine it ran on (measured in the same run), a
baseline measured in the same run, and the ratio.

`flatstack bench decode MODEL`: batch-1 decode tokens/s against the memory-bandwidth roofline (bytes
each token reads over the measured read bandwidth), beside Hugging Face transformers' `generate`, and with
`--llama-cpp` beside llama.cpp at the same precision (bench_llama_cpp.py).

`flatstack bench throughput MODEL`: an offline batch of requests with random prompt and output lengths
(ignore EOS), total output tokens/s and MFU, beside transformers' batched `generate` on the same requests.

`flatstack bench train`: bench_train.py; `flatstack bench serve`: bench_serve.py; `flatstack bench kernels`:
bench_kernels.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from flatstack.ceilings import matmul_flops, memory_bandwidth, sync
from flatstack.checkpoint import detect_format
from flatstack.model import Transformer


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


CPU = torch.device("cpu")


def hf_reference(path: str, dtype: torch.dtype, device: torch.device = CPU):
    """The same model in Hugging Face transformers: a .gguf file (dequantised by transformers) or an HF
    folder. A native flatstack checkpoint has no transformers twin, so the baseline needs one of those."""
    import transformers

    p, kind = Path(path), detect_format(path)
    if kind == "gguf":
        hf = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
        return hf.to(device).eval()
    if kind == "hf":
        return transformers.AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval()
    raise ValueError(f"{path}: the transformers baseline needs a .gguf file or a Hugging Face folder")


def bytes_per_decode_token(model: Transformer, head: torch.nn.Module | None, context: float) -> int:
    """Weight bytes one decode step reads (every matrix once; of the embedding table, one row unless it
    is also the LM head; `head` is the engine's own LM head, if it has one) plus the keys and values of
    `context` cached positions."""
    from flatstack.engine import kv_bytes_per_token

    skip = {"tok_embeddings.weight"} if (head is not None or not model.cfg.tied_embeddings) else set()
    if head is not None:
        skip.add("output.weight")
    weights = sum(t.nbytes for name, t in model.state_dict().items() if name not in skip)
    if head is not None:
        weights += sum(t.nbytes for t in head.state_dict().values())
    return int(weights + context * kv_bytes_per_token(model, model.tok_embeddings.weight.dtype))


def random_prompt(vocab_size: int, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(min(100, vocab_size - 1), vocab_size, (n,), generator=gen).tolist()


def transformers_decode(model_path: str, prompt: list[int], max_tokens: int,
                        device: torch.device = CPU) -> tuple[float, float]:
    """Greedy decode tokens/s and time to first token of transformers' `generate` on the same model (float32
    on the CPU, bf16 on a GPU), after a warm-up; the first token is timed on its own and taken out of the
    decode rate."""
    hf = hf_reference(model_path, float_dtype(device), device)
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)

    def timed(**kw) -> float:
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
        sync(device)
        return time.perf_counter() - t0

    with torch.no_grad():
        hf.generate(ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=8, do_sample=False)  # warm-up
        first = timed(max_new_tokens=1)
        total = timed(max_new_tokens=max_tokens, min_new_tokens=max_tokens)
    return (max_tokens - 1) / (total - first), first


def float_dtype(device: torch.device) -> torch.dtype:
    """What the benchmarks run in: float32 on the CPU, bf16 on a GPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def measured_run(decode, per_token: int, dev: torch.device) -> dict:
    """One decode run between two read-bandwidth measurements, the higher of which is its ceiling: on a
    shared machine the bandwidth moves by more than half from minute to minute, and a ceiling measured at
    another moment than the run would make its fraction mean nothing."""
    before = memory_bandwidth(dev)
    tokens_per_s, first = decode()
    bandwidth = max(before, memory_bandwidth(dev))
    return {"decode_tokens_per_s": tokens_per_s, "fraction_of_roofline": tokens_per_s * per_token / bandwidth,
            "memory_read_bandwidth_bytes_per_s": bandwidth, "time_to_first_token_s": first}


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["fraction_of_roofline"])[(len(runs) - 1) // 2]


def engine_decode(llm, prompt: list[int], max_tokens: int):
    """The timed decode of `prompt` through the engine, after its warm-up: the decode graphs compiled (if
    the engine compiles any) and one untimed request of the same length, another prompt (so the timed one
    finds no cached prefix the first time), through whatever builds or compiles on a first request (the C
    kernels, a prefill shape); and the seconds that took."""
    from flatstack.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.warm_up(wait=True)
    other = random_prompt(llm.model.cfg.vocab_size, len(prompt), 1)
    for _ in llm.stream(other, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)):
        pass
    warm_up_s = time.perf_counter() - t0

    def ours():
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in llm.stream(prompt, params)]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), stamps[0] - t0

    return ours, warm_up_s


def bench_decode(model_path: str, prompt_tokens: int = 128, max_tokens: int = 128, quantize: str | None = None,
                 baseline: bool = True, repeats: int = 3, llama_cpp: bool = False, device: str | None = None,
                 dtype: str | None = None) -> dict:
    """Batch-1 decode after warm-up, `repeats` times, each run against the bandwidth measured around it
    (measured_run); the summary is the run with the median fraction, all are listed. With `llama_cpp`,
    llama.cpp runs between flatstack's runs, so each pair meets the same moment of the machine, on a GGUF
    file of the same precision (bench_llama_cpp.llama_cpp_gguf)."""
    from flatstack import bench_llama_cpp
    from flatstack.engine import LLM

    dev = torch.device(device or "cpu")
    llm = LLM(model_path, quantize=quantize, kv_cache_memory=256 << 20, device=str(dev),
              dtype="bfloat16" if dev.type == "cuda" else dtype)  # the CPU: as stored, or `dtype`
    model = llm.model
    prompt = random_prompt(model.cfg.vocab_size, prompt_tokens, 0)
    context = prompt_tokens + max_tokens / 2
    per_token = bytes_per_decode_token(model, llm.runner.head, context)
    ours, warm_up_s = engine_decode(llm, prompt, max_tokens)
    weights = quantize or ("bfloat16" if model.tok_embeddings.weight.dtype == torch.bfloat16 else "float")
    gguf = bench_llama_cpp.llama_cpp_gguf(model_path, weights, model, context) if llama_cpp else None
    runs, theirs = [], []
    for _ in range(repeats):
        runs.append(measured_run(ours, per_token, dev))
        if gguf:
            decode = lambda: bench_llama_cpp.llama_cpp_decode(gguf["path"], prompt, max_tokens)  # noqa: E731
            theirs.append(measured_run(decode, gguf["bytes_per_token"], dev))
    median = median_run(runs)
    bandwidth = median["memory_read_bandwidth_bytes_per_s"]
    report = {
        "benchmark": "decode", "device": device_name(dev), "model": model_path,
        "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        "weights": weights,
        "prompt_tokens": prompt_tokens, "new_tokens": max_tokens,
        "ceiling": {"memory_read_bandwidth_bytes_per_s": bandwidth},
        "bytes_per_token": per_token,
        "roofline_tokens_per_s": bandwidth / per_token,
        "flatstack": {"decode_tokens_per_s": median["decode_tokens_per_s"],
                      "fraction_of_roofline": median["fraction_of_roofline"],
                      "time_to_first_token_s": runs[0]["time_to_first_token_s"],
                      "warm_up_s": warm_up_s,  # compiling the decode graphs and a first request
                      "runs": runs},
    }
    if baseline:
        run = measured_run(lambda: transformers_decode(model_path, prompt, max_tokens, dev), per_token, dev)
        import transformers

        name = f"transformers {transformers.__version__} generate, {str(float_dtype(dev)).removeprefix('torch.')}"
        report["baseline"] = {"name": name, **run}
        report["ratio"] = report["flatstack"]["decode_tokens_per_s"] / run["decode_tokens_per_s"]
    if gguf:
        report.update(bench_llama_cpp.llama_cpp_report(gguf, theirs, runs))
    return report


def print_decode_report(report: dict) -> None:
    """A line a run (flatstack, and llama.cpp beside it), then the JSON."""
    ours, theirs = report["flatstack"]["runs"], report.get("llama_cpp", {}).get("runs", [])
    name = f"llama.cpp {report['llama_cpp']['gguf']['ftype']}" if theirs else ""
    print(f"# decode, {report['weights']} weights: {report['bytes_per_token'] / 1e6:.1f} MB a token"
          + (f"; {name}: {report['llama_cpp']['gguf']['bytes_per_token'] / 1e6:.1f} MB" if theirs else ""))
    for i, run in enumerate(ours):
        line = (f"# run {i + 1}: flatstack {run['decode_tokens_per_s']:.1f} tok/s "
                f"({run['fraction_of_roofline']:.1%} of the roofline at "
                f"{run['memory_read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)")
        if i < len(theirs):
            t = theirs[i]
            line += (f", {name} {t['decode_tokens_per_s']:.1f} tok/s ({t['fraction_of_roofline']:.1%} at "
                     f"{t['memory_read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s): ratio "
                     f"{run['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}")
        print(line)
    if "baseline" in report:
        print(f"# {report['baseline']['name']}: {report['baseline']['decode_tokens_per_s']:.1f} tok/s, "
              f"ratio {report['ratio']:.2f}")
    if theirs:
        print(f"# flatstack / {name}, the median of the runs' ratios: {report['ratio_to_llama_cpp']:.2f}")
    print(json.dumps(report, indent=1))


def throughput_requests(vocab_size: int, num: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                        seed: int) -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        n = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=gen))
        m = int(torch.randint(output_range[0], output_range[1] + 1, (1,), generator=gen))
        out.append((random_prompt(vocab_size, n, seed * 100_003 + i), m))
    return out


def bench_throughput(model_path: str, num_requests: int = 32, prompt_range: tuple[int, int] = (64, 256),
                     output_range: tuple[int, int] = (32, 128), quantize: str | None = None, baseline: bool = True,
                     baseline_batch: int = 8, seed: int = 0, device: str | None = None) -> dict:
    from flatstack.engine import LLM, SamplingParams
    from flatstack.model import model_stats

    dev = torch.device(device or "cpu")
    dtype = float_dtype(dev)
    peak = matmul_flops(dev, dtype)
    gpu = dev.type == "cuda"
    llm = LLM(model_path, quantize=quantize, kv_cache_memory=(16 if gpu else 2) << 30, device=str(dev),
              dtype="bfloat16" if gpu else None, max_num_seqs=max(64, num_requests) if gpu else 64)
    cfg = llm.model.cfg
    requests = throughput_requests(cfg.vocab_size, num_requests, prompt_range, output_range, seed)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in requests]
    llm.warm_up(wait=True)
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], params)
    sync(dev)
    ours_s = time.perf_counter() - t0
    output_tokens = sum(len(o.token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p, _ in requests)
    stats = model_stats(cfg, prompt_range[1] + output_range[1])
    flops = 2 * stats.active_params * (prompt_tokens + output_tokens)
    report = {
        "benchmark": "throughput",
        "device": device_name(dev),
        "model": model_path,
        "weights": quantize or "float",
        "requests": num_requests, "prompt_range": list(prompt_range), "output_range": list(output_range),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "ceiling": {"matmul_flops": peak, "dtype": str(dtype).removeprefix("torch.")},
        "flatstack": {"seconds": ours_s, "output_tokens_per_s": output_tokens / ours_s,
                      "mfu": flops / ours_s / peak, "preemptions": llm.scheduler.num_preemptions},
    }
    if baseline:
        import transformers

        hf = hf_reference(model_path, dtype, dev)
        t0 = time.perf_counter()
        for i in range(0, len(requests), baseline_batch):
            batch = requests[i : i + baseline_batch]
            width = max(len(p) for p, _ in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=dev)  # left-padded
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=dev)
            longest = max(m for _, m in batch)
            with torch.no_grad():
                hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                            do_sample=False, pad_token_id=0)
        sync(dev)
        theirs_s = time.perf_counter() - t0
        report["baseline"] = {
            "name": f"transformers {transformers.__version__} generate, {report['ceiling']['dtype']}, "
                    f"static batches of {baseline_batch} "
                    "(left-padded; each batch runs to its longest output)",
            "seconds": theirs_s, "output_tokens_per_s": output_tokens / theirs_s, "mfu": flops / theirs_s / peak}
        report["ratio"] = theirs_s / ours_s
    return report

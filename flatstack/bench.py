"""Benchmarks. Each prints JSON with the ceiling of the machine it ran on (measured in the same run), a
baseline measured in the same run, and the ratio.

`flatstack bench train`: training tokens/s, MFU and peak memory of flatstack's training step beside a
plain eager PyTorch loop over the same model, for a dense model and a Grok-style MoE.

`flatstack bench decode MODEL`: batch-1 decode tokens/s against the memory-bandwidth roofline (bytes
each token reads over the measured read bandwidth), beside Hugging Face transformers' `generate`.

`flatstack bench throughput MODEL`: an offline batch of requests with random prompt and output lengths
(ignore EOS), total output tokens/s and MFU, beside transformers' batched `generate` on the same requests.

`flatstack bench serve`: bench_serve.py.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from flatstack.allocator import keep_freed_memory
from flatstack.ceilings import matmul_flops, memory_bandwidth, sync
from flatstack.checkpoint import detect_format
from flatstack.losses import RouterLogits
from flatstack.model import ModelConfig, Transformer, model_stats
from flatstack.optim import build_optimizers
from flatstack.train import TrainConfig, optimizer_step

# GPT-2 small's size (12 layers, 768 wide, 124M parameters, context 256) in the Llama-style block, and a
# Grok-style MoE with about as many active parameters per token.
DENSE = ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64,
                    ffn_dim=2048, max_seq_len=256, tied_embeddings=True)
MOE = replace(DENSE, n_kv_heads=4, ffn_dim=1024, n_experts=8, experts_per_token=2, renormalize_topk=False,
              activation="gelu_tanh", norm_layout="sandwich", attn_logit_softcap=30.0)
TINY = replace(DENSE, vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, ffn_dim=128)
TINY_MOE = replace(MOE, vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64)


def peak_rss_reset() -> None:
    """Linux: reset the process's peak resident memory so the next reading covers what follows only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        peak_rss_reset()


def time_steps(step_fn, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step_fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def baseline_step(model: Transformer, x, y, device: torch.device):
    """The plain eager loop a PyTorch user writes first: forward, mean cross-entropy, backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=False, fused=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def flatstack_step(model: Transformer, x, y, device: torch.device, compile: bool):
    cfg = TrainConfig(lr=1e-4, warmup_steps=0, schedule="constant", grad_clip=1.0, compile=compile)
    optimizers = build_optimizers(model, cfg, device)
    forward = torch.compile(model.hidden) if compile else model.hidden
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    router_logits = RouterLogits(model)
    return lambda: optimizer_step(model, forward, router_logits, optimizers, [(x, y, None)], cfg, 0, autocast)


def measure_side(name: str, side: str, small: bool, batch: int, warmup: int, steps: int, compile: bool,
                 device: str) -> dict:
    """Median seconds per training step of one model on one side, in this process (run it in a fresh
    one: the flatstack side tunes the process's allocator, which the baseline must not inherit)."""
    dev = torch.device(device)
    cfg = {"dense": TINY if small else DENSE, "moe": TINY_MOE if small else MOE}[name]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1), generator=gen).to(dev)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if side == "flatstack":
        keep_freed_memory()
    with torch.device(dev):
        model = Transformer(cfg)
    model.init_weights(seed=0).train()
    reset_memory(dev)
    fn = baseline_step(model, x, y, dev) if side == "baseline" else flatstack_step(model, x, y, dev, compile)
    seconds = statistics.median(time_steps(fn, dev, warmup, steps))
    return {"seconds_per_step": seconds, "peak_memory_bytes": peak_memory(dev)}


def bench_train(small: bool = False, batch: int = 8, warmup: int = 2, steps: int = 3, compile: bool = True,
                device: str | None = None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peak = matmul_flops(dev, dtype)
    results = []
    for name, cfg in (("dense", TINY if small else DENSE), ("moe", TINY_MOE if small else MOE)):
        flops_per_token = 3 * model_stats(cfg, cfg.max_seq_len).flops_per_token
        tokens = batch * cfg.max_seq_len
        row = {"model": name, "params": model_stats(cfg).total_params, "tokens_per_step": tokens,
               "seq_len": cfg.max_seq_len}
        for side in ("baseline", "flatstack"):
            args = json.dumps([name, side, small, batch, warmup, steps, compile, device])
            code = "import json, sys; from flatstack.bench import measure_side; " \
                   "print(json.dumps(measure_side(*json.loads(sys.argv[1]))))"
            out = subprocess.run([sys.executable, "-c", code, args], check=True, capture_output=True, text=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            tps = tokens / m["seconds_per_step"]
            row[side] = {"tokens_per_s": tps, "mfu": tps * flops_per_token / peak, **m}
        row["speedup"] = row["flatstack"]["tokens_per_s"] / row["baseline"]["tokens_per_s"]
        results.append(row)
    return {
        "benchmark": "train",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "ceiling": {"matmul_flops": peak, "dtype": str(dtype).removeprefix("torch.")},
        "baseline": "plain eager loop: forward to logits, F.cross_entropy, backward, torch.optim.AdamW (for-loop)",
        "flatstack": "optimizer_step: fused LM-head cross-entropy, fused AdamW, grad clipping, allocator that "
                     f"keeps freed memory{', torch.compile' if compile else ''}",
        "results": results,
    }


def print_train_report(report: dict) -> None:
    ceiling = report["ceiling"]
    print(f"# {report['device']}: matmul peak {ceiling['matmul_flops'] / 1e9:.1f} GFLOP/s ({ceiling['dtype']})")
    for r in report["results"]:
        b, f = r["baseline"], r["flatstack"]
        print(f"# {r['model']:5s} {r['params'] / 1e6:.1f}M params: baseline {b['tokens_per_s']:.0f} tok/s "
              f"(MFU {b['mfu']:.1%}, {b['peak_memory_bytes'] / 2**20:.0f} MiB), flatstack {f['tokens_per_s']:.0f} "
              f"tok/s (MFU {f['mfu']:.1%}, {f['peak_memory_bytes'] / 2**20:.0f} MiB): x{r['speedup']:.2f}")
    print(json.dumps(report, indent=1))


# ---------------------------------------------------------------------------------------------
# inference


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def hf_reference(path: str, dtype: torch.dtype):
    """The same model in Hugging Face transformers: a .gguf file (dequantised by transformers) or an HF
    folder. A native flatstack checkpoint has no transformers twin, so the baseline needs one of those."""
    import transformers

    p, kind = Path(path), detect_format(path)
    if kind == "gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype).eval()
    if kind == "hf":
        return transformers.AutoModelForCausalLM.from_pretrained(p, dtype=dtype).eval()
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


LLAMA_CPP_DECODE = """
import json, sys, time
from llama_cpp import Llama
path, prompt, max_tokens, threads = json.loads(sys.argv[1])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + max_tokens,
            n_batch=len(prompt), verbose=False)
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
    """Greedy decode tokens/s and time to first token of llama.cpp (llama-cpp-python) on the same GGUF file
    with as many threads as torch uses, in a process of its own (two OpenMP-style thread pools in one
    process would compete for the cores)."""
    args = json.dumps([gguf, prompt, max_tokens, torch.get_num_threads()])
    out = subprocess.run([sys.executable, "-c", LLAMA_CPP_DECODE, args], capture_output=True, text=True)
    if out.returncode != 0:
        raise ChildProcessError(f"llama.cpp failed on {gguf} (exit {out.returncode}): {out.stderr.strip()[-600:]}")
    tokens_per_s, first = json.loads(out.stdout.strip().splitlines()[-1])
    return tokens_per_s, first


def transformers_decode(model_path: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """Greedy decode tokens/s and time to first token of transformers' `generate` on the same model, float32,
    after a warm-up; the first token is timed on its own and taken out of the decode rate."""
    hf = hf_reference(model_path, torch.float32)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hf.generate(ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=8, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return (max_tokens - 1) / (time.perf_counter() - t0 - first), first


def llama_cpp_report(model_path: str, prompt: list[int], max_tokens: int, repeats: int, measured,
                     report: dict) -> dict:
    import llama_cpp as lc

    runs = [measured(lambda: llama_cpp_decode(model_path, prompt, max_tokens)) for _ in range(repeats)]
    for r in runs:  # it reads the file's own quantised bytes, not our bytes_per_token
        del r["fraction_of_roofline"]
    run = sorted(runs, key=lambda r: r["decode_tokens_per_s"])[(repeats - 1) // 2]
    return {"llama_cpp": {"name": f"llama.cpp (llama-cpp-python {lc.__version__}), the GGUF file as stored, "
                                  f"{torch.get_num_threads()} threads", **run, "runs": runs},
            "ratio_to_llama_cpp": report["flatstack"]["decode_tokens_per_s"] / run["decode_tokens_per_s"]}


def bench_decode(model_path: str, prompt_tokens: int = 128, max_tokens: int = 128, quantize: str | None = None,
                 baseline: bool = True, repeats: int = 3, llama_cpp: bool = False) -> dict:
    """Batch-1 decode after warm-up, `repeats` times. The read bandwidth is measured right before and right
    after each run and the higher of the two is that run's ceiling: on a shared machine the bandwidth
    moves by more than half from minute to minute, and a ceiling measured at another moment than the run
    would make its fraction mean nothing. The summary is the run with the median fraction; all are listed."""
    from flatstack.engine import LLM, SamplingParams

    llm = LLM(model_path, quantize=quantize, kv_cache_memory=256 << 20)
    model = llm.model
    prompt = random_prompt(model.cfg.vocab_size, prompt_tokens, 0)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    per_token = bytes_per_decode_token(model, llm.runner.head, prompt_tokens + max_tokens / 2)
    t0 = time.perf_counter()
    llm.warm_up(wait=True)
    warm_up_s = time.perf_counter() - t0

    def measured(decode) -> dict:
        before = memory_bandwidth("cpu")
        tokens_per_s, first = decode()
        bandwidth = max(before, memory_bandwidth("cpu"))
        return {"decode_tokens_per_s": tokens_per_s, "fraction_of_roofline": tokens_per_s * per_token / bandwidth,
                "memory_read_bandwidth_bytes_per_s": bandwidth, "time_to_first_token_s": first}

    def ours():
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in llm.stream(prompt, params)]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), stamps[0] - t0

    runs = [measured(ours) for _ in range(repeats)]
    median = sorted(runs, key=lambda r: r["fraction_of_roofline"])[(repeats - 1) // 2]
    bandwidth = median["memory_read_bandwidth_bytes_per_s"]
    report = {
        "benchmark": "decode",
        "device": device_name(torch.device("cpu")),
        "model": model_path,
        "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        "weights": quantize or "float",
        "prompt_tokens": prompt_tokens,
        "new_tokens": max_tokens,
        "ceiling": {"memory_read_bandwidth_bytes_per_s": bandwidth},
        "bytes_per_token": per_token,
        "roofline_tokens_per_s": bandwidth / per_token,
        "flatstack": {"decode_tokens_per_s": median["decode_tokens_per_s"],
                      "fraction_of_roofline": median["fraction_of_roofline"],
                      "time_to_first_token_s": runs[0]["time_to_first_token_s"],
                      "warm_up_s": warm_up_s,  # compiling the decode graphs, once per process
                      "runs": runs},
    }
    if baseline:
        run = measured(lambda: transformers_decode(model_path, prompt, max_tokens))
        import transformers

        report["baseline"] = {"name": f"transformers {transformers.__version__} generate, float32", **run}
        report["ratio"] = report["flatstack"]["decode_tokens_per_s"] / run["decode_tokens_per_s"]
    if llama_cpp:  # llama.cpp on the same file, as it stores it
        report.update(llama_cpp_report(model_path, prompt, max_tokens, repeats, measured, report))
    return report


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
                     baseline_batch: int = 8, seed: int = 0) -> dict:
    from flatstack.engine import LLM, SamplingParams
    from flatstack.model import model_stats

    peak = matmul_flops("cpu", torch.float32)
    llm = LLM(model_path, quantize=quantize, kv_cache_memory=2 << 30)
    cfg = llm.model.cfg
    requests = throughput_requests(cfg.vocab_size, num_requests, prompt_range, output_range, seed)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in requests]
    llm.warm_up(wait=True)
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], params)
    ours_s = time.perf_counter() - t0
    output_tokens = sum(len(o.token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p, _ in requests)
    stats = model_stats(cfg, prompt_range[1] + output_range[1])
    flops = 2 * stats.active_params * (prompt_tokens + output_tokens)
    report = {
        "benchmark": "throughput",
        "device": device_name(torch.device("cpu")),
        "model": model_path,
        "weights": quantize or "float",
        "requests": num_requests, "prompt_range": list(prompt_range), "output_range": list(output_range),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "ceiling": {"matmul_flops": peak, "dtype": "float32"},
        "flatstack": {"seconds": ours_s, "output_tokens_per_s": output_tokens / ours_s,
                      "mfu": flops / ours_s / peak, "preemptions": llm.scheduler.num_preemptions},
    }
    if baseline:
        import transformers

        hf = hf_reference(model_path, torch.float32)
        t0 = time.perf_counter()
        for i in range(0, len(requests), baseline_batch):
            batch = requests[i : i + baseline_batch]
            width = max(len(p) for p, _ in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])  # left-padded
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
            longest = max(m for _, m in batch)
            with torch.no_grad():
                hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                            do_sample=False, pad_token_id=0)
        theirs_s = time.perf_counter() - t0
        report["baseline"] = {
            "name": f"transformers {transformers.__version__} generate, float32, static batches of {baseline_batch} "
                    "(left-padded; each batch runs to its longest output)",
            "seconds": theirs_s, "output_tokens_per_s": output_tokens / theirs_s, "mfu": flops / theirs_s / peak}
        report["ratio"] = theirs_s / ours_s
    return report

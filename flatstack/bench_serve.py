"""`flatstack bench serve`: a server measured from outside, as its clients see it.

Load (a running server's URL): Poisson arrivals or a fixed concurrency, random prompt and output lengths,
ignore EOS; request and output throughput, and mean, median and p99 of time to first token, time per
output token and inter-token latency, with vLLM's definitions; several concurrencies in one run, each as
a ratio to the first. Given the served model's path (`--model`), each concurrency's output tokens/s
beside its step roofline (step_roofline), from the matmul peak and read bandwidth measured in the same run;
`--preset roofline` is the sweep for it: concurrency 1, 4, 16 and 64, 128 tokens in and 128 out.

Startup (`--startup`, a model path): `flatstack serve` started as a user starts it, timed from the
process's start to `/health` 200 and to the first streamed token, with an empty compile cache and then
with the one the first start left; beside it, in the same run, the floor (a process that only imports
what the server imports) and the time until the compiled decode graphs serve, which is when a server that
held requests until then would have answered; then decode tokens/s on the compiled path.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from flatstack.bench import throughput_requests


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"mean": statistics.fmean(ordered) * 1e3, "median": statistics.median(ordered) * 1e3, "p99": p99 * 1e3}


async def serve_load(url: str, model: str, requests: list[tuple[list[int], int]], rate: float, concurrency: int | None,
                     api_key: str | None, seed: int) -> dict:
    """vLLM's definitions: TTFT from sending to the first token; TPOT (latency - TTFT) / (tokens - 1) per
    request; ITL every gap between chunks that carry tokens."""
    import httpx

    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency or len(requests))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ttfts, tpots, itls, outputs, failures = [], [], [], [], []

    async def one(client, prompt, n):
        async with limit:
            body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            first, last, tokens = None, None, 0
            try:
                async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        if chunk["choices"] and chunk["choices"][0]["text"]:
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            else:
                                itls.append(now - last)
                            last = now
            except httpx.HTTPError as e:
                failures.append(repr(e))
                return
            if first is None:
                failures.append("no tokens")
                return
            ttfts.append(first - start)
            if tokens > 1:
                tpots.append((last - first) / (tokens - 1))
            outputs.append(tokens)

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as client:
        t0 = time.perf_counter()
        tasks = []
        for prompt, n in requests:
            tasks.append(asyncio.create_task(one(client, prompt, n)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return {
        "completed": len(outputs), "failed": len(failures), "failures": failures[:5], "duration_s": duration,
        "request_throughput": len(outputs) / duration, "output_tokens_per_s": sum(outputs) / duration,
        "ttft_ms": percentiles(ttfts), "tpot_ms": percentiles(tpots), "itl_ms": percentiles(itls),
    }


# the step roofline's sweep: 128 tokens in and 128 out for every request, at four concurrencies
PRESETS = {"roofline": {"concurrency": [1, 4, 16, 64], "prompt_range": [128, 128], "output_range": [128, 128]}}


def decode_costs(model_path: str, quantize: str | None, dtype: str | None) -> dict:
    """What a decode step of the served model costs, counted on the model as the engine holds it (quantised
    linears, its own LM head), loaded here on the CPU: weight bytes read once a step whatever the batch,
    key and value bytes per cached position, and a token's FLOPs, those of the matmuls and per cached key."""
    from flatstack.bench import bytes_per_decode_token
    from flatstack.engine import LLM, kv_bytes_per_token
    from flatstack.model import model_stats

    llm = LLM(model_path, quantize=quantize, dtype=dtype, device="cpu", kv_cache_memory=64 << 20, enforce_eager=True)
    cfg, kv_dtype = llm.model.cfg, llm.model.tok_embeddings.weight.dtype
    # model_stats counts attention at the causal average, context / 2 keys: at context 2 a token sees one key
    per_key = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim
    return {"weight_bytes": bytes_per_decode_token(llm.model, llm.runner.head, 0),
            "kv_bytes_per_position": kv_bytes_per_token(llm.model, kv_dtype),
            "matmul_flops_per_token": model_stats(cfg, 2).flops_per_token - per_key,
            "attention_flops_per_position": per_key, "vocab_size": cfg.vocab_size}


def step_roofline(batch: int, context: float, costs: dict, bandwidth: float, peak_flops: float,
                  prompt_per_output: float = 0.0) -> dict:
    """The fastest a decode step of `batch` sequences at mean `context` can be: it reads every weight once
    and each sequence's cached keys and values, and computes each sequence's token and its share of the
    prompts (`prompt_per_output` prompt tokens per output token: under load, steps hold prompt chunks too),
    so it takes at least the longer of that read at the read bandwidth and that compute at the matmul peak."""
    read_s = (costs["weight_bytes"] + batch * context * costs["kv_bytes_per_position"]) / bandwidth
    flops = batch * ((1 + prompt_per_output) * costs["matmul_flops_per_token"]
                     + context * costs["attention_flops_per_position"])
    compute_s = flops / peak_flops
    step_s = max(read_s, compute_s)
    return {"step_s": step_s, "read_s": read_s, "compute_s": compute_s,
            "bound": "memory" if read_s >= compute_s else "compute", "output_tokens_per_s": batch / step_s}


def serve_ceilings(device: str | None) -> dict:
    """The matmul peak (in the dtype the server computes in) and the read bandwidth, measured while the
    server is idle, on the machine that serves when the load runs on it too."""
    import torch

    from flatstack.bench import float_dtype
    from flatstack.ceilings import matmul_flops, memory_bandwidth

    dev = torch.device(device or "cpu")
    return {"matmul_flops": matmul_flops(dev, float_dtype(dev)), "memory_read_bandwidth_bytes_per_s":
            memory_bandwidth(dev), "dtype": str(float_dtype(dev)).removeprefix("torch.")}


def add_rooflines(runs: list[dict], costs: dict, ceiling: dict, prompt_range, output_range) -> None:
    """Each run's step roofline at its concurrency and mean context (prompt plus half the output), every
    token's FLOPs counted (the prompts' too), and the fraction of it the run's output tokens/s reached."""
    context = sum(prompt_range) / 2 + sum(output_range) / 4
    prompt_per_output = sum(prompt_range) / sum(output_range)
    for run in runs:
        batch = min(run["max_concurrency"], run["num_prompts"])
        roof = step_roofline(batch, context, costs, ceiling["memory_read_bandwidth_bytes_per_s"],
                             ceiling["matmul_flops"], prompt_per_output)
        run["step_roofline"] = {"batch": batch, "mean_context": context, **roof}
        run["fraction_of_step_roofline"] = run["output_tokens_per_s"] / roof["output_tokens_per_s"]


def bench_serve(url: str, concurrencies: list[int], num_prompts: int = 64, rate: float = float("inf"),
                prompt_range: tuple[int, int] = (64, 256), output_range: tuple[int, int] = (32, 128),
                api_key: str | None = None, seed: int = 0, model_path: str | None = None,
                quantize: str | None = None, device: str | None = None) -> dict:
    """The load at each concurrency, at least as many requests as the concurrency (fewer would never reach
    it). With `model_path` (the model the server serves, and its `quantize`), each concurrency's step
    roofline too, from the matmul peak and the read bandwidth measured in the same run (before and after
    the loads, the higher bandwidth taken, as it moves from minute to minute on a shared machine)."""
    import httpx

    url = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    info = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]
    if model_path:
        costs = decode_costs(model_path, quantize, "bfloat16" if device and "cuda" in device else None)
        ceiling = serve_ceilings(device)
    # the prompts' token ids: from the served vocabulary (flatstack's /v1/models says it; another server's model
    # is `--model`'s), so every server given the same model gets the same requests
    vocab = info.get("vocab_size") or (costs["vocab_size"] if model_path else 256)
    runs = []
    for concurrency in concurrencies:
        n = max(num_prompts, concurrency)
        requests = throughput_requests(vocab, n, prompt_range, output_range, seed)
        result = asyncio.run(serve_load(url, info["id"], requests, rate, concurrency, api_key, seed))
        runs.append({"max_concurrency": concurrency, "request_rate": rate, "num_prompts": n, **result})
    for run in runs:
        run["output_tokens_per_s_ratio_to_first"] = run["output_tokens_per_s"] / runs[0]["output_tokens_per_s"]
    report = {"benchmark": "serve", "url": url, "model": info["id"], "num_prompts": num_prompts,
              "prompt_range": list(prompt_range), "output_range": list(output_range),
              "baseline": f"the same load at max concurrency {concurrencies[0]}", "runs": runs}
    if model_path:
        from flatstack.ceilings import memory_bandwidth

        after = memory_bandwidth(device or "cpu")
        ceiling["memory_read_bandwidth_bytes_per_s"] = max(after, ceiling["memory_read_bandwidth_bytes_per_s"])
        add_rooflines(runs, costs, ceiling, prompt_range, output_range)
        report.update({"model_path": model_path, "weights": quantize or "float", "decode_costs": costs,
                       "ceiling": ceiling})
    return report


# ---------------------------------------------------------------------------------------------
# startup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_floor_s() -> float:
    """A fresh process that imports what the server imports and exits: no start can be faster."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import flatstack.server.app, flatstack.engine.llm"], check=True)
    return time.perf_counter() - start


def wait_for(check, timeout: float, what: str) -> None:
    import httpx

    deadline = time.perf_counter() + timeout
    while True:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.01)


def decode_path(url: str) -> str:
    import httpx

    text = httpx.get(f"{url}/metrics").text
    return text.split('flatstack_decode_path{path="', 1)[1].split('"', 1)[0]


def first_stream(url: str, max_tokens: int) -> tuple[float, float | None]:
    """Seconds to a streamed completion's first token, and its decode tokens/s after it."""
    import httpx

    body = {"model": "bench", "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    start, stamps = time.perf_counter(), []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 2 else None
    return stamps[0] - start, rate


def one_start(model: str, cache_dir: str, extra: list[str]) -> dict:
    """Start `flatstack serve`, time it, wait for the compiled graphs, measure decode, stop it."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flatstack.cli", "serve", model, "--port", str(port),
                             "--served-model-name", "bench", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, 300, "/health 200")
        health = time.perf_counter() - start
        first_token, _ = first_stream(url, 4)
        first_token += health
        path_then = decode_path(url)
        wait_for(lambda: decode_path(url) != "compiling", 600, "the compiled decode graphs")
        compiled = time.perf_counter() - start
        _, decode = first_stream(url, 128)
        return {"health_s": health, "first_token_s": first_token, "decode_path_at_first_token": path_then,
                "compiled_s": compiled, "decode_path_after": decode_path(url), "decode_tokens_per_s": decode}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_startup(model: str, extra: list[str] | None = None) -> dict:
    """Two starts of `flatstack serve MODEL`: with an empty compile cache, then with what the first left."""
    floor = import_floor_s()
    with tempfile.TemporaryDirectory(prefix="flatstack-inductor-") as cache:
        runs = {"cold": one_start(model, cache, extra or []), "warm": one_start(model, cache, extra or [])}
    for run in runs.values():
        # the baseline: a server that answers once its graphs are compiled (as flatstack did before)
        run["health_ratio_to_waiting_for_graphs"] = run["health_s"] / run["compiled_s"]
    return {"benchmark": "serve-startup", "model": model, "extra_args": extra or [],
            "ceiling": {"import_floor_s": floor}, "runs": runs}

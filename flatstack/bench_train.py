"""`flatstack bench train`: training tokens/s, MFU and peak memory of flatstack's training step beside a
plain eager PyTorch loop over the same model, for a dense model and a Grok-style MoE, each side in a
process of its own. MFU is against the matmul rate measured in the same run and, on a card in
`ceilings.CARD_BF16_PEAKS`, against the card's dense bf16 peak too.

On the CPU: GPT-2 small's size; on a GPU: the sizes the hardware map asks for, a ~1B dense Llama-style
model (llama-3.2-1b's shape) and a ~1.9B-parameter Grok-architecture MoE.
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
from flatstack.ceilings import card_bf16_peak, matmul_flops, sync
from flatstack.losses import RouterLogits, compile_blocks
from flatstack.model import ModelConfig, Transformer, model_stats, preset
from flatstack.optim import build_optimizers
from flatstack.train import TrainConfig
from flatstack.train_step import optimizer_step

# GPT-2 small's size (12 layers, 768 wide, 124M parameters, context 256) in the Llama-style block, and a
# Grok-style MoE with about as many active parameters per token.
DENSE = ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64,
                    ffn_dim=2048, max_seq_len=256, tied_embeddings=True)
MOE = replace(DENSE, n_kv_heads=4, ffn_dim=1024, n_experts=8, experts_per_token=2, renormalize_topk=False,
              activation="gelu_tanh", norm_layout="sandwich", attn_logit_softcap=30.0)
TINY = replace(DENSE, vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, ffn_dim=128)
TINY_MOE = replace(MOE, vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64)
# on a GPU: llama-3.2-1b's shape (1.24B parameters), and Grok-1's architecture (soft cap, four norms a block,
# 8 experts, top 2, its 131,072-token vocabulary) at 1.9B parameters, 0.9B active; context 2,048
DENSE_GPU = replace(preset("llama-3.2-1b"), max_seq_len=2048)
MOE_GPU = preset("grok-1", d_model=2048, n_layers=12, n_heads=16, n_kv_heads=8, head_dim=128, ffn_dim=2048,
                 max_seq_len=2048)


def config(name: str, small: bool, gpu: bool) -> ModelConfig:
    return {"dense": (DENSE, TINY, DENSE_GPU), "moe": (MOE, TINY_MOE, MOE_GPU)}[name][1 if small else 2 if gpu else 0]


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
    if compile:
        compile_blocks(model)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    router_logits = RouterLogits(model)
    return lambda: optimizer_step(model, model.hidden, router_logits, optimizers, [(x, y, None)], cfg, 0, autocast)


def measure_side(name: str, side: str, small: bool, batch: int, warmup: int, steps: int, compile: bool,
                 device: str) -> dict:
    """Median seconds per training step of one model on one side, in this process (run it in a fresh
    one: the flatstack side tunes the process's allocator, which the baseline must not inherit)."""
    dev = torch.device(device)
    cfg = config(name, small, dev.type == "cuda")
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
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    card = card_bf16_peak(name) if dev.type == "cuda" else None
    results = []
    for model in ("dense", "moe"):
        cfg = config(model, small, dev.type == "cuda")
        flops_per_token = 3 * model_stats(cfg, cfg.max_seq_len).flops_per_token
        tokens = batch * cfg.max_seq_len
        row = {"model": model, "params": model_stats(cfg).total_params, "tokens_per_step": tokens,
               "seq_len": cfg.max_seq_len}
        for side in ("baseline", "flatstack"):
            m = measure_in_process([model, side, small, batch, warmup, steps, compile, device])
            tps = tokens / m["seconds_per_step"]
            row[side] = {"tokens_per_s": tps, "mfu": tps * flops_per_token / peak, **m}
            if card is not None:
                row[side]["mfu_of_card_peak"] = tps * flops_per_token / card
        row["speedup"] = row["flatstack"]["tokens_per_s"] / row["baseline"]["tokens_per_s"]
        results.append(row)
    return {
        "benchmark": "train", "device": name,
        "ceiling": {"matmul_flops": peak, "dtype": str(dtype).removeprefix("torch."), "card_bf16_peak": card},
        "baseline": "plain eager loop: forward to logits, F.cross_entropy, backward, torch.optim.AdamW (for-loop)",
        "flatstack": "optimizer_step: fused LM-head cross-entropy, fused AdamW, grad clipping, allocator that "
                     f"keeps freed memory{', each block compiled' if compile else ''}",
        "results": results,
    }


def measure_in_process(args: list) -> dict:
    """`measure_side` in a fresh process: the flatstack side tunes the allocator, which the baseline must not
    inherit, and each side gets the whole device's memory."""
    code = "import json, sys; from flatstack.bench_train import measure_side; " \
           "print(json.dumps(measure_side(*json.loads(sys.argv[1]))))"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench train {args[:2]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_train_report(report: dict) -> None:
    ceiling = report["ceiling"]
    card = f", card's bf16 peak {ceiling['card_bf16_peak'] / 1e12:.0f} TFLOP/s" if ceiling["card_bf16_peak"] else ""
    print(f"# {report['device']}: matmul peak {ceiling['matmul_flops'] / 1e9:.1f} GFLOP/s ({ceiling['dtype']}){card}")
    for r in report["results"]:
        b, f = r["baseline"], r["flatstack"]
        print(f"# {r['model']:5s} {r['params'] / 1e6:.1f}M params: baseline {b['tokens_per_s']:.0f} tok/s "
              f"(MFU {b['mfu']:.1%}, {b['peak_memory_bytes'] / 2**20:.0f} MiB), flatstack {f['tokens_per_s']:.0f} "
              f"tok/s (MFU {f['mfu']:.1%}, {f['peak_memory_bytes'] / 2**20:.0f} MiB): x{r['speedup']:.2f}")
    print(json.dumps(report, indent=1))

"""`flatstack plan`: how a model lays out on N GPUs, worked out on this machine without allocating it.

The model is built on the meta device and sharded by the training code itself (`fsdp.shard`) under a
fake process group of N ranks (as torchtitan's dry run does), so the per-GPU bytes of parameters,
gradients and optimizer state are the shards that code would make, not a formula's guess. Activations,
step time and communication come from the formulas below (docs/distributed.md), against a card's
data-sheet figures (CARDS: leads, not measurements).

Built so far: FSDP2 data parallel for training. Tensor and expert parallel are not built yet, so a
serving plan holds the whole model on each GPU and says when it cannot fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from flatstack.model import ModelConfig, Transformer, model_stats
from flatstack.parallel.fsdp import shard


@dataclass(frozen=True)
class Card:
    name: str
    bf16_flops: float  # dense, no sparsity
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    nvlink: float  # bytes/s each way, per GPU
    nvlink_domain: int  # GPUs one NVLink fabric joins
    network: float  # bytes/s per GPU beyond the NVLink domain
    source: str


CARDS = {
    "h100": Card("H100 SXM5 80 GB", 989e12, 80e9, 3.35e12, 450e9, 8, 50e9,
                 "NVIDIA H100 data sheet: 989 TFLOP/s dense BF16, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s "
                 "(both ways); ConnectX-7 400 Gb/s per GPU"),
    "h200": Card("H200 SXM 141 GB", 989e12, 141e9, 4.8e12, 450e9, 8, 50e9,
                 "NVIDIA H200 data sheet: 989 TFLOP/s dense BF16, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s; "
                 "ConnectX-7 400 Gb/s per GPU"),
    "b200": Card("B200 (HGX) 180 GB", 2.25e15, 180e9, 8e12, 900e9, 8, 50e9,
                 "NVIDIA HGX B200 data sheet: 36 PFLOP/s sparse FP16/BF16 for 8 GPUs (2.25 dense each), 1.44 TB "
                 "HBM3e at 64 TB/s for 8, NVLink 5 1.8 TB/s per GPU; ConnectX-7 400 Gb/s per GPU"),
    "gb300": Card("GB300 (NVL72) 288 GB", 2.5e15, 288e9, 8e12, 900e9, 72, 100e9,
                  "NVIDIA GB300 NVL72 data sheet: 360 PFLOP/s sparse FP16/BF16 for 72 GPUs (2.5 dense each), "
                  "20 TB HBM3e (288 GB per GPU) at 576 TB/s, NVLink 5 1.8 TB/s per GPU in a 72-GPU domain; "
                  "ConnectX-8 800 Gb/s per GPU"),
}


def activation_bytes_per_token(cfg: ModelConfig) -> int:
    """What the backward keeps per token and layer, bf16: the inputs of each matmul and nonlinearity (the
    norms' outputs, q, k, v, the attention output, the FFN's gate, up, product and its k experts' share)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    ffn = cfg.ffn_dim * (cfg.experts_per_token if cfg.is_moe else 1)
    return 2 * (4 * cfg.d_model + 3 * q + 2 * kv + 4 * ffn)


def sharded_sizes(cfg: ModelConfig, gpus: int) -> tuple[int, int]:
    """Under a fake group of `gpus` ranks: rank 0's parameter elements after `fsdp.shard`, and the largest
    block's whole size (what is gathered while it runs)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
        block = max(sum(p.numel() for p in b.parameters()) for b in model.layers)
        shard(model)
        return sum(p.to_local().numel() for p in model.parameters()), block
    finally:
        dist.destroy_process_group()


def plan_training(cfg: ModelConfig, gpus: int, card: Card, seq_len: int, batch_tokens: int,
                  optimizer: str = "adamw", checkpointing: bool = True) -> dict:
    """With activation checkpointing (`checkpointing`), each layer keeps only its input, and one layer's
    activations exist at a time while it is recomputed."""
    local, block = sharded_sizes(cfg, gpus)
    state = 8 if optimizer == "adamw" else 4  # two float32 moments, or Muon's one
    tokens = batch_tokens / gpus
    memory = {"parameters": 4 * local, "gradients": 4 * local, "optimizer": state * local,
              "gathered_blocks": 2 * 2 * block,  # bf16, the running block and the next one prefetched
              "activations": int(tokens * (cfg.n_layers * 2 * cfg.d_model + activation_bytes_per_token(cfg))
                                 if checkpointing else tokens * cfg.n_layers * activation_bytes_per_token(cfg))}
    stats = model_stats(cfg, seq_len)
    compute_s = 3 * stats.flops_per_token * batch_tokens / (gpus * card.bf16_flops)
    link = card.nvlink if gpus <= card.nvlink_domain else card.network
    comm_bytes = (2 * 2 + 4) * stats.total_params * (gpus - 1) / gpus  # all-gather bf16 twice, reduce-scatter float32
    comm_s = comm_bytes / link
    step_s = max(compute_s, comm_s)  # FSDP2 overlaps the collectives with compute
    layout = f"FSDP2 over {gpus} ranks" + (", activation checkpointing" if checkpointing else "")
    return {"mode": "train", "gpus": gpus, "card": card.name, "layout": layout,
            "per_gpu_bytes": memory, "per_gpu_total_bytes": sum(memory.values()), "hbm_bytes": card.hbm_bytes,
            "fits": sum(memory.values()) <= card.hbm_bytes, "tokens_per_step": batch_tokens,
            "compute_s": compute_s, "communication_s": comm_s, "step_s": step_s, "mfu_bound": compute_s / step_s,
            "communication_link": "NVLink" if link == card.nvlink else "network", "source": card.source}


def plan_serving(cfg: ModelConfig, gpus: int, card: Card, context: int) -> dict:
    """Each GPU a whole replica (tensor and expert parallel are not built yet)."""
    stats = model_stats(cfg, context)
    weights = 2 * stats.total_params
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * context  # one sequence's, bf16
    per_token = 2 * stats.active_params + kv  # batch 1: every active weight and the context read once
    return {"mode": "serve", "gpus": gpus, "card": card.name, "layout": f"{gpus} replicas, one per GPU",
            "per_gpu_bytes": {"weights": weights, "kv_cache_one_sequence": kv},
            "per_gpu_total_bytes": weights + kv, "hbm_bytes": card.hbm_bytes, "fits": weights + kv <= card.hbm_bytes,
            "decode_tokens_per_s_bound": card.hbm_bandwidth / per_token,
            "note": None if weights + kv <= card.hbm_bytes else
            "does not fit one GPU: needs tensor or expert parallel serving, not built yet", "source": card.source}


def describe(plan: dict) -> str:
    gib = 2**30
    lines = [f"{plan['mode']}: {plan['layout']} on {plan['card']}"]
    lines += [f"  {name:24s} {value / gib:10.2f} GiB per GPU" for name, value in plan["per_gpu_bytes"].items()]
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"  {'total':24s} {plan['per_gpu_total_bytes'] / gib:10.2f} GiB of {plan['hbm_bytes'] / gib:.0f}: "
                 f"{verdict}")
    if plan["mode"] == "train":
        lines.append(f"  step of {plan['tokens_per_step']:,} tokens: compute {plan['compute_s']:.3f} s, "
                     f"communication {plan['communication_s']:.3f} s over {plan['communication_link']}; "
                     f"bound {plan['step_s']:.3f} s, MFU <= {plan['mfu_bound']:.0%}")
    else:
        lines.append(f"  batch-1 decode <= {plan['decode_tokens_per_s_bound']:.0f} tokens/s (HBM bandwidth)")
    if plan.get("note"):
        lines.append(f"  {plan['note']}")
    lines.append(f"  card figures: {plan['source']}")
    return "\n".join(lines)

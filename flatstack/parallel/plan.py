"""`flatstack plan`: how a model lays out on N GPUs, worked out on this machine without allocating it.

The model is built on the meta device and sharded by the training code itself (`fsdp.shard`) under a
fake process group of N ranks (as torchtitan's dry run does), so the per-GPU bytes of parameters,
gradients and optimizer state are the shards that code would make, not a formula's guess. Activations,
step time and communication come from the formulas below (docs/distributed.md), against a card's
data-sheet figures (CARDS: leads, not measurements).

Training layouts are FSDP2 over every rank, alone, with tensor parallel (`--tp`: dp x tp ranks) or with
expert parallel (`--ep`); their shards come from `layout.parallelize`. Serving layouts are what the
engine runs: tensor parallel groups of `--tp` GPUs (attention heads, MLP and expert hidden units split;
embedding, norms, router and head whole on each), `gpus / tp` replicas of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from flatstack.model import ModelConfig, Transformer, model_stats
from flatstack.parallel.layout import check_degrees, parallelize


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


def activation_bytes_per_token(cfg: ModelConfig, tp: int = 1) -> int:
    """What the backward keeps per token and layer, bf16: the inputs of each matmul and nonlinearity (the
    norms' outputs, q, k, v, the attention output, the FFN's gate, up, product and its k experts' share);
    a tensor-parallel rank keeps its share of those inside attention and the dense MLPs (experts stay whole)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    split = 3 * q + 2 * kv + 4 * (cfg.residual_ffn_dim if cfg.is_moe else cfg.ffn_dim)  # what TP divides
    experts = 4 * cfg.ffn_dim * cfg.experts_per_token if cfg.is_moe else 0  # whole on each TP rank
    return int(2 * (4 * cfg.d_model + split / tp + experts))


@dataclass(frozen=True)
class Shards:
    local: int  # parameter elements rank 0 holds
    moved: int  # elements each FSDP2 collective moves through a rank: each shard times (its group's ranks - 1)
    block: int  # the largest block's elements as one rank gathers them (its tensor-parallel share whole)


def sharded_sizes(cfg: ModelConfig, gpus: int, tp: int = 1, ep: int = 1) -> Shards:
    """Under a fake group of `gpus` ranks, the model on the meta device laid out by `layout.parallelize`."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
        parallelize(model, 0, gpus, torch.device("cpu"), tp, ep)

        def gathered(p) -> int:  # FSDP2 shards over the first mesh dimension
            return p.to_local().numel() * p.device_mesh.size(0)

        local = sum(p.to_local().numel() for p in model.parameters())
        moved = sum(p.to_local().numel() * (p.device_mesh.size(0) - 1) for p in model.parameters())
        block = max(sum(gathered(p) for p in b.parameters()) for b in model.layers)
        return Shards(local, moved, block)
    finally:
        dist.destroy_process_group()


def link(card: Card, ranks: int) -> float:
    """The bandwidth a collective over `ranks` consecutive GPUs gets: NVLink within one domain."""
    return card.nvlink if ranks <= card.nvlink_domain else card.network


def training_communication(cfg: ModelConfig, gpus: int, card: Card, shards: Shards, tokens: int, tp: int,
                           ep: int) -> dict:
    """Seconds per step of each kind of collective, bytes over the link it crosses. FSDP2: all-gather bf16
    twice (forward, backward), reduce-scatter float32. TP: an all-reduce of the activations after attention
    and after the MLP, forward and backward (a ring moves 2(tp-1)/tp of them). EP: the tokens' k copies out
    to their experts and back, forward and backward (all-to-all: (ep-1)/ep of them leave the rank)."""
    dp = gpus // tp
    fsdp = (2 * 2 + 4) * shards.moved / link(card, gpus)
    tp_bytes = 4 * cfg.n_layers * 2 * (tp - 1) / tp * (tokens / dp) * cfg.d_model * 2
    ep_bytes = 4 * cfg.n_layers * (ep - 1) / ep * (tokens / gpus) * cfg.experts_per_token * cfg.d_model * 2
    return {"fsdp": fsdp, "tensor_parallel": tp_bytes / link(card, tp), "expert_parallel": ep_bytes / link(card, ep)}


def plan_training(cfg: ModelConfig, gpus: int, card: Card, seq_len: int, batch_tokens: int,
                  optimizer: str = "adamw", checkpointing: bool = True, tp: int = 1, ep: int = 1) -> dict:
    """With activation checkpointing (`checkpointing`), each layer keeps only its input, and one layer's
    activations exist at a time while it is recomputed. FSDP2 overlaps its collectives with compute; the
    tensor- and expert-parallel ones sit on the critical path."""
    check_degrees(gpus, tp, ep)
    shards = sharded_sizes(cfg, gpus, tp, ep)
    state = 8 if optimizer == "adamw" else 4  # two float32 moments, or Muon's one
    tokens = batch_tokens / (gpus // tp)  # a tensor-parallel group shares its tokens
    per_token = activation_bytes_per_token(cfg, tp)
    memory = {"parameters": 4 * shards.local, "gradients": 4 * shards.local, "optimizer": state * shards.local,
              "gathered_blocks": 2 * 2 * shards.block,  # bf16, the running block and the next one prefetched
              "activations": int(tokens * (cfg.n_layers * 2 * cfg.d_model + per_token) if checkpointing
                                 else tokens * cfg.n_layers * per_token)}
    compute_s = 3 * model_stats(cfg, seq_len).flops_per_token * batch_tokens / (gpus * card.bf16_flops)
    comm = training_communication(cfg, gpus, card, shards, batch_tokens, tp, ep)
    step_s = max(compute_s, comm["fsdp"]) + comm["tensor_parallel"] + comm["expert_parallel"]
    layout = f"FSDP2 over {gpus} ranks" + (f", tensor parallel {tp} (dp {gpus // tp})" if tp > 1 else "") \
        + (f", expert parallel {ep}" if ep > 1 else "") + (", activation checkpointing" if checkpointing else "")
    total = sum(memory.values())
    return {"mode": "train", "gpus": gpus, "tp": tp, "ep": ep, "dp": gpus // tp, "card": card.name,
            "layout": layout, "per_gpu_bytes": memory, "per_gpu_total_bytes": total, "hbm_bytes": card.hbm_bytes,
            "fits": total <= card.hbm_bytes, "tokens_per_step": batch_tokens, "compute_s": compute_s,
            "communication_s": comm, "step_s": step_s, "mfu_bound": compute_s / step_s,
            "fsdp_link": "NVLink" if link(card, gpus) == card.nvlink else "network", "source": card.source}


def split_params(cfg: ModelConfig) -> tuple[int, int, int, int]:
    """Parameters the engine's tensor parallel splits (attention and feed-forward matrices) and those every
    rank keeps whole (embedding, head, norms, router): total and active per token of each."""
    with torch.device("meta"):
        model = Transformer(cfg)
    split = whole = split_active = whole_active = 0
    for name, p in model.named_parameters():
        n = p.numel()
        expert = cfg.is_moe and ".ffn.w_" in name
        active = n * cfg.experts_per_token // cfg.n_experts if expert else n
        if ".attn.w" in name or ".ffn.w_" in name or ".mlp.w_" in name:  # mlp: Grok-2's, beside the experts
            split, split_active = split + n, split_active + active
        else:
            whole, whole_active = whole + n, whole_active + active
    if not cfg.tied_embeddings:  # the embedding is looked up, not read whole, per token
        whole_active -= cfg.vocab_size * cfg.d_model
    return split, whole, split_active, whole_active


MIN_CONTEXTS = 16  # a default serving layout leaves room for at least this many full contexts per replica


def serving_tp(cfg: ModelConfig, gpus: int, card: Card, context: int) -> int:
    """The smallest tensor-parallel group (a divisor of the GPUs that splits the KV heads and the hidden
    units evenly) whose GPUs hold the weights and MIN_CONTEXTS full contexts of cache, or else the largest."""
    ok = [t for t in range(1, gpus + 1) if gpus % t == 0 and cfg.n_kv_heads % t == 0 and cfg.ffn_dim % t == 0
          and cfg.residual_ffn_dim % t == 0]

    def room(t: int) -> int:
        weights, kv, _ = serving_bytes(cfg, t, context)
        return weights + MIN_CONTEXTS * kv

    return next((t for t in ok if room(t) <= card.hbm_bytes), ok[-1])


def serving_bytes(cfg: ModelConfig, tp: int, context: int) -> tuple[int, int, int]:
    split, whole, _, _ = split_params(cfg)
    weights = int(2 * (split / tp + whole))
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * context // tp  # one sequence's, bf16
    return weights, kv, weights + kv


def plan_serving(cfg: ModelConfig, gpus: int, card: Card, context: int, tp: int | None = None) -> dict:
    """Batch-1 decoding reads every active weight and the context once per token; each layer adds two
    all-reduces of one token's activations (latency, not modelled, comes on top)."""
    tp = tp or serving_tp(cfg, gpus, card, context)
    if gpus % tp or cfg.n_kv_heads % tp or cfg.ffn_dim % tp or cfg.residual_ffn_dim % tp:
        raise ValueError(f"--tp {tp} must divide the {gpus} GPUs, the {cfg.n_kv_heads} KV heads, ffn_dim "
                         f"{cfg.ffn_dim} and residual_ffn_dim {cfg.residual_ffn_dim}")
    weights, kv, total = serving_bytes(cfg, tp, context)
    _, _, split_active, whole_active = split_params(cfg)
    read_s = (2 * (split_active / tp + whole_active) + kv) / card.hbm_bandwidth
    reduce_s = 2 * cfg.n_layers * 2 * (tp - 1) / tp * cfg.d_model * 2 / card.nvlink
    fits = total <= card.hbm_bytes
    return {"mode": "serve", "gpus": gpus, "tp": tp, "dp": gpus // tp, "card": card.name,
            "layout": f"{gpus // tp} replica(s) of tensor parallel over {tp} GPUs",
            "per_gpu_bytes": {"weights": weights, "kv_cache_one_sequence": kv},
            "per_gpu_total_bytes": total, "hbm_bytes": card.hbm_bytes, "fits": fits,
            "kv_cache_sequences": int((card.hbm_bytes - weights) // kv) if fits else 0,
            "decode_tokens_per_s_bound": 1 / (read_s + reduce_s),
            "note": None if fits else f"does not fit: the weights need {weights / 2**30:.0f} GiB per GPU even "
                                      f"split {tp} ways", "source": card.source}


def describe(plan: dict) -> str:
    gib = 2**30
    lines = [f"{plan['mode']}: {plan['layout']} on {plan['card']}"]
    lines += [f"  {name:24s} {value / gib:10.2f} GiB per GPU" for name, value in plan["per_gpu_bytes"].items()]
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"  {'total':24s} {plan['per_gpu_total_bytes'] / gib:10.2f} GiB of {plan['hbm_bytes'] / gib:.0f}: "
                 f"{verdict}")
    if plan["mode"] == "train":
        comm = plan["communication_s"]
        lines.append(f"  step of {plan['tokens_per_step']:,} tokens: compute {plan['compute_s']:.3f} s; communication: "
                     f"FSDP2 {comm['fsdp']:.3f} s over {plan['fsdp_link']} (overlapped), tensor parallel "
                     f"{comm['tensor_parallel']:.3f} s, expert parallel {comm['expert_parallel']:.3f} s")
        lines.append(f"  bound {plan['step_s']:.3f} s a step, MFU <= {plan['mfu_bound']:.0%}")
    else:
        lines.append(f"  KV cache room: {plan['kv_cache_sequences']} sequences of the full context per replica")
        lines.append(f"  batch-1 decode <= {plan['decode_tokens_per_s_bound']:.0f} tokens/s (HBM bandwidth and the "
                     "all-reduces' bytes)")
    if plan.get("note"):
        lines.append(f"  {plan['note']}")
    lines.append(f"  card figures: {plan['source']}")
    return "\n".join(lines)

"""An independent Grok-2 forward for the tests, written from SGLang's code (python/sglang/srt/models/grok.py
and the kernels it calls), over the release's own tensor names; and tiny random checkpoints written in the
release's layout (tensor-parallel expert shards, a tiktoken-style tokenizer).

Where each formula comes from, in SGLang:
- embedding times `embedding_multiplier_scale` (Grok1Model.forward);
- four RMSNorms a layer, x * rsqrt(mean(x^2) + eps) * w in float32 (layers/elementwise.py fused_rmsnorm):
  r += post_attn_norm(attn(pre_attn_norm(r))); r += post_moe_norm(ffn(pre_moe_norm(r))) (Grok1DecoderLayer);
- attention (Grok1Attention, triton_ops/extend_attention.py and decode_attention.py): logits q.k / sqrt(head_dim),
  then the soft cap 30 tanh(s / 30), then times the temperature log2(p) / log2(L) where the query's 0-based
  position p > L = attn_temperature_len (else 1), then the causal softmax; RoPE "original": plain NeoX-style
  rotation of the two halves at rope_theta, no scaling (ScalingRotaryEmbedding with extra_method "original");
- router (Grok1MoE, layers/moe/router.py fused_moe_router_kernel): float32 logits, soft cap 30 before the
  softmax over all experts, top-2 of the softmax, not renormalised;
- experts and the residual MLP: down(gelu(gate x) * up x) with gelu's exact erf form (sgl_kernel gelu_and_mul,
  gelu_and_mul_triton); w1 gate, w3 up, w2 down; residual_moe: (mlp(x) + moe(x)) / sqrt(2) (moe_with_rmoe);
- head (load_weight_wrapper, LogitsProcessor): logits of lm_head times output_multiplier_scale, then the final
  soft cap 50 tanh(z / 50).

`MISTAKES` are deliberate departures the parity tests must catch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

MISTAKES = ("gelu_tanh", "renormalised_top2", "no_router_cap", "no_temperature", "temperature_before_cap",
            "final_cap_before_scale")


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def gelu_mul(gate: torch.Tensor, up: torch.Tensor, mistake: str | None) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh" if mistake == "gelu_tanh" else "none") * up


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, H, D] at positions 0..T-1."""
    T, _, D = x.shape
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention(x, W: dict, c: dict, i: int, mistake: str | None) -> torch.Tensor:
    T = x.shape[0]
    H, Hkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    p = f"model.layers.{i}.self_attn."
    q = rotate((x @ W[p + "q_proj.weight"].T).view(T, H, D), c["rope_theta"])
    k = rotate((x @ W[p + "k_proj.weight"].T).view(T, Hkv, D), c["rope_theta"])
    v = (x @ W[p + "v_proj.weight"].T).view(T, Hkv, D)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * D**-0.5
    L = c["attn_temperature_len"]
    pos = torch.arange(T, dtype=torch.float32)
    tau = torch.where(pos > L, torch.log2(pos.clamp(min=1)) / math.log2(L), torch.ones(T))[None, :, None]
    cap = c["attn_logit_softcapping"]
    if mistake == "temperature_before_cap":
        s = cap * torch.tanh(s * tau / cap)
    else:
        s = cap * torch.tanh(s / cap)
        if mistake != "no_temperature":
            s = s * tau
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(T, H * D)
    return o @ W[p + "o_proj.weight"].T


def experts(x, W: dict, c: dict, i: int, mistake: str | None) -> torch.Tensor:
    p = f"model.layers.{i}.block_sparse_moe."
    logits = x.float() @ W[p + "gate.weight"].float().T
    if mistake != "no_router_cap":
        logits = c["router_logit_softcapping"] * torch.tanh(logits / c["router_logit_softcapping"])
    probs = logits.softmax(-1)
    weights, chosen = probs.topk(c["num_experts_per_tok"], dim=-1)
    if mistake == "renormalised_top2":
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), chosen[t].tolist(), strict=True):
            e_ = f"{p}experts.{e}."
            h = gelu_mul(x[t] @ W[e_ + "w1.weight"].T, x[t] @ W[e_ + "w3.weight"].T, mistake)
            out[t] += w * (h @ W[e_ + "w2.weight"].T)
    return out


def forward(tokens: list[int], W: dict, c: dict, mistake: str | None = None) -> torch.Tensor:
    """Float32 logits [T, V] of one sequence."""
    eps = c["rms_norm_eps"]
    r = W["model.embed_tokens.weight"][tokens].float() * c["embedding_multiplier_scale"]
    for i in range(c["num_hidden_layers"]):
        n = f"model.layers.{i}."
        r = r + rms(attention(rms(r, W[n + "pre_attn_norm.weight"], eps), W, c, i, mistake),
                    W[n + "post_attn_norm.weight"], eps)
        x = rms(r, W[n + "pre_moe_norm.weight"], eps)
        f = experts(x, W, c, i, mistake)
        if c["residual_moe"]:
            mlp = gelu_mul(x @ W[n + "mlp.gate_proj.weight"].T, x @ W[n + "mlp.up_proj.weight"].T, mistake)
            f = (f + mlp @ W[n + "mlp.down_proj.weight"].T) / math.sqrt(2)
        r = r + rms(f, W[n + "post_moe_norm.weight"], eps)
    z = rms(r, W["model.norm.weight"], eps) @ W["lm_head.weight"].float().T
    scale, cap = c["output_multiplier_scale"], c["final_logit_softcapping"]
    if mistake == "final_cap_before_scale":
        return cap * torch.tanh(z / cap) * scale
    return cap * torch.tanh(z * scale / cap)


# ---------------------------------------------------------------------------------------------
# a tiny release


def tiny_config(vocab_size: int) -> dict:
    """Grok-2's config.json fields at a test's size: caps low enough, and weights large enough, that every
    cap bites; a temperature length shorter than the test's sequences."""
    return {
        "architectures": ["Grok1ForCausalLM"], "model_type": "git", "vocab_size": vocab_size, "hidden_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 96, "moe_intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2,
        "residual_moe": True, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 208533496.0,
        "rope_type": "original", "original_max_position_embeddings": 128, "scaling_factor": 16.0,
        "extrapolation_factor": 1.0, "attn_factor": 1.0, "beta_fast": 8, "beta_slow": 1,
        "attn_logit_softcapping": 3.0, "router_logit_softcapping": 1.0, "final_logit_softcapping": 2.0,
        "attn_temperature_len": 8, "embedding_multiplier_scale": 8.0, "output_multiplier_scale": 0.5,
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }


def tiny_weights(c: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    D, V, F_, Fm = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["moe_intermediate_size"]
    H, Hkv, hd, E = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["num_local_experts"]

    def r(*shape, std=0.3):
        return torch.randn(*shape, generator=gen) * std

    W = {"model.embed_tokens.weight": r(V, D), "lm_head.weight": r(V, D), "model.norm.weight": 1 + r(D, std=0.1)}
    for i in range(c["num_hidden_layers"]):
        n = f"model.layers.{i}."
        W |= {n + "self_attn.q_proj.weight": r(H * hd, D), n + "self_attn.k_proj.weight": r(Hkv * hd, D),
              n + "self_attn.v_proj.weight": r(Hkv * hd, D), n + "self_attn.o_proj.weight": r(D, H * hd),
              n + "mlp.gate_proj.weight": r(F_, D), n + "mlp.up_proj.weight": r(F_, D),
              n + "mlp.down_proj.weight": r(D, F_), n + "block_sparse_moe.gate.weight": r(E, D)}
        for norm in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
            W[f"{n}{norm}.weight"] = 1 + r(D, std=0.1)
        for e in range(E):
            x = f"{n}block_sparse_moe.experts.{e}."
            W |= {x + "w1.weight": r(Fm, D), x + "w3.weight": r(Fm, D), x + "w2.weight": r(D, Fm)}
    return W


EXPERT_SPLIT = {"w1": 0, "w3": 0, "w2": 1}  # llama.cpp's converter joins the ranks' slices along these dims


def write_release(folder: Path, c: dict, W: dict, tp: int = 2) -> Path:
    """The release's layout: whole tensors in a -TP-common file, each rank's slice of every expert matrix in
    its -TP-RRR file; no index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c, indent=1))
    common, ranks = {}, [{} for _ in range(tp)]
    for name, t in W.items():
        kind = name.split(".")[-2]
        if ".experts." in name:
            for rank, piece in enumerate(t.chunk(tp, EXPERT_SPLIT[kind])):
                ranks[rank][name] = piece.contiguous()
        else:
            common[name] = t.contiguous()
    save_file(common, str(folder / "pytorch_model-00001-TP-common.safetensors"))
    for rank, tensors in enumerate(ranks):
        save_file(tensors, str(folder / f"pytorch_model-00001-TP-{rank:03d}.safetensors"))
    return folder

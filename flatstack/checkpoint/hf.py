"""Hugging Face model folders: their config.json to a ModelConfig, their tensor names to the native ones."""

from __future__ import annotations

import re

import torch

from flatstack.checkpoint.native import CheckpointError
from flatstack.model import ModelConfig

# ---------------------------------------------------------------------------------------------
# Hugging Face

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
}


def config_from_hf(hf: dict) -> ModelConfig:
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(f"unsupported architecture {archs or hf.get('model_type')!r}; supported: "
                              f"{', '.join(HF_ARCHITECTURES)}")
    family = HF_ARCHITECTURES[arch]

    def need(key):
        if key not in hf:
            raise CheckpointError(f"Hugging Face config for {arch} lacks {key!r}")
        return hf[key]

    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "mlp_bias": bool(hf.get("mlp_bias")),
        "attention_bias": family in ("llama", "mistral", "qwen3", "mixtral") and bool(hf.get("attention_bias")),
        "use_sliding_window": family == "qwen2" and bool(hf.get("use_sliding_window")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{arch} with {bad[0]}={hf.get(bad[0])!r} is not supported")

    rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "llama3":
        rope_scaling = {"type": "llama3", **{k: float(scaling[k]) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    elif rope_type == "default":
        rope_scaling = None
    else:
        raise CheckpointError(f"rope scaling {rope_type!r} is not supported; supported: default, llama3")

    n_heads = need("num_attention_heads")
    d_model = need("hidden_size")
    moe = family == "mixtral"
    return ModelConfig(
        vocab_size=need("vocab_size"),
        d_model=d_model,
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        ffn_dim=need("intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        n_experts=hf.get("num_local_experts", 8) if moe else 0,
        experts_per_token=hf.get("num_experts_per_tok", 2) if moe else 2,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        sliding_window=hf.get("sliding_window") if family in ("mistral", "mixtral") else None,
        qk_norm=family == "qwen3",
        qkv_bias=family == "qwen2",
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        extra={"source_architecture": arch},
    )


# (Hugging Face name pattern, native name); {i} is the layer, experts are stacked below
HF_NAMES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "layers.{}.attn.wq.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "layers.{}.attn.wk.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "layers.{}.attn.wv.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{}.attn.wo.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "layers.{}.attn.q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "layers.{}.attn.k_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{}.ffn.w_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{}.ffn.w_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{}.ffn.w_down.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", "layers.{}.ffn.router.weight"),
]
HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
MIXTRAL_EXPERT_NAMES = {"w1": "w_gate", "w3": "w_up", "w2": "w_down"}  # w1 gated, w3 up, w2 down
HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def hf_tensors_to_native(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    patterns = [(re.compile(p), n) for p, n in HF_NAMES]
    for name, t in tensors.items():
        if HF_IGNORED.fullmatch(name):
            continue
        if name == "lm_head.weight" and cfg.tied_embeddings:
            continue  # some tied checkpoints store the shared matrix twice
        m = HF_EXPERT.fullmatch(name)
        if m:
            layer, e, w = m.groups()
            experts.setdefault(f"layers.{layer}.ffn.{MIXTRAL_EXPERT_NAMES[w]}", {})[int(e)] = t
            continue
        for pattern, native in patterns:
            m = pattern.fullmatch(name)
            if m:
                out[native.format(*m.groups())] = t
                break
        else:
            raise CheckpointError(f"unexpected Hugging Face tensor {name!r}")
    for native, by_index in experts.items():
        missing = sorted(set(range(cfg.n_experts)) - set(by_index))
        if missing:
            raise CheckpointError(f"checkpoint lacks experts {missing} of {native!r}")
        out[native] = torch.stack([by_index[e] for e in range(cfg.n_experts)])
    return out



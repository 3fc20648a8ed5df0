"""xAI's Grok-2 release as it is: `config.json` (architecture "Grok1ForCausalLM" with Grok-2's fields), the
weights in safetensors files pre-sharded for 8-way tensor parallel (`pytorch_model-NNNNN-TP-common.safetensors`
with whole tensors, `pytorch_model-NNNNN-TP-RRR.safetensors` with rank RRR's slice of every expert matrix),
no index, and a tiktoken-style `tokenizer.tok.json`.

Expert slices are joined as llama.cpp's converter joins them (w1 and w3 along their output rows, w2 along its
input columns); w1 is the gate, w3 up, w2 down, as in Mixtral. The numbers follow SGLang (docs/design.md):
RoPE "original" is plain RoPE at rope_theta (SGLang computes the YaRN ramp and does not use it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from flatstack.checkpoint.native import CheckpointError, read_json
from flatstack.model import ModelConfig
from flatstack.tokenizer import GROK2_CHAT_TEMPLATE, tokenizer_from_tiktoken

TOKENIZER = "tokenizer.tok.json"
STOPS = ("<|eos|>", "<|separator|>")  # the end of the text, and of a chat turn

SHARD = re.compile(r"pytorch_model-(\d+)-TP-(common|\d{3})\.safetensors")
EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
EXPERT_DIM = {"w1": 0, "w3": 0, "w2": 1}  # the dim a rank's slice covers
EXPERT_NAME = {"w1": "w_gate", "w3": "w_up", "w2": "w_down"}
NAMES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", "layers.{}.attn.w{}.weight"),
    (r"model\.layers\.(\d+)\.pre_attn_norm\.weight", "layers.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attn_norm\.weight", "layers.{}.post_attn_norm.weight"),
    (r"model\.layers\.(\d+)\.pre_moe_norm\.weight", "layers.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_moe_norm\.weight", "layers.{}.post_ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", "layers.{}.ffn.router.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{}.mlp.w_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{}.mlp.w_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{}.mlp.w_down.weight"),
]
# config.json field: (type, ModelConfig field or None when only checked)
FIELDS = {
    "vocab_size": (int, "vocab_size"), "hidden_size": (int, "d_model"), "num_hidden_layers": (int, "n_layers"),
    "num_attention_heads": (int, "n_heads"), "num_key_value_heads": (int, "n_kv_heads"), "head_dim": (int, "head_dim"),
    "moe_intermediate_size": (int, "ffn_dim"), "num_local_experts": (int, "n_experts"),
    "num_experts_per_tok": (int, "experts_per_token"), "max_position_embeddings": (int, "max_seq_len"),
    "rms_norm_eps": (float, "rms_norm_eps"), "rope_theta": (float, "rope_theta"),
    "attn_logit_softcapping": (float, "attn_logit_softcap"),
    "router_logit_softcapping": (float, "router_logit_softcap"),
    "final_logit_softcapping": (float, "final_logit_softcap"),
    "attn_temperature_len": (int, "attn_temperature_len"),
    "embedding_multiplier_scale": (float, "embedding_multiplier"),
    "output_multiplier_scale": (float, "output_multiplier"),
    "intermediate_size": (int, None), "residual_moe": (bool, None), "rope_type": (str, None),
}


def is_grok2_release(folder: Path) -> bool:
    return any(SHARD.fullmatch(p.name) for p in folder.iterdir())


def grok2_tokenizer_files(folder: Path) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json (the chat template) rebuilt from the release's tokenizer.tok.json."""
    if not (folder / TOKENIZER).exists():
        return {}
    tok = tokenizer_from_tiktoken(read_json(folder / TOKENIZER))
    config = {"chat_template": GROK2_CHAT_TEMPLATE, "eos_token": STOPS[0]}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config)}


def release_config(folder: Path) -> ModelConfig:
    """The release's config, its stop tokens taken from its tokenizer when the config names none."""
    cfg = grok2_config(read_json(folder / "config.json"))
    if cfg.eos_token_id is None and (folder / TOKENIZER).exists():
        specials = {bytes(t["bytes"]).decode("utf-8"): t["token"]
                    for t in read_json(folder / TOKENIZER).get("special_tokens", [])}
        stops = [specials[s] for s in STOPS if s in specials]
        cfg.eos_token_id = stops or None
    return cfg


def grok2_config(raw: dict) -> ModelConfig:
    """ModelConfig from the release's config.json; a field of the wrong type or an unknown rope_type is named."""
    values = {}
    for key, (kind, field) in FIELDS.items():
        if key not in raw:
            raise CheckpointError(f"Grok-2 config.json lacks {key!r}")
        v = raw[key]
        ok = isinstance(v, kind) and not (kind is not bool and isinstance(v, bool))
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            raise CheckpointError(f"Grok-2 config.json field {key!r} is {v!r}; expected {kind.__name__}")
        if field is not None:
            values[field] = v
    if raw["rope_type"] != "original":
        raise CheckpointError(f"Grok-2 config.json rope_type {raw['rope_type']!r} is not supported; supported: "
                              "'original' (plain RoPE, as SGLang computes it)")
    return ModelConfig(**values, residual_ffn_dim=raw["intermediate_size"] if raw["residual_moe"] else 0,
                       activation="gelu", renormalize_topk=False, norm_layout="sandwich",
                       tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
                       bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
                       extra={"source_architecture": "Grok-2 (Grok1ForCausalLM)"})


def shard_files(folder: Path, cfg: ModelConfig) -> tuple[list[Path], dict[int, list[Path]], int]:
    """The -TP-common files, each rank's files, and the number of ranks the release was cut for: what rank 0's
    slices say (the experts' width over a slice's)."""
    common, by_rank = [], {}
    for p in sorted(folder.iterdir()):
        m = SHARD.fullmatch(p.name)
        if m:
            (common.append(p) if m[2] == "common" else by_rank.setdefault(int(m[2]), []).append(p))
    if 0 not in by_rank:
        raise CheckpointError(f"{folder} has no pytorch_model-NNNNN-TP-000.safetensors (rank 0's expert slices)")
    with safe_open(str(by_rank[0][0]), "pt") as f:
        w1 = next((n for n in f.keys() if n.endswith(".w1.weight")), None)  # noqa: SIM118
        rows = f.get_slice(w1).get_shape()[0] if w1 else cfg.ffn_dim
    return common, by_rank, max(1, cfg.ffn_dim // rows)


def rank_files(folder: Path, by_rank: dict[int, list[Path]], ranks: range, of: int) -> list[list[Path]]:
    """The files of `ranks` (of `of`), each rank with as many as rank 0; a missing one is named."""
    numbers = {SHARD.fullmatch(p.name)[1] for p in by_rank[0]}
    for rank in ranks:
        have = {SHARD.fullmatch(p.name)[1] for p in by_rank.get(rank, [])}
        for n in sorted(numbers - have):
            raise CheckpointError(f"{folder} lacks pytorch_model-{n}-TP-{rank:03d}.safetensors (rank {rank} of {of})")
    return [by_rank[r] for r in ranks]


def read_grok2(folder: Path, cfg: ModelConfig, part: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Native tensors from the release, one tensor at a time: whole ones as they are (memory-mapped), expert
    matrices joined from the ranks' slices and stacked per layer. `part` (rank, of): only that tensor-parallel
    rank's share of each expert's hidden units, read from the release files that hold it, never joined whole."""
    common, by_rank, cut = shard_files(folder, cfg)
    rank, of = part or (0, 1)
    width, piece = cfg.ffn_dim // of, cfg.ffn_dim // cut  # the share wanted; what one release file holds
    first, last = rank * width // piece, ((rank + 1) * width - 1) // piece  # the release files it spans
    files = rank_files(folder, by_rank, range(first, last + 1), cut)
    out = read_common(common)
    slices = expert_slices(files, cfg, cut)
    for layer in range(cfg.n_layers):  # joined and stacked a layer at a time: one layer's copy at most in flight
        for w, native in EXPERT_NAME.items():
            dim = EXPERT_DIM[w]
            out[f"layers.{layer}.ffn.{native}"] = torch.stack(
                [torch.cat(slices.pop((layer, e, w)), dim=dim).narrow(dim, rank * width - first * piece, width)
                 for e in range(cfg.n_experts)])
    return out


def read_common(common: list[Path]) -> dict[str, torch.Tensor]:
    patterns = [(re.compile(p), n) for p, n in NAMES]
    out: dict[str, torch.Tensor] = {}
    for path in common:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                native = next((n.format(*m.groups()) for p, n in patterns if (m := p.fullmatch(name))), None)
                if native is None:
                    raise CheckpointError(f"unexpected tensor {name!r} in {path.name}")
                out[native] = f.get_tensor(name)
    return out


def expert_slices(ranks: list[list[Path]], cfg: ModelConfig, cut: int) -> dict[tuple, list[torch.Tensor]]:
    """Per (layer, expert, w1|w2|w3), the given ranks' slices in rank order (memory-mapped), shapes checked."""
    slices: dict[tuple, list] = {}
    part = cfg.ffn_dim // cut
    for files in ranks:
        for path in files:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    m = EXPERT.fullmatch(name)
                    if m is None:
                        raise CheckpointError(f"unexpected tensor {name!r} in {path.name} (rank files hold experts)")
                    t, w = f.get_tensor(name), m[3]
                    want = (part, cfg.d_model) if w != "w2" else (cfg.d_model, part)
                    if tuple(t.shape) != want:
                        raise CheckpointError(f"{path.name}: {name} has shape {tuple(t.shape)}; expected {want} "
                                              f"(a 1/{cut} slice)")
                    slices.setdefault((int(m[1]), int(m[2]), w), []).append(t)
    for key in ((la, e, w) for la in range(cfg.n_layers) for e in range(cfg.n_experts) for w in EXPERT_NAME):
        if len(slices.get(key, [])) != len(ranks):
            layer, e, w = key
            raise CheckpointError(f"the release lacks rank slices of model.layers.{layer}.block_sparse_moe."
                                  f"experts.{e}.{w}.weight ({len(slices.get(key, []))} of {len(ranks)})")
    return slices

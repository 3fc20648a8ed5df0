"""Checkpoints: the native format, `load()`, and importers from Hugging Face and xAI's Grok-1 naming.

A native checkpoint is a folder with `config.json` (a ModelConfig plus a format marker),
`model.safetensors` (or shards and `model.safetensors.index.json`, the same layout Hugging Face
uses) and, when there is one, `tokenizer.json`. Every importer ends in the same place: a dict of
tensors under the native names, checked name by name and shape by shape against the model it must
fill, so a bad file fails with the tensor named rather than deep inside torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flatstack.atomic import replace_dir
from flatstack.model import PRESETS, ModelConfig, Transformer

FORMAT_KEY = "flatstack_format"
FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: the message names the file or tensor."""


# ---------------------------------------------------------------------------------------------
# safetensors I/O, shared by native and Hugging Face folders


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards an index lists (memory-mapped)."""
    single, index = folder / "model.safetensors", folder / INDEX_NAME
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = sorted(set(weight_map.values()))
    elif single.exists():
        files = [single.name]
    else:
        raise CheckpointError(f"no model.safetensors or {INDEX_NAME} in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"shard {path} listed in the index is missing")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e
    return tensors


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """One file, or shards of at most max_shard_bytes (a lone larger tensor gets its own) plus an index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# native format


def save(
    model: Transformer,
    path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 4 << 30,
    train_state: dict | None = None,
) -> Path:
    """Write a native checkpoint atomically: a reader sees the old folder or the new one, never half.

    A training checkpoint adds `train_state.pt` (optimizer, step, RNG states) beside the model."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_json(tmp / "config.json", {FORMAT_KEY: FORMAT_VERSION, **model.cfg.to_dict()})
    write_safetensors(dict(model.state_dict()), tmp, max_shard_bytes)
    if tokenizer_dir is not None:
        copy_tokenizer(Path(tokenizer_dir), tmp)
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    replace_dir(tmp, path)
    return path


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Transformer:
    """A model in eval mode from a native checkpoint or a Hugging Face model folder.

    dtype None keeps the stored dtype; device None is the CPU.
    """
    folder = existing_path(path)
    if folder.suffix == ".gguf" and folder.is_file():
        cfg, tensors, _ = read_gguf(folder)
        return build_model(cfg, tensors, dtype, device)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder (expected config.json and safetensors)")
    raw = read_json(folder / "config.json")
    if FORMAT_KEY in raw:
        cfg = native_config(raw, folder)
        tensors = read_safetensors(folder)
    else:
        cfg = config_from_hf(raw)
        tensors = hf_tensors_to_native(read_safetensors(folder), cfg)
    return build_model(cfg, tensors, dtype, device)


def native_config(raw: dict, folder: Path) -> ModelConfig:
    raw = dict(raw)
    version = raw.pop(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{folder}/config.json has format version {version}; this flatstack reads "
                              f"{FORMAT_VERSION}")
    try:
        return ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from e


def existing_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"path {str(p)!r} does not exist")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"path {str(p)!r} is not readable")
    return p


def build_model(
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Transformer:
    """Fill a Transformer with exactly these tensors, without allocating a random init first."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name!r} (expected shape {list(shape)})")
        found = tuple(tensors[name].shape)
        if found != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(found)}, expected {list(shape)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected tensors {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} for this config")
    # Always copy: memory-mapped tensors sit at unaligned offsets, which sends BLAS down other code
    # paths, so a model would not compute bit-for-bit as it did before it was saved.
    state = {k: tensors[k].to(device=device or "cpu", dtype=dtype or tensors[k].dtype, copy=True)
             for k in expected}
    model.load_state_dict(state, assign=True)
    return model.eval()


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


# ---------------------------------------------------------------------------------------------
# xAI Grok-1 naming (transformer/decoder_layer_N/..., JAX [in, out] weights)

GROK_LAYER_NAMES = {
    "rms_norm::scale": ("attn_norm.weight", None),
    "rms_norm_1::scale": ("post_attn_norm.weight", None),
    "rms_norm_2::scale": ("ffn_norm.weight", None),
    "rms_norm_3::scale": ("post_ffn_norm.weight", None),
    "multi_head_attention/query::w": ("attn.wq.weight", (1, 0)),
    "multi_head_attention/key::w": ("attn.wk.weight", (1, 0)),
    "multi_head_attention/value::w": ("attn.wv.weight", (1, 0)),
    "multi_head_attention/linear::w": ("attn.wo.weight", (1, 0)),
    "router::w": ("ffn.router.weight", (1, 0)),
    "moe/linear::w": ("ffn.w_gate", (0, 2, 1)),  # gelu branch
    "moe/linear_v::w": ("ffn.w_up", (0, 2, 1)),
    "moe/linear_1::w": ("ffn.w_down", (0, 2, 1)),
}
GROK_LAYER = re.compile(r"transformer/decoder_layer_(\d+)/(.+)")


def grok1_config(config_json: str | os.PathLike | None) -> ModelConfig:
    """Grok-1's constants, overridden by the known fields of a config JSON (other keys are kept as provenance)."""
    base = PRESETS["grok-1"].to_dict()
    if config_json is None:
        return ModelConfig.from_dict(base)
    raw = read_json(existing_path(config_json))
    known = {k: v for k, v in raw.items() if k in base and k != "extra"}
    extra = {k: v for k, v in raw.items() if k not in known}
    return ModelConfig.from_dict({**base, **known, "extra": extra})


def grok1_tensors_to_native(arrays: dict[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, a in arrays.items():
        t = torch.as_tensor(np.asarray(a)) if isinstance(a, np.ndarray) else a
        if name == "language_model/in_out_embed::embeddings":
            out["tok_embeddings.weight"] = t
        elif name == "language_model/rms_norm::scale":
            out["norm.weight"] = t
        elif m := GROK_LAYER.fullmatch(name):
            layer, rest = m.groups()
            if rest not in GROK_LAYER_NAMES:
                raise CheckpointError(f"unexpected Grok-1 tensor {name!r}")
            native, perm = GROK_LAYER_NAMES[rest]
            out[f"layers.{layer}.{native}"] = t.permute(perm).contiguous() if perm else t
        else:
            raise CheckpointError(f"unexpected Grok-1 tensor {name!r}")
    return out


def read_grok1_arrays(src: Path) -> dict[str, np.ndarray | torch.Tensor]:
    """Grok-1-named arrays from a .npz (non-parameter arrays such as test inputs are skipped) or safetensors."""
    if src.suffix == ".npz":
        try:
            with np.load(src) as npz:
                return {k: npz[k] for k in npz.files if "::" in k}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {src}: {e}") from e
    if src.suffix == ".safetensors":
        try:
            with safe_open(src, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot read {src}: {e}") from e
    raise CheckpointError(f"{src}: expected a .npz or .safetensors file of Grok-1-named arrays")


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp's format): llama-architecture files, dequantised on load

GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "attn.wq", "attn_k": "attn.wk",
    "attn_v": "attn.wv", "attn_output": "attn.wo", "ffn_gate": "ffn.w_gate", "ffn_up": "ffn.w_up",
    "ffn_down": "ffn.w_down",
}
GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's q/k rows for its RoPE kernel; undo it, back to the
    half-rotation layout."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: Path):
    """(reader, metadata, config) of a llama-architecture GGUF file, without reading its tensors."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the gguf package: pip install 'flatstack[gguf]'") from None
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from e
    meta = {key: field.contents() for key, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: llama")

    def need(key):
        if key not in meta:
            raise CheckpointError(f"{path}: GGUF metadata lacks {key!r}")
        return meta[key]

    names = {t.name for t in reader.tensors}
    n_heads, d_model = need("llama.attention.head_count"), need("llama.embedding_length")
    n_kv = meta.get("llama.attention.head_count_kv", n_heads)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    try:
        cfg = ModelConfig(
            vocab_size=meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", []))),
            d_model=d_model, n_layers=need("llama.block_count"), n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=d_model // n_heads, ffn_dim=need("llama.feed_forward_length"),
            max_seq_len=meta.get("llama.context_length", 2048),
            rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            tied_embeddings="output.weight" not in names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=eos,
            extra={"source": f"gguf {meta.get('general.name', path.name)}"},
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: its metadata does not describe a valid model: {e}") from e
    return reader, meta, cfg


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, native tensors in float32, tokenizer files) of a llama-architecture GGUF file."""
    import gguf

    reader, meta, cfg = open_gguf(path)
    n_heads, n_kv, eos = cfg.n_heads, cfg.n_kv_heads, cfg.eos_token_id
    tensors = {}
    for t in reader.tensors:
        native = GGUF_NAMES.get(t.name)
        m = GGUF_LAYER.fullmatch(t.name)
        if m and m.group(2) in GGUF_LAYER_NAMES:
            native = f"layers.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}.weight"
        if native is None:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {t.name!r}")
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which cannot be "
                                  "dequantised") from None
        array = np.array(array, dtype=np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))
        if m and m.group(2) in ("attn_q", "attn_k"):
            array = unpermute_rope_rows(array, n_heads if m.group(2) == "attn_q" else n_kv)
        tensors[native] = torch.from_numpy(np.ascontiguousarray(array))
    return cfg, tensors, gguf_tokenizer_files(meta, eos)


def gguf_tokenizer_files(meta: dict, eos: int | None) -> dict[str, str]:
    """tokenizer.json (and tokenizer_config.json with the chat template) rebuilt from GGUF metadata."""
    from flatstack.tokenizer import tokenizer_from_gguf

    files = {"tokenizer.json": tokenizer_from_gguf(meta).to_str()}
    if "tokenizer.chat_template" in meta:
        tokens = meta.get("tokenizer.ggml.tokens", [])
        files["tokenizer_config.json"] = json.dumps({
            "chat_template": meta["tokenizer.chat_template"],
            "eos_token": tokens[eos] if eos is not None and eos < len(tokens) else None,
        }, indent=1)
    return files


def tokenizer_files(path: str | os.PathLike) -> dict[str, str]:
    """The tokenizer files of a checkpoint folder, or rebuilt from a GGUF file's metadata."""
    path = existing_path(path)
    if path.suffix == ".gguf" and path.is_file():
        _, meta, cfg = open_gguf(path)
        return gguf_tokenizer_files(meta, cfg.eos_token_id)
    return {name: (path / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES if (path / name).exists()}


# ---------------------------------------------------------------------------------------------
# convert

CONVERTERS = ("hf", "gguf", "xai-grok1")


def convert(src: str | os.PathLike, dst: str | os.PathLike, source: str, config: str | None = None,
            dtype: torch.dtype | None = None) -> Path:
    """Import a foreign checkpoint and write it in the native format; returns the written folder."""
    src_path = existing_path(src)
    if source == "hf":
        if config is not None:
            raise CheckpointError("--config applies to --from xai-grok1 only (a Hugging Face folder has its own)")
        model = load(src_path, dtype=dtype)
        return save(model, dst, tokenizer_dir=src_path)
    if source == "gguf":
        cfg, tensors, tokenizer_files = read_gguf(src_path)
        with tempfile.TemporaryDirectory() as tok_dir:
            for name, text in tokenizer_files.items():
                Path(tok_dir, name).write_text(text, encoding="utf-8")
            return save(build_model(cfg, tensors, dtype), dst, tokenizer_dir=tok_dir)
    if source == "xai-grok1":
        cfg = grok1_config(config)
        model = build_model(cfg, grok1_tensors_to_native(read_grok1_arrays(src_path)), dtype)
        return save(model, dst)
    raise CheckpointError(f"unknown source format {source!r}; supported: {', '.join(CONVERTERS)}")

"""GGUF files (llama.cpp's format): llama-architecture models, dequantised on load, and their tokenizer
rebuilt from the file's metadata. For quantised inference, `stored_linears` also reads the Q8_0, Q4_0 and
Q4_1 blocks as they are stored: the inference linears (kernels/linear.py) keep those layouts, so no
weight is dequantised and quantised again."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from flatstack.checkpoint.native import CheckpointError
from flatstack.kernels.linear import Int4Linear, Int8Linear
from flatstack.model import ModelConfig

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


# a stored block format -> the inference linear that keeps it (`kind`), and its bytes per block of 32
BLOCK_TYPES = {"Q8_0": ("int8", 34), "Q4_0": ("int4", 18), "Q4_1": ("int4", 20)}


def native_name(name: str) -> str | None:
    m = GGUF_LAYER.fullmatch(name)
    if m and m.group(2) in GGUF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}.weight"
    return GGUF_NAMES.get(name)


def block_linear(fmt: str, data: np.ndarray) -> Int8Linear | Int4Linear:
    """One tensor's stored blocks [rows, blocks * block bytes] -> the inference linear over them as they are."""
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, -1, BLOCK_TYPES[fmt][1])

    def part(start: int, end: int, dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(blocks[..., start:end]).view(dtype).reshape(rows, -1))

    if fmt == "Q8_0":  # a float16 scale, then 32 int8 weights
        return Int8Linear(None, q=part(2, 34, np.int8), scale=part(0, 2, np.float16))
    scale = part(0, 2, np.float16)
    if fmt == "Q4_0":  # a float16 scale, 16 bytes of nibbles q: w = (q - 8) * scale
        return Int4Linear(None, packed=part(2, 18, np.uint8), scale=scale, low=-8 * scale)
    return Int4Linear(None, packed=part(4, 20, np.uint8), scale=scale, low=part(2, 4, np.float16))  # w = q * d + m


def stored_linears(path: Path, kind: str) -> dict[str, Int8Linear | Int4Linear]:
    """Native weight name -> inference linear over the file's own blocks, for every weight stored in the
    format `kind` asks for (int8: Q8_0; int4: Q4_0, Q4_1) and, under int4, those stored as Q8_0 too
    (files keep their embedding there, llama.cpp's LM head); the rest is for the caller to quantise."""
    reader, meta, cfg = open_gguf(path)
    linears = {}
    for t in reader.tensors:
        fmt, name = t.tensor_type.name, native_name(t.name)
        if fmt not in BLOCK_TYPES or name is None or not (BLOCK_TYPES[fmt][0] == kind or kind == "int4"):
            continue
        data = np.asarray(t.data)
        if name.endswith(("attn.wq.weight", "attn.wk.weight")):
            data = unpermute_rope_rows(data, cfg.n_heads if "wq" in name else cfg.n_kv_heads)
        linears[name] = block_linear(fmt, data)
    return linears


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



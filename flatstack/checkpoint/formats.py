"""Which format a path holds (decided here, once), and what every format offers through it: `load`, its
config without the weights, its tokenizer files, and `convert` to the native format."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from flatstack.checkpoint.dcp import is_dcp, read_dcp
from flatstack.checkpoint.gguf import gguf_tokenizer_files, open_gguf, read_gguf
from flatstack.checkpoint.grok1 import grok1_config, grok1_tensors_to_native, read_grok1_arrays
from flatstack.checkpoint.grok2 import grok2_tokenizer_files, is_grok2_release, read_grok2, release_config
from flatstack.checkpoint.hf import config_from_hf, hf_tensors_to_native
from flatstack.checkpoint.native import (
    FORMAT_KEY,
    TOKENIZER_FILES,
    CheckpointError,
    build_model,
    existing_path,
    native_config,
    read_json,
    read_safetensors,
    save,
)
from flatstack.model import ModelConfig, Transformer


def detect_format(path: str | os.PathLike) -> str:
    """"gguf" (a .gguf file), "dcp" (a sharded training checkpoint), "native" (a folder whose config.json
    carries the format marker), "grok2" (xAI's Grok-2 release: tensor-parallel shard files) or "hf"."""
    p = existing_path(path)
    if p.suffix == ".gguf" and p.is_file():
        return "gguf"
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a checkpoint folder (expected config.json and safetensors) "
                              "nor a .gguf file")
    if is_dcp(p):
        return "dcp"
    if is_grok2_release(p):
        return "grok2"
    return "native" if FORMAT_KEY in read_json(p / "config.json") else "hf"


def read_config(path: str | os.PathLike) -> ModelConfig:
    """A checkpoint's config, without its weights."""
    kind = detect_format(path)
    if kind == "gguf":
        return open_gguf(Path(path))[2]
    if kind == "grok2":
        return release_config(Path(path))
    raw = read_json(Path(path) / "config.json")
    return native_config(raw, Path(path)) if kind in ("native", "dcp") else config_from_hf(raw)


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Transformer:
    """A model in eval mode from a native checkpoint, a Hugging Face model folder or a GGUF file.

    dtype None keeps the stored dtype; device None is the CPU.
    """
    return build_model(*read_tensors(path), dtype, device)


def read_tensors(path: str | os.PathLike, part: tuple[int, int] | None = None) -> tuple[ModelConfig, dict]:
    """A checkpoint's config and native tensors (memory-mapped where the format allows). `part` (rank, of):
    a format cut for tensor parallel (the Grok-2 release) reads only that rank's share of what it cut; other
    tensors come whole, for the caller to slice."""
    kind, folder = detect_format(path), Path(path)
    if kind == "gguf":
        cfg, tensors, _ = read_gguf(folder)
        return cfg, tensors
    if kind == "native":
        return native_config(read_json(folder / "config.json"), folder), read_safetensors(folder)
    if kind == "dcp":
        return read_dcp(folder)
    if kind == "grok2":
        cfg = release_config(folder)
        return cfg, read_grok2(folder, cfg, part)
    cfg = config_from_hf(read_json(folder / "config.json"))
    return cfg, hf_tensors_to_native(read_safetensors(folder), cfg)


def tokenizer_files(path: str | os.PathLike) -> dict[str, str]:
    """The tokenizer files of a checkpoint folder, or rebuilt from a GGUF file's metadata."""
    kind = detect_format(path)
    if kind == "gguf":
        _, meta, cfg = open_gguf(Path(path))
        return gguf_tokenizer_files(meta, cfg.eos_token_id)
    path = Path(path)
    if kind == "grok2":
        return grok2_tokenizer_files(path)
    return {name: (path / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES if (path / name).exists()}


# ---------------------------------------------------------------------------------------------
# convert

CONVERTERS = ("hf", "gguf", "xai-grok1", "dcp")


def save_with_tokenizer(model: Transformer, dst: str | os.PathLike, files: dict[str, str]) -> Path:
    with tempfile.TemporaryDirectory() as tok_dir:
        for name, text in files.items():
            Path(tok_dir, name).write_text(text, encoding="utf-8")
        return save(model, dst, tokenizer_dir=tok_dir)


def convert(src: str | os.PathLike, dst: str | os.PathLike, source: str, config: str | None = None,
            dtype: torch.dtype | None = None) -> Path:
    """Import a foreign checkpoint and write it in the native format; returns the written folder."""
    src_path = existing_path(src)
    if source == "hf":  # a Hugging Face folder, or xAI's Grok-2 release as it is
        if config is not None:
            raise CheckpointError("--config applies to --from xai-grok1 only (a Hugging Face folder has its own)")
        return save_with_tokenizer(load(src_path, dtype=dtype), dst, tokenizer_files(src_path))
    if source == "gguf":
        cfg, tensors, files = read_gguf(src_path)
        return save_with_tokenizer(build_model(cfg, tensors, dtype), dst, files)
    if source == "dcp":
        if not is_dcp(src_path):
            raise CheckpointError(f"{src_path} is not a sharded (DCP) checkpoint: no .metadata file")
        return save(build_model(*read_dcp(src_path), dtype), dst, tokenizer_dir=src_path)
    if source == "xai-grok1":
        cfg = grok1_config(config)
        model = build_model(cfg, grok1_tensors_to_native(read_grok1_arrays(src_path)), dtype)
        return save(model, dst)
    raise CheckpointError(f"unknown source format {source!r}; supported: {', '.join(CONVERTERS)}")

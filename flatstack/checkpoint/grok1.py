"""xAI's Grok-1 release naming: arrays named as xAI's JAX code names them, to the native tensors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from flatstack.checkpoint.native import CheckpointError, existing_path, read_json
from flatstack.model import PRESETS, ModelConfig

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



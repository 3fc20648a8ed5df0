"""The native format: a folder with `config.json` (a ModelConfig plus a format marker), `model.safetensors`
(or shards and `model.safetensors.index.json`, the same layout Hugging Face uses) and, when there is one,
`tokenizer.json`; its reading and writing, and `build_model`, where every importer ends: a dict of
tensors under the native names, checked name by name and shape by shape against the model it must fill,
so a bad file fails with the tensor named rather than deep inside torch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flatstack.atomic import replace_dir
from flatstack.model import ModelConfig, Transformer

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



"""Sharded training checkpoints (torch.distributed.checkpoint, written by `flatstack train` on several
ranks: parallel/dcp.py) read into one process: the folder holds `config.json` beside the shards, and
DCP reassembles every tensor whatever the number of ranks that wrote it."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from flatstack.checkpoint.native import native_config, read_json
from flatstack.model import ModelConfig, Transformer


def is_dcp(path: Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def read_dcp(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model's config and its whole float32 tensors, by their native names."""
    import torch.distributed.checkpoint as dcp

    cfg = native_config(read_json(folder / "config.json"), folder)
    with torch.device("meta"):
        shapes = Transformer(cfg).state_dict()
    tensors = {name: torch.empty(t.shape, dtype=torch.float32) for name, t in shapes.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": tensors}, checkpoint_id=str(folder))
    return cfg, tensors

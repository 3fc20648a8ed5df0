"""Training checkpoints of sharded runs through torch.distributed.checkpoint (DCP): every rank writes its
own shards of the weights and optimizer state, in parallel; any number of ranks, one process included,
loads them back (DCP reshards at load time), and `flatstack convert DIR OUT --from dcp` or
`flatstack.load(DIR)` reads the weights whole (checkpoint/dcp.py).

The folder: the DCP shards and `.metadata`, `config.json` (the model's, in the native format's form),
`train_state.pt` (step, history, RNG states: rank 0's) and the tokenizer files. It is written beside its
final name and renamed into place by rank 0 once every rank has written, so a kill leaves the previous
checkpoint whole."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from flatstack.atomic import replace_dir
from flatstack.checkpoint.native import FORMAT_KEY, FORMAT_VERSION, copy_tokenizer, write_json
from flatstack.model import Transformer
from flatstack.parallel.world import World, barrier


def save_sharded(model: Transformer, optimizers: list, path: Path, train_state: dict, tokenizer_dir: Path,
                 w: World) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.with_name(path.name + ".tmp")
    if w.main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    weights, optim = get_state_dict(model, optimizers)
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(tmp))
    if w.main:
        write_json(tmp / "config.json", {FORMAT_KEY: FORMAT_VERSION, **model.cfg.to_dict()})
        copy_tokenizer(Path(tokenizer_dir), tmp)
        torch.save(train_state, tmp / "train_state.pt")
        replace_dir(tmp, path)
    barrier()
    return path


def load_sharded(model: Transformer, optimizers: list, path: Path) -> None:
    """Weights and optimizer state from a DCP checkpoint written by any number of ranks, into this
    process's model and optimizers (sharded or whole)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizers)
    state = {"model": weights, "optim": optim}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])

"""Training checkpoints of sharded runs through torch.distributed.checkpoint (DCP): every rank writes its
own shards of the weights and optimizer state, in parallel; any number of ranks, one process included,
loads them back (DCP reshards at load time), and `flatstack convert DIR OUT --from dcp` or
`flatstack.load(DIR)` reads the weights whole (checkpoint/dcp.py).

The folder: the DCP shards and `.metadata`, `config.json` (the model's, in the native format's form),
`train_state.pt` (step, history, RNG states: rank 0's) and the tokenizer files. It is written beside its
final name and renamed into place by rank 0 once every rank has written, so a kill leaves the previous
checkpoint whole. With a background group, the shards are written while training goes on and the
folder is renamed once they are all written (at the next checkpoint or at the end of the run)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from flatstack.atomic import replace_dir
from flatstack.checkpoint.native import FORMAT_KEY, FORMAT_VERSION, copy_tokenizer, write_json
from flatstack.model import Transformer
from flatstack.parallel.world import World, barrier


def save_sharded(model: Transformer, optimizers: list, path: Path, train_state: dict, tokenizer_dir: Path,
                 w: World, background=None) -> Callable[[], Path]:
    """Write the checkpoint; returns what completes it (waits for the shards, renames the folder into place)
    and must be called on every rank. `background`: a process group of its own (gloo) to write the shards
    on a thread while training goes on (DCP's async_save copies them to host memory first); then the
    checkpoint exists only once its completion is called."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.with_name(path.name + ".tmp")
    if w.main:  # the small files first, as of this step: the shards may still be in flight at the next one
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_json(tmp / "config.json", {FORMAT_KEY: FORMAT_VERSION, **model.cfg.to_dict()})
        copy_tokenizer(Path(tokenizer_dir), tmp)
        torch.save(train_state, tmp / "train_state.pt")
    barrier()
    weights, optim = get_state_dict(model, optimizers)
    state = {"model": weights, "optim": optim}
    future = None
    if background is None:
        dcp.save(state, checkpoint_id=str(tmp))
    else:
        future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=background)

    def complete() -> Path:
        if future is not None:
            future.result()
        barrier()  # every rank's shards written
        if w.main:
            replace_dir(tmp, path)
        barrier()
        return path

    return complete


def load_sharded(model: Transformer, optimizers: list, path: Path) -> None:
    """Weights and optimizer state from a DCP checkpoint written by any number of ranks, into this
    process's model and optimizers (sharded or whole)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizers)
    state = {"model": weights, "optim": optim}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])

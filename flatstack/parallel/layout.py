"""How a training job's ranks split the work, applied around the unchanged model as torchtitan does: the
plans (tensor.py, expert.py), then FSDP2 (fsdp.py) over the data-parallel ranks.

- data parallel only: every rank its own slice of each batch, everything sharded over all ranks;
- `tp` (tensor parallel): a 2-D mesh (dp, tp); the `tp` ranks of a group share one slice of the batch and
  split each block's attention and MLP; FSDP2 shards over the dp dimension;
- `ep` (expert parallel): every rank its own slice of the batch; each MoE layer's experts split over groups
  of `ep` ranks (a 2-D mesh (edp, ep)), the expert shards sharded by FSDP2 over edp, the rest over all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from flatstack.model import Transformer
from flatstack.parallel.expert import apply_expert_parallel
from flatstack.parallel.fsdp import shard
from flatstack.parallel.tensor import apply_tensor_parallel


@dataclass(frozen=True)
class Layout:
    dp: int = 1  # groups of ranks that read different data
    dp_rank: int = 0  # this rank's group
    tp: int = 1  # ranks of a group, sharing its data
    ep: int = 1


def check_degrees(ranks: int, tp: int, ep: int) -> None:
    if tp > 1 and ep > 1:
        raise ValueError("tensor and expert parallel together are not built: pick --tp or --ep")
    for name, n in (("--tp", tp), ("--ep", ep)):
        if n < 1 or ranks % n:
            raise ValueError(f"{name} {n} does not divide the {ranks} ranks")


def parallelize(model: Transformer, rank: int, ranks: int, device: torch.device, tp: int = 1, ep: int = 1) -> Layout:
    from torch.distributed.device_mesh import init_device_mesh

    check_degrees(ranks, tp, ep)
    # DTensor warns at every step that a norm or a whole matrix (Muon's) over a 2-D mesh takes two collectives
    # instead of one: it does, on tensors the size of one matrix, which costs nothing worth a warning a step
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    kind = device.type
    if tp > 1:
        mesh = init_device_mesh(kind, (ranks // tp, tp), mesh_dim_names=("dp", "tp"))
        apply_tensor_parallel(model, mesh["tp"])
        shard(model, mesh["dp"])
        return Layout(ranks // tp, mesh["dp"].get_local_rank(), tp, 1)
    mesh = init_device_mesh(kind, (ranks,), mesh_dim_names=("dp",))
    experts = None
    if ep > 1:
        if not model.cfg.is_moe:
            raise ValueError("--ep splits the experts of a mixture-of-experts model; this model is dense")
        expert_mesh = init_device_mesh(kind, (ranks // ep, ep), mesh_dim_names=("edp", "ep"))
        apply_expert_parallel(model, expert_mesh["ep"])
        experts = expert_mesh["edp"]
    shard(model, mesh, experts)
    return Layout(ranks, rank, 1, ep)

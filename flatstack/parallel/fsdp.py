"""FSDP2 data parallel: parameters, gradients and optimizer state sharded over the ranks."""

from __future__ import annotations

import functools

import torch
from torch.distributed.device_mesh import DeviceMesh

from flatstack.model import Transformer


def shard(model: Transformer, mesh: DeviceMesh | None = None, experts: DeviceMesh | None = None) -> None:
    """fully_shard each block, then the root (the embedding, the final norm, the head), over `mesh` (default:
    every rank). On GPUs the parameters are gathered in bf16 and gradients reduced in float32 (the master
    weights stay float32). `hidden` is registered as a forward method so calling it gathers the root's
    parameters, which stay gathered until the backward (the fused loss reads the head weight after it).

    `experts` (expert parallel): the MoE stacks, already split over the EP ranks, are sharded over these
    other ranks, in a unit of their own; the router joins its block's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    cuda = model.tok_embeddings.weight.device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda \
        else MixedPrecisionPolicy()
    ranks = (mesh.size() if mesh is not None else torch.distributed.get_world_size())
    place = functools.partial(balanced, ranks=ranks)
    for block in model.layers:
        if experts is not None:
            fully_shard(block.ffn.router, mesh=mesh, mp_policy=policy, shard_placement_fn=place)
            fully_shard(block.ffn, mesh=experts, mp_policy=policy,
                        shard_placement_fn=functools.partial(balanced, ranks=experts.size()))
            # an expert's gradient sums the tokens of every rank (they came through the all-to-all), so it is
            # divided by all the data-parallel ranks, not only by those its unit reduces over
            block.ffn.set_force_sum_reduction_for_comms(True)
            block.ffn.set_gradient_divide_factor(float(ranks))
        fully_shard(block, mesh=mesh, mp_policy=policy, shard_placement_fn=place)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, shard_placement_fn=place)
    register_fsdp_forward_method(model, "hidden")


def balanced(p: torch.Tensor, ranks: int):
    """Shard along dim 0 (FSDP2's default) unless it has fewer rows than there are ranks: Grok-1's 8 expert
    stacks over 64 ranks would leave 56 ranks none and the other 8 an eighth of every stack each (and one
    expert per EP rank, over 8 more, 7 of them none). Then
    along the largest dim the ranks divide evenly (FSDP2 shards other dims evenly only), if there is one."""
    from torch.distributed.tensor import DTensor, Shard

    shape = p.to_local().shape if isinstance(p, DTensor) else p.shape  # an expert-parallel stack: this rank's experts
    even = [d for d in range(1, p.ndim) if shape[d] % ranks == 0]
    if p.ndim < 2 or shape[0] >= ranks or not even:
        return None
    return Shard(max(even, key=lambda d: p.shape[d]))

"""FSDP2 data parallel: parameters, gradients and optimizer state sharded over the ranks."""

from __future__ import annotations

import torch

from flatstack.model import Transformer


def shard(model: Transformer) -> None:
    """fully_shard each block, then the root (the embedding, the final norm, the head). On GPUs the
    parameters are gathered in bf16 and gradients reduced in float32 (the master weights stay float32).
    `hidden` is registered as a forward method so calling it gathers the root's parameters, which stay
    gathered until the backward (the fused loss reads the head weight after it)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    cuda = model.tok_embeddings.weight.device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=policy, shard_placement_fn=balanced)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False, shard_placement_fn=balanced)
    register_fsdp_forward_method(model, "hidden")


def balanced(p: torch.Tensor):
    """Shard along dim 0 (FSDP2's default) unless it has fewer rows than there are ranks: Grok-1's 8 expert
    stacks over 64 ranks would leave 56 ranks none and the other 8 an eighth of every stack each. Then
    along the largest dim the ranks divide evenly (FSDP2 shards other dims evenly only), if there is one."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    ranks = dist.get_world_size()
    even = [d for d in range(1, p.ndim) if p.shape[d] % ranks == 0]
    if p.ndim < 2 or p.shape[0] >= ranks or not even:
        return None
    return Shard(max(even, key=lambda d: p.shape[d]))

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
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden")

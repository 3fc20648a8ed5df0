"""The training losses, and what the trainer applies around the unchanged model to compute them: the
fused LM-head cross-entropy, MoE load-balance and z-losses from router logits captured by forward hooks,
and activation checkpointing around each block."""

from __future__ import annotations

import torch

from flatstack.kernels.linear_cross_entropy import linear_cross_entropy
from flatstack.model import MoE, Transformer


def token_loss_sum(model: Transformer, hidden: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None):
    """Cross-entropy summed over the targets, each weighted (by a loss mask, a 1/count, or both), from the
    final hidden states through the fused LM-head-and-loss op."""
    return linear_cross_entropy(hidden.flatten(0, 1), model.head_weight, y.flatten(),
                                None if weights is None else weights.flatten(), model.cfg.output_multiplier,
                                model.cfg.final_logit_softcap)


class RouterLogits:
    """The router logits of every MoE layer's forwards since the last `take()`, captured by forward hooks
    on the routers (the model keeps nothing for its callers)."""

    def __init__(self, model: Transformer):
        self.seen: list[tuple[torch.Tensor, MoE]] = []
        for m in model.modules():
            if isinstance(m, MoE):
                m.router.register_forward_hook(lambda _, __, out, moe=m: self.seen.append((out.float(), moe)))

    def take(self) -> list[tuple[torch.Tensor, MoE]]:
        seen, self.seen = self.seen, []
        return seen


def moe_losses(routed: list[tuple[torch.Tensor, MoE]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Load-balancing loss (E * sum_e f_e P_e, Switch Transformer) and router z-loss, averaged over layers,
    from each MoE layer's router logits."""
    balance, z = [], []
    for logits, m in routed:
        probs = logits.softmax(-1)
        chosen = probs.topk(m.cfg.experts_per_token, dim=-1).indices
        counts = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / m.cfg.experts_per_token
        balance.append(m.cfg.n_experts * (counts * probs.mean(0)).sum())
        z.append(torch.logsumexp(logits, dim=-1).pow(2).mean())
    if not balance:
        zero = torch.zeros(())
        return zero, zero
    return torch.stack(balance).mean(), torch.stack(z).mean()


def apply_activation_checkpointing(model: Transformer) -> None:
    """Each block's activations recomputed in the backward pass: memory for compute. Applied around the
    unchanged blocks (torch's composable checkpoint, as torchtitan does), so the state dict keeps its names."""
    from torch.distributed._composable import checkpoint

    for block in model.layers:
        checkpoint(block)


def compile_blocks(model: Transformer) -> None:
    """Each block compiled on its own, as torchtitan does: the blocks' weights are the graph's inputs, so
    one graph serves every block, compile time does not grow with depth, and the embedding, the final norm
    and the fused loss around them stay as they are. Applied after activation checkpointing."""
    for block in model.layers:
        block.compile()

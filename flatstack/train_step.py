"""One optimizer step: its micro-batches' losses scaled so that the gradient is the mean over every counted
target of the step, on one process or on many; MoE losses; clipping; the logged values reduced over the
ranks in one collective."""

from __future__ import annotations

import math

import torch

from flatstack.losses import RouterLogits, moe_losses, token_loss_sum
from flatstack.model import Transformer
from flatstack.optim import clip_grad_norm, lr_multiplier
from flatstack.parallel.layout import Layout
from flatstack.parallel.world import all_sum
from flatstack.train_config import TrainConfig, TrainingError


def optimizer_step(model: Transformer, forward, router_logits: RouterLogits, optimizers: list, batches: list,
                   cfg: TrainConfig, step: int, autocast, layout: Layout | None = None) -> dict:
    """One optimizer step over its micro-batches: the loss is the mean over every counted target of the
    step, so accumulating 4 x 2 sequences equals a batch of 8. `layout`: how the ranks split the work (one
    process: None). Returns the step's metrics."""
    layout = layout or Layout()
    device = batches[0][0].device
    # every rank's loss is its share of the whole step's mean: the count is over every rank's targets (a
    # tensor-parallel group's ranks hold the same ones)
    counted = all_sum(sum(torch.tensor(float(y.numel()), device=device) if m is None else m.sum()
                          for _, y, m in batches)).clamp(min=1) / layout.tp
    mult = lr_multiplier(cfg, step)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
    loss_sum, aux_sum, z_sum = (torch.zeros((), device=device) for _ in range(3))
    accum = len(batches)
    ranks = layout.dp
    for x, y, mask in batches:
        # the mean over the whole step's counted targets, folded into per-target weights
        # (times the ranks: FSDP averages the ranks' gradients, and the step's gradient is their sum)
        weights = (torch.ones_like(y, dtype=torch.float32) if mask is None else mask) * (ranks / counted)
        router_logits.take()  # drop what forwards outside this step added (evaluation, samples, recomputation)
        with autocast:
            lm = token_loss_sum(model, forward(x), y, weights)
        balance, z = moe_losses(router_logits.take())
        loss = lm + (cfg.moe_aux_coef * balance + cfg.moe_z_coef * z) / accum
        loss.backward()
        loss_sum += lm.detach() / ranks
        aux_sum += balance.detach() / accum
        z_sum += z.detach() / accum
    norm = clip_grad_norm(model, cfg.grad_clip) if cfg.grad_clip > 0 else loss_sum
    # summed over the ranks (the MoE losses averaged), then one device-to-host copy for all that is logged
    logged = all_sum(torch.stack([loss_sum, aux_sum / ranks, z_sum / ranks])) / layout.tp
    loss_value, aux_value, z_value, norm_value = torch.cat([logged, norm.reshape(1)]).tolist()
    if not math.isfinite(loss_value):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        raise TrainingError(f"loss is {loss_value} at step {step + 1}")
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    record = {"step": step + 1, "loss": loss_value, "lr": cfg.lr * mult}
    if cfg.grad_clip > 0:
        record["grad_norm"] = norm_value
    if model.cfg.is_moe:
        record["moe_aux_loss"] = aux_value
        record["moe_z_loss"] = z_value
    return record

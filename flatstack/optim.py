"""Optimizers and the learning-rate schedule: AdamW for embeddings, norms and biases, Muon (momentum
orthogonalised by Newton-Schulz) or AdamW for matrices; warmup, then cosine, WSD or constant."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from flatstack.model import Transformer

if TYPE_CHECKING:
    from flatstack.train_config import TrainConfig


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g (batched over leading dims), by a quintic iteration
    tuned to converge fast on the small singular values (Jordan et al., Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        m = x @ x.mT
        x = a * x + (b * m + c * m @ m) @ x
    return (x.mT if tall else x).to(g.dtype)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2) tensor gathered whole: orthogonalisation needs each matrix entire."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(p: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """`update`, whole on every rank, as `p` is laid out: a sharded parameter takes its own slice (no
    communication)."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(p, DTensor):
        return update
    replicated = DTensor.from_local(update, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    return replicated.redistribute(p.device_mesh, p.placements)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Scale the gradients to a global norm of at most `max_norm`; returns the norm before, whole. The
    parameters of a parallel run lie on different meshes (the experts' and tensor-parallel ones, the rest),
    which one foreach norm cannot mix: each mesh's norm is taken apart, then combined."""
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for p in model.parameters():
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = [whole(torch.nn.utils.get_total_norm([p.grad for p in params])) for params in groups.values()]
    total = torch.stack(norms).norm() if len(norms) > 1 else norms[0]
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalise the update of each matrix (stacked experts: each expert).

    Matrices of one shape are orthogonalised together as one batch: a model's many small matrices
    would otherwise cost hundreds of tiny matmuls per step, in batches of at most BATCH_BYTES. Under FSDP2
    every rank gathers each update whole, orthogonalises all of them (the same work on each rank) and keeps
    its own slice."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # closure: the Optimizer API's (DCP's state setup passes None)
        for group in self.param_groups:
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p].setdefault("momentum", torch.zeros_like(p)).lerp_(p.grad, 1 - group["momentum"])
                tall = p.shape[-2] > p.shape[-1]  # all made wide, so same-size matrices batch together
                by_shape.setdefault((min(p.shape[-2:]), max(p.shape[-2:])), []).append((p, tall))
            for entries in by_shape.values():
                for batch in batches(entries, BATCH_BYTES):
                    self.update(batch, group)

    def update(self, entries: list, group: dict) -> None:
        """Orthogonalise a batch of same-shape matrices together and apply them: each update is gathered
        whole only here, so at most a batch of them exists at once."""
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        mats = []
        for p, tall in entries:
            m = whole(p.grad.lerp(self.state[p]["momentum"], mu)).reshape(-1, *p.shape[-2:])  # Nesterov
            mats.append(m.mT if tall else m)
        ortho, start = newton_schulz(torch.cat(mats)), 0
        for (p, tall), m in zip(entries, mats, strict=True):
            update = ortho[start : start + len(m)]
            start += len(m)
            update = like(p, (update.mT if tall else update).reshape(p.shape))
            scale = max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5
            p.mul_(1 - lr * wd).add_(update, alpha=-lr * scale)


BATCH_BYTES = 256 << 20  # whole updates orthogonalised at once, at most (a sharded model's can be huge)


def batches(entries: list, limit: int) -> list[list]:
    """Consecutive runs of `entries` (parameter, tall) whose whole float32 sizes stay under `limit` (a
    matrix larger than it goes alone)."""
    out: list[list] = [[]]
    size = 0
    for p, tall in entries:
        n = p.numel() * 4
        if out[-1] and size + n > limit:
            out.append([])
            size = 0
        out[-1].append((p, tall))
        size += n
    return out


def build_optimizers(model: Transformer, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """Weight decay on matrices only; with Muon, the hidden matrices go to Muon, the rest to AdamW."""
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden_matrix = p.ndim >= 2 and not name.startswith(("tok_embeddings", "output")) and "router" not in name
        if cfg.optimizer == "muon" and hidden_matrix:
            muon.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW runs on CPUs and GPUs in recent torch; foreach is the fallback
    kind = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kind)]
    if muon:
        opts.append(Muon(muon, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay))
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return opts


def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine or warmup-stable-decay down to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - 1 - cfg.warmup_steps)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = cfg.max_steps - int(cfg.decay_fraction * cfg.max_steps)
    if step < decay_start:
        return 1.0
    return 1 - (1 - lo) * (step - decay_start + 1) / max(1, cfg.max_steps - decay_start)



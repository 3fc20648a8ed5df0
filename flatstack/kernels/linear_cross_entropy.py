"""Cross-entropy of a linear layer's output (the LM head and the loss), fused and chunked.

The plain way materialises logits [N, V] (N tokens, V vocabulary), then log-softmax, then in the
backward pass a zero-filled gradient of the same size and a log-softmax backward: several passes over
the largest tensor of training. Here the rows go through in chunks; since the loss is the last op, the
gradient with respect to the logits (softmax - one-hot) is known in the forward pass already, so each
chunk's logits are turned into their gradient in place and multiplied out at once. The backward pass
only scales the stored gradients by the incoming scalar. The same matmuls, a fraction of the memory
traffic, and logits never held whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in float32


def reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor | None = None,
              scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """sum_i row_weights[i] * cross-entropy(cap((h @ weight.T * scale)[i]), targets[i]), cap(z) =
    softcap * tanh(z / softcap) when a soft cap is given."""
    logits = F.linear(h, weight).float() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits, targets, reduction="none")
    return ce.sum() if row_weights is None else (ce * row_weights).sum()


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, row_weights, scale: float, softcap: float | None):
        n, vocab = h.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = None
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            hc, tc = h[start:end], targets[start:end]
            logits = (hc @ weight.T).float()
            if scale != 1.0:
                logits.mul_(scale)
            if softcap is not None:  # keep tanh for the gradient: d cap(z) / dz = 1 - tanh^2
                t = logits.div_(softcap).tanh_()
                logits = t * softcap
            # One exp pass, in place: e = exp(logits - max), lse = max + log(sum e), softmax = e / sum e.
            target_logit = logits.gather(1, tc[:, None]).squeeze(1)
            peak = logits.amax(dim=-1)
            e = logits.sub_(peak[:, None]).exp_()
            total = e.sum(dim=-1)
            ce = peak + total.log() - target_logit
            wc = torch.ones_like(ce) if row_weights is None else row_weights[start:end].float()
            loss += (ce * wc).sum()
            if not want_grad:
                continue
            # d loss / d logits = w * scale * (softmax - one_hot)
            grad = e.mul_((wc * scale / total)[:, None])
            grad.scatter_add_(1, tc[:, None], -(wc * scale)[:, None])
            if softcap is not None:
                grad.mul_(1 - t * t)
            grad = grad.to(h.dtype)
            grad_h[start:end] = grad @ weight
            grad_w = grad.T @ hc if grad_w is None else grad_w.addmm_(grad.T, hc)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # in place: these buffers are used once, and a fresh copy of [V, D] is a pass over memory
        return grad_h.mul_(grad_loss.to(grad_h.dtype)), grad_w.mul_(grad_loss.to(grad_w.dtype)), None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         row_weights: torch.Tensor | None = None, scale: float = 1.0,
                         softcap: float | None = None) -> torch.Tensor:
    """h [N, D], weight [V, D], targets [N] int64, row_weights [N] or None -> weighted summed cross-entropy
    (float32). Row weights carry both a loss mask and the 1/count of a mean; `softcap` caps the scaled
    logits (Grok-2's final soft cap)."""
    return LinearCrossEntropy.apply(h, weight, targets, row_weights, scale, softcap)

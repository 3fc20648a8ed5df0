"""Attention's reference: the one plain-torch definition that every fast path is held to (the model's
fused SDPA call, the paged decode attention in torch and in C, the compiled decode step's form).

Queries attend causally to keys at or before their own position, within an optional sliding window,
with optional tanh soft-capping of the logits (Grok's). The queries sharing a KV head go together as
rows of one matmul, so keys and values are never repeated per query head.
"""

from __future__ import annotations

import torch


def causal_mask(T: int, S: int, window: int | None, device) -> torch.Tensor:
    """[T, S] boolean, True where query i (at position S - T + i) may see key j."""
    qpos = torch.arange(S - T, S, device=device)[:, None]
    kpos = torch.arange(S, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float | None = None,
              window: int | None = None) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, Hkv, S, D]; the T queries are the last T of the S positions -> [B, H, T, D].
    Logits and softmax in float32."""
    B, H, T, D = q.shape
    S, Hkv = k.shape[2], k.shape[1]
    group = H // Hkv
    logits = (q.reshape(B, Hkv, group * T, D) @ k.transpose(-1, -2)).float() * scale
    logits = logits.view(B, Hkv, group, T, S)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    probs = torch.softmax(logits.masked_fill(~causal_mask(T, S, window, q.device), float("-inf")), dim=-1)
    return (probs.to(v.dtype).view(B, Hkv, group * T, S) @ v).view(B, H, T, D)

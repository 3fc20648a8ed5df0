"""Attention's reference: the one plain-torch definition that every fast path is held to (the model's
fused SDPA call, FlexAttention, the paged decode attention in torch and in C, the compiled decode
step's form).

`flex` is the same attention through FlexAttention: the soft cap as a score_mod, the causal (and
sliding-window) mask as a block mask with the queries' offset into the keys (chunked prefill), GQA
without repeating keys, and never the [T, S] matrix, which at Grok-1's 8,192-token context is 12.9 GB
a layer in float32. Compiled once per shape; on GPUs it has a backward, on the CPU a forward only.

Queries attend causally to keys at or before their own position, within an optional sliding window,
with optional tanh soft-capping of the logits (Grok's). The queries sharing a KV head go together as
rows of one matmul, so keys and values are never repeated per query head.
"""

from __future__ import annotations

import functools

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


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.cache
def softcap_score(cap: float):
    """The soft cap as a score_mod; one function per cap, so the compiled graph is reused, not re-guarded."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return score_mod


@functools.lru_cache(maxsize=64)
def causal_block_mask(T: int, S: int, window: int | None, device: str):
    """`causal_mask` as FlexAttention's block mask: query i sits at position S - T + i."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = S - T

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx + offset
        if window is not None:
            visible = visible & (kv_idx > q_idx + offset - window)
        return visible

    return create_block_mask(mask_mod, None, None, T, S, device=device)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float | None = None,
         window: int | None = None) -> torch.Tensor:
    """`reference` through FlexAttention: q [B, H, T, D]; k, v [B, Hkv, S, D] -> [B, H, T, D]."""
    T, S = q.shape[2], k.shape[2]
    return compiled_flex()(q, k, v, score_mod=None if softcap is None else softcap_score(softcap),
                           block_mask=causal_block_mask(T, S, window, str(q.device)), scale=scale,
                           enable_gqa=q.shape[1] != k.shape[1])

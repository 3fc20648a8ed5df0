"""Attention's reference: the one plain-torch definition that every fast path is held to (the model's
fused SDPA call, FlexAttention, the paged decode attention in torch and in C, the compiled decode
step's form).

`flex` is the same attention through FlexAttention: the soft cap as a score_mod, the causal (and
sliding-window) mask as a block mask with the queries' offset into the keys (chunked prefill), GQA
without repeating keys, and never the [T, S] matrix, which at Grok-1's 8,192-token context is 12.9 GB
a layer in float32. Compiled once per shape; on GPUs it has a backward, on the CPU a forward only.
`packed` is FlexAttention over the prompt chunks of several sequences packed in one row (the engine's
prefill): each query sees the keys of its own sequence up to its own position, given as per-token
sequence ids and positions, so no Python loop over the sequences runs.

Queries attend causally to keys at or before their own position, within an optional sliding window,
with optional tanh soft-capping of the logits (Grok's). The queries sharing a KV head go together as
rows of one matmul, so keys and values are never repeated per query head.
"""

from __future__ import annotations

import functools
import math

import torch


def causal_mask(T: int, S: int, window: int | None, device) -> torch.Tensor:
    """[T, S] boolean, True where query i (at position S - T + i) may see key j."""
    qpos = torch.arange(S - T, S, device=device)[:, None]
    kpos = torch.arange(S, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def temperature(T: int, S: int, length: int, device) -> torch.Tensor:
    """Grok-2's attention temperature [T] for the last T of S positions."""
    return temperature_at(torch.arange(S - T, S, device=device), length)


def temperature_at(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Grok-2's attention temperature of queries at these 0-based positions: log2(p) / log2(length) where
    p > length, else 1 (SGLang's extend and decode attention kernels), float32."""
    p = positions.float()
    return torch.where(p > length, torch.log2(p.clamp(min=1)) / math.log2(length), torch.ones_like(p))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float | None = None,
              window: int | None = None, temperature_len: int | None = None) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, Hkv, S, D]; the T queries are the last T of the S positions -> [B, H, T, D].
    Logits and softmax in float32; the temperature multiplies the capped logits."""
    B, H, T, D = q.shape
    S, Hkv = k.shape[2], k.shape[1]
    group = H // Hkv
    logits = (q.reshape(B, Hkv, group * T, D) @ k.transpose(-1, -2)).float() * scale
    logits = logits.view(B, Hkv, group, T, S)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature_len is not None:
        logits = logits * temperature(T, S, temperature_len, q.device)[:, None]
    probs = torch.softmax(logits.masked_fill(~causal_mask(T, S, window, q.device), float("-inf")), dim=-1)
    return (probs.to(v.dtype).view(B, Hkv, group * T, S) @ v).view(B, H, T, D)


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # one graph per shape (dynamic shapes fail to lower with a mask over per-token tensors): training's
    # one length, and the packed prefill's power-of-two buckets (a few query by several context sizes)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


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
         window: int | None = None, temperature_len: int | None = None) -> torch.Tensor:
    """`reference` through FlexAttention: q [B, H, T, D]; k, v [B, Hkv, S, D] -> [B, H, T, D]."""
    T, S = q.shape[2], k.shape[2]
    score_mod = None if softcap is None else softcap_score(softcap)
    if temperature_len is not None:
        score_mod = tempered_score(score_mod, temperature(T, S, temperature_len, q.device))
    return compiled_flex()(q, k, v, score_mod=score_mod,
                           block_mask=causal_block_mask(T, S, window, str(q.device)), scale=scale,
                           enable_gqa=q.shape[1] != k.shape[1])


def tempered_score(score_mod, tau: torch.Tensor):
    """`score_mod` (the soft cap, or none), then times each query's temperature `tau` [T]."""

    def tempered(score, b, h, q_idx, kv_idx):
        capped = score if score_mod is None else score_mod(score, b, h, q_idx, kv_idx)
        return capped * tau[q_idx]

    return tempered


def bucket(n: int, least: int) -> int:
    """The power of two >= n (and >= least): packed shapes padded to a few sizes, compiled once each."""
    return max(least, 1 << (n - 1).bit_length())


def packed_mask(q_seq: torch.Tensor, q_pos: torch.Tensor, k_seq: torch.Tensor, k_pos: torch.Tensor,
                window: int | None = None):
    """The block mask of `packed`: T query tokens, token i of sequence q_seq[i] at position q_pos[i], and S
    keys likewise; query i sees key j when they belong to one sequence and k_pos[j] <= q_pos[i] (within
    the window). T and S are padded to powers of two with ids no token has, so the compiled kernel sees a
    few shapes, not one per step. Built once a step, for every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    T, S = len(q_seq), len(k_seq)
    Tp, Sp = bucket(T, 128), bucket(S, 128)
    pad = torch.nn.functional.pad
    q_seq, q_pos = pad(q_seq, (0, Tp - T), value=-1), pad(q_pos, (0, Tp - T))
    k_seq, k_pos = pad(k_seq, (0, Sp - S), value=-2), pad(k_pos, (0, Sp - S))

    def mask_mod(b, h, q_idx, kv_idx):
        visible = (q_seq[q_idx] == k_seq[kv_idx]) & (k_pos[kv_idx] <= q_pos[q_idx])
        if window is not None:
            visible = visible & (k_pos[kv_idx] > q_pos[q_idx] - window)
        return visible

    return create_block_mask(mask_mod, None, None, Tp, Sp, device=str(q_seq.device))


def packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float,
           softcap: float | None = None, tau: torch.Tensor | None = None) -> torch.Tensor:
    """q [1, H, T, D], k, v [1, Hkv, S, D] as `packed_mask` describes them -> [1, H, T, D]; `tau` [T]: each
    query's temperature (Grok-2)."""
    T, S = q.shape[2], k.shape[2]
    Tp, Sp = block_mask.seq_lengths
    pad = torch.nn.functional.pad
    q, k, v = pad(q, (0, 0, 0, Tp - T)), pad(k, (0, 0, 0, Sp - S)), pad(v, (0, 0, 0, Sp - S))
    score_mod = None if softcap is None else softcap_score(softcap)
    if tau is not None:
        score_mod = tempered_score(score_mod, pad(tau, (0, Tp - T), value=1.0))
    out = compiled_flex()(q, k, v, score_mod=score_mod,
                          block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[:, :, :T]

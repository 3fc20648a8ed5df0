"""Decode attention through block tables: each sequence's one new query against its cached context.

The KV pool holds, per layer, keys and values [n_kv_heads, num_blocks, block_size, head_dim]. Sequence b
owns the blocks block_tables[b] (padded to a common width) and has lengths[b] cached positions, the last
of which is its query's own. The batched torch path picks every sequence's blocks in one index_select
and puts the query heads sharing a KV head together as rows of one matmul, so the context is gathered
once per layer and never repeated per query head. The reference loops over sequences and heads.
"""

from __future__ import annotations

import torch


def context_mask(lengths: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """[B, width] True where a key position is in sequence b's context (and sliding window)."""
    pos = torch.arange(width, device=lengths.device)[None, :]
    visible = pos < lengths[:, None]
    if window is not None:
        visible &= pos >= lengths[:, None] - window
    return visible


def gather_blocks(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """pool [Hkv, num_blocks, bs, D], block ids [n] -> [Hkv, n, bs, D]. One head at a time: picking whole
    rows of a contiguous [num_blocks, bs * D] is a plain copy per block, several times faster than an
    index_select along the pool's second axis."""
    out = pool.new_empty(pool.shape[0], len(ids), *pool.shape[2:])
    for h in range(pool.shape[0]):
        torch.index_select(pool[h], 0, ids, out=out[h])
    return out


def reference(q, k_pool, v_pool, block_tables, lengths, scale: float, softcap: float | None = None,
              window: int | None = None) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D], one sequence and one head at a time."""
    B, H, D = q.shape
    Hkv, _, bs, _ = k_pool.shape
    out = torch.empty_like(q)
    for b in range(B):
        n = int(lengths[b])
        blocks = block_tables[b, : -(-n // bs)]
        k = k_pool[:, blocks].reshape(Hkv, -1, D)[:, :n]
        v = v_pool[:, blocks].reshape(Hkv, -1, D)[:, :n]
        first = 0 if window is None else max(0, n - window)
        for h in range(H):
            kv = h // (H // Hkv)
            logits = (k[kv, first:].float() @ q[b, h].float()) * scale
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            out[b, h] = (logits.softmax(-1) @ v[kv, first:].float()).to(q.dtype)
    return out


def paged_decode_attention(q, k_pool, v_pool, block_tables, lengths, scale: float, softcap: float | None = None,
                           window: int | None = None) -> torch.Tensor:
    """q [B, H, D]; pools [Hkv, num_blocks, bs, D]; block_tables [B, n] int64; lengths [B] -> [B, H, D]."""
    B, H, D = q.shape
    Hkv, _, bs, _ = k_pool.shape
    S = block_tables.shape[1] * bs
    ids = block_tables.flatten()
    k = gather_blocks(k_pool, ids).view(Hkv, B, S, D)
    v = gather_blocks(v_pool, ids).view(Hkv, B, S, D)
    qg = q.view(B, Hkv, H // Hkv, D).transpose(0, 1)  # [Hkv, B, group, D]
    logits = (qg @ k.transpose(-1, -2)).float() * scale  # [Hkv, B, group, S]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits.masked_fill_(~context_mask(lengths, S, window)[None, :, None, :], float("-inf"))
    out = logits.softmax(-1).to(v.dtype) @ v  # [Hkv, B, group, D]
    return out.transpose(0, 1).reshape(B, H, D)

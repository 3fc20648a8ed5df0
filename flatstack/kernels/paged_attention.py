"""Decode attention through block tables: each sequence's one new query against its cached context.

The KV pool holds, per layer, keys and values [n_kv_heads, num_blocks, block_size, head_dim]. Sequence b
owns the blocks block_tables[b] (padded to a common width) and has lengths[b] cached positions, the last
of which is its query's own. The batched torch path picks every sequence's blocks in one index_select
and puts the query heads sharing a KV head together as rows of one matmul, so the context is gathered
once per layer and never repeated per query head. The reference gathers each sequence's context and
calls attention's one reference (kernels/attention.py).

`decode_attention` picks the C kernel (paged_attention.c, through kernels/native.py) for float32 CPU
pools: it reads each context where it lies, with no gathered copy. For CUDA tensors it picks the Triton
kernel (paged_decode_triton.py), which does the same on the GPU, splitting long contexts across programs.

`decode_attention_before_write` is the form a compiled decode step takes: the new token's key and value
are not in the pool yet (they are written once, for every layer, after the step), so the compiled
graph only reads the pool, through the block table inside its own loops, and never copies it.
"""

from __future__ import annotations

import torch

from flatstack.kernels import attention, native


def context_mask(lengths: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """[B, width] True where a key position is in sequence b's context (and sliding window)."""
    pos = torch.arange(width, device=lengths.device)[None, :]
    visible = pos < lengths[:, None]
    if window is not None:
        visible &= pos >= lengths[:, None] - window
    return visible


def gather_blocks(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """pool [Hkv, num_blocks, bs, D], block ids [n] -> [Hkv, n, bs, D]: one index_select of whole rows over
    the pool seen as [Hkv * num_blocks, bs * D], each row a plain copy (in a 32-sequence decode step:
    1.6x less time than one index_select per head, which was itself faster than advanced indexing
    along the blocks axis)."""
    heads, blocks = pool.shape[:2]
    rows = (torch.arange(heads, device=ids.device)[:, None] * blocks + ids[None, :]).flatten()
    return pool.reshape(heads * blocks, -1).index_select(0, rows).view(heads, len(ids), *pool.shape[2:])


def reference(q, k_pool, v_pool, block_tables, lengths, scale: float, softcap: float | None = None,
              window: int | None = None, temperature_len: int | None = None) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D]: each sequence's context read from its blocks, then attention's reference
    (kernels/attention.py) for its one query, the last of its positions."""
    B, H, D = q.shape
    Hkv, _, bs, _ = k_pool.shape
    out = torch.empty_like(q)
    for b in range(B):
        n = int(lengths[b])
        blocks = block_tables[b, : -(-n // bs)]
        k = k_pool[:, blocks].reshape(Hkv, -1, D)[None, :, :n]
        v = v_pool[:, blocks].reshape(Hkv, -1, D)[None, :, :n]
        out[b] = attention.reference(q[b][None, :, None], k, v, scale, softcap, window, temperature_len)[0, :, 0]
    return out


def paged_decode_attention(q, k_pool, v_pool, block_tables, lengths, scale: float, softcap: float | None = None,
                           window: int | None = None, temperature_len: int | None = None) -> torch.Tensor:
    """q [B, H, D]; pools [Hkv, num_blocks, bs, D]; block_tables [B, n] int64; lengths [B] -> [B, H, D].
    `temperature_len`: Grok-2's temperature of each query (at position lengths - 1) on the capped logits."""
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
    if temperature_len is not None:
        logits = logits * attention.temperature_at(lengths - 1, temperature_len)[None, :, None, None]
    logits.masked_fill_(~context_mask(lengths, S, window)[None, :, None, :], float("-inf"))
    out = logits.softmax(-1).to(v.dtype) @ v  # [Hkv, B, group, D]
    return out.transpose(0, 1).reshape(B, H, D)


def decode_attention(q, k_pool, v_pool, block_tables, lengths, scale: float, softcap: float | None = None,
                     window: int | None = None, temperature_len: int | None = None) -> torch.Tensor:
    """`paged_decode_attention`, in C where it can run: float32 or bfloat16 pools on the CPU, the kernels
    built; in Triton for CUDA tensors."""
    if q.is_cuda:
        from flatstack.kernels.paged_decode_triton import paged_decode

        return paged_decode(q, k_pool, v_pool, block_tables, lengths, scale, softcap, window,
                            temperature_len=temperature_len)
    if q.device.type == "cpu" and q.dtype == k_pool.dtype and q.dtype in (torch.float32, torch.bfloat16) \
            and native.library() is not None:
        return native.paged_decode(q, k_pool, v_pool, block_tables, lengths, scale, softcap, window, temperature_len)
    return paged_decode_attention(q, k_pool, v_pool, block_tables, lengths, scale, softcap, window, temperature_len)


def decode_attention_before_write(q, k_new, v_new, k_pool, v_pool, block_tables, context_lengths, scale: float,
                                  softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """q [B, H, D]; k_new, v_new [B, Hkv, D], the new token's own key and value, not yet in the pools;
    context_lengths [B] cached positions before it -> [B, H, D]: the same attention as writing the new
    key and value at position context_lengths[b] and calling `paged_decode_attention`.

    It runs inside the compiled decode step, so its products are written as broadcast reductions rather
    than matmuls: TorchInductor then reads the blocks through the table inside its own loops, with no
    gathered copy of the context and no call out to BLAS."""
    B, H, D = q.shape
    Hkv, _, bs, _ = k_pool.shape
    S = block_tables.shape[1] * bs
    k = k_pool[:, block_tables].reshape(Hkv, B, 1, S, D)
    v = v_pool[:, block_tables].reshape(Hkv, B, 1, S, D)
    qg = q.view(B, Hkv, H // Hkv, D).transpose(0, 1)  # [Hkv, B, group, D]
    own = (qg * k_new.transpose(0, 1)[:, :, None]).sum(-1, keepdim=True)
    logits = torch.cat([(qg[:, :, :, None] * k).sum(-1), own], dim=-1).float() * scale
    # [Hkv, B, group, S + 1]: the cached keys, then its own
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    pos = torch.arange(S + 1, device=q.device)[None, :]
    visible = (pos < context_lengths[:, None]) | (pos == S)
    if window is not None:  # the new token sits at position context_lengths[b]
        visible &= (pos >= context_lengths[:, None] + 1 - window) | (pos == S)
    probs = logits.masked_fill(~visible[None, :, None, :], float("-inf")).softmax(-1).to(v.dtype)
    out = (probs[..., :S, None] * v).sum(-2) + probs[..., S:] * v_new.transpose(0, 1)[:, :, None]  # [Hkv, B, g, D]
    return out.transpose(0, 1).reshape(B, H, D)

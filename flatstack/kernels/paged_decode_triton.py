"""Decode attention through block tables as a Triton kernel, for CUDA pools (`paged_attention.decode_attention`
picks it for CUDA tensors; it is imported only there and by tests, never when the package loads).

The torch path gathers every sequence's context into one copy before its matmuls; this kernel reads each
block where it lies in the pool, through the block table, and reads it once for all the query heads that
share its KV head: they are the rows of its tl.dot (padded to 16, the least M a GPU's tl.dot takes).
One program per (sequence, KV head, split). Long contexts are split along their blocks (flash-decoding)
so that a small batch still fills the GPU: each split keeps an online softmax in float32 and writes its
partial output and log-sum-exp, and a second small kernel weighs the splits together. The number of
programs depends on tensor shapes only and nothing reads `lengths` on the host, so a decode step that
calls it can be captured in a CUDA graph and replayed with new lengths.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # softmax in base 2: exp2 is the GPU's native exponential
TILE_KEYS = 64  # keys a loop step: 16-position blocks one at a time would make tl.dot tiles too thin to pay


@triton.jit
def _tanh(x):
    # tl has no tanh that every backend (and the interpreter) has; exp of -2|x| never overflows
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _block_range(length, window, split, SPLITS: tl.constexpr, BS: tl.constexpr, WINDOW: tl.constexpr):
    """This split's share [start, end) of the blocks holding visible keys: blocks wholly before the window
    are never visited, and the visible ones are shared evenly between the splits."""
    lo = 0
    if WINDOW:
        lo = tl.maximum(length - window, 0) // BS
    hi = tl.cdiv(length, BS)
    per = tl.cdiv(hi - lo, SPLITS)
    start = lo + split * per
    return start, tl.minimum(start + per, hi)


@triton.jit
def _logits(q, k, pos, length, scale, softcap, window, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
            PRECISION: tl.constexpr):
    """[ROWS, keys] float32 logits in base 2, -inf where a key is outside the context or window."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if SOFTCAP:
        s = softcap * _tanh(s / softcap)
    visible = pos < length
    if WINDOW:
        visible &= pos >= length - window
    return tl.where(visible[None, :], s * LOG2E, float("-inf"))


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, out_ptr, lse_ptr,
                  sq_b, sq_h, sk_h, sk_n, sk_s, sv_h, sv_n, sv_s, st_b, so_b, so_h, so_s,
                  scale, softcap, window, log2_temperature_len, temperature_len,
                  GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                  BS: tl.constexpr, TILE_BLOCKS: tl.constexpr, SPLITS: tl.constexpr, SOFTCAP: tl.constexpr,
                  WINDOW: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr, TEMPERATURE: tl.constexpr):
    """Program (sequence b, KV head, split): the group's query heads against the split's blocks, TILE_BLOCKS
    blocks a step; writes the output (DIRECT) or the split's normalised part and its base-2 log-sum-exp."""
    b = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)  # pool offsets can pass 2**31 elements
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + b).to(tl.int32)
    start, end = _block_range(length, window, split, SPLITS, BS, WINDOW)
    tau = 1.0
    if TEMPERATURE:  # Grok-2: the capped logits of the query at position length - 1 > L, times log2(p) / log2(L)
        p = (length - 1).to(tl.float32)
        tau = tl.where(length - 1 > temperature_len, tl.log2(tl.maximum(p, 1.0)) / log2_temperature_len, 1.0)
    rows = tl.arange(0, ROWS)
    d = tl.arange(0, DP)  # head_dim padded to a power of two: zero columns add nothing to q . k
    heads = kvh * GROUP + rows
    live = (rows < GROUP)[:, None] & (d < D)[None, :]  # rows past the group are padding for tl.dot: never stored
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=live, other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    keys = tl.arange(0, TILE_BLOCKS * BS)
    m = tl.full([ROWS], -1.0e30, tl.float32)  # finite, so an empty split never computes -inf - -inf
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DP], tl.float32)
    for j in range(start, end, TILE_BLOCKS):
        blk = j + keys // BS
        inside = blk < end
        there = inside[:, None] & (d < D)[None, :]
        ids = tl.load(tables_ptr + b * st_b + blk, mask=inside, other=0).to(tl.int64)
        slot = keys % BS
        k = tl.load(k_ptr + kvh * sk_h + ids[:, None] * sk_n + slot[:, None] * sk_s + d[None, :],
                    mask=there, other=0.0)
        pos = tl.where(inside, blk * BS + slot, length)  # keys past this split's blocks count as unseen
        s = _logits(q, k, pos, length, scale, softcap, window, SOFTCAP, WINDOW, PRECISION) * tau
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kvh * sv_h + ids[:, None] * sv_n + slot[:, None] * sv_s + d[None, :],
                    mask=there, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]  # an empty split (or length 0) writes zeros
    dest = out_ptr + b * so_b + heads[:, None] * so_h + split * so_s + d[None, :]
    tl.store(dest, out.to(out_ptr.dtype.element_ty), mask=live)
    if not DIRECT:
        lse = tl.where(total > 0, m + tl.log2(tl.where(total > 0, total, 1.0)), float("-inf"))  # no log of 0
        tl.store(lse_ptr + (b * tl.num_programs(1) * GROUP + heads) * SPLITS + split, lse, mask=rows < GROUP)


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, out_ptr, so_b, so_h, H, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                    D: tl.constexpr, DP: tl.constexpr):
    """One program per (sequence, query head): the splits' outputs weighed by their share of the softmax."""
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, DP)
    lse = tl.load(lse_ptr + row * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # no split saw a key (length 0): all weights zero, no NaN
    w = tl.exp2(lse - top)
    there = (s < SPLITS)[:, None] & (d < D)[None, :]
    part = tl.load(part_ptr + (row * SPLITS + s[:, None]) * D + d[None, :], mask=there, other=0.0)
    weight = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(weight > 0, weight, 1.0)
    tl.store(out_ptr + (row // H) * so_b + (row % H) * so_h + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_splits(batch: int, kv_heads: int, width: int, sms: int = 132) -> int:
    """Splits per (sequence, KV head) from shapes alone: enough programs to fill the SMs about twice, but no
    split shorter than 4 table entries (the combine then costs more than the parallelism buys), at most 32;
    a power of two, so eager steps of changing sizes compile a handful of variants, not one per count."""
    want = min(triton.cdiv(2 * sms, batch * kv_heads), width // 4, 32)
    return 1 << max(0, want.bit_length() - 1) if want > 1 else 1


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                 lengths: torch.Tensor, scale: float, softcap: float | None = None, window: int | None = None,
                 splits: int | None = None, temperature_len: int | None = None) -> torch.Tensor:
    """q [B, H, D]; pools [Hkv, num_blocks, bs, D]; block_tables [B, n]; lengths [B] -> [B, H, D] in q's
    dtype: `paged_attention.paged_decode_attention`, in one pass over the pool (two kernels when split)."""
    B, H, D = q.shape
    Hkv, _, bs, _ = k_pool.shape
    assert k_pool.stride(-1) == 1 and v_pool.stride(-1) == 1, "pools must be contiguous along head_dim"
    assert H % Hkv == 0 and bs & (bs - 1) == 0, (H, Hkv, bs)
    if splits is None:
        sms = sm_count(q.device.index or 0) if q.is_cuda else 132
        splits = choose_splits(B, Hkv, block_tables.shape[1], sms)
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    lengths = lengths.contiguous()
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    direct = splits == 1  # one split writes the output itself, with no scratch and no combine
    part = out if direct else torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
    lse = out if direct else torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    group, dp = H // Hkv, max(16, triton.next_power_of_2(D))  # tl.dot wants every side >= 16
    _split_kernel[(B, Hkv, splits)](
        q, k_pool, v_pool, block_tables, lengths, part, lse,
        q.stride(0), q.stride(1), *k_pool.stride()[:3], *v_pool.stride()[:3], block_tables.stride(0),
        part.stride(0), part.stride(1), 0 if direct else part.stride(2),
        scale, 1.0 if softcap is None else softcap, 0 if window is None else window,
        math.log2(temperature_len or 2), temperature_len or 0,
        GROUP=group, ROWS=max(16, triton.next_power_of_2(group)), D=D, DP=dp, BS=bs,
        TILE_BLOCKS=max(1, TILE_KEYS // bs), SPLITS=splits, SOFTCAP=softcap is not None, WINDOW=window is not None,
        PRECISION="ieee" if k_pool.dtype == torch.float32 else "tf32", DIRECT=direct,
        TEMPERATURE=temperature_len is not None)
    if not direct:
        _combine_kernel[(B * H,)](part, lse, out, out.stride(0), out.stride(1), H, SPLITS=splits,
                                  SPLITS_P2=triton.next_power_of_2(splits), D=D, DP=dp)
    return out

/* Decode attention through block tables for float32 or bfloat16 pools: the C form of
   `paged_decode_attention` (kernels/paged_attention.py), built and loaded by kernels/native.py.

   The torch path gathers every sequence's blocks into one padded copy and runs small matmuls over it;
   in a decode step of tens of sequences that copy, not the arithmetic, is most of the attention's time.
   Here each (sequence, KV head) reads its keys and values where they lie in the pool, once, for all the
   query heads that share them, and only up to the sequence's own length.

   q [B, H, D] float32; pools [Hkv, num_blocks, bs, D] (bfloat16 where kv_bf16); tables [B, width];
   lengths [B] (the query's own position included) -> out [B, H, D] float32. softcap <= 0: none;
   window <= 0: none; temperature_len > 0: Grok-2's temperature, the capped logits of a query at
   position p > L times log2(p) / log2(L). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec.h"

/* the dot product of one query head and one key, sixteen lanes at a time (the reduction the compiler
   makes of a plain loop ends in a chain of scalar adds through memory, which costs more than the
   products of a 64-wide head) */
static inline float dot(const float* a, const float* b, int64_t D) {
    int64_t Dv = D - D % 16;
    f16 acc = {0};
    for (int64_t d = 0; d < Dv; d += 16) acc += load16(a + d) * load16(b + d);
    float sum = hsum(acc);
    for (int64_t d = Dv; d < D; d++) sum += a[d] * b[d];
    return sum;
}

/* position s's row of D values in a pool, as float32: where the pool holds bfloat16, widened into buf */
static inline const float* pool_row(const void* pool, int kv_bf16, int64_t at, int64_t D, float* buf) {
    if (!kv_bf16) return (const float*)pool + at * D;
    const uint16_t* row = (const uint16_t*)pool + at * D;
    for (int64_t d = 0; d < D; d++) buf[d] = bf16_to_float(row[d]);
    return buf;
}

/* a row of D values, a cache line at a time: each block is a page of its own, where the hardware
   prefetcher starts cold */
static inline void prefetch_row(const void* pool, int kv_bf16, int64_t at, int64_t D) {
    int64_t bytes = D * (kv_bf16 ? 2 : 4);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char*)pool + at * bytes + b);
}

void paged_decode(const float* q, const void* k_pool, const void* v_pool, const int64_t* tables,
                  const int64_t* lengths, float* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                  int64_t num_blocks, int64_t bs, int64_t width, float scale, float softcap, int64_t window,
                  int64_t temperature_len, int64_t kv_bf16) {
    int64_t group = H / Hkv;
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t kv = 0; kv < Hkv; kv++) {
            int64_t n = lengths[b];
            int64_t first = window > 0 && n > window ? n - window : 0;
            float tau = temperature_len > 0 && n - 1 > temperature_len
                            ? log2f((float)(n - 1)) / log2f((float)temperature_len) : 1.0f;
            const int64_t* table = tables + b * width;
            const float* qb = q + (b * H + kv * group) * D;
            float* ob = out + (b * H + kv * group) * D;
            float* logits = malloc(sizeof(float) * (group * (n - first) + D));
            float* row = logits + group * (n - first); /* a bfloat16 row widened */
            for (int64_t s = first; s < n; s++) {
                const float* k = pool_row(k_pool, kv_bf16, (kv * num_blocks + table[s / bs]) * bs + s % bs, D, row);
                if (s + bs < n) /* the next block is elsewhere in the pool: ask for it a block ahead */
                    prefetch_row(k_pool, kv_bf16, (kv * num_blocks + table[(s + bs) / bs]) * bs + s % bs, D);
                for (int64_t g = 0; g < group; g++) {
                    float logit = dot(qb + g * D, k, D) * scale;
                    if (softcap > 0) logit = softcap * tanhf(logit / softcap);
                    logit *= tau;
                    logits[g * (n - first) + s - first] = logit;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float* lg = logits + g * (n - first);
                float top = -INFINITY, total = 0.0f;
                for (int64_t s = 0; s < n - first; s++) top = lg[s] > top ? lg[s] : top;
                for (int64_t s = 0; s < n - first; s++) lg[s] -= top;
                exp_inplace(lg, n - first);
                for (int64_t s = 0; s < n - first; s++) total += lg[s];
                for (int64_t s = 0; s < n - first; s++) lg[s] /= total;
                for (int64_t d = 0; d < D; d++) ob[g * D + d] = 0.0f;
            }
            for (int64_t s = first; s < n; s++) {
                const float* v = pool_row(v_pool, kv_bf16, (kv * num_blocks + table[s / bs]) * bs + s % bs, D, row);
                if (s + bs < n)
                    prefetch_row(v_pool, kv_bf16, (kv * num_blocks + table[(s + bs) / bs]) * bs + s % bs, D);
                for (int64_t g = 0; g < group; g++) {
                    float p = logits[g * (n - first) + s - first];
                    float* og = ob + g * D;
                    for (int64_t d = 0; d < D; d++) og[d] += p * v[d];
                }
            }
            free(logits);
        }
    }
}

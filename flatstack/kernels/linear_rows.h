/* A weight in one of the formats linear_rows.c reads, as kernels/native.py describes it (ctypes mirrors
   this struct). */

#pragma once

#include <stdint.h>

enum { FORMAT_F32 = 0, FORMAT_BF16 = 1, FORMAT_INT8 = 2, FORMAT_INT4 = 3 };

typedef struct {
    int64_t format, n, k;
    const void* w;      /* [n, k] float32 or bfloat16 or int8; int4: [n, k / 2] bytes, Q4_1's nibble order */
    const void* scale;  /* int8, int4: float16 [n, k / 32] */
    const void* low;    /* int4: float16 [n, k / 32], the block's offset (w = low + q * scale) */
    const float* bias;  /* [n] or NULL */
} Linear;

void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xs, float* xsum);
void linear_products(const Linear* const* Ls, float* const* ys, int count, const float* x, const int8_t* xq,
                     const float* xs, const float* xsum, int64_t M);
void linear_rows(const Linear* L, const float* x, float* y, int64_t M);

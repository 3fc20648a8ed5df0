/* Sixteen-float vectors in GCC's vector extension, shared by the C kernels beside this file (the
   compiler maps them to AVX-512, or to pairs of AVX2 registers). */

#pragma once

#include <string.h>

typedef float f16 __attribute__((vector_size(64)));
typedef float f8 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));

static inline f16 load16(const float* p) {
    f16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* halves added in registers: a chain of sixteen scalar adds, or a spill to memory, costs as much as
   the dot product of a short row */
static inline float hsum(f16 a) {
    f8 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    f4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* Sixteen-float vectors in GCC's vector extension, shared by the C kernels beside this file (the
   compiler maps them to AVX-512, or to pairs of AVX2 registers). */

#pragma once

#include <stdint.h>
#include <string.h>

typedef float f16 __attribute__((vector_size(64)));
typedef float f8 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));

static inline f16 load16(const float* p) {
    f16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* bfloat16 is float32's upper half: widening is a shift */
static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* rounded to nearest even, as torch's .to(torch.bfloat16); a NaN stays a (quiet) NaN */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

/* halves added in registers: a chain of sixteen scalar adds, or a spill to memory, costs as much as
   the dot product of a short row */
static inline float hsum(f16 a) {
    f8 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    f4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* exp over n floats in place. With AVX-512, Cephes' expf sixteen lanes at a time (a degree-5 polynomial on
   the range-reduced argument, within 2 ulp): libm's expf is a call per element, which in a softmax over a
   context or a SiLU over an FFN's width costs more than the products around it. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, x), x, _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline void exp_inplace(float* v, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(v + i, m, exp512(_mm512_maskz_loadu_ps(m, v + i)));
    }
}
#else
#include <math.h>
static inline void exp_inplace(float* v, int64_t n) {
    for (int64_t i = 0; i < n; i++) v[i] = expf(v[i]);
}
#endif

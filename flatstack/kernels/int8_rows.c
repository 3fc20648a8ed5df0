/* y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]: a few float32 rows x [M, K] times int8 weights q [N, K]
   with one float32 scale per output channel. Built and loaded by kernels/native.py.

   Decoding is bound by the bytes of weight read. Two things make this loop read faster than the
   reduction TorchInductor generates for the same product:
   - a software prefetch of the next step's rows: short rows end before the hardware prefetcher
     has ramped up;
   - four output rows per step, so four independent accumulators share each load of x. */

#include <stdint.h>

#include "vec.h"

#define V 16 /* lanes per accumulator */
#define R 4  /* output rows per step */
#define AHEAD 1 /* prefetch distance, in steps of R rows: the best of 1, 2, 4, 8, 16 */

/* sixteen int8 weights as floats; GCC scalarises a generic int8 -> float vector conversion, so the
   x86 forms are spelled out */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline f16 load_q(const int8_t* p) {
    return (f16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline f16 load_q(const int8_t* p) {
    union { __m256 half[2]; f16 v; } u;
    u.half[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
    u.half[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))));
    return u.v;
}
#else
static inline f16 load_q(const int8_t* p) {
    f16 v;
    for (int j = 0; j < V; j++) v[j] = p[j];
    return v;
}
#endif

static float dot(const float* x, const int8_t* q, int64_t K) {
    int64_t Kv = K - K % V;
    f16 a = {0};
    for (int64_t k = 0; k < Kv; k += V) a += load16(x + k) * load_q(q + k);
    float s = hsum(a);
    for (int64_t k = Kv; k < K; k++) s += x[k] * q[k];
    return s;
}

void int8_rows(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N, int64_t K) {
    int64_t steps = N / R, Kv = K - K % V;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < steps; g++) {
        const int8_t *q0 = q + g * R * K, *q1 = q0 + K, *q2 = q1 + K, *q3 = q2 + K;
        /* a later step's rows, R * V bytes of them per k step: one cache line */
        const int8_t* ahead = g + AHEAD < steps ? q0 + AHEAD * R * K : q0;
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K;
            f16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t k = 0; k < Kv; k += V) {
                if (m == 0) __builtin_prefetch(ahead + R * k);
                f16 xv = load16(xm + k);
                a0 += xv * load_q(q0 + k);
                a1 += xv * load_q(q1 + k);
                a2 += xv * load_q(q2 + k);
                a3 += xv * load_q(q3 + k);
            }
            float s[R] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
            for (int64_t k = Kv; k < K; k++) {
                s[0] += xm[k] * q0[k];
                s[1] += xm[k] * q1[k];
                s[2] += xm[k] * q2[k];
                s[3] += xm[k] * q3[k];
            }
            for (int r = 0; r < R; r++) y[m * N + g * R + r] = s[r] * scale[g * R + r];
        }
    }
    for (int64_t n = steps * R; n < N; n++) /* the last N % R rows */
        for (int64_t m = 0; m < M; m++) y[m * N + n] = dot(x + m * K, q + n * K, K) * scale[n];
}

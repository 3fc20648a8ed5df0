/* y [M, N] = x [M, K] times a weight [N, K] in one of four formats, for the 1 to 64 rows of a decode
   step. Built and loaded by kernels/native.py; kernels/linear.py holds the torch references.

   A decode step reads every weight byte once and does a few multiply-adds with it, so the loops are
   built around the weight stream:
   - a tile of R weight rows times up to MT activation rows: R * MT independent accumulators share each
     weight load (unpacked once, used MT times) and each activation load (used R times);
   - a software prefetch of the rows a few tiles on: short rows end before the hardware prefetcher ramps
     up. Float tiles spread it over all their passes over the activation rows, a few lines a step.
   Quantised weights (int8 and int4, both in blocks of 32 along K with float16 scales: GGUF's Q8_0 and
   Q4_1 layouts) meet activations quantised per row to int8 in blocks of 32 (as llama.cpp does): each
   block is one 32-byte integer dot product (VNNI's vpdpbusd), scaled once. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "linear_rows.h"
#include "vec.h"

#define R 4       /* weight rows per tile */
#define MT 4      /* activation rows per tile */
#define QB 32     /* quantisation block */
#define AHEAD 8192 /* prefetch distance in bytes of weight */
#define FLOAT_AHEAD 32768 /* the float tiles' (spread over a tile's passes, so farther) */

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000 | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else { /* subnormal: renormalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VECTOR 1

/* a full tile's sixteen accumulators acc[i][j] summed into y[i * N + j], with a tree of shuffles shared by
   all sixteen (45 instructions; one horizontal sum each would take about 130, a fifth of a tile's work) */
static inline void store_sums(__m512 acc[MT][R], float* y, int64_t N) {
    __m512 w[8], z[4], q[2];
    for (int k = 0; k < 8; k++) { /* v[k] = acc[k / 4][k % 4] */
        __m512 a = acc[k / 4][k % 4], b = acc[(k + 8) / 4][(k + 8) % 4];
        w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int k = 0; k < 4; k++)
        z[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[k], w[k + 4], 0x88), _mm512_shuffle_f32x4(w[k], w[k + 4], 0xDD));
    for (int k = 0; k < 2; k++)
        q[k] = _mm512_add_ps(_mm512_shuffle_ps(z[k], z[k + 2], 0x44), _mm512_shuffle_ps(z[k], z[k + 2], 0xEE));
    __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(q[0], q[1], 0x88), _mm512_shuffle_ps(q[0], q[1], 0xDD));
    /* the tree leaves v[k]'s sum in lane ORDER[k] (an involution) */
    sums = _mm512_permutexvar_ps(_mm512_set_epi32(15, 13, 14, 12, 7, 5, 6, 4, 11, 9, 10, 8, 3, 1, 2, 0), sums);
    _mm_storeu_ps(y, _mm512_castps512_ps128(sums));
    _mm_storeu_ps(y + N, _mm512_extractf32x4_ps(sums, 1));
    _mm_storeu_ps(y + 2 * N, _mm512_extractf32x4_ps(sums, 2));
    _mm_storeu_ps(y + 3 * N, _mm512_extractf32x4_ps(sums, 3));
}

static inline __m512 load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

/* float32 and bfloat16 weights: sixteen lanes per accumulator; each step prefetches `lps` lines from pf on,
   into L2 (a constant in the full tile's instances, so that loop stays one straight run) */
static inline __attribute__((always_inline)) void float_tile(const float* x, const void* w, int bf16, float* y,
                                                             int64_t K, int64_t N, int mt, int r,
                                                             const char* pf, int lps) {
    __m512 acc[MT][R];
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < r; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t Kv = K - K % 16;
    for (int64_t k = 0; k < Kv; k += 16) {
        for (int l = 0; l < lps; l++) __builtin_prefetch(pf + 64 * l, 0, 2);
        pf += 64 * lps;
        __m512 wv[R];
        for (int j = 0; j < r; j++)
            wv[j] = bf16 ? load_bf16((const uint16_t*)w + j * K + k) : _mm512_loadu_ps((const float*)w + j * K + k);
        for (int i = 0; i < mt; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * K + k);
            for (int j = 0; j < r; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (mt == MT && r == R && Kv == K) {
        store_sums(acc, y, N);
        return;
    }
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < r; j++) {
            float s = _mm512_reduce_add_ps(acc[i][j]);
            for (int64_t k = Kv; k < K; k++)
                s += x[i * K + k] * (bf16 ? bf16_to_float(((const uint16_t*)w)[j * K + k]) : ((const float*)w)[j * K + k]);
            y[i * N + j] = s;
        }
}

/* activations quantised per row in blocks of 32: x ~ xs[b] * xq, and xsum[b] = xs[b] * the sum of the
   block's xq (int4's offset term needs it); rounding to nearest even, as nearbyintf and torch.round */
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xs, float* xsum) {
    for (int64_t i = 0; i < M * (K / QB); i++) {
        __m512 a = _mm512_loadu_ps(x + i * QB), b = _mm512_loadu_ps(x + i * QB + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
        _mm_storeu_si128((__m128i*)(xq + i * QB), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i*)(xq + i * QB + 16), _mm512_cvtsepi32_epi8(qb));
        xs[i] = amax / 127.0f;
        xsum[i] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)) * xs[i];
    }
}

/* Two blocks at a time in 64-byte registers: one vpdpbusd gives both blocks' partial sums (lanes 0-7 the
   first's, 8-15 the second's), scaled by the pattern [scale of the first x 8, of the second x 8]. */
static const int32_t PAIR_LANES[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};

/* two consecutive float16 scales -> their pattern */
static inline __m512 pair_of_halves(const uint16_t* p) {
    uint32_t two;
    memcpy(&two, p, 4);
    __m512 both = _mm512_cvtph_ps(_mm256_castsi128_si256(_mm_cvtsi32_si128((int)two)));
    return _mm512_permutexvar_ps(_mm512_loadu_si512(PAIR_LANES), both);
}

static inline __m512 pair_of_floats(const float* p) {
    __m128 both = _mm_castpd_ps(_mm_load_sd((const double*)p));
    return _mm512_permutexvar_ps(_mm512_loadu_si512(PAIR_LANES), _mm512_castps128_ps512(both));
}

/* Q4_1 blocks' 16 bytes each (byte j: weights j and j + 16) -> their 32 weights 0..15 as bytes, in order */
static inline __m256i unpack_q4(const uint8_t* p) {
    __m128i b = _mm_loadu_si128((const __m128i*)p), mask = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));
}

static inline __m512i unpack_q4_pair(const uint8_t* p) {
    __m256i b = _mm256_loadu_si256((const __m256i*)p), mask = _mm256_set1_epi8(15);
    __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
    /* [lo of block 0, hi of block 0, lo of block 1, hi of block 1], in 64-bit lanes */
    __m512i order = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    return _mm512_permutex2var_epi64(_mm512_castsi256_si512(lo), order, _mm512_castsi256_si512(hi));
}

/* four consecutive block scales -> [first x 4, second x 4, third x 4, fourth x 4] */
static const int32_t QUAD_LANES[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};

static inline __m512 quad_of_halves(const uint16_t* p) {
    __m128 four = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)p));
    return _mm512_permutexvar_ps(_mm512_loadu_si512(QUAD_LANES), _mm512_castps128_ps512(four));
}

static inline __m512 quad_of_floats(const float* p) {
    return _mm512_permutexvar_ps(_mm512_loadu_si512(QUAD_LANES), _mm512_castps128_ps512(_mm_loadu_ps(p)));
}

/* int4, four blocks a step: their 64 bytes split into low nibbles (weights 0-15 of each block) and high
   (16-31), each one vpdpbusd against the activations' matching halves, lanes 4b..4b+3 block b's: half the
   instructions per weight of two blocks a step, which matters where int4 is bound by arithmetic */
static inline __attribute__((always_inline)) void int4_quad(__m512 acc[MT][R], const uint8_t* w, int64_t rb,
                                                            const uint16_t* sc, const int8_t* xq,
                                                            const float* xs, int64_t G, int64_t b, int mt,
                                                            int r) {
    __m512i lo[R], hi[R], nibble = _mm512_set1_epi8(15);
    __m512 ds[R];
    for (int j = 0; j < r; j++) {
        __m512i v = _mm512_loadu_si512(w + j * rb + b * 16);
        lo[j] = _mm512_and_si512(v, nibble);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        ds[j] = quad_of_halves(sc + j * G + b);
    }
    const __m512i first = _mm512_set_epi64(13, 12, 9, 8, 5, 4, 1, 0), second = _mm512_set_epi64(15, 14, 11, 10, 7, 6, 3, 2);
    for (int i = 0; i < mt; i++) {
        const int8_t* xp = xq + (i * G + b) * QB;
        __m512i a = _mm512_loadu_si512(xp), c = _mm512_loadu_si512(xp + 64);
        __m512i xlo = _mm512_permutex2var_epi64(a, first, c), xhi = _mm512_permutex2var_epi64(a, second, c);
        __m512 xscale = quad_of_floats(xs + i * G + b);
        for (int j = 0; j < r; j++) {
            __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], xlo), hi[j], xhi);
            acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ds[j], xscale), acc[i][j]);
        }
    }
}

/* one step: R weight rows' blocks (wv, their scale patterns ds) against mt activation rows */
static inline __attribute__((always_inline)) void quant_step(__m512 acc[MT][R], const __m512i* wv, const __m512* ds,
                                                             const int8_t* xq, const float* xs, int64_t G,
                                                             int64_t b, int pair, int int4, int mt, int r) {
    for (int i = 0; i < mt; i++) {
        const int8_t* xp = xq + (i * G + b) * QB;
        __m512i xv = pair ? _mm512_loadu_si512(xp) : _mm512_maskz_loadu_epi8(0xffffffffull, xp);
        __m512 xscale = pair ? pair_of_floats(xs + i * G + b) : _mm512_set1_ps(xs[i * G + b]);
        /* int8 x int8: vpdpbusd multiplies unsigned by signed bytes, so the activations' signs move onto
           the weights (llama.cpp's trick); int4's weights are unsigned already */
        __m512i ax = _mm512_abs_epi8(xv);
        __mmask64 negative = _mm512_movepi8_mask(xv);
        for (int j = 0; j < r; j++) {
            __m512i dot = int4 ? _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[j], xv)
                               : _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax,
                                                     _mm512_mask_sub_epi8(wv[j], negative, _mm512_setzero_si512(), wv[j]));
            acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ds[j], xscale), acc[i][j]);
        }
    }
}

static inline __attribute__((always_inline)) void quant_tile(const Linear* L, int64_t n0, const int8_t* xq,
                                                             const float* xs, const float* xsum, float* y,
                                                             int mt, int r, const char* ahead) {
    int64_t K = L->k, N = L->n, G = K / QB;
    int int4 = L->format == FORMAT_INT4;
    int64_t rb = int4 ? K / 2 : K, bb = int4 ? 16 : 32; /* bytes per row, per block */
    const uint8_t* w = (const uint8_t*)L->w + n0 * rb;
    const uint16_t* sc = (const uint16_t*)L->scale + n0 * G;
    __m512 acc[MT][R];
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < r; j++) acc[i][j] = _mm512_setzero_ps();
    __m512i wv[R];
    __m512 ds[R];
    int64_t b = 0;
    if (int4)
        for (; b + 4 <= G; b += 4) {
            if (ahead)
                for (int line = 0; line < R * 4 * bb; line += 64) __builtin_prefetch(ahead + R * b * bb + line);
            int4_quad(acc, w, rb, sc, xq, xs, G, b, mt, r);
        }
    for (; b + 2 <= G; b += 2) {
        if (ahead) /* R rows of two blocks each step: 2 or 4 cache lines */
            for (int line = 0; line < R * 2 * bb; line += 64) __builtin_prefetch(ahead + R * b * bb + line);
        for (int j = 0; j < r; j++) {
            const uint8_t* blk = w + j * rb + b * bb;
            wv[j] = int4 ? unpack_q4_pair(blk) : _mm512_loadu_si512(blk);
            ds[j] = pair_of_halves(sc + j * G + b);
        }
        quant_step(acc, wv, ds, xq, xs, G, b, 1, int4, mt, r);
    }
    if (b < G) { /* an odd last block, in the low half */
        for (int j = 0; j < r; j++) {
            const uint8_t* blk = w + j * rb + b * bb;
            wv[j] = int4 ? _mm512_zextsi256_si512(unpack_q4(blk)) : _mm512_maskz_loadu_epi8(0xffffffffull, blk);
            ds[j] = _mm512_set1_ps(_cvtsh_ss(sc[j * G + b]));
        }
        quant_step(acc, wv, ds, xq, xs, G, b, 0, int4, mt, r);
    }
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < r; j++)
            if (int4) /* the blocks' offsets: low[b] * the sum of the block's activations, 16 blocks a step */
                for (int64_t c = 0; c < G; c += 16) {
                    __mmask16 m = G - c >= 16 ? 0xffff : (__mmask16)((1u << (G - c)) - 1);
                    __m512 low = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t*)L->low + (n0 + j) * G + c));
                    acc[i][j] = _mm512_fmadd_ps(low, _mm512_maskz_loadu_ps(m, xsum + i * G + c), acc[i][j]);
                }
    if (mt == MT && r == R) {
        store_sums(acc, y, N);
        return;
    }
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < r; j++) y[i * N + j] = _mm512_reduce_add_ps(acc[i][j]);
}

#else
#define VECTOR 0

/* no AVX-512 VNNI: the same arithmetic in plain loops (kernels/native.py warns once) */
/* quantize_rows above, in plain loops */

void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xs, float* xsum) {
    int64_t blocks = K / QB;
    for (int64_t i = 0; i < M * blocks; i++) {
        const float* v = x + i * QB;
        float amax = 0.0f;
        for (int j = 0; j < QB; j++) amax = fmaxf(amax, fabsf(v[j]));
        float s = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < QB; j++) {
            int q = (int)nearbyintf(v[j] * inv);
            xq[i * QB + j] = (int8_t)q;
            sum += q;
        }
        xs[i] = s;
        xsum[i] = (float)sum * s;
    }
}

static inline void float_tile(const float* x, const void* w, int bf16, float* y, int64_t K, int64_t N, int mt,
                              int r, const char* pf, int lps) {
    (void)pf, (void)lps;
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < r; j++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++)
                s += x[i * K + k] * (bf16 ? bf16_to_float(((const uint16_t*)w)[j * K + k]) : ((const float*)w)[j * K + k]);
            y[i * N + j] = s;
        }
}

static inline void quant_tile(const Linear* L, int64_t n0, const int8_t* xq, const float* xs, const float* xsum,
                              float* y, int mt, int r, const char* ahead) {
    (void)ahead;
    int64_t K = L->k, N = L->n, G = K / QB;
    int int4 = L->format == FORMAT_INT4;
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < r; j++) {
            int64_t n = n0 + j;
            float s = 0.0f;
            for (int64_t b = 0; b < G; b++) {
                int dot = 0;
                for (int t = 0; t < QB; t++) {
                    int q;
                    if (int4) {
                        uint8_t byte = ((const uint8_t*)L->w)[n * K / 2 + b * 16 + t % 16];
                        q = t < 16 ? byte & 15 : byte >> 4;
                    } else {
                        q = ((const int8_t*)L->w)[n * K + b * QB + t];
                    }
                    dot += q * xq[(i * G + b) * QB + t];
                }
                s += (float)dot * xs[i * G + b] * half_to_float(((const uint16_t*)L->scale)[n * G + b]);
                if (int4) s += half_to_float(((const uint16_t*)L->low)[n * G + b]) * xsum[i * G + b];
            }
            y[i * N + j] = s;
        }
}
#endif

int linear_rows_vectorised(void) { return VECTOR; }

/* one tile, its sizes as constants so that the accumulators stay in registers */
#define TILE(mt_, r_)                                                                                          \
    (quantised ? quant_tile(L, n0, xq + m0 * K, xs + m0 * G, xsum + m0 * G, y + m0 * N + n0, mt_, r_, ahead)      \
               : float_tile(x + m0 * K, (const char*)L->w + n0 * K * esize, bf16, y + m0 * N + n0, K, N, mt_, r_, pf, lps))
/* a full float tile: the format and the prefetch's lines per step constants too */
#define FULL_FLOAT(bf16_, lps_) \
    float_tile(x + m0 * K, (const char*)L->w + n0 * K * esize, bf16_, y + m0 * N + n0, K, N, MT, R, pf, lps_)

static void tile(const Linear* L, int quantised, int bf16, int64_t esize, const float* x, const int8_t* xq,
                 const float* xs, const float* xsum, float* y, int64_t m0, int64_t n0, int mt, int r,
                 const char* ahead, const char* pf, int lps) {
    int64_t K = L->k, N = L->n, G = K / QB;
    if (!quantised && mt == MT && r == R) {
        switch (bf16 * 5 + lps) {
        case 0: FULL_FLOAT(0, 0); break;
        case 1: FULL_FLOAT(0, 1); break;
        case 2: FULL_FLOAT(0, 2); break;
        case 3: FULL_FLOAT(0, 3); break;
        case 4: FULL_FLOAT(0, 4); break;
        case 5: FULL_FLOAT(1, 0); break;
        case 6: FULL_FLOAT(1, 1); break;
        case 7: FULL_FLOAT(1, 2); break;
        case 8: FULL_FLOAT(1, 3); break;
        default: FULL_FLOAT(1, 4); break;
        }
    } else if (r == R) {
        switch (mt) {
        case 4: TILE(4, R); break;
        case 3: TILE(3, R); break;
        case 2: TILE(2, R); break;
        default: TILE(1, R); break;
        }
    } else {
        switch (mt) {
        case 4: TILE(4, 1); break;
        case 3: TILE(3, 1); break;
        case 2: TILE(2, 1); break;
        default: TILE(1, 1); break;
        }
    }
}

static int64_t row_bytes(const Linear* L) {
    switch (L->format) {
    case FORMAT_F32: return 4 * L->k;
    case FORMAT_BF16: return 2 * L->k;
    case FORMAT_INT8: return L->k;
    default: return L->k / 2;
    }
}

static int64_t tiles_of(const Linear* L) {
    return L->n / R + L->n % R;
}

/* one tile of R weight rows (or a single row) of one product, for every activation row */
static void product_tile(const Linear* L, int64_t t, const float* x, const int8_t* xq, const float* xs,
                         const float* xsum, float* y, int64_t M) {
    int64_t N = L->n, K = L->k, rb = row_bytes(L);
    int quantised = L->format == FORMAT_INT8 || L->format == FORMAT_INT4, bf16 = L->format == FORMAT_BF16;
    int64_t full = N / R;
    int64_t n0 = t < full ? t * R : full * R + (t - full);
    int r = t < full ? R : 1;
    /* quantised tiles: the weight AHEAD bytes on is fetched while the first activation rows run (a matrix
       of a decode step is a few KB a thread, too short for the hardware prefetcher to ramp up) */
    const char* next = quantised && t < full && (n0 + R) * rb + AHEAD <= N * rb ? (const char*)L->w + n0 * rb + AHEAD
                                                                                 : NULL;
    /* float tiles spread the prefetch of the weight FLOAT_AHEAD bytes on over all their passes, one to
       four lines a step, into L2: fetched in one burst during the first pass, the memory idled through
       the rest (the later passes read the tile from L1). Prefetches never fault: the last tiles need no
       bound. */
    int64_t steps = K < 16 ? 1 : K / 16, lines = R * rb / 64, passes = (M + MT - 1) / MT;
    int lps = quantised ? 0 : (int)((lines + passes * steps - 1) / (passes * steps));
    lps = lps > 4 ? 4 : lps;
    const char* pf = (const char*)L->w + n0 * rb + FLOAT_AHEAD;
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
        int mt = M - m0 < MT ? (int)(M - m0) : MT;
        int covered = (m0 / MT) * steps * lps >= lines;
        tile(L, quantised, bf16, bf16 ? 2 : 4, x, xq, xs, xsum, y, m0, n0, mt, r, m0 == 0 ? next : NULL, pf,
             covered ? 0 : lps);
        pf += steps * 64 * lps;
    }
}

/* ys[i] [M, n_i] (+ bias) = x [M, k] times each of `count` weights of the same input; xq, xs, xsum: x
   quantised by quantize_rows (quantised formats only). One parallel loop over the tiles of them all, the
   threads splitting the rows evenly: a decode step's k and v products are too small to split alone. */
void linear_products(const Linear* const* Ls, float* const* ys, int count, const float* x, const int8_t* xq,
                     const float* xs, const float* xsum, int64_t M) {
    int64_t tiles[8], total = 0;
    for (int i = 0; i < count; i++) total += tiles[i] = tiles_of(Ls[i]);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < total; t++) {
        int i = 0;
        int64_t local = t;
        while (local >= tiles[i]) local -= tiles[i++];
        product_tile(Ls[i], local, x, xq, xs, xsum, ys[i], M);
    }
    for (int i = 0; i < count; i++)
        if (Ls[i]->bias)
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = 0; n < Ls[i]->n; n++) ys[i][m * Ls[i]->n + n] += Ls[i]->bias[n];
}

void linear_rows(const Linear* L, const float* x, float* y, int64_t M) {
    int64_t G = L->k / QB;
    int quantised = L->format == FORMAT_INT8 || L->format == FORMAT_INT4;
    int8_t* xq = NULL;
    float *xs = NULL, *xsum = NULL;
    if (quantised) {
        xq = malloc(M * L->k + 64);
        xs = malloc(sizeof(float) * (M * G + 1));
        xsum = malloc(sizeof(float) * (M * G + 1));
        quantize_rows(x, M, L->k, xq, xs, xsum);
    }
    linear_products(&L, &y, 1, x, xq, xs, xsum, M);
    free(xq);
    free(xs);
    free(xsum);
}

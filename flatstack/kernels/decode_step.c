/* A decode step through every block of a dense model, in one call: the C form of `Block.forward` over a
   step's M tokens, each sequence's one new token and any short prompt chunks beside them (model.py is the
   reference; engine/native_decode.py lays out the weights and calls it). Built and loaded by kernels/native.py.

   Called per op from Python, a block is some forty calls, each costing more than the arithmetic of a
   decode step's few rows; compiled, it costs a long compile and still calls out for each product.
   Here the block is plain loops around the products (linear_rows.c) and the attention through the
   block tables (paged_attention.c), and the step's new keys and values go straight into the pool. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "linear_rows.h"
#include "vec.h"

enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2 };

typedef struct {
    const float *attn_norm, *ffn_norm, *post_attn_norm, *post_ffn_norm, *q_norm, *k_norm; /* NULL: absent */
    Linear q, k, v, o, gate, up, down;
    void *k_pool, *v_pool; /* this layer's [n_kv_heads, num_blocks, block_size, head_dim], float32 or bfloat16 */
} Layer;

typedef struct {
    int64_t n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_dim, num_blocks, block_size;
    int64_t activation, window, temperature_len; /* window, temperature_len <= 0: none */
    int64_t kv_bf16;                             /* the pool holds bfloat16 (activations stay float32) */
    float eps, scale, softcap;                   /* softcap <= 0: none */
    const Layer* layers;
    const float* final_norm; /* with head: the LM head after the blocks (NULL: the caller's) */
    Linear head;
} Model;

void paged_decode(const float* q, const void* k_pool, const void* v_pool, const int64_t* tables,
                  const int64_t* lengths, float* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                  int64_t num_blocks, int64_t bs, int64_t width, float scale, float softcap, int64_t window,
                  int64_t temperature_len, int64_t kv_bf16);

/* D floats into a pool row: copied, or rounded to bfloat16 */
static void store_row(void* pool, int kv_bf16, int64_t at, const float* src, int64_t D) {
    if (!kv_bf16) {
        memcpy((float*)pool + at * D, src, sizeof(float) * D);
        return;
    }
    uint16_t* row = (uint16_t*)pool + at * D;
    for (int64_t d = 0; d < D; d++) row[d] = float_to_bf16(src[d]);
}

/* out = x / rms(x) * weight over rows of n (F.rms_norm in float32) */
static void rms_norm(const float* x, const float* weight, float* out, int64_t rows, int64_t n, float eps) {
    int64_t nv = n - n % 16;
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * n;
        f16 acc = {0};
        for (int64_t i = 0; i < nv; i += 16) acc += load16(xr + i) * load16(xr + i);
        float ss = hsum(acc);
        for (int64_t i = nv; i < n; i++) ss += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(ss / n + eps);
        for (int64_t i = 0; i < n; i++) out[r * n + i] = xr[i] * inv * weight[i];
    }
}

/* rotate each head's pairs (i, i + D/2) by the row's angles (model.apply_rope); x [M, heads, D] */
static void rope(float* x, const float* cos, const float* sin, int64_t M, int64_t heads, int64_t D) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t h = 0; h < heads; h++) {
            float* v = x + (m * heads + h) * D;
            const float *c = cos + m * D, *s = sin + m * D;
            for (int64_t i = 0; i < D / 2; i++) {
                float a = v[i], b = v[i + D / 2];
                v[i] = a * c[i] - b * s[i];
                v[i + D / 2] = b * c[i + D / 2] + a * s[i + D / 2];
            }
        }
}

/* g = act(g) * u over n values; SiLU and tanh-GELU through the vectorised exp, a chunk at a time */
static void gate(float* g, const float* u, int64_t n, int64_t kind) {
    enum { CHUNK = 256 };
    float e[CHUNK];
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        int64_t len = n - i0 < CHUNK ? n - i0 : CHUNK;
        float* gi = g + i0;
        const float* ui = u + i0;
        if (kind == ACT_GELU) {
            for (int64_t i = 0; i < len; i++) gi[i] = 0.5f * gi[i] * (1.0f + erff(gi[i] * 0.70710678f)) * ui[i];
            continue;
        }
        for (int64_t i = 0; i < len; i++) /* silu: exp(-g); tanh-GELU: exp(2z), tanh z = 1 - 2 / (exp(2z) + 1) */
            e[i] = kind == ACT_SILU ? -gi[i] : 1.5957691216f * (gi[i] + 0.044715f * gi[i] * gi[i] * gi[i]);
        exp_inplace(e, len);
        for (int64_t i = 0; i < len; i++)
            gi[i] = (kind == ACT_SILU ? gi[i] / (1.0f + e[i]) : gi[i] * (1.0f - 1.0f / (e[i] + 1.0f))) * ui[i];
    }
}

/* the products that share one input: its quantised rows are made once for all of them */
static void products(const float* x, int64_t M, const Linear* const* Ls, float* const* ys, int count,
                     int8_t* xq, float* xs, float* xsum) {
    int quantised = Ls[0]->format >= 2;
    if (quantised) quantize_rows(x, M, Ls[0]->k, xq, xs, xsum);
    linear_products(Ls, ys, count, x, xq, xs, xsum, M);
}

typedef struct {
    float *h, *q, *k, *v, *att, *g, *u, *xs, *xsum;
    int8_t* xq;
} Scratch;

static void attention(const Model* m, const Layer* L, const Scratch* s, int64_t M, const float* cos,
                      const float* sin, const int64_t* slots, const int64_t* tables, int64_t width,
                      const int64_t* lengths) {
    int64_t D = m->head_dim, H = m->n_heads, Hkv = m->n_kv_heads, bs = m->block_size;
    const Linear* qkv[3] = {&L->q, &L->k, &L->v};
    float* outs[3] = {s->q, s->k, s->v};
    products(s->h, M, qkv, outs, 3, s->xq, s->xs, s->xsum);
    if (L->q_norm) {
        rms_norm(s->q, L->q_norm, s->q, M * H, D, m->eps);
        rms_norm(s->k, L->k_norm, s->k, M * Hkv, D, m->eps);
    }
    rope(s->q, cos, sin, M, H, D);
    rope(s->k, cos, sin, M, Hkv, D);
    for (int64_t i = 0; i < M; i++) /* the new keys and values into their slots */
        for (int64_t h = 0; h < Hkv; h++) {
            int64_t at = (h * m->num_blocks + slots[i] / bs) * bs + slots[i] % bs;
            store_row(L->k_pool, m->kv_bf16, at, s->k + (i * Hkv + h) * D, D);
            store_row(L->v_pool, m->kv_bf16, at, s->v + (i * Hkv + h) * D, D);
        }
    paged_decode(s->q, L->k_pool, L->v_pool, tables, lengths, s->att, M, H, Hkv, D, m->num_blocks, bs, width,
                 m->scale, m->softcap, m->window, m->temperature_len, m->kv_bf16);
}

static void block(const Model* m, const Layer* L, const Scratch* s, float* x, int64_t M, const float* cos,
                  const float* sin, const int64_t* slots, const int64_t* tables, int64_t width,
                  const int64_t* lengths) {
    int64_t Dm = m->d_model, F = m->ffn_dim;
    rms_norm(x, L->attn_norm, s->h, M, Dm, m->eps);
    attention(m, L, s, M, cos, sin, slots, tables, width, lengths);
    const Linear* o[1] = {&L->o};
    float* h[1] = {s->h};
    products(s->att, M, o, h, 1, s->xq, s->xs, s->xsum);
    if (L->post_attn_norm) rms_norm(s->h, L->post_attn_norm, s->h, M, Dm, m->eps);
    for (int64_t i = 0; i < M * Dm; i++) x[i] += s->h[i];
    rms_norm(x, L->ffn_norm, s->h, M, Dm, m->eps);
    const Linear* gate_up[2] = {&L->gate, &L->up};
    float* gu[2] = {s->g, s->u};
    products(s->h, M, gate_up, gu, 2, s->xq, s->xs, s->xsum);
    gate(s->g, s->u, M * F, m->activation);
    const Linear* down[1] = {&L->down};
    products(s->g, M, down, h, 1, s->xq, s->xs, s->xsum);
    if (L->post_ffn_norm) rms_norm(s->h, L->post_ffn_norm, s->h, M, Dm, m->eps);
    for (int64_t i = 0; i < M * Dm; i++) x[i] += s->h[i];
}

/* x [M, d_model] (in place: the step's embedded tokens in, the last block's output out); cos, sin
   [M, head_dim]; slots [M] where each new key and value goes; tables [M, width]; lengths [M], each row's
   context including its own token. A row is a token: a decode's, or one of a prompt chunk's, whose rows
   share their sequence's table, each attending up to its own position (every row's key and value is in
   the pool before any row attends). logits [R, vocab]: the final norm and LM head's products for the R
   rows `heads` names (the ones that sample), if the model has them */
void decode_step(const Model* m, float* x, int64_t M, const float* cos, const float* sin, const int64_t* slots,
                 const int64_t* tables, int64_t width, const int64_t* lengths, const int64_t* heads, int64_t R,
                 float* logits) {
    int64_t qd = m->n_heads * m->head_dim, kvd = m->n_kv_heads * m->head_dim;
    int64_t widest = m->d_model > m->ffn_dim ? m->d_model : m->ffn_dim;
    widest = widest > qd ? widest : qd;
    Scratch s = {
        .h = malloc(sizeof(float) * M * (m->d_model > qd ? m->d_model : qd)),
        .q = malloc(sizeof(float) * M * qd),
        .k = malloc(sizeof(float) * M * kvd),
        .v = malloc(sizeof(float) * M * kvd),
        .att = malloc(sizeof(float) * M * qd),
        .g = malloc(sizeof(float) * M * m->ffn_dim),
        .u = malloc(sizeof(float) * M * m->ffn_dim),
        .xs = malloc(sizeof(float) * (M * widest / 32 + 1)),
        .xsum = malloc(sizeof(float) * (M * widest / 32 + 1)),
        .xq = malloc(M * widest + 64),
    };
    for (int64_t l = 0; l < m->n_layers; l++)
        block(m, &m->layers[l], &s, x, M, cos, sin, slots, tables, width, lengths);
    if (m->final_norm) {
        for (int64_t r = 0; r < R; r++)
            rms_norm(x + heads[r] * m->d_model, m->final_norm, s.h + r * m->d_model, 1, m->d_model, m->eps);
        const Linear* head[1] = {&m->head};
        float* out[1] = {logits};
        products(s.h, R, head, out, 1, s.xq, s.xs, s.xsum);
    }
    free(s.h), free(s.q), free(s.k), free(s.v), free(s.att), free(s.g), free(s.u), free(s.xs), free(s.xsum),
        free(s.xq);
}

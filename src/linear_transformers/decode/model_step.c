/* One generation step of a whole causal linear transformer for a batch of tokens, float32: the
 * fused "RNN step" behind CausalTransformer.step on the CPU, from the token ids to the parameters of
 * the next token's distribution (embedding and positions, all blocks, final norm and head).
 *
 * Per block, for each of the B rows x (in place):
 *   pre-LN:  h = LN1(x); x += Out(attn(QKV(h))); x += FF2(GELU(FF1(LN2(x))))
 *   post-LN: x = LN1(x + Out(attn(QKV(x)))); x = LN2(x + FF2(GELU(FF1(x))))
 * attn, per head: q, k = phi(q), phi(k); S += k v^T; z += k; o = q^T S / (q . z + eps), with S and z
 * updated in place. Every weight is read once per step for up to 64 rows, so at batch 1 a step costs
 * about one pass over the weights: the whole point there, where the eager path is dominated by the
 * overhead of ~15 small operations per block. Larger batches run in the batched layout (rows in
 * vector lanes, see batched_gemv), where the step is bound by arithmetic, not memory.
 *
 * Work is shared with OpenMP (`omp for` over output features or (row, head) pairs). Loaded after
 * PyTorch, the library binds to PyTorch's own libgomp (same soname), so it uses the same threads.
 * Built without OpenMP (a compiler without it), the pragmas fall away and one thread does it all.
 * Vectors and register tiles follow the compile target (simd.h): 16 floats and 32 registers with
 * AVX-512, 8 and 16 with AVX2, 4 and 32 with NEON; bfloat16 dots and AMX tiles only where the
 * target has AVX512-BF16 / AMX-BF16.
 * lt_model_token_f32 is one step; lt_generate_mol_f32 runs a whole sequence of steps, each followed
 * by sampling a mixture-of-logistics head, in one parallel region.
 */

#include "simd.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

/* may_alias, loaded and stored through pointers (not memcpy, which GCC splits through the stack) */
typedef float vf __attribute__((vector_size(LT_VBYTES), aligned(4)));
typedef float vf_mem __attribute__((vector_size(LT_VBYTES), aligned(4), may_alias));
#define VLF LT_VLF
/* Register tiles: rows of the batch per row-layout GEMV tile (each with 4 weight rows: 4 NB
 * accumulators), and the batched layout's accumulators and vectors of rows per tile. */
#if LT_NREGS >= 32
#define LT_GEMV_NB 4
#define LT_ACC 24
#define LT_BNV 4
#else
#define LT_GEMV_NB 2
#define LT_ACC 12
#define LT_BNV 2
#endif

static inline vf vload(const float *p) { return *(const vf_mem *)p; }

static inline void vstore(float *p, vf v) { *(vf_mem *)p = v; }

static inline float hsum(vf v) {
    float t[VLF];
    memcpy(t, &v, sizeof v);
    for (int w = VLF / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) t[l] += t[l + w];
    return t[0];
}

/* hsum of four vectors at once (out[r] = hsum(v[r]), the same pairs added in the same order), with
 * whole-vector shuffles instead of four scalar reductions. */
static inline void hsum4(const vf *v, float *out) {
#if defined(LT_HAS_SHUFFLEVECTOR) && LT_VLF == 16
#define SH __builtin_shufflevector
    const vf u = SH(v[0], v[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 SH(v[0], v[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const vf w = SH(v[2], v[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 SH(v[2], v[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const vf x = SH(u, w, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                 SH(u, w, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const vf y = SH(x, x, 0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13) +
                 SH(x, x, 2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15);
    const vf z = SH(y, y, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6) +
                 SH(y, y, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7);
#undef SH
    float t[VLF];
    memcpy(t, &z, sizeof z);
    for (int r = 0; r < 4; r++) out[r] = t[r];
#else
    for (int r = 0; r < 4; r++) out[r] = hsum(v[r]);
#endif
}

typedef struct {
    int n_layers, d, n_heads, dk, dv, dff;
    int pre_norm;     /* 1: LN before each sublayer; 0: after the residual add */
    int feature_map;  /* 0: elu(x) + 1, 1: relu(x) */
    int bf16;         /* the four projection weights: 0 float32; 1 bfloat16 (uint16), widened to float32;
                         2 bfloat16, and dot products on bfloat16 pairs (activations rounded to bfloat16,
                         AVX512-BF16 vdpbf16ps, float32 accumulation); 2 needs lt_has_bf16_dot() */
    float ln_eps, attn_eps;
    /* per layer, n_layers pointers each (PyTorch layouts: Linear weights [out, in] row-major) */
    const float *const *ln1_w, *const *ln1_b, *const *qkv_w, *const *qkv_b, *const *out_w, *const *out_b;
    const float *const *ln2_w, *const *ln2_b, *const *ff1_w, *const *ff1_b, *const *ff2_w, *const *ff2_b;
    /* (qkv_w, out_w, ff1_w and ff2_w point to uint16 bfloat16 values when bf16 is set) */
    /* around the blocks (lt_model_token_f32): token embeddings [vocab, d]; positional encodings
       [max_len, d] or NULL; the final LayerNorm (NULL: none, post-norm models); the head [n_params, d] */
    int vocab, max_len, n_params;
    float norm_eps;
    const float *embed, *pos, *norm_w, *norm_b, *head_w, *head_b;
} lt_model;

static inline float phi(float v, int kind) { return kind == 0 ? (v > 0 ? v + 1.0f : expf(v)) : (v > 0 ? v : 0.0f); }

typedef uint16_t vh __attribute__((vector_size(LT_VBYTES / 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(LT_VBYTES)));

/* VLF weights as float32: plain loads, or bfloat16 widened (its bits are the top half of a float32). */
static inline vf wload_f32(const void *W, long i) { return vload((const float *)W + i); }
static inline vf wload_bf16(const void *W, long i) {
    vh h;
    memcpy(&h, (const uint16_t *)W + i, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline float wscalar_f32(const void *W, long i) { return ((const float *)W)[i]; }
static inline float wscalar_bf16(const void *W, long i) {
    uint32_t u = (uint32_t)((const uint16_t *)W)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* y[b, j] = (base ? base[b, j] : 0) + bias[j] + W[j, :] . x[b, :] for rows j in [j0, j1). A tile is
 * 4 rows of W by NB <= LT_GEMV_NB rows of x: each weight vector loaded serves NB rows and each x
 * vector 4 weight rows, so W streams from cache B / LT_GEMV_NB times, not B times. Every
 * output sums its products in the same order whatever the tile, so results do not depend on B.
 * The tile body is inlined for each NB (1..4), so its accumulators stay in registers. Each of the four
 * weight rows is its own stream, prefetched LT_AHEAD bytes ahead (the hardware's prefetcher alone
 * left ~10% of the batch-1 step on the table), and the four lie a quarter of [j0, j1) apart (tile_rows):
 * four adjacent rows make one short stream per 4 KB page, which the hardware prefetcher restarts on
 * every page. */
#ifndef LT_AHEAD
#define LT_AHEAD 256
#endif

/* Tile t of rows [j0, j1): its first row *j, the stride *rs between its rows, and the number of rows
 * (0: no tile t). With Q = (j1 - j0) / 4, tiles 0..Q-1 take rows j, j + Q, j + 2Q, j + 3Q, then the
 * rest (fewer than 4) goes in one tile of adjacent rows. */
static inline int tile_rows(int j0, int j1, int t, int *j, int *rs) {
    const int Q = (j1 - j0) / 4;
    if (t < Q) {
        *j = j0 + t, *rs = Q;
        return 4;
    }
    *j = j0 + 4 * Q, *rs = 1;
    return t == Q && *j < j1 ? j1 - *j : 0;
}
#define DEFINE_GEMV(NAME, WLOAD, WSCALAR, ESIZE)                                                                   \
    static inline __attribute__((always_inline)) void NAME##_tile(                                                 \
        const int NB, int b0, int n_in, int n_out, int j, int nr, int rs, const void *W, const float *bias,         \
        const float *x, float *y, const float *base) {                                                             \
        long w[4];                                                                                                 \
        for (int r = 0; r < 4; r++) w[r] = (long)(j + (r < nr ? r : 0) * rs) * n_in;                               \
        vf acc[4][4]; /* NB x 4 used: NB is a constant, so only those live in registers */                        \
        for (int c = 0; c < NB; c++)                                                                               \
            for (int r = 0; r < 4; r++) acc[c][r] = (vf){0};                                                       \
        int i = 0;                                                                                                 \
        for (; i + VLF <= n_in; i += VLF) {                                                                        \
            for (int r = 0; r < 4; r++) __builtin_prefetch((const char *)W + (w[r] + i) * ESIZE + LT_AHEAD);       \
            vf wv[4];                                                                                              \
            for (int r = 0; r < 4; r++) wv[r] = WLOAD(W, w[r] + i);                                                \
            for (int c = 0; c < NB; c++) {                                                                         \
                const vf xv = vload(x + (long)(b0 + c) * n_in + i);                                                \
                for (int r = 0; r < 4; r++) acc[c][r] += wv[r] * xv;                                               \
            }                                                                                                      \
        }                                                                                                          \
        for (int c = 0; c < NB; c++) {                                                                             \
            const float *xb = x + (long)(b0 + c) * n_in;                                                           \
            float sums[4];                                                                                         \
            hsum4(acc[c], sums);                                                                                   \
            for (int r = 0; r < nr; r++) {                                                                         \
                float s = sums[r] + bias[j + r * rs];                                                              \
                for (int t = i; t < n_in; t++) s += WSCALAR(W, w[r] + t) * xb[t];                                  \
                const long o = (long)(b0 + c) * n_out + j + r * rs;                                                \
                if (base) s += base[o];                                                                            \
                y[o] = s;                                                                                          \
            }                                                                                                      \
        }                                                                                                          \
    }                                                                                                              \
    static void NAME(int B, int n_in, int n_out, int j0, int j1, const void *W, const float *bias, const float *x, \
                     float *y, const float *base) {                                                                \
        int j, rs, nr;                                                                                             \
        for (int t = 0; (nr = tile_rows(j0, j1, t, &j, &rs)); t++) {                                               \
            int b0 = 0;                                                                                            \
            for (; b0 + LT_GEMV_NB <= B; b0 += LT_GEMV_NB)                                                         \
                NAME##_tile(LT_GEMV_NB, b0, n_in, n_out, j, nr, rs, W, bias, x, y, base);                          \
            switch (B - b0) {                                                                                      \
                case 3: NAME##_tile(3, b0, n_in, n_out, j, nr, rs, W, bias, x, y, base); break;                    \
                case 2: NAME##_tile(2, b0, n_in, n_out, j, nr, rs, W, bias, x, y, base); break;                    \
                case 1: NAME##_tile(1, b0, n_in, n_out, j, nr, rs, W, bias, x, y, base); break;                    \
            }                                                                                                      \
        }                                                                                                          \
    }

DEFINE_GEMV(gemv_f32, wload_f32, wscalar_f32, 4)
DEFINE_GEMV(gemv_bf16, wload_bf16, wscalar_bf16, 2)

#ifdef __AVX512BF16__
#include <immintrin.h>
int lt_has_bf16_dot(void) { return 1; }

/* The same GEMV with x rounded to bfloat16 (round to nearest even) and W . x as sums of bfloat16
 * pair products in float32 (vdpbf16ps): no widening of W, 32 weights per instruction; tiles of 4
 * rows of W by NB <= 4 rows of x as above. n_in must be a multiple of 32 (checked by the caller,
 * FusedModelStep). */
static inline __attribute__((always_inline)) void bf16dot_tile(const int NB, int n_in, int n_out, int b0, int j0,
                                                               int j1, const uint16_t *Wh, const float *bias,
                                                               const __m512bh *xh, float *y, const float *base) {
    const int n32 = n_in / 32;
    int j, rs, nr;
    for (int t = 0; (nr = tile_rows(j0, j1, t, &j, &rs)); t++) {
        const uint16_t *w[4];
        for (int r = 0; r < 4; r++) w[r] = Wh + (long)(j + (r < nr ? r : 0) * rs) * n_in;
        __m512 acc[4][4];
        for (int c = 0; c < NB; c++)
            for (int r = 0; r < 4; r++) acc[c][r] = _mm512_setzero_ps();
        for (int i = 0; i < n32; i++) {
            for (int r = 0; r < 4; r++) __builtin_prefetch((const char *)(w[r] + 32 * i) + LT_AHEAD);
            __m512bh wv[4];
            for (int r = 0; r < 4; r++) wv[r] = (__m512bh)_mm512_loadu_si512(w[r] + 32 * i);
            for (int c = 0; c < NB; c++)
                for (int r = 0; r < 4; r++) acc[c][r] = _mm512_dpbf16_ps(acc[c][r], wv[r], xh[c * n32 + i]);
        }
        for (int c = 0; c < NB; c++)
            for (int r = 0; r < nr; r++) {
                float s = _mm512_reduce_add_ps(acc[c][r]) + bias[j + r * rs];
                const long o = (long)(b0 + c) * n_out + j + r * rs;
                y[o] = base ? s + base[o] : s;
            }
    }
}

static void gemv_bf16dot(int B, int n_in, int n_out, int j0, int j1, const void *W, const float *bias,
                         const float *x, float *y, const float *base) {
    __m512bh xh[4 * (n_in / 32)];
    for (int b0 = 0; b0 < B; b0 += 4) {
        const int nb = B - b0 < 4 ? B - b0 : 4;
        for (int c = 0; c < nb; c++) {
            const float *xb = x + (long)(b0 + c) * n_in;
            for (int i = 0; i < n_in; i += 32)
                xh[c * (n_in / 32) + i / 32] =
                    _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xb + i + 16), _mm512_loadu_ps(xb + i));
        }
        switch (nb) {
            case 4: bf16dot_tile(4, n_in, n_out, b0, j0, j1, W, bias, xh, y, base); break;
            case 3: bf16dot_tile(3, n_in, n_out, b0, j0, j1, W, bias, xh, y, base); break;
            case 2: bf16dot_tile(2, n_in, n_out, b0, j0, j1, W, bias, xh, y, base); break;
            default: bf16dot_tile(1, n_in, n_out, b0, j0, j1, W, bias, xh, y, base); break;
        }
    }
}
#else
int lt_has_bf16_dot(void) { return 0; }
#define gemv_bf16dot gemv_bf16 /* never chosen: FusedModelStep refuses mode 2 without AVX512-BF16 */
#endif

typedef int32_t vi __attribute__((vector_size(LT_VBYTES)));

/* exp(x) for x <= 0, VLF lanes: x = n ln2 + r (|r| <= ln2 / 2), exp(r) by its Taylor polynomial of
 * degree 7 (relative error < 3e-8 plus rounding), times 2^n built in the exponent bits. Below -87
 * (where exp underflows float32's normal range) it returns exp(-87) ~ 1.6e-38. */
static inline vf vexp_neg(vf x) {
    const vi low = x < -87.0f;
    x = (vf)(((vi)x & ~low) | ((vi)((vf){0} - 87.0f) & low));
    const vf n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest (|n| < 2^22) */
    const vf r = (x - n * 0.693145752f) - n * 1.42860677e-6f;    /* ln 2 in two parts */
    vf p = (vf){0} + 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi scale = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)scale;
}

/* GELU(v) = v (1 + erf(v / sqrt 2)) / 2 on VLF lanes, erf by Abramowitz & Stegun 7.1.26 (absolute
 * error < 1.5e-7): with a = |v| / sqrt 2 and q = 1 - erf(a) = poly(1 / (1 + 0.3275911 a)) exp(-a^2),
 * GELU = v (2 - q) / 2 for v >= 0 and v q / 2 below (no cancellation for negative v). */
static inline vf vgelu(vf v) {
    const vi neg = v < 0.0f;
    const vf abs_v = (vf)((vi)v & ~((vi){0} + INT32_MIN)); /* clear the sign bit */
    const vf z = abs_v * 0.70710678f;
    const vf t = 1.0f / (1.0f + 0.3275911f * z);
    vf poly = (vf){0} + 1.061405429f;
    poly = poly * t - 1.453152027f;
    poly = poly * t + 1.421413741f;
    poly = poly * t - 0.284496736f;
    poly = poly * t + 0.254829592f;
    const vf q = poly * t * vexp_neg(-(z * z));
    const vf factor = (vf)(((vi)(2.0f - q) & ~neg) | ((vi)q & neg));
    return 0.5f * v * factor;
}

/* GELU in place on y[0, n): VLF at a time, the rest through a zero-padded vector (same arithmetic). */
static void gelu_row(float *y, int n) {
    int i = 0;
    for (; i + VLF <= n; i += VLF) {
        const vf g = vgelu(vload(y + i));
        memcpy(y + i, &g, sizeof g);
    }
    if (i < n) {
        float t[VLF] = {0};
        memcpy(t, y + i, sizeof(float) * (n - i));
        const vf g = vgelu(vload(t));
        memcpy(t, &g, sizeof g);
        memcpy(y + i, t, sizeof(float) * (n - i));
    }
}

/* The batched layout, for larger batches (B >= LT_BATCHED_MIN): a projection's input is transposed,
 * xt[i * Bp + b] = x[b, i] with Bp = B rounded up to whole vectors (the extra lanes hold zeros), and
 * VLF rows of the batch share a vector: acc[b] += W[j, i] * xt[i, b..b+VLF), one weight broadcast
 * per VLF products. A tile is R rows of W by NV <= LT_BNV vectors of rows (R * NV = LT_ACC
 * accumulators: 24 with 32 registers, 12 with 16), so no horizontal sums and
 * no per-output epilogue beyond a store. Each output sums its products in order of i in its own lane:
 * the result of a row does not depend on the other rows, the batch size or the tile.
 * Weights: kind 0 float32, 1 bfloat16 widened to float32, 2 bfloat16 pairs (vdpbf16ps) against xt2,
 * the input rounded to bfloat16 with pairs of i interleaved: xt2[(i / 2) * 2 Bp + 2 b + i % 2].
 * Kind 2 runs on AMX tiles instead where the kernel has them and Linux grants them (amx_rows). */
#ifndef LT_BATCHED_MIN
#define LT_BATCHED_MIN 20
#endif

/* n rounded up to whole vectors (FusedModelStep pads its buffers to 16 rows, a multiple of every VLF) */
static inline int roundv(int n) { return (n + VLF - 1) / VLF * VLF; }

static inline __attribute__((always_inline)) void batched_tile(const int kind, const int R, const int NV, int n_in,
                                                               const void *W, int j, int nr, const float *xt,
                                                               const void *xt2, int Bp, int c0, vf acc[LT_ACC]) {
    long w[LT_ACC];
    for (int r = 0; r < R; r++) w[r] = (long)(j + (r < nr ? r : 0)) * n_in;
    for (int a = 0; a < R * NV; a++) acc[a] = (vf){0};
    if (kind == 2) {
#ifdef __AVX512BF16__
        const uint16_t *Wh = W;
        const uint16_t *x2 = (const uint16_t *)xt2 + 2 * c0 * VLF;
        for (int i = 0; i < n_in; i += 2, x2 += 2 * Bp) {
            __m512bh xv[4];
            for (int c = 0; c < NV; c++) xv[c] = (__m512bh)_mm512_loadu_si512(x2 + 2 * c * VLF);
            for (int r = 0; r < R; r++) {
                uint32_t pair;
                memcpy(&pair, Wh + w[r] + i, sizeof pair);
                const __m512bh wv = (__m512bh)_mm512_set1_epi32((int)pair);
                for (int c = 0; c < NV; c++) acc[r * NV + c] = (vf)_mm512_dpbf16_ps((__m512)acc[r * NV + c], wv, xv[c]);
            }
        }
#endif
        return;
    }
    for (int i = 0; i < n_in; i++) {
        if (i % 16 == 0) /* each weight row is its own stream: fetch a few lines ahead of its broadcasts */
            for (int r = 0; r < R; r++)
                __builtin_prefetch((const char *)W + (w[r] + i) * (kind == 0 ? 4 : 2) + LT_AHEAD);
        vf xv[LT_BNV];
        for (int c = 0; c < NV; c++) xv[c] = vload(xt + (long)i * Bp + (c0 + c) * VLF);
        for (int r = 0; r < R; r++) {
            const float wr = kind == 0 ? wscalar_f32(W, w[r] + i) : wscalar_bf16(W, w[r] + i);
            for (int c = 0; c < NV; c++) acc[r * NV + c] += wr * xv[c];
        }
    }
}

/* Rows [j0, j1) of y = x W^T + bias (+ base) in the batched layout: into yt[j * Bp + b] (transposed,
 * every lane) when yt is given, else into y[b, j] (row layout, rows b < B; base[b, j] added if given). */
static inline __attribute__((always_inline)) void batched_rows(const int kind, const int NV, int B, int n_in,
                                                               int n_out, int j0, int j1, const void *W,
                                                               const float *bias, const float *xt, const void *xt2,
                                                               int c0, float *y, float *yt, const float *base) {
    const int R = LT_ACC / NV, Bp = roundv(B);
    for (int j = j0; j < j1; j += R) {
        const int nr = j1 - j < R ? j1 - j : R;
        vf acc[LT_ACC];
        batched_tile(kind, R, NV, n_in, W, j, nr, xt, xt2, Bp, c0, acc);
        if (yt) {
            for (int r = 0; r < nr; r++)
                for (int c = 0; c < NV; c++)
                    vstore(yt + (long)(j + r) * Bp + (c0 + c) * VLF, acc[r * NV + c] + bias[j + r]);
            continue;
        }
        float t[LT_ACC][LT_BNV * VLF]; /* the tile transposed back, a row of the batch at a time */
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < NV; c++) vstore(t[r] + c * VLF, acc[r * NV + c] + bias[j + r]);
        for (int b = c0 * VLF; b < (c0 + NV) * VLF && b < B; b++) {
            const long o = (long)b * n_out + j;
            for (int r = 0; r < nr; r++) y[o + r] = (base ? base[o + r] : 0.0f) + t[r][b - c0 * VLF];
        }
    }
}

static inline __attribute__((always_inline)) void batched_kind(const int kind, int B, int n_in, int n_out, int j0,
                                                               int j1, const void *W, const float *bias,
                                                               const float *xt, const void *xt2, float *y, float *yt,
                                                               const float *base) {
    const int nv = roundv(B) / VLF;
    for (int c0 = 0; c0 < nv; c0 += LT_BNV) {
        switch (nv - c0 < LT_BNV ? nv - c0 : LT_BNV) {
#if LT_BNV >= 4
            case 4: batched_rows(kind, 4, B, n_in, n_out, j0, j1, W, bias, xt, xt2, c0, y, yt, base); break;
            case 3: batched_rows(kind, 3, B, n_in, n_out, j0, j1, W, bias, xt, xt2, c0, y, yt, base); break;
#endif
            case 2: batched_rows(kind, 2, B, n_in, n_out, j0, j1, W, bias, xt, xt2, c0, y, yt, base); break;
            default: batched_rows(kind, 1, B, n_in, n_out, j0, j1, W, bias, xt, xt2, c0, y, yt, base); break;
        }
    }
}

/* xt2 (bfloat16 pairs, see above) from xt, n_in even, for weights of kind 2 (else nothing to do). */
static void batched_pairs(int kind, int Bp, int n_in, const float *xt, uint16_t *xt2) {
#ifdef __AVX512BF16__
    if (kind != 2) return;
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int i = 0; i < n_in; i += 2)
        for (int b = 0; b < Bp; b += VLF) {
            /* cvtne2ps_pbh(hi, lo): lanes 0-15 from lo (x[., i]), 16-31 from hi (x[., i + 1]); then interleave */
            const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xt + (long)(i + 1) * Bp + b),
                                                           _mm512_loadu_ps(xt + (long)i * Bp + b));
            _mm512_storeu_si512(xt2 + (long)i * Bp + 2 * b, _mm512_permutexvar_epi16(order, h));
        }
#else
    (void)kind, (void)Bp, (void)n_in, (void)xt, (void)xt2;
#endif
}


#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define LT_AMX 1

/* AMX tiles for bfloat16 dots in the batched layout: C^T = W X^T, a tile product at a time. The
 * weights are AMX's A operand as they are (16 rows of W by 32 inputs, row-major bfloat16), and xt2 is
 * already its B operand (16 pair rows of inputs by 16 rows of the batch: the "VNNI" layout), so
 * neither is repacked; each 16 x 16 float32 tile of C^T is 16 outputs for 16 rows of the batch.
 * Linux hands out the tile registers on request (arch_prctl), once per process. */
static int amx_state = -1; /* -1 unknown, 0 refused, 1 granted */

static int amx_enable(void) {
    if (amx_state < 0) {
        unsigned long mask = 0;
        amx_state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 &&
                    syscall(SYS_arch_prctl, 0x1022 /* ARCH_GET_XCOMP_PERM */, &mask) == 0 && (mask >> 18) & 1;
    }
    return amx_state;
}

int lt_has_amx(void) { return amx_enable(); }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* tiles 0-1: C (two blocks of 16 outputs), 2-3: A (their weights), 4: B (16 rows of the batch) */
static void amx_configure(void) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 5; t++) c.rows[t] = 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
}

/* Rows [j0, j0 + 16 * nblk) (nblk 1 or 2) of C^T for every 16 rows of the batch, through t[16][16] to
 * yt (transposed) or y (row layout, + base), as batched_rows does. */
static void amx_rows(int nblk, int B, int n_in, int n_out, int j0, const uint16_t *W, const float *bias,
                     const uint16_t *xt2, float *y, float *yt, const float *base) {
    const int Bp = roundv(B);
    float t[2][16][16];
    for (int b0 = 0; b0 < Bp; b0 += 16) {
        _tile_zero(0);
        _tile_zero(1);
        for (int k = 0; k < n_in; k += 32) {
            _tile_loadd(4, xt2 + (long)k * Bp + 2 * b0, 4 * Bp);
            _tile_loadd(2, W + (long)j0 * n_in + k, 2 * n_in);
            _tile_dpbf16ps(0, 2, 4);
            if (nblk == 2) {
                _tile_loadd(3, W + (long)(j0 + 16) * n_in + k, 2 * n_in);
                _tile_dpbf16ps(1, 3, 4);
            }
        }
        _tile_stored(0, t[0], 64);
        if (nblk == 2) _tile_stored(1, t[1], 64);
        for (int m = 0; m < 16 * nblk; m++) {
            const vf v = vload(t[m / 16][m % 16]) + bias[j0 + m];
            if (yt) {
                vstore(yt + (long)(j0 + m) * Bp + b0, v);
                continue;
            }
            float u[VLF];
            vstore(u, v);
            for (int l = 0; l < VLF && b0 + l < B; l++) {
                const long o = (long)(b0 + l) * n_out + j0 + m;
                y[o] = (base ? base[o] : 0.0f) + u[l];
            }
        }
    }
}
#endif

#ifndef LT_AMX
int lt_has_amx(void) { return 0; }
#endif

/* xt2: batched_pairs of xt, for kind 2; amx: use AMX tiles for kind 2 (configured by the caller) */
static void batched_gemv(int amx, int kind, int B, int n_in, int n_out, int j0, int j1, const void *W,
                         const float *bias, const float *xt, const uint16_t *xt2, float *y, float *yt,
                         const float *base) {
#ifdef LT_AMX
    if (kind == 2 && amx) { /* 32 and 16 outputs at a time, what is left (< 16) below */
        for (; j1 - j0 >= 16; j0 += j1 - j0 >= 32 ? 32 : 16)
            amx_rows(j1 - j0 >= 32 ? 2 : 1, B, n_in, n_out, j0, W, bias, xt2, y, yt, base);
    }
#else
    (void)amx;
#endif
    if (kind == 2) {
        batched_kind(2, B, n_in, n_out, j0, j1, W, bias, xt, xt2, y, yt, base);
    } else if (kind == 1) {
        batched_kind(1, B, n_in, n_out, j0, j1, W, bias, xt, xt2, y, yt, base);
    } else {
        batched_kind(0, B, n_in, n_out, j0, j1, W, bias, xt, xt2, y, yt, base);
    }
}

/* With gelu set, GELU (exact) is applied after the products, VLF outputs at a time (vgelu): libm's
 * scalar erff cost as much as the bfloat16 products at batch 1. */
static void gemv(int bf16, int B, int n_in, int n_out, int j0, int j1, const void *W, const float *bias,
                 const float *x, float *y, const float *base, int gelu) {
    (bf16 == 2 ? gemv_bf16dot : bf16 ? gemv_bf16 : gemv_f32)(B, n_in, n_out, j0, j1, W, bias, x, y, base);
    for (int b = 0; gelu && b < B; b++) gelu_row(y + (long)b * n_out + j0, j1 - j0);
}

/* This thread's share [*lo, *hi) of n items, in blocks of `grain`. */
static void share(int n, int grain, int *lo, int *hi) {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads(), blocks = (n + grain - 1) / grain;
    *lo = (int)((long)blocks * t / nt) * grain;
    *hi = (int)((long)blocks * (t + 1) / nt) * grain;
    if (*hi > n) *hi = n;
    if (*lo > n) *lo = n;
}

/* LayerNorm of B rows of d into y [B, d] and/or (each may be NULL) yt [d, Bp] (transposed, the
 * lanes from B to Bp zeroed): the sums VLF lanes at a time, then across the lanes (hsum). */
static void layer_norm(int B, int d, const float *x, const float *w, const float *b, float eps, float *y, float *yt,
                       int Bp) {
    for (int r = 0; r < B; r++) {
        const float *xr = x + (long)r * d;
        vf acc = (vf){0};
        int i = 0;
        for (; i + VLF <= d; i += VLF) acc += vload(xr + i);
        float mean = hsum(acc);
        for (; i < d; i++) mean += xr[i];
        mean /= d;
        acc = (vf){0};
        for (i = 0; i + VLF <= d; i += VLF) {
            const vf t = vload(xr + i) - mean;
            acc += t * t;
        }
        float var = hsum(acc);
        for (; i < d; i++) var += (xr[i] - mean) * (xr[i] - mean);
        const float inv = 1.0f / sqrtf(var / d + eps);
        if (y)
            for (i = 0; i < d; i++) y[(long)r * d + i] = (xr[i] - mean) * inv * w[i] + b[i];
        if (yt)
            for (i = 0; i < d; i++) yt[(long)i * Bp + r] = (xr[i] - mean) * inv * w[i] + b[i];
    }
    for (int i = 0; yt && i < d; i++)
        for (int r = B; r < Bp; r++) yt[(long)i * Bp + r] = 0;
}

/* xt [d, Bp] = x [B, d] transposed, the lanes from B to Bp zeroed. */
static void transpose(int B, int d, const float *x, float *xt, int Bp) {
    for (int i = 0; i < d; i++)
        for (int r = 0; r < Bp; r++) xt[(long)i * Bp + r] = r < B ? x[(long)r * d + i] : 0;
}

/* phi on VLF lanes: elu(v) + 1 (v + 1 above 0, exp(v) at or below) or relu(v). */
static inline vf vphi(vf v, int kind) {
    const vi pos = v > 0.0f;
    if (kind != 0) return (vf)((vi)v & pos);
    const vf e = vexp_neg((vf)((vi)v & ~pos)); /* exp(min(v, 0)) */
    return (vf)(((vi)(v + 1.0f) & pos) | ((vi)e & ~pos));
}

/* One head of one row: q, k = phi(q), phi(k) (in place); z += k; S += k v^T; o = q^T S / (q . z + eps).
 * VLF lanes at a time where dk and dv are multiples of VLF, else one value at a time. */
static void attend(int dk, int dv, int feature_map, float eps, float *restrict q, float *restrict k,
                   const float *restrict v, float *restrict S, float *restrict z, float *restrict o) {
    if (dk % VLF == 0 && dv % VLF == 0) {
        vf den = (vf){0};
        for (int i = 0; i < dk; i += VLF) {
            const vf qv = vphi(vload(q + i), feature_map), kv = vphi(vload(k + i), feature_map);
            const vf zv = vload(z + i) + kv;
            vstore(q + i, qv);
            vstore(k + i, kv);
            vstore(z + i, zv);
            den += qv * zv;
        }
        const float inv = 1.0f / (eps + hsum(den));
        for (int e = 0; e < dv; e += VLF) {
            const vf vv = vload(v + e);
            vf acc = (vf){0};
            for (int i = 0; i < dk; i++) {
                const vf row = vload(S + (long)i * dv + e) + k[i] * vv;
                vstore(S + (long)i * dv + e, row);
                acc += q[i] * row;
            }
            vstore(o + e, acc * inv);
        }
        return;
    }
    float den = eps;
    for (int i = 0; i < dk; i++) {
        q[i] = phi(q[i], feature_map);
        k[i] = phi(k[i], feature_map);
        z[i] += k[i];
        den += q[i] * z[i];
    }
    for (int e = 0; e < dv; e++) o[e] = 0;
    for (int i = 0; i < dk; i++) {
        float *row = S + (long)i * dv;
        const float ki = k[i], qi = q[i];
        for (int e = 0; e < dv; e++) {
            row[e] += ki * v[e];
            o[e] += qi * row[e];
        }
    }
    const float inv = 1.0f / den;
    for (int e = 0; e < dv; e++) o[e] *= inv;
}

/* A step's shapes and buffers. Shared (work, Bp * (H (2 dk + dv) + H dv + dff + 2 d) floats, Bp = B
 * rounded up to 16): qkv, att, ff, x2 and x, the residual stream, which holds the embedded tokens
 * when a step starts. Per thread (malloc'd in the parallel region): xp, x1 [B, d]; in the batched
 * layout also xt [d, Bp], one head's output o [dv] and xt2 (bfloat16 pairs). */
typedef struct {
    int B, Bp, batched, kind, amx;
    float *qkv, *att, *ff, *x2, *x;
} lt_step;

typedef struct {
    float *xp, *x1, *xt, *o;
    uint16_t *xt2;
} lt_mine;

static lt_step step_layout(const lt_model *m, int B, float *work) {
    lt_step s;
    s.B = B, s.Bp = roundv(B), s.batched = B >= LT_BATCHED_MIN, s.kind = m->bf16;
#ifdef LT_AMX
    s.amx = s.batched && s.kind == 2 && amx_enable();
#else
    s.amx = 0;
#endif
    s.qkv = work, s.att = s.qkv + (long)s.Bp * m->n_heads * (2 * m->dk + m->dv);
    s.ff = s.att + (long)s.Bp * m->n_heads * m->dv, s.x2 = s.ff + (long)s.Bp * m->dff, s.x = s.x2 + (long)s.Bp * m->d;
    return s;
}

/* 0, or 2 when the model's sizes or pointers are unusable (the caller's checks are not trusted). */
static int check_model(const lt_model *m) {
    if (!m || m->n_layers < 1 || m->d < 1 || m->n_heads < 1 || m->dk < 1 || m->dv < 1 || m->dff < 1 ||
        m->vocab < 1 || m->max_len < 1 || m->n_params < 1 || m->bf16 < 0 || m->bf16 > 2 || m->feature_map < 0 ||
        m->feature_map > 1 || !m->embed || !m->head_w || !m->head_b || !m->norm_w != !m->norm_b)
        return 2;
    const float *const *arrays[12] = {m->ln1_w, m->ln1_b, m->qkv_w, m->qkv_b, m->out_w, m->out_b,
                                      m->ln2_w, m->ln2_b, m->ff1_w, m->ff1_b, m->ff2_w, m->ff2_b};
    for (int a = 0; a < 12; a++) {
        if (!arrays[a]) return 2;
        for (int l = 0; l < m->n_layers; l++)
            if (!arrays[a][l]) return 2;
    }
    return 0;
}

/* 0, or 2 when a token or a position is out of range. */
static int check_tokens(const lt_model *m, int B, const int64_t *tokens, long position) {
    if (check_model(m) || B < 1 || !tokens || position < 0 || position >= m->max_len) return 2;
    for (int b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= m->vocab) return 2;
    return 0;
}

/* x = embed[token] + pos[position] for the B rows (checked by check_tokens). */
static void embed(const lt_model *m, int B, const int64_t *tokens, long position, float *x) {
    const int d = m->d;
    for (int b = 0; b < B; b++) {
        const float *e = m->embed + tokens[b] * d, *p = m->pos ? m->pos + position * d : NULL;
        for (int i = 0; i < d; i++) x[(long)b * d + i] = p ? e[i] + p[i] : e[i];
    }
}

/* This thread's buffers (inside the parallel region); NULL pointers when out of memory. */
static lt_mine mine_alloc(const lt_model *m, const lt_step *s) {
    const int d = m->d, dff = m->dff, Hdv = m->n_heads * m->dv, B = s->B, Bp = s->Bp;
    const int widest = d > dff ? (d > Hdv ? d : Hdv) : (dff > Hdv ? dff : Hdv);
    const size_t n = 2 * (size_t)B * d + (s->batched ? (size_t)d * Bp + m->dv + (size_t)widest * Bp / 2 + VLF : 0);
    lt_mine t = {NULL, NULL, NULL, NULL, NULL};
    t.xp = malloc(sizeof(float) * n);
    if (!t.xp) return t;
    t.x1 = t.xp + (long)B * d;
    if (s->batched) t.xt = t.x1 + (long)B * d, t.o = t.xt + (long)d * Bp, t.xt2 = (uint16_t *)(t.o + m->dv);
    return t;
}

/* Every thread of the parallel region, together: the blocks and the head for the embedded tokens in
 * s->x, into params [B, n_params]; S[l], z[l] updated. No barrier at the end: the caller's. From
 * LT_BATCHED_MIN rows on, the projections run in the batched layout (batched_gemv): their inputs
 * are transposed (normalised straight into it, attention writes it) and the first feed-forward
 * layer's output stays transposed for the second. Every thread normalises x itself (identical
 * results) instead of waiting for one that does, so a pre-norm block costs four barriers: after
 * attention, the output projection, and each FF layer. */
static void step_blocks(const lt_model *m, const lt_step *s, const lt_mine *t, float *const *S, float *const *z,
                        float *params) {
    const int d = m->d, H = m->n_heads, dk = m->dk, dv = m->dv, dff = m->dff, width = 2 * dk + dv;
    const int B = s->B, Bp = s->Bp, batched = s->batched, kind = s->kind, amx = s->amx;
    float *qkv = s->qkv, *att = s->att, *ff = s->ff, *x2 = s->x2, *x = s->x;
    float *xp = t->xp, *x1 = t->x1, *xt = t->xt, *o = t->o;
    uint16_t *xt2 = t->xt2;
    for (int l = 0; l < m->n_layers; l++) {
        int lo, hi;
        /* A: queries, keys, values and attention, a head (for all rows) per work item */
        const float *in = x;
        if (m->pre_norm) {
            layer_norm(B, d, x, m->ln1_w[l], m->ln1_b[l], m->ln_eps, batched ? NULL : xp, xt, Bp);
            in = xp;
        } else if (batched) {
            transpose(B, d, x, xt, Bp);
        }
        if (batched) batched_pairs(kind, Bp, d, xt, xt2);
        share(H, 1, &lo, &hi);
        for (int h = lo; h < hi; h++) {
            if (batched)
                batched_gemv(amx, kind, B, d, H * width, h * width, (h + 1) * width, m->qkv_w[l],
                             m->qkv_b[l], xt, xt2, qkv, NULL, NULL);
            else
                gemv(kind, B, d, H * width, h * width, (h + 1) * width, m->qkv_w[l], m->qkv_b[l], in, qkv,
                     NULL, 0);
            for (int b = 0; b < B; b++) {
                const long bh = (long)b * H + h;
                float *q = qkv + bh * width;
                attend(dk, dv, m->feature_map, m->attn_eps, q, q + dk, q + 2 * dk, S[l] + bh * dk * dv,
                       z[l] + bh * dk, batched ? o : att + bh * dv);
                if (batched) /* into the transposed input of the output projection */
                    for (int e = 0; e < dv; e++) att[(long)(h * dv + e) * Bp + b] = o[e];
            }
            for (int e = 0; batched && e < dv; e++)
                for (int b = B; b < Bp; b++) att[(long)(h * dv + e) * Bp + b] = 0;
        }
#pragma omp barrier
        /* B: output projection and residual (post-norm: into x2, normalised below) */
        share(d, 4, &lo, &hi);
        if (batched) batched_pairs(kind, Bp, H * dv, att, xt2);
        if (batched)
            batched_gemv(amx, kind, B, H * dv, d, lo, hi, m->out_w[l], m->out_b[l], att, xt2,
                         m->pre_norm ? x : x2, NULL, x);
        else
            gemv(kind, B, H * dv, d, lo, hi, m->out_w[l], m->out_b[l], att, m->pre_norm ? x : x2, x, 0);
#pragma omp barrier
        /* C: first feed-forward layer with its GELU */
        if (m->pre_norm) {
            layer_norm(B, d, x, m->ln2_w[l], m->ln2_b[l], m->ln_eps, batched ? NULL : xp, xt, Bp);
        } else { /* x1 = LN1(x + attn), the residual of the feed-forward sublayer */
            layer_norm(B, d, x2, m->ln1_w[l], m->ln1_b[l], m->ln_eps, x1, xt, Bp);
        }
        in = m->pre_norm ? xp : x1;
        share(dff, 4, &lo, &hi);
        if (batched) {
            batched_pairs(kind, Bp, d, xt, xt2);
            batched_gemv(amx, kind, B, d, dff, lo, hi, m->ff1_w[l], m->ff1_b[l], xt, xt2, NULL, ff, NULL);
            gelu_row(ff + (long)lo * Bp, (hi - lo) * Bp);
        } else {
            gemv(kind, B, d, dff, lo, hi, m->ff1_w[l], m->ff1_b[l], in, ff, NULL, 1);
        }
#pragma omp barrier
        /* D: second feed-forward layer and residual */
        share(d, 4, &lo, &hi);
        if (batched) batched_pairs(kind, Bp, dff, ff, xt2);
        if (batched)
            batched_gemv(amx, kind, B, dff, d, lo, hi, m->ff2_w[l], m->ff2_b[l], ff, xt2, m->pre_norm ? x : x2,
                         NULL, m->pre_norm ? x : x1);
        else
            gemv(kind, B, dff, d, lo, hi, m->ff2_w[l], m->ff2_b[l], ff, m->pre_norm ? x : x2,
                 m->pre_norm ? x : x1, 0);
#pragma omp barrier
        if (!m->pre_norm) { /* x = LN2(x1 + FF(x1)), a row per thread */
#pragma omp for schedule(static)
            for (int r = 0; r < B; r++)
                layer_norm(1, d, x2 + (long)r * d, m->ln2_w[l], m->ln2_b[l], m->ln_eps, x + (long)r * d, NULL,
                           0);
        }
    }
    /* the head: x is complete (the last barrier above, or the implicit one of omp for) */
    const float *h = x;
    if (m->norm_w) {
        layer_norm(B, d, x, m->norm_w, m->norm_b, m->norm_eps, xp, NULL, 0);
        h = xp;
    }
    int lo, hi;
    share(m->n_params, 4, &lo, &hi);
    gemv_f32(B, d, m->n_params, lo, hi, m->head_w, m->head_b, h, params, NULL);
}

/* One token for B rows. tokens [B] in [0, vocab); position: theirs in the sequence (< max_len).
 * x = embed[token] + pos[position]; x = blocks(x); params [B, n_params] = head(norm(x)).
 * S[l] [B, H, dk, dv] and z[l] [B, H, dk]: layer l's state, updated in place. work: see lt_step.
 * Returns 0, 1 when out of memory, 2 for a token or position out of range (nothing is touched). */
int lt_model_token_f32(const lt_model *m, int B, const int64_t *tokens, long position, float *const *S,
                       float *const *z, float *work, float *params) {
    if (check_tokens(m, B, tokens, position) || !S || !z || !work || !params) return 2;
    for (int l = 0; l < m->n_layers; l++)
        if (!S[l] || !z[l]) return 2;
    const lt_step s = step_layout(m, B, work);
    embed(m, B, tokens, position, s.x);
    int failed = 0;
#pragma omp parallel
    {
        lt_mine t = mine_alloc(m, &s);
#pragma omp atomic
        failed += t.xp == NULL;
#pragma omp barrier
#ifdef LT_AMX
        if (s.amx) amx_configure(); /* the tile configuration is each thread's own */
#endif
        if (!failed) step_blocks(m, &s, &t, S, z, params);
#ifdef LT_AMX
        if (s.amx) _tile_release();
#endif
        free(t.xp);
    }
    return failed ? 1 : 0;
}

int lt_mol_sample_f32(int B, int K, int L, const float *params, const float *race, const float *u, int64_t *out);

/* n tokens of a model with a discretised-mixture head (L levels, K components) in one call: out
 * [n + 1, B] holds the tokens at position (row 0, given) and receives the n sampled after them;
 * each step is lt_model_token_f32's, each draw lt_mol_sample_f32's with race [n, B, K] and u [n, B]
 * (drawn by the caller, row t for token t + 1). One parallel region for all n steps: the threads
 * stay in it, and one of them samples and embeds the next token between steps. S and z advance by n
 * tokens (the last token sampled is not fed); params ends as the last step's. *done: the tokens
 * sampled. Returns 0; 1 out of memory; 2 a token, position or L out of range (nothing is touched);
 * 3 non-finite parameters (the tokens up to *done are sampled). */
int lt_generate_mol_f32(const lt_model *m, int B, int64_t *out, long position, int n, float *const *S,
                        float *const *z, float *work, float *params, int K, int L, const float *race, const float *u,
                        int *done) {
    if (!done) return 2;
    *done = 0;
    if (check_model(m) || n < 0 || K < 1 || L < 2 || L > m->vocab || 3 * K != m->n_params ||
        position + n > m->max_len || !S || !z || !work || !params || !race || !u)
        return 2;
    for (int l = 0; l < m->n_layers; l++)
        if (!S[l] || !z[l]) return 2;
    if (check_tokens(m, B, out, position)) return 2;
    if (n == 0) return 0;
    const lt_step s = step_layout(m, B, work);
    embed(m, B, out, position, s.x);
    int failed = 0, bad = 0;
#pragma omp parallel
    {
        lt_mine t = mine_alloc(m, &s);
#pragma omp atomic
        failed += t.xp == NULL;
#pragma omp barrier
#ifdef LT_AMX
        if (s.amx) amx_configure();
#endif
        for (int i = 0; !failed && i < n; i++) {
            step_blocks(m, &s, &t, S, z, params);
#pragma omp barrier
#pragma omp single
            {
                int64_t *next = out + (long)(i + 1) * B;
                bad = lt_mol_sample_f32(B, K, L, params, race + (long)i * B * K, u + (long)i * B, next);
                if (!bad) {
                    *done = i + 1;
                    if (i + 1 < n) embed(m, B, next, position + i + 1, s.x);
                }
            }
            if (bad) break; /* every thread reads it after the single's barrier */
        }
#ifdef LT_AMX
        if (s.amx) _tile_release();
#endif
        free(t.xp);
    }
    return failed ? 1 : bad ? 3 : 0;
}

/* Reads n float32 arrays `passes` times in one parallel region (as lt_generate_mol_f32 runs its steps)
 * and returns the mean of the passes' sums (so no read is optimised away): each thread reads its share
 * of every array as four streams a quarter apart, the way the row-layout GEMVs read weights. For bench
 * generate: what reading the float32 weights alone, once per token, costs for a whole sequence. */
float lt_read_f32(int n, const float *const *arrays, const long *sizes, int passes) {
    if (n < 0 || passes < 1 || (n > 0 && (!arrays || !sizes))) return NAN;
    for (int a = 0; a < n; a++)
        if (sizes[a] < 0 || (sizes[a] > 0 && !arrays[a])) return NAN;
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int pass = 0; pass < passes; pass++) {
            vf acc[4] = {(vf){0}, (vf){0}, (vf){0}, (vf){0}};
            float rest = 0;
            for (int a = 0; a < n; a++) {
                const float *x = arrays[a];
                const long lo = sizes[a] * t / nt, hi = sizes[a] * (t + 1) / nt, q = (hi - lo) / (4 * VLF) * VLF;
                for (long i = 0; i < q; i += VLF)
                    for (int r = 0; r < 4; r++) {
                        __builtin_prefetch((const char *)(x + lo + r * q + i) + LT_AHEAD);
                        acc[r] += vload(x + lo + r * q + i);
                    }
                for (long i = lo + 4 * q; i < hi; i++) rest += x[i];
            }
            total += hsum(acc[0] + acc[1] + acc[2] + acc[3]) + rest; /* every pass counts: none is dead code */
        }
    }
    return total / passes;
}

/* Draw one level per row from a discretised mixture of logistics (heads.MixtureOfLogisticsHead.sample
 * at temperature 1), with the random numbers drawn by the caller so the stream is PyTorch's:
 * params [B, 3K] (K logits, K means, K log-scales), race [B, K] ~ Exp(1), u [B] ~ U(0, 1).
 * Component k = argmax(log_softmax(logits) - log(race)); x = mu_k + s_k (log u - log(1 - u));
 * level = round-half-even((x + 1) (L - 1) / 2) clamped to [0, L - 1].
 * Returns the number of rows whose parameters were not finite (their level is left at 0). */
int lt_mol_sample_f32(int B, int K, int L, const float *params, const float *race, const float *u, int64_t *out) {
    if (B < 0 || K < 1 || L < 2 || !params || !race || !u || !out) return -1; /* a call the caller got wrong */
    int bad = 0;
    for (int b = 0; b < B; b++) {
        const float *p = params + (long)b * 3 * K, *r = race + (long)b * K;
        int finite = 1;
        for (int j = 0; j < 3 * K; j++) finite &= isfinite(p[j]) != 0;
        if (!finite) {
            bad++;
            out[b] = 0;
            continue;
        }
        float top = p[0];
        for (int j = 1; j < K; j++) top = p[j] > top ? p[j] : top;
        float sum = 0;
        for (int j = 0; j < K; j++) sum += expf(p[j] - top);
        const float log_sum = logf(sum);
        int k = 0;
        float best = -INFINITY;
        for (int j = 0; j < K; j++) {
            const float score = (p[j] - top - log_sum) - logf(r[j]);
            if (score > best) best = score, k = j;
        }
        const float log_s = p[2 * K + k] < -7.0f ? -7.0f : p[2 * K + k];
        const float x = p[K + k] + expf(log_s) * (logf(u[b]) - log1pf(-u[b]));
        const float level = nearbyintf((x + 1.0f) * ((float)(L - 1) / 2.0f));
        out[b] = level < 0 ? 0 : level > L - 1 ? L - 1 : (int64_t)level;
    }
    return bad;
}

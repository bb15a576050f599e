/* The GEMVs of the fused steps: y = W x + bias for a batch of rows, float32 or bfloat16 weights
 * (widened, or bfloat16 dot products on AVX512-BF16), in the row layout (batch <= LT_BATCHED_MIN) or
 * the batched layout (rows in vector lanes; AMX-BF16 tiles where present); the Llama step's batches
 * of bfloat16 or int8 dots on AMX tiles (amx_gemm); GELU; and the share of
 * work each OpenMP thread takes. Static functions, so each step's file inlines them for its own
 * shapes. LT_HAS_BF16_DOT and LT_AMX say what the build has. */
#ifndef LT_GEMV_H
#define LT_GEMV_H

#include "vec.h"

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

/* y[b, j] = (base ? base[b, j] : 0) + (bias ? bias[j] : 0) + W[j, :] . x[b, :] for rows j in [j0, j1). A tile is
 * 4 rows of W by NB <= LT_GEMV_NB rows of x: each weight vector loaded serves NB rows and each x
 * vector 4 weight rows, so W streams from cache B / LT_GEMV_NB times, not B times. Every
 * output sums its products in the same order whatever the tile, so results do not depend on B.
 * The tile body is inlined for each NB (1..4), so its accumulators stay in registers. Each of the four
 * weight rows is its own stream, prefetched LT_AHEAD bytes ahead (the hardware's prefetcher alone
 * left ~10% of the batch-1 step on the table), and the four lie a quarter of [j0, j1) apart (tile_rows):
 * four adjacent rows make one short stream per 4 KB page, which the hardware prefetcher restarts on
 * every page. */

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
#define DEFINE_GEMV(NAME, WLOAD, WSCALAR, ESIZE, SCALE)                                                               \
    static inline __attribute__((always_inline)) void NAME##_tile(                                                 \
        const int NB, int b0, int n_in, int n_out, int j, int nr, int rs, const void *W, const float *bias,         \
        const float *x, float *y, const float *base) {                                                             \
        long w[4];                                                                                                 \
        for (int r = 0; r < 4; r++) w[r] = (long)(j + (r < nr ? r : 0) * rs) * n_in;                               \
        vf acc[4][4]; /* NB x 4 used: NB is a constant, so only those live in registers */                        \
        for (int c = 0; c < NB; c++)                                                                               \
            for (int r = 0; r < 4; r++) acc[c][r] = (vf){0};                                                       \
        int i = 0;                                                                                                 \
        /* a cache line (64 bytes) of each weight row per iteration: one prefetch per line and row */              \
        enum { U = 64 / (VLF * ESIZE) > 1 ? 64 / (VLF * ESIZE) : 1 };                                              \
        for (; i + U * VLF <= n_in; i += U * VLF) {                                                                \
            for (int r = 0; r < 4; r++) __builtin_prefetch((const char *)W + (w[r] + i) * ESIZE + LT_AHEAD);       \
            for (int u = 0; u < U; u++) {                                                                          \
                vf wv[4];                                                                                          \
                for (int r = 0; r < 4; r++) wv[r] = WLOAD(W, w[r] + i + u * VLF);                                  \
                for (int c = 0; c < NB; c++) {                                                                     \
                    const vf xv = vload(x + (long)(b0 + c) * n_in + i + u * VLF);                                  \
                    for (int r = 0; r < 4; r++) acc[c][r] += wv[r] * xv;                                           \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        for (; i + VLF <= n_in; i += VLF) {                                                                        \
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
                const float scale = SCALE(W, n_out, n_in, j + r * rs);                                             \
                float s = scale * sums[r] + (bias ? bias[j + r * rs] : 0.0f);                                      \
                for (int t = i; t < n_in; t++) s += scale * WSCALAR(W, w[r] + t) * xb[t];                          \
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

/* int8 weights (symmetric, one float32 scale per output row): the matrix [n_out, n_in] of int8, then
 * its n_out scales (float32, unaligned) right after it; W x = scale_j * (W8[j, :] . x), the int8
 * values widened to float32 (exact) and multiplied by float32 activations: only the weights lose
 * precision, the products do not. */
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE4_1__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif
/* VLF int8 weights widened to float32: one sign-extending load and a conversion where the target has
 * them (GCC turns __builtin_convertvector from int8 into one scalar conversion per lane). */
static inline vf wload_i8(const void *W, long i) {
    const int8_t *p = (const int8_t *)W + i;
#if LT_VLF == 16 && defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif LT_VLF == 8 && defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#elif LT_VLF == 4 && defined(__SSE4_1__)
    int32_t u;
    memcpy(&u, p, sizeof u);
    return (vf)_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(u)));
#elif LT_VLF == 4 && defined(__ARM_NEON)
    uint32_t u;
    memcpy(&u, p, sizeof u);
    return (vf)vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vcreate_s8((uint64_t)u)))));
#else
    typedef int8_t vb __attribute__((vector_size(LT_VLF), aligned(1)));
    vb b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vf);
#endif
}
static inline float wscalar_i8(const void *W, long i) { return (float)((const int8_t *)W)[i]; }
static inline float scale_i8(const void *W, int n_out, int n_in, int row) {
    float s;
    memcpy(&s, (const int8_t *)W + (long)n_out * n_in + 4L * row, sizeof s);
    return s;
}
#define NO_SCALE(W, n_out, n_in, row) 1.0f

DEFINE_GEMV(gemv_f32, wload_f32, wscalar_f32, 4, NO_SCALE)
DEFINE_GEMV(gemv_bf16, wload_bf16, wscalar_bf16, 2, NO_SCALE)
DEFINE_GEMV(gemv_i8, wload_i8, wscalar_i8, 1, scale_i8)

/* int8 dot products (format LT_I8_DOT): the int8 weights above times the input rounded to int8 too,
 * per block of LT_I8_BLOCK inputs (symmetric: x_q = rint(x * 127 / max|x_b|), scale max|x_b| / 127),
 * so that each group of 4 weights times 4 inputs sums exactly in int32: vpdpbusd (AVX512-VNNI),
 * vpmaddubsw + vpmaddwd (AVX-512BW, AVX2), plain C elsewhere; every ISA gets the same int32 sums. A
 * vector lane holds one group: its sum, widened to float32, times its block's scale, accumulates in
 * float32; y = row scale * (the lanes' sum) + bias. The unsigned operand is |x_q|, the signed one the
 * weight with x_q's sign (weights lie in [-127, 127], so the negation is exact and a pair of products
 * stays within int16). n_in must be a multiple of LT_I8_BLOCK (checked by the callers). */
#define LT_I8_BLOCK 32

/* x [n_in] -> xq [n_in] and s4 [n_in / 4], each group of 4's block scale (decode.llama.quantize_input) */
static void quantize_input(int n_in, const float *x, int8_t *xq, float *s4) {
    for (int b = 0; b < n_in; b += LT_I8_BLOCK) {
        float top = 0.0f;
        for (int i = b; i < b + LT_I8_BLOCK; i++) top = fabsf(x[i]) > top ? fabsf(x[i]) : top;
        const float inv = top > 0.0f ? 127.0f / top : 0.0f, s = top / 127.0f;
        for (int i = b; i < b + LT_I8_BLOCK; i++) {
            const float v = rintf(x[i] * inv);
            xq[i] = (int8_t)(v >= 127.0f ? 127 : v <= -127.0f ? -127 : v == v ? (int)v : 0); /* (NaN: 0) */
        }
        for (int g = b / 4; g < (b + LT_I8_BLOCK) / 4; g++) s4[g] = s;
    }
}

/* One group's int32 sum, in plain C (the tails, and the targets without the instructions below). */
static inline int32_t idot_group(const int8_t *w, const int8_t *x) {
    return (int32_t)w[0] * x[0] + (int32_t)w[1] * x[1] + (int32_t)w[2] * x[2] + (int32_t)w[3] * x[3];
}

/* A chunk of the input (4 VLF int8: VLF groups) made ready for idot, once per chunk and row of x,
 * then shared by the tile's four weight rows. */
#if LT_VLF == 16 && defined(__AVX512BW__)
typedef struct {
    __m512i a;
    __mmask64 neg;
} xchunk;
static inline xchunk xprep(const int8_t *x) {
    const __m512i v = _mm512_loadu_si512(x);
    return (xchunk){_mm512_abs_epi8(v), _mm512_movepi8_mask(v)};
}
static inline vf idot(const int8_t *w, xchunk x) {
    const __m512i wv = _mm512_loadu_si512(w);
    const __m512i ws = _mm512_mask_sub_epi8(wv, x.neg, _mm512_setzero_si512(), wv);
#ifdef __AVX512VNNI__
    const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x.a, ws);
#else
    const __m512i d = _mm512_madd_epi16(_mm512_maddubs_epi16(x.a, ws), _mm512_set1_epi16(1));
#endif
    return (vf)_mm512_cvtepi32_ps(d);
}
#elif LT_VLF == 8 && defined(__AVX2__)
typedef struct {
    __m256i v, a;
} xchunk;
static inline xchunk xprep(const int8_t *x) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)x);
    return (xchunk){v, _mm256_abs_epi8(v)};
}
static inline vf idot(const int8_t *w, xchunk x) {
    const __m256i ws = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)w), x.v);
    return (vf)_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(x.a, ws), _mm256_set1_epi16(1)));
}
#else
typedef struct {
    const int8_t *p;
} xchunk;
static inline xchunk xprep(const int8_t *x) { return (xchunk){x}; }
static inline vf idot(const int8_t *w, xchunk x) {
    vi d;
    for (int l = 0; l < VLF; l++) d[l] = idot_group(w + 4 * l, x.p + 4 * l);
    return __builtin_convertvector(d, vf);
}
#endif

/* A tile of 4 weight rows (tile_rows) by NB rows of the quantised input (xq, s4: rows b0.., strides
 * n_in and n_in / 4), as DEFINE_GEMV's. */
static inline __attribute__((always_inline)) void i8dot_tile(const int NB, int n_in, int n_out, int b0, int j, int nr,
                                                             int rs, const int8_t *W, const float *bias,
                                                             const int8_t *xq, const float *s4, float *y,
                                                             const float *base) {
    enum { CH = 4 * VLF }; /* bytes of a weight row per chunk */
    long w[4];
    for (int r = 0; r < 4; r++) w[r] = (long)(j + (r < nr ? r : 0) * rs) * n_in;
    vf acc[4][4];
    float tail[4][4];
    for (int c = 0; c < NB; c++)
        for (int r = 0; r < 4; r++) acc[c][r] = (vf){0}, tail[c][r] = 0.0f;
    int i = 0;
    for (; i + CH <= n_in; i += CH) {
        if (i % 64 == 0) /* one prefetch per cache line and row */
            for (int r = 0; r < 4; r++) __builtin_prefetch(W + w[r] + i + LT_AHEAD);
        xchunk xc[4];
        vf sv[4];
        for (int c = 0; c < NB; c++) {
            xc[c] = xprep(xq + (long)c * n_in + i);
            sv[c] = vload(s4 + (long)c * (n_in / 4) + i / 4);
        }
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < NB; c++) acc[c][r] += idot(W + w[r] + i, xc[c]) * sv[c];
    }
    for (; i < n_in; i += 4) /* (AVX-512: the last 32 inputs when n_in is an odd multiple of 32) */
        for (int c = 0; c < NB; c++)
            for (int r = 0; r < 4; r++)
                tail[c][r] += s4[(long)c * (n_in / 4) + i / 4] * (float)idot_group(W + w[r] + i, xq + (long)c * n_in + i);
    for (int c = 0; c < NB; c++) {
        float sums[4];
        hsum4(acc[c], sums);
        for (int r = 0; r < nr; r++) {
            const int row = j + r * rs;
            float s = scale_i8(W, n_out, n_in, row) * (sums[r] + tail[c][r]) + (bias ? bias[row] : 0.0f);
            const long o = (long)(b0 + c) * n_out + row;
            y[o] = base ? s + base[o] : s;
        }
    }
}

/* Rows [j0, j1) of y = W x (+ bias, + base) for B rows of x, int8 dot products: the input quantised
 * LT_I8_ROWS rows at a time (on the stack), each tile's weights reused for every row of the batch. */
#define LT_I8_ROWS 16
static void gemv_i8dot(int B, int n_in, int n_out, int j0, int j1, const void *W, const float *bias, const float *x,
                       float *y, const float *base) {
    int8_t xq[LT_I8_ROWS * n_in];
    float s4[LT_I8_ROWS * (n_in / 4)];
    for (int a = 0; a < B; a += LT_I8_ROWS) {
        const int na = B - a < LT_I8_ROWS ? B - a : LT_I8_ROWS;
        for (int c = 0; c < na; c++)
            quantize_input(n_in, x + (long)(a + c) * n_in, xq + (long)c * n_in, s4 + (long)c * (n_in / 4));
        int j, rs, nr;
        for (int t = 0; (nr = tile_rows(j0, j1, t, &j, &rs)); t++) {
            int c0 = 0;
            for (; c0 + LT_GEMV_NB <= na; c0 += LT_GEMV_NB)
                i8dot_tile(LT_GEMV_NB, n_in, n_out, a + c0, j, nr, rs, W, bias, xq + (long)c0 * n_in,
                           s4 + (long)c0 * (n_in / 4), y, base);
            const int8_t *xr = xq + (long)c0 * n_in;
            const float *sr = s4 + (long)c0 * (n_in / 4);
            switch (na - c0) {
                case 3: i8dot_tile(3, n_in, n_out, a + c0, j, nr, rs, W, bias, xr, sr, y, base); break;
                case 2: i8dot_tile(2, n_in, n_out, a + c0, j, nr, rs, W, bias, xr, sr, y, base); break;
                case 1: i8dot_tile(1, n_in, n_out, a + c0, j, nr, rs, W, bias, xr, sr, y, base); break;
            }
        }
    }
}

#ifdef __AVX512BF16__
#include <immintrin.h>
#define LT_HAS_BF16_DOT 1

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
                float s = _mm512_reduce_add_ps(acc[c][r]) + (bias ? bias[j + r * rs] : 0.0f);
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
#define LT_HAS_BF16_DOT 0
#define gemv_bf16dot gemv_bf16 /* never chosen: FusedModelStep refuses mode 2 without AVX512-BF16 */
#endif

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


#ifdef LT_AMX /* (simd.h: amx_enable, amx_configure) */

/* AMX tiles for bfloat16 dots in the batched layout: C^T = W X^T, a tile product at a time. The
 * weights are AMX's A operand as they are (16 rows of W by 32 inputs, row-major bfloat16), and xt2 is
 * already its B operand (16 pair rows of inputs by 16 rows of the batch: the "VNNI" layout), so
 * neither is repacked; each 16 x 16 float32 tile of C^T is 16 outputs for 16 rows of the batch. */

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

/* The row-layout GEMV of a weight format: 0 float32, 1 bfloat16 widened, 2 bfloat16 dots, 3 int8
 * widened, 4 int8 dots (llama_step.h's LT_F32 .. LT_I8_DOT; model_step.h's bf16 field). */
typedef void (*gemv_fn)(int B, int n_in, int n_out, int j0, int j1, const void *W, const float *bias, const float *x,
                        float *y, const float *base);
static inline gemv_fn gemv_of(int kind) {
    return kind == 4 ? gemv_i8dot : kind == 3 ? gemv_i8 : kind == 2 ? gemv_bf16dot : kind ? gemv_bf16 : gemv_f32;
}

#ifdef LT_AMX
#ifdef __AMX_INT8__
#define LT_AMX_INT8 1 /* int8 dots on tiles too */
#endif

/* The row layout on AMX tiles, for the Llama step's batched rows (llama_step.c): rows [j0, j1) of
 * y [B, n_out] = W x (+ bias, + base) for x [B, n_in], 32 (or 16) outputs by 16 rows of the batch per
 * pass over the inputs, the weights AMX's A operand as they are (16 rows by 32 inputs).
 *   bfloat16 dots (kind 2): x rounded to bfloat16 as gemv_bf16dot rounds it and packed as the B
 *     operand, pairs of inputs: xp[i / 2][b] = (x[b, i], x[b, i + 1]); float32 sums over every input.
 *   int8 dots (kind 4, AMX-INT8): x quantised per block of 32 by quantize_input (gemv_i8dot's int8
 *     values and scales), packed in fours: xp[i / 4][b]; each block is one tile product (exact int32
 *     sums), taken out of the tile and added in float32 times the block's scale, then times the
 *     row's scale.
 * The products are the row path's; their sums are added in another order, so results agree to
 * float32 rounding, not bit for bit. Rows left over (fewer than 16) take the row path. pack holds
 * amx_pack_bytes(n_in, B) and x as amx_pack_input packed it (once per input, for every projection
 * that reads it); the caller configured the tiles (amx_configure(kind == 4)). */
static long amx_pack_bytes(int n_in, int B) {
    const long Bp = (B + 15) / 16 * 16;
    return 2L * n_in * Bp + 4L * (n_in / 32) * Bp + 2L * n_in + 64;
}

static void amx_pack(int int8, int B, int Bp, int n_in, const float *x, uint32_t *xp, float *sT, int8_t *xq,
                     float *s4) {
    const int per = int8 ? 4 : 2; /* inputs per 32-bit cell */
    for (int b = 0; b < Bp; b++) {
        const float *xb = x + (long)b * n_in;
        if (b >= B) {
            for (int g = 0; g < n_in / per; g++) xp[(long)g * Bp + b] = 0;
            for (int k = 0; int8 && k < n_in / 32; k++) sT[(long)k * Bp + b] = 0.0f;
            continue;
        }
        if (int8) {
            quantize_input(n_in, xb, xq, s4);
            for (int g = 0; g < n_in / 4; g++) memcpy(xp + (long)g * Bp + b, xq + 4 * g, 4);
            for (int k = 0; k < n_in / 32; k++) sT[(long)k * Bp + b] = s4[8 * k];
            continue;
        }
        for (int i = 0; i < n_in; i += 32) {
            uint32_t u[16];
            _mm512_storeu_si512(u, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xb + i + 16), _mm512_loadu_ps(xb + i)));
            for (int p = 0; p < 16; p++) xp[(long)(i / 2 + p) * Bp + b] = u[p];
        }
    }
}

/* pack's parts: the packed input xp, the block scales sT (int8), a row's scratch s4 and xq (int8) */
typedef struct {
    uint32_t *xp;
    float *sT, *s4;
    int8_t *xq;
} amx_parts;

static amx_parts amx_parts_of(int int8, int Bp, int n_in, void *pack) {
    amx_parts a;
    a.xp = pack;
    a.sT = (float *)(a.xp + (long)(n_in / (int8 ? 4 : 2)) * Bp);
    a.s4 = a.sT + (long)(n_in / 32) * Bp;
    a.xq = (int8_t *)(a.s4 + n_in / 4);
    return a;
}

static void amx_pack_input(int kind, int B, int n_in, const float *x, void *pack) {
    const int int8 = kind == 4, Bp = (B + 15) / 16 * 16;
    const amx_parts a = amx_parts_of(int8, Bp, n_in, pack);
    amx_pack(int8, B, Bp, n_in, x, a.xp, a.sT, a.xq, a.s4);
}

static void amx_gemm(int kind, int B, int n_in, int n_out, int j0, int j1, const void *W, const float *bias,
                     const float *x, float *y, const float *base, void *pack) {
    const int int8 = kind == 4, Bp = (B + 15) / 16 * 16, j16 = j0 + (j1 - j0) / 16 * 16;
    const amx_parts a = amx_parts_of(int8, Bp, n_in, pack);
    const uint32_t *xp = a.xp;
    const float *sT = a.sT;
    const char *Wb = W;
    const long wrow = int8 ? n_in : 2L * n_in; /* bytes per weight row */
    for (int j = j0; j < j16; j += 32) {
        const int nblk = j16 - j >= 32 ? 2 : 1;
        for (int b0 = 0; b0 < Bp; b0 += 16) {
            float t[2][16][16] __attribute__((aligned(64)));
            if (!int8) {
                _tile_zero(0);
                _tile_zero(1);
                for (int k = 0; k < n_in; k += 32) {
                    _tile_loadd(4, xp + (long)(k / 2) * Bp + b0, 4 * Bp);
                    _tile_loadd(2, Wb + j * wrow + 2L * k, wrow);
                    _tile_dpbf16ps(0, 2, 4);
                    if (nblk == 2) {
                        _tile_loadd(3, Wb + (j + 16) * wrow + 2L * k, wrow);
                        _tile_dpbf16ps(1, 3, 4);
                    }
                }
                _tile_stored(0, t[0], 64);
                if (nblk == 2) _tile_stored(1, t[1], 64);
            } else {
#ifdef LT_AMX_INT8
                int32_t ti[16][16] __attribute__((aligned(64)));
                for (int c = 0; c < nblk; c++) { /* a block of 16 outputs at a time: its sums stay in registers */
                    vf acc[16];
                    for (int m = 0; m < 16; m++) acc[m] = (vf){0};
                    for (int k = 0; k < n_in; k += 32) {
                        _tile_zero(0);
                        _tile_loadd(4, xp + (long)(k / 4) * Bp + b0, 4 * Bp);
                        _tile_loadd(2, Wb + (j + 16 * c) * wrow + k, wrow);
                        _tile_dpbssd(0, 2, 4);
                        _tile_stored(0, ti, 64);
                        const vf s = vload(sT + (long)(k / 32) * Bp + b0);
                        for (int m = 0; m < 16; m++) {
                            vi sums;
                            memcpy(&sums, ti[m], sizeof sums);
                            acc[m] += __builtin_convertvector(sums, vf) * s;
                        }
                    }
                    for (int m = 0; m < 16; m++) vstore(t[c][m], acc[m]);
                }
                for (int m = 0; m < 16 * nblk; m++) {
                    float *tm = t[m / 16][m % 16];
                    vstore(tm, vload(tm) * scale_i8(W, n_out, n_in, j + m));
                }
#endif
            }
            for (int m = 0; m < 16 * nblk; m++) {
                const float bj = bias ? bias[j + m] : 0.0f;
                for (int l = 0; l < 16 && b0 + l < B; l++) {
                    const long o = (long)(b0 + l) * n_out + j + m;
                    const float v = t[m / 16][m % 16][l] + bj;
                    y[o] = base ? base[o] + v : v;
                }
            }
        }
    }
    if (j16 < j1) gemv_of(kind)(B, n_in, n_out, j16, j1, W, bias, x, y, base);
}
#endif

/* With gelu set, GELU (exact) is applied after the products, VLF outputs at a time (vgelu): libm's
 * scalar erff cost as much as the bfloat16 products at batch 1. */
static void gemv(int bf16, int B, int n_in, int n_out, int j0, int j1, const void *W, const float *bias,
                 const float *x, float *y, const float *base, int gelu) {
    gemv_of(bf16)(B, n_in, n_out, j0, j1, W, bias, x, y, base);
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

#endif

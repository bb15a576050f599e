/* Vectors for the fused steps: float32 vectors of the compile target's width (simd.h), loads and
 * stores that may alias, horizontal sums, exp of non-positive values (vexp_neg), the register-tile
 * sizes, OpenMP's thread queries (one thread where the compiler has no OpenMP) and the prefetch
 * distance. Included by every .c file of the model_step and llama_step libraries. */
#ifndef LT_VEC_H
#define LT_VEC_H
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

/* bytes ahead of each weight stream that the GEMVs (and the bandwidth probe) prefetch */
#ifndef LT_AHEAD
#define LT_AHEAD 256
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

#endif

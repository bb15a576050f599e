/* Causal linear attention kernels for the CPU (float32, float64, and bfloat16 in and out with float32
 * states), loaded by ops/cpu/__init__.py with ctypes.
 * Plain C with GCC/clang vector extensions of the target's width (simd.h), threaded with OpenMP where
 * the compiler has PyTorch's runtime (libgomp) and with pthreads otherwise:
 * no PyTorch headers, so it compiles in about a second on first use. The algorithm is in
 * causal_linear_impl.h. */

#include "causal_linear.h"
#include "simd.h"

#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { MM_FULL = 0, MM_LOWER_A = 1, MM_UPPER_A = 2, MM_LOWER_C = 3 };

/* Register tiles of the matrix products (causal_linear_impl.h's mm), MM_ROWS rows x MM_NV vectors
 * for full products, MM_TRI_ROWS x MM_TRI_NV for triangular outputs: 16 accumulators with 32
 * registers (AVX-512, NEON); 12 with 16 (AVX2: the 6 x 2 tile of the usual AVX2 SGEMM kernels). */
#if LT_NREGS >= 32
#define MM_ROWS 4
#define MM_NV 4
#define MM_TRI_ROWS 8
#define MM_TRI_NV 2
#else
#define MM_ROWS 6
#define MM_NV 2
#define MM_TRI_ROWS 6
#define MM_TRI_NV 2
#endif

typedef int (*range_fn)(const void *args, long begin, long end);

#ifdef _OPENMP
#include <omp.h>

/* Splits [0, n_items) into contiguous ranges, one per thread of an OpenMP team, and runs fn on
 * each. Loaded after PyTorch, the library binds to PyTorch's own libgomp (same soname), so the team
 * is PyTorch's intra-op pool: its threads still spin for a while after PyTorch's last parallel
 * region, and threads of our own would share the cores with them (a kernel right after a matmul
 * ran 1.6x slower on pthreads: `bench threads`, BENCHMARKS.md). Returns nonzero if any range failed. */
static int parallel_over(long n_items, int n_threads, range_fn fn, const void *args) {
    if (n_threads > n_items) n_threads = (int)n_items;
    if (n_threads < 1) n_threads = 1;
    int status = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : status)
    {
        const long t = omp_get_thread_num(), nt = omp_get_num_threads(); /* nt may be fewer (nesting) */
        const long begin = n_items * t / nt, end = n_items * (t + 1) / nt;
        if (begin < end) status |= fn(args, begin, end);
    }
    return status;
}
#else
typedef struct {
    range_fn fn;
    const void *args;
    long begin, end;
    int status;
} worker_t;

static void *run_worker(void *p) {
    worker_t *w = p;
    if (w->begin < w->end) w->status = w->fn(w->args, w->begin, w->end);
    return NULL;
}

/* Without OpenMP: the same on pthreads, one per range (the caller's thread included). */
static int parallel_over(long n_items, int n_threads, range_fn fn, const void *args) {
    if (n_threads > n_items) n_threads = (int)n_items;
    if (n_threads > 256) n_threads = 256;
    if (n_threads < 1) n_threads = 1;
    worker_t w[256];
    pthread_t tid[256];
    int started[256] = {0};
    for (int t = 0; t < n_threads; t++)
        w[t] = (worker_t){fn, args, n_items * t / n_threads, n_items * (t + 1) / n_threads, 0};
    for (int t = 1; t < n_threads; t++) started[t] = pthread_create(&tid[t], NULL, run_worker, &w[t]) == 0;
    run_worker(&w[0]);
    int status = w[0].status;
    for (int t = 1; t < n_threads; t++) {
        if (started[t])
            pthread_join(tid[t], NULL);
        else
            run_worker(&w[t]); /* the thread could not start: do its share here */
        status |= w[t].status;
    }
    return status;
}
#endif

#define T float
#define SUF f32
#define VL LT_VLF
#include "causal_linear_impl.h"
#undef T
#undef SUF
#undef VL

#define T double
#define SUF f64
#define VL LT_VLD
#include "causal_linear_impl.h"
#undef T
#undef SUF
#undef VL

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

/* The chunk products on bfloat16 operands, float32 accumulation (vdpbf16ps: each float32 lane adds
 * the products of a pair of bfloat16s). mm_dpbf16 computes what mm_f32 computes (the same arguments,
 * float32 operands), after rounding both operands to bfloat16, for what the forward asks of it:
 * tri MM_FULL, MM_LOWER_A or MM_LOWER_C (not MM_UPPER_A), A row-major (acs = 1) or transposed (ars = 1):
 *   A -> Ab [M, Kp] (Kp = K rounded up to even), a row's pairs (k, k + 1) in one 32-bit word;
 *   B -> Bp [Kp / 2, Np, 2] (Np = N rounded up to 16): for each pair of rows, the two values of a
 *        column side by side, so a 64-byte load holds 16 columns' pairs;
 * then a register tile of up to BF_ROWS rows x BF_NV vectors of 16 columns, broadcasting a row's
 * pair. Entries a triangular operand leaves out (tri) are written as zeros into Ab, never read
 * from A, so the garbage the callers keep above the diagonal cannot reach the sums. ws holds Ab,
 * Bp and a transposing buffer: dpbf16_ws_floats(Dk, Dv, C) floats. */
enum { BF_ROWS = 4, BF_NV = 4 };

static long bf_pad(long n) { return (n + 16) / 16 * 16; } /* >= n + 1, a multiple of 16 */

static long dpbf16_ws_floats(long Dk, long Dv, long C) {
    long m = Dk > Dv ? Dk : Dv;
    m = (bf_pad(m > C ? m : C) + 31) / 32 * 32; /* (K padded to 32 for the AMX tiles) */
    return 3 * m * m / 2 + 128;                 /* and room to align Ab and Bp to 64 bytes */
}

static inline __mmask16 bf_mask(int n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* dst[p, j] = (X[2p, j], X[2p + 1, j]) as bfloat16 pairs for p < (K + 1) / 2, j < Np (the row
 * stride of dst, Np >= N); zero past K rows or N columns. */
static void bf_pack_pairs(const float *X, long ldx, int K, int N, int Np, uint32_t *dst) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int p = 0; 2 * p < K; p++) {
        const float *r0 = X + 2L * p * ldx, *r1 = r0 + ldx;
        const int has1 = 2 * p + 1 < K;
        for (int j = 0; j < Np; j += 16) {
            const __mmask16 m = bf_mask(N - j);
            const __m512 lo = _mm512_maskz_loadu_ps(m, r0 + j);
            const __m512 hi = has1 ? _mm512_maskz_loadu_ps(m, r1 + j) : _mm512_setzero_ps();
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo); /* lanes 0-15 lo, 16-31 hi */
            _mm512_mask_storeu_epi32(dst + (long)p * Np + j, bf_mask(Np - j),
                                     _mm512_permutexvar_epi16(interleave, both));
        }
    }
}

/* Ab [M, Kp] from op(A)(i, k) = A[i * ars + k * acs], zero-padded to Kp: row-major rows (acs = 1)
 * converted 16 at a time; a transposed operand (ars = 1) packed as pairs of its rows, then
 * transposed 32 bits at a time. */
static void bf_pack_a(int M, int K, int Kp, const float *A, long ars, long acs, uint16_t *Ab, uint32_t *tmp) {
    if (acs == 1) {
        for (int i = 0; i < M; i++) {
            const float *row = A + (long)i * ars;
            uint16_t *out = Ab + (long)i * Kp;
            for (int k = 0; k < Kp; k += 16) {
                const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(bf_mask(K - k), row + k));
                _mm256_mask_storeu_epi16(out + k, bf_mask(Kp - k), h);
            }
        }
    } else { /* ars == 1 */
        bf_pack_pairs(A, acs, K, M, M, tmp); /* [Kp / 2, M] pairs, the ones past K zero: */
        memset(tmp + (long)(K + 1) / 2 * M, 0, sizeof(uint32_t) * (Kp / 2 - (K + 1) / 2) * M);
        transpose_f32(Kp / 2, M, (const float *)tmp, (float *)Ab); /* 32-bit words moved, not computed on */
    }
}

/* C[i0 + r, j + 16u] (+)= sum over pairs p0 <= p < p1 of Ab's row pair . Bp's column pair, for
 * r < R, u < NV; the last vector's columns masked by last (C's columns past N are not touched). */
static inline __attribute__((always_inline)) void bf_tile(int R, int NV, int p0, int p1, const uint32_t *Ab, int Kp2,
                                                          const uint32_t *Bp, int Np, float *C, long ldc, int acc,
                                                          __mmask16 last) {
    __m512 c[BF_ROWS][BF_NV];
    LT_UNROLL for (int r = 0; r < R; r++) LT_UNROLL for (int u = 0; u < NV; u++) {
            const __mmask16 m = u == NV - 1 ? last : 0xffff;
            c[r][u] = acc ? _mm512_maskz_loadu_ps(m, C + r * ldc + 16 * u) : _mm512_setzero_ps();
        }
    for (int p = p0; p < p1; p++) {
        __m512i b[BF_NV];
        LT_UNROLL for (int u = 0; u < NV; u++) b[u] = _mm512_loadu_si512(Bp + (long)p * Np + 16 * u);
        LT_UNROLL for (int r = 0; r < R; r++) {
            const __m512i a = _mm512_set1_epi32((int)Ab[(long)r * Kp2 + p]);
            LT_UNROLL for (int u = 0; u < NV; u++) c[r][u] = _mm512_dpbf16_ps(c[r][u], (__m512bh)a, (__m512bh)b[u]);
        }
    }
    LT_UNROLL for (int r = 0; r < R; r++) LT_UNROLL for (int u = 0; u < NV; u++) {
            const __mmask16 m = u == NV - 1 ? last : 0xffff;
            _mm512_mask_storeu_ps(C + r * ldc + 16 * u, m, c[r][u]);
        }
}

#define BF_TILE(R_, NV_) bf_tile(R_, NV_, p0, p1, Ai, Kp / 2, Bp + j, Np, Ci + j, ldc, acc, last)
#define BF_TILE_R(NV_)                  \
    switch (R) {                        \
        case 4: BF_TILE(4, NV_); break; \
        case 3: BF_TILE(3, NV_); break; \
        case 2: BF_TILE(2, NV_); break; \
        default: BF_TILE(1, NV_); break; \
    }

#ifdef LT_AMX
#define MM_AMX 1

/* AMX-BF16 tiles for the forward's products where the CPU has them: a thread runs its range of
 * sequences (forward_range) between amx_begin and amx_end, which configure and release its tiles
 * (simd.h's amx_enable and amx_configure; tiles 0-1 two blocks of C, 2 16 rows of Ab, 3-4 Bp's pairs). */
static __thread int amx_on; /* this thread's tiles are configured */

static void amx_begin(void) {
    if (!amx_enable()) return;
    amx_configure(0);
    amx_on = 1;
}

static void amx_end(void) {
    if (amx_on) _tile_release();
    amx_on = 0;
}

/* Rows [i, i + 16) of C (+)= Ab Bp on tiles: 16 x 32 blocks of C (16 x 16 for the last), over pairs
 * [0, k_end / 2) (k_end a multiple of 32), for the columns [0, n_end) that whole blocks cover; returns
 * where they end (the caller does the rest, fewer than 16 columns, with vector tiles). */
static int amx_rows16(int i, int n_end, int k_end, const uint16_t *Ab, int Kp, const uint32_t *Bp, int Np, float *C,
                      long ldc, int acc) {
    int j = 0;
    while (j + 16 <= n_end) {
        const int two = j + 32 <= n_end;
        float *c0 = C + (long)i * ldc + j;
        if (acc) {
            _tile_loadd(0, c0, 4 * ldc);
            if (two) _tile_loadd(1, c0 + 16, 4 * ldc);
        } else {
            _tile_zero(0);
            _tile_zero(1);
        }
        for (int k = 0; k < k_end; k += 32) {
            _tile_loadd(2, Ab + (long)i * Kp + k, 2 * Kp);
            _tile_loadd(3, Bp + (long)(k / 2) * Np + j, 4 * Np);
            _tile_dpbf16ps(0, 2, 3);
            if (two) {
                _tile_loadd(4, Bp + (long)(k / 2) * Np + j + 16, 4 * Np);
                _tile_dpbf16ps(1, 2, 4);
            }
        }
        _tile_stored(0, c0, 4 * ldc);
        if (two) _tile_stored(1, c0 + 16, 4 * ldc);
        j += two ? 32 : 16;
    }
    return j;
}
#endif

/* mm_f32's product on bfloat16 operands (see above); on AMX tiles, 16 rows at a time, where the
 * thread has them (amx_begin), with K padded to 32 (zeros) in Ab and Bp. */
static void mm_dpbf16(int M, int N, int K, const float *A, long ars, long acs, const float *B, long ldb, float *C,
                    long ldc, int acc, int tri, uint16_t *ws) {
    if (K <= 0) { /* an empty sum: C = acc ? C : 0 */
        if (!acc)
            for (int i = 0; i < M; i++) memset(C + (long)i * ldc, 0, sizeof(float) * N);
        return;
    }
#ifdef MM_AMX
    const int amx = amx_on;
#else
    const int amx = 0;
#endif
    const int Kp = amx ? (K + 31) / 32 * 32 : (K + 1) / 2 * 2, Np = (int)bf_pad(N - 1);
    uint16_t *Ab = (uint16_t *)(((uintptr_t)ws + 63) & ~(uintptr_t)63);
    uint32_t *Bp = (uint32_t *)(((uintptr_t)(Ab + (long)M * Kp) + 63) & ~(uintptr_t)63);
    uint32_t *tmp = Bp + (long)(Kp / 2) * Np;
    bf_pack_a(M, K, Kp, A, ars, acs, Ab, tmp);
    bf_pack_pairs(B, ldb, K, N, Np, Bp);
    memset(Bp + (long)(K + 1) / 2 * Np, 0, sizeof(uint32_t) * (Kp / 2 - (K + 1) / 2) * Np); /* (pairs past K) */
    int i0 = 0;
#ifdef MM_AMX
    if (amx) {
        if (tri == MM_LOWER_A) /* zeros where the triangular operand is zero */
            for (int r = 0; r < M; r++)
                for (int k = r + 1; k < Kp; k++) Ab[(long)r * Kp + k] = 0;
        for (; i0 + 16 <= M; i0 += 16) {
            int n_end = N, k_end = Kp;
            if (tri == MM_LOWER_C) n_end = i0 + 16 < N ? i0 + 16 : N;
            if (tri == MM_LOWER_A && (i0 + 16 + 31) / 32 * 32 < Kp) k_end = (i0 + 16 + 31) / 32 * 32;
            const int j = amx_rows16(i0, n_end, k_end, Ab, Kp, Bp, Np, C, ldc, acc);
            if (j < n_end) /* the columns left (< 16), on vector tiles */
                for (int i = i0; i < i0 + 16; i += BF_ROWS) {
                    const int p0 = 0, p1 = k_end / 2;
                    const uint32_t *Ai = (const uint32_t *)(Ab + (long)i * Kp);
                    float *Ci = C + (long)i * ldc;
                    const __mmask16 last = bf_mask(n_end - j);
                    BF_TILE(BF_ROWS, 1);
                }
        }
    }
#endif
    for (int i = i0; i < M; i += BF_ROWS) {
        const int R = M - i < BF_ROWS ? M - i : BF_ROWS;
        const int p0 = 0;
        int p1 = Kp / 2, n_end = N;
        if (tri == MM_LOWER_A && i + R < K) p1 = (i + R + 1) / 2;
        if (tri == MM_LOWER_A) /* zeros where the triangular operand is zero, in the pairs this tile reads */
            for (int r = i; r < i + R; r++)
                for (int k = r + 1; k < 2 * p1; k++) Ab[(long)r * Kp + k] = 0;
        if (tri == MM_LOWER_C) {
            n_end = (i + R + 15) / 16 * 16;
            if (n_end > N) n_end = N;
        }
        const uint32_t *Ai = (const uint32_t *)(Ab + (long)i * Kp);
        float *Ci = C + (long)i * ldc;
        const __mmask16 full = 0xffff;
        __mmask16 last = full;
        int j = 0;
        for (; j + 64 <= n_end; j += 64) BF_TILE_R(4)
        for (; j + 32 <= n_end; j += 32) BF_TILE_R(2)
        for (; j + 16 <= n_end; j += 16) BF_TILE_R(1)
        if (j < n_end) {
            last = bf_mask(n_end - j);
            BF_TILE_R(1)
        }
    }
}
#undef BF_TILE
#undef BF_TILE_R
#define MM_BF16 1
#endif

/* bfloat16 in and out (q, k, v, out, dout and their gradients), float32 states and sums; the
 * products in bfloat16 where the target has AVX512-BF16 (MM_BF16), else in float32. */
#define T float
#define SUF bf16
#define VL LT_VLF
#define IO_BF16 1
#include "causal_linear_impl.h"
#undef T
#undef SUF
#undef VL
#undef IO_BF16
#undef MM_BF16

/* Causal linear attention kernels for the CPU (float32 and float64), loaded by ops/cpu/__init__.py with ctypes.
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

/* Causal linear attention on the CPU, one scalar type. Included by causal_linear.c with
 *   T    the scalar type of the computation, states and normalisers (float or double)
 *   SUF  the suffix of the exported names (f32, f64, bf16)
 *   VL   lanes of T in a vector of the compile target (LT_VBYTES / sizeof(T), simd.h)
 * and optionally
 *   IO_BF16  q, k, v, out, dout, dq, dk, dv are bfloat16 (uint16_t bits; T is float): rows are
 *            widened as they are gathered into the chunk buffers and rounded (to nearest even) as
 *            they are stored, so no float32 copy of a tensor is ever made;
 *   MM_BF16  the forward's chunk products run on bfloat16 operands with float32 accumulation
 *            (mm_dpbf16 in causal_linear.c, AVX512-BF16); states, normalisers, sums and the
 *            backward's products stay float32. The backward recomputes the output in float32
 *            from the saved states instead of reading the rounded one (`out` is not read).
 *
 * Each (batch, head) sequence is walked chunk by chunk (C tokens). A chunk's queries, keys and
 * values are copied into small contiguous buffers that stay in L1/L2, and every product is a
 * small matrix product computed by `mm` below: a register tile of MM_ROWS rows x up to MM_NV vectors
 * (sized in causal_linear.c for the target's registers), GCC/clang vector extensions of the
 * target's width. Products with a masked (triangular) operand skip the zero half.
 *
 * Forward, chunk n (state S, z entering it; A = tril(Q K^T)):
 *   out = (A V + Q S) / (rowsum(A) + Q z + eps),   S += K^T V,   z += K^T 1
 * Backward, chunks in reverse, (G, g) = gradient of the state leaving the chunk:
 *   dnum = dout / den,  dden = -(dnum . out),  dA = tril(dnum V^T)
 *   dQ = dA K + dnum S^T + dden (z + cumsum K)^T,   dK = dA^T Q + V G^T + 1 g^T + revcumsum(dden Q),
 *   dV = A^T dnum + K G,   G += Q^T dnum,   g += Q^T dden
 * (the dden terms are tril(dden 1^T) K and its transpose's product, summed as running sums)
 * The forward keeps S and z entering every chunk and the normaliser of every position for the
 * backward: one state per chunk, never one per position (the paper's Algorithm 1, chunkwise).
 */

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUF)

/* Vectors at any T-aligned address. Loads and stores go through a may_alias pointer, not memcpy:
 * GCC copies a 32-byte memcpy in 16-byte pieces through the stack under generic tuning (4x slower). */
typedef T FN(vec) __attribute__((vector_size(LT_VBYTES), aligned(sizeof(T))));
typedef T FN(vmem) __attribute__((vector_size(LT_VBYTES), aligned(sizeof(T)), may_alias));
#define V FN(vec)

#ifdef IO_BF16
#define TI uint16_t
#else
#define TI T
#endif

static inline V FN(vload)(const T *p) { return *(const FN(vmem) *)p; }

static inline void FN(vstore)(T *p, V v) { *(FN(vmem) *)p = v; }

/* Sum of the lanes, as a tree: log2(VL) dependent additions rather than VL. */
static inline T FN(hsum)(V v) {
    T t[VL];
    memcpy(t, &v, sizeof v);
    for (int w = VL / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) t[l] += t[l + w];
    return t[0];
}

/* sum_d x[d] y[d] (y = NULL: sum_d x[d]) with VL independent partial sums. */
static inline T FN(dot)(int n, const T *x, const T *y) {
    V acc = {0};
    int d = 0;
    for (; d + VL <= n; d += VL) acc += y ? FN(vload)(x + d) * FN(vload)(y + d) : FN(vload)(x + d);
    T s = FN(hsum)(acc);
    for (; d < n; d++) s += y ? x[d] * y[d] : x[d];
    return s;
}

/* dst[0:n] = scale * src[0:n], inline (rows are short: a library call per row costs more than the copy). */
static inline void FN(copy)(T *dst, const T *src, int n, T scale) {
    int d = 0;
    for (; d + VL <= n; d += VL) FN(vstore)(dst + d, scale * FN(vload)(src + d));
    for (; d < n; d++) dst[d] = scale * src[d];
}

/* C[0:R, 0:NV*VL] (+)= sum_{k0 <= k < k1} A(r, k) B[k, 0:NV*VL], with A(r, k) = A[r*ars + k*acs].
 * R <= 8 and NV <= 4 are compile-time constants at every call (R * NV <= MM_ACC), so the loops
 * unroll into registers: up to MM_ACC independent accumulators, enough to keep both FMA units busy
 * with the NV vectors of B and one broadcast of A still in registers. */
static inline __attribute__((always_inline)) void FN(tile)(int R, int NV, int k0, int k1, const T *A, long ars,
                                                           long acs, const T *B, long ldb, T *C, long ldc, int acc) {
    V c[8][4];
    /* unrolled by hand for GCC, whose cost model otherwise keeps c[][] on the stack for 32-byte vectors */
    LT_UNROLL for (int r = 0; r < R; r++)
        LT_UNROLL for (int u = 0; u < NV; u++) c[r][u] = acc ? FN(vload)(C + r * ldc + u * VL) : (V){0};
    for (int k = k0; k < k1; k++) {
        V b[4];
        LT_UNROLL for (int u = 0; u < NV; u++) b[u] = FN(vload)(B + k * ldb + u * VL);
        LT_UNROLL for (int r = 0; r < R; r++) {
            T a = A[r * ars + k * acs];
            LT_UNROLL for (int u = 0; u < NV; u++) c[r][u] += a * b[u];
        }
    }
    LT_UNROLL for (int r = 0; r < R; r++)
        LT_UNROLL for (int u = 0; u < NV; u++) FN(vstore)(C + r * ldc + u * VL, c[r][u]);
}

/* The same for n < VL leftover columns, scalar. */
static void FN(tile_tail)(int R, int n, int k0, int k1, const T *A, long ars, long acs, const T *B, long ldb, T *C,
                          long ldc, int acc) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < n; j++) {
            T s = acc ? C[r * ldc + j] : 0;
            for (int k = k0; k < k1; k++) s += A[r * ars + k * acs] * B[k * ldb + j];
            C[r * ldc + j] = s;
        }
}

#define TILE(R_, NV) FN(tile)(R_, NV, k0, k1, Ai, ars, acs, B + j, ldb, Ci + j, ldc, acc)
/* A tile of R (1..8, a runtime value) rows by NV vectors, with R a constant inside each case. */
#define TILE_R(NV)                  \
    switch (R) {                    \
        case 8: TILE(8, NV); break; \
        case 7: TILE(7, NV); break; \
        case 6: TILE(6, NV); break; \
        case 5: TILE(5, NV); break; \
        case 4: TILE(4, NV); break; \
        case 3: TILE(3, NV); break; \
        case 2: TILE(2, NV); break; \
        default: TILE(1, NV); break; \
    }

/* C[M, N] = (acc ? C : 0) + op(A)[M, K] B[K, N]; op(A)(i, k) = A[i*ars + k*acs] (a transposed
 * operand is just ars = 1), B and C row-major with leading dimensions ldb, ldc.
 * tri = MM_FULL (enum in causal_linear.c), or uses the structure of a causal mask:
 *   MM_LOWER_A  op(A)(i, k) = 0 for k > i: the sum stops at the tile's last row;
 *   MM_UPPER_A  op(A)(i, k) = 0 for k < i: the sum starts at the tile's first row;
 *   MM_LOWER_C  only C(i, j) with j <= i is wanted: columns past the tile's last row (rounded up
 *               to a vector) are not computed and hold garbage the caller masks. */
static void FN(mm)(int M, int N, int K, const T *A, long ars, long acs, const T *B, long ldb, T *C, long ldc, int acc,
                   int tri) {
    /* A triangular output is narrow near the top: taller tiles (MM_TRI_ROWS) keep more accumulators there. */
    const int rows = tri == MM_LOWER_C ? MM_TRI_ROWS : MM_ROWS, nv = tri == MM_LOWER_C ? MM_TRI_NV : MM_NV;
    for (int i = 0; i < M; i += rows) {
        int R = M - i < rows ? M - i : rows;
        int k0 = 0, k1 = K, n_end = N;
        if (tri == MM_LOWER_A && i + R < K) k1 = i + R;
        if (tri == MM_UPPER_A) k0 = i < K ? i : K;
        if (tri == MM_LOWER_C) {
            n_end = ((i + R + VL - 1) / VL) * VL;
            if (n_end > N) n_end = N;
        }
        const T *Ai = A + (long)i * ars;
        T *Ci = C + (long)i * ldc;
        int j = 0;
        if (nv >= 4)
            for (; j + 4 * VL <= n_end; j += 4 * VL) TILE_R(4)
        if (nv >= 2)
            for (; j + 2 * VL <= n_end; j += 2 * VL) TILE_R(2)
        for (; j + VL <= n_end; j += VL) TILE_R(1)
        if (j < n_end) FN(tile_tail)(R, n_end - j, k0, k1, Ai, ars, acs, B + j, ldb, Ci + j, ldc, acc);
    }
}

/* dst[c, r] = src[r, c] for an R x Cn row-major src. VL x VL blocks are transposed in registers:
 * round w (= 1, 2, 4, ...) swaps the off-diagonal w x w sub-blocks of vector pairs (i, i + w) with
 * constant two-vector shuffles (index lists in simd.h); after log2(VL) rounds vector i holds column
 * i. Edges, and compilers without __builtin_shufflevector, go one value at a time. */
#define TR_ROUND(W)                                                   \
    for (int base = 0; base < VL; base += 2 * (W))                    \
        for (int i = base; i < base + (W); i++) {                     \
            const V a = x[i], b = x[i + (W)];                         \
            x[i] = __builtin_shufflevector(a, b, TR_LIST(LO, VL, W)); \
            x[i + (W)] = __builtin_shufflevector(a, b, TR_LIST(HI, VL, W)); \
        }
#define TR_LIST(P, N, W) TR_LIST2(P, N, W)
#define TR_LIST2(P, N, W) LT_TR_##P##_##N##_##W
static void FN(transpose)(int R, int Cn, const T *src, T *dst) {
#if defined(LT_HAS_SHUFFLEVECTOR) && VL >= 2
    const int R_full = R - R % VL, C_full = Cn - Cn % VL;
    for (int r0 = 0; r0 < R_full; r0 += VL)
        for (int c0 = 0; c0 < C_full; c0 += VL) {
            V x[VL];
            for (int i = 0; i < VL; i++) x[i] = FN(vload)(src + (long)(r0 + i) * Cn + c0);
            TR_ROUND(1)
#if VL >= 4
            TR_ROUND(2)
#endif
#if VL >= 8
            TR_ROUND(4)
#endif
#if VL >= 16
            TR_ROUND(8)
#endif
            for (int i = 0; i < VL; i++) FN(vstore)(dst + (long)(c0 + i) * R + r0, x[i]);
        }
#else
    const int R_full = 0, C_full = 0;
#endif
    for (int r = 0; r < R; r++)
        for (int c = (r < R_full ? C_full : 0); c < Cn; c++) dst[(long)c * R + r] = src[(long)r * Cn + c];
}
#undef TR_ROUND
#undef TR_LIST
#undef TR_LIST2

#ifdef IO_BF16
typedef uint32_t FN(u32mem) __attribute__((may_alias));
/* bfloat16 bits -> float: the 16 bits are the float's upper half (a loop GCC and clang vectorise). */
static inline void FN(widen)(T *dst, const uint16_t *src, int n) {
    FN(u32mem) *d = (FN(u32mem) *)dst;
    for (int i = 0; i < n; i++) d[i] = (uint32_t)src[i] << 16;
}
/* scale * float -> bfloat16 bits, rounded to nearest even (NaN stays NaN). */
static inline void FN(narrow)(uint16_t *dst, const T *src, int n, T scale) {
    for (int i = 0; i < n; i++) {
        T f = scale * src[i];
        uint32_t u;
        memcpy(&u, &f, 4);
        dst[i] = (u & 0x7fffffff) > 0x7f800000 ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
    }
}
#endif

/* Rows [t0, t0 + len) of head h of sequence b from x [B, T, H, D] into buf [C, D], zero-filling to C rows. */
static void FN(load_rows)(const TI *x, long b, long t0, int len, int C, long Tn, long H, long h, int D, T *buf) {
    for (int i = 0; i < len; i++) {
#ifdef IO_BF16
        FN(widen)(buf + (long)i * D, x + ((b * Tn + t0 + i) * H + h) * D, D);
#else
        FN(copy)(buf + (long)i * D, x + ((b * Tn + t0 + i) * H + h) * D, D, 1);
#endif
    }
    if (len < C) memset(buf + (long)len * D, 0, sizeof(T) * (C - len) * D);
}

/* Rows of buf into rows [t0, t0 + len) of head h of x [B, T, H, D], row i multiplied by scale[i] (NULL: 1). */
static void FN(store_rows)(TI *x, long b, long t0, int len, long Tn, long H, long h, int D, const T *buf,
                           const T *scale) {
    for (int i = 0; i < len; i++) {
#ifdef IO_BF16
        FN(narrow)(x + ((b * Tn + t0 + i) * H + h) * D, buf + (long)i * D, D, scale ? scale[i] : 1);
#else
        FN(copy)(x + ((b * Tn + t0 + i) * H + h) * D, buf + (long)i * D, D, scale ? scale[i] : 1);
#endif
    }
}

/* Scratch memory aligned to the 64-byte vectors (a vector load across two cache lines costs double). */
static T *FN(alloc)(long n) {
    void *p = NULL;
    return posix_memalign(&p, 64, sizeof(T) * (size_t)n) ? NULL : p;
}

/* Zero A[i, j] for i < j < i + MM_ROWS: the only entries above the diagonal that a triangular
 * product reads (MM_LOWER_A sums k < i + MM_ROWS, MM_UPPER_A starts at the first row of an
 * MM_ROWS-row tile); the rest of the upper triangle is never read, so it is left as it is. */
static void FN(mask_band)(int C, T *A) {
    for (int i = 0; i < C; i++)
        for (int j = i + 1; j < i + MM_ROWS && j < C; j++) A[(long)i * C + j] = 0;
}

/* The forward's chunk products: bfloat16 operands (MM_BF16, into the scratch ws) or this type's
 * own. The backward's products stay float32: in bfloat16 they made the gradients 2.6-3.2x less
 * accurate (against 1.0x) for 12% of the backward's time (AMD EPYC, 2026-12-07; CHANGELOG). */
#ifdef MM_BF16
#define MM(...) mm_dpbf16(__VA_ARGS__, ws)
#define WS_FLOATS(Dk, Dv, C) dpbf16_ws_floats(Dk, Dv, C)
#else
#define MM(...) FN(mm)(__VA_ARGS__)
#define WS_FLOATS(Dk, Dv, C) 0
#endif
/* a thread's forward range runs on AMX tiles where the build and Linux give them (mm_dpbf16) */
#if defined(MM_BF16) && defined(MM_AMX)
#define MM_BEGIN() amx_begin()
#define MM_END() amx_end()
#else
#define MM_BEGIN() (void)0
#define MM_END() (void)0
#endif

typedef struct {
    const TI *q, *k, *v;
    const T *S0, *z0;
    TI *out;
    T *S_final, *z_final, *S_save, *z_save, *den_save;
    long B, Tn, H;
    int Dk, Dv, C;
    T eps;
} FN(fwd_args);

/* Chunk n of sequence bh = b * H + h, given the state (S, z) entering it; leaves the state after it. */
static void FN(forward_chunk)(const FN(fwd_args) * a, long bh, long n, T *S, T *z, T *work) {
    const long b = bh / a->H, h = bh % a->H, Tn = a->Tn, H = a->H, N = (Tn + a->C - 1) / a->C;
    const int Dk = a->Dk, Dv = a->Dv, C = a->C;
    const long t0 = n * C;
    const int len = (int)(Tn - t0 < C ? Tn - t0 : C);
    T *Q = work, *K = Q + (long)C * Dk, *Vv = K + (long)C * Dk, *num = Vv + (long)C * Dv, *A = num + (long)C * Dv;
    T *Kt = A + (long)C * C, *den = Kt + (long)Dk * C;
    uint16_t *ws = (uint16_t *)(den + C); /* the bfloat16 products' scratch (mm_dpbf16 aligns it) */
    (void)ws;
    FN(load_rows)(a->q, b, t0, len, C, Tn, H, h, Dk, Q);
    FN(load_rows)(a->k, b, t0, len, C, Tn, H, h, Dk, K);
    FN(load_rows)(a->v, b, t0, len, C, Tn, H, h, Dv, Vv);
    if (a->S_save) {
        memcpy(a->S_save + (bh * N + n) * Dk * Dv, S, sizeof(T) * Dk * Dv);
        memcpy(a->z_save + (bh * N + n) * Dk, z, sizeof(T) * Dk);
    }
    FN(transpose)(C, Dk, K, Kt);
    MM(C, C, Dk, Q, Dk, 1, Kt, C, A, C, 0, MM_LOWER_C);
    FN(mask_band)(C, A);
    for (int i = 0; i < C; i++) den[i] = a->eps + FN(dot)(i + 1, A + (long)i * C, NULL) + FN(dot)(Dk, Q + (long)i * Dk, z);
    MM(C, Dv, Dk, Q, Dk, 1, S, Dv, num, Dv, 0, MM_FULL);
    MM(C, Dv, C, A, C, 1, Vv, Dv, num, Dv, 1, MM_LOWER_A);
    if (a->den_save) memcpy(a->den_save + bh * Tn + t0, den, sizeof(T) * len);
    for (int i = 0; i < len; i++) den[i] = 1 / den[i];
    FN(store_rows)(a->out, b, t0, len, Tn, H, h, Dv, num, den); /* out = num / den */
    MM(Dk, Dv, len, K, 1, Dk, Vv, Dv, S, Dv, 1, MM_FULL); /* S += K^T V */
    for (int i = 0; i < len; i++)
        for (int d = 0; d < Dk; d++) z[d] += K[(long)i * Dk + d];
}

/* Sequences [bh0, bh1), chunk by chunk with the sequences inner: consecutive heads of a row are
 * adjacent in [B, T, H, D], so each chunk reads and writes contiguous runs that the hardware
 * prefetchers follow, rather than D-wide rows H * D apart. */
static int FN(forward_range)(const void *args, long bh0, long bh1) {
    const FN(fwd_args) *a = args;
    const int Dk = a->Dk, Dv = a->Dv, C = a->C;
    const long N = (a->Tn + C - 1) / C, n_seq = bh1 - bh0, state = (long)Dk * Dv + Dk;
    T *mem = FN(alloc)(n_seq * state + (long)C * (2 * Dk + 2 * Dv + C) + (long)Dk * C + C + WS_FLOATS(Dk, Dv, C));
    if (!mem) return 1;
    T *work = mem + n_seq * state;
    for (long s = 0; s < n_seq; s++) {
        memcpy(mem + s * state, a->S0 + (bh0 + s) * Dk * Dv, sizeof(T) * Dk * Dv);
        memcpy(mem + s * state + (long)Dk * Dv, a->z0 + (bh0 + s) * Dk, sizeof(T) * Dk);
    }
    MM_BEGIN();
    for (long n = 0; n < N; n++)
        for (long s = 0; s < n_seq; s++)
            FN(forward_chunk)(a, bh0 + s, n, mem + s * state, mem + s * state + (long)Dk * Dv, work);
    MM_END();
    for (long s = 0; s < n_seq; s++) {
        memcpy(a->S_final + (bh0 + s) * Dk * Dv, mem + s * state, sizeof(T) * Dk * Dv);
        memcpy(a->z_final + (bh0 + s) * Dk, mem + s * state + (long)Dk * Dv, sizeof(T) * Dk);
    }
    free(mem);
    return 0;
}

typedef struct {
    const TI *q, *k, *v, *out, *dout;
    const T *S_save, *z_save, *den_save, *dS_final, *dz_final;
    TI *dq, *dk, *dv;
    T *dS0, *dz0;
    long B, Tn, H;
    int Dk, Dv, C;
} FN(bwd_args);

/* Chunk n of sequence bh backwards, given (G, g), the gradient of the state leaving the chunk;
 * leaves the gradient of the state entering it. */
static void FN(backward_chunk)(const FN(bwd_args) * a, long bh, long n, T *G, T *g, T *work) {
    const long b = bh / a->H, h = bh % a->H, Tn = a->Tn, H = a->H, N = (Tn + a->C - 1) / a->C;
    const int Dk = a->Dk, Dv = a->Dv, C = a->C;
    const long t0 = n * C;
    const int len = (int)(Tn - t0 < C ? Tn - t0 : C);
    T *Q = work, *K = Q + (long)C * Dk, *dQ = K + (long)C * Dk, *dK = dQ + (long)C * Dk;
    T *Vv = dK + (long)C * Dk, *dnum = Vv + (long)C * Dv, *O = dnum + (long)C * Dv, *dV = O + (long)C * Dv;
    T *A = dV + (long)C * Dv, *dA = A + (long)C * C, *Kt = dA + (long)C * C, *Vt = Kt + (long)Dk * C;
    T *Gt = Vt + (long)Dv * C, *St = Gt + (long)Dk * Dv, *dden = St + (long)Dk * Dv, *run = dden + C;
    const T *zn = a->z_save + (bh * N + n) * Dk;
    FN(load_rows)(a->q, b, t0, len, C, Tn, H, h, Dk, Q);
    FN(load_rows)(a->k, b, t0, len, C, Tn, H, h, Dk, K);
    FN(load_rows)(a->v, b, t0, len, C, Tn, H, h, Dv, Vv);
    FN(load_rows)(a->dout, b, t0, len, C, Tn, H, h, Dv, dnum);
    FN(transpose)(C, Dk, K, Kt);
    FN(transpose)(C, Dv, Vv, Vt);
    FN(transpose)(Dk, Dv, G, Gt);
    FN(transpose)(Dk, Dv, a->S_save + (bh * N + n) * Dk * Dv, St);
    FN(mm)(C, C, Dk, Q, Dk, 1, Kt, C, A, C, 0, MM_LOWER_C);
    FN(mask_band)(C, A);
#ifdef IO_BF16
    /* the output in float32, recomputed (out = (Q S + A V) / den): the bfloat16 output the forward
     * stored would put its rounding into dden, where it cancels (the gradient of a normalised sum) */
    FN(mm)(C, Dv, Dk, Q, Dk, 1, a->S_save + (bh * N + n) * Dk * Dv, Dv, O, Dv, 0, MM_FULL);
    FN(mm)(C, Dv, C, A, C, 1, Vv, Dv, O, Dv, 1, MM_LOWER_A);
#else
    FN(load_rows)(a->out, b, t0, len, C, Tn, H, h, Dv, O);
#endif
    for (int i = 0; i < C; i++) { /* dnum = dout / den, dden = -(dnum . out) */
        T inv = i < len ? 1 / a->den_save[bh * Tn + t0 + i] : 0;
        for (int d = 0; d < Dv; d++) dnum[(long)i * Dv + d] *= inv;
#ifdef IO_BF16
        for (int d = 0; d < Dv; d++) O[(long)i * Dv + d] *= inv;
#endif
        dden[i] = -FN(dot)(Dv, dnum + (long)i * Dv, O + (long)i * Dv);
    }
    FN(mm)(C, C, Dv, dnum, Dv, 1, Vt, C, dA, C, 0, MM_LOWER_C); /* dA without its dden part: tril(dnum V^T) */
    FN(mask_band)(C, dA);
    /* dQ = dA K + dnum S^T + dden (z + K's running sum)^T: the dden part of the product summed
     * exactly, outside the product (in bfloat16 products it would cancel against the rest) */
    FN(mm)(C, Dk, C, dA, C, 1, K, Dk, dQ, Dk, 0, MM_LOWER_A);
    FN(mm)(C, Dk, Dv, dnum, Dv, 1, St, Dk, dQ, Dk, 1, MM_FULL);
    memcpy(run, zn, sizeof(T) * Dk);
    for (int i = 0; i < len; i++)
        for (int d = 0; d < Dk; d++) {
            run[d] += K[(long)i * Dk + d];
            dQ[(long)i * Dk + d] += dden[i] * run[d];
        }
    /* dK = dA^T Q + V G^T + 1 (g + sum_{i >= j} dden_i Q_i)^T */
    FN(mm)(C, Dk, C, dA, 1, C, Q, Dk, dK, Dk, 0, MM_UPPER_A);
    FN(mm)(C, Dk, Dv, Vv, Dv, 1, Gt, Dk, dK, Dk, 1, MM_FULL);
    memcpy(run, g, sizeof(T) * Dk);
    for (int i = len - 1; i >= 0; i--)
        for (int d = 0; d < Dk; d++) {
            run[d] += dden[i] * Q[(long)i * Dk + d];
            dK[(long)i * Dk + d] += run[d];
        }
    /* dV = A^T dnum + K G */
    FN(mm)(C, Dv, C, A, 1, C, dnum, Dv, dV, Dv, 0, MM_UPPER_A);
    FN(mm)(C, Dv, Dk, K, Dk, 1, G, Dv, dV, Dv, 1, MM_FULL);
    /* the gradient of the state entering the chunk: G += Q^T dnum, g += Q^T dden (the sum above) */
    FN(mm)(Dk, Dv, len, Q, 1, Dk, dnum, Dv, G, Dv, 1, MM_FULL);
    memcpy(g, run, sizeof(T) * Dk);
    FN(store_rows)(a->dq, b, t0, len, Tn, H, h, Dk, dQ, NULL);
    FN(store_rows)(a->dk, b, t0, len, Tn, H, h, Dk, dK, NULL);
    FN(store_rows)(a->dv, b, t0, len, Tn, H, h, Dv, dV, NULL);
}

static int FN(backward_range)(const void *args, long bh0, long bh1) {
    const FN(bwd_args) *a = args;
    const int Dk = a->Dk, Dv = a->Dv, C = a->C;
    const long N = (a->Tn + C - 1) / C, n_seq = bh1 - bh0, state = (long)Dk * Dv + Dk;
    const long work = (long)C * Dk * 4 + (long)C * Dv * 4 + (long)C * C * 2 + (long)Dk * C + (long)Dv * C +
                      (long)Dk * Dv * 2 + C + Dk;
    T *mem = FN(alloc)(n_seq * state + work);
    if (!mem) return 1;
    for (long s = 0; s < n_seq; s++) {
        memcpy(mem + s * state, a->dS_final + (bh0 + s) * Dk * Dv, sizeof(T) * Dk * Dv);
        memcpy(mem + s * state + (long)Dk * Dv, a->dz_final + (bh0 + s) * Dk, sizeof(T) * Dk);
    }
    for (long n = N - 1; n >= 0; n--)
        for (long s = 0; s < n_seq; s++)
            FN(backward_chunk)(a, bh0 + s, n, mem + s * state, mem + s * state + (long)Dk * Dv, mem + n_seq * state);
    for (long s = 0; s < n_seq; s++) {
        memcpy(a->dS0 + (bh0 + s) * Dk * Dv, mem + s * state, sizeof(T) * Dk * Dv);
        memcpy(a->dz0 + (bh0 + s) * Dk, mem + s * state + (long)Dk * Dv, sizeof(T) * Dk);
    }
    free(mem);
    return 0;
}

/* 2 when a size is out of range (nothing is touched), else 0, or 1 when out of memory. */
static int FN(bad_sizes)(long B, long Tn, long H, long Dk, long Dv, long C) {
    return B < 1 || Tn < 1 || H < 1 || Dk < 1 || Dv < 1 || C < 1 || Dk > INT_MAX / 4 || Dv > INT_MAX / 4 ||
           C > INT_MAX / 4 || B > LONG_MAX / H || Tn > LONG_MAX / (B * H * (Dk + Dv));
}

int FN(cla_forward)(const TI *q, const TI *k, const TI *v, const T *S0, const T *z0, TI *out, T *S_final, T *z_final,
                    T *S_save, T *z_save, T *den_save, long B, long Tn, long H, long Dk, long Dv, long C, double eps,
                    int n_threads) {
    if (FN(bad_sizes)(B, Tn, H, Dk, Dv, C) || !q || !k || !v || !S0 || !z0 || !out || !S_final || !z_final ||
        !S_save != !z_save || !S_save != !den_save)
        return 2;
    FN(fwd_args) a = {q, k, v, S0, z0, out, S_final, z_final, S_save, z_save, den_save,
                      B, Tn, H, (int)Dk, (int)Dv, (int)C, (T)eps};
    return parallel_over(B * H, n_threads, FN(forward_range), &a);
}

int FN(cla_backward)(const TI *q, const TI *k, const TI *v, const TI *out, const TI *dout, const T *S_save,
                     const T *z_save, const T *den_save, const T *dS_final, const T *dz_final, TI *dq, TI *dk, TI *dv,
                     T *dS0, T *dz0, long B, long Tn, long H, long Dk, long Dv, long C, int n_threads) {
    if (FN(bad_sizes)(B, Tn, H, Dk, Dv, C) || !q || !k || !v || !out || !dout || !S_save || !z_save || !den_save ||
        !dS_final || !dz_final || !dq || !dk || !dv || !dS0 || !dz0)
        return 2;
    FN(bwd_args) a = {q, k, v, out, dout, S_save, z_save, den_save, dS_final, dz_final,
                      dq, dk, dv, dS0, dz0, B, Tn, H, (int)Dk, (int)Dv, (int)C};
    return parallel_over(B * H, n_threads, FN(backward_range), &a);
}

#undef V
#undef TI
#undef MM
#undef WS_FLOATS
#undef MM_BEGIN
#undef MM_END
#undef TILE
#undef TILE_R
#undef FN
#undef CAT
#undef CAT2

/* One generation step of a linearised Llama-style model (linearize/: LinearizedAttention in a
 * LlamaForCausalLM) for a batch of tokens: from the token ids to the logits of the next token, in
 * one call, the way transformers computes it.
 *
 * Per layer, for each of the B rows x (in place):
 *   h = RMSNorm(x); q, k, v = Wq h, Wk h, Wv h (+ biases, where the model has them); RoPE on q, k
 *   (cos/sin computed from the model's inverse frequencies: no table, any position);
 *   per query head (k, v of its key/value group):
 *     linear  S += phi_k(k) v^T; z += phi_k(k); y = phi_q(q)^T S / (phi_q(q) . z + eps)
 *     hybrid  the key leaving the window (and not a sink) joins S and z; k, v enter the ring (slot
 *             position % window; the first `sinks` tokens also their own slots; ring and sinks are
 *             kept once per key/value head, S and z per query head); y = (sum_j a_j v_j +
 *             phi_q(q)^T S) / (sum_j a_j + phi_q(q) . z + eps), a_j = exp(q.k_j / sqrt(D) - max) over
 *             the ring's and the sinks' keys (linearize/attention.py, step_attention)
 *     window  the hybrid without S and z
 *   x += Wo y; h = RMSNorm(x); x += Wd (silu(Wg h) * Wu h)
 * then logits = head(RMSNorm(x)).
 *
 * Every weight is read once per step for up to LT_GEMV_NB rows at a time (gemv.h): at batch 1 a step
 * costs one pass over the weights, in float32, bfloat16 or int8 (per-row scales). Batches of amx_rows
 * rows and more run the dot formats' projections on AMX tiles (amx_gemm), where the build has them. Work is shared
 * with OpenMP over output features, and over halves of (row, head) pairs for attention (attend_part);
 * five barriers per layer. Every thread normalises x itself, and combines the attention's halves
 * itself (identical results), instead of waiting for one that does.
 */
#include "llama_step.h"
#include "gemv.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define LT_FIELD(f) (long)offsetof(lt_llama, f)

int lt_llama_layout(long *out, int n) {
    const long values[] = {
        (long)sizeof(lt_llama), LT_FIELD(n_layers), LT_FIELD(d), LT_FIELD(n_heads), LT_FIELD(n_kv_heads),
        LT_FIELD(head_dim), LT_FIELD(dff), LT_FIELD(vocab), LT_FIELD(mode), LT_FIELD(feature_map),
        LT_FIELD(n_features), LT_FIELD(hh_m), LT_FIELD(window), LT_FIELD(sinks), LT_FIELD(wkind), LT_FIELD(amx_rows),
        LT_FIELD(rms_eps), LT_FIELD(attn_eps), LT_FIELD(rope_scale), LT_FIELD(inv_freq), LT_FIELD(attn_norm),
        LT_FIELD(mlp_norm), LT_FIELD(wq), LT_FIELD(wk), LT_FIELD(wv), LT_FIELD(wo), LT_FIELD(wg), LT_FIELD(wu),
        LT_FIELD(wd), LT_FIELD(bq), LT_FIELD(bk), LT_FIELD(bv), LT_FIELD(bo), LT_FIELD(fq_w), LT_FIELD(fq_b),
        LT_FIELD(fk_w), LT_FIELD(fk_b), LT_FIELD(embed), LT_FIELD(final_norm), LT_FIELD(head),
    };
    const int count = (int)(sizeof values / sizeof values[0]);
    if (out && n >= count)
        for (int i = 0; i < count; i++) out[i] = values[i];
    return count;
}

/* 0, or 2 when the model's sizes or pointers are unusable (the caller's checks are not trusted). */
static int check_llama(const lt_llama *m) {
    if (!m || m->n_layers < 1 || m->d < 1 || m->n_heads < 1 || m->n_kv_heads < 1 || m->n_heads % m->n_kv_heads ||
        m->head_dim < 2 || m->head_dim % 2 || m->dff < 1 || m->vocab < 1 || m->mode < 0 || m->mode > 2 ||
        m->feature_map < 0 || m->feature_map > 2 || m->wkind < 0 || m->wkind > 4 || m->sinks < 0 || m->amx_rows < 0 ||
        (m->mode != LT_LINEAR && m->window < 1) || !m->inv_freq || !m->embed || !m->final_norm || !m->head)
        return 2;
    if (m->mode != LT_WINDOW && (m->feature_map == LT_HEDGEHOG ? (m->hh_m < 1 || m->n_features != 2 * m->hh_m)
                                                               : m->n_features != m->head_dim))
        return 2;
    const void *const *need[] = {(const void *const *)m->attn_norm, (const void *const *)m->mlp_norm, m->wq, m->wk,
                                 m->wv, m->wo, m->wg, m->wu, m->wd};
    for (int a = 0; a < (int)(sizeof need / sizeof need[0]); a++) {
        if (!need[a]) return 2;
        for (int l = 0; l < m->n_layers; l++)
            if (!need[a][l]) return 2;
    }
    if (m->feature_map == LT_HEDGEHOG && m->mode != LT_WINDOW) {
        if (!m->fq_w || !m->fq_b || !m->fk_w || !m->fk_b) return 2;
        for (int l = 0; l < m->n_layers; l++)
            if (!m->fq_w[l] || !m->fq_b[l] || !m->fk_w[l] || !m->fk_b[l]) return 2;
    }
    return 0;
}

/* The parts of a head in attention (attend_part): one in window mode, else one per half of S's features. */
static int head_parts(const lt_llama *m) { return m->mode == LT_WINDOW ? 1 : 2; }

/* Shared buffers, in work: x [B, d] (the residual stream), q [B, H D], k and v [B, Hkv D], part_y
 * [B, H, parts, D] and part_den [B, H, parts] (attention's parts), gate and up [B, dff], cs [B, D] (RoPE's
 * cos and sin per row). Per thread (malloc'd in the region): h [B, d], att [B, H D] (the parts combined)
 * and one head's scratch. */
typedef struct {
    int B, nq, nk, parts;
    float *x, *q, *k, *v, *part_y, *part_den, *gate, *up, *cs;
} lt_lstep;

typedef struct {
    float *h, *att, *q, *k, *fq, *fk, *score;
    void *pack; /* the projections' inputs packed for AMX tiles (amx_gemm), when the step uses them */
} lt_lmine;

long lt_llama_work_size(const lt_llama *m, int B) {
    if (check_llama(m) || B < 1) return -1;
    const long D = m->head_dim, P = head_parts(m);
    return (long)B * (m->d + (m->n_heads + 2L * m->n_kv_heads) * D + m->n_heads * P * (D + 1) + 2L * m->dff + D);
}

static lt_lstep lstep_layout(const lt_llama *m, int B, float *work) {
    lt_lstep s;
    s.B = B, s.nq = m->n_heads * m->head_dim, s.nk = m->n_kv_heads * m->head_dim, s.parts = head_parts(m);
    s.x = work, s.q = s.x + (long)B * m->d, s.k = s.q + (long)B * s.nq, s.v = s.k + (long)B * s.nk;
    s.part_y = s.v + (long)B * s.nk, s.part_den = s.part_y + (long)B * s.nq * s.parts;
    s.gate = s.part_den + (long)B * m->n_heads * s.parts, s.up = s.gate + (long)B * m->dff;
    s.cs = s.up + (long)B * m->dff;
    return s;
}

static lt_lmine lmine_alloc(const lt_llama *m, int B, int tiles) {
    const long D = m->head_dim, F = m->n_features;
    const long n = (long)B * (m->d + m->n_heads * D) + 2 * D + 2 * F + (m->window + m->sinks) + 4 * VLF;
    lt_lmine t = {NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
#ifdef LT_AMX
    if (tiles) {
        const int nq = m->n_heads * m->head_dim, widest = m->dff > m->d ? (m->dff > nq ? m->dff : nq) : (m->d > nq ? m->d : nq);
        t.pack = aligned_alloc(64, (amx_pack_bytes(widest, B) + 63) / 64 * 64);
        if (!t.pack) return t;
    }
#else
    (void)tiles;
#endif
    t.h = malloc(sizeof(float) * n);
    if (!t.h) return t;
    t.att = t.h + (long)B * m->d, t.q = t.att + (long)B * m->n_heads * D, t.k = t.q + D, t.fq = t.k + D;
    t.fk = t.fq + F, t.score = t.fk + F;
    return t;
}

/* y [B, d] = RMSNorm(x) w (transformers' LlamaRMSNorm: x / sqrt(mean(x^2) + eps) * w, in float32). */
static void rms_norm(int B, int d, const float *x, const float *w, float eps, float *y) {
    for (int r = 0; r < B; r++) {
        const float *xr = x + (long)r * d;
        vf acc = (vf){0};
        int i = 0;
        for (; i + VLF <= d; i += VLF) acc += vload(xr + i) * vload(xr + i);
        float ss = hsum(acc);
        for (; i < d; i++) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / d + eps);
        for (i = 0; i < d; i++) y[(long)r * d + i] = w[i] * (xr[i] * inv);
    }
}

/* x packed for the tiles, when the step uses them (pack given): once per input, before the
 * projections that read it (each thread packs the whole input into its own buffer). */
static void tiles_input(int kind, void *pack, int B, int n_in, const float *x) {
#ifdef LT_AMX
    if (pack) amx_pack_input(kind, B, n_in, x, pack);
#else
    (void)kind, (void)pack, (void)B, (void)n_in, (void)x;
#endif
}

/* Rows [j0, j1) of a projection in format kind: on AMX tiles when pack is given (the step uses them
 * for this format and batch: amx_gemm; x packed by tiles_input), else the row layout (gemv.h). */
static void gemv_kind(int kind, void *pack, int B, int n_in, int n_out, int j0, int j1, const void *W,
                      const float *bias, const float *x, float *y, const float *base) {
    if (j0 >= j1) return;
#ifdef LT_AMX
    if (pack) {
        amx_gemm(kind, B, n_in, n_out, j0, j1, W, bias, x, y, base, pack);
        return;
    }
#else
    (void)pack;
#endif
    gemv_of(kind)(B, n_in, n_out, j0, j1, W, bias, x, y, base);
}

int lt_llama_tiles(int wkind) {
#ifdef LT_AMX
#ifdef LT_AMX_INT8
    if (wkind == LT_I8_DOT) return amx_enable();
#endif
    if (wkind == LT_BF16_DOT) return amx_enable();
#else
    (void)wkind;
#endif
    return 0;
}

int lt_llama_gemv_f32(int wkind, int tiles, int B, int n_in, int n_out, const void *W, const float *bias,
                      const float *x, float *y) {
    if (wkind < LT_F32 || wkind > LT_I8_DOT || tiles < 0 || tiles > 1 || B < 1 || n_in < 1 || n_out < 1 || !W ||
        !x || !y)
        return 2;
    if ((wkind == LT_BF16_DOT || wkind == LT_I8_DOT) && n_in % 32) return 2;
    if (wkind == LT_BF16_DOT && !LT_HAS_BF16_DOT) return 2;
    if (tiles && !lt_llama_tiles(wkind)) return 2;
    void *pack = NULL;
#ifdef LT_AMX
    if (tiles) {
        pack = aligned_alloc(64, (amx_pack_bytes(n_in, B) + 63) / 64 * 64);
        if (!pack) return 2;
        amx_configure(wkind == LT_I8_DOT);
    }
#endif
    tiles_input(wkind, pack, B, n_in, x);
    gemv_kind(wkind, pack, B, n_in, n_out, 0, n_out, W, bias, x, y, NULL);
#ifdef LT_AMX
    if (tiles) _tile_release();
#endif
    free(pack);
    return 0;
}

/* The rows [lo, hi) of the outputs of q, k and v stacked (one range of work over the three): each
 * projection's share, into its own buffer. */
static void qkv_share(int kind, void *pack, int B, int d, int nq, int nk, int lo, int hi, const void *wq, const void *wk,
                      const void *wv, const float *bq, const float *bk, const float *bv, const float *h, float *q,
                      float *k, float *v) {
    const int bounds[4] = {0, nq, nq + nk, nq + 2 * nk};
    const void *W[3] = {wq, wk, wv};
    const float *bias[3] = {bq, bk, bv};
    float *y[3] = {q, k, v};
    for (int p = 0; p < 3; p++) {
        const int n = bounds[p + 1] - bounds[p];
        const int j0 = lo > bounds[p] ? lo - bounds[p] : 0, j1 = hi < bounds[p + 1] ? hi - bounds[p] : n;
        gemv_kind(kind, pack, B, d, n, j0, j1, W[p], bias[p], h, y[p], NULL);
    }
}

/* The Hedgehog map of one head: u = x W + b (W [D, m], b [m]); phi = [softmax(u), softmax(-u)]. W is in
 * the projections' weight family (map_format): float32; bfloat16, widened; or int8 with one float32
 * scale per column j (scales: m float32 at any byte address, u_j = b_j + s_j sum_i x_i W_ij). The maps
 * are read once a token like the projections, so the narrow formats narrow them too. */
static void hedgehog(int D, int m, int fmt, const float *x, const void *W, const char *scales, const float *b,
                     float *phi) {
    float *u = phi; /* u in the first half, then both halves from it */
    for (int j = 0; j < m; j++) u[j] = fmt == LT_I8 ? 0.0f : b[j];
    for (int i = 0; i < D; i++) {
        const float xi = x[i];
        const long row = (long)i * m;
        int j = 0;
        if (fmt == LT_F32)
            for (; j + VLF <= m; j += VLF) vstore(u + j, vload(u + j) + xi * wload_f32(W, row + j));
        else if (fmt == LT_BF16)
            for (; j + VLF <= m; j += VLF) vstore(u + j, vload(u + j) + xi * wload_bf16(W, row + j));
        else
            for (; j + VLF <= m; j += VLF) vstore(u + j, vload(u + j) + xi * wload_i8(W, row + j));
        for (; j < m; j++)
            u[j] += xi * (fmt == LT_F32    ? wscalar_f32(W, row + j)
                          : fmt == LT_BF16 ? wscalar_bf16(W, row + j)
                                           : wscalar_i8(W, row + j));
    }
    if (fmt == LT_I8)
        for (int j = 0; j < m; j++) {
            float sj;
            memcpy(&sj, scales + 4L * j, sizeof sj); /* (the scales follow the int8 matrix: maybe unaligned) */
            u[j] = b[j] + sj * u[j];
        }
    float hi = u[0], lo = u[0];
    for (int j = 1; j < m; j++) hi = u[j] > hi ? u[j] : hi, lo = u[j] < lo ? u[j] : lo;
    float sp = 0, sn = 0;
    int j = 0;
    for (; j + VLF <= m; j += VLF) { /* exp of values <= 0: vexp_neg (relative error < 3e-8) */
        const vf v = vload(u + j), ep = vexp_neg(v - hi), en = vexp_neg(lo - v);
        vstore(phi + m + j, en);
        vstore(phi + j, ep);
        sp += hsum(ep), sn += hsum(en);
    }
    for (; j < m; j++) {
        const float v = u[j];
        phi[m + j] = expf(lo - v); /* softmax(-u): max(-u) = -lo */
        phi[j] = expf(v - hi);
        sp += phi[j], sn += phi[m + j];
    }
    const float ip = 1.0f / sp, in = 1.0f / sn;
    for (j = 0; j < m; j++) phi[j] *= ip, phi[m + j] *= in;
}

/* The Hedgehog maps' format for a weight format: the projections' family, without their dot products. */
static int map_format(int wkind) { return wkind == LT_F32 ? LT_F32 : wkind <= LT_BF16_DOT ? LT_BF16 : LT_I8; }

/* Bytes per weight in a weight format (its family's: 4, 2 or 1). */
static long weight_size(int wkind) { return wkind == LT_F32 ? 4 : wkind <= LT_BF16_DOT ? 2 : 1; }

/* Bytes of one layer's Hedgehog weights [H, D, m] in a map format (then, for int8, the [H, m] scales). */
static long map_bytes(const lt_llama *m, int fmt) {
    return weight_size(fmt) * m->n_heads * m->head_dim * m->hh_m;
}

static void feature_map(const lt_llama *m, int l, int h, int keys, const float *x, float *phi) {
    const int D = m->head_dim;
    if (m->feature_map == LT_HEDGEHOG) {
        const int hm = m->hh_m, fmt = map_format(m->wkind);
        const long per_head = map_bytes(m, fmt) / m->n_heads;
        const char *W = (const char *)(keys ? m->fk_w : m->fq_w)[l];
        const char *scales = W + map_bytes(m, fmt) + 4L * h * hm; /* (int8 only) */
        const float *b = (keys ? m->fk_b : m->fq_b)[l] + h * hm;
        hedgehog(D, hm, fmt, x, W + h * per_head, scales, b, phi);
    } else if (m->feature_map == LT_ELU) {
        for (int i = 0; i < D; i++) phi[i] = x[i] > 0 ? x[i] + 1.0f : expf(x[i]);
    } else {
        for (int i = 0; i < D; i++) phi[i] = x[i] > 0 ? x[i] : 0.0f;
    }
}

/* cos and sin of RoPE's angles at position p, scaled (transformers' attention_scaling): cs [D] holds
 * D/2 cosines then D/2 sines. Once per row and token: every layer and head shares them. */
static void rope_angles(const lt_llama *m, long p, float *cs) {
    const int half = m->head_dim / 2;
    for (int i = 0; i < half; i++) {
        const float f = m->inv_freq[i] * (float)p; /* (one float32 product, as transformers forms it) */
        cs[i] = cosf(f) * m->rope_scale, cs[half + i] = sinf(f) * m->rope_scale;
    }
}

/* RoPE in place on one head of D (transformers' rotate_half convention), with rope_angles' cs. */
static void rope(int D, const float *cs, float *x) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        const float c = cs[i], s = cs[half + i], a = x[i], b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

/* The dot product of two vectors of n, VLF lanes at a time. */
static inline float dot(const float *a, const float *b, int n) {
    vf acc = (vf){0};
    int i = 0;
    for (; i + VLF <= n; i += VLF) acc += vload(a + i) * vload(b + i);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* rows of S prefetched ahead of the one being read (S of one head spans 8 pages of 4 KB: the hardware
 * prefetcher restarts on each) */
#ifndef LT_S_AHEAD
#define LT_S_AHEAD 8
#endif

/* One part of a (row, query head): the unnormalised attention output y [D] and its normaliser *den
 * for the roped q and k and the value v of the token at index t (= the row's seen), the features
 * [f0, f1) of S and z of that row and head advanced and read; with `ring`, the window's and the
 * sinks' softmax terms too. A head is one part (window mode) or two, one per half of the features
 * (the halves of a Hedgehog map are its two softmaxes), so that 2 H parts share out evenly over the
 * threads where H heads do not (SmolLM2: 9 heads, 2 threads); the parts' sums are added before the
 * division (combine). w->fq and w->fk hold the head's features when `mapped` (the thread's previous
 * part was the other half of the same head). The ring and the sinks (one per key/value head, shared
 * by the group's query heads) are only read here: the new key and value stand in for the slot they
 * will take, which ring_write fills after every head of the group has read the key leaving it. */
static void attend_part(const lt_llama *m, int l, int h, long t, lt_lmine *w, const float *v, float *S, float *z,
                        const float *ring_k, const float *ring_v, const float *sink_k, const float *sink_v, int f0,
                        int f1, int ring, int mapped, float *y, float *den_out) {
    const int D = m->head_dim, W = m->window, ns = m->sinks;
    const float *q = w->q, *k = w->k;
    float den = 0;
    for (int e = 0; e < D; e++) y[e] = 0;
    if (S) /* the first rows of this part's S, on their way while the maps and the window are computed */
        for (long i = (long)f0 * D; i < (long)(f0 + LT_S_AHEAD < f1 ? f0 + LT_S_AHEAD : f1) * D; i += 16)
            __builtin_prefetch(S + i, 1);
    if (m->mode == LT_LINEAR) { /* S += phi_k(k) v^T and the read of S, in one pass */
        if (!mapped) {
            feature_map(m, l, h, 1, k, w->fk);
            feature_map(m, l, h, 0, q, w->fq);
        }
        for (int f = f0; f < f1; f++) {
            const float p = w->fq[f], a = w->fk[f];
            float *row = S + (long)f * D;
            if (f + LT_S_AHEAD < f1)
                for (int e = 0; e < D; e += 16) __builtin_prefetch(row + (long)LT_S_AHEAD * D + e, 1);
            int e = 0;
            for (; e + VLF <= D; e += VLF) vstore(row + e, vload(row + e) + a * vload(v + e));
            for (; e < D; e++) row[e] += a * v[e];
            z[f] += a;
            den += p * z[f];
            for (e = 0; e < D; e++) y[e] += p * row[e];
        }
        *den_out = den;
        return;
    }
    const int slot = (int)(t % W);
    /* the key leaving the window (and not a sink) joins the state: its features and value are kept
     * here, and S and z take them in the same pass that reads S for this token (below) */
    const int leaving = m->mode == LT_HYBRID && t >= W && t - W >= ns;
    if (leaving && !mapped) feature_map(m, l, h, 1, ring_k + (long)slot * D, w->fk);
    if (ring) {
        /* scores of the ring's valid slots (positions >= 0 and not sinks) and of the sinks seen; the
         * ring's slot `slot` and the sink t < sinks are this token's */
        const float scale = 1.0f / sqrtf((float)D);
        float *sc = w->score, top = -INFINITY;
        for (int s = 0; s < W + ns; s++) {
            int ok;
            const float *key;
            if (s < W) {
                const long pos = t - ((t - s) % W + W) % W;
                ok = pos >= 0 && pos >= ns, key = s == slot ? k : ring_k + (long)s * D;
            } else {
                ok = s - W <= t, key = s - W == t ? k : sink_k + (long)(s - W) * D;
            }
            if (s + 4 < W)
                for (int e = 0; e < D; e += 16) {
                    __builtin_prefetch(ring_k + (long)(s + 4) * D + e);
                    __builtin_prefetch(ring_v + (long)s * D + e); /* (read by the weighted sum below) */
                }
            sc[s] = ok ? dot(q, key, D) * scale : -INFINITY;
            top = sc[s] > top ? sc[s] : top;
        }
        for (int s = 0; s < W + ns; s++) {
            if (sc[s] == -INFINITY) continue;
            const float a = expf(sc[s] - top);
            const float *val =
                s < W ? (s == slot ? v : ring_v + (long)s * D) : (s - W == t ? v : sink_v + (long)(s - W) * D);
            den += a;
            for (int e = 0; e < D; e++) y[e] += a * val[e];
        }
    }
    if (m->mode == LT_HYBRID) { /* one pass over S: the leaving key's update, then its read */
        if (!mapped) feature_map(m, l, h, 0, q, w->fq);
        const float *vold = ring_v + (long)slot * D;
        for (int f = f0; f < f1; f++) {
            const float p = w->fq[f];
            float *row = S + (long)f * D;
            if (f + LT_S_AHEAD < f1)
                for (int e = 0; e < D; e += 16) __builtin_prefetch(row + (long)LT_S_AHEAD * D + e, 1);
            if (leaving) {
                const float a = w->fk[f];
                int e = 0;
                for (; e + VLF <= D; e += VLF) vstore(row + e, vload(row + e) + a * vload(vold + e));
                for (; e < D; e++) row[e] += a * vold[e];
                z[f] += a;
            }
            den += p * z[f];
            for (int e = 0; e < D; e++) y[e] += p * row[e];
        }
    }
    *den_out = den;
}

/* att [B, H D] = the sum of each head's parts' y over the sum of their normalisers (+ eps). */
static void combine(const lt_llama *m, int B, int parts, const float *part_y, const float *part_den, float *att) {
    const int D = m->head_dim, n = B * m->n_heads;
    for (int bh = 0; bh < n; bh++) {
        float den = 0;
        for (int c = 0; c < parts; c++) den += part_den[(long)bh * parts + c];
        const float inv = 1.0f / (den + m->attn_eps);
        float *y = att + (long)bh * D;
        const float *p0 = part_y + (long)bh * parts * D;
        for (int e = 0; e < D; e++) y[e] = p0[e];
        for (int c = 1; c < parts; c++)
            for (int e = 0; e < D; e++) y[e] += p0[(long)c * D + e];
        for (int e = 0; e < D; e++) y[e] *= inv;
    }
}

/* The token's roped key k and value v into its ring slot (and its sink slot while t < sinks), for one
 * (row, key/value head): after every query head of the group has attended (attend_one). */
static void ring_write(const lt_llama *m, long t, const float *k, const float *v, float *ring_k, float *ring_v,
                       float *sink_k, float *sink_v) {
    const int D = m->head_dim;
    const long slot = t % m->window;
    memcpy(ring_k + slot * D, k, sizeof(float) * D);
    memcpy(ring_v + slot * D, v, sizeof(float) * D);
    if (t < m->sinks) {
        memcpy(sink_k + t * D, k, sizeof(float) * D);
        memcpy(sink_v + t * D, v, sizeof(float) * D);
    }
}

/* gate [n] = silu(gate) * up, VLF lanes at a time: sigmoid from e = exp(-|g|) (vexp_neg), 1 / (1 + e)
 * for g >= 0 and e / (1 + e) below (no overflow either way). */
static void silu_mul(float *gate, const float *up, int n) {
    int j = 0;
    for (; j + VLF <= n; j += VLF) {
        const vf g = vload(gate + j);
        const vi neg = g < 0.0f;
        const vf absg = (vf)((vi)g & ~((vi){0} + INT32_MIN));
        const vf e = vexp_neg((vf){0} - absg);
        const vf num = (vf)(((vi)e & neg) | ((vi)((vf){0} + 1.0f) & ~neg));
        vstore(gate + j, g * num / (1.0f + e) * vload(up + j));
    }
    for (; j < n; j++) gate[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
}

/* bytes of a thread's rows of Wo fetched into L2 during the attention phase (llama_blocks): all of
 * SmolLM2's int8 share (166 KB) nearly; more (its whole bf16 or float32 share) made those formats
 * 1-5% slower side by side, crowding the cache the attention phase works in */
#ifndef LT_WO_AHEAD
#define LT_WO_AHEAD (128L << 10)
#endif

static void llama_blocks(const lt_llama *m, const lt_lstep *s, lt_lmine *t, const int64_t *seen,
                         float *const *S, float *const *z, float *const *ring_k, float *const *ring_v,
                         float *const *sink_k, float *const *sink_v, float *logits) {
    const int d = m->d, H = m->n_heads, Hkv = m->n_kv_heads, D = m->head_dim, dff = m->dff, B = s->B;
    const int nq = s->nq, nk = s->nk, kind = m->wkind, F = m->n_features;
    const int W = m->window, ns = m->sinks, group = H / Hkv;
    float *x = s->x, *gate = s->gate, *up = s->up, *h = t->h;
    void *pack = t->pack;
    const int grain = pack ? 16 : 4; /* output rows: the tiles take 16 at a time, the row layout 4 */
    for (int l = 0; l < m->n_layers; l++) {
        int lo, hi;
        /* A: q, k, v (rows of the three projections shared out together) */
        rms_norm(B, d, x, m->attn_norm[l], m->rms_eps, h);
        tiles_input(kind, pack, B, d, h);
        share(nq + 2 * nk, grain, &lo, &hi);
        qkv_share(kind, pack, B, d, nq, nk, lo, hi, m->wq[l], m->wk[l], m->wv[l], m->bq ? m->bq[l] : NULL,
                  m->bk ? m->bk[l] : NULL, m->bv ? m->bv[l] : NULL, h, s->q, s->k, s->v);
#pragma omp barrier
        /* B: attention, a part of a (row, query head) per work item (attend_part) */
        const int P = s->parts, half = F / P;
        /* the first LT_WO_AHEAD bytes of this thread's rows of Wo (phase C's share), fetched into
         * L2 a slice per work item: the attention phase, bound by its latency, leaves memory
         * bandwidth unused, and phase C then reads them from the cache */
        int wlo, whi;
        share(d, grain, &wlo, &whi);
        const long esize = weight_size(kind);
        const char *wo = (const char *)m->wo[l] + (long)wlo * nq * esize;
        const long wo_all = (long)(whi - wlo) * nq * esize, wo_bytes = wo_all < LT_WO_AHEAD ? wo_all : LT_WO_AHEAD;
        share(B * H * P, 1, &lo, &hi);
        for (int p = lo; p < hi; p++) {
            for (long i = wo_bytes * (p - lo) / (hi - lo) / 64 * 64; i < wo_bytes * (p - lo + 1) / (hi - lo); i += 64)
                __builtin_prefetch(wo + i, 0, 2);
            const int bh = p / P, c = p % P, b = bh / H, hd = bh % H, g = hd / group;
            memcpy(t->q, s->q + (long)b * nq + (long)hd * D, sizeof(float) * D);
            memcpy(t->k, s->k + (long)b * nk + (long)g * D, sizeof(float) * D);
            rope(D, s->cs + (long)b * D, t->q);
            rope(D, s->cs + (long)b * D, t->k);
            const long bg = (long)b * Hkv + g;
            attend_part(m, l, hd, (long)seen[b], t, s->v + (long)b * nk + (long)g * D,
                        S ? S[l] + (long)bh * F * D : NULL, z ? z[l] + (long)bh * F : NULL,
                        ring_k ? ring_k[l] + bg * W * D : NULL, ring_v ? ring_v[l] + bg * W * D : NULL,
                        sink_k ? sink_k[l] + bg * ns * D : NULL, sink_v ? sink_v[l] + bg * ns * D : NULL, c * half,
                        (c + 1) * half, c == 0, c > 0 && p > lo, s->part_y + (long)p * D, s->part_den + p);
        }
#pragma omp barrier
        /* C: the parts combined (by every thread, into its own att), output projection and residual;
         * the new keys and values into the rings (no head reads them until the next token) */
        combine(m, B, P, s->part_y, s->part_den, t->att);
        tiles_input(kind, pack, B, nq, t->att);
        share(d, grain, &lo, &hi);
        gemv_kind(kind, pack, B, nq, d, lo, hi, m->wo[l], m->bo ? m->bo[l] : NULL, t->att, x, x);
        if (ring_k) {
            share(B * Hkv, 1, &lo, &hi);
            for (int p = lo; p < hi; p++) {
                const int b = p / Hkv, g = p % Hkv;
                memcpy(t->k, s->k + (long)b * nk + (long)g * D, sizeof(float) * D);
                rope(D, s->cs + (long)b * D, t->k);
                ring_write(m, (long)seen[b], t->k, s->v + (long)b * nk + (long)g * D, ring_k[l] + (long)p * W * D,
                           ring_v[l] + (long)p * W * D, ns ? sink_k[l] + (long)p * ns * D : NULL,
                           ns ? sink_v[l] + (long)p * ns * D : NULL);
            }
        }
#pragma omp barrier
        /* D: gate and up, silu(gate) * up into gate */
        rms_norm(B, d, x, m->mlp_norm[l], m->rms_eps, h);
        tiles_input(kind, pack, B, d, h);
        share(dff, grain, &lo, &hi);
        gemv_kind(kind, pack, B, d, dff, lo, hi, m->wg[l], NULL, h, gate, NULL);
        gemv_kind(kind, pack, B, d, dff, lo, hi, m->wu[l], NULL, h, up, NULL);
        for (int b = 0; b < B; b++) silu_mul(gate + (long)b * dff + lo, up + (long)b * dff + lo, hi - lo);
#pragma omp barrier
        /* E: down projection and residual */
        tiles_input(kind, pack, B, dff, gate);
        share(d, grain, &lo, &hi);
        gemv_kind(kind, pack, B, dff, d, lo, hi, m->wd[l], NULL, gate, x, x);
#pragma omp barrier
    }
    rms_norm(B, d, x, m->final_norm, m->rms_eps, h);
    tiles_input(kind, pack, B, d, h);
    int lo, hi;
    share(m->vocab, grain, &lo, &hi);
    gemv_kind(kind, pack, B, d, m->vocab, lo, hi, m->head, NULL, h, logits, NULL);
}

int lt_llama_token_f32(const lt_llama *m, int B, const int64_t *tokens, const int64_t *positions, const int64_t *seen,
                       float *const *S, float *const *z, float *const *ring_k, float *const *ring_v,
                       float *const *sink_k, float *const *sink_v, float *work, long work_size, float *logits) {
    if (check_llama(m) || B < 1 || !tokens || !positions || !seen || !work || !logits) return 2;
    if (work_size < lt_llama_work_size(m, B)) return 2;
    /* dot products on bfloat16 pairs or int8 groups read whole blocks of 32 inputs (= LT_I8_BLOCK) */
    if ((m->wkind == LT_BF16_DOT || m->wkind == LT_I8_DOT) && (m->d % 32 || m->dff % 32 || (m->n_heads * m->head_dim) % 32))
        return 2;
    if (m->wkind == LT_BF16_DOT && !LT_HAS_BF16_DOT) return 2;
    for (int b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= m->vocab || positions[b] < 0 || seen[b] < 0) return 2;
    const int linear = m->mode != LT_WINDOW, windowed = m->mode != LT_LINEAR;
    if ((linear && (!S || !z)) || (windowed && (!ring_k || !ring_v || !sink_k || !sink_v))) return 2;
    for (int l = 0; l < m->n_layers; l++) {
        if (linear && (!S[l] || !z[l])) return 2;
        if (windowed && (!ring_k[l] || !ring_v[l] || (m->sinks && (!sink_k[l] || !sink_v[l])))) return 2;
    }
    const lt_lstep s = lstep_layout(m, B, work);
    for (int b = 0; b < B; b++) {
        memcpy(s.x + (long)b * m->d, m->embed + tokens[b] * m->d, sizeof(float) * m->d);
        rope_angles(m, positions[b], s.cs + (long)b * m->head_dim);
    }
    /* AMX tiles for the dot formats from amx_rows rows on, where this build and process have them */
    const int tiles = m->amx_rows && B >= m->amx_rows && lt_llama_tiles(m->wkind);
    int failed = 0;
#pragma omp parallel
    {
        lt_lmine t = lmine_alloc(m, B, tiles);
#pragma omp atomic
        failed += t.h == NULL;
#pragma omp barrier
#ifdef LT_AMX
        if (tiles && !failed) amx_configure(m->wkind == LT_I8_DOT); /* (each thread's own configuration) */
#endif
        if (!failed)
            llama_blocks(m, &s, &t, seen, linear ? S : NULL, linear ? z : NULL, windowed ? ring_k : NULL,
                         windowed ? ring_v : NULL, windowed ? sink_k : NULL, windowed ? sink_v : NULL, logits);
#ifdef LT_AMX
        if (tiles && !failed) _tile_release();
#endif
        free(t.h);
        free(t.pack);
    }
    return failed ? 1 : 0;
}

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

#include "model_step.h"
#include "gemv.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static inline float phi(float v, int kind) { return kind == 0 ? (v > 0 ? v + 1.0f : expf(v)) : (v > 0 ? v : 0.0f); }

int lt_has_bf16_dot(void) { return LT_HAS_BF16_DOT; }

int lt_has_amx(void) {
#ifdef LT_AMX
    return amx_enable();
#else
    return 0;
#endif
}

#include <stddef.h>
#define LT_FIELD(f) (long)offsetof(lt_model, f)

int lt_model_layout(long *out, int n) {
    const long values[] = {
        (long)sizeof(lt_model), LT_FIELD(n_layers), LT_FIELD(d), LT_FIELD(n_heads), LT_FIELD(dk), LT_FIELD(dv),
        LT_FIELD(dff), LT_FIELD(pre_norm), LT_FIELD(feature_map), LT_FIELD(bf16), LT_FIELD(ln_eps),
        LT_FIELD(attn_eps), LT_FIELD(ln1_w), LT_FIELD(ln1_b), LT_FIELD(qkv_w), LT_FIELD(qkv_b), LT_FIELD(out_w),
        LT_FIELD(out_b), LT_FIELD(ln2_w), LT_FIELD(ln2_b), LT_FIELD(ff1_w), LT_FIELD(ff1_b), LT_FIELD(ff2_w),
        LT_FIELD(ff2_b), LT_FIELD(vocab), LT_FIELD(max_len), LT_FIELD(n_params), LT_FIELD(norm_eps),
        LT_FIELD(embed), LT_FIELD(pos), LT_FIELD(norm_w), LT_FIELD(norm_b), LT_FIELD(head_w), LT_FIELD(head_b),
    };
    const int count = (int)(sizeof values / sizeof values[0]);
    if (out && n >= count)
        for (int i = 0; i < count; i++) out[i] = values[i];
    return count;
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
    s.B = B, s.Bp = roundv(B), s.batched = B >= LT_BATCHED_MIN && m->bf16 < 3, s.kind = m->bf16;
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
        m->vocab < 1 || m->max_len < 1 || m->n_params < 1 || m->bf16 < 0 || m->bf16 > 4 || m->feature_map < 0 ||
        m->feature_map > 1 || !m->embed || !m->head_w || !m->head_b || !m->norm_w != !m->norm_b)
        return 2;
    /* dot products on bfloat16 pairs or int8 groups read whole blocks of 32 inputs */
    if ((m->bf16 == 2 || m->bf16 == 4) && (m->d % 32 || (m->n_heads * m->dv) % 32 || m->dff % 32)) return 2;
    if (m->bf16 == 2 && !LT_HAS_BF16_DOT) return 2;
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
        if (s.amx) amx_configure(0); /* the tile configuration is each thread's own */
#endif
        if (!failed) step_blocks(m, &s, &t, S, z, params);
#ifdef LT_AMX
        if (s.amx) _tile_release();
#endif
        free(t.xp);
    }
    return failed ? 1 : 0;
}


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
        if (s.amx) amx_configure(0);
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

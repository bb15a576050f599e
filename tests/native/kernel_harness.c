/* A test driver for the CPU kernels on targets whose libraries Python cannot load here (AArch64
 * under qemu-user): reads a request from a file, runs the kernel, writes the results to a file.
 * tests/test_aarch64.py writes the requests and checks the results against PyTorch.
 *
 *   kernel_harness attention IN OUT   cla_forward (keeping what the backward needs) + cla_backward
 *     IN:  int64 dtype (element bytes: 2 bfloat16, 4 float32, 8 float64), B, T, H, Dk, Dv, C; float64
 *          eps; then q, k, v [B,T,H,Dk|Dv], S0 [B,H,Dk,Dv], z0 [B,H,Dk], dy [B,T,H,Dv], dS [B,H,Dk,Dv],
 *          dz [B,H,Dk] in that dtype (the states S0, z0, dS, dz in float32 for bfloat16)
 *     OUT: y, S, z, dq, dk, dv, dS0, dz0 (the same dtypes)
 *   kernel_harness step IN OUT        lt_model_token_f32 for n tokens from position 0, zero state
 *     IN:  int64 n_layers, d, n_heads, dk, dv, dff, pre_norm, feature_map, vocab, max_len, n_params,
 *          has_pos, has_norm, B, n; float32 ln_eps, attn_eps, norm_eps; per layer the 12 weights of
 *          FusedModelStep.WEIGHTS; embed, [pos], [norm_w, norm_b], head_w, head_b; int64 tokens [n, B]
 *     OUT: float32 params [n, B, n_params], then S and z of every layer
 *   kernel_harness llama IN OUT       lt_llama_token_f32 for n tokens from position 0, zero state
 *     IN:  int64 n_layers, d, n_heads, n_kv_heads, head_dim, dff, vocab, mode, feature_map, n_features,
 *          hh_m, window, sinks, wkind (0 float32, 3 int8 or 4 int8 dots), has_bias, B, n; float32 rms_eps, attn_eps,
 *          rope_scale; inv_freq [head_dim / 2]; per layer attn_norm, mlp_norm, wq, wk, wv, wo, wg, wu,
 *          wd (in wkind's layout), [bq, bk, bv, bo], [fq_w, fq_b, fk_w, fk_b (Hedgehog; fq_w and fk_w
 *          in wkind's family: float32, or int8 [H, D, m] then [H, m] float32 column scales)]; embed,
 *          final_norm, head (in wkind's layout); int64 tokens [n, B]
 *     OUT: float32 logits [n, B, vocab], then per layer S, z, ring_k, ring_v, sink_k, sink_v
 *   kernel_harness gemv IN OUT        lt_llama_gemv_f32: one projection in a weight format
 *     IN:  int64 wkind (0 float32, 3 int8 or 4 int8 dots), B, n_in, n_out, has_bias; W in wkind's layout,
 *          [bias [n_out]], x [B, n_in] float32
 *     OUT: float32 y [B, n_out]
 *   kernel_harness sample IN OUT      lt_sample_tokens_f32
 *     IN:  int64 B, V, top_k; float32 temperature, top_p; float32 logits [B, V], u [B]
 *     OUT: int64 tokens [B]
 * Every read is checked against the file's size; exit status 2 on a short or malformed file. */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "causal_linear.h" /* src/linear_transformers/ops/cpu */
#include "model_step.h"    /* src/linear_transformers/decode */
#include "llama_step.h"    /* src/linear_transformers/decode */

static FILE *in;

static void *take(size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p || fread(p, 1, bytes, in) != bytes) {
        fprintf(stderr, "kernel_harness: short input (wanted %zu bytes)\n", bytes);
        exit(2);
    }
    return p;
}

static int64_t take_i64(void) {
    int64_t v;
    memcpy(&v, take(8), 8);
    return v;
}

static void put(FILE *out, const void *p, size_t bytes) {
    if (fwrite(p, 1, bytes, out) != bytes) exit(3);
}

static int attention(FILE *out) {
    const int64_t es = take_i64(), B = take_i64(), T = take_i64(), H = take_i64(), Dk = take_i64(), Dv = take_i64(),
                  C = take_i64();
    double eps;
    memcpy(&eps, take(8), 8);
    if ((es != 2 && es != 4 && es != 8) || B < 1 || T < 1 || H < 1 || Dk < 1 || Dv < 1 || C < 1) return 2;
    const size_t ss = es == 8 ? 8 : 4; /* states: float32 for bfloat16 (es 2) */
    const size_t nq = B * T * H * Dk, nv = B * T * H * Dv, nS = B * H * Dk * Dv, nz = B * H * Dk;
    const size_t nN = (T + C - 1) / C;
    void *q = take(es * nq), *k = take(es * nq), *v = take(es * nv), *S0 = take(ss * nS), *z0 = take(ss * nz);
    void *dy = take(es * nv), *dS = take(ss * nS), *dz = take(ss * nz);
    void *y = malloc(es * nv), *S = malloc(ss * nS), *z = malloc(ss * nz), *Ss = malloc(ss * nS * nN),
         *zs = malloc(ss * nz * nN), *den = malloc(ss * B * H * T);
    void *dq = malloc(es * nq), *dk = malloc(es * nq), *dv = malloc(es * nv), *dS0 = malloc(ss * nS),
         *dz0 = malloc(ss * nz);
    int status;
    if (es == 2) {
        status = cla_forward_bf16(q, k, v, S0, z0, y, S, z, Ss, zs, den, B, T, H, Dk, Dv, C, eps, 2) ||
                 cla_backward_bf16(q, k, v, y, dy, Ss, zs, den, dS, dz, dq, dk, dv, dS0, dz0, B, T, H, Dk, Dv, C, 2);
    } else if (es == 4) {
        status = cla_forward_f32(q, k, v, S0, z0, y, S, z, Ss, zs, den, B, T, H, Dk, Dv, C, eps, 2) ||
                 cla_backward_f32(q, k, v, y, dy, Ss, zs, den, dS, dz, dq, dk, dv, dS0, dz0, B, T, H, Dk, Dv, C, 2);
    } else {
        status = cla_forward_f64(q, k, v, S0, z0, y, S, z, Ss, zs, den, B, T, H, Dk, Dv, C, eps, 2) ||
                 cla_backward_f64(q, k, v, y, dy, Ss, zs, den, dS, dz, dq, dk, dv, dS0, dz0, B, T, H, Dk, Dv, C, 2);
    }
    if (status) return 4;
    put(out, y, es * nv), put(out, S, ss * nS), put(out, z, ss * nz);
    put(out, dq, es * nq), put(out, dk, es * nq), put(out, dv, es * nv), put(out, dS0, ss * nS), put(out, dz0, ss * nz);
    return 0;
}

static int step(FILE *out) {
    int64_t h[15];
    for (int i = 0; i < 15; i++) h[i] = take_i64();
    const int L = (int)h[0], d = (int)h[1], H = (int)h[2], dk = (int)h[3], dv = (int)h[4], dff = (int)h[5];
    const int vocab = (int)h[8], max_len = (int)h[9], n_params = (int)h[10], B = (int)h[13], n = (int)h[14];
    if (L < 1 || d < 1 || H < 1 || dk < 1 || dv < 1 || dff < 1 || vocab < 1 || B < 1 || n < 1 || n > max_len) return 2;
    float eps[3];
    memcpy(eps, take(12), 12);
    const size_t sizes[12] = {d, d, (size_t)H * (2 * dk + dv) * d, (size_t)H * (2 * dk + dv), (size_t)d * H * dv, d,
                              d, d, (size_t)dff * d, dff, (size_t)d * dff, d};
    const float **w[12];
    for (int j = 0; j < 12; j++) w[j] = malloc(sizeof(float *) * L);
    for (int l = 0; l < L; l++)
        for (int j = 0; j < 12; j++) w[j][l] = take(4 * sizes[j]);
    lt_model m = {L, d, H, dk, dv, dff, (int)h[6], (int)h[7], 0, eps[0], eps[1],
                  w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], w[10], w[11],
                  vocab, max_len, n_params, eps[2], NULL, NULL, NULL, NULL, NULL, NULL};
    m.embed = take(4 * (size_t)vocab * d);
    m.pos = h[11] ? take(4 * (size_t)max_len * d) : NULL;
    if (h[12]) m.norm_w = take(4 * (size_t)d), m.norm_b = take(4 * (size_t)d);
    m.head_w = take(4 * (size_t)n_params * d), m.head_b = take(4 * (size_t)n_params);
    const int64_t *tokens = take(8 * (size_t)n * B);
    float **S = malloc(sizeof(float *) * L), **z = malloc(sizeof(float *) * L);
    for (int l = 0; l < L; l++) S[l] = calloc((size_t)B * H * dk * dv, 4), z[l] = calloc((size_t)B * H * dk, 4);
    const int Bp = (B + 15) / 16 * 16;
    float *work = malloc(4 * (size_t)Bp * (H * (2 * dk + dv) + H * dv + dff + 2 * d));
    float *params = malloc(4 * (size_t)B * n_params);
    for (int t = 0; t < n; t++) {
        const int status = lt_model_token_f32(&m, B, tokens + (size_t)t * B, t, S, z, work, params);
        if (status) return 4 + status;
        put(out, params, 4 * (size_t)B * n_params);
    }
    for (int l = 0; l < L; l++) put(out, S[l], 4 * (size_t)B * H * dk * dv), put(out, z[l], 4 * (size_t)B * H * dk);
    return 0;
}

/* A weight matrix [rows, cols] in format wkind: float32, or int8 followed by its rows' float32 scales. */
static const void *take_matrix(int wkind, long rows, long cols) {
    return take(wkind == LT_I8 || wkind == LT_I8_DOT ? (size_t)(rows * cols + 4 * rows) : (size_t)(4 * rows * cols));
}

static int gemv(FILE *out) {
    const int64_t wkind = take_i64(), B = take_i64(), n_in = take_i64(), n_out = take_i64(), has_bias = take_i64();
    if ((wkind != LT_F32 && wkind != LT_I8 && wkind != LT_I8_DOT) || B < 1 || n_in < 1 || n_out < 1) return 2;
    const void *W = take_matrix((int)wkind, n_out, n_in);
    const float *bias = has_bias ? take(4 * (size_t)n_out) : NULL, *x = take(4 * (size_t)(B * n_in));
    float *y = malloc(4 * (size_t)(B * n_out));
    const int status = lt_llama_gemv_f32((int)wkind, 0, (int)B, (int)n_in, (int)n_out, W, bias, x, y);
    if (status) return 4 + status;
    put(out, y, 4 * (size_t)(B * n_out));
    return 0;
}

static int llama(FILE *out) {
    int64_t h[17];
    for (int i = 0; i < 17; i++) h[i] = take_i64();
    lt_llama m;
    memset(&m, 0, sizeof m);
    m.n_layers = (int)h[0], m.d = (int)h[1], m.n_heads = (int)h[2], m.n_kv_heads = (int)h[3];
    m.head_dim = (int)h[4], m.dff = (int)h[5], m.vocab = (int)h[6], m.mode = (int)h[7], m.feature_map = (int)h[8];
    m.n_features = (int)h[9], m.hh_m = (int)h[10], m.window = (int)h[11], m.sinks = (int)h[12], m.wkind = (int)h[13];
    const int has_bias = (int)h[14], B = (int)h[15], n = (int)h[16], L = m.n_layers, d = m.d, D = m.head_dim;
    if (L < 1 || d < 1 || D < 2 || m.n_heads < 1 || m.n_kv_heads < 1 || m.dff < 1 || m.vocab < 1 || B < 1 || n < 1 ||
        (m.wkind != LT_F32 && m.wkind != LT_I8 && m.wkind != LT_I8_DOT))
        return 2;
    float eps[3];
    memcpy(eps, take(12), 12);
    m.rms_eps = eps[0], m.attn_eps = eps[1], m.rope_scale = eps[2];
    m.inv_freq = take(4 * (size_t)(D / 2));
    const long nq = (long)m.n_heads * D, nk = (long)m.n_kv_heads * D, F = m.n_features, H = m.n_heads;
    const int hedgehog = m.feature_map == LT_HEDGEHOG && m.mode != LT_WINDOW;
    const void **a[17];
    for (int j = 0; j < 17; j++) a[j] = calloc(L, sizeof(void *));
    for (int l = 0; l < L; l++) {
        a[0][l] = take(4 * (size_t)d), a[1][l] = take(4 * (size_t)d);
        a[2][l] = take_matrix(m.wkind, nq, d), a[3][l] = take_matrix(m.wkind, nk, d);
        a[4][l] = take_matrix(m.wkind, nk, d), a[5][l] = take_matrix(m.wkind, d, nq);
        a[6][l] = take_matrix(m.wkind, m.dff, d), a[7][l] = take_matrix(m.wkind, m.dff, d);
        a[8][l] = take_matrix(m.wkind, d, m.dff);
        if (has_bias) {
            a[9][l] = take(4 * (size_t)nq), a[10][l] = take(4 * (size_t)nk), a[11][l] = take(4 * (size_t)nk);
            a[12][l] = take(4 * (size_t)d);
        }
        if (hedgehog) {
            /* the maps' weights in the projections' family: float32, or int8 then [H, m] float32 scales */
            const size_t nm = (size_t)(H * D * m.hh_m), map = m.wkind == LT_F32 ? 4 * nm : nm + 4 * (size_t)(H * m.hh_m);
            a[13][l] = take(map), a[14][l] = take(4 * (size_t)(H * m.hh_m));
            a[15][l] = take(map), a[16][l] = take(4 * (size_t)(H * m.hh_m));
        }
    }
    m.attn_norm = (const float *const *)a[0], m.mlp_norm = (const float *const *)a[1];
    m.wq = a[2], m.wk = a[3], m.wv = a[4], m.wo = a[5], m.wg = a[6], m.wu = a[7], m.wd = a[8];
    if (has_bias) {
        m.bq = (const float *const *)a[9], m.bk = (const float *const *)a[10], m.bv = (const float *const *)a[11];
        m.bo = (const float *const *)a[12];
    }
    if (hedgehog) {
        m.fq_w = (const void *const *)a[13], m.fq_b = (const float *const *)a[14];
        m.fk_w = (const void *const *)a[15], m.fk_b = (const float *const *)a[16];
    }
    m.embed = take(4 * (size_t)m.vocab * d), m.final_norm = take(4 * (size_t)d);
    m.head = take_matrix(m.wkind, m.vocab, d);
    const int64_t *tokens = take(8 * (size_t)n * B);
    const long Hk = m.n_kv_heads; /* (the ring and the sinks: one per key/value head) */
    const size_t sizes[6] = {B * H * F * D, B * H * F, B * Hk * m.window * D, B * Hk * m.window * D,
                             B * Hk * m.sinks * D, B * Hk * m.sinks * D};
    float **st[6];
    for (int j = 0; j < 6; j++) {
        st[j] = malloc(sizeof(float *) * L);
        for (int l = 0; l < L; l++) st[j][l] = calloc(sizes[j] + 1, 4);
    }
    const long work_size = lt_llama_work_size(&m, B);
    if (work_size < 0) return 2;
    float *work = malloc(4 * (size_t)work_size), *logits = malloc(4 * (size_t)B * m.vocab);
    int64_t *positions = malloc(8 * (size_t)B);
    for (int t = 0; t < n; t++) {
        for (int b = 0; b < B; b++) positions[b] = t; /* (each row's count of tokens seen, too) */
        const int status = lt_llama_token_f32(&m, B, tokens + (size_t)t * B, positions, positions, st[0], st[1], st[2],
                                              st[3], st[4], st[5], work, work_size, logits);
        if (status) return 4 + status;
        put(out, logits, 4 * (size_t)B * m.vocab);
    }
    for (int l = 0; l < L; l++)
        for (int j = 0; j < 6; j++) put(out, st[j][l], 4 * sizes[j]);
    return 0;
}

static int sample(FILE *out) {
    const int64_t B = take_i64(), V = take_i64(), top_k = take_i64();
    float f[2];
    memcpy(f, take(8), 8);
    if (B < 1 || V < 1) return 2;
    const float *logits = take(4 * (size_t)(B * V)), *u = take(4 * (size_t)B);
    float *work = malloc(16 * (size_t)V);
    int64_t *tokens = malloc(8 * (size_t)B);
    const int status = lt_sample_tokens_f32((int)B, V, logits, f[0], top_k, f[1], u, work, 4 * V, tokens);
    if (status) return 4 + status;
    put(out, tokens, 8 * (size_t)B);
    return 0;
}

int main(int argc, char **argv) {
    const char *kinds[] = {"attention", "step", "llama", "sample", "gemv"};
    int kind = -1;
    for (int i = 0; i < 5 && argc == 4; i++)
        if (!strcmp(argv[1], kinds[i])) kind = i;
    if (kind < 0) {
        fprintf(stderr, "usage: kernel_harness attention|step|llama|sample|gemv IN OUT\n");
        return 1;
    }
    in = fopen(argv[2], "rb");
    FILE *out = fopen(argv[3], "wb");
    if (!in || !out) return 1;
    const int status = kind == 0   ? attention(out)
                       : kind == 1 ? step(out)
                       : kind == 2 ? llama(out)
                       : kind == 3 ? sample(out)
                                   : gemv(out);
    return fclose(out) || status ? (status ? status : 3) : 0;
}

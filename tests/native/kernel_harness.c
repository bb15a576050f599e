/* A test driver for the CPU kernels on targets whose libraries Python cannot load here (AArch64
 * under qemu-user): reads a request from a file, runs the kernel, writes the results to a file.
 * tests/test_aarch64.py writes the requests and checks the results against PyTorch.
 *
 *   kernel_harness attention IN OUT   cla_forward (keeping what the backward needs) + cla_backward
 *     IN:  int64 dtype (4 or 8), B, T, H, Dk, Dv, C; float64 eps; then q, k, v [B,T,H,Dk|Dv],
 *          S0 [B,H,Dk,Dv], z0 [B,H,Dk], dy [B,T,H,Dv], dS [B,H,Dk,Dv], dz [B,H,Dk] in that dtype
 *     OUT: y, S, z, dq, dk, dv, dS0, dz0
 *   kernel_harness step IN OUT        lt_model_token_f32 for n tokens from position 0, zero state
 *     IN:  int64 n_layers, d, n_heads, dk, dv, dff, pre_norm, feature_map, vocab, max_len, n_params,
 *          has_pos, has_norm, B, n; float32 ln_eps, attn_eps, norm_eps; per layer the 12 weights of
 *          FusedModelStep.WEIGHTS; embed, [pos], [norm_w, norm_b], head_w, head_b; int64 tokens [n, B]
 *     OUT: float32 params [n, B, n_params], then S and z of every layer
 * Every read is checked against the file's size; exit status 2 on a short or malformed file. */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "causal_linear.h" /* src/linear_transformers/ops/cpu */
#include "model_step.h"    /* src/linear_transformers/decode */

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
    if ((es != 4 && es != 8) || B < 1 || T < 1 || H < 1 || Dk < 1 || Dv < 1 || C < 1) return 2;
    const size_t nq = B * T * H * Dk, nv = B * T * H * Dv, nS = B * H * Dk * Dv, nz = B * H * Dk;
    const size_t nN = (T + C - 1) / C;
    void *q = take(es * nq), *k = take(es * nq), *v = take(es * nv), *S0 = take(es * nS), *z0 = take(es * nz);
    void *dy = take(es * nv), *dS = take(es * nS), *dz = take(es * nz);
    void *y = malloc(es * nv), *S = malloc(es * nS), *z = malloc(es * nz), *Ss = malloc(es * nS * nN),
         *zs = malloc(es * nz * nN), *den = malloc(es * B * H * T);
    void *dq = malloc(es * nq), *dk = malloc(es * nq), *dv = malloc(es * nv), *dS0 = malloc(es * nS),
         *dz0 = malloc(es * nz);
    int status;
    if (es == 4) {
        status = cla_forward_f32(q, k, v, S0, z0, y, S, z, Ss, zs, den, B, T, H, Dk, Dv, C, eps, 2) ||
                 cla_backward_f32(q, k, v, y, dy, Ss, zs, den, dS, dz, dq, dk, dv, dS0, dz0, B, T, H, Dk, Dv, C, 2);
    } else {
        status = cla_forward_f64(q, k, v, S0, z0, y, S, z, Ss, zs, den, B, T, H, Dk, Dv, C, eps, 2) ||
                 cla_backward_f64(q, k, v, y, dy, Ss, zs, den, dS, dz, dq, dk, dv, dS0, dz0, B, T, H, Dk, Dv, C, 2);
    }
    if (status) return 4;
    put(out, y, es * nv), put(out, S, es * nS), put(out, z, es * nz);
    put(out, dq, es * nq), put(out, dk, es * nq), put(out, dv, es * nv), put(out, dS0, es * nS), put(out, dz0, es * nz);
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

int main(int argc, char **argv) {
    if (argc != 4 || (strcmp(argv[1], "attention") && strcmp(argv[1], "step"))) {
        fprintf(stderr, "usage: kernel_harness attention|step IN OUT\n");
        return 1;
    }
    in = fopen(argv[2], "rb");
    FILE *out = fopen(argv[3], "wb");
    if (!in || !out) return 1;
    const int status = strcmp(argv[1], "attention") ? step(out) : attention(out);
    return fclose(out) || status ? (status ? status : 3) : 0;
}

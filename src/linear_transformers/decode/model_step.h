/* The C interface of the fused generation step (model_step.c), its sampler (mol_sample.c) and the
 * bandwidth probe (read_probe.c): declared once, here. decode/fused.py mirrors lt_model with ctypes
 * and checks its size and field offsets against lt_model_layout when the library loads;
 * tests/native/kernel_harness.c includes this header. */
#ifndef LT_MODEL_STEP_H
#define LT_MODEL_STEP_H

#include <stdint.h>

typedef struct {
    int n_layers, d, n_heads, dk, dv, dff;
    int pre_norm;     /* 1: LN before each sublayer; 0: after the residual add */
    int feature_map;  /* 0: elu(x) + 1, 1: relu(x) */
    int bf16;         /* the four projection weights: 0 float32; 1 bfloat16 (uint16), widened to float32;
                         2 bfloat16, and dot products on bfloat16 pairs (activations rounded to bfloat16,
                         AVX512-BF16 vdpbf16ps, float32 accumulation); 2 needs lt_has_bf16_dot();
                         3 int8, one float32 scale per output row after the matrix (gemv.h), widened to
                         float32 (the row layout at every batch); 4 the same int8 weights times inputs
                         rounded to int8 per block of 32 (int32 sums, gemv.h's gemv_i8dot; row layout);
                         2 and 4 need input widths (d, H dv, dff) divisible by 32 */
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

/* sizeof(lt_model), then the offset of each field in declaration order, into out[0..n): returns the
 * number of values it has (write nothing when n is smaller). */
int lt_model_layout(long *out, int n);

/* Whether this build computes bfloat16 dot products (AVX512-BF16) and whether AMX-BF16 tiles were
 * granted to this process (the batched layout then uses them). */
int lt_has_bf16_dot(void);
int lt_has_amx(void);

/* One step of the model for B tokens at `position`: S[l] [B, H, dk, dv] and z[l] [B, H, dk] advance in
 * place; params [B, n_params] receives the head's output. work: float32 scratch of at least
 * roundup(B, 16) * (H (2 dk + dv) + H dv + dff + 2 d) values. Returns 0, 1 (out of memory) or 2 (a
 * token outside [0, vocab), a position outside [0, max_len), a malformed model or a NULL pointer). */
int lt_model_token_f32(const lt_model *m, int B, const int64_t *tokens, long position, float *const *S,
                       float *const *z, float *work, float *params);

/* n tokens after out[0..B) (the token at `position`): per token a step, then a mixture-of-logistics
 * draw with the caller's random numbers race [n, B, K], u [n, B]; out [(n + 1), B]. *done: tokens
 * finished. Returns lt_model_token_f32's codes, or 3 (the head's parameters were not finite). */
int lt_generate_mol_f32(const lt_model *m, int B, int64_t *out, long position, int n, float *const *S,
                        float *const *z, float *work, float *params, int K, int levels, const float *race,
                        const float *u, int *done);

/* One level per row from a discretised mixture of logistics (see mol_sample.c). */
int lt_mol_sample_f32(int B, int K, int L, const float *params, const float *race, const float *u, int64_t *out);

/* Reads n float32 arrays `passes` times the way the GEMVs read weights (see read_probe.c). */
float lt_read_f32(int n, const float *const *arrays, const long *sizes, int passes);

#endif

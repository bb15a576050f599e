/* The C interface of the fused step for linearised Llama-style models (llama_step.c): declared once,
 * here. decode/llama.py mirrors lt_llama with ctypes and checks its size and field offsets against
 * lt_llama_layout when the library loads. */
#ifndef LT_LLAMA_STEP_H
#define LT_LLAMA_STEP_H

#include <stdint.h>

enum { LT_LINEAR = 0, LT_HYBRID = 1, LT_WINDOW = 2 };        /* attention: linearize.LinearizeConfig.mode */
enum { LT_HEDGEHOG = 0, LT_ELU = 1, LT_RELU = 2 };           /* feature maps */
enum { LT_F32 = 0, LT_BF16 = 1, LT_BF16_DOT = 2, LT_I8 = 3, LT_I8_DOT = 4 }; /* the projections' weight formats */

typedef struct {
    int n_layers, d, n_heads, n_kv_heads, head_dim, dff, vocab;
    int mode;        /* LT_LINEAR, LT_HYBRID or LT_WINDOW */
    int feature_map; /* LT_HEDGEHOG (per head: [softmax(u), softmax(-u)], u = x W_h + b_h), LT_ELU, LT_RELU */
    int n_features;  /* F, the feature width: 2 hh_m for Hedgehog, head_dim for elu/relu */
    int hh_m;        /* Hedgehog's projection width m (0 for the others) */
    int window, sinks;
    int wkind;       /* the seven projections' and the head's format: LT_F32, LT_BF16 (uint16, widened),
                        LT_BF16_DOT (bfloat16 pairs, AVX512-BF16; input widths multiples of 32), LT_I8 (an
                        int8 matrix [out, in] followed by its out float32 scales, widened to float32),
                        LT_I8_DOT (the same int8 weights times inputs rounded to int8 per block of 32:
                        int32 sums, gemv.h; input widths multiples of 32) */
    int amx_rows;    /* LT_BF16_DOT and LT_I8_DOT run on AMX tiles from this many rows on, where the build
                        has them (lt_llama_tiles); 0: never. Same products, sums in another order */
    float rms_eps, attn_eps, rope_scale; /* rope_scale: transformers' attention_scaling (cos and sin) */
    const float *inv_freq;               /* [head_dim / 2]: RoPE's inverse frequencies (the model's buffer) */
    /* per layer, n_layers pointers each (PyTorch layouts: Linear weights [out, in] row-major) */
    const float *const *attn_norm, *const *mlp_norm;                  /* [d] RMSNorm weights */
    const void *const *wq, *const *wk, *const *wv, *const *wo;         /* [H D, d], [Hkv D, d] x 2, [d, H D] */
    const void *const *wg, *const *wu, *const *wd;                     /* [dff, d] x 2, [d, dff] */
    const float *const *bq, *const *bk, *const *bv, *const *bo;        /* biases: NULL (Llama) or per layer */
    /* Hedgehog: weights [H, D, m] in the projections' family (wkind LT_F32: float32; LT_BF16 and
     * LT_BF16_DOT: bfloat16; LT_I8 and LT_I8_DOT: int8 followed by [H, m] float32 scales, one per
     * column), biases [H, m] float32 */
    const void *const *fq_w;
    const float *const *fq_b;
    const void *const *fk_w;
    const float *const *fk_b;
    const float *embed;                                                /* [vocab, d] float32 */
    const float *final_norm;                                           /* [d] */
    const void *head;                                                  /* [vocab, d] in wkind's format */
} lt_llama;

/* sizeof(lt_llama), then each field's offset in declaration order, into out[0..n) (when n is large
 * enough); returns the number of values. */
int lt_llama_layout(long *out, int n);

/* The float32 scratch one call needs for B rows (work_size below must be at least this). */
long lt_llama_work_size(const lt_llama *m, int B);

/* One token for B rows: tokens [B] in [0, vocab), positions [B] >= 0 (RoPE's), seen [B] >= 0 the
 * tokens each row's state holds so far (the same in every layer; rows of a left-padded batch
 * differ). Per layer l, updated in place:
 * S[l] [B, H, F, D] and z[l] [B, H, F] (linear and hybrid; float32), ring_k[l], ring_v[l]
 * [B, Hkv, window, D] (slot position % window) and sink_k[l], sink_v[l] [B, Hkv, sinks, D] (hybrid and
 * window; one per key/value head) - linearize.HybridState's tensors. logits [B, vocab]. Returns 0, 1 (out of memory) or 2 (a
 * size, token, position, count or pointer out of range: nothing is touched). */
int lt_llama_token_f32(const lt_llama *m, int B, const int64_t *tokens, const int64_t *positions, const int64_t *seen,
                       float *const *S, float *const *z, float *const *ring_k, float *const *ring_v,
                       float *const *sink_k, float *const *sink_v, float *work, long work_size, float *logits);

/* One projection as the step computes it (tests, benchmarks): y [B, n_out] = x [B, n_in] W^T (+ bias
 * [n_out] when given), W [n_out, n_in] in format wkind, on the calling thread; on AMX tiles when tiles
 * is 1. Returns 0, or 2 (a size, a pointer or a format out of range, or a format this build, this
 * process or these widths cannot run: nothing written). */
int lt_llama_gemv_f32(int wkind, int tiles, int B, int n_in, int n_out, const void *W, const float *bias,
                      const float *x, float *y);

/* 1 when weight format wkind runs on AMX tiles here: the build has them for it (AMX-BF16 for
 * LT_BF16_DOT, AMX-INT8 for LT_I8_DOT) and Linux granted this process the tile registers; else 0. */
int lt_llama_tiles(int wkind);

/* Next tokens from logits [B, V] (token_sample.c): temperature 0 picks the largest logit; otherwise
 * softmax(logits / temperature) restricted to the top_k most likely (0: no limit) and then to the
 * smallest most likely set holding top_p of the probability (1: no limit), sampled by inverse CDF in
 * index order with u [B] ~ U[0, 1) from the caller. work: 4 V floats, 8-byte aligned (unused at
 * temperature 0).
 * Returns 0, 2 (an argument out of range: nothing written) or 3 (a row's logits hold NaN or +inf,
 * or are all -inf). */
int lt_sample_tokens_f32(int B, long V, const float *logits, float temperature, long top_k, float top_p,
                         const float *u, float *work, long work_size, int64_t *out);

#endif

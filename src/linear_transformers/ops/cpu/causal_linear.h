/* The C interface of the causal linear attention kernel (causal_linear.c, one instance of
 * causal_linear_impl.h per type): declared once, here; ops/cpu/__init__.py binds it with ctypes and
 * tests/native/kernel_harness.c includes it.
 *
 * cla_forward: q, k [B, T, H, Dk], v [B, T, H, Dv] (feature-mapped q and k), initial state S0
 * [B, H, Dk, Dv] and z0 [B, H, Dk] -> out [B, T, H, Dv], the final state S_final, z_final, and (when
 * S_save is not NULL) what the backward needs: the state at each chunk's start S_save, z_save and the
 * normalisers den_save. C is the chunk length. cla_backward: the gradients dq, dk, dv, dS0, dz0 from
 * dout, dS_final and dz_final. n_threads: threads to share B * H among (pthreads).
 * The _bf16 pair takes and returns bfloat16 tensors (their uint16_t bits) with float32 states;
 * its forward's products use bfloat16 operands where the build has AVX512-BF16 (float32
 * elsewhere), its backward's float32; cla_backward_bf16 recomputes the output in float32 from
 * the saved states and does not read `out` (which must still be given).
 * Both return 0, 1 (out of memory) or 2 (a size out of range or a NULL pointer: nothing touched). */
#ifndef LT_CAUSAL_LINEAR_H
#define LT_CAUSAL_LINEAR_H

#include <stdint.h>

int cla_forward_f32(const float *q, const float *k, const float *v, const float *S0, const float *z0, float *out,
                    float *S_final, float *z_final, float *S_save, float *z_save, float *den_save, long B, long Tn,
                    long H, long Dk, long Dv, long C, double eps, int n_threads);
int cla_backward_f32(const float *q, const float *k, const float *v, const float *out, const float *dout,
                     const float *S_save, const float *z_save, const float *den_save, const float *dS_final,
                     const float *dz_final, float *dq, float *dk, float *dv, float *dS0, float *dz0, long B, long Tn,
                     long H, long Dk, long Dv, long C, int n_threads);
int cla_forward_f64(const double *q, const double *k, const double *v, const double *S0, const double *z0,
                    double *out, double *S_final, double *z_final, double *S_save, double *z_save, double *den_save,
                    long B, long Tn, long H, long Dk, long Dv, long C, double eps, int n_threads);
int cla_backward_f64(const double *q, const double *k, const double *v, const double *out, const double *dout,
                     const double *S_save, const double *z_save, const double *den_save, const double *dS_final,
                     const double *dz_final, double *dq, double *dk, double *dv, double *dS0, double *dz0, long B,
                     long Tn, long H, long Dk, long Dv, long C, int n_threads);

/* bfloat16 (uint16_t bits) q, k, v, out, dout, dq, dk, dv; float32 states, normalisers and sums. */
int cla_forward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const float *S0, const float *z0,
                     uint16_t *out, float *S_final, float *z_final, float *S_save, float *z_save, float *den_save,
                     long B, long Tn, long H, long Dk, long Dv, long C, double eps, int n_threads);
int cla_backward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *out,
                      const uint16_t *dout, const float *S_save, const float *z_save, const float *den_save,
                      const float *dS_final, const float *dz_final, uint16_t *dq, uint16_t *dk, uint16_t *dv,
                      float *dS0, float *dz0, long B, long Tn, long H, long Dk, long Dv, long C, int n_threads);

#endif

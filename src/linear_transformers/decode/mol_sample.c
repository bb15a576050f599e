#include "model_step.h"

#include <math.h>
#include <stdint.h>

/* Draw one level per row from a discretised mixture of logistics (heads.MixtureOfLogisticsHead.sample
 * at temperature 1), with the random numbers drawn by the caller so the stream is PyTorch's:
 * params [B, 3K] (K logits, K means, K log-scales), race [B, K] ~ Exp(1), u [B] ~ U(0, 1).
 * Component k = argmax(log_softmax(logits) - log(race)); x = mu_k + s_k (log u - log(1 - u));
 * level = round-half-even((x + 1) (L - 1) / 2) clamped to [0, L - 1].
 * Returns the number of rows whose parameters were not finite (their level is left at 0). */
int lt_mol_sample_f32(int B, int K, int L, const float *params, const float *race, const float *u, int64_t *out) {
    if (B < 0 || K < 1 || L < 2 || !params || !race || !u || !out) return -1; /* a call the caller got wrong */
    int bad = 0;
    for (int b = 0; b < B; b++) {
        const float *p = params + (long)b * 3 * K, *r = race + (long)b * K;
        int finite = 1;
        for (int j = 0; j < 3 * K; j++) finite &= isfinite(p[j]) != 0;
        if (!finite) {
            bad++;
            out[b] = 0;
            continue;
        }
        float top = p[0];
        for (int j = 1; j < K; j++) top = p[j] > top ? p[j] : top;
        float sum = 0;
        for (int j = 0; j < K; j++) sum += expf(p[j] - top);
        const float log_sum = logf(sum);
        int k = 0;
        float best = -INFINITY;
        for (int j = 0; j < K; j++) {
            const float score = (p[j] - top - log_sum) - logf(r[j]);
            if (score > best) best = score, k = j;
        }
        const float log_s = p[2 * K + k] < -7.0f ? -7.0f : p[2 * K + k];
        const float x = p[K + k] + expf(log_s) * (logf(u[b]) - log1pf(-u[b]));
        const float level = nearbyintf((x + 1.0f) * ((float)(L - 1) / 2.0f));
        out[b] = level < 0 ? 0 : level > L - 1 ? L - 1 : (int64_t)level;
    }
    return bad;
}

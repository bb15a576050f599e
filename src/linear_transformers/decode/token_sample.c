/* Next-token sampling from logits in C (temperature, top-k, top-p), for the generation loop of
 * linearised language models (linearize/generate.py): one call per token for every row, after the
 * fused step, instead of a dozen PyTorch operations over the vocabulary.
 *
 * The rule (decode/llama.py's sample_tokens_reference is the same rule in PyTorch, and the tests hold
 * the two to the same token for the same u):
 *   temperature 0: the first index of the largest logit;
 *   otherwise x = logits / temperature, and a token is kept when x >= a threshold t:
 *     top-k (0 < k < V): t_k = the k-th largest x (ties with it are kept);
 *     top-p (p < 1): over the tokens top-k kept, with probabilities softmax(x) among them, the
 *       smallest set of the most likely tokens whose probability reaches p; t_p = the x of the last
 *       one taken (ties with it are kept);
 *     t = max(t_k, t_p);
 *   then, in index order, the first kept token whose running sum of exp(x - max x) exceeds
 *   u * (the sum over the kept tokens), u ~ U[0, 1) drawn by the caller (so the random stream is
 *   PyTorch's generator).
 * Finding t never sorts the vocabulary: top-k selects (quickselect, linear on average), top-p sorts
 * only the most likely candidates, 64 at first, four times as many while they hold less than p. */

#include "llama_step.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int desc(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* The k-th largest of x[0, n) (1 <= k <= n), leaving x[0, k) the k largest (in no order): quickselect. */
static float kth_largest(float *x, long n, long k) {
    long lo = 0, hi = n - 1;
    const long want = k - 1;
    while (lo < hi) {
        const long mid = lo + (hi - lo) / 2;
        float a = x[lo], b = x[mid], c = x[hi]; /* the median of three as the pivot */
        const float pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        long i = lo, j = hi;
        while (i <= j) {
            while (x[i] > pivot) i++;
            while (x[j] < pivot) j--;
            if (i <= j) {
                const float t = x[i];
                x[i++] = x[j];
                x[j--] = t;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            return x[want]; /* between j and i: equal to the pivot */
    }
    return x[want];
}

/* One row: x [V] the scaled logits (finite or -inf, at least one finite), spare [V] scratch. */
static long sample_row(const float *x, long V, long top_k, float top_p, float u, float *spare) {
    float top = -INFINITY;
    for (long i = 0; i < V; i++) top = x[i] > top ? x[i] : top;
    float t = -INFINITY;
    long n_finite = 0;
    for (long i = 0; i < V; i++) n_finite += x[i] > -INFINITY;
    if (top_k > 0 && top_k < n_finite) {
        memcpy(spare, x, sizeof(float) * V);
        t = kth_largest(spare, V, top_k);
    }
    if (top_p < 1.0f) {
        double total = 0;
        for (long i = 0; i < V; i++)
            if (x[i] >= t) total += exp((double)x[i] - top);
        long kept = 0;
        for (long i = 0; i < V; i++)
            if (x[i] >= t) spare[kept++] = x[i]; /* the candidates, compacted */
        for (long m = 64;; m *= 4) {
            if (m > kept) m = kept;
            kth_largest(spare, kept, m);
            qsort(spare, m, sizeof(float), desc);
            double mass = 0;
            long j = 0;
            for (; j < m && mass < top_p * total; j++) mass += exp((double)spare[j] - top);
            if (mass >= top_p * total || m == kept) {
                const float tp = spare[j > 0 ? j - 1 : 0];
                t = tp > t ? tp : t;
                break;
            }
        }
    }
    double total = 0;
    for (long i = 0; i < V; i++)
        if (x[i] >= t) total += exp((double)x[i] - top);
    const double target = (double)u * total;
    double run = 0;
    long last = -1;
    for (long i = 0; i < V; i++)
        if (x[i] >= t) {
            run += exp((double)x[i] - top);
            last = i;
            if (run > target) return i;
        }
    return last; /* (u * total rounded up to the whole sum) */
}

int lt_sample_tokens_f32(int B, long V, const float *logits, float temperature, long top_k, float top_p,
                         const float *u, float *work, long work_size, int64_t *out) {
    if (B < 1 || V < 1 || !logits || !out || !(temperature >= 0) || !isfinite(temperature) || top_k < 0 ||
        !(top_p > 0 && top_p <= 1))
        return 2;
    if (temperature > 0 && (!u || !work || work_size < 2 * V)) return 2;
    for (int b = 0; b < B; b++) {
        if (temperature > 0 && !(u[b] >= 0 && u[b] < 1)) return 2;
        const float *row = logits + (long)b * V;
        int finite = 0;
        for (long i = 0; i < V; i++) {
            if (isnan(row[i]) || row[i] == INFINITY) return 3;
            finite |= row[i] > -INFINITY;
        }
        if (!finite) return 3;
    }
    for (int b = 0; b < B; b++) {
        const float *row = logits + (long)b * V;
        if (temperature == 0) {
            long best = 0;
            for (long i = 1; i < V; i++) best = row[i] > row[best] ? i : best;
            out[b] = best;
            continue;
        }
        float *x = work, *spare = work + V;
        long best = 0;
        for (long i = 0; i < V; i++) {
            x[i] = row[i] / temperature;
            best = row[i] > row[best] ? i : best;
        }
        /* a temperature so small that the largest logit overflows (to +inf, or to -inf when
         * negative): its limit, the most likely token */
        out[b] = isinf(x[best]) ? best : sample_row(x, V, top_k, top_p, u[b], spare);
    }
    return 0;
}

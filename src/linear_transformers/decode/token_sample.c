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
 * Finding t never sorts: top-k and top-p both select (quickselect; for top-p weighted by
 * probability), linear in V on average. */

#include "llama_step.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* top-p's cut among the candidates idx[0, n) (e: their exp(x - max)): the value v with less than
 * `need` of the mass above it and at least `need` at or above it, found by selection (partitions
 * three ways around a pivot, keeping the part the cut is in; linear on average), never a sort. */
static float top_p_cut(const float *x, const double *e, int32_t *idx, long n, double need) {
    long lo = 0, hi = n;
    double above = 0; /* the mass of the candidates already known to lie above [lo, hi) */
    for (;;) {
        const float a = x[idx[lo]], b = x[idx[lo + (hi - lo) / 2]], c = x[idx[hi - 1]];
        const float pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        long gt = lo, i = lo, lt = hi; /* [lo, gt) > pivot, [gt, i) == pivot, [lt, hi) < pivot */
        double m_gt = 0, m_eq = 0;
        while (i < lt) {
            const int32_t j = idx[i];
            if (x[j] > pivot) {
                idx[i++] = idx[gt];
                idx[gt++] = j;
                m_gt += e[j];
            } else if (x[j] < pivot) {
                idx[i] = idx[--lt];
                idx[lt] = j;
            } else {
                m_eq += e[j];
                i++;
            }
        }
        if (above + m_gt >= need && gt > lo) {
            hi = gt;
        } else if (above + m_gt + m_eq >= need || lt >= hi) {
            return pivot; /* (or nothing is left below it: the sums fell short of need by rounding) */
        } else {
            above += m_gt + m_eq;
            lo = lt;
        }
    }
}

/* One row: x [V] the scaled logits (finite or -inf, at least one finite), spare [V] and e [V]
 * scratch. exp(x - max) is computed once per token (e), the sums read it. */
static long sample_row(const float *x, long V, long top_k, float top_p, float u, float *spare, double *e) {
    float top = -INFINITY;
    long n_finite = 0;
    for (long i = 0; i < V; i++) {
        top = x[i] > top ? x[i] : top;
        n_finite += x[i] > -INFINITY;
    }
    float t = -INFINITY;
    if (top_k > 0 && top_k < n_finite) {
        memcpy(spare, x, sizeof(float) * V);
        t = kth_largest(spare, V, top_k);
    }
    double total = 0;
    for (long i = 0; i < V; i++) {
        e[i] = x[i] >= t ? exp((double)x[i] - top) : 0;
        total += e[i];
    }
    if (top_p < 1.0f) {
        int32_t *idx = (int32_t *)spare; /* the candidates' indices */
        long kept = 0;
        for (long i = 0; i < V; i++)
            if (x[i] >= t) idx[kept++] = (int32_t)i;
        const float tp = top_p_cut(x, e, idx, kept, top_p * total);
        if (tp > t) {
            t = tp;
            total = 0;
            for (long i = 0; i < V; i++) total += x[i] >= t ? e[i] : 0;
        }
    }
    const double target = (double)u * total;
    double run = 0;
    long last = -1;
    for (long i = 0; i < V; i++)
        if (x[i] >= t) {
            run += e[i];
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
    if (temperature > 0 && (!u || !work || work_size < 4 * V)) return 2;
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
        double *e = (double *)(work + 2 * V);
        long best = 0;
        for (long i = 0; i < V; i++) {
            x[i] = row[i] / temperature;
            best = row[i] > row[best] ? i : best;
        }
        /* a temperature so small that the largest logit overflows (to +inf, or to -inf when
         * negative): its limit, the most likely token */
        out[b] = isinf(x[best]) ? best : sample_row(x, V, top_k, top_p, u[b], spare, e);
    }
    return 0;
}

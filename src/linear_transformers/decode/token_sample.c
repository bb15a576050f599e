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
 * Finding t never sorts: top-k and top-p first file the candidates into LT_TOP_P_BINS bins by value
 * (one pass: counts, or probability mass), then select (quickselect; for top-p weighted by
 * probability) only among the candidates of the bin where the count reaches k or the mass from the
 * top reaches p: linear in V. exp(x - max) is computed in float64 lanes (vexp_d, within 2 ulp of
 * libm's exp), the sums in float64. */

#include "llama_step.h"
#include "vec.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef double vd __attribute__((vector_size(LT_VBYTES), aligned(8)));
typedef int64_t vl __attribute__((vector_size(LT_VBYTES)));
typedef float vfh __attribute__((vector_size(LT_VBYTES / 2), aligned(4)));
#define VLD LT_VLD

/* exp(x) for x <= 0 (or -inf) in float64 lanes: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts),
 * exp(r) by its Taylor polynomial of degree 13 (truncation < 1e-17 relative), times 2^n built in
 * the exponent bits; 0 below -708 (where 2^n would leave the normal range: such terms cannot
 * change a sum that holds exp(0) = 1). */
static inline vd vexp_d(vd x) {
    const vl under = x < -708.0;
    x = (vd)(((vl)x & ~under) | ((vl)((vd){0} - 708.0) & under));
    const vd shift = (vd){0} + 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to an integer */
    const vd n = (x * 1.4426950408889634 + shift) - shift;
    const vd r = (x - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
    static const double c[14] = {1.0 / 6227020800, 1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880,
                                 1.0 / 40320,      1.0 / 5040,      1.0 / 720,      1.0 / 120,     1.0 / 24,
                                 1.0 / 6,          0.5,             1.0,            1.0};
    vd p = (vd){0} + c[0];
    for (int i = 1; i < 14; i++) p = p * r + c[i];
    const vl bits = (__builtin_convertvector(n, vl) + 1023) << 52;
    return (vd)((vl)(p * (vd)bits) & ~under);
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

/* top-p's cut among the candidates idx[0, n) (e: their exp(x - max)), given `above`, the mass of the
 * candidates above all of them: the value v with less than `need` of the mass above it and at least
 * `need` at or above it, found by selection (partitions three ways around a pivot, keeping the part
 * the cut is in; linear on average), never a sort. */
static float top_p_select(const float *x, const double *e, int32_t *idx, long n, double need, double above) {
    long lo = 0, hi = n;
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

/* top-p's cut among the candidates x >= t (e: their exp(x - top), 0 for the others; at least one):
 * their mass is filed into bins by value (bin 0 holds the largest values: the bin is monotone in x,
 * so each bin's values all lie below those of the bins before it), the bin where the mass from the
 * top first reaches `need` found, and the cut selected among that bin's candidates alone. idx:
 * scratch for V indices. */
#define LT_TOP_P_BINS 4096
static inline int bin_of(float v, float top, float scale) {
    const float f = (top - v) * scale; /* (NaN for inf * 0, past an overflowed range: the last bin) */
    return f < LT_TOP_P_BINS - 1 ? (int)f : LT_TOP_P_BINS - 1;
}

/* The bins' scale for the values x >= floor (top: the largest; *low gets the smallest, top when
 * all are equal). A range too wide for float32 gives 0: every value in bin 0, still exact. */
static float bin_scale(const float *x, long V, float floor, float top, float *low) {
    *low = top;
    for (long i = 0; i < V; i++) *low = x[i] >= floor && x[i] < *low ? x[i] : *low;
    return top > *low ? (LT_TOP_P_BINS - 1) / (top - *low) : 0.0f;
}

/* The k-th largest finite value of x[0, V) (1 <= k < the number of finite values; top: the largest):
 * the values counted into bins (as top_p_cut files them), then selected (kth_largest) among the
 * bin's values only, which spare [V] receives: exactly the k-th largest, without a pass of
 * quickselect over all V. */
static float top_k_cut(const float *x, long V, long k, float top, float *spare) {
    float low;
    const float scale = bin_scale(x, V, -FLT_MAX, top, &low);
    if (!(top > low)) return top;
    long count[LT_TOP_P_BINS] = {0};
    for (long i = 0; i < V; i++)
        if (x[i] >= -FLT_MAX) count[bin_of(x[i], top, scale)]++;
    long above = 0;
    int bin = 0;
    while (above + count[bin] < k) above += count[bin++]; /* (bin < LT_TOP_P_BINS: k < the finite values) */
    long n = 0;
    for (long i = 0; i < V; i++)
        if (x[i] >= -FLT_MAX && bin_of(x[i], top, scale) == bin) spare[n++] = x[i];
    return kth_largest(spare, n, k - above);
}

static float top_p_cut(const float *x, const double *e, long V, float t, float top, int32_t *idx, double need) {
    const float floor = t > -INFINITY ? t : -FLT_MAX; /* (-inf logits hold no mass: never the cut) */
    float low;
    const float scale = bin_scale(x, V, floor, top, &low);
    if (!(top > low)) return top; /* every candidate holds the same value */
    double mass[LT_TOP_P_BINS] = {0};
    for (long i = 0; i < V; i++)
        if (x[i] >= floor) mass[bin_of(x[i], top, scale)] += e[i];
    double above = 0;
    int bin = 0;
    while (bin < LT_TOP_P_BINS - 1 && !(above + mass[bin] >= need)) above += mass[bin++];
    long n = 0;
    for (long i = 0; i < V; i++)
        if (x[i] >= floor && bin_of(x[i], top, scale) == bin) idx[n++] = (int32_t)i;
    if (n == 0) return low; /* (the mass fell short of need by rounding: the lowest candidate) */
    return top_p_select(x, e, idx, n, need, above);
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
    if (top_k > 0 && top_k < n_finite) t = top_k_cut(x, V, top_k, top, spare);
    double total = 0;
    long i = 0;
    {
        vd sums = (vd){0};
        const vd topv = (vd){0} + (double)top;
        const vfh tv = (vfh){0} + t;
        for (; i + VLD <= V; i += VLD) {
            vfh xv;
            memcpy(&xv, x + i, sizeof xv);
            const vl kept = __builtin_convertvector(xv >= tv, vl);
            const vd ev = (vd)((vl)vexp_d(__builtin_convertvector(xv, vd) - topv) & kept);
            memcpy(e + i, &ev, sizeof ev);
            sums += ev;
        }
        double lanes[VLD];
        memcpy(lanes, &sums, sizeof sums);
        for (int l = 0; l < VLD; l++) total += lanes[l];
    }
    for (; i < V; i++) {
        e[i] = x[i] >= t ? exp((double)x[i] - top) : 0;
        total += e[i];
    }
    if (top_p < 1.0f) {
        const float tp = top_p_cut(x, e, V, t, top, (int32_t *)spare, top_p * total);
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

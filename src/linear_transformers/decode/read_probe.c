#include "model_step.h"
#include "vec.h"

#include <math.h>

/* Reads n float32 arrays `passes` times in one parallel region (as lt_generate_mol_f32 runs its steps)
 * and returns the mean of the passes' sums (so no read is optimised away): each thread reads its share
 * of every array as four streams a quarter apart, the way the row-layout GEMVs read weights. For bench
 * generate: what reading the float32 weights alone, once per token, costs for a whole sequence. */
float lt_read_f32(int n, const float *const *arrays, const long *sizes, int passes) {
    if (n < 0 || passes < 1 || (n > 0 && (!arrays || !sizes))) return NAN;
    for (int a = 0; a < n; a++)
        if (sizes[a] < 0 || (sizes[a] > 0 && !arrays[a])) return NAN;
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int pass = 0; pass < passes; pass++) {
            vf acc[4] = {(vf){0}, (vf){0}, (vf){0}, (vf){0}};
            float rest = 0;
            for (int a = 0; a < n; a++) {
                const float *x = arrays[a];
                const long lo = sizes[a] * t / nt, hi = sizes[a] * (t + 1) / nt, q = (hi - lo) / (4 * VLF) * VLF;
                for (long i = 0; i < q; i += VLF)
                    for (int r = 0; r < 4; r++) {
                        __builtin_prefetch((const char *)(x + lo + r * q + i) + LT_AHEAD);
                        acc[r] += vload(x + lo + r * q + i);
                    }
                for (long i = lo + 4 * q; i < hi; i++) rest += x[i];
            }
            total += hsum(acc[0] + acc[1] + acc[2] + acc[3]) + rest; /* every pass counts: none is dead code */
        }
    }
    return total / passes;
}

/* The compile target's vectors, from the compiler's predefined macros (the ISA level's -march
 * flags, see build.py): every kernel sizes its vectors and register tiles from these, so an AVX2
 * build works on 32-byte vectors with tiles that fit 16 registers instead of splitting 64-byte
 * vectors and spilling.
 *
 *   LT_VBYTES  bytes in a vector (64 AVX-512, 32 AVX/AVX2, 16 SSE2/NEON/plain C)
 *   LT_NREGS   vector registers (32 AVX-512 and AArch64, 16 otherwise)
 *   LT_VLF     floats in a vector, LT_VLD doubles (literals: they name the shuffle lists below)
 *
 * Without a SIMD unit the compiler lowers the vector extensions to scalar code (the plain-C
 * fallback): correct everywhere, fast nowhere. */
#ifndef LT_SIMD_H
#define LT_SIMD_H

#if defined(__AVX512F__)
#define LT_VBYTES 64
#define LT_VLF 16
#define LT_VLD 8
#define LT_NREGS 32
#elif defined(__AVX__)
#define LT_VBYTES 32
#define LT_VLF 8
#define LT_VLD 4
#define LT_NREGS 16
#elif defined(__aarch64__)
#define LT_VBYTES 16
#define LT_VLF 4
#define LT_VLD 2
#define LT_NREGS 32
#else
#define LT_VBYTES 16
#define LT_VLF 4
#define LT_VLD 2
#define LT_NREGS 16
#endif

/* Full unrolling of a register tile's loops (constant trip counts): GCC otherwise keeps 32-byte
 * accumulator arrays on the stack; clang unrolls them itself and runs slower when told to. */
#if defined(__GNUC__) && !defined(__clang__)
#define LT_UNROLL _Pragma("GCC unroll 16")
#else
#define LT_UNROLL
#endif

/* Constant two-vector shuffles: GCC >= 12 and clang both have __builtin_shufflevector. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define LT_HAS_SHUFFLEVECTOR 1
#endif

/* Index lists for transposing n x n blocks (n lanes): round w swaps the off-diagonal w x w sub-blocks
 * of vector pairs (i, i + w); LO takes lane c from a (c & w == 0) or b's lane c - w, HI the rest. */
#define LT_TR_LO_16_1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define LT_TR_HI_16_1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define LT_TR_LO_16_2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define LT_TR_HI_16_2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LT_TR_LO_16_4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define LT_TR_HI_16_4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define LT_TR_LO_16_8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define LT_TR_HI_16_8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LT_TR_LO_8_1 0, 8, 2, 10, 4, 12, 6, 14
#define LT_TR_HI_8_1 1, 9, 3, 11, 5, 13, 7, 15
#define LT_TR_LO_8_2 0, 1, 8, 9, 4, 5, 12, 13
#define LT_TR_HI_8_2 2, 3, 10, 11, 6, 7, 14, 15
#define LT_TR_LO_8_4 0, 1, 2, 3, 8, 9, 10, 11
#define LT_TR_HI_8_4 4, 5, 6, 7, 12, 13, 14, 15
#define LT_TR_LO_4_1 0, 4, 2, 6
#define LT_TR_HI_4_1 1, 5, 3, 7
#define LT_TR_LO_4_2 0, 1, 4, 5
#define LT_TR_HI_4_2 2, 3, 6, 7
#define LT_TR_LO_2_1 0, 2
#define LT_TR_HI_2_1 1, 3

/* AMX tiles (LT_AMX, builds with AMX-TILE and AMX-BF16): Linux hands out the tile registers on request
 * (arch_prctl), asked once per process (amx_enable: 1 granted, 0 refused); each thread configures
 * its own tiles (amx_configure) and releases them (_tile_release) when done. Palette 1, five tiles:
 * 0-1 two 16 x 16 blocks of C (float32, or int32 for int8), 2-3 A (16 rows of 32 inputs: 64 bytes of
 * bfloat16 or 32 of int8), 4 B (the same 32 inputs of 16 columns, in pairs (bfloat16: 16 rows of the
 * tile) or fours (int8: 8 rows)). */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LT_AMX 1

static int lt_amx_state = -1; /* -1 unknown, 0 refused, 1 granted */

static inline int amx_enable(void) {
    if (lt_amx_state < 0) {
        unsigned long mask = 0;
        lt_amx_state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 &&
                       syscall(SYS_arch_prctl, 0x1022 /* ARCH_GET_XCOMP_PERM */, &mask) == 0 && (mask >> 18) & 1;
    }
    return lt_amx_state;
}

static inline void amx_configure(int int8) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 5; t++) c.rows[t] = 16, c.colsb[t] = 64;
    if (int8) c.colsb[2] = c.colsb[3] = 32, c.rows[4] = 8;
    _tile_loadconfig(&c);
}
#endif

#endif

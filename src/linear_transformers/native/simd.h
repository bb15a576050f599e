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

#endif

/* Fused frame codec for the asym-group scheme: one pass over the cache per layer.
 *
 * encode_frame: gather each kept token's K/V rows, (optionally) rotate them with a fast
 * Walsh-Hadamard transform (block-diagonal: one block per power of two in head_dim, as
 * quant.rotate), quantize group-wise, pack the codes and write the frame body
 * (tier map + sections) straight into the caller's buffer.
 * decode_frame: the reverse, writing the kept slots into [H, kept, D] output tensors.
 *
 * The arithmetic mirrors the torch reference in quant.py operation by operation (same order,
 * same IEEE float32 roundings, no FMA contraction: build with -ffp-contract=off), so both paths
 * produce identical bytes; the tests check it. Bounds: the caller checks the frame's size
 * against its tier map before calling; these functions check it again and never read or write
 * outside the buffers they are given. The GIL is released while they run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "_xxh3.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the wire format is little endian; this build assumes a little-endian CPU"
#endif

#if defined(__x86_64__)
#include <immintrin.h>
static inline void relax(void) { _mm_pause(); }
#else
static inline void relax(void) {}
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { T_DROP = 0, T_INT2 = 1, T_INT4 = 2, T_INT8 = 3, T_FP16 = 4 };
static const int STORED[4] = {T_FP16, T_INT8, T_INT4, T_INT2};
static const int BITS[5] = {0, 2, 4, 8, 16};
#define FP16_MAX 65504.0f
/* A group holding a NaN is written as scale = minimum = this quiet NaN and codes 0 (the
 * reference's canonical bytes, whatever the NaN's payload), so it decodes to NaN. */
#define FP16_NAN 0x7e00
#define MAX_THREADS 64
#define MAX_HEAD_DIM 4096


/* ---- scalar conversions (round to nearest even, like torch) ---- */

static inline float h2f(uint16_t h) {
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
}

static inline uint16_t f2h(float f) {
    _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, 2);
    return h;
}

static inline float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline int dtype_size(int dt) { return dt == DT_F32 ? 4 : 2; }

/* ---- row kernels ---- */

static void load_row(const void *src, int dt, int d, float *out) {
    if (dt == DT_F32) {
        memcpy(out, src, (size_t)d * 4);
    } else if (dt == DT_F16) {
        const _Float16 *s = (const _Float16 *)src;
        for (int i = 0; i < d; i++) out[i] = (float)s[i];
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (int i = 0; i < d; i++) out[i] = bf2f(s[i]);
    }
}

static void store_row(const float *x, int dt, int d, void *dst) {
    if (dt == DT_F32) {
        memcpy(dst, x, (size_t)d * 4);
    } else if (dt == DT_F16) {
        _Float16 *o = (_Float16 *)dst;
        for (int i = 0; i < d; i++) o[i] = (_Float16)x[i];
    } else {
        uint16_t *o = (uint16_t *)dst;
        for (int i = 0; i < d; i++) o[i] = f2bf(x[i]);
    }
}

/* 1/sqrt(b) for each power-of-two Hadamard block size b = 2^k, rounded to float from double
 * exactly as quant.fwht scales (filled by PyInit__codec). */
static float block_norm[13];

/* Orthonormal Sylvester-Hadamard transform of one block of b (a power of two) floats in place;
 * the same butterflies, in the same order, as quant.fwht. */
static void fwht_block(float *x, int b) {
    for (int h = 1; h < b; h *= 2) {
        for (int i = 0; i < b; i += 2 * h) {
            for (int j = i; j < i + h; j++) {
                float a = x[j], c = x[j + h];
                x[j] = a + c;
                x[j + h] = a - c;
            }
        }
    }
    const float norm = block_norm[__builtin_ctz((unsigned)b)];
    for (int i = 0; i < b; i++) x[i] = x[i] * norm;
}

/* The codec's rotation of a d-float row (quant.rotate, Geometry.blocks): fwht_block on each
 * power-of-two block of d, largest first (96 = 64 + 32); one block when d is a power of two. */
static void fwht(float *x, int d) {
    for (int at = 0; at < d;) {
        const int b = 1 << (31 - __builtin_clz((unsigned)(d - at)));
        fwht_block(x + at, b);
        at += b;
    }
}

static void quantize_row(float *x, int d, int g, int bits, uint8_t *codes, uint16_t *scale,
                             uint16_t *minimum) {
    const float levels = (float)((1 << bits) - 1);
    uint8_t q[MAX_HEAD_DIM];
    for (int i = 0; i < d; i++) {
        float v = x[i];
        v = v < -FP16_MAX ? -FP16_MAX : v;
        x[i] = v > FP16_MAX ? FP16_MAX : v;
    }
    for (int k = 0; k < d / g; k++) {
        const float *xg = x + k * g;
        float lo = xg[0], hi = xg[0];
        int has_nan = xg[0] != xg[0];
        for (int i = 1; i < g; i++) {
            lo = xg[i] < lo ? xg[i] : lo;
            hi = xg[i] > hi ? xg[i] : hi;
            has_nan |= xg[i] != xg[i];
        }
        uint16_t mn16 = has_nan ? FP16_NAN : f2h(lo);
        float mn = h2f(mn16);
        float sc = (hi - mn) / levels;
        sc = sc > FP16_MAX ? FP16_MAX : sc;
        uint16_t sc16 = has_nan ? FP16_NAN : f2h(sc);
        float s = h2f(sc16);
        if (!(s > 0.0f)) s = 1.0f;
        const float inv = 1.0f / s;
        for (int i = 0; i < g; i++) {
            float c = rintf((xg[i] - mn) * inv);
            c = c > 0.0f ? c : 0.0f; /* also maps NaN to 0 */
            c = c < levels ? c : levels;
            q[k * g + i] = (uint8_t)c;
        }
        scale[k] = sc16;
        minimum[k] = mn16;
    }
    if (bits == 8) {
        memcpy(codes, q, (size_t)d);
    } else {
        const int per = 8 / bits;
        for (int j = 0; j < d / per; j++) {
            uint8_t b = 0;
            for (int p = 0; p < per; p++) b |= (uint8_t)(q[j * per + p] << (bits * p));
            codes[j] = b;
        }
    }
}

static void dequantize_row(const uint8_t *codes, const uint16_t *scale,
                               const uint16_t *minimum, int d, int g, int bits, float *x) {
    const int per = 8 / bits, mask = (1 << bits) - 1;
    for (int k = 0; k < d / g; k++) {
        float s = h2f(scale[k]), mn = h2f(minimum[k]);
        for (int i = k * g; i < (k + 1) * g; i++) {
            int c = bits == 8 ? codes[i] : (codes[i / per] >> (bits * (i % per))) & mask;
            float v = (float)c * s;
            x[i] = v + mn;
        }
    }
}

/* One row (one token, one head) end to end: quantized bytes <-> 16-bit values. */
#define ENCODE_ARGS                                                                            \
    const void *src, int dt, int d, int g, int bits, int rotate, uint8_t *codes, \
        uint16_t *scale, uint16_t *minimum
#define DECODE_ARGS                                                                         \
    const uint8_t *codes, const uint16_t *scale, const uint16_t *minimum, int d, int g,     \
        int bits, int rotate, void *dst, int dt

typedef void (*EncodeRow)(ENCODE_ARGS);
typedef void (*DecodeRow)(DECODE_ARGS);

static void encode_row_scalar(ENCODE_ARGS) {
    float x[MAX_HEAD_DIM];
    load_row(src, dt, d, x);
    if (rotate) fwht(x, d);
    quantize_row(x, d, g, bits, codes, scale, minimum);
}

static void decode_row_scalar(DECODE_ARGS) {
    float x[MAX_HEAD_DIM];
    dequantize_row(codes, scale, minimum, d, g, bits, x);
    if (rotate) fwht(x, d);
    store_row(x, dt, d, dst);
}

/* ---- AVX2 + F16C + FMA row kernels (x86-64), used when head_dim % 16 == 0 and group % 8 == 0.
 * Same operations as the scalar kernels above, eight lanes at a time. ---- */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,f16c,fma")))
#define HAVE_AVX2_KERNELS 1

AVX2 static void load_row_avx2(const void *src, int dt, int d, float *out) {
    if (dt == DT_F32) {
        memcpy(out, src, (size_t)d * 4);
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    for (int i = 0; i < d; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(s + i));
        __m256 v = dt == DT_F16
                       ? _mm256_cvtph_ps(h)
                       : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        _mm256_storeu_ps(out + i, v);
    }
}

AVX2 static void store_row_avx2(const float *x, int dt, int d, void *dst) {
    if (dt == DT_F32) {
        memcpy(dst, x, (size_t)d * 4);
        return;
    }
    uint16_t *o = (uint16_t *)dst;
    for (int i = 0; i < d; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m128i h;
        if (dt == DT_F16) {
            h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
        } else { /* bfloat16, round to nearest even, NaN -> 0x7fc0 (as torch's scalar path) */
            __m256i u = _mm256_castps_si256(v);
            __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
            __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
            r = _mm256_srli_epi32(r, 16);
            __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
            h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        }
        _mm_storeu_si128((__m128i *)(o + i), h);
    }
}

#define INLINE inline __attribute__((always_inline))
#define MAXV (MAX_HEAD_DIM / 8)

/* One Hadamard block of nv (a power of two) vectors of 8 floats, held in v[] (registers, once
 * the specialised callers below fix nv). Butterflies h = 1, 2, 4 run inside each vector (lane j gets a + b, lane j + h
 * gets a - b, exactly as the scalar loop), then h >= 8 across vectors. */
AVX2 static INLINE void fwht_block_regs(__m256 *v, const int nv) {
    const __m256 sign1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
    const __m256 sign2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
    const __m256 sign4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
#pragma GCC unroll 64
    for (int i = 0; i < nv; i++) {
        __m256 x = v[i];
        x = _mm256_fmadd_ps(x, sign1, _mm256_permute_ps(x, 0xB1));
        x = _mm256_fmadd_ps(x, sign2, _mm256_permute_ps(x, 0x4E));
        v[i] = _mm256_fmadd_ps(x, sign4, _mm256_permute2f128_ps(x, x, 0x01));
    }
    /* a counted loop (not h *= 2) so that GCC unrolls it and v[] stays in registers */
    const int stages = __builtin_ctz((unsigned)nv);
#pragma GCC unroll 16
    for (int st = 0; st < stages; st++) {
        const int h = 1 << st;
#pragma GCC unroll 64
        for (int i = 0; i < nv; i += 2 * h) {
#pragma GCC unroll 64
            for (int j = i; j < i + h; j++) {
                __m256 a = v[j], b = v[j + h];
                v[j] = _mm256_add_ps(a, b);
                v[j + h] = _mm256_sub_ps(a, b);
            }
        }
    }
    const __m256 n8 = _mm256_set1_ps(block_norm[3 + __builtin_ctz((unsigned)nv)]);
#pragma GCC unroll 64
    for (int i = 0; i < nv; i++) v[i] = _mm256_mul_ps(v[i], n8);
}

/* fwht on a row of nv vectors: fwht_block_regs on each power-of-two block of nv, largest
 * first (nv is a multiple of 2 here: head_dim % 16 == 0, so every block holds >= 16 floats). */
AVX2 static INLINE void fwht_regs(__m256 *v, const int nv) {
    if ((nv & (nv - 1)) == 0) { /* one block; folds away in the specialised kernels */
        fwht_block_regs(v, nv);
        return;
    }
    for (int at = 0; at < nv;) {
        const int b = 1 << (31 - __builtin_clz((unsigned)(nv - at)));
        fwht_block_regs(v + at, b);
        at += b;
    }
}

AVX2 static INLINE float hmin8(__m256 v) {
    __m128 a = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_min_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_min_ss(a, _mm_shuffle_ps(a, a, 1)));
}

AVX2 static INLINE float hmax8(__m256 v) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_max_ss(a, _mm_shuffle_ps(a, a, 1)));
}

/* Unrounded codes held as floats in v[] (nv = d / 8 vectors) -> packed bytes, low bits first.
 * The conversion rounds to nearest even (the MXCSR default), as the reference's rint. The clamp
 * to [0, 2^bits - 1] happens here, on integers: the packs saturate below 0 and above 255, a byte
 * minimum does the rest. Exact for every finite input: a code is never above about twice
 * 2^bits - 1 (the FP16-rounded scale is at least half the exact one, subnormals included), far
 * below where the 16-bit pack would wrap; NaN converts to INT_MIN, which saturates to 0. */
AVX2 static INLINE void pack_codes(const __m256 *v, const int d, int bits, uint8_t *codes) {
    const int nv = d / 8;
    uint8_t q[MAX_HEAD_DIM] __attribute__((aligned(32)));
    uint8_t *dst = bits == 8 ? codes : q;
    const __m256i top = _mm256_set1_epi8((char)((1 << bits) - 1));
    int i = 0;
#pragma GCC unroll 16
    for (; i + 4 <= nv; i += 4) {
        __m256i a = _mm256_packus_epi32(_mm256_cvtps_epi32(v[i]), _mm256_cvtps_epi32(v[i + 1]));
        __m256i b = _mm256_packus_epi32(_mm256_cvtps_epi32(v[i + 2]), _mm256_cvtps_epi32(v[i + 3]));
        __m256i c = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, b),
                                                _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(dst + 8 * i), _mm256_min_epu8(c, top));
    }
    for (; i < nv; i++) {
        __m256i ci = _mm256_cvtps_epi32(v[i]);
        __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(ci), _mm256_extracti128_si256(ci, 1));
        w = _mm_min_epu8(_mm_packus_epi16(w, w), _mm256_castsi256_si128(top));
        _mm_storel_epi64((__m128i *)(dst + 8 * i), w);
    }
    if (bits == 8) return; /* already written to codes */
    if (bits == 4) { /* byte j = c[2j] | c[2j+1] << 4 */
        const __m128i w = _mm_set1_epi16(0x1001);
#pragma GCC unroll 64
        for (int j = 0; j < d / 2; j += 8) {
            __m128i p = _mm_maddubs_epi16(_mm_load_si128((const __m128i *)(q + 2 * j)), w);
            _mm_storel_epi64((__m128i *)(codes + j), _mm_packus_epi16(p, p));
        }
    } else { /* byte j = c[4j] | c[4j+1] << 2 | c[4j+2] << 4 | c[4j+3] << 6 */
        const __m128i w2 = _mm_set1_epi16(0x0401), w4 = _mm_set1_epi32(0x00100001);
#pragma GCC unroll 64
        for (int j = 0; j < d / 4; j += 4) {
            __m128i p = _mm_maddubs_epi16(_mm_load_si128((const __m128i *)(q + 4 * j)), w2);
            __m128i b = _mm_madd_epi16(p, w4);
            b = _mm_packus_epi16(_mm_packus_epi32(b, b), b);
            uint32_t word = (uint32_t)_mm_cvtsi128_si32(b);
            memcpy(codes + j, &word, 4);
        }
    }
}

AVX2 static INLINE void encode_impl(__m256 *v, const int d, const int g, const void *src, int dt,
                                    int bits, int rotate, uint8_t *codes,
                                    uint16_t *scale, uint16_t *minimum) {
    const int nv = d / 8, gv = g / 8;
    const uint16_t *s16 = (const uint16_t *)src;
#pragma GCC unroll 64
    for (int i = 0; i < nv; i++) {
        if (dt == DT_F32) {
            v[i] = _mm256_loadu_ps((const float *)src + 8 * i);
        } else {
            __m128i h = _mm_loadu_si128((const __m128i *)(s16 + 8 * i));
            v[i] = dt == DT_F16
                       ? _mm256_cvtph_ps(h)
                       : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
    }
    if (rotate) fwht_regs(v, nv);
    const __m256 top = _mm256_set1_ps(FP16_MAX), bottom = _mm256_set1_ps(-FP16_MAX);
    const float levels = (float)((1 << bits) - 1);
    for (int k = 0; k < nv / gv; k++) {
        __m256 unord = _mm256_setzero_ps(); /* NaN lanes: the clamp maps NaN to -FP16_MAX */
#pragma GCC unroll 64
        for (int i = k * gv; i < (k + 1) * gv; i++) {
            unord = _mm256_or_ps(unord, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
            v[i] = _mm256_min_ps(_mm256_max_ps(v[i], bottom), top);
        }
        __m256 lo = v[k * gv], hi = lo;
#pragma GCC unroll 64
        for (int i = 1; i < gv; i++) {
            lo = _mm256_min_ps(lo, v[k * gv + i]);
            hi = _mm256_max_ps(hi, v[k * gv + i]);
        }
        const int has_nan = _mm256_movemask_ps(unord) != 0;
        uint16_t mn16 = has_nan ? FP16_NAN : f2h(hmin8(lo));
        float mn = h2f(mn16);
        float sc = (hmax8(hi) - mn) / levels;
        sc = sc > FP16_MAX ? FP16_MAX : sc;
        uint16_t sc16 = has_nan ? FP16_NAN : f2h(sc);
        float s = h2f(sc16);
        if (!(s > 0.0f)) s = 1.0f;
        scale[k] = sc16;
        minimum[k] = mn16;
        const __m256 mv = _mm256_set1_ps(mn), sv = _mm256_set1_ps(1.0f / s);
#pragma GCC unroll 64
        for (int i = k * gv; i < (k + 1) * gv; i++) {
            v[i] = _mm256_mul_ps(_mm256_sub_ps(v[i], mv), sv); /* pack_codes rounds, clamps */
        }
    }
    pack_codes(v, d, bits, codes);
}

/* Codes of one row -> code * scale + minimum in v[] (nv = d / 8 vectors); scale and minimum per
 * group, already widened to float32. */
AVX2 static INLINE void dequantize_regs(__m256 *v, const int d, const int g, const uint8_t *codes,
                                        const float *scale, const float *minimum, int bits) {
    const int nv = d / 8, gv = g / 8;
    const __m256i shift4 = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    const __m256i shift2 = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m128i dup4 = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i dup2 = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    for (int k = 0; k < nv / gv; k++) {
        const __m256 sv = _mm256_broadcast_ss(scale + k), mv = _mm256_broadcast_ss(minimum + k);
#pragma GCC unroll 64
        for (int i = k * gv; i < (k + 1) * gv; i++) {
            __m256i ci;
            if (bits == 8) {
                ci = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8 * i)));
            } else if (bits == 4) {
                uint32_t raw;
                memcpy(&raw, codes + 4 * i, 4);
                __m128i b = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)raw), dup4);
                ci = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), shift4), mask);
            } else {
                uint16_t raw;
                memcpy(&raw, codes + 2 * i, 2);
                __m128i b = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)raw), dup2);
                ci = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), shift2), mask);
            }
            /* one rounding, as the reference's two: code * scale is exact in float32
             * (<= 8-bit code times an FP16 scale, at most 19 significant bits) */
            v[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ci), sv, mv);
        }
    }
}

/* v[] (nv vectors, nv even) -> dst in dt. bfloat16 rounds to nearest even; NaN lanes become
 * 0x7fc0 (rounding alone could carry a NaN payload into the sign bit: -0.0), unless `finite`
 * says there are none: values decoded with finite FP16 scales and minima are finite
 * (|code * scale + minimum| < 2^25, and the rotation only sums such values). */
AVX2 static INLINE void store_regs(const __m256 *v, const int nv, void *dst, int dt, int finite) {
    if (dt == DT_F32) {
#pragma GCC unroll 64
        for (int i = 0; i < nv; i++) _mm256_storeu_ps((float *)dst + 8 * i, v[i]);
        return;
    }
    uint16_t *o = (uint16_t *)dst;
    if (dt == DT_F16) {
#pragma GCC unroll 64
        for (int i = 0; i < nv; i++)
            _mm_storeu_si128((__m128i *)(o + 8 * i),
                             _mm256_cvtps_ph(v[i], _MM_FROUND_TO_NEAREST_INT));
        return;
    }
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff);
#pragma GCC unroll 64
    for (int i = 0; i < nv; i += 2) {
        __m256i r[2];
#pragma GCC unroll 2
        for (int j = 0; j < 2; j++) {
            __m256i u = _mm256_castps_si256(v[i + j]);
            __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
            r[j] = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, half), lsb), 16);
            if (!finite) {
                __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v[i + j], v[i + j], _CMP_UNORD_Q));
                r[j] = _mm256_blendv_epi8(r[j], _mm256_set1_epi32(0x7fc0), nan);
            }
        }
        /* the pack interleaves 128-bit lanes; the permute puts them back in order */
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xD8);
        _mm256_storeu_si256((__m256i *)(o + 8 * i), packed);
    }
}

/* Whether n FP16 values are all finite. */
static inline int fp16_finite(const uint16_t *x, int n) {
    int ok = 1;
    for (int k = 0; k < n; k++) ok &= (x[k] & 0x7c00) != 0x7c00;
    return ok;
}

/* Any row, with runtime sizes: rows left over after whole blocks, and (head_dim, group) pairs
 * without a specialised block kernel below. */
AVX2 static void encode_row_any(ENCODE_ARGS) {
    __m256 v[MAXV];
    encode_impl(v, d, g, src, dt, bits, rotate, codes, scale, minimum);
}
AVX2 static void decode_row_any(DECODE_ARGS) {
    __m256 v[MAXV];
    float sc[MAX_HEAD_DIM], mn[MAX_HEAD_DIM];
    for (int k = 0; k < d / g; k++) sc[k] = h2f(scale[k]), mn[k] = h2f(minimum[k]);
    dequantize_regs(v, d, g, codes, sc, mn, bits);
    if (rotate) fwht_regs(v, d / 8);
    store_regs(v, d / 8, dst, dt, fp16_finite(scale, d / g) && fp16_finite(minimum, d / g));
}


/* Eight groups at once: the per-group parameter arithmetic (FP16 rounding of min and scale,
 * 1/scale) is a long latency chain, so it runs for 8 groups (8 / (D/G) rows) together in one
 * vector while the rows wait in `scratch` (L1). Needs D/G in {1, 2, 4, 8}; the scale/minimum
 * entries of the block's rows are contiguous (row-major over (row, group)). */
#define BLOCK_GROUPS 8

AVX2 static INLINE __m256 min_or_max(__m256 x, __m256 y, const int take_max) {
    return take_max ? _mm256_max_ps(x, y) : _mm256_min_ps(x, y);
}

/* Lane k of the result: the minimum (take_max: maximum) of the 8 lanes of a[k], for 8 vectors
 * at once (NaN-free inputs). */
AVX2 static INLINE __m256 reduce8(const __m256 *a, const int take_max) {
    __m256 b[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++)
        b[k] = min_or_max(_mm256_permute2f128_ps(a[k], a[k + 4], 0x20),
                          _mm256_permute2f128_ps(a[k], a[k + 4], 0x31), take_max);
    __m256 c[2];
#pragma GCC unroll 2
    for (int k = 0; k < 2; k++)
        c[k] = min_or_max(_mm256_unpacklo_ps(b[2 * k], b[2 * k + 1]),
                          _mm256_unpackhi_ps(b[2 * k], b[2 * k + 1]), take_max);
    return min_or_max(_mm256_shuffle_ps(c[0], c[1], 0x44), _mm256_shuffle_ps(c[0], c[1], 0xEE),
                      take_max);
}

AVX2 static INLINE void encode_block_impl(__m256 *v, const int d, const int g,
                                          const void *const *src, int dt, int bits, int rotate,
                                          uint8_t *codes, uint16_t *scale,
                                          uint16_t *minimum) {
    const int nv = d / 8, gv = g / 8, ng = d / g, rows = BLOCK_GROUPS / ng;
    float scratch[BLOCK_GROUPS * 128] __attribute__((aligned(32)));
    __m256 lo8[BLOCK_GROUPS], hi8[BLOCK_GROUPS];
    const __m256 top = _mm256_set1_ps(FP16_MAX), bottom = _mm256_set1_ps(-FP16_MAX);
    __m256 sum = _mm256_setzero_ps();
    for (int r = 0; r < rows; r++) {
        const uint16_t *s16 = (const uint16_t *)src[r];
#pragma GCC unroll 64
        for (int i = 0; i < nv; i++) {
            if (dt == DT_F32) {
                v[i] = _mm256_loadu_ps((const float *)src[r] + 8 * i);
            } else {
                __m128i h = _mm_loadu_si128((const __m128i *)(s16 + 8 * i));
                v[i] = dt == DT_F16
                           ? _mm256_cvtph_ps(h)
                           : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            }
        }
        if (rotate) fwht_regs(v, nv);
#pragma GCC unroll 8
        for (int k = 0; k < ng; k++) {
            __m256 l = v[k * gv], u = l;
            sum = _mm256_add_ps(sum, l);
            _mm256_store_ps(scratch + r * d + 8 * k * gv, l);
#pragma GCC unroll 64
            for (int i = k * gv + 1; i < (k + 1) * gv; i++) {
                l = _mm256_min_ps(l, v[i]);
                u = _mm256_max_ps(u, v[i]);
                sum = _mm256_add_ps(sum, v[i]);
                _mm256_store_ps(scratch + r * d + 8 * i, v[i]);
            }
            lo8[r * ng + k] = l;
            hi8[r * ng + k] = u;
        }
    }
    __m256 lo = reduce8(lo8, 0), hi = reduce8(hi8, 1);
    /* Values are clamped to the FP16 range before quantizing. The sum is finite only when no
     * value is NaN or infinite; then the clamp changes nothing unless lo or hi is out of range. */
    const __m256 in_range = _mm256_and_ps(
        _mm256_and_ps(_mm256_cmp_ps(lo, bottom, _CMP_GE_OQ), _mm256_cmp_ps(hi, top, _CMP_LE_OQ)),
        _mm256_cmp_ps(_mm256_sub_ps(sum, sum), _mm256_setzero_ps(), _CMP_EQ_OQ));
    const int clamp = _mm256_movemask_ps(in_range) != 0xFF;
    if (clamp) { /* rare: clamp every value and take min and max again; a group holding a NaN
                  * (which the clamp maps to -FP16_MAX) gets NaN for both */
        int32_t nan_group[BLOCK_GROUPS];
        for (int gi = 0; gi < BLOCK_GROUPS; gi++) {
            float *x = scratch + gi * g;
            __m256 l = _mm256_set1_ps(INFINITY), u = _mm256_set1_ps(-INFINITY);
            __m256 n = _mm256_setzero_ps();
            for (int i = 0; i < gv; i++) {
                __m256 c = _mm256_load_ps(x + 8 * i);
                n = _mm256_or_ps(n, _mm256_cmp_ps(c, c, _CMP_UNORD_Q));
                c = _mm256_min_ps(_mm256_max_ps(c, bottom), top);
                _mm256_store_ps(x + 8 * i, c);
                l = _mm256_min_ps(l, c);
                u = _mm256_max_ps(u, c);
            }
            lo8[gi] = l;
            hi8[gi] = u;
            nan_group[gi] = _mm256_movemask_ps(n) ? -1 : 0;
        }
        const __m256 nan_lanes =
            _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)nan_group));
        const __m256 qnan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)); /* -> FP16_NAN */
        lo = _mm256_blendv_ps(reduce8(lo8, 0), qnan, nan_lanes);
        hi = _mm256_blendv_ps(reduce8(hi8, 1), qnan, nan_lanes);
    }
    const float levels = (float)((1 << bits) - 1);
    __m128i mn16 = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT);
    __m256 mn = _mm256_cvtph_ps(mn16);
    __m256 sc = _mm256_div_ps(_mm256_sub_ps(hi, mn), _mm256_set1_ps(levels));
    sc = _mm256_min_ps(top, sc);
    __m128i sc16 = _mm256_cvtps_ph(sc, _MM_FROUND_TO_NEAREST_INT);
    __m256 sf = _mm256_cvtph_ps(sc16);
    sf = _mm256_blendv_ps(_mm256_set1_ps(1.0f), sf,
                          _mm256_cmp_ps(sf, _mm256_setzero_ps(), _CMP_GT_OQ));
    __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), sf);
    _mm_storeu_si128((__m128i *)scale, sc16);
    _mm_storeu_si128((__m128i *)minimum, mn16);
    float mns[BLOCK_GROUPS] __attribute__((aligned(32)));
    float invs[BLOCK_GROUPS] __attribute__((aligned(32)));
    _mm256_store_ps(mns, mn);
    _mm256_store_ps(invs, inv);
    const size_t code_row = (size_t)d * bits / 8;
    for (int r = 0; r < rows; r++) {
#pragma GCC unroll 8
        for (int k = 0; k < ng; k++) {
            const __m256 mv = _mm256_set1_ps(mns[r * ng + k]);
            const __m256 iv = _mm256_set1_ps(invs[r * ng + k]);
#pragma GCC unroll 64
            for (int i = k * gv; i < (k + 1) * gv; i++) {
                __m256 c = _mm256_load_ps(scratch + r * d + 8 * i);
                v[i] = _mm256_mul_ps(_mm256_sub_ps(c, mv), iv); /* pack_codes rounds, clamps */
            }
        }
        pack_codes(v, d, bits, codes + r * code_row);
    }
}

/* The reverse for a block of 8 groups: their FP16 scales and minima widened in one vector each
 * (not one scalar conversion per row, on the row's critical path), then row by row. */
AVX2 static INLINE void decode_block_impl(__m256 *v, const int d, const int g,
                                          const uint8_t *codes, const uint16_t *scale,
                                          const uint16_t *minimum, int bits, int rotate,
                                          void *const *dst, int dt) {
    const int nv = d / 8, ng = d / g, rows = BLOCK_GROUPS / ng;
    float sc[BLOCK_GROUPS] __attribute__((aligned(32)));
    float mn[BLOCK_GROUPS] __attribute__((aligned(32)));
    const __m128i s16 = _mm_loadu_si128((const __m128i *)scale);
    const __m128i m16 = _mm_loadu_si128((const __m128i *)minimum);
    _mm256_store_ps(sc, _mm256_cvtph_ps(s16));
    _mm256_store_ps(mn, _mm256_cvtph_ps(m16));
    const __m128i exp = _mm_set1_epi16(0x7c00); /* all-ones exponent: infinity or NaN */
    const __m128i inf_nan = _mm_or_si128(_mm_cmpeq_epi16(_mm_and_si128(s16, exp), exp),
                                         _mm_cmpeq_epi16(_mm_and_si128(m16, exp), exp));
    const int finite = _mm_testz_si128(inf_nan, inf_nan);
    const size_t code_row = (size_t)d * bits / 8;
    for (int r = 0; r < rows; r++) {
        dequantize_regs(v, d, g, codes + r * code_row, sc + r * ng, mn + r * ng, bits);
        if (rotate) fwht_regs(v, nv);
        store_regs(v, nv, dst[r], dt, finite);
    }
}

typedef void (*EncodeBlock)(const void *const *src, int dt, int bits, int rotate,
                            uint8_t *codes, uint16_t *scale, uint16_t *minimum);
typedef void (*DecodeBlock)(const uint8_t *codes, const uint16_t *scale, const uint16_t *minimum,
                            int bits, int rotate, void *const *dst, int dt);

/* Specialisations for the common (head_dim, group) pairs keep a row in registers; any other
 * shape runs the same code with runtime sizes. */
#define SPECIALISE(D, G)                                                                        \
    AVX2 static void encode_block_##D##_##G(const void *const *src, int dt, int bits,           \
                                            int rotate, uint8_t *codes,             \
                                            uint16_t *scale, uint16_t *minimum) {               \
        __m256 v[(D) / 8];                                                                      \
        encode_block_impl(v, D, G, src, dt, bits, rotate, codes, scale, minimum);         \
    }                                                                                           \
    AVX2 static void decode_block_##D##_##G(const uint8_t *codes, const uint16_t *scale,       \
                                            const uint16_t *minimum, int bits, int rotate,      \
                                            void *const *dst, int dt) {             \
        __m256 v[(D) / 8];                                                                      \
        decode_block_impl(v, D, G, codes, scale, minimum, bits, rotate, dst, dt);         \
    }
SPECIALISE(64, 64)
SPECIALISE(128, 64)
SPECIALISE(128, 128)
SPECIALISE(256, 64)

typedef struct {
    EncodeBlock encode;
    DecodeBlock decode;
} BlockKernels;

static BlockKernels pick_block_kernels(int d, int g) {
#define PICK(D, G) \
    if (d == (D) && g == (G)) return (BlockKernels){encode_block_##D##_##G, decode_block_##D##_##G}
    PICK(64, 64);
    PICK(128, 64);
    PICK(128, 128);
    PICK(256, 64);
#undef PICK
    return (BlockKernels){NULL, NULL};
}
#else
#define HAVE_AVX2_KERNELS 0
#endif

static int have_avx2;

/* ---- frame layout ---- */

typedef struct {
    int tier;          /* Tier code */
    int64_t m;         /* tokens at this tier */
    const int64_t *idx; /* their slot indices, increasing */
    size_t off[2];     /* body offset of the K and V sections */
} Section;

typedef struct {
    /* geometry */
    int h, d, g, rotate, wire_dt;
    /* encode: source [H, stride, D]; decode: destination [H, stride >= kept, D] */
    void *kv[2];
    int kv_dt;
    int64_t stride; /* slots per head in kv[] */
    uint8_t *body;
    Section sec[4];
    int nsec;
    const int64_t *rank; /* decode: slot -> row in the destination */
    int decode;
    int simd; /* use the AVX2 kernels */
    int nthreads, t;
    /* checksum jobs (digests != NULL): xxh3_64 of each CHECK_BLOCK of hash_src */
    const uint8_t *hash_src;
    size_t hash_len;
    uint64_t seed;
    uint64_t *digests;
} Job;

static size_t section_size(int tier, int64_t m, int h, int d, int g) {
    if (tier == T_FP16) return (size_t)m * h * d * 2;
    return (size_t)m * h * (size_t)d * BITS[tier] / 8 + (size_t)m * h * (d / g) * 4;
}

/* Slots per Tier code of n codes (each <= FP16) into counts[5]. 16-bit counters per 4096-code
 * block, so the compiler vectorizes the compares (a counts[t[s]]++ loop stalls on its own
 * stores: ~25x slower here). Returns the number of codes that are not valid Tier codes. */
static int64_t count_codes(const uint8_t *t, int64_t n, int64_t counts[5]) {
    for (int k = 0; k < 5; k++) counts[k] = 0;
    for (int64_t b = 0; b < n; b += 4096) {
        const int64_t end = b + 4096 < n ? b + 4096 : n;
        uint16_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0;
        for (int64_t s = b; s < end; s++) {
            const uint8_t v = t[s];
            c0 += v == 0, c1 += v == 1, c2 += v == 2, c3 += v == 3, c4 += v == 4;
        }
        counts[0] += c0, counts[1] += c1, counts[2] += c2, counts[3] += c3, counts[4] += c4;
    }
    return n - (counts[0] + counts[1] + counts[2] + counts[3] + counts[4]);
}

/* Fill job->sec from the n-slot tier map (valid codes; counts: slots per Tier code, from
 * check_tiers), sections starting at byte `off` of job->body; returns the offset just past the
 * last section. idx_store: n + 1 entries; each section's slot indices are listed in it, in slot
 * order, in one branch-free pass (dropped slots all write the spare last entry). */
static size_t layout(Job *job, const uint8_t *tiers, int64_t n, const int64_t counts[5],
                     size_t off, int64_t *idx_store) {
    int64_t *next[5] = {idx_store + n, NULL, NULL, NULL, NULL}, *cursor = idx_store;
    job->nsec = 0;
    for (int k = 0; k < 4; k++) {
        int tier = STORED[k];
        next[tier] = cursor;
        if (!counts[tier]) continue;
        Section *sc = &job->sec[job->nsec++];
        sc->tier = tier;
        sc->m = counts[tier];
        sc->idx = cursor;
        cursor += counts[tier];
        for (int kv = 0; kv < 2; kv++) {
            sc->off[kv] = off;
            off += section_size(tier, sc->m, job->h, job->d, job->g);
        }
    }
    for (int64_t s = 0; s < n; s++) {
        const uint8_t c = tiers[s];
        *next[c] = s;
        next[c] += c != T_DROP;
    }
    return off;
}

#if HAVE_AVX2_KERNELS
#define KERNEL(name, ...) (job->simd ? name##_avx2(__VA_ARGS__) : name(__VA_ARGS__))
#else
#define KERNEL(name, ...) name(__VA_ARGS__)
#endif

static void run_rows(const Job *job, const Section *sc, int kv, int64_t lo, int64_t hi) {
    const int h = job->h, d = job->d, g = job->g, tier = sc->tier;
    const size_t rowb = (size_t)d * dtype_size(job->kv_dt);
    uint8_t *base = job->body + sc->off[kv];
    float x[MAX_HEAD_DIM] __attribute__((aligned(32)));
    if (tier == T_FP16) { /* a copy, or a dtype conversion when the source is float32 */
        for (int64_t i = lo; i < hi; i++) {
            for (int j = 0; j < h; j++) {
                uint8_t *wire = base + ((size_t)i * h + j) * d * 2;
                int64_t slot = job->decode ? job->rank[sc->idx[i]] : sc->idx[i];
                uint8_t *mem = (uint8_t *)job->kv[kv] + ((size_t)j * job->stride + slot) * rowb;
                if (job->decode) {
                    if (job->kv_dt == job->wire_dt) {
                        memcpy(mem, wire, rowb);
                    } else {
                        KERNEL(load_row, wire, job->wire_dt, d, x);
                        KERNEL(store_row, x, job->kv_dt, d, mem);
                    }
                } else if (job->kv_dt == job->wire_dt) {
                    memcpy(wire, mem, rowb);
                } else {
                    KERNEL(load_row, mem, job->kv_dt, d, x);
                    KERNEL(store_row, x, job->wire_dt, d, wire);
                }
            }
        }
        return;
    }
    const int bits = BITS[tier], ng = d / g;
    const size_t code_row = (size_t)d * bits / 8;
    uint8_t *codes = base;
    uint16_t *scale = (uint16_t *)(base + (size_t)sc->m * h * code_row);
    uint16_t *minimum = scale + (size_t)sc->m * h * ng;
    EncodeRow encode_row = encode_row_scalar;
    DecodeRow decode_row = decode_row_scalar;
    size_t r = (size_t)lo * h, r_end = (size_t)hi * h; /* rows of this section, token-major */
#if HAVE_AVX2_KERNELS
    if (job->simd) {
        encode_row = encode_row_any;
        decode_row = decode_row_any;
        const BlockKernels block = pick_block_kernels(d, g);
        const size_t rows = BLOCK_GROUPS / ng;
        for (; block.encode && rows && r + rows <= r_end; r += rows) {
            void *mem[BLOCK_GROUPS];
            for (size_t b = 0; b < rows; b++) {
                size_t i = (r + b) / h, j = (r + b) % h;
                int64_t slot = job->decode ? job->rank[sc->idx[i]] : sc->idx[i];
                mem[b] = (uint8_t *)job->kv[kv] + (j * job->stride + slot) * rowb;
            }
            if (job->decode)
                block.decode(codes + r * code_row, scale + r * ng, minimum + r * ng, bits,
                             job->rotate, mem, job->kv_dt);
            else
                block.encode((const void *const *)mem, job->kv_dt, bits, job->rotate,
                             codes + r * code_row, scale + r * ng, minimum + r * ng);
        }
    }
#endif
    for (; r < r_end; r++) {
        size_t i = r / h, j = r % h;
        int64_t slot = job->decode ? job->rank[sc->idx[i]] : sc->idx[i];
        uint8_t *mem = (uint8_t *)job->kv[kv] + (j * job->stride + slot) * rowb;
        if (job->decode)
            decode_row(codes + r * code_row, scale + r * ng, minimum + r * ng, d, g, bits,
                       job->rotate, mem, job->kv_dt);
        else
            encode_row(mem, job->kv_dt, d, g, bits, job->rotate, codes + r * code_row,
                       scale + r * ng, minimum + r * ng);
    }
}

/* Frame checksums hash the body in blocks of CHECK_BLOCK bytes (split over the threads), then
 * the frame head followed by the blocks' digests (see wire.py). */
#define CHECK_BLOCK 65536

static size_t check_blocks(size_t len) { return (len + CHECK_BLOCK - 1) / CHECK_BLOCK; }

static void hash_blocks(const Job *job) {
    const size_t nb = check_blocks(job->hash_len);
    for (size_t b = nb * job->t / job->nthreads; b < nb * (job->t + 1) / job->nthreads; b++) {
        size_t off = b * CHECK_BLOCK;
        size_t len = job->hash_len - off < CHECK_BLOCK ? job->hash_len - off : CHECK_BLOCK;
        job->digests[b] = xxh3_64(job->hash_src + off, len, job->seed, job->simd);
    }
}

static void *worker(void *arg) {
    const Job *job = (const Job *)arg;
    if (job->digests) {
        hash_blocks(job);
        return NULL;
    }
    for (int k = 0; k < job->nsec; k++) {
        const Section *sc = &job->sec[k];
        int64_t lo = sc->m * job->t / job->nthreads, hi = sc->m * (job->t + 1) / job->nthreads;
        for (int kv = 0; kv < 2; kv++) run_rows(job, sc, kv, lo, hi);
    }
    return NULL;
}

/* Jobs run on the persistent thread pool of _pool.h: share t of nthreads runs worker() on its
 * own copy of the job with t and nthreads filled in. */
#include "_pool.h"

/* Waking a helper that already sleeps costs about a millisecond on a VM; below this many rows
 * (~4 MB of FP16 input at head_dim 64) the caller works alone, unless a helper is still awake
 * or jobs are coming back to back (see pool_run). */
#define WAKE_MIN_ROWS 32768

/* A job's size in rows of the cache (a 64-dim FP16 row is 128 bytes), for the wake-up rule. */
static size_t job_rows(const Job *job) {
    if (job->digests) return job->hash_len / 128;
    size_t rows = 0;
    for (int k = 0; k < job->nsec; k++) rows += 2 * (size_t)job->sec[k].m * job->h;
    return rows;
}

static void job_share(void *ctx, int t, int nthreads) {
    Job share = *(const Job *)ctx;
    share.nthreads = nthreads;
    share.t = t;
    worker(&share);
}

static void run_parallel(const Job *job, int nthreads) {
    pool_run(job_share, (void *)job, nthreads, job_rows(job) < WAKE_MIN_ROWS);
}

/* ---- Python entry points ---- */

static int use_simd(int d, int g) { return have_avx2 && d % 16 == 0 && g % 8 == 0; }

/* The geometries config.Geometry allows: head_dim a multiple of 4 in [4, MAX_HEAD_DIM], the
 * group a power of two >= 4 dividing it (so each rotation block, a power of two >= the lowest
 * set bit of d, is whole groups). Sections hold the FP16 tier as 16-bit values: the wire dtype
 * is float16 or bfloat16; the cache side may also be float32. */
static int check_geometry(int h, int d, int g, int nthreads, int wire_dt, int kv_dt) {
    if (h < 1 || d < 4 || d > MAX_HEAD_DIM || d % 4 || g < 4 || (g & (g - 1)) || d % g ||
        nthreads < 1 || nthreads > MAX_THREADS || (wire_dt != DT_F16 && wire_dt != DT_BF16) ||
        kv_dt < DT_F32 || kv_dt > DT_BF16) {
        PyErr_SetString(PyExc_ValueError, "invalid codec geometry or dtype");
        return -1;
    }
    return 0;
}

/* Checks an n-slot tier list and counts its slots per Tier code into counts[5]. */
static int check_tiers(const Py_buffer *tiers, int64_t n, int64_t counts[5]) {
    if (tiers->len != n) {
        PyErr_SetString(PyExc_ValueError, "tier list length does not match the slot count");
        return -1;
    }
    if (count_codes((const uint8_t *)tiers->buf, n, counts)) {
        PyErr_SetString(PyExc_ValueError, "invalid tier code");
        return -1;
    }
    return 0;
}

/* encode_frame(k_ptr, v_ptr, kv_dtype, H, n, D, g, rotate, wire_dtype, tiers, out, threads)
 * k/v: contiguous [H, n, D] in kv_dtype. tiers: n bytes (Tier codes). out: writable buffer of
 * exactly the body size (tier map + sections). */
static PyObject *encode_frame(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long kp, vp;
    int kv_dt, h, d, g, rotate, wire_dt, nthreads;
    long long n;
    Py_buffer tiers, out;
    if (!PyArg_ParseTuple(args, "KKiiLiiiiy*w*i", &kp, &vp, &kv_dt, &h, &n, &d, &g, &rotate,
                          &wire_dt, &tiers, &out, &nthreads))
        return NULL;
    PyObject *ret = NULL;
    int64_t *idx = NULL, counts[5];
    if (check_geometry(h, d, g, nthreads, wire_dt, kv_dt) || check_tiers(&tiers, n, counts))
        goto done;
    Job job = {.h = h, .d = d, .g = g, .rotate = rotate, .wire_dt = wire_dt,
               .kv = {(void *)kp, (void *)vp},
               .kv_dt = kv_dt, .stride = n, .body = (uint8_t *)out.buf,
               .simd = use_simd(d, g)};
    idx = PyMem_Malloc((size_t)(n + 1) * sizeof(int64_t));
    if (!idx) {
        PyErr_NoMemory();
        goto done;
    }
    /* the body is the tier map, then the sections */
    if (layout(&job, tiers.buf, n, counts, (size_t)(n + 1) / 2, idx) != (size_t)out.len) {
        PyErr_SetString(PyExc_ValueError, "output buffer size does not match the tier map");
        goto done;
    }
    const uint8_t *t = (const uint8_t *)tiers.buf;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t s = 0; s < n; s += 2)
        job.body[s / 2] = (uint8_t)(t[s] | (s + 1 < n ? t[s + 1] << 4 : 0));
    run_parallel(&job, nthreads);
    Py_END_ALLOW_THREADS
    ret = Py_NewRef(Py_None);
done:
    PyMem_Free(idx);
    PyBuffer_Release(&tiers);
    PyBuffer_Release(&out);
    return ret;
}

/* decode_frame(body, tiers, H, n, D, g, rotate, wire_dtype, k_ptr, v_ptr, kv_dtype, kept,
 *              capacity, threads)
 * body: the frame body after the tier map. tiers: n bytes. k/v: [H, capacity, D] outputs in
 * kv_dtype (rows contiguous, capacity >= kept); kept = slots whose tier is not DROP, written to
 * rows 0..kept-1 of each head. */
static PyObject *decode_frame(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer body, tiers;
    int h, d, g, rotate, wire_dt, kv_dt, nthreads;
    long long n, kept, capacity;
    unsigned long long kp, vp;
    if (!PyArg_ParseTuple(args, "y*y*iLiiiiKKiLLi", &body, &tiers, &h, &n, &d, &g, &rotate,
                          &wire_dt, &kp, &vp, &kv_dt, &kept, &capacity, &nthreads))
        return NULL;
    PyObject *ret = NULL;
    int64_t *idx = NULL, *rank = NULL, counts[5];
    if (check_geometry(h, d, g, nthreads, wire_dt, kv_dt) || check_tiers(&tiers, n, counts))
        goto done;
    idx = PyMem_Malloc((size_t)(n + 1) * sizeof(int64_t));
    rank = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    if (!idx || !rank) {
        PyErr_NoMemory();
        goto done;
    }
    const uint8_t *t = (const uint8_t *)tiers.buf;
    int64_t r = 0;
    for (int64_t s = 0; s < n; s++) rank[s] = t[s] == T_DROP ? -1 : r++;
    if (r != kept || capacity < kept) {
        PyErr_SetString(PyExc_ValueError, "kept slot count does not match the tier map");
        goto done;
    }
    Job job = {.h = h, .d = d, .g = g, .rotate = rotate, .wire_dt = wire_dt,
               .kv = {(void *)kp, (void *)vp},
               .kv_dt = kv_dt, .stride = capacity, .body = (uint8_t *)body.buf, .rank = rank,
               .decode = 1, .simd = use_simd(d, g)};
    /* the body here starts after the tier map */
    if (layout(&job, t, n, counts, 0, idx) != (size_t)body.len) {
        PyErr_SetString(PyExc_ValueError, "frame body size does not match its tier map");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    run_parallel(&job, nthreads);
    Py_END_ALLOW_THREADS
    ret = Py_NewRef(Py_None);
done:
    PyMem_Free(idx);
    PyMem_Free(rank);
    PyBuffer_Release(&body);
    PyBuffer_Release(&tiers);
    return ret;
}

/* frame_checksum(frame, head_len, seed, threads) -> int
 * frame: head (head_len bytes) + body. Returns xxh3_64(head + digest_0 + ... + digest_k-1,
 * seed), digest_i = xxh3_64(body block i, seed) as little-endian u64, blocks of CHECK_BLOCK. */
static PyObject *frame_checksum(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer frame;
    Py_ssize_t head_len;
    unsigned long long seed;
    int nthreads;
    if (!PyArg_ParseTuple(args, "y*nKi", &frame, &head_len, &seed, &nthreads)) return NULL;
    PyObject *ret = NULL;
    uint8_t *tail = NULL;
    uint64_t *digests = NULL;
    if (head_len < 0 || head_len > frame.len || nthreads < 1 || nthreads > MAX_THREADS) {
        PyErr_SetString(PyExc_ValueError, "invalid checksum arguments");
        goto done;
    }
    const size_t body_len = (size_t)(frame.len - head_len), nb = check_blocks(body_len);
    tail = PyMem_Malloc((size_t)head_len + 8 * nb + 1);
    digests = PyMem_Malloc(8 * nb + 8);
    if (!tail || !digests) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(tail, frame.buf, (size_t)head_len);
    Job job = {.hash_src = (const uint8_t *)frame.buf + head_len, .hash_len = body_len,
               .seed = seed, .digests = digests, .simd = have_avx2};
    uint64_t check;
    Py_BEGIN_ALLOW_THREADS
    if (nb) run_parallel(&job, nthreads);
    memcpy(tail + head_len, digests, 8 * nb);
    check = xxh3_64(tail, (size_t)head_len + 8 * nb, seed, have_avx2);
    Py_END_ALLOW_THREADS
    ret = PyLong_FromUnsignedLongLong(check);
done:
    PyMem_Free(tail);
    PyMem_Free(digests);
    PyBuffer_Release(&frame);
    return ret;
}

/* Slots per Tier code of n codes, as a 5-tuple; NULL with ValueError if a code is above FP16. */
static PyObject *tier_counts_tuple(const uint8_t *t, int64_t n) {
    int64_t counts[5];
    if (count_codes(t, n, counts)) {
        PyErr_SetString(PyExc_ValueError, "invalid tier code in tier map");
        return NULL;
    }
    return Py_BuildValue("(LLLLL)", (long long)counts[0], (long long)counts[1],
                         (long long)counts[2], (long long)counts[3], (long long)counts[4]);
}

/* count_tiers(tiers) -> (counts per Tier code): tiers is a buffer of Tier codes (uint8).
 * ValueError on a code above FP16. */
static PyObject *count_tiers(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer tiers;
    if (!PyArg_ParseTuple(args, "y*", &tiers)) return NULL;
    PyObject *ret = tier_counts_tuple((const uint8_t *)tiers.buf, tiers.len);
    PyBuffer_Release(&tiers);
    return ret;
}

/* unpack_tiers(packed, n, first, tiers_out, positions_out) -> (counts per Tier code)
 * packed: ceil(n/2) bytes of 4-bit Tier codes, low nibble first. Writes the n codes to tiers_out
 * (n bytes) and first + s for each kept (not DROP) slot s, in order, to positions_out (n int64);
 * returns a 5-tuple of slot counts indexed by Tier code. ValueError on a code above FP16 or a
 * nonzero padding nibble. */
static PyObject *unpack_tiers(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer packed, tiers, positions;
    long long n, first;
    if (!PyArg_ParseTuple(args, "y*LLw*w*", &packed, &n, &first, &tiers, &positions)) return NULL;
    PyObject *ret = NULL;
    if (n < 0 || packed.len != (n + 1) / 2 || tiers.len != n ||
        positions.len != n * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "tier map buffers do not match the slot count");
        goto done;
    }
    const uint8_t *in = (const uint8_t *)packed.buf;
    uint8_t *t = (uint8_t *)tiers.buf;
    int64_t *pos = (int64_t *)positions.buf, kept = 0;
    for (int64_t i = 0; i < n / 2; i++) { /* low nibble first */
        t[2 * i] = in[i] & 0xF;
        t[2 * i + 1] = in[i] >> 4;
    }
    if (n & 1) t[n - 1] = in[n / 2] & 0xF;
    for (int64_t s = 0; s < n; s++) { /* the kept slots' positions, branch-free */
        pos[kept] = first + s;
        kept += t[s] != T_DROP;
    }
    if (n & 1 && in[n / 2] >> 4)
        PyErr_SetString(PyExc_ValueError, "tier map padding nibble is not zero");
    else
        ret = tier_counts_tuple(t, n);
done:
    PyBuffer_Release(&packed);
    PyBuffer_Release(&tiers);
    PyBuffer_Release(&positions);
    return ret;
}

/* set_simd(flag) -> previous: turn the AVX2 kernels off (0) or back on (1, where the CPU has
 * them), e.g. to test or time the scalar kernels. */
static PyObject *set_simd(PyObject *self, PyObject *args) {
    (void)self;
    int flag, previous = have_avx2;
    if (!PyArg_ParseTuple(args, "p", &flag)) return NULL;
#if HAVE_AVX2_KERNELS
    have_avx2 = flag && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                __builtin_cpu_supports("fma");
#endif
    return PyBool_FromLong(previous);
}

static PyObject *simd(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyBool_FromLong(have_avx2);
}

static PyMethodDef methods[] = {
    {"simd", simd, METH_NOARGS, "Whether the AVX2 kernels are in use."},
    {"set_simd", set_simd, METH_VARARGS, "Enable or disable the AVX2 kernels."},
    {"encode_frame", encode_frame, METH_VARARGS, "Encode one frame body (asym-group)."},
    {"decode_frame", decode_frame, METH_VARARGS, "Decode one frame body (asym-group)."},
    {"frame_checksum", frame_checksum, METH_VARARGS, "Checksum of a frame head and body."},
    {"count_tiers", count_tiers, METH_VARARGS, "Slot count of each tier code."},
    {"unpack_tiers", unpack_tiers, METH_VARARGS, "Unpack and count a frame's tier map."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_codec", NULL, -1, methods};

PyMODINIT_FUNC PyInit__codec(void) {
    pool_init();
    for (int k = 0; k < 13; k++) block_norm[k] = (float)(1.0 / sqrt((double)(1 << k)));
#if HAVE_AVX2_KERNELS
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                __builtin_cpu_supports("fma");
#endif
    return PyModule_Create(&module);
}

/* XXH3-64 with a seed, written from the xxHash specification (doc/xxhash_spec.md of
 * github.com/Cyan4973/xxHash); values agree with the `xxhash` Python package's xxh3_64, which
 * the tests check for every input length up to a few kilobytes and for large buffers.
 *
 * Only what the frame checksums need: one-shot hashing of a buffer, seeded, with an AVX2 path
 * for the stripe loop of long inputs (same values as the scalar path). Included by _codec.c.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define XXH_P32_1 0x9E3779B1ULL
#define XXH_P32_2 0x85EBCA77ULL
#define XXH_P32_3 0xC2B2AE3DULL
#define XXH_P64_1 0x9E3779B185EBCA87ULL
#define XXH_P64_2 0xC2B2AE3D27D4EB4FULL
#define XXH_P64_3 0x165667B19E3779F9ULL
#define XXH_P64_4 0x85EBCA77C2B2AE63ULL
#define XXH_P64_5 0x27D4EB2F165667C5ULL
#define XXH_MX1 0x165667919E3779F9ULL
#define XXH_MX2 0x9FB21C651E98DF25ULL
#define XXH_SECRET_SIZE 192
#define XXH_STRIPE 64
#define XXH_STRIPES_PER_BLOCK ((XXH_SECRET_SIZE - XXH_STRIPE) / 8) /* 16 */
#define XXH_BLOCK (XXH_STRIPE * XXH_STRIPES_PER_BLOCK)               /* 1024 bytes */

static const uint8_t xxh_default_secret[XXH_SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

/* Little-endian reads (x86-64 and aarch64 Linux are little endian; memcpy avoids misalignment). */
static inline uint64_t xxh_read64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint32_t xxh_read32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t xxh_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t xxh_fold128(uint64_t a, uint64_t b) {
    __uint128_t m = (__uint128_t)a * b;
    return (uint64_t)m ^ (uint64_t)(m >> 64);
}

static inline uint64_t xxh_avalanche(uint64_t x) {
    x ^= x >> 37;
    x *= XXH_MX1;
    return x ^ (x >> 32);
}

static inline uint64_t xxh64_avalanche(uint64_t x) {
    x ^= x >> 33;
    x *= XXH_P64_2;
    x ^= x >> 29;
    x *= XXH_P64_3;
    return x ^ (x >> 32);
}

static inline uint64_t xxh_mix16(const uint8_t *in, const uint8_t *sec, uint64_t seed) {
    return xxh_fold128(xxh_read64(in) ^ (xxh_read64(sec) + seed),
                       xxh_read64(in + 8) ^ (xxh_read64(sec + 8) - seed));
}

/* 0 to 16 bytes */
static uint64_t xxh3_small(const uint8_t *p, size_t len, uint64_t seed) {
    const uint8_t *s = xxh_default_secret;
    if (len > 8) {
        uint64_t lo = ((xxh_read64(s + 24) ^ xxh_read64(s + 32)) + seed) ^ xxh_read64(p);
        uint64_t hi = ((xxh_read64(s + 40) ^ xxh_read64(s + 48)) - seed) ^ xxh_read64(p + len - 8);
        return xxh_avalanche(len + __builtin_bswap64(lo) + hi + xxh_fold128(lo, hi));
    }
    if (len >= 4) {
        uint64_t mseed = seed ^ ((uint64_t)__builtin_bswap32((uint32_t)seed) << 32);
        uint64_t combined = (uint64_t)xxh_read32(p + len - 4) | ((uint64_t)xxh_read32(p) << 32);
        uint64_t v = ((xxh_read64(s + 8) ^ xxh_read64(s + 16)) - mseed) ^ combined;
        v ^= xxh_rotl64(v, 49) ^ xxh_rotl64(v, 24);
        v *= XXH_MX2;
        v ^= (v >> 35) + len;
        v *= XXH_MX2;
        return v ^ (v >> 28);
    }
    if (len > 0) {
        uint32_t combined = (uint32_t)p[len - 1] | ((uint32_t)len << 8) | ((uint32_t)p[0] << 16) |
                            ((uint32_t)p[len >> 1] << 24);
        uint64_t v = ((uint64_t)(xxh_read32(s) ^ xxh_read32(s + 4)) + seed) ^ combined;
        return xxh64_avalanche(v);
    }
    return xxh64_avalanche(seed ^ xxh_read64(s + 56) ^ xxh_read64(s + 64));
}

/* 17 to 240 bytes */
static uint64_t xxh3_medium(const uint8_t *p, size_t len, uint64_t seed) {
    const uint8_t *s = xxh_default_secret;
    uint64_t acc = len * XXH_P64_1;
    if (len <= 128) {
        for (int i = (int)((len - 1) >> 5); i >= 0; i--) {
            acc += xxh_mix16(p + 16 * i, s + 32 * i, seed);
            acc += xxh_mix16(p + len - 16 * i - 16, s + 32 * i + 16, seed);
        }
        return xxh_avalanche(acc);
    }
    for (int i = 0; i < 8; i++) acc += xxh_mix16(p + 16 * i, s + 16 * i, seed);
    acc = xxh_avalanche(acc);
    for (size_t i = 8; i < len / 16; i++) acc += xxh_mix16(p + 16 * i, s + 16 * (i - 8) + 3, seed);
    acc += xxh_mix16(p + len - 16, s + 119, seed);
    return xxh_avalanche(acc);
}

/* The stripe loop of long inputs: accumulate `n` stripes, the k-th with secret + 8k. */
static void xxh_accumulate_scalar(uint64_t *acc, const uint8_t *p, const uint8_t *sec, size_t n) {
    for (size_t k = 0; k < n; k++, p += XXH_STRIPE, sec += 8) {
        for (int i = 0; i < 8; i++) {
            uint64_t v = xxh_read64(p + 8 * i), key = v ^ xxh_read64(sec + 8 * i);
            acc[i ^ 1] += v;
            acc[i] += (key & 0xFFFFFFFFULL) * (key >> 32);
        }
    }
}

static void xxh_scramble_scalar(uint64_t *acc, const uint8_t *sec) {
    for (int i = 0; i < 8; i++) {
        uint64_t a = acc[i];
        a ^= a >> 47;
        a ^= xxh_read64(sec + 8 * i);
        acc[i] = a * XXH_P32_1;
    }
}

/* The final merge of the 8 accumulators of a long input, with the seeded secret `s`. */
static inline uint64_t xxh_merge(const uint64_t *acc, size_t len, const uint8_t *s) {
    uint64_t result = len * XXH_P64_1;
    for (int i = 0; i < 4; i++)
        result += xxh_fold128(acc[2 * i] ^ xxh_read64(s + 11 + 16 * i),
                              acc[2 * i + 1] ^ xxh_read64(s + 11 + 16 * i + 8));
    return xxh_avalanche(result);
}

/* The long-input loop: every full block but the last (accumulate its 16 stripes, then scramble),
 * then the last block's stripes and the final stripe, then the merge. `s`: the seeded secret. */
static uint64_t xxh3_long_scalar(const uint8_t *p, size_t len, const uint8_t *s) {
    uint64_t acc[8] = {XXH_P32_3, XXH_P64_1, XXH_P64_2, XXH_P64_3,
                       XXH_P64_4, XXH_P32_2, XXH_P64_5, XXH_P32_1};
    const size_t blocks = (len - 1) / XXH_BLOCK;
    for (size_t b = 0; b < blocks; b++) {
        xxh_accumulate_scalar(acc, p + b * XXH_BLOCK, s, XXH_STRIPES_PER_BLOCK);
        xxh_scramble_scalar(acc, s + XXH_SECRET_SIZE - XXH_STRIPE);
    }
    xxh_accumulate_scalar(acc, p + blocks * XXH_BLOCK, s,
                          (len - 1 - blocks * XXH_BLOCK) / XXH_STRIPE);
    xxh_accumulate_scalar(acc, p + len - XXH_STRIPE, s + XXH_SECRET_SIZE - XXH_STRIPE - 7, 1);
    return xxh_merge(acc, len, s);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define XXH_HAVE_AVX2 1
#define XXH_AVX2 __attribute__((target("avx2")))

/* One stripe into the accumulators a0 (acc[0..3]) and a1 (acc[4..7]):
 * acc[i] += lo32(key) * hi32(key) with key = data ^ secret; acc[i ^ 1] += data[i]. */
XXH_AVX2 static inline void xxh_stripe_avx2(__m256i *a0, __m256i *a1, const uint8_t *p,
                                            const uint8_t *sec) {
    __m256i d0 = _mm256_loadu_si256((const __m256i *)p);
    __m256i d1 = _mm256_loadu_si256((const __m256i *)(p + 32));
    __m256i k0 = _mm256_xor_si256(d0, _mm256_loadu_si256((const __m256i *)sec));
    __m256i k1 = _mm256_xor_si256(d1, _mm256_loadu_si256((const __m256i *)(sec + 32)));
    __m256i m0 = _mm256_mul_epu32(k0, _mm256_srli_epi64(k0, 32));
    __m256i m1 = _mm256_mul_epu32(k1, _mm256_srli_epi64(k1, 32));
    *a0 = _mm256_add_epi64(*a0, _mm256_add_epi64(m0, _mm256_shuffle_epi32(d0, 0x4E)));
    *a1 = _mm256_add_epi64(*a1, _mm256_add_epi64(m1, _mm256_shuffle_epi32(d1, 0x4E)));
}

/* acc ^= acc >> 47; acc ^= secret; acc *= PRIME32_1 (64-bit product from two 32-bit ones). */
XXH_AVX2 static inline __m256i xxh_scramble_avx2(__m256i a, const uint8_t *sec) {
    const __m256i prime = _mm256_set1_epi64x((long long)XXH_P32_1);
    a = _mm256_xor_si256(a, _mm256_srli_epi64(a, 47));
    a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i *)sec));
    __m256i lo = _mm256_mul_epu32(a, prime);
    __m256i hi = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), prime);
    return _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
}

XXH_AVX2 static uint64_t xxh3_long_avx2(const uint8_t *p, size_t len, const uint8_t *s) {
    __m256i a0 = _mm256_setr_epi64x((long long)XXH_P32_3, (long long)XXH_P64_1,
                                    (long long)XXH_P64_2, (long long)XXH_P64_3);
    __m256i a1 = _mm256_setr_epi64x((long long)XXH_P64_4, (long long)XXH_P32_2,
                                    (long long)XXH_P64_5, (long long)XXH_P32_1);
    const uint8_t *last_key = s + XXH_SECRET_SIZE - XXH_STRIPE;
    const size_t blocks = (len - 1) / XXH_BLOCK;
    for (size_t b = 0; b < blocks; b++) {
        const uint8_t *block = p + b * XXH_BLOCK;
        for (int k = 0; k < XXH_STRIPES_PER_BLOCK; k++)
            xxh_stripe_avx2(&a0, &a1, block + k * XXH_STRIPE, s + 8 * k);
        a0 = xxh_scramble_avx2(a0, last_key);
        a1 = xxh_scramble_avx2(a1, last_key + 32);
    }
    const size_t stripes = (len - 1 - blocks * XXH_BLOCK) / XXH_STRIPE;
    for (size_t k = 0; k < stripes; k++)
        xxh_stripe_avx2(&a0, &a1, p + blocks * XXH_BLOCK + k * XXH_STRIPE, s + 8 * k);
    xxh_stripe_avx2(&a0, &a1, p + len - XXH_STRIPE, last_key - 7);
    uint64_t acc[8];
    _mm256_storeu_si256((__m256i *)acc, a0);
    _mm256_storeu_si256((__m256i *)(acc + 4), a1);
    return xxh_merge(acc, len, s);
}
#else
#define XXH_HAVE_AVX2 0
#endif

/* More than 240 bytes. `simd`: use the AVX2 loop (the caller checked the CPU has AVX2). */
static uint64_t xxh3_long(const uint8_t *p, size_t len, uint64_t seed, int simd) {
    uint8_t s[XXH_SECRET_SIZE];
    for (int i = 0; i < XXH_SECRET_SIZE; i += 16) {
        uint64_t lo = xxh_read64(xxh_default_secret + i) + seed;
        uint64_t hi = xxh_read64(xxh_default_secret + i + 8) - seed;
        memcpy(s + i, &lo, 8);
        memcpy(s + i + 8, &hi, 8);
    }
#if XXH_HAVE_AVX2
    if (simd) return xxh3_long_avx2(p, len, s);
#else
    (void)simd;
#endif
    return xxh3_long_scalar(p, len, s);
}

/* XXH3-64 of `len` bytes at `p` with `seed`. */
static uint64_t xxh3_64(const uint8_t *p, size_t len, uint64_t seed, int simd) {
    if (len <= 16) return xxh3_small(p, len, seed);
    if (len <= 240) return xxh3_medium(p, len, seed);
    return xxh3_long(p, len, seed, simd);
}

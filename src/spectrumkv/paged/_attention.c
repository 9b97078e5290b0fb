/* Paged decode attention: one new query token per request, grouped-query attention over a
 * paged KV cache (spectrumkv.paged.cache), exact FP32 online softmax.
 *
 * decode(): the work unit is a task (request b, KV heads [h0, h0 + nh), token range [lo, hi)):
 * all KV heads of the request whose state fits the task's buffers (every head of SmolLM2 and of
 * the 7B shape). Per tile of TILE tokens it runs head after head, so it reads each page's K (and
 * V) as one run of nh x page_size x head_dim values (the pool's layout) instead of one head's
 * slice at a stride of kv_heads slices; measured (kernel4, one thread) that is a few per cent
 * faster than one task per (request, KV head) and never slower. Each K/V row is read once for
 * all `group` query heads of its KV head, keeping m (running max), l (running sum) and acc
 * (running weighted sum of V) per query head.
 * A request whose length is split into several ranges writes one partial (m, l, acc) per range;
 * after all tasks ran, a merge pass combines them exactly: M = max m_s, L = sum e^(m_s-M) l_s,
 * out = sum e^(m_s-M) acc_s / L. Unsplit tasks write their output directly.
 * With part_tokens > 0 the partials lie on a fixed grid instead: one per part_tokens tokens of
 * the request's span (a span of more than MAX_PARTS such parts: MAX_PARTS equal parts of whole
 * tiles), ranges being whole parts, each part computed from a fresh state, merged in order.
 * A request's output bits then depend on its span and part_tokens alone, not on how its parts
 * are grouped into ranges and tasks: every route and every batch gives the same bits.
 *
 * Tile kernels, the best the CPU has (set_isa may cap it): AMX-BF16 tiles for bf16 pages that fit
 * them (amx_fits; tile_amx), AVX-512 (every other page and every tile the AMX one cannot take),
 * AVX2/F16C/FMA, plain C. All keep the same FP32 m, l, acc state, so a task may mix them.
 *
 * All tasks of one call run as ONE OpenMP parallel region (run_job): every thread takes the next
 * task from a shared counter (longest tasks first), so a call is one dispatch whatever the
 * batch. The routes in attention.py differ only in which requests they pass per call and how
 * they split them. OpenMP, not the extensions' own pool (_pool.h), so that the kernel runs on
 * torch's threads: torch's wheel loads libgomp.so.1 and this module links the same soname, so
 * the process has one team. With a second set of threads, torch's OpenMP workers (spinning
 * after each torch op) and the pool's helpers (spinning after each call) took turns on the
 * same cores: at 2 threads a SmolLM2 batch-12 decode step ran 62-72 ms, against 45 ms with the
 * kernel on one thread beside torch's two (serve.step_bench, benchmarks/RESULTS.md).
 *
 * Bounds: every length and every block-table entry that a length reaches is checked against the
 * table width and the pool before any thread starts; nothing outside the given buffers is read
 * or written. The GIL is released while the tasks run. Temporaries: the task list and split
 * partials, O(batch x KV heads x max(splits, MAX_PARTS) x group x head_dim), never O(context
 * length). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../_amx.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_KERNELS 1
#define AVX2 __attribute__((target("avx2,f16c,fma")))
#else
#define HAVE_AVX2_KERNELS 0
#endif

enum { DT_F16 = 1, DT_BF16 = 2 };
#define MAX_GROUP 16
#define AMX_MAX_GROUP 8 /* the AMX tile's limit (2 x group score columns) */
#define MAX_HEAD_DIM 256
#define MAX_HEADS 1024
#define TILE 32
#define MAX_PARTS 16 /* partials per request on the part grid (see the top) */
#define MAX_THREADS 64 /* the most threads a call may ask for (kernel.py caps it) */
/* A task covers as many KV heads of its request (at most MAX_ROWS query heads, TASK_FLOATS
 * floats of queries and of accumulators) as fit. */
#define MAX_ROWS 64
#define TASK_FLOATS (MAX_GROUP * MAX_HEAD_DIM)
/* Below this many KV bytes a call runs on the caller alone (waking a team costs more). */
#define SMALL_JOB_BYTES (512 * 1024)

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_BF16 = 3, ISA_AMX = 4 };
static int isa_level = ISA_SCALAR; /* the best kernel in use (set_isa may lower it) */
static int amx_granted;            /* AMX-BF16 present and the kernel let us use its tiles */

static int cpu_isa(void) {
#if HAVE_AVX2_KERNELS
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
          __builtin_cpu_supports("fma")))
        return ISA_SCALAR;
    if (!__builtin_cpu_supports("avx512f")) return ISA_AVX2;
    if (amx_granted) return ISA_AMX;
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") ? ISA_BF16
                                                                                : ISA_AVX512;
#else
    return ISA_SCALAR;
#endif
}

typedef struct {
    int32_t b, h0, nh, lo, hi; /* request, KV heads [h0, h0 + nh), tokens [lo, hi) */
    int32_t slot, sstride; /* partial slot of head h0 (of head h0 + i: slot + i * sstride), or
                              -1: the task covers its request, write out */
    int32_t part; /* tokens per partial: after every `part` tokens from lo, the next slot */
} Task;

typedef struct {
    int32_t b, h, s0, ns; /* a split (request, KV head): its partial slots [s0, s0 + ns) */
} Merge;

typedef struct {
    const float *q; /* [B, Hkv * group, d] */
    const uint16_t *k, *v; /* [P, Hkv, ps, d] */
    const int32_t *tables; /* [B, W] */
    int W, ps, hkv, group, d, dt, simd; /* simd: the ISA_* kernel to run */
    float scale;
    const Task *tasks;
    int ntasks;
    float *out;            /* [B, Hkv * group, d] */
    float *pm, *pl, *pacc; /* per partial slot: [group], [group], [group * d] */
    _Atomic int next;
} Ctx;

/* ---- scalar kernel ---- */

static inline float load1(const uint16_t *p, int dt) {
    if (dt == DT_BF16) {
        uint32_t u = (uint32_t)*p << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    _Float16 x;
    memcpy(&x, p, 2);
    return (float)x;
}

/* Element offsets (into k or v) of the rows of tokens [t0, t0 + n) of task t: one division per
 * tile, then the offset within the page steps along. */
static inline void tile_rows(const Ctx *c, const Task *t, int t0, int n, size_t *off) {
    const int32_t *table = c->tables + (size_t)t->b * c->W;
    int p = t0 / c->ps, o = t0 % c->ps;
    const size_t stride = (size_t)c->hkv * c->ps;
    for (int i = 0; i < n; i++) {
        off[i] = ((size_t)table[p] * stride + o) * (size_t)c->d;
        if (++o == c->ps) o = 0, p++;
    }
}

/* One tile of one KV head: rows k + off[i], v + off[i] for i < n (k, v already offset to
 * the head); qs: [group, d], the scaled queries; m, l: [group]; acc: [group * d]
 * (unnormalized); next, nn: the next tile's rows (the AVX2 kernel prefetches them); vt: scratch of
 * TILE x MAX_HEAD_DIM floats, 64-byte aligned. */
typedef void (*TileFn)(const Ctx *c, const uint16_t *k, const uint16_t *v, const size_t *off,
                       int n, const size_t *next, int nn, const float *qs, float *m, float *l,
                       float *acc, float *vt);

static void tile_scalar(const Ctx *c, const uint16_t *k, const uint16_t *v, const size_t *off,
                        int n, const size_t *next, int nn, const float *qs, float *m, float *l,
                        float *acc, float *vt) {
    (void)next, (void)nn, (void)vt;
    const int G = c->group, d = c->d;
    float s[MAX_GROUP][TILE];
    for (int i = 0; i < n; i++) {
        const uint16_t *kr = k + off[i];
        for (int g = 0; g < G; g++) {
            float dot = 0.0f;
            for (int j = 0; j < d; j++) dot += qs[g * d + j] * load1(kr + j, c->dt);
            s[g][i] = dot;
        }
    }
    for (int g = 0; g < G; g++) {
        float mt = m[g];
        for (int i = 0; i < n; i++) mt = s[g][i] > mt ? s[g][i] : mt;
        const float alpha = m[g] == -INFINITY ? 0.0f : expf(m[g] - mt);
        l[g] *= alpha;
        for (int j = 0; j < d; j++) acc[g * d + j] *= alpha;
        for (int i = 0; i < n; i++) {
            s[g][i] = expf(s[g][i] - mt);
            l[g] += s[g][i];
        }
        m[g] = mt;
    }
    for (int i = 0; i < n; i++) {
        const uint16_t *vr = v + off[i];
        for (int j = 0; j < d; j++) {
            const float x = load1(vr + j, c->dt);
            for (int g = 0; g < G; g++) acc[g * d + j] += s[g][i] * x;
        }
    }
}

/* Pages are small and scattered, so the hardware prefetcher stops at each one: the AVX2 kernel
 * asks for the next tile's rows while it converts the current tile's; for the AVX-512 and AMX
 * kernels run_task asks for the next tile's K and V rows of all the task's heads at once before
 * a tile starts (prefetch_tile). (kernel4, AVX-512 with its own per-head prefetch: no difference
 * between that, prefetching into L2 only, two or three tiles ahead, or none. amx, over a ring of
 * layers of the issue-18 mix, 1 thread: all heads at once into L1 one tile ahead made the AMX
 * tile 4-22 % faster and the AVX-512 one 4-7 %, than each head's tile prefetching its own; into
 * L2, or two or more tiles ahead, was slower; the AVX2 kernel was 2-10 % slower with it.)
 *
 * The hint is an asm volatile, not __builtin_prefetch: gcc 12 treats the builtin as free of side
 * effects and, unless -fwrapv (Python's CFLAGS, so setup.py builds) keeps it from proving the
 * loops finite, deletes prefetch_tile's loops, which hold nothing else, as dead code. A plain
 * `gcc -O3` build then ran with no prefetch and 1.2-1.3x slower (exp18; kernels from 14a86af,
 * which added prefetch_tile, to 2045b44). */
static inline void prefetch_line(const char *p) {
#if defined(__x86_64__)
    __asm__ volatile("prefetcht0 %0" : : "m"(*p));
#else
    __builtin_prefetch(p, 0, 3);
#endif
}

static inline void prefetch_row(const uint16_t *p, int d) {
    for (int b = 0; b < d * 2; b += 64) prefetch_line((const char *)p + b);
}

/* prefetch_row into L2 (prefetcht1): the AVX512-BF16 kernel's hint (see tile_bf16), and the
 * AVX-512 kernel's on CPUs without AMX (prefetch_tile's burst of a whole tile; on a Zen 4 with
 * fp16 pages, a batch of 16 short requests, 30 layers: 1.45-1.7x faster on 1 thread and
 * 1.05-1.3x on 2 than into L1). CPUs with AMX keep L1 for both their kernels, as measured on
 * the Intel VMs (the note above). */
static inline void prefetch_row_l2(const uint16_t *p, int d) {
#if defined(__x86_64__)
    for (int b = 0; b < d * 2; b += 64) __asm__ volatile("prefetcht1 %0" : : "m"(p[b / 2]));
#else
    for (int b = 0; b < d * 2; b += 64) __builtin_prefetch((const char *)p + b, 0, 2);
#endif
}

/* ---- AVX2 / F16C / FMA kernel (head_dim a multiple of 8) ---- */

#if HAVE_AVX2_KERNELS
#define INLINE inline __attribute__((always_inline))

AVX2 static INLINE __m256 load8(const uint16_t *p, int dt) {
    const __m128i x = _mm_loadu_si128((const __m128i *)p);
    if (dt == DT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
    return _mm256_cvtph_ps(x);
}

AVX2 static INLINE float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* e^x for x <= 0 (Cephes expf polynomial, relative error ~2e-7; x < -87 gives ~0). */
AVX2 static INLINE __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* The online-softmax step of one tile: scores s[g][0..n) (padded to TILE) become weights
 * e^(s - m_new); the running max m, sum l and accumulator acc[g] are rescaled to m_new. */
AVX2 static INLINE void softmax_tile(float (*s)[TILE], float *m, float *l, float *acc, int n,
                                     int G, int d) {
    for (int i = n; i < TILE; i++)
        for (int g = 0; g < G; g++) s[g][i] = -INFINITY;
    for (int g = 0; g < G; g++) {
        __m256 mx = _mm256_set1_ps(m[g]);
        for (int i = 0; i < TILE; i += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(&s[g][i]));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float mt = _mm_cvtss_f32(h);
        const float alpha = m[g] == -INFINITY ? 0.0f : expf(m[g] - mt);
        if (alpha != 1.0f) {
            const __m256 va = _mm256_set1_ps(alpha);
            l[g] *= alpha;
            for (int j = 0; j < d; j += 8)
                _mm256_storeu_ps(acc + g * d + j, _mm256_mul_ps(_mm256_loadu_ps(acc + g * d + j), va));
        }
        const __m256 vm = _mm256_set1_ps(mt);
        for (int i = 0; i < TILE; i += 8)
            _mm256_store_ps(&s[g][i], exp8(_mm256_sub_ps(_mm256_load_ps(&s[g][i]), vm)));
        for (int i = n; i < TILE; i++) s[g][i] = 0.0f; /* exp8 left ~e^-87 there */
        __m256 sum = _mm256_load_ps(&s[g][0]);
        for (int i = 8; i < TILE; i += 8) sum = _mm256_add_ps(sum, _mm256_load_ps(&s[g][i]));
        l[g] += hsum8(sum);
        m[g] = mt;
    }
}

AVX2 static void tile_avx2(const Ctx *c, const uint16_t *k, const uint16_t *v,
                        const size_t *off, int n, const size_t *next, int nn, const float *qs,
                        float *m, float *l, float *acc, float *vt) {
    const int G = c->group, d = c->d, nv = d / 8, dt = c->dt;
    float s[MAX_GROUP][TILE] __attribute__((aligned(32)));
    /* K: the tile's rows converted once into vt, then 8 scores at a time per query head,
     * the 8 dot products reduced together */
    for (int i = 0; i < n; i++) {
        const uint16_t *kp = k + off[i];
        if (i < nn) prefetch_row(k + next[i], d);
        for (int j = 0; j < nv; j++) _mm256_store_ps(vt + i * d + 8 * j, load8(kp + 8 * j, dt));
    }
    if (n % 8) memset(vt + n * d, 0, sizeof(float) * (8 - n % 8) * d); /* rows past the end */
    for (int g = 0; g < G; g++) {
        const float *qg = qs + g * d;
        for (int i = 0; i < n; i += 8) {
            const float *x = vt + i * d;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
                   a6 = a0, a7 = a0;
            for (int j = 0; j < d; j += 8) {
                const __m256 qv = _mm256_loadu_ps(qg + j);
                a0 = _mm256_fmadd_ps(qv, _mm256_load_ps(x + j), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_load_ps(x + d + j), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_load_ps(x + 2 * d + j), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_load_ps(x + 3 * d + j), a3);
                a4 = _mm256_fmadd_ps(qv, _mm256_load_ps(x + 4 * d + j), a4);
                a5 = _mm256_fmadd_ps(qv, _mm256_load_ps(x + 5 * d + j), a5);
                a6 = _mm256_fmadd_ps(qv, _mm256_load_ps(x + 6 * d + j), a6);
                a7 = _mm256_fmadd_ps(qv, _mm256_load_ps(x + 7 * d + j), a7);
            }
            const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
            _mm256_store_ps(&s[g][i], _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                                    _mm256_permute2f128_ps(u0, u1, 0x31)));
        }
    }
    softmax_tile(s, m, l, acc, n, G, d);
    /* V: the tile's rows converted once into vt, then acc[g] += sum_i p[g][i] v[i], 32
     * dims at a time with the accumulators in registers */
    for (int i = 0; i < n; i++) {
        const uint16_t *vp = v + off[i];
        if (i < nn) prefetch_row(v + next[i], d);
        for (int j = 0; j < nv; j++) _mm256_store_ps(vt + i * d + 8 * j, load8(vp + 8 * j, dt));
    }
    for (int g = 0; g < G; g++) {
        float *ag = acc + g * d;
        int j = 0;
        for (; j + 32 <= d; j += 32) {
            __m256 a0 = _mm256_loadu_ps(ag + j), a1 = _mm256_loadu_ps(ag + j + 8);
            __m256 a2 = _mm256_loadu_ps(ag + j + 16), a3 = _mm256_loadu_ps(ag + j + 24);
            for (int i = 0; i < n; i++) {
                const __m256 p = _mm256_broadcast_ss(&s[g][i]);
                const float *x = vt + i * d + j;
                a0 = _mm256_fmadd_ps(p, _mm256_load_ps(x), a0);
                a1 = _mm256_fmadd_ps(p, _mm256_load_ps(x + 8), a1);
                a2 = _mm256_fmadd_ps(p, _mm256_load_ps(x + 16), a2);
                a3 = _mm256_fmadd_ps(p, _mm256_load_ps(x + 24), a3);
            }
            _mm256_storeu_ps(ag + j, a0);
            _mm256_storeu_ps(ag + j + 8, a1);
            _mm256_storeu_ps(ag + j + 16, a2);
            _mm256_storeu_ps(ag + j + 24, a3);
        }
        for (; j < d; j += 8) {
            __m256 a0 = _mm256_loadu_ps(ag + j);
            for (int i = 0; i < n; i++)
                a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(&s[g][i]), _mm256_load_ps(vt + i * d + j), a0);
            _mm256_storeu_ps(ag + j, a0);
        }
    }
}

/* ---- AVX-512 kernel (head_dim a multiple of 16): scores 16 rows at a time reduced by one
 * transpose-add tree, the softmax 16 lanes wide (rescaling only when the maximum grows), and V
 * accumulated for up to 4 query heads x 64 dims in registers, converted straight from the page.
 * Measured (kernel4) 10-20 % faster than the AVX2 kernel's steps at 16 lanes. ---- */
#define AVX512 __attribute__((target("avx512f,avx2,f16c,fma")))

AVX512 static INLINE __m512 load16(const uint16_t *p, int dt) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)p);
    if (dt == DT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
    return _mm512_cvtph_ps(x);
}

/* e^x for x <= 0, 16 lanes (exp8's polynomial; 2^n by scalef). */
AVX512 static INLINE __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, fx);
}

/* The 16 horizontal sums of a[0..15], in order, as one vector: a transpose-add tree (45
 * shuffles and adds instead of 16 separate reductions). */
AVX512 static INLINE __m512 sum16(const __m512 *a) {
    __m512 t[8], u[4];
    for (int k = 0; k < 8; k++) /* per 128-bit lane: [r0a r1a r0b r1b] of rows 2k, 2k+1 */
        t[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]),
                             _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
    for (int k = 0; k < 4; k++) { /* per lane: rows 4k..4k+3, that lane's part */
        const __m512d x = _mm512_castps_pd(t[2 * k]), y = _mm512_castps_pd(t[2 * k + 1]);
        u[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    /* the four lanes' parts added: lane L of the result = rows 4L..4L+3 */
    const __m512 v0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                                    _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    const __m512 v1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88),
                                    _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x88), _mm512_shuffle_f32x4(v0, v1, 0xDD));
}

/* acc[g0 + i][j, j + 16 NZ) += sum_r p[g0 + i][r] v[r] for i < GB: GB x NZ accumulators stay in
 * registers across the tile's n rows of V (v + off[r], converted as they are loaded). */
AVX512 static INLINE void v_block(const uint16_t *v, const size_t *off, int dt, float (*p)[TILE],
                                  float *acc, int n, int d, int g0, int j, const int GB,
                                  const int NZ) {
    __m512 a[4][4];
    for (int g = 0; g < GB; g++)
        for (int z = 0; z < NZ; z++) a[g][z] = _mm512_loadu_ps(acc + (g0 + g) * d + j + 16 * z);
    for (int r = 0; r < n; r++) {
        __m512 x[4];
        for (int z = 0; z < NZ; z++) x[z] = load16(v + off[r] + j + 16 * z, dt);
        for (int g = 0; g < GB; g++) {
            const __m512 w = _mm512_set1_ps(p[g0 + g][r]);
            for (int z = 0; z < NZ; z++) a[g][z] = _mm512_fmadd_ps(w, x[z], a[g][z]);
        }
    }
    for (int g = 0; g < GB; g++)
        for (int z = 0; z < NZ; z++) _mm512_storeu_ps(acc + (g0 + g) * d + j + 16 * z, a[g][z]);
}

/* acc[g] += sum_r p[g][r] v[r] over the tile's n rows of V, for every query head g < G: up to
 * 4 query heads x 64 dims of accumulators in registers (v_block). */
AVX512 static INLINE void v_tile(const uint16_t *v, const size_t *off, int dt, float (*s)[TILE],
                                 float *acc, int n, int d, int G) {
    for (int j = 0; j < d;) {
        const int nz = d - j >= 64 ? 4 : 1;
        for (int g0 = 0; g0 < G; g0 += 4) {
            const int gb = G - g0 < 4 ? G - g0 : 4;
#define VB(GB)                                                                     \
    case GB:                                                                       \
        if (nz == 4) v_block(v, off, dt, s, acc, n, d, g0, j, GB, 4);              \
        else v_block(v, off, dt, s, acc, n, d, g0, j, GB, 1);                      \
        break;
            switch (gb) { VB(1) VB(2) VB(3) VB(4) }
#undef VB
        }
        j += 16 * nz;
    }
}

/* The online-softmax step of one tile, 16 lanes: scores s[g][0..n) (lanes >= n are masked out,
 * whatever they hold) become weights e^(s - m_new), zero past n; the running sums l, acc are
 * rescaled only when the tile raises the maximum (alpha = 1 otherwise). */
AVX512 static INLINE void softmax16(float (*s)[TILE], float *m, float *l, float *acc, int n,
                                    int G, int d) {
    const __mmask16 k0 = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
    const __mmask16 k1 = n >= 32 ? 0xFFFF : n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int g = 0; g < G; g++) {
        const __m512 s0 = _mm512_mask_load_ps(ninf, k0, &s[g][0]);
        const __m512 s1 = _mm512_mask_load_ps(ninf, k1, &s[g][16]);
        const float mt = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
        if (mt > m[g]) {
            const float alpha = expf(m[g] - mt); /* 0 on the first tile (m = -inf) */
            const __m512 va = _mm512_set1_ps(alpha);
            l[g] *= alpha;
            for (float *a = acc + g * d; a < acc + (g + 1) * d; a += 16)
                _mm512_storeu_ps(a, _mm512_mul_ps(_mm512_loadu_ps(a), va));
            m[g] = mt;
        }
        const __m512 vm = _mm512_set1_ps(m[g]);
        const __m512 p0 = _mm512_maskz_mov_ps(k0, exp16(_mm512_sub_ps(s0, vm)));
        const __m512 p1 = _mm512_maskz_mov_ps(k1, exp16(_mm512_sub_ps(s1, vm)));
        _mm512_store_ps(&s[g][0], p0);
        _mm512_store_ps(&s[g][16], p1);
        l[g] += _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
    }
}

AVX512 static void tile_avx512(const Ctx *c, const uint16_t *k, const uint16_t *v,
                               const size_t *off, int n, const size_t *next, int nn,
                               const float *qs, float *m, float *l, float *acc, float *vt) {
    (void)next, (void)nn; /* run_task prefetched them (prefetch_tile) */
    const int G = c->group, d = c->d, dt = c->dt;
    float s[MAX_GROUP][TILE] __attribute__((aligned(64)));
    /* K: the tile's rows converted once into vt (rows past n zeroed up to 16), then 16 scores
     * at a time per query head, reduced together */
    for (int i = 0; i < n; i++) {
        const uint16_t *kp = k + off[i];
        for (int j = 0; j < d; j += 16) _mm512_store_ps(vt + i * d + j, load16(kp + j, dt));
    }
    if (n % 16) memset(vt + n * d, 0, sizeof(float) * (16 - n % 16) * d);
    for (int g = 0; g < G; g++) {
        const float *qg = qs + g * d;
        for (int r0 = 0; r0 < n; r0 += 16) {
            const float *x = vt + r0 * d;
            __m512 a[16];
            for (int r = 0; r < 16; r++) a[r] = _mm512_setzero_ps();
            for (int j = 0; j < d; j += 16) {
                const __m512 qv = _mm512_loadu_ps(qg + j);
                for (int r = 0; r < 16; r++)
                    a[r] = _mm512_fmadd_ps(qv, _mm512_load_ps(x + r * d + j), a[r]);
            }
            _mm512_store_ps(&s[g][r0], sum16(a));
        }
    }
    softmax16(s, m, l, acc, n, G, d);
    v_tile(v, off, dt, s, acc, n, d, G);
}

/* ---- AVX512-BF16 kernel: bf16 pages, head_dim a multiple of 32, on CPUs with AVX512-BF16 (and
 * BW) where the AMX tile does not run (no AMX, or a geometry amx_fits refuses). Scores:
 * VDPBF16PS of 16 K rows read straight from the page (no conversion pass) with the task's scaled
 * queries split into bf16 hi + lo (bf16_split; products of bf16 values are exact in FP32, so
 * q.k keeps FP32 accuracy), the lo pass skipped when every lo is zero (queries that are bf16
 * values already, as a bf16 model's are at a power-of-two scale: adding 0 changes no bit); the
 * 16 row sums reduced together (sum16). Softmax: softmax16. V: in FP32 FMAs, as the AVX-512
 * kernel, but each 32-bit word of a page row (two adjacent bf16 dims) becomes its two FP32 values
 * by one shift (even dim) and one mask (odd dim) instead of a widening convert; the accumulators
 * are held in that even/odd order across the tile's rows and interleaved back once per tile, so
 * the products and sums are the AVX-512 kernel's, bit for bit. The next tile's rows of this
 * head are prefetched into L2 row by row between the V rows. Measured on a Zen 4 (one task of
 * 131,072 tokens, SmolLM2's shape, DRAM-resident, 1 thread): 37 ns per token and KV head with
 * prefetcht0 there, 25-30 with prefetcht1, 49-52 for the AVX-512 kernel's burst of all the next
 * tile's rows into L1 at its start; with the data in cache the two kernels compute alike
 * (17-19 ns), the FP32 V FMAs being the larger part. ---- */
#define BF16K __attribute__((target("avx512f,avx512bw,avx512bf16,avx2,f16c,fma")))

BF16K static INLINE __m512 bf16_ps(__m256i x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

/* The 32 values of x0 (lanes 0-15) and x1 (lanes 16-31) as bf16 hi + lo: hi rounded to the
 * nearest bf16, lo = the bf16 nearest to x - hi (|x - hi - lo| <= 2^-16 |x|). */
BF16K static INLINE void bf16_split(__m512 x0, __m512 x1, __m512i *hi, __m512i *lo) {
    *hi = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
    const __m512 r0 = _mm512_sub_ps(x0, bf16_ps(_mm512_castsi512_si256(*hi)));
    const __m512 r1 = _mm512_sub_ps(x1, bf16_ps(_mm512_extracti64x4_epi64(*hi, 1)));
    *lo = (__m512i)_mm512_cvtne2ps_pbh(r1, r0);
}

/* qs [n] (n a multiple of 32) as bf16 hi [n] and lo [n] (bf16_split); returns whether any lo
 * is nonzero. */
BF16K static int bf16_queries(const float *qs, int n, uint16_t *hi, uint16_t *lo) {
    __m512i any = _mm512_setzero_si512();
    for (int i = 0; i < n; i += 32) {
        __m512i h, l;
        bf16_split(_mm512_loadu_ps(qs + i), _mm512_loadu_ps(qs + i + 16), &h, &l);
        _mm512_storeu_si512(hi + i, h);
        _mm512_storeu_si512(lo + i, l);
        any = _mm512_or_si512(any, l);
    }
    return _mm512_test_epi16_mask(any, any) != 0;
}

/* s[0..16) = q . k_r for the rows kr[0..16) (d bf16 values each): hi pass, then lo unless
 * use_lo is 0. */
BF16K static INLINE void scores_bf16(const uint16_t *const *kr, const uint16_t *qh,
                                     const uint16_t *ql, int use_lo, int d, float *s) {
    __m512 a[16];
    for (int r = 0; r < 16; r++) a[r] = _mm512_setzero_ps();
    for (int pass = 0; pass <= use_lo; pass++) {
        const uint16_t *q = pass ? ql : qh;
        for (int j = 0; j < d; j += 32) {
            const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + j);
            for (int r = 0; r < 16; r++)
                a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_loadu_si512(kr[r] + j), qv);
        }
    }
    _mm512_store_ps(s, sum16(a));
}

/* acc[g0 + i][j, j + 32 NC) += sum_r p[g0 + i][r] v_r for i < GB, r < n: GB x 2NC accumulators
 * (even dims, odd dims of each 32-dim chunk) in registers across the rows; prefetches the rows
 * next[0..nn) of k and v (this head's next tile) along the way when `fetch`. */
BF16K static INLINE void v_block_bf16(const uint16_t *const *vr, float (*p)[TILE], float *acc,
                                      int n, int d, int g0, int j, const int GB, const int NC,
                                      const uint16_t *k, const uint16_t *v, const size_t *next,
                                      int nn, int fetch) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i lo16 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7,
                                           23);
    const __m512i hi16 = _mm512_add_epi32(lo16, _mm512_set1_epi32(8));
    const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 a[4][4];
    for (int g = 0; g < GB; g++)
        for (int c = 0; c < NC; c++) {
            const float *x = acc + (g0 + g) * d + j + 32 * c;
            const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
            a[g][2 * c] = _mm512_permutex2var_ps(x0, even, x1);
            a[g][2 * c + 1] = _mm512_permutex2var_ps(x0, odd, x1);
        }
    for (int r = 0; r < n; r++) {
        if (fetch && r < nn) {
            prefetch_row_l2(k + next[r], d);
            prefetch_row_l2(v + next[r], d);
        }
        __m512 e[2], o[2];
        for (int c = 0; c < NC; c++) {
            const __m512i w = _mm512_loadu_si512(vr[r] + j + 32 * c);
            e[c] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
            o[c] = _mm512_castsi512_ps(_mm512_and_si512(w, top));
        }
        for (int g = 0; g < GB; g++) {
            const __m512 w = _mm512_set1_ps(p[g0 + g][r]);
            for (int c = 0; c < NC; c++) {
                a[g][2 * c] = _mm512_fmadd_ps(w, e[c], a[g][2 * c]);
                a[g][2 * c + 1] = _mm512_fmadd_ps(w, o[c], a[g][2 * c + 1]);
            }
        }
    }
    if (fetch)
        for (int r = n; r < nn; r++) {
            prefetch_row_l2(k + next[r], d);
            prefetch_row_l2(v + next[r], d);
        }
    for (int g = 0; g < GB; g++)
        for (int c = 0; c < NC; c++) {
            float *x = acc + (g0 + g) * d + j + 32 * c;
            _mm512_storeu_ps(x, _mm512_permutex2var_ps(a[g][2 * c], lo16, a[g][2 * c + 1]));
            _mm512_storeu_ps(x + 16, _mm512_permutex2var_ps(a[g][2 * c], hi16, a[g][2 * c + 1]));
        }
}

/* Rows of V past a tile's n are never read; rows of K past n in its last 16-row block read
 * this zero row instead (their scores are masked out by softmax16). */
static const uint16_t zero_row[MAX_HEAD_DIM] __attribute__((aligned(64)));

/* One tile (TileFn's contract, with the queries as bf16 hi/lo rows [G, d] and use_lo). */
BF16K static void tile_bf16(const Ctx *c, const uint16_t *k, const uint16_t *v,
                            const size_t *off, int n, const size_t *next, int nn,
                            const uint16_t *qh, const uint16_t *ql, int use_lo, float *m,
                            float *l, float *acc) {
    const int G = c->group, d = c->d;
    float s[MAX_GROUP][TILE] __attribute__((aligned(64)));
    const uint16_t *kr[TILE], *vr[TILE];
    for (int r = 0; r < TILE; r++) {
        kr[r] = r < n ? k + off[r] : zero_row;
        vr[r] = v + (r < n ? off[r] : 0);
    }
    for (int g = 0; g < G; g++)
        for (int r0 = 0; r0 < n; r0 += 16)
            scores_bf16(kr + r0, qh + g * d, ql + g * d, use_lo, d, &s[g][r0]);
    softmax16(s, m, l, acc, n, G, d);
    int fetch = 1; /* the first block prefetches the next tile's rows */
    for (int j = 0; j < d;) {
        const int nc = d - j >= 64 ? 2 : 1;
        for (int g0 = 0; g0 < G; g0 += 4, fetch = 0) {
            const int gb = G - g0 < 4 ? G - g0 : 4;
#define VB(GB)                                                                                \
    case GB:                                                                                  \
        if (nc == 2) v_block_bf16(vr, s, acc, n, d, g0, j, GB, 2, k, v, next, nn, fetch);     \
        else v_block_bf16(vr, s, acc, n, d, g0, j, GB, 1, k, v, next, nn, fetch);             \
        break;
            switch (gb) { VB(1) VB(2) VB(3) VB(4) }
#undef VB
        }
        j += 32 * nc;
    }
}

/* ---- AMX-BF16 kernel: bf16 pages, head_dim a multiple of 32, group <= AMX_MAX_GROUP, page_size
 * a multiple of 16, tiles starting at a multiple of 16 tokens (run_task runs AVX-512 up to there).
 * Scores: A = 16 tokens x 32 dims of K, loaded straight from the page (a page holds each head's
 * rows contiguously, and a 16-token block starting at a multiple of 16 lies inside one page;
 * rows past n are read but their scores are masked out); B = the task's scaled queries in VNNI
 * pairs, columns [hi of each query head, bf16 rounding error (lo) of each]: products of bf16 K
 * and bf16 hi/lo are exact in FP32, so s = C[hi] + C[lo] is an FP32-accurate q.k (|q - hi - lo| <=
 * 2^-16 |q|). The FP32 online softmax is softmax16's, as in the AVX-512 kernel. V: B = 16 rows
 * of V (tokens) x 32 dims, loaded straight from the page like K (a word holds two adjacent dims
 * of one token); A = P split the same way, one token per word, as (p, 0) in the rows that collect
 * the even dims and (0, p) in those that collect the odd ones: 4 rows per query head (hi even,
 * hi odd, lo even, lo odd), up to 4 heads per pass (pv_heads); C = those rows x 16 fp32, zeroed
 * per 32-dim chunk, summed (hi + lo) and interleaved (even, odd) into acc with AVX-512. Rows past
 * n of the last block are copied into zeroed scratch first (stale page memory may hold NaN, and
 * 0 x NaN = NaN). Measured (benchmarks/results/pv-direct-ab.py, same process, DRAM-resident
 * rings): 1.02-1.06x faster on SmolLM2's shape and 1.25x on the 7B shape than B = V re-packed
 * into token pairs in an L1 scratch per tile (permutes and stores of every V row). ---- */
#define AMX __attribute__((target("avx512f,avx512bw,avx512bf16,avx2,f16c,fma,amx-tile,amx-bf16")))

/* The 64-byte tile configuration (palette 1). Tiles: 0, 1 scores of tokens [0, 16) and [16, 32)
 * (16 x 2G fp32); 2 K (16 tokens x 32 bf16); 3 queries of one 32-dim chunk (16 dim pairs x 2G);
 * 4, 7 P of tokens [0, 16) and [16, 32) (4 x pv_heads(G) rows x 16 words); 5 V (16 tokens x 32
 * bf16); 6 P.V of one 32-dim chunk (4 x pv_heads(G) rows x 16 fp32). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileCfg;

/* The configurations for each group size, built once at module init: gcc's _tile_loadconfig
 * tells the compiler it reads only 8 bytes, so a configuration written just before it may be
 * dropped as a dead store. */
static TileCfg amx_cfg[AMX_MAX_GROUP + 1];

/* Query heads per P.V pass: each takes 4 rows of the 16-row A tile (hi / lo x even / odd dims). */
static inline int pv_heads(int G) { return G < 4 ? G : 4; }

static void amx_build_configs(void) {
    for (int G = 1; G <= AMX_MAX_GROUP; G++) {
        TileCfg *cfg = &amx_cfg[G];
        const uint8_t R = (uint8_t)(4 * pv_heads(G));
        const uint8_t rows[8] = {16, 16, 16, 16, R, 16, R, R};
        const uint16_t colsb[8] = {8 * G, 8 * G, 64, 8 * G, 64, 64, 64, 64};
        memset(cfg, 0, sizeof *cfg);
        cfg->palette = 1;
        for (int i = 0; i < 8; i++) cfg->rows[i] = rows[i], cfg->colsb[i] = colsb[i];
    }
}

/* Loads the tile configuration for query groups of G on the calling thread (once per task:
 * other code on the thread, e.g. torch's own AMX kernels, may have replaced it). */
AMX static void amx_config(int G) { _tile_loadconfig(&amx_cfg[G]); }

/* fp32 lanes of the 16 bf16 values in x */
/* The score B tiles of a task's nh KV heads from its scaled queries qs [nh * G, d]: one tile per
 * KV head i and 32-dim chunk c, 16 rows (dim pairs) x 2G columns: the 32-bit word
 * qb[((i * d / 32 + c) * 16 + r) * 2G + col] holds dims (32c + 2r, 32c + 2r + 1) of query head
 * g = col, bf16 hi (col < G), or of query head g = col - G, bf16 lo. nh * G * d words. */
AMX static void amx_queries(const float *qs, int nh, int G, int d, uint32_t *qb) {
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(2 * G));
    for (int i = 0; i < nh; i++)
        for (int g = 0; g < G; g++)
            for (int j = 0; j < d; j += 32) {
                const float *q = qs + ((size_t)i * G + g) * d + j;
                __m512i hi, lo;
                bf16_split(_mm512_loadu_ps(q), _mm512_loadu_ps(q + 16), &hi, &lo);
                uint32_t *t = qb + (size_t)(i * (d / 32) + j / 32) * 16 * 2 * G;
                _mm512_i32scatter_epi32(t + g, rows, hi, 4);
                _mm512_i32scatter_epi32(t + G + g, rows, lo, 4);
            }
}

/* One tile (TileFn's contract) of n <= TILE tokens whose rows off[0..n) start at a multiple of 16
 * tokens of a page; qb: the KV head's score B tiles (amx_queries); vb: scratch of d / 16 KiB,
 * 64-byte aligned. The tile configuration of amx_config(c->group) must be loaded. */
AMX static void tile_amx(const Ctx *c, const uint16_t *k, const uint16_t *v, const size_t *off,
                         int n, const uint32_t *qb, float *m, float *l, float *acc,
                         uint16_t *vb) {
    const int G = c->group, d = c->d, G2 = 2 * G, blocks = n > 16 ? 2 : 1;
    float s[MAX_GROUP][TILE] __attribute__((aligned(64)));
    float ct[2][16 * 2 * AMX_MAX_GROUP] __attribute__((aligned(64)));
    /* scores, [token][hi | lo columns], then s[g] = column g + column G + g */
    _tile_zero(0);
    _tile_zero(1);
    for (int j = 0; j < d; j += 32) {
        _tile_loadd(3, qb + (size_t)(j / 32) * 16 * G2, G2 * 4);
        _tile_loadd(2, k + off[0] + j, d * 2);
        _tile_dpbf16ps(0, 2, 3);
        if (blocks == 2) {
            _tile_loadd(2, k + off[16] + j, d * 2);
            _tile_dpbf16ps(1, 2, 3);
        }
    }
    _tile_stored(0, ct[0], G2 * 4);
    if (blocks == 2) _tile_stored(1, ct[1], G2 * 4);
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(G2));
    for (int g = 0; g < G; g++)
        for (int b = 0; b < blocks; b++) {
            const __m512 hi = _mm512_i32gather_ps(rows, ct[b] + g, 4);
            const __m512 lo = _mm512_i32gather_ps(rows, ct[b] + G + g, 4);
            _mm512_store_ps(&s[g][16 * b], _mm512_add_ps(hi, lo));
        }
    softmax16(s, m, l, acc, n, G, d);
    /* P.V: A = P as 32-bit words (p, 0) and (0, p), one token per word, so that B can be V's
     * rows straight from the page: B row k = token k's 32 dims [j, j + 32) as 16 words of two
     * dims, and C row (g, hi|lo, even) collects dims j + 2w, row (g, hi|lo, odd) dims j + 2w + 1.
     * Rows: 4 per query head (hi even, hi odd, lo even, lo odd), pv_heads(G) heads per pass.
     * V rows past n in the last block are copied into zeroed scratch instead (0 x the stale
     * page memory past n, which may hold NaN, would be NaN). */
    const int GC = pv_heads(G);
    uint32_t pa[2][16][16] __attribute__((aligned(64)));
    float cv[16][16] __attribute__((aligned(64)));
    const uint16_t *vrow[2]; /* each block's 16 V rows, d values apart */
    for (int b = 0; b < blocks; b++) {
        vrow[b] = v + off[16 * b];
        if (16 * b + 16 > n) {
            uint16_t *z = vb + (size_t)b * 16 * d;
            const int m0 = n - 16 * b;
            memcpy(z, vrow[b], (size_t)m0 * d * 2);
            memset(z + (size_t)m0 * d, 0, (size_t)(16 - m0) * d * 2);
            vrow[b] = z;
        }
    }
    const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ihi = _mm512_add_epi32(ilo, _mm512_set1_epi32(8));
    for (int g0 = 0; g0 < G; g0 += GC) {
        if (g0 + GC > G) /* the last pass's rows past G: zero P, so zero rows of C */
            memset(pa, 0, sizeof(uint32_t) * blocks * 16 * 16);
        for (int gl = 0; gl < GC && g0 + gl < G; gl++) {
            __m512i hi, lo;
            bf16_split(_mm512_load_ps(&s[g0 + gl][0]), _mm512_load_ps(&s[g0 + gl][16]), &hi, &lo);
            for (int b = 0; b < blocks; b++) {
                const __m512i h = _mm512_cvtepu16_epi32(b ? _mm512_extracti64x4_epi64(hi, 1)
                                                          : _mm512_castsi512_si256(hi));
                const __m512i w = _mm512_cvtepu16_epi32(b ? _mm512_extracti64x4_epi64(lo, 1)
                                                          : _mm512_castsi512_si256(lo));
                _mm512_store_si512(pa[b][4 * gl], h);
                _mm512_store_si512(pa[b][4 * gl + 1], _mm512_slli_epi32(h, 16));
                _mm512_store_si512(pa[b][4 * gl + 2], w);
                _mm512_store_si512(pa[b][4 * gl + 3], _mm512_slli_epi32(w, 16));
            }
        }
        _tile_loadd(4, pa[0], 64);
        if (blocks == 2) _tile_loadd(7, pa[1], 64);
        for (int j = 0; j < d; j += 32) {
            _tile_zero(6);
            _tile_loadd(5, vrow[0] + j, d * 2);
            _tile_dpbf16ps(6, 4, 5);
            if (blocks == 2) {
                _tile_loadd(5, vrow[1] + j, d * 2);
                _tile_dpbf16ps(6, 7, 5);
            }
            _tile_stored(6, cv, 64);
            for (int gl = 0; gl < GC && g0 + gl < G; gl++) {
                const __m512 ev = _mm512_add_ps(_mm512_load_ps(cv[4 * gl]),
                                                _mm512_load_ps(cv[4 * gl + 2]));
                const __m512 od = _mm512_add_ps(_mm512_load_ps(cv[4 * gl + 1]),
                                                _mm512_load_ps(cv[4 * gl + 3]));
                float *a = acc + (g0 + gl) * d + j;
                _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a),
                                                  _mm512_permutex2var_ps(ev, ilo, od)));
                _mm512_storeu_ps(a + 16, _mm512_add_ps(_mm512_loadu_ps(a + 16),
                                                       _mm512_permutex2var_ps(ev, ihi, od)));
            }
        }
    }
}

#endif

/* ---- the job: tasks from a shared counter, then the merge ---- */

/* Prefetches the K and V rows next[0..nn) of every KV head of task t, into L1 (prefetch_row)
 * or, with l2, into L2 (prefetch_row_l2). */
static void prefetch_tile(const Ctx *c, const Task *t, const size_t *next, int nn, int l2) {
    const size_t hstride = (size_t)c->ps * c->d;
    for (int i = 0; i < t->nh; i++) {
        const size_t h = (size_t)(t->h0 + i) * hstride;
        for (int r = 0; r < nn; r++) {
            if (l2) {
                prefetch_row_l2(c->k + h + next[r], c->d);
                prefetch_row_l2(c->v + h + next[r], c->d);
            } else {
                prefetch_row(c->k + h + next[r], c->d);
                prefetch_row(c->v + h + next[r], c->d);
            }
        }
    }
}

/* Stores the state (m, l, acc) of every KV head of task t as partial `slot` (of head h0 + i:
 * slot + i * sstride). */
static void flush(const Ctx *c, const Task *t, int32_t slot, const float *m, const float *l,
                  const float *acc) {
    const int G = c->group, d = c->d;
    for (int i = 0; i < t->nh; i++) {
        const size_t s = (size_t)slot + (size_t)i * t->sstride;
        memcpy(c->pm + s * G, m + i * G, sizeof(float) * G);
        memcpy(c->pl + s * G, l + i * G, sizeof(float) * G);
        memcpy(c->pacc + s * G * d, acc + i * G * d, sizeof(float) * G * d);
    }
}

/* Prefetches into L2 the first tile's K and V rows (all its KV heads) of the task the shared
 * counter hands out next (to this thread or another: on a Zen 4 a line in the other core's L2
 * is still closer than DRAM). tile_bf16 prefetches a task's later tiles itself; this covers its
 * first, which would otherwise start on DRAM at every task of a batch of short requests. */
static void prefetch_next_task(Ctx *c) {
    const int j = atomic_load_explicit(&c->next, memory_order_relaxed);
    if (j >= c->ntasks) return;
    const Task *u = &c->tasks[j];
    const int n = u->hi - u->lo < TILE ? u->hi - u->lo : TILE;
    size_t rows[TILE];
    tile_rows(c, u, u->lo, n, rows);
    prefetch_tile(c, u, rows, n, 1);
}

/* Runs one task: tile after tile, each of its KV heads in turn (one pass over each page's run
 * of K and V), then writes its output rows, or its partials when its request is split. */
static void run_task(Ctx *c, const Task *t) {
    const int G = c->group, d = c->d, rows = t->nh * G;
    float qs[TASK_FLOATS] __attribute__((aligned(64)));
    float acc[TASK_FLOATS] __attribute__((aligned(64)));
    float vt[TILE * MAX_HEAD_DIM] __attribute__((aligned(64)));
    float m[MAX_ROWS], l[MAX_ROWS];
    TileFn tile = tile_scalar;
#if HAVE_AVX2_KERNELS
    if (c->simd >= ISA_AVX512) tile = tile_avx512;
    else if (c->simd == ISA_AVX2) tile = tile_avx2;
    uint32_t qb[TASK_FLOATS] __attribute__((aligned(64)));
#endif
    const int amx = c->simd == ISA_AMX, bf = c->simd == ISA_BF16;
    const size_t qrow = ((size_t)t->b * c->hkv + t->h0) * G * d;
    for (int i = 0; i < rows * d; i++) qs[i] = c->q[qrow + i] * c->scale;
    for (int r = 0; r < rows; r++) m[r] = -INFINITY, l[r] = 0.0f;
    memset(acc, 0, sizeof(float) * rows * d);
#if HAVE_AVX2_KERNELS
    if (amx) {
        amx_config(G);
        amx_queries(qs, t->nh, G, d, qb);
    }
    uint16_t *qh = (uint16_t *)qb, *ql = qh + rows * d; /* ISA_BF16: the queries' hi, lo */
    const int use_lo = bf && bf16_queries(qs, rows * d, qh, ql);
#endif
    const size_t hstride = (size_t)c->ps * d;
    int32_t slot = t->slot, end = t->lo + t->part < t->hi ? t->lo + t->part : t->hi;
    for (int t0 = t->lo, n; t0 < t->hi; t0 += n) {
        if (t0 == end) { /* a partial done (part_tokens grid): store it, start the next */
            flush(c, t, slot++, m, l, acc);
            for (int r = 0; r < rows; r++) m[r] = -INFINITY, l[r] = 0.0f;
            memset(acc, 0, sizeof(float) * rows * d);
            end = end + t->part < t->hi ? end + t->part : t->hi;
        }
        /* AMX tiles start at a multiple of 16 tokens: a task that starts elsewhere (a window's
         * start) runs one AVX-512 tile up to there (the m, l, acc state is the same) */
        const int lead = amx && t0 % 16 ? 16 - t0 % 16 : TILE;
        n = end - t0 < lead ? end - t0 : lead;
        const int nn = t->hi - t0 - n < TILE ? t->hi - t0 - n : TILE; /* rows of the next tile */
        size_t off[TILE], next[TILE];
        tile_rows(c, t, t0, n, off);
        tile_rows(c, t, t0 + n, nn, next);
        if (c->simd == ISA_AVX512 || amx) prefetch_tile(c, t, next, nn, !amx_granted);
        if (bf && nn == 0) prefetch_next_task(c);
        for (int i = 0; i < t->nh; i++) {
            const size_t h = (size_t)(t->h0 + i) * hstride;
#if HAVE_AVX2_KERNELS
            if (amx && t0 % 16 == 0) {
                tile_amx(c, c->k + h, c->v + h, off, n, qb + (size_t)i * G * d, m + i * G,
                         l + i * G, acc + i * G * d, (uint16_t *)vt);
                continue;
            }
            if (bf) {
                tile_bf16(c, c->k + h, c->v + h, off, n, next, nn, qh + (size_t)i * G * d,
                          ql + (size_t)i * G * d, use_lo, m + i * G, l + i * G, acc + i * G * d);
                continue;
            }
#endif
            tile(c, c->k + h, c->v + h, off, n, next, nn, qs + i * G * d, m + i * G, l + i * G,
                 acc + i * G * d, vt);
        }
    }
    if (slot >= 0) {
        flush(c, t, slot, m, l, acc);
        return;
    }
    float *o = c->out + qrow;
    for (int r = 0; r < rows; r++) {
        const float inv = 1.0f / l[r];
        for (int j = 0; j < d; j++) o[r * d + j] = acc[r * d + j] * inv;
    }
}

/* One thread's part of a call: the next task from the shared counter until none is left. */
static void take_tasks(Ctx *c) {
    for (;;) {
        const int i = atomic_fetch_add(&c->next, 1);
        if (i >= c->ntasks) return;
        run_task(c, &c->tasks[i]);
    }
}

/* Runs every task of c on up to nthreads threads of the calling thread's OpenMP team (one
 * thread: on the caller alone, no region); returns the number of threads that ran. */
static int run_job(Ctx *c, int nthreads) {
    if (nthreads <= 1) {
        take_tasks(c);
        return 1;
    }
    int used = 1;
#pragma omp parallel num_threads(nthreads)
    {
        take_tasks(c);
#pragma omp master
        used = omp_get_num_threads();
    }
    return used;
}

/* Combines the partials of slots [s0, s0 + ns) into the output rows of (b, h). */
static void merge(const Ctx *c, int b, int h, int s0, int ns) {
    const int G = c->group, d = c->d;
    float *o = c->out + ((size_t)b * c->hkv * G + (size_t)h * G) * d;
    for (int g = 0; g < G; g++) {
        float M = -INFINITY, L = 0.0f;
        for (int s = s0; s < s0 + ns; s++) M = fmaxf(M, c->pm[(size_t)s * G + g]);
        for (int j = 0; j < d; j++) o[g * d + j] = 0.0f;
        for (int s = s0; s < s0 + ns; s++) {
            const float w = expf(c->pm[(size_t)s * G + g] - M);
            L += w * c->pl[(size_t)s * G + g];
            const float *a = c->pacc + ((size_t)s * G + g) * d;
            for (int j = 0; j < d; j++) o[g * d + j] += w * a[j];
        }
        const float inv = 1.0f / L;
        for (int j = 0; j < d; j++) o[g * d + j] *= inv;
    }
}

/* Ranges a span of n tokens is cut into: min(max_splits, ceil(n / min_split)), each a whole
 * number of TILE-token tiles (*chunk tokens), with one partial per range (*part = *chunk,
 * *parts = ranges). With part_tokens > 0: ranges of whole parts (at most that many ranges, as
 * even as whole parts allow), one partial per part (*parts of them, *part tokens each):
 * part_tokens tokens, or past MAX_PARTS of them, MAX_PARTS equal parts of whole tiles. */
static int64_t n_splits(int64_t n, int max_splits, int min_split, int part_tokens,
                        int64_t *chunk, int64_t *part, int64_t *parts) {
    int64_t ns = (n + min_split - 1) / min_split;
    ns = ns < 1 ? 1 : ns > max_splits ? max_splits : ns;
    if (part_tokens > 0) {
        int64_t p = part_tokens, np = (n + p - 1) / p;
        if (np > MAX_PARTS) {
            p = ((n + MAX_PARTS - 1) / MAX_PARTS + TILE - 1) / TILE * TILE;
            np = (n + p - 1) / p;
        }
        const int64_t k = ns < np ? ns : np, per = (np + k - 1) / k;
        *chunk = per * p, *part = p, *parts = np;
        return (np + per - 1) / per;
    }
    int64_t c = (n + ns - 1) / ns;
    c = (c + TILE - 1) / TILE * TILE;
    ns = (n + c - 1) / c;
    *chunk = c, *part = c, *parts = ns;
    return ns;
}

/* KV heads per task, for `pieces` (request, split) ranges on `nthreads` threads: with `fuse`, as
 * many of a request's heads as fit the task's buffers (at least one: G x d <= TASK_FLOATS), when
 * that still leaves FUSED_TASKS_PER_THREAD tasks per thread (or one thread runs them all);
 * otherwise one (more, smaller tasks balance better over the threads). Without `fuse`, always one
 * (the machine profile's fuse_heads, calibrated per page dtype). cost.task_heads mirrors this. */
#define FUSED_TASKS_PER_THREAD 4
static int heads_per_task(int hkv, int G, int d, int64_t pieces, int nthreads, int fuse) {
    if (!fuse) return 1;
    int hb = TASK_FLOATS / (G * d);
    hb = hb < MAX_ROWS / G ? hb : MAX_ROWS / G;
    hb = hb < hkv ? hb : hkv;
    const int64_t fused = pieces * ((hkv + hb - 1) / hb);
    return nthreads == 1 || fused >= (int64_t)FUSED_TASKS_PER_THREAD * nthreads ? hb : 1;
}

/* Whether a call's geometry runs the AMX tile (where the CPU has it): bf16 pages, head_dim a
 * multiple of 32 (K chunks), at most AMX_MAX_GROUP query heads per KV head (2G score columns), and
 * pages of a multiple of 16 tokens (a 16-token K block inside one page). fp16 pages (no AMX-FP16
 * here) and other shapes run the AVX-512 kernel. */
static int amx_fits(int dt, int G, int d, int ps) {
    return dt == DT_BF16 && d % 32 == 0 && G <= AMX_MAX_GROUP && ps % 16 == 0;
}

static int by_size_desc(const void *x, const void *y) {
    const Task *a = x, *b = y;
    return (b->hi - b->lo) * b->nh - (a->hi - a->lo) * a->nh;
}

/* decode(q_ptr, k_ptr, v_ptr, pool_elems, tables, lengths, out_ptr, q_heads, kv_heads,
 *        head_dim, page_size, dtype, scale, max_splits, min_split_tokens, nthreads[, starts,
 *        part_tokens, fuse_heads])
 *   -> (tasks, partials of split requests (per KV head), threads used)
 * q and out: float32 [B, q_heads, head_dim] (B = len(lengths)); k, v: 16-bit
 * [pages, kv_heads, page_size, head_dim] with pool_elems elements each; tables: int32 [B, W];
 * lengths: int32 [B]. A request of n tokens is split into min(max_splits,
 * ceil(n / min_split_tokens)) ranges (rounded to whole TILE-token tiles).
 * starts (optional, int32 [B]; absent or empty = all 0): request b attends to its tokens
 * [starts[b], lengths[b]) only (a sliding-window layer's visible slots), 0 <= start < length.
 * part_tokens (optional, 0 = off; else a multiple of TILE): partials on that grid (n_splits).
 * fuse_heads (optional, default 1): 0 = one KV head per task (heads_per_task). */
static PyObject *decode(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long qp, kp, vp, op;
    long long pool_elems;
    Py_buffer tb, lb, sb = {0};
    int hq, hkv, d, ps, dt, max_splits, min_split, nthreads, part_tokens = 0, fuse = 1;
    float scale;
    if (!PyArg_ParseTuple(args, "KKKLy*y*Kiiiiifiii|y*ip", &qp, &kp, &vp, &pool_elems, &tb, &lb,
                          &op, &hq, &hkv, &d, &ps, &dt, &scale, &max_splits, &min_split,
                          &nthreads, &sb, &part_tokens, &fuse))
        return NULL;
    PyObject *ret = NULL;
    Task *tasks = NULL;
    Merge *mg = NULL;
    float *part = NULL;
    const int64_t B = lb.len / 4;
    const char *bad = NULL;
    if (hkv < 1 || hkv > MAX_HEADS || hq < hkv || hq % hkv || hq / hkv > MAX_GROUP || d < 1 ||
        d > MAX_HEAD_DIM || ps < 1 || (dt != DT_F16 && dt != DT_BF16) || max_splits < 1 ||
        min_split < 1 || nthreads < 1 || nthreads > MAX_THREADS || pool_elems < 0 ||
        !(scale > 0.0f) || lb.len % 4 || B < 1 || part_tokens < 0 || part_tokens % TILE)
        bad = "invalid decode geometry";
    else if (tb.len % (4 * B))
        bad = "block table size is not batch x width";
    else if (sb.buf && sb.len && sb.len != 4 * B)
        bad = "starts must hold one int32 per request";
    const int64_t W = bad ? 0 : tb.len / (4 * B);
    const int64_t row_elems = (int64_t)hkv * ps * d;
    const int64_t P = bad ? 0 : pool_elems / row_elems;
    if (!bad && pool_elems % row_elems) bad = "page pool size is not a whole number of pages";
    const int32_t *tables = tb.buf, *lengths = lb.buf;
    const int32_t *starts = sb.buf && sb.len ? sb.buf : NULL;
    int64_t pieces = 0, nslots = 0, bytes = 0;
    for (int64_t b = 0; b < B && !bad; b++) {
        const int64_t n = lengths[b];
        if (n < 1 || n > W * ps) {
            bad = "a length is < 1 or exceeds the block table's width";
            break;
        }
        const int64_t lo = starts ? starts[b] : 0;
        if (lo < 0 || lo >= n) {
            bad = "a start is < 0 or not below its length";
            break;
        }
        for (int64_t p = lo / ps; p < (n + ps - 1) / ps; p++)
            if (tables[b * W + p] < 0 || tables[b * W + p] >= P) {
                bad = "a block table entry points outside the page pool";
                break;
            }
        int64_t chunk, part, parts;
        pieces += n_splits(n - lo, max_splits, min_split, part_tokens, &chunk, &part, &parts);
        if (parts > 1) nslots += parts * hkv;
        bytes += 2 * (n - lo) * hkv * d * 2;
    }
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad);
        goto done;
    }
    const int G = hq / hkv, hb = heads_per_task(hkv, G, d, pieces, nthreads, fuse);
    const int64_t ntasks = pieces * ((hkv + hb - 1) / hb);
    tasks = PyMem_Malloc(sizeof(Task) * (size_t)ntasks);
    mg = PyMem_Malloc(sizeof(Merge) * (size_t)B * hkv);
    part = PyMem_Malloc(sizeof(float) * (size_t)(nslots ? nslots : 1) * G * (d + 2));
    if (!tasks || !mg || !part) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t i = 0, slot = 0, nmerges = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t n = lengths[b], first = starts ? starts[b] : 0;
        int64_t chunk, part, np;
        const int64_t ns = n_splits(n - first, max_splits, min_split, part_tokens, &chunk, &part,
                                    &np);
        /* the partials of (b, h, part p) are slot + h * np + p; range s starts at part
         * s * chunk / part */
        for (int h = 0; h < hkv && np > 1; h++)
            mg[nmerges++] = (Merge){(int32_t)b, h, (int32_t)(slot + h * np), (int32_t)np};
        for (int h0 = 0; h0 < hkv; h0 += hb)
            for (int64_t s = 0; s < ns; s++) {
                const int64_t lo = first + s * chunk, hi = lo + chunk < n ? lo + chunk : n;
                const int64_t first_slot = slot + h0 * np + s * (chunk / part);
                tasks[i++] = (Task){(int32_t)b, h0, hkv - h0 < hb ? hkv - h0 : hb, (int32_t)lo,
                                    (int32_t)hi, np > 1 ? (int32_t)first_slot : -1, (int32_t)np,
                                    (int32_t)part};
            }
        if (np > 1) slot += np * hkv;
    }
    Ctx c = {.q = (const float *)qp, .k = (const uint16_t *)kp, .v = (const uint16_t *)vp,
             .tables = tables, .W = (int)W, .ps = ps, .hkv = hkv, .group = G, .d = d, .dt = dt,
             .simd = isa_level == ISA_AMX && amx_fits(dt, G, d, ps) ? ISA_AMX
                     : isa_level >= ISA_BF16 && dt == DT_BF16 && d % 32 == 0 ? ISA_BF16
                     : isa_level >= ISA_AVX512 && d % 16 == 0 ? ISA_AVX512
                     : isa_level >= ISA_AVX2 && d % 8 == 0 ? ISA_AVX2 : ISA_SCALAR, .scale = scale, .tasks = tasks,
             .ntasks = (int)ntasks, .out = (float *)op, .pm = part,
             .pl = part + (size_t)nslots * G, .pacc = part + (size_t)nslots * G * 2};
    atomic_store(&c.next, 0);
    int used;
    Py_BEGIN_ALLOW_THREADS
    if (ntasks > 1) qsort(tasks, (size_t)ntasks, sizeof(Task), by_size_desc);
    used = run_job(&c, ntasks > 1 && bytes >= SMALL_JOB_BYTES ? nthreads : 1);
    for (int64_t k = 0; k < nmerges; k++) merge(&c, mg[k].b, mg[k].h, mg[k].s0, mg[k].ns);
    Py_END_ALLOW_THREADS
    ret = Py_BuildValue("LLi", (long long)ntasks, (long long)(nslots / hkv), used);
done:
    PyMem_Free(tasks);
    PyMem_Free(mg);
    PyMem_Free(part);
    PyBuffer_Release(&tb);
    PyBuffer_Release(&lb);
    if (sb.obj) PyBuffer_Release(&sb);
    return ret;
}

/* write_rows(k_pages, v_pages, pool_rows, rows, k, k_stride, k_hstride, v, v_stride, v_hstride,
 *            batch, heads, d):
 * tokens' K/V rows into their page slots, in one call for K and V: a decode step's new token per
 * request, or a prompt's tokens (batch = tokens). The pools are viewed as pool_rows rows of d
 * 16-bit values (fp16 or bf16, the caller has matched the dtypes: a plain copy); rows is int64
 * [batch x heads], batch-major. Row (b, h) of k starts at element b * k_stride + h * k_hstride (v
 * alike), so a strided slice of a larger buffer, or a [heads, tokens, d] prompt, needs no copy.
 * Every row is checked against the pool before anything is written. */
static PyObject *write_rows(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long kp, vp, rp, ks_p, vs_p;
    long long pool_rows, k_stride, k_hstride, v_stride, v_hstride, batch, heads, d;
    if (!PyArg_ParseTuple(args, "KKLKKLLKLLLLL", &kp, &vp, &pool_rows, &rp, &ks_p, &k_stride,
                          &k_hstride, &vs_p, &v_stride, &v_hstride, &batch, &heads, &d))
        return NULL;
    if (batch < 0 || heads < 1 || d < 1 || k_stride < 0 || v_stride < 0 || k_hstride < 0 ||
        v_hstride < 0) {
        PyErr_SetString(PyExc_ValueError, "write_rows: bad batch/heads/head_dim/strides");
        return NULL;
    }
    const int64_t *rows = (const int64_t *)(uintptr_t)rp;
    for (int64_t i = 0; i < batch * heads; i++)
        if (rows[i] < 0 || rows[i] >= pool_rows) {
            PyErr_SetString(PyExc_ValueError, "a slot row lies outside the page pool");
            return NULL;
        }
    uint16_t *K = (uint16_t *)(uintptr_t)kp, *V = (uint16_t *)(uintptr_t)vp;
    const uint16_t *k = (const uint16_t *)(uintptr_t)ks_p, *v = (const uint16_t *)(uintptr_t)vs_p;
    const size_t row_bytes = (size_t)d * sizeof(uint16_t);
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < heads; h++) {
            const int64_t r = rows[b * heads + h];
            memcpy(K + r * d, k + b * k_stride + h * k_hstride, row_bytes);
            memcpy(V + r * d, v + b * v_stride + h * v_hstride, row_bytes);
        }
    Py_RETURN_NONE;
}

/* set_isa(level) -> previous: use at most this kernel (0 scalar, 1 AVX2, 2 AVX-512, 3 AVX512-BF16
 * for bf16 pages, 4 AMX for bf16 pages), as far as the CPU has it; e.g. to test or time the other
 * kernels. */
static PyObject *set_isa(PyObject *self, PyObject *args) {
    (void)self;
    int level, previous = isa_level;
    if (!PyArg_ParseTuple(args, "i", &level)) return NULL;
    const int best = cpu_isa();
    isa_level = level < ISA_SCALAR ? ISA_SCALAR : level > best ? best : level;
    return PyLong_FromLong(previous);
}

static PyObject *isa(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyLong_FromLong(isa_level);
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "Paged GQA decode attention over block tables."},
    {"write_rows", write_rows, METH_VARARGS, "A step's new K/V rows into their page slots."},
    {"isa", isa, METH_NOARGS,
     "The kernel in use: 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX512-BF16, 4 AMX."},
    {"set_isa", set_isa, METH_VARARGS, "Use at most this kernel (0 to 4)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_attention", NULL, -1, methods};

PyMODINIT_FUNC PyInit__attention(void) {
#if HAVE_AVX2_KERNELS
    __builtin_cpu_init();
    amx_granted = request_amx();
    if (amx_granted) amx_build_configs();
#endif
    isa_level = cpu_isa();
    return PyModule_Create(&module);
}

/* Causal prefill attention of one prompt on AMX-BF16 tiles or AVX512-BF16 dot products,
 * grouped-query: q [Hq, T, d], k and v [Hkv, T, d] (bf16, d = 64 or 128; any head and token
 * strides, even, with the d dims contiguous; Hq a multiple of Hkv) -> out [T, Hq, d] bf16,
 * contiguous (the AMX kernel takes d = 64; d = 128 runs on AVX512-BF16 everywhere). The
 * torch reference is F.scaled_dot_product_attention(is_causal=True) (engines.flash,
 * tests/test_flash.py). Kernels: "amx" where the CPU has AMX-BF16 and Linux grants the tile
 * state, else "avx512bf16" (VDPBF16PS, e.g. AMD Zen 4), the best the CPU has (set_isa may lower
 * it); both compute the same softmax from the same packed K/V, up to float rounding.
 *
 * K and V are first packed per KV head into the VNNI layout (O(T x 64) per head, the threads
 * sharing the heads' blocks): K as the B operand of S = Q K^T (per 16 keys and 32-dim chunk,
 * 16 rows of dim pairs x 16 keys), V as the B operand of O += P V (per 32 keys and 16-dim
 * column block, 16 rows of key pairs x 16 dims); keys past T are zero. One row of either is one
 * AVX-512 register of 16 pairs: VDPBF16PS takes it as is, with the A pair broadcast.
 *
 * A task is (query head h, 16 query rows from q0); tasks run longest first (the rows attend to
 * q0 + 16 keys), each thread taking the next from OpenMP's dynamic schedule. Per block of 32
 * keys: S (16 x 32 fp32) from the 16 rows of Q (AMX: two tiles; AVX512-BF16: 8 rows x 32 keys
 * in registers at a time); the online softmax in AVX-512 with exp2 (scores pre-multiplied by
 * scale x log2 e); causal keys past a row's position are masked to exactly 0; P rounded to bf16
 * (l sums the rounded values, so the weights O is divided by are the ones it was built from);
 * O += P V into 16 rows x 64 dims of fp32 (AMX: four tiles that stay in tile registers for the
 * whole task; AVX512-BF16: 4 rows at a time in registers, the rest in L1). The row max is lazy:
 * O and l are rescaled only when a row's max rises more than RESCALE (log2 units, so P <=
 * 2^RESCALE) above the max they were built with; the result is the same softmax, exact up to
 * rounding. Scratch per task: a few KiB on the stack; packed K and V: 2 x Hkv x T x 64 x 2
 * bytes. The GIL is released while the threads run. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../_amx.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AMX 1
#define AMX __attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16,amx-tile,amx-bf16")))
#define BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16")))
#else
#define HAVE_AMX 0
#endif

#define D 64         /* the AMX kernel's head dim: four output tiles hold 16 rows x 64 fp32 */
#define MAX_D 128    /* the AVX512-BF16 kernel takes head dim 64 or 128 */
#define QB 16        /* query rows per task */
#define KB 32        /* keys per block */
#define RESCALE 8.0f /* how far (log2) a row's max may rise before O and l are rescaled */
#define MAX_THREADS 64

static int amx_ok;  /* the CPU has AMX-BF16 and Linux granted the tile state */
static int bf16_ok; /* the CPU has AVX512-BF16 (and F, BW, DQ) */
static int use_amx; /* the kernel in use: AMX tiles (1) or AVX512-BF16 (0); set_isa */

#if HAVE_AMX
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileCfg;

/* Every tile 16 rows x 64 bytes. 0, 1: S of keys [0, 16) and [16, 32) of a block; 2: the A
 * operand (a 32-dim chunk of Q, or P); 3: the B operand (packed K or V); 4-7: O, 16 dims each. */
static TileCfg cfg;

typedef struct {
    const uint16_t *q;
    int64_t qh, qt; /* q's strides (elements): head, token */
    const uint32_t *kp, *vp; /* packed K and V, Tpad x d / 2 words per KV head */
    uint16_t *out;
    int T, Tpad, hq, group, d; /* d: head dim, 64 or 128 (AMX: 64) */
    float scale2; /* scale x log2(e) */
} Job;

/* 2^x for x <= RESCALE (clamped at -126; callers zero the masked lanes): 2^floor(x) times a
 * degree-4 polynomial of 2^f on f in [0, 1) fitted for relative error (< 3e-6, far below bf16's
 * 2^-9, to which P is rounded next). */
BF16 static inline __m512 exp2_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    const __m512 xi = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, xi);
    __m512 p = _mm512_set1_ps(1.352061682e-2f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.203751989e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.414273438e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.930066806e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000002513f));
    return _mm512_scalef_ps(p, xi);
}

BF16 static inline __m512 bf16_ps(__m256i x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

static inline uint32_t pair(const uint16_t *lo, const uint16_t *hi) {
    return (uint32_t)*lo | (uint32_t)*hi << 16;
}

/* Packs block `blk` of KV head g (head dim d): 16 keys of K (d / 32 chunks of 32 dims) and, for
 * even blk, 32 keys of V (d / 16 column blocks of 16 dims). */
static void pack_block(const uint16_t *k, int64_t kh, int64_t kt, const uint16_t *v, int64_t vh,
                       int64_t vt, int T, int Tpad, int d, int g, int blk, uint32_t *kp,
                       uint32_t *vp) {
    uint32_t *kd = kp + (size_t)g * Tpad * (d / 2) + (size_t)blk * 16 * (d / 2);
    for (int c = 0; c < d / 32; c++)
        for (int n = 0; n < 16; n++) {
            const int t = blk * 16 + n;
            const uint16_t *row = k + g * kh + (int64_t)t * kt + c * 32;
            for (int r = 0; r < 16; r++)
                kd[c * 256 + r * 16 + n] = t < T ? pair(row + 2 * r, row + 2 * r + 1) : 0;
        }
    if (blk % 2) return;
    const int kb = blk / 2;
    uint32_t *vd = vp + (size_t)g * Tpad * (d / 2) + (size_t)kb * KB * (d / 2);
    for (int r = 0; r < 16; r++) {
        const int t0 = kb * KB + 2 * r, t1 = t0 + 1;
        const uint16_t *r0 = v + g * vh + (int64_t)t0 * vt, *r1 = v + g * vh + (int64_t)t1 * vt;
        for (int n4 = 0; n4 < d / 16; n4++)
            for (int i = 0; i < 16; i++) {
                const int col = n4 * 16 + i;
                const uint32_t lo = t0 < T ? r0[col] : 0, hi = t1 < T ? r1[col] : 0;
                vd[n4 * 256 + r * 16 + i] = lo | hi << 16;
            }
    }
}

AMX static void store_o(float *o) {
    _tile_stored(4, o, D * 4);
    _tile_stored(5, o + 16, D * 4);
    _tile_stored(6, o + 32, D * 4);
    _tile_stored(7, o + 48, D * 4);
}

AMX static void load_o(const float *o) {
    _tile_loadd(4, o, D * 4);
    _tile_loadd(5, o + 16, D * 4);
    _tile_loadd(6, o + 32, D * 4);
    _tile_loadd(7, o + 48, D * 4);
}

/* The online softmax of one block of KB keys from k0, rows q0 + r (r < QB): scores sbuf
 * [QB x KB] -> P rounded to bf16 in pbuf [QB x KB], each row's max m and partial sums of l (lv,
 * 16 per row) updated; fac[r] is what O's row r must be multiplied by before this block's P V
 * is added (1 unless the row's max rose). Returns whether any row's max rose. */
BF16 static int softmax_block(const float *sbuf, uint16_t *pbuf, float *lv, float *m, float *fac,
                              int q0, int k0, float scale2f) {
    const __m512 scale2 = _mm512_set1_ps(scale2f), ninf = _mm512_set1_ps(-INFINITY);
    int rescale = 0;
    for (int r = 0; r < QB; r++) {
        __m512 x0 = _mm512_mul_ps(_mm512_load_ps(sbuf + r * KB), scale2);
        __m512 x1 = _mm512_mul_ps(_mm512_load_ps(sbuf + r * KB + 16), scale2);
        const int lim = q0 + r - k0; /* keys k0 + i with i <= lim are visible */
        __mmask16 m0 = 0xFFFF, m1 = 0xFFFF;
        if (lim < KB - 1) {
            m0 = lim >= 15 ? 0xFFFF : (__mmask16)((1u << (lim + 1)) - 1);
            m1 = lim < 16 ? 0 : (__mmask16)((1u << (lim - 15)) - 1);
            x0 = _mm512_mask_mov_ps(ninf, m0, x0);
            x1 = _mm512_mask_mov_ps(ninf, m1, x1);
        }
        fac[r] = 1.0f; /* the common case: no score above m + RESCALE, no reduction */
        const __m512 top = _mm512_max_ps(x0, x1);
        if (_mm512_cmp_ps_mask(top, _mm512_set1_ps(m[r] + RESCALE), _CMP_GT_OQ)) {
            const float mx = _mm512_reduce_max_ps(top);
            fac[r] = m[r] == -INFINITY ? 0.0f : exp2f(m[r] - mx);
            _mm512_store_ps(lv + r * 16,
                            _mm512_mul_ps(_mm512_load_ps(lv + r * 16), _mm512_set1_ps(fac[r])));
            m[r] = mx;
            rescale = 1;
        }
        const __m512 mr = _mm512_set1_ps(m[r]);
        const __m512 p0 = _mm512_maskz_mov_ps(m0, exp2_ps(_mm512_sub_ps(x0, mr)));
        const __m512 p1 = _mm512_maskz_mov_ps(m1, exp2_ps(_mm512_sub_ps(x1, mr)));
        const __m512i pb = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);
        _mm512_store_si512((__m512i *)(pbuf + r * KB), pb);
        const __m512 rounded = _mm512_add_ps(bf16_ps(_mm512_castsi512_si256(pb)),
                                             bf16_ps(_mm512_extracti64x4_epi64(pb, 1)));
        _mm512_store_ps(lv + r * 16, _mm512_add_ps(_mm512_load_ps(lv + r * 16), rounded));
    }
    return rescale;
}

/* O's rows ([QB x d] fp32) times fac (the rows whose max rose; the others' fac is 1). */
BF16 static void rescale_o(float *obuf, const float *fac, int d) {
    for (int r = 0; r < QB; r++) {
        const __m512 f = _mm512_set1_ps(fac[r]);
        for (int j = 0; j < d; j += 16)
            _mm512_store_ps(obuf + r * d + j, _mm512_mul_ps(_mm512_load_ps(obuf + r * d + j), f));
    }
}

/* A task's rows q0 + r < T of out: O / l, rounded to bf16. */
BF16 static void write_out(const Job *J, int h, int q0, const float *obuf, const float *lv) {
    for (int r = 0; r < QB && q0 + r < J->T; r++) {
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_load_ps(lv + r * 16)));
        const int d = J->d;
        uint16_t *dst = J->out + ((size_t)(q0 + r) * J->hq + h) * d;
        for (int j = 0; j < d; j += 32) {
            const __m512 a = _mm512_mul_ps(_mm512_load_ps(obuf + r * d + j), inv);
            const __m512 b = _mm512_mul_ps(_mm512_load_ps(obuf + r * d + j + 16), inv);
            _mm512_storeu_si512((__m512i *)(dst + j), (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
    }
}

/* A task's Q rows ([QB x d], zeros past T), its rows' max and l: the state before the first
 * block. */
static void start_task(const Job *J, int h, int q0, uint16_t *qbuf, float *lv, float *m) {
    const int d = J->d;
    memset(lv, 0, sizeof(float) * QB * 16);
    for (int r = 0; r < QB; r++) {
        m[r] = -INFINITY;
        if (q0 + r < J->T)
            memcpy(qbuf + r * d, J->q + h * J->qh + (int64_t)(q0 + r) * J->qt, (size_t)d * 2);
        else
            memset(qbuf + r * d, 0, (size_t)d * 2);
    }
}

/* Query head h, rows [q0, q0 + QB) (those past T computed on zeros and not written) on AMX
 * tiles. The tile configuration must be loaded. */
AMX static void run_task(const Job *J, int h, int q0) {
    uint16_t qbuf[QB * D] __attribute__((aligned(64)));
    uint16_t pbuf[QB * KB] __attribute__((aligned(64)));
    float sbuf[QB * KB] __attribute__((aligned(64)));
    float obuf[QB * D] __attribute__((aligned(64)));
    float lv[QB * 16] __attribute__((aligned(64))); /* per row, 16 partial sums of l */
    float m[QB], fac[QB];
    const int g = h / J->group, T = J->T;
    start_task(J, h, q0, qbuf, lv, m);
    const uint32_t *kp = J->kp + (size_t)g * J->Tpad * (D / 2);
    const uint32_t *vp = J->vp + (size_t)g * J->Tpad * (D / 2);
    const int last = q0 + QB - 1 < T - 1 ? q0 + QB - 1 : T - 1; /* the last key any row sees */
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int kb = 0; kb <= last / KB; kb++) {
        const int k0 = kb * KB;
        _tile_zero(0);
        _tile_zero(1);
        const uint32_t *kblk = kp + (size_t)kb * KB * (D / 2); /* two 16-key blocks */
        _tile_loadd(2, qbuf, D * 2);
        _tile_loadd(3, kblk, 64);
        _tile_dpbf16ps(0, 2, 3);
        _tile_loadd(3, kblk + 512, 64);
        _tile_dpbf16ps(1, 2, 3);
        _tile_loadd(2, qbuf + 32, D * 2);
        _tile_loadd(3, kblk + 256, 64);
        _tile_dpbf16ps(0, 2, 3);
        _tile_loadd(3, kblk + 768, 64);
        _tile_dpbf16ps(1, 2, 3);
        _tile_stored(0, sbuf, KB * 4);
        _tile_stored(1, sbuf + 16, KB * 4);
        if (softmax_block(sbuf, pbuf, lv, m, fac, q0, k0, J->scale2) && kb > 0) {
            store_o(obuf);
            rescale_o(obuf, fac, D);
            load_o(obuf);
        }
        const uint32_t *vblk = vp + (size_t)kb * KB * (D / 2);
        _tile_loadd(2, pbuf, KB * 2);
        _tile_loadd(3, vblk, 64);
        _tile_dpbf16ps(4, 2, 3);
        _tile_loadd(3, vblk + 256, 64);
        _tile_dpbf16ps(5, 2, 3);
        _tile_loadd(3, vblk + 512, 64);
        _tile_dpbf16ps(6, 2, 3);
        _tile_loadd(3, vblk + 768, 64);
        _tile_dpbf16ps(7, 2, 3);
    }
    store_o(obuf);
    write_out(J, h, q0, obuf, lv);
}

#define SR 8 /* AVX512-BF16: rows of S in registers at a time (x 32 keys: 16 accumulators) */

/* The same task with AVX512-BF16 dot products, head dim DD (a constant where it is inlined):
 * VDPBF16PS of a broadcast pair of Q (of P) with one packed row of K (of V), the layout the
 * tiles read. O is updated 256 / DD rows x DD dims at a time (16 accumulators). */
BF16 static inline __attribute__((always_inline)) void task_bf16(const Job *J, int h, int q0,
                                                                 const int DD) {
    uint16_t qbuf[QB * MAX_D] __attribute__((aligned(64)));
    uint16_t pbuf[QB * KB] __attribute__((aligned(64)));
    float sbuf[QB * KB] __attribute__((aligned(64)));
    float obuf[QB * MAX_D] __attribute__((aligned(64)));
    float lv[QB * 16] __attribute__((aligned(64)));
    float m[QB], fac[QB];
    const int g = h / J->group, T = J->T, OR = 256 / DD;
    start_task(J, h, q0, qbuf, lv, m);
    memset(obuf, 0, sizeof(float) * QB * DD);
    const uint32_t *q32 = (const uint32_t *)qbuf, *p32 = (const uint32_t *)pbuf;
    const uint32_t *kp = J->kp + (size_t)g * J->Tpad * (DD / 2);
    const uint32_t *vp = J->vp + (size_t)g * J->Tpad * (DD / 2);
    const int last = q0 + QB - 1 < T - 1 ? q0 + QB - 1 : T - 1;
    for (int kb = 0; kb <= last / KB; kb++) {
        /* dim pair p of key n < 16: kblk + 16 p + n; of key 16 + n: + 8 DD */
        const uint32_t *kblk = kp + (size_t)kb * KB * (DD / 2);
        for (int r0 = 0; r0 < QB; r0 += SR) {
            __m512 s0[SR], s1[SR]; /* keys [0, 16) and [16, 32) of the block */
            for (int i = 0; i < SR; i++) s0[i] = s1[i] = _mm512_setzero_ps();
            for (int p = 0; p < DD / 2; p++) {
                const __m512bh b0 = (__m512bh)_mm512_load_si512((const void *)(kblk + 16 * p));
                const __m512bh b1 =
                    (__m512bh)_mm512_load_si512((const void *)(kblk + 8 * DD + 16 * p));
                for (int i = 0; i < SR; i++) {
                    const int qpair = (int)q32[(r0 + i) * (DD / 2) + p];
                    const __m512bh a = (__m512bh)_mm512_set1_epi32(qpair);
                    s0[i] = _mm512_dpbf16_ps(s0[i], a, b0);
                    s1[i] = _mm512_dpbf16_ps(s1[i], a, b1);
                }
            }
            for (int i = 0; i < SR; i++) {
                _mm512_store_ps(sbuf + (r0 + i) * KB, s0[i]);
                _mm512_store_ps(sbuf + (r0 + i) * KB + 16, s1[i]);
            }
        }
        if (softmax_block(sbuf, pbuf, lv, m, fac, q0, kb * KB, J->scale2) && kb > 0)
            rescale_o(obuf, fac, DD);
        /* key pair r, dims [16 c, 16 c + 16): vblk + 256 c + 16 r */
        const uint32_t *vblk = vp + (size_t)kb * KB * (DD / 2);
        for (int r0 = 0; r0 < QB; r0 += OR) {
            __m512 o[4][MAX_D / 16]; /* [OR][DD / 16] used */
            for (int i = 0; i < OR; i++)
                for (int c = 0; c < DD / 16; c++)
                    o[i][c] = _mm512_load_ps(obuf + (r0 + i) * DD + 16 * c);
            for (int r = 0; r < KB / 2; r++) {
                __m512bh b[MAX_D / 16];
                for (int c = 0; c < DD / 16; c++)
                    b[c] = (__m512bh)_mm512_load_si512((const void *)(vblk + 256 * c + 16 * r));
                for (int i = 0; i < OR; i++) {
                    const int ppair = (int)p32[(r0 + i) * (KB / 2) + r];
                    const __m512bh a = (__m512bh)_mm512_set1_epi32(ppair);
                    for (int c = 0; c < DD / 16; c++)
                        o[i][c] = _mm512_dpbf16_ps(o[i][c], a, b[c]);
                }
            }
            for (int i = 0; i < OR; i++)
                for (int c = 0; c < DD / 16; c++)
                    _mm512_store_ps(obuf + (r0 + i) * DD + 16 * c, o[i][c]);
        }
    }
    write_out(J, h, q0, obuf, lv);
}

BF16 static void run_task_bf16_64(const Job *J, int h, int q0) { task_bf16(J, h, q0, 64); }
BF16 static void run_task_bf16_128(const Job *J, int h, int q0) { task_bf16(J, h, q0, 128); }

/* One thread's share of the tasks on AMX tiles (an orphaned `omp for` inside run_all's
 * parallel region). */
AMX static void thread_tasks(const Job *J, int nqb, int ntasks) {
    _tile_loadconfig(&cfg);
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < ntasks; t++) /* longest first: the last row blocks */
        run_task(J, t % J->hq, (nqb - 1 - t / J->hq) * QB);
    _tile_release();
}

static void run_all(const Job *J, int nthreads) {
    const int nqb = (J->T + QB - 1) / QB, ntasks = nqb * J->hq;
    if (use_amx && J->d == D) {
#pragma omp parallel num_threads(nthreads)
        thread_tasks(J, nqb, ntasks);
        return;
    }
    void (*task)(const Job *, int, int) = J->d == 128 ? run_task_bf16_128 : run_task_bf16_64;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int t = 0; t < ntasks; t++) /* longest first, as above */
        task(J, t % J->hq, (nqb - 1 - t / J->hq) * QB);
}
#endif

/* causal(q, k, v, out, T, hq, hkv, d, qh, qt, kh, kt, vh, vt, scale, threads): pointers as
 * integers, strides in elements (see the top). ValueError for a geometry it does not take,
 * RuntimeError without AVX512-BF16, MemoryError if the packed K/V cannot be allocated. */
static PyObject *causal(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long qp, kp, vp, op;
    int T, hq, hkv, d, nthreads;
    long long qh, qt, kh, kt, vh, vt;
    double scale;
    if (!PyArg_ParseTuple(args, "KKKKiiiiLLLLLLdi", &qp, &kp, &vp, &op, &T, &hq, &hkv, &d, &qh,
                          &qt, &kh, &kt, &vh, &vt, &scale, &nthreads))
        return NULL;
    if (!bf16_ok) {
        PyErr_SetString(PyExc_RuntimeError,
                        "flash prefill needs AVX512-BF16 or AMX-BF16 (not available here)");
        return NULL;
    }
    if ((d != 64 && d != 128) || T < 1 || hkv < 1 || hq < hkv || hq % hkv || nthreads < 1 ||
        nthreads > MAX_THREADS || (qh | qt | kh | kt | vh | vt) & 1 || qh < 0 || qt < 0 ||
        kh < 0 || kt < 0 || vh < 0 || vt < 0) {
        PyErr_SetString(PyExc_ValueError, "flash prefill: head_dim must be 64 or 128, T >= 1, q "
                                          "heads a multiple of KV heads, strides even and >= 0");
        return NULL;
    }
#if HAVE_AMX
    const int Tpad = (T + KB - 1) / KB * KB;
    const size_t words = (size_t)hkv * Tpad * (d / 2);
    uint32_t *kpk = aligned_alloc(64, words * 4), *vpk = aligned_alloc(64, words * 4);
    if (!kpk || !vpk) {
        free(kpk);
        free(vpk);
        return PyErr_NoMemory();
    }
    Job J = {.q = (const uint16_t *)(uintptr_t)qp, .qh = qh, .qt = qt, .kp = kpk, .vp = vpk,
             .out = (uint16_t *)(uintptr_t)op, .T = T, .Tpad = Tpad, .hq = hq,
             .group = hq / hkv, .d = d, .scale2 = (float)(scale * 1.4426950408889634)};
    const uint16_t *k = (const uint16_t *)(uintptr_t)kp, *v = (const uint16_t *)(uintptr_t)vp;
    const int blocks = Tpad / 16;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int i = 0; i < hkv * blocks; i++)
        pack_block(k, kh, kt, v, vh, vt, T, Tpad, d, i / blocks, i % blocks, kpk, vpk);
    run_all(&J, nthreads);
    Py_END_ALLOW_THREADS
    free(kpk);
    free(vpk);
    Py_RETURN_NONE;
#else
    return NULL;
#endif
}

static PyObject *available(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyBool_FromLong(bf16_ok);
}

/* isa() -> "amx", "avx512bf16" or "" (no kernel here): the kernel `causal` runs. */
static PyObject *isa(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyUnicode_FromString(!bf16_ok ? "" : use_amx ? "amx" : "avx512bf16");
}

/* set_isa(name) -> previous: "amx" (where the CPU has it) or "avx512bf16"; for tests and A/B
 * runs. ValueError for another name or a kernel this CPU lacks. */
static PyObject *set_isa(PyObject *self, PyObject *args) {
    PyObject *previous = isa(self, NULL);
    const char *name;
    if (!previous || !PyArg_ParseTuple(args, "s", &name)) {
        Py_XDECREF(previous);
        return NULL;
    }
    const int amx = strcmp(name, "amx") == 0;
    if (!(amx ? amx_ok : bf16_ok && strcmp(name, "avx512bf16") == 0)) {
        Py_DECREF(previous);
        PyErr_Format(PyExc_ValueError, "flash prefill kernel %s is not available here", name);
        return NULL;
    }
    use_amx = amx;
    return previous;
}

static PyMethodDef methods[] = {
    {"causal", causal, METH_VARARGS, "Causal GQA prefill attention (AMX-BF16 or AVX512-BF16)."},
    {"available", available, METH_NOARGS, "Whether a kernel can run here."},
    {"isa", isa, METH_NOARGS, "The kernel in use: amx, avx512bf16 or empty."},
    {"set_isa", set_isa, METH_VARARGS, "Use this kernel (amx or avx512bf16); returns the old one."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flash", NULL, -1, methods};

PyMODINIT_FUNC PyInit__flash(void) {
#if HAVE_AMX
    __builtin_cpu_init();
    bf16_ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
    amx_ok = bf16_ok && request_amx();
    use_amx = amx_ok;
    if (amx_ok) {
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int i = 0; i < 8; i++) cfg.rows[i] = 16, cfg.colsb[i] = 64;
    }
#endif
    return PyModule_Create(&module);
}

/* Fused row operations of a Llama-family decode step (spectrumkv.engines.rowops), on B rows of
 * float32 (dtype code 0) or bfloat16 (code 2) values, contiguous buffers. Rows are independent:
 * with `threads` > 1 the rows are cut into one contiguous range per OpenMP thread (torch's libgomp
 * team), each range run by the same per-row code, so a row's result never depends on the thread
 * count or on the other rows (a prefill's thousands of rows use it; a decode step's few do not).
 *
 * Each function computes what its torch reference in rowops.py computes, with the same
 * roundings to the row dtype at the same points (bf16: round to nearest even, as torch):
 *   add_rmsnorm: h += y (rounded), out = w * round(h * rsqrt(mean(h^2) + eps)), statistics in
 *                float32; only the order of the mean's sum differs from torch's.
 *   rope:        out[:, :hq] = q, out[:, hq:] = k, each head x -> round(round(x * cos) +
 *                round(roll(x, d/2) * sin_signed)): bit-identical to torch (-ffp-contract=off).
 * Loops are written per dtype so that GCC vectorises them (target_clones: AVX-512F, AVX2 or
 * plain x86-64, chosen at load by the CPU).
 * Bounds: the caller (rowops.py) checks shapes, dtypes and contiguity; nothing here allocates
 * or reads beyond rows x cols of each buffer. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define MAX_COLS 16384

#define LANES 16 /* independent partial sums per row: one AVX-512 register of floats */
#define KERNEL static inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
/* bf16 rows convert 16-bit lanes to and from float: with AVX-512BW (x86-64-v4) GCC keeps them in
 * full vectors; the plain avx512f clone ran bf16 rows at a third of float32's speed */
#define CLONES_BF16 __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define CLONES
#define CLONES_BF16
#endif

KERNEL float bf16_to_f(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

KERNEL uint16_t f_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? (u >> 16) | 0x40u : r); /* NaN stays a quiet NaN, as torch */
}

/* Element i of a row buffer as float; storing a float rounded to the buffer's dtype. `bf` is a
 * compile-time constant in every caller (the kernels are instantiated per dtype). */
KERNEL float ld(const void *p, int64_t i, int bf) {
    return bf ? bf16_to_f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

KERNEL void st(void *p, int64_t i, float v, int bf) {
    if (bf)
        ((uint16_t *)p)[i] = f_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

KERNEL float rnd(float v, int bf) { return bf ? bf16_to_f(f_to_bf16(v)) : v; }

KERNEL void norm_rows(void *h, const void *y, const void *w, void *o, int64_t r0, int64_t r1,
                      int64_t cols, float eps, int bf) {
    float x[MAX_COLS];
    for (int64_t r = r0; r < r1; r++) {
        const int64_t base = r * cols;
        if (y) {
            for (int64_t c = 0; c < cols; c++) {
                x[c] = rnd(ld(h, base + c, bf) + ld(y, base + c, bf), bf);
                st(h, base + c, x[c], bf);
            }
        } else {
            for (int64_t c = 0; c < cols; c++) x[c] = ld(h, base + c, bf);
        }
        float acc[LANES] = {0};
        int64_t c = 0;
        for (; c + LANES <= cols; c += LANES)
            for (int j = 0; j < LANES; j++) acc[j] += x[c + j] * x[c + j];
        for (; c < cols; c++) acc[c % LANES] += x[c] * x[c];
        for (int span = LANES / 2; span; span /= 2)
            for (int j = 0; j < span; j++) acc[j] += acc[j + span];
        const float inv = 1.0f / sqrtf(acc[0] / (float)cols + eps);
        for (c = 0; c < cols; c++) st(o, base + c, ld(w, c, bf) * rnd(x[c] * inv, bf), bf);
    }
}

CLONES static void norm_f32(void *h, const void *y, const void *w, void *o, int64_t r0,
                            int64_t r1, int64_t cols, float eps) {
    norm_rows(h, y, w, o, r0, r1, cols, eps, 0);
}

CLONES_BF16 static void norm_bf16(void *h, const void *y, const void *w, void *o, int64_t r0,
                             int64_t r1, int64_t cols, float eps) {
    norm_rows(h, y, w, o, r0, r1, cols, eps, 1);
}

KERNEL void rope_rows(const void *q, const void *k, const void *cs, const void *sn, void *o,
                      int64_t r0, int64_t r1, int64_t hq, int64_t hkv, int64_t d, int bf) {
    const int64_t half = d / 2, heads = hq + hkv;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t h = 0; h < heads; h++) {
            const void *src = h < hq ? q : k;
            const int64_t in = h < hq ? (r * hq + h) * d : (r * hkv + (h - hq)) * d;
            const int64_t out = (r * heads + h) * d, cb = r * d;
            for (int64_t j = 0; j < half; j++) {
                float a = rnd(ld(src, in + j, bf) * ld(cs, cb + j, bf), bf);
                float b = rnd(ld(src, in + half + j, bf) * ld(sn, cb + j, bf), bf);
                st(o, out + j, a + b, bf);
            }
            for (int64_t j = half; j < d; j++) {
                float a = rnd(ld(src, in + j, bf) * ld(cs, cb + j, bf), bf);
                float b = rnd(ld(src, in + j - half, bf) * ld(sn, cb + j, bf), bf);
                st(o, out + j, a + b, bf);
            }
        }
    }
}

CLONES static void rope_f32(const void *q, const void *k, const void *cs, const void *sn, void *o,
                            int64_t r0, int64_t r1, int64_t hq, int64_t hkv, int64_t d) {
    rope_rows(q, k, cs, sn, o, r0, r1, hq, hkv, d, 0);
}

CLONES_BF16 static void rope_bf16(const void *q, const void *k, const void *cs, const void *sn,
                             void *o, int64_t r0, int64_t r1, int64_t hq, int64_t hkv,
                             int64_t d) {
    rope_rows(q, k, cs, sn, o, r0, r1, hq, hkv, d, 1);
}

/* Rows [r0, r1) of this thread's share when `rows` are cut into one range per team thread. */
#define THREAD_RANGE(rows, r0, r1)                                     \
    const int64_t _t = omp_get_thread_num(), _n = omp_get_num_threads(); \
    const int64_t r0 = (rows) * _t / _n, r1 = (rows) * (_t + 1) / _n

static int parse_dtype(int dt) {
    if (dt != 0 && dt != 2) {
        PyErr_SetString(PyExc_ValueError, "dtype code must be 0 (float32) or 2 (bfloat16)");
        return -1;
    }
    return dt == 2;
}

static PyObject *add_rmsnorm(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long hp, yp, wp, op;
    long long rows, cols;
    int dt, threads;
    float eps;
    if (!PyArg_ParseTuple(args, "KKKKLLifi", &hp, &yp, &wp, &op, &rows, &cols, &dt, &eps,
                          &threads))
        return NULL;
    int bf = parse_dtype(dt);
    if (bf < 0) return NULL;
    if (rows < 0 || cols < 1 || cols > MAX_COLS) {
        PyErr_SetString(PyExc_ValueError, "add_rmsnorm: bad rows/cols");
        return NULL;
    }
    void *h = (void *)(uintptr_t)hp, *o = (void *)(uintptr_t)op;
    const void *y = (const void *)(uintptr_t)yp, *w = (const void *)(uintptr_t)wp;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        THREAD_RANGE(rows, r0, r1);
        (bf ? norm_bf16 : norm_f32)(h, y, w, o, r0, r1, cols, eps);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *rope(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long qp, kp, cp, sp, op;
    long long rows, hq, hkv, d;
    int dt, threads;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLii", &qp, &kp, &cp, &sp, &op, &rows, &hq, &hkv, &d, &dt,
                          &threads))
        return NULL;
    int bf = parse_dtype(dt);
    if (bf < 0) return NULL;
    if (rows < 0 || hq < 1 || hkv < 1 || d < 2 || d % 2) {
        PyErr_SetString(PyExc_ValueError, "rope: bad rows/heads/head_dim");
        return NULL;
    }
    const void *q = (const void *)(uintptr_t)qp, *k = (const void *)(uintptr_t)kp;
    const void *cs = (const void *)(uintptr_t)cp, *sn = (const void *)(uintptr_t)sp;
    void *o = (void *)(uintptr_t)op;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        THREAD_RANGE(rows, r0, r1);
        (bf ? rope_bf16 : rope_f32)(q, k, cs, sn, o, r0, r1, hq, hkv, d);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_rmsnorm", add_rmsnorm, METH_VARARGS, "h += y (optional), out = RMSNorm(h) * w."},
    {"rope", rope, METH_VARARGS, "RoPE of q and k rows into one [B, hq + hkv, d] buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rowops", NULL, -1, methods};

PyMODINIT_FUNC PyInit__rowops(void) { return PyModule_Create(&module); }

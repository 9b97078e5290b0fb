/* y = x W^T for a few rows of bf16 x, on AVX512-BF16 dot products (VDPBF16PS).
 *
 * A decode step multiplies a handful of rows by every weight of the model once, so its linear
 * layers stream the weights from memory. `matmul` reads each weight once per block of 16 rows:
 * W is pre-packed as [N / 16][K / 2][16][2] bf16 (`engines.packed.dot_layout`), so one 64-byte
 * load holds the weights of 16 output columns for two input features, and one VDPBF16PS per
 * row adds the pair's two products into that row's 16 FP32 sums. Every output is the FP32 sum over
 * feature pairs p = 0, 1, ..., K/2 - 1 in that order (within a pair, the instruction's own order
 * and rounding, denormals flushed), rounded once to bf16 (nearest even): a row's bits do not
 * depend on the other rows, on the row count or on the thread count (column blocks are split
 * between threads, never a sum).
 *
 * Python: available() -> bool; matmul(x, w, y, rows, k, n, threads) with data pointers of
 * contiguous bf16 x [rows, k], packed w, y [rows, n]; n % 16 == 0 and k % 2 == 0, checked by
 * the caller (engines/packed.py). The GIL is released while it runs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <stdint.h>

#define BF16DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define ROW_BLOCK 16

/* y[r][0..16) for rows r < MR of one 16-column block: MR FP32 accumulators in registers. */
BF16DOT __attribute__((always_inline)) static inline void block(const uint16_t *x, int64_t k,
                                                                const uint16_t *w, uint16_t *y,
                                                                int64_t n, const int MR) {
    __m512 acc[ROW_BLOCK];
    for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < k / 2; p++) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + 32 * p);
        _mm_prefetch((const char *)(w + 32 * (p + 16)), _MM_HINT_T0);
        for (int r = 0; r < MR; r++) {
            int32_t pair;
            __builtin_memcpy(&pair, x + r * k + 2 * p, sizeof pair);
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(pair), wv);
        }
    }
    for (int r = 0; r < MR; r++)
        _mm256_storeu_si256((__m256i *)(y + r * n), (__m256i)_mm512_cvtneps_pbh(acc[r]));
}

BF16DOT static void matmul_rows(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows,
                                int64_t k, int64_t n, int threads) {
    const int64_t blocks = n / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        const uint16_t *wb = w + b * k * 16;
        for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
            const int64_t left = rows - r0;
            const uint16_t *xr = x + r0 * k;
            uint16_t *yr = y + r0 * n + b * 16;
            switch (left < ROW_BLOCK ? (int)left : ROW_BLOCK) {
#define CASE(m) case m: block(xr, k, wb, yr, n, m); break;
                CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
                CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
#undef CASE
            }
        }
    }
}

static int cpu_ok; /* AVX512-BF16 and the AVX-512 it needs: read once, at import */

static PyObject *available(PyObject *self, PyObject *args) { return PyBool_FromLong(cpu_ok); }

static PyObject *matmul(PyObject *self, PyObject *args) {
    unsigned long long xp, wp, yp;
    long long rows, k, n;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLLLi", &xp, &wp, &yp, &rows, &k, &n, &threads)) return NULL;
    if (!cpu_ok) {
        PyErr_SetString(PyExc_RuntimeError, "_bf16dot.matmul needs AVX512-BF16 on this CPU");
        return NULL;
    }
    if (rows < 0 || k < 2 || k % 2 || n < 16 || n % 16) {
        PyErr_SetString(PyExc_ValueError, "_bf16dot.matmul: rows >= 0, even k, n a multiple of 16");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    matmul_rows((const uint16_t *)xp, (const uint16_t *)wp, (uint16_t *)yp, rows, k, n,
                threads < 1 ? 1 : threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, "Whether this CPU has AVX512-BF16."},
    {"matmul", matmul, METH_VARARGS, "y = x W^T over a packed W (see the file's comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bf16dot", NULL, -1, methods};

PyMODINIT_FUNC PyInit__bf16dot(void) {
    __builtin_cpu_init();
    cpu_ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
             && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
    return PyModule_Create(&module);
}

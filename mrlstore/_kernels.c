/* Small native kernels for the re-rank path (optional: mrlstore falls back to numpy without them).
 *
 * f16_to_f32(src, dst): widen IEEE half floats to single floats. numpy's cast runs a scalar loop (about
 * 3 ns a value here), which dominated re-ranking a float16 store; the F16C instruction converts 8 values
 * per instruction. Both arguments are C-contiguous buffers (src: 2-byte items, dst: writable 4-byte items,
 * the same count). The GIL is released while converting.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MRL_X86 1
#endif

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13); /* normal: rebias 15 -> 127 */
    } else if (man == 0) {
        bits = sign; /* +-0 */
    } else {
        /* subnormal half: normalise the mantissa */
        int shift = 0;
        while (!(man & 0x400u)) {
            man <<= 1;
            shift++;
        }
        man &= 0x3ffu;
        bits = sign | ((uint32_t)(113 - shift) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void convert_scalar(const uint16_t *src, float *dst, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) dst[i] = half_to_float(src[i]);
}

#ifdef MRL_X86
__attribute__((target("avx,f16c"))) static void convert_f16c(const uint16_t *src, float *dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    convert_scalar(src + i, dst + i, n - i);
}
#endif

static int have_f16c = 0;

static PyObject *convert(PyObject *args, int allow_simd) {
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "y*w*", &src, &dst)) return NULL;
    PyObject *result = NULL;
    if (!PyBuffer_IsContiguous(&src, 'C') || !PyBuffer_IsContiguous(&dst, 'C')) {
        PyErr_SetString(PyExc_ValueError, "f16_to_f32 needs C-contiguous buffers");
    } else if (src.len % 2 || dst.len % 4 || src.len / 2 != dst.len / 4) {
        PyErr_SetString(PyExc_ValueError, "f16_to_f32: dst must hold as many 4-byte items as src 2-byte items");
    } else {
        Py_ssize_t n = src.len / 2;
        Py_BEGIN_ALLOW_THREADS
#ifdef MRL_X86
        if (have_f16c && allow_simd)
            convert_f16c((const uint16_t *)src.buf, (float *)dst.buf, n);
        else
#endif
            convert_scalar((const uint16_t *)src.buf, (float *)dst.buf, n);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *f16_to_f32(PyObject *self, PyObject *args) { return convert(args, 1); }

/* The portable loop alone, so tests check it on machines that take the F16C path. */
static PyObject *f16_to_f32_portable(PyObject *self, PyObject *args) { return convert(args, 0); }

static PyMethodDef methods[] = {
    {"f16_to_f32", f16_to_f32, METH_VARARGS, "Widen float16 values (src buffer) into float32 (dst buffer)."},
    {"f16_to_f32_portable", f16_to_f32_portable, METH_VARARGS, "f16_to_f32 without SIMD (for tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
#ifdef MRL_X86
    __builtin_cpu_init();
    have_f16c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL) PyModule_AddIntConstant(m, "HAVE_F16C", have_f16c);
    return m;
}

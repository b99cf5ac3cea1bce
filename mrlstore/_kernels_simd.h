/* Arithmetic of the native kernels: float16 widening and dot products / squared norms, with AVX2 + FMA +
 * F16C loops chosen at run time and portable loops besides. Included by _kernels.c only. */
#pragma once

/* ---------------------------------------------------------------------------------------------------- */
/* float16 -> float32                                                                                    */

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
        int shift = 0; /* subnormal half: normalise the mantissa */
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

/* Item j of a row of float16 or float32 values, as a float. */
static inline float item_at(const void *x, int f16, int j) {
    return f16 ? half_to_float(((const uint16_t *)x)[j]) : ((const float *)x)[j];
}

static void widen_scalar(const uint16_t *src, float *dst, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) dst[i] = half_to_float(src[i]);
}

static int have_simd = 0; /* AVX2 + FMA + F16C */
static int have_f16c = 0;

#ifdef MRL_X86
__attribute__((target("avx,f16c"))) static void widen_f16c(const uint16_t *src, float *dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    widen_scalar(src + i, dst + i, n - i);
}

/* Items j..j+7 of a row of float16 or float32 values, as floats. */
__attribute__((target("avx2,fma,f16c"))) static inline __m256 load8(const void *x, int f16, int j) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + j)))
               : _mm256_loadu_ps((const float *)x + j);
}

__attribute__((target("avx2,fma,f16c"))) static inline double hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return (double)_mm_cvtss_f32(s);
}

/* dot(x, q) and x.x over n items; x float16 or float32. Partial sums in float32 lanes, totals in double. */
__attribute__((target("avx2,fma,f16c"))) static void dot_sq_simd(const void *x, int f16, const float *q, int n,
                                                                   double *dot, double *sq) {
    __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps(), s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    if (f16) {
        const uint16_t *h = (const uint16_t *)x;
        for (; i + 16 <= n; i += 16) {
            __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i)));
            __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i + 8)));
            d0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(q + i), d0);
            d1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(q + i + 8), d1);
            s0 = _mm256_fmadd_ps(a, a, s0);
            s1 = _mm256_fmadd_ps(b, b, s1);
        }
    } else {
        const float *f = (const float *)x;
        for (; i + 16 <= n; i += 16) {
            __m256 a = _mm256_loadu_ps(f + i), b = _mm256_loadu_ps(f + i + 8);
            d0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(q + i), d0);
            d1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(q + i + 8), d1);
            s0 = _mm256_fmadd_ps(a, a, s0);
            s1 = _mm256_fmadd_ps(b, b, s1);
        }
    }
    double dd = hsum(_mm256_add_ps(d0, d1)), ss = hsum(_mm256_add_ps(s0, s1));
    for (; i < n; i++) {
        float v = item_at(x, f16, i);
        dd += (double)(v * q[i]);
        ss += (double)(v * v);
    }
    *dot += dd;
    *sq += ss;
}

/* dot_sq_simd for four rows at once. A scattered row's first lines are a DRAM round trip that the
 * out-of-order window cannot reach past one row; four independent streams keep four times the loads in
 * flight (measured: 400 rows x 2032 columns, 0.25 -> 0.16 ms). out: dot, sq of each row, added to. */
__attribute__((target("avx2,fma,f16c"))) static void dot_sq4_simd(const void *const *x, int f16, const float *q, int n,
                                                                    double *out) {
    __m256 d[4], s[4];
    for (int r = 0; r < 4; r++) d[r] = s[r] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 qv = _mm256_loadu_ps(q + i);
        for (int r = 0; r < 4; r++) {
            __m256 a = load8(x[r], f16, i);
            d[r] = _mm256_fmadd_ps(a, qv, d[r]);
            s[r] = _mm256_fmadd_ps(a, a, s[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        double dd = hsum(d[r]), ss = hsum(s[r]);
        for (int j = i; j < n; j++) {
            float v = item_at(x[r], f16, j);
            dd += (double)(v * q[j]);
            ss += (double)(v * v);
        }
        out[2 * r] += dd;
        out[2 * r + 1] += ss;
    }
}

/* Eight sums of eight vectors at once: lane r of the result is the sum of vector r's lanes. */
__attribute__((target("avx2,fma,f16c"))) static inline __m256 hsum8(__m256 v0, __m256 v1, __m256 v2, __m256 v3,
                                                                      __m256 v4, __m256 v5, __m256 v6, __m256 v7) {
    __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

/* dot_sq_simd for eight rows `stride` bytes apart (consecutive rows of a chunk): one reduction for all
 * eight instead of two per row, which dominates a narrow prefix (16 columns: 2 loads, 4 FMAs per row).
 * dot, sq: of each row, added to. */
__attribute__((target("avx2,fma,f16c"))) static void dot_sq8_simd(const char *x, size_t stride, int f16,
                                                                    const float *q, int n, double *dot, double *sq) {
    __m256 d[8], s[8];
    for (int r = 0; r < 8; r++) d[r] = s[r] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 qv = _mm256_loadu_ps(q + i);
        for (int r = 0; r < 8; r++) {
            __m256 a = load8(x + r * stride, f16, i);
            d[r] = _mm256_fmadd_ps(a, qv, d[r]);
            s[r] = _mm256_fmadd_ps(a, a, s[r]);
        }
    }
    float dd[8], ss[8];
    _mm256_storeu_ps(dd, hsum8(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]));
    _mm256_storeu_ps(ss, hsum8(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]));
    for (int r = 0; r < 8; r++) {
        const char *p = x + r * stride;
        double dr = dd[r], sr = ss[r];
        for (int j = i; j < n; j++) {
            float v = item_at(p, f16, j);
            dr += (double)(v * q[j]);
            sr += (double)(v * v);
        }
        dot[r] += dr;
        sq[r] += sr;
    }
}

/* A one-query scan's inner step over eight consecutive rows (`stride` bytes apart, squared norms sq8 from
 * row_norms): their dot products with q into dot, and a mask of those that could beat the heap's worst key
 * (all when worst is -inf). The test runs in float lanes with margins (1e-5) far above their rounding, so
 * it only drops rows the exact test (score_of, heap_push) would drop too. */
__attribute__((target("avx2,fma,f16c"))) static int dot8_pass_simd(const char *x, size_t stride, int f16,
                                                                     const float *q, int n, const float *sq8,
                                                                     int metric, double qq, double worst,
                                                                     double *dot) {
    /* Named accumulators: an array of them was zeroed through memory on every call (a fifth of the time). */
    __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0, d4 = d0, d5 = d0, d6 = d0, d7 = d0;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 qv = _mm256_loadu_ps(q + i);
        d0 = _mm256_fmadd_ps(load8(x, f16, i), qv, d0);
        d1 = _mm256_fmadd_ps(load8(x + stride, f16, i), qv, d1);
        d2 = _mm256_fmadd_ps(load8(x + 2 * stride, f16, i), qv, d2);
        d3 = _mm256_fmadd_ps(load8(x + 3 * stride, f16, i), qv, d3);
        d4 = _mm256_fmadd_ps(load8(x + 4 * stride, f16, i), qv, d4);
        d5 = _mm256_fmadd_ps(load8(x + 5 * stride, f16, i), qv, d5);
        d6 = _mm256_fmadd_ps(load8(x + 6 * stride, f16, i), qv, d6);
        d7 = _mm256_fmadd_ps(load8(x + 7 * stride, f16, i), qv, d7);
    }
    __m256 dv = hsum8(d0, d1, d2, d3, d4, d5, d6, d7);
    if (i < n) { /* columns past the last multiple of 8 */
        float dd[8];
        _mm256_storeu_ps(dd, dv);
        for (int r = 0; r < 8; r++) {
            const char *p = x + r * stride;
            for (int j = i; j < n; j++) dd[r] += item_at(p, f16, j) * q[j];
        }
        dv = _mm256_loadu_ps(dd);
    }
    _mm256_storeu_pd(dot, _mm256_cvtps_pd(_mm256_castps256_ps128(dv)));
    _mm256_storeu_pd(dot + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(dv, 1)));
    if (worst == -INFINITY) return 0xff;
    __m256 sq = _mm256_loadu_ps(sq8), m;
    if (metric == IP) {
        m = _mm256_cmp_ps(dv, _mm256_set1_ps((float)(worst - 1e-5 * fabs(worst) - 1e-30)), _CMP_GE_OQ);
    } else if (metric == L2) {
        __m256 qqv = _mm256_set1_ps((float)qq);
        __m256 dist = _mm256_sub_ps(_mm256_add_ps(sq, qqv), _mm256_add_ps(dv, dv));
        __m256 lim = _mm256_fmadd_ps(_mm256_add_ps(sq, qqv), _mm256_set1_ps(1e-5f),
                                     _mm256_set1_ps((float)(worst * worst * (1.0 + 1e-5) + 1e-30)));
        m = _mm256_cmp_ps(dist, lim, _CMP_LE_OQ);
    } else if (worst <= 0) {
        return 0xff;
    } else {
        __m256 w = _mm256_set1_ps((float)(worst * worst * qq * (1.0 - 1e-5)));
        m = _mm256_and_ps(_mm256_cmp_ps(dv, _mm256_setzero_ps(), _CMP_GT_OQ),
                          _mm256_cmp_ps(_mm256_mul_ps(dv, dv), _mm256_mul_ps(w, sq), _CMP_GE_OQ));
    }
    return _mm256_movemask_ps(m);
}

__attribute__((target("avx2,fma,f16c"))) static double dot_f32_simd(const float *x, const float *q, int n) {
    __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        d0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(q + i), d0);
        d1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(q + i + 8), d1);
    }
    double dd = hsum(_mm256_add_ps(d0, d1));
    for (; i < n; i++) dd += (double)(x[i] * q[i]);
    return dd;
}

/* Four dot products of one widened row with four queries: the row is loaded once for all four. */
__attribute__((target("avx2,fma,f16c"))) static void dot4_f32_simd(const float *x, const float *q0, const float *q1,
                                                                     const float *q2, const float *q3, int n,
                                                                     double *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(q0 + i), a0);
        a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(q1 + i), a1);
        a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(q2 + i), a2);
        a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(q3 + i), a3);
    }
    out[0] = hsum(a0);
    out[1] = hsum(a1);
    out[2] = hsum(a2);
    out[3] = hsum(a3);
    for (; i < n; i++) {
        out[0] += (double)(x[i] * q0[i]);
        out[1] += (double)(x[i] * q1[i]);
        out[2] += (double)(x[i] * q2[i]);
        out[3] += (double)(x[i] * q3[i]);
    }
}
#endif

static void widen(const uint16_t *src, float *dst, Py_ssize_t n) {
#ifdef MRL_X86
    if (have_f16c) {
        widen_f16c(src, dst, n);
        return;
    }
#endif
    widen_scalar(src, dst, n);
}

static void dot_sq_portable(const void *x, int f16, const float *q, int n, double *dot, double *sq) {
    float dd = 0.f, ss = 0.f;
    for (int i = 0; i < n; i++) {
        float v = item_at(x, f16, i);
        dd += v * q[i];
        ss += v * v;
    }
    *dot += dd;
    *sq += ss;
}

static void dot_sq(const void *x, int f16, const float *q, int n, double *dot, double *sq) {
#ifdef MRL_X86
    if (have_simd) {
        dot_sq_simd(x, f16, q, n, dot, sq);
        return;
    }
#endif
    dot_sq_portable(x, f16, q, n, dot, sq);
}

static void dot_sq4(const void *const *x, int f16, const float *q, int n, double *out) {
#ifdef MRL_X86
    if (have_simd) {
        dot_sq4_simd(x, f16, q, n, out);
        return;
    }
#endif
    for (int r = 0; r < 4; r++) dot_sq_portable(x[r], f16, q, n, &out[2 * r], &out[2 * r + 1]);
}

static void dot_sq8(const char *x, size_t stride, int f16, const float *q, int n, double *dot, double *sq) {
#ifdef MRL_X86
    if (have_simd) {
        dot_sq8_simd(x, stride, f16, q, n, dot, sq);
        return;
    }
#endif
    for (int r = 0; r < 8; r++) dot_sq_portable(x + r * stride, f16, q, n, &dot[r], &sq[r]);
}

static void dot4_f32(const float *x, const float *q0, const float *q1, const float *q2, const float *q3, int n,
                     double *out) {
#ifdef MRL_X86
    if (have_simd) {
        dot4_f32_simd(x, q0, q1, q2, q3, n, out);
        return;
    }
#endif
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (int i = 0; i < n; i++) {
        s0 += x[i] * q0[i];
        s1 += x[i] * q1[i];
        s2 += x[i] * q2[i];
        s3 += x[i] * q3[i];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

static double dot_f32(const float *x, const float *q, int n) {
#ifdef MRL_X86
    if (have_simd) return dot_f32_simd(x, q, n);
#endif
    float dd = 0.f;
    for (int i = 0; i < n; i++) dd += x[i] * q[i];
    return dd;
}

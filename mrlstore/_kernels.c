/* Native kernels for the query path (optional: mrlstore/kernels.py has numpy twins with the same results).
 *
 * Rows live in memory-mapped chunk files, one set per dimension band (mrlstore/zarr_bands.py): row r of a
 * band starts at chunk_base[r / chunk_rows] + (r % chunk_rows) * width items. Python passes each band as
 * (chunk base addresses as a uint64 buffer, chunk_rows, first column, width, 1 if float16 else 0) and keeps
 * the maps alive for the call. Every kernel releases the GIL and may split its work over threads.
 *
 * accumulate: for candidate rows of a batch of queries, add the dot product with the query and the squared
 *   norm of columns [col_from, col_to) to running float64 sums (a funnel stage reads only its new columns).
 * select: turn the sums into scores (cosine, ip or l2) and keep the best n per query.
 * scan: exact top-n over a row range (with a live mask) or a sorted row list, for one or many queries;
 *   each row is widened once and scored against every query.
 * f16_to_f32: widen IEEE half floats (F16C when the CPU has it).
 *
 * Scores: cosine = dot / sqrt(sq * qq) (0 when either norm is 0), ip = dot, l2 = sqrt(max(sq - 2 dot + qq,
 * 0)). Ties are broken by the lower row, so results are deterministic and match the numpy twins.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MRL_X86 1
#endif

#define MAX_BANDS 64
#define MAX_THREADS 64
#define PREFETCH_AHEAD 4 /* candidate rows requested ahead: a scattered row is a DRAM round trip */
enum { COSINE = 0, IP = 1, L2 = 2 };

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
        float v = f16 ? half_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
        dd += (double)(v * q[i]);
        ss += (double)(v * v);
    }
    *dot += dd;
    *sq += ss;
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
        float v = f16 ? half_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
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

/* ---------------------------------------------------------------------------------------------------- */
/* bands                                                                                                 */

typedef struct {
    Py_buffer addrs; /* uint64 chunk base addresses */
    const uint64_t *base;
    Py_ssize_t n_chunks;
    int64_t chunk_rows;
    int shift;   /* log2(chunk_rows) when a power of two, else -1 */
    int start;   /* first column */
    int width;
    int f16;
    int itemsize;
} Band;

typedef struct {
    Band b[MAX_BANDS];
    int n;
} Bands;

static void release_bands(Bands *bs) {
    for (int i = 0; i < bs->n; i++) PyBuffer_Release(&bs->b[i].addrs);
    bs->n = 0;
}

static int parse_bands(PyObject *seq, Bands *bs) {
    bs->n = 0;
    PyObject *fast = PySequence_Fast(seq, "bands must be a sequence of tuples");
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_BANDS) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "too many bands");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Band *b = &bs->b[bs->n];
        long long rows;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "y*Liii", &b->addrs, &rows, &b->start, &b->width,
                              &b->f16)) {
            release_bands(bs);
            Py_DECREF(fast);
            return -1;
        }
        bs->n++;
        if (rows <= 0 || b->width <= 0 || b->addrs.len % 8) {
            release_bands(bs);
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "bad band description");
            return -1;
        }
        b->base = (const uint64_t *)b->addrs.buf;
        b->n_chunks = b->addrs.len / 8;
        b->chunk_rows = rows;
        b->shift = -1;
        if ((rows & (rows - 1)) == 0) {
            b->shift = 0;
            while ((1LL << b->shift) < rows) b->shift++;
        }
        b->itemsize = b->f16 ? 2 : 4;
    }
    Py_DECREF(fast);
    return 0;
}

/* Address of column `col` of row `row` in band b, or NULL past the mapped chunks. */
static inline const char *band_row(const Band *b, int64_t row, int col) {
    int64_t chunk, off;
    if (b->shift >= 0) {
        chunk = row >> b->shift;
        off = row & (b->chunk_rows - 1);
    } else {
        chunk = row / b->chunk_rows;
        off = row % b->chunk_rows;
    }
    if (row < 0 || chunk >= b->n_chunks || !b->base[chunk]) return NULL;
    return (const char *)(uintptr_t)b->base[chunk] + ((size_t)off * b->width + (size_t)(col - b->start)) * b->itemsize;
}

/* dot and sq of one row over columns [from, to): 0 on success, -1 if the row is not mapped. */
static inline int row_dot_sq(const Bands *bs, int64_t row, const float *q, int from, int to, double *dot, double *sq) {
    for (int i = 0; i < bs->n; i++) {
        const Band *b = &bs->b[i];
        int lo = from > b->start ? from : b->start, hi = to < b->start + b->width ? to : b->start + b->width;
        if (lo >= hi) continue;
        const char *p = band_row(b, row, lo);
        if (!p) return -1;
        dot_sq(p, b->f16, q + lo, hi - lo, dot, sq);
    }
    return 0;
}

/* Row `row`, columns [0, to), widened into buf: 0 on success, -1 if not mapped. */
static inline int row_widen(const Bands *bs, int64_t row, int to, float *buf) {
    for (int i = 0; i < bs->n; i++) {
        const Band *b = &bs->b[i];
        int hi = to < b->start + b->width ? to : b->start + b->width;
        if (b->start >= hi) continue;
        const char *p = band_row(b, row, b->start);
        if (!p) return -1;
        if (b->f16)
            widen((const uint16_t *)p, buf + b->start, hi - b->start);
        else
            memcpy(buf + b->start, p, (size_t)(hi - b->start) * 4);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* scores and selection                                                                                  */

static inline double score_of(int metric, double dot, double sq, double qq) {
    if (metric == IP) return dot;
    if (metric == L2) {
        double d = sq - 2.0 * dot + qq;
        return d > 0 ? sqrt(d) : 0.0;
    }
    double denom = sqrt(sq * qq);
    return denom > 0 ? dot / denom : 0.0;
}

/* "Better" for the selection key: higher key, then lower row. l2 keys are negated distances. */
typedef struct {
    double key;
    int64_t row;
    int64_t pos; /* position in the caller's arrays (accumulate/select) */
} Entry;

static inline int better(const Entry *a, const Entry *b) {
    return a->key > b->key || (a->key == b->key && a->row < b->row);
}

/* A bounded heap holding the best `cap` entries, the worst at the root. */
typedef struct {
    Entry *e;
    int n, cap;
} Heap;

static void heap_push(Heap *h, Entry x) {
    if (h->cap <= 0) return;
    if (h->n < h->cap) {
        int i = h->n++;
        while (i > 0) {
            int p = (i - 1) / 2;
            if (!better(&h->e[p], &x)) break; /* parent already worse than x: stop */
            h->e[i] = h->e[p];
            i = p;
        }
        h->e[i] = x;
        return;
    }
    if (!better(&x, &h->e[0])) return;
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        const Entry *worst = &x;
        if (l < h->n && better(worst, &h->e[l])) {
            w = l;
            worst = &h->e[l];
        }
        if (r < h->n && better(worst, &h->e[r])) w = r;
        if (w == i) break;
        h->e[i] = h->e[w];
        i = w;
    }
    h->e[i] = x;
}

static int cmp_best_first(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    return better(x, y) ? -1 : (better(y, x) ? 1 : 0);
}

static int cmp_row(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    return (x->row > y->row) - (x->row < y->row);
}

/* ---------------------------------------------------------------------------------------------------- */
/* threads                                                                                               */

typedef void (*work_fn)(void *ctx, int part, int parts);
typedef struct {
    work_fn fn;
    void *ctx;
    int part, parts;
} Job;

static void *run_job(void *arg) {
    Job *j = arg;
    j->fn(j->ctx, j->part, j->parts);
    return NULL;
}

/* Run fn(ctx, i, parts) for i in [0, parts), on up to `parts` threads (the caller runs part 0). */
static void parallel(work_fn fn, void *ctx, int parts) {
    if (parts > MAX_THREADS) parts = MAX_THREADS;
    if (parts <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_t tid[MAX_THREADS];
    Job jobs[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 1; i < parts; i++) {
        jobs[i] = (Job){fn, ctx, i, parts};
        started[i] = pthread_create(&tid[i], NULL, run_job, &jobs[i]) == 0;
        if (!started[i]) fn(ctx, i, parts); /* no thread: do that part here */
    }
    fn(ctx, 0, parts);
    for (int i = 1; i < parts; i++)
        if (started[i]) pthread_join(tid[i], NULL);
}

/* ---------------------------------------------------------------------------------------------------- */
/* accumulate                                                                                            */

typedef struct {
    const Bands *bs;
    const int64_t *rows, *offsets;
    const float *queries;
    Py_ssize_t nq, qstride, total;
    int from, to;
    double *dot, *sq;
    volatile int failed;
} AccCtx;

/* Ask for the start of a row's columns [from, to) in every band ahead of use (scattered rows: the hardware
 * prefetcher cannot guess the next one). */
static inline void prefetch_row(const Bands *bs, int64_t row, int from, int to) {
    for (int i = 0; i < bs->n; i++) {
        const Band *b = &bs->b[i];
        int lo = from > b->start ? from : b->start, hi = to < b->start + b->width ? to : b->start + b->width;
        if (lo >= hi) continue;
        const char *p = band_row(b, row, lo);
        if (!p) continue;
        size_t bytes = (size_t)(hi - lo) * b->itemsize;
        for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 0);
    }
}

static void acc_range(AccCtx *c, Py_ssize_t q, Py_ssize_t lo, Py_ssize_t hi) {
    const float *qv = c->queries + q * c->qstride;
    for (Py_ssize_t i = lo; i < hi && i < lo + PREFETCH_AHEAD; i++) prefetch_row(c->bs, c->rows[i], c->from, c->to);
    for (Py_ssize_t i = lo; i < hi; i++) {
        if (i + PREFETCH_AHEAD < hi) prefetch_row(c->bs, c->rows[i + PREFETCH_AHEAD], c->from, c->to);
        if (row_dot_sq(c->bs, c->rows[i], qv, c->from, c->to, &c->dot[i], &c->sq[i])) c->failed = 1;
    }
}

static void acc_work(void *ctx, int part, int parts) {
    AccCtx *c = ctx;
    if (c->nq >= parts) { /* split the queries */
        for (Py_ssize_t q = part; q < c->nq; q += parts) acc_range(c, q, c->offsets[q], c->offsets[q + 1]);
        return;
    }
    /* fewer queries than threads: split every query's candidates */
    for (Py_ssize_t q = 0; q < c->nq; q++) {
        Py_ssize_t lo = c->offsets[q], n = c->offsets[q + 1] - lo;
        acc_range(c, q, lo + n * part / parts, lo + n * (part + 1) / parts);
    }
}

static int check_buf(Py_buffer *b, Py_ssize_t itemsize, Py_ssize_t count, const char *what) {
    if (!PyBuffer_IsContiguous(b, 'C') || b->len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous buffer of %zd items of %zd bytes", what, count,
                     itemsize);
        return -1;
    }
    return 0;
}

/* accumulate(bands, rows, offsets, queries, qstride, col_from, col_to, dot, sq, threads) */
static PyObject *accumulate(PyObject *self, PyObject *args) {
    PyObject *band_seq;
    Py_buffer rows, offs, qs, dot, sq;
    Py_ssize_t qstride;
    int from, to, threads;
    if (!PyArg_ParseTuple(args, "Oy*y*y*niiw*w*i", &band_seq, &rows, &offs, &qs, &qstride, &from, &to, &dot, &sq,
                          &threads))
        return NULL;
    Bands bs;
    PyObject *result = NULL;
    if (parse_bands(band_seq, &bs)) goto done_bufs;
    Py_ssize_t total = rows.len / 8, nq = offs.len / 8 - 1;
    if (nq < 0 || check_buf(&rows, 8, total, "rows") || check_buf(&dot, 8, total, "dot") ||
        check_buf(&sq, 8, total, "sq") || check_buf(&qs, 4, nq * qstride, "queries") || from < 0 || to > qstride ||
        from > to)
        goto done;
    const int64_t *o = offs.buf;
    if (o[0] != 0 || o[nq] != total) {
        PyErr_SetString(PyExc_ValueError, "offsets must run from 0 to len(rows)");
        goto done;
    }
    AccCtx c = {&bs, rows.buf, o, qs.buf, nq, qstride, total, from, to, dot.buf, sq.buf, 0};
    /* A thread costs tens of microseconds to start (far more when the cores are busy): only work of several
     * milliseconds is split. A single query's re-rank of a few hundred rows stays on the caller's thread. */
    int parts = threads < 1 ? 1 : threads;
    if ((double)total * (to - from) < 4194304.0) parts = 1;
    Py_BEGIN_ALLOW_THREADS parallel(acc_work, &c, parts);
    Py_END_ALLOW_THREADS if (c.failed) {
        PyErr_SetString(PyExc_IndexError, "a candidate row lies past the mapped chunks");
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    release_bands(&bs);
done_bufs:
    PyBuffer_Release(&rows);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&qs);
    PyBuffer_Release(&dot);
    PyBuffer_Release(&sq);
    return result;
}

/* ---------------------------------------------------------------------------------------------------- */
/* select                                                                                                */

/* select(rows, offsets, dot, sq, qq, metric, keep, by_row, out_pos, out_scores, out_counts)
 * Per query, the positions (into rows/dot/sq) of the best `keep` candidates, best first (by_row=0) or in
 * row order (by_row=1), written at out_pos[q*keep ...], with their scores; out_counts[q] how many. */
static PyObject *select_best(PyObject *self, PyObject *args) {
    Py_buffer rows, offs, dot, sq, qq, opos, oscore, ocount;
    int metric, keep, by_row;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*iiiw*w*w*", &rows, &offs, &dot, &sq, &qq, &metric, &keep, &by_row, &opos,
                          &oscore, &ocount))
        return NULL;
    PyObject *result = NULL;
    Entry *buf = NULL;
    Py_ssize_t total = rows.len / 8, nq = offs.len / 8 - 1;
    if (nq < 0 || keep < 0 || check_buf(&dot, 8, total, "dot") || check_buf(&sq, 8, total, "sq") ||
        check_buf(&qq, 8, nq, "qq") || check_buf(&opos, 8, nq * keep, "out_pos") ||
        check_buf(&oscore, 8, nq * keep, "out_scores") || check_buf(&ocount, 8, nq, "out_counts"))
        goto done;
    buf = malloc(sizeof(Entry) * (size_t)(keep > 0 ? keep : 1));
    if (!buf) {
        PyErr_NoMemory();
        goto done;
    }
    const int64_t *r = rows.buf, *o = offs.buf;
    const double *d = dot.buf, *s = sq.buf, *qn = qq.buf;
    int64_t *out_pos = opos.buf, *out_count = ocount.buf;
    double *out_score = oscore.buf;
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t q = 0; q < nq; q++) {
        Heap h = {buf, 0, keep};
        for (int64_t i = o[q]; i < o[q + 1]; i++) {
            double sc = score_of(metric, d[i], s[i], qn[q]);
            heap_push(&h, (Entry){metric == L2 ? -sc : sc, r[i], i});
        }
        qsort(h.e, (size_t)h.n, sizeof(Entry), by_row ? cmp_row : cmp_best_first);
        for (int j = 0; j < h.n; j++) {
            out_pos[q * keep + j] = h.e[j].pos;
            out_score[q * keep + j] = metric == L2 ? -h.e[j].key : h.e[j].key;
        }
        out_count[q] = h.n;
    }
    Py_END_ALLOW_THREADS result = Py_None;
    Py_INCREF(result);
done:
    free(buf);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&dot);
    PyBuffer_Release(&sq);
    PyBuffer_Release(&qq);
    PyBuffer_Release(&opos);
    PyBuffer_Release(&oscore);
    PyBuffer_Release(&ocount);
    return result;
}

/* ---------------------------------------------------------------------------------------------------- */
/* scan                                                                                                  */

typedef struct {
    const Bands *bs;
    const int64_t *rows; /* sorted row list, or NULL: the range [lo, hi) */
    const uint8_t *live; /* with a range: row r is scanned when live[r] (NULL: all) */
    int64_t lo, hi, n_rows;
    const float *queries;
    const double *qq;
    Py_ssize_t nq, qstride;
    int to, metric, keep, parts;
    Entry *heaps; /* parts x nq x keep */
    int *counts;  /* parts x nq */
    volatile int failed;
} ScanCtx;

static void scan_work(void *ctx, int part, int parts) {
    ScanCtx *c = ctx;
    int64_t total = c->rows ? c->n_rows : c->hi - c->lo;
    int64_t a = total * part / parts, b = total * (part + 1) / parts;
    Heap *h = malloc(sizeof(Heap) * (size_t)c->nq);
    float *buf = c->nq > 1 ? malloc(sizeof(float) * (size_t)c->to + 64) : NULL;
    if (!h || (c->nq > 1 && !buf)) {
        c->failed = 2;
        free(h);
        free(buf);
        return;
    }
    for (Py_ssize_t q = 0; q < c->nq; q++)
        h[q] = (Heap){c->heaps + ((size_t)part * c->nq + q) * c->keep, 0, c->keep};
    for (int64_t i = a; i < b; i++) {
        int64_t row = c->rows ? c->rows[i] : c->lo + i;
        if (!c->rows && c->live && !c->live[row]) continue;
        if (c->nq == 1) { /* fused: read each value once, straight from the map */
            double dot = 0, sq = 0;
            if (row_dot_sq(c->bs, row, c->queries, 0, c->to, &dot, &sq)) {
                c->failed = 1;
                break;
            }
            double sc = score_of(c->metric, dot, sq, c->qq[0]);
            heap_push(&h[0], (Entry){c->metric == L2 ? -sc : sc, row, 0});
            continue;
        }
        if (row_widen(c->bs, row, c->to, buf)) { /* widen once, score against every query */
            c->failed = 1;
            break;
        }
        double sq = dot_f32(buf, buf, c->to), dots[4];
        Py_ssize_t q = 0;
        for (; q + 4 <= c->nq; q += 4) {
            const float *qv = c->queries + q * c->qstride;
            dot4_f32(buf, qv, qv + c->qstride, qv + 2 * c->qstride, qv + 3 * c->qstride, c->to, dots);
            for (int j = 0; j < 4; j++) {
                double sc = score_of(c->metric, dots[j], sq, c->qq[q + j]);
                heap_push(&h[q + j], (Entry){c->metric == L2 ? -sc : sc, row, 0});
            }
        }
        for (; q < c->nq; q++) {
            double sc = score_of(c->metric, dot_f32(buf, c->queries + q * c->qstride, c->to), sq, c->qq[q]);
            heap_push(&h[q], (Entry){c->metric == L2 ? -sc : sc, row, 0});
        }
    }
    for (Py_ssize_t q = 0; q < c->nq; q++) c->counts[(size_t)part * c->nq + q] = h[q].n;
    free(h);
    free(buf);
}

/* Merge every part's heaps into part 0's and write each query's best, best first. */
static void merge_parts(ScanCtx *c, int64_t *out_rows, double *out_scores, int64_t *out_counts) {
    for (Py_ssize_t q = 0; q < c->nq; q++) {
        Heap h = {c->heaps + (size_t)q * c->keep, c->counts[q], c->keep}; /* part 0's heap, in place */
        for (int p = 1; p < c->parts; p++) {
            const Entry *e = c->heaps + ((size_t)p * c->nq + q) * c->keep;
            for (int j = 0; j < c->counts[(size_t)p * c->nq + q]; j++) heap_push(&h, e[j]);
        }
        qsort(h.e, (size_t)h.n, sizeof(Entry), cmp_best_first);
        for (int j = 0; j < h.n; j++) {
            out_rows[q * c->keep + j] = h.e[j].row;
            out_scores[q * c->keep + j] = c->metric == L2 ? -h.e[j].key : h.e[j].key;
        }
        out_counts[q] = h.n;
    }
}

/* scan(bands, rows_or_None, lo, hi, live_or_None, queries, qstride, col_to, qq, metric, keep, out_rows,
 *      out_scores, out_counts, threads): per query the best `keep` rows, best first. */
static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *band_seq, *rows_obj, *live_obj;
    long long lo, hi;
    Py_buffer qs, qq, orows, oscores, ocounts;
    Py_buffer rows = {0}, live = {0};
    Py_ssize_t qstride;
    int to, metric, keep, threads;
    if (!PyArg_ParseTuple(args, "OOLLOy*niy*iiw*w*w*i", &band_seq, &rows_obj, &lo, &hi, &live_obj, &qs, &qstride, &to,
                          &qq, &metric, &keep, &orows, &oscores, &ocounts, &threads))
        return NULL;
    PyObject *result = NULL;
    Bands bs = {.n = 0};
    Entry *heaps = NULL;
    int *counts = NULL;
    int have_rows = rows_obj != Py_None, have_live = live_obj != Py_None;
    if (have_rows && PyObject_GetBuffer(rows_obj, &rows, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (have_live && PyObject_GetBuffer(live_obj, &live, PyBUF_C_CONTIGUOUS) < 0) {
        have_live = 0;
        goto done;
    }
    if (parse_bands(band_seq, &bs)) goto done;
    Py_ssize_t nq = qstride > 0 ? qs.len / 4 / qstride : 0;
    if (nq < 1 || keep < 1 || to < 1 || to > qstride || check_buf(&qs, 4, nq * qstride, "queries") ||
        check_buf(&qq, 8, nq, "qq") || check_buf(&orows, 8, nq * keep, "out_rows") ||
        check_buf(&oscores, 8, nq * keep, "out_scores") || check_buf(&ocounts, 8, nq, "out_counts"))
        goto done;
    if (have_live && (lo < 0 || hi > live.len)) {
        PyErr_SetString(PyExc_ValueError, "scan: the live mask is shorter than the range");
        goto done;
    }
    int64_t n_rows = have_rows ? rows.len / 8 : 0;
    int64_t total = have_rows ? n_rows : (hi > lo ? hi - lo : 0);
    int parts = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if ((double)total * to * (double)nq < 4194304.0) parts = 1; /* see accumulate */
    heaps = malloc(sizeof(Entry) * (size_t)parts * nq * keep);
    counts = calloc((size_t)parts * nq, sizeof(int));
    if (!heaps || !counts) {
        PyErr_NoMemory();
        goto done;
    }
    ScanCtx c = {&bs,     have_rows ? rows.buf : NULL, have_live ? live.buf : NULL, lo, hi, n_rows, qs.buf, qq.buf,
                 nq,      qstride, to, metric, keep, parts, heaps, counts, 0};
    int64_t *out_rows = orows.buf, *out_counts = ocounts.buf;
    double *out_scores = oscores.buf;
    Py_BEGIN_ALLOW_THREADS parallel(scan_work, &c, parts);
    if (!c.failed) merge_parts(&c, out_rows, out_scores, out_counts);
    Py_END_ALLOW_THREADS if (c.failed == 1) PyErr_SetString(PyExc_IndexError, "a scanned row lies past the mapped chunks");
    else if (c.failed) PyErr_NoMemory();
    else {
        result = Py_None;
        Py_INCREF(result);
    }
done:
    free(heaps);
    free(counts);
    release_bands(&bs);
    if (have_rows) PyBuffer_Release(&rows);
    if (have_live) PyBuffer_Release(&live);
    PyBuffer_Release(&qs);
    PyBuffer_Release(&qq);
    PyBuffer_Release(&orows);
    PyBuffer_Release(&oscores);
    PyBuffer_Release(&ocounts);
    return result;
}

/* ---------------------------------------------------------------------------------------------------- */
/* f16_to_f32                                                                                            */

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
        Py_BEGIN_ALLOW_THREADS if (allow_simd) widen((const uint16_t *)src.buf, (float *)dst.buf, n);
        else widen_scalar((const uint16_t *)src.buf, (float *)dst.buf, n);
        Py_END_ALLOW_THREADS result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *f16_to_f32(PyObject *self, PyObject *args) { return convert(args, 1); }

/* The portable loop alone, so tests check it on machines that take the F16C path. */
static PyObject *f16_to_f32_portable(PyObject *self, PyObject *args) { return convert(args, 0); }

/* Tests: force the portable (non-SIMD) scoring loops, or restore detection. */
static PyObject *set_simd(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
#ifdef MRL_X86
    have_simd = on && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && have_f16c;
#endif
    return PyBool_FromLong(have_simd);
}

static PyMethodDef methods[] = {
    {"accumulate", accumulate, METH_VARARGS, "Add dot products and squared norms of a column range of rows."},
    {"select", select_best, METH_VARARGS, "Best n candidates per query from accumulated sums."},
    {"scan", scan, METH_VARARGS, "Exact top-n over a row range or row list, for a batch of queries."},
    {"f16_to_f32", f16_to_f32, METH_VARARGS, "Widen float16 values (src buffer) into float32 (dst buffer)."},
    {"f16_to_f32_portable", f16_to_f32_portable, METH_VARARGS, "f16_to_f32 without SIMD (for tests)."},
    {"set_simd", set_simd, METH_O, "Enable (if the CPU has it) or disable the SIMD scoring loops; returns the state."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
#ifdef MRL_X86
    __builtin_cpu_init();
    have_f16c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
    have_simd = have_f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL) {
        PyModule_AddIntConstant(m, "HAVE_F16C", have_f16c);
        PyModule_AddIntConstant(m, "HAVE_SIMD", have_simd);
    }
    return m;
}

/* Native kernels for the query path (optional: mrlstore/kernels.py has numpy twins with the same results).
 *
 * Rows live in memory-mapped chunk files, one set per dimension band (mrlstore/zarr_bands.py): row r of a
 * band starts at chunk_base[r / chunk_rows] + (r % chunk_rows) * width items. Python passes each band as
 * (chunk base addresses as a uint64 buffer, chunk_rows, first column, width, 1 if float16 else 0) and keeps
 * the maps alive for the call. Every kernel releases the GIL and may split its work over threads.
 *
 * refine: for the candidate rows of a batch of queries, every later stage of a funnel: add the dot product
 *   with the query and the squared norm of the stage's new columns to running float64 sums (a stage reads
 *   only its new columns), turn the sums into scores (cosine, ip or l2), keep the best n per query.
 * scan: exact top-n over a row range (with a live mask) or a sorted row list, for one or many queries;
 *   each row is widened once and scored against every query.
 * f16_to_f32: widen IEEE half floats (F16C when the CPU has it).
 *
 * Files: _kernels_simd.h (widening, dot products), _kernels_rows.h (bands, scores, heap, threads, the
 * per-stage accumulation), this file (the entry points and the module).
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

#include "_kernels_simd.h"
#include "_kernels_rows.h"

/* ---------------------------------------------------------------------------------------------------- */
/* refine: every later stage of a funnel in one call                                                      */

typedef struct {
    const Bands *bs;
    const int64_t *rows, *offsets;
    const float *queries;
    Py_ssize_t nq, qstride, longest;
    const int32_t *dims, *keeps;
    int stages, metric, k;
    int64_t *out_rows, *out_counts;
    double *out_scores;
    volatile int failed, no_memory;
} RefineCtx;

/* One query through every stage: accumulate the stage's new columns for the survivors, keep the best
 * keeps[s] (in row order between stages, so the next reads run forward; best first after the last). */
static void refine_query(RefineCtx *c, Py_ssize_t q, int64_t *rows, double *dot, double *sq, Entry *heap) {
    Py_ssize_t n = c->offsets[q + 1] - c->offsets[q];
    memcpy(rows, c->rows + c->offsets[q], sizeof(int64_t) * (size_t)n);
    memset(dot, 0, sizeof(double) * (size_t)n);
    memset(sq, 0, sizeof(double) * (size_t)n);
    const float *qv = c->queries + q * c->qstride;
    int covered = 0;
    double qq = 0; /* the query's squared norm over the columns read so far */
    for (int s = 0; s < c->stages; s++) {
        if (acc_rows(c->bs, rows, n, qv, covered, c->dims[s], dot, sq)) c->failed = 1;
        for (int j = covered; j < c->dims[s]; j++) qq += (double)qv[j] * (double)qv[j];
        covered = c->dims[s];
        Heap h = {heap, 0, c->keeps[s]};
        for (Py_ssize_t i = 0; i < n; i++) {
            double sc = score_of(c->metric, dot[i], sq[i], qq);
            heap_push(&h, (Entry){c->metric == L2 ? -sc : sc, rows[i], i});
        }
        int last = s == c->stages - 1;
        qsort(h.e, (size_t)h.n, sizeof(Entry), last ? cmp_best_first : cmp_pos);
        if (last) {
            for (int j = 0; j < h.n; j++) {
                c->out_rows[q * c->k + j] = h.e[j].row;
                c->out_scores[q * c->k + j] = c->metric == L2 ? -h.e[j].key : h.e[j].key;
            }
            c->out_counts[q] = h.n;
            return;
        }
        for (int j = 0; j < h.n; j++) { /* by position (= row order: rows come sorted): pos >= j, in place */
            rows[j] = rows[h.e[j].pos];
            dot[j] = dot[h.e[j].pos];
            sq[j] = sq[h.e[j].pos];
        }
        n = h.n;
    }
}

static void refine_work(void *ctx, int part, int parts) {
    RefineCtx *c = ctx;
    int widest = 0;
    for (int s = 0; s < c->stages; s++) widest = c->keeps[s] > widest ? c->keeps[s] : widest;
    size_t longest = (size_t)(c->longest > 0 ? c->longest : 1);
    int64_t *rows = malloc(sizeof(int64_t) * longest);
    double *dot = malloc(sizeof(double) * longest), *sq = malloc(sizeof(double) * longest);
    Entry *heap = malloc(sizeof(Entry) * (size_t)(widest > 0 ? widest : 1));
    if (rows && dot && sq && heap)
        for (Py_ssize_t q = part; q < c->nq; q += parts) refine_query(c, q, rows, dot, sq, heap);
    else
        c->no_memory = 1;
    free(rows);
    free(dot);
    free(sq);
    free(heap);
}

/* refine(bands, rows, offsets, queries, qstride, dims, keeps, metric, out_rows, out_scores, out_counts,
 * threads): rows sorted within each query; dims/keeps int32 per stage (the last keep is k). Writes query
 * q's results best first at out_*[q * k ...] and their number at out_counts[q]. */
static PyObject *refine(PyObject *self, PyObject *args) {
    PyObject *band_seq;
    Py_buffer rows, offs, qs, dims, keeps, orows, oscores, ocounts;
    Py_ssize_t qstride;
    int metric, threads;
    if (!PyArg_ParseTuple(args, "Oy*y*y*ny*y*iw*w*w*i", &band_seq, &rows, &offs, &qs, &qstride, &dims, &keeps, &metric,
                          &orows, &oscores, &ocounts, &threads))
        return NULL;
    Bands bs;
    PyObject *result = NULL;
    if (parse_bands(band_seq, &bs)) goto done_bufs;
    Py_ssize_t total = rows.len / 8, nq = offs.len / 8 - 1, stages = dims.len / 4;
    const int32_t *d = dims.buf, *kp = keeps.buf;
    if (nq < 0 || stages < 1 || keeps.len != dims.len || check_buf(&rows, 8, total, "rows") ||
        check_buf(&qs, 4, nq * qstride, "queries"))
        goto done;
    int k = kp[stages - 1], ok = k >= 0;
    for (Py_ssize_t s = 0; s < stages; s++) ok = ok && kp[s] >= 0 && d[s] > (s ? d[s - 1] : 0) && d[s] <= qstride;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "stage dims must ascend within the queries' width, keeps be >= 0");
        goto done;
    }
    if (check_buf(&orows, 8, nq * k, "out_rows") || check_buf(&oscores, 8, nq * k, "out_scores") ||
        check_buf(&ocounts, 8, nq, "out_counts"))
        goto done;
    const int64_t *o = offs.buf;
    Py_ssize_t longest = 0;
    int ascending = o[0] == 0 && o[nq] == total;
    for (Py_ssize_t q = 0; q < nq && ascending; q++) {
        ascending = o[q + 1] >= o[q];
        longest = o[q + 1] - o[q] > longest ? o[q + 1] - o[q] : longest;
    }
    if (!ascending) {
        PyErr_SetString(PyExc_ValueError, "offsets must ascend from 0 to len(rows)");
        goto done;
    }
    RefineCtx c = {&bs, rows.buf, o, qs.buf, nq, qstride, longest, d, kp, (int)stages, metric, k,
                   orows.buf, ocounts.buf, oscores.buf, 0, 0};
    /* A thread costs tens of microseconds to start (far more when the cores are busy): only a batch with
     * milliseconds of work is split. A single query's re-rank of a few hundred rows stays on this thread. */
    int parts = threads < 1 ? 1 : threads;
    if (nq < 2 || (double)total * d[stages - 1] < 4194304.0) parts = 1;
    if (parts > nq) parts = (int)nq;
    Py_BEGIN_ALLOW_THREADS parallel(refine_work, &c, parts);
    Py_END_ALLOW_THREADS if (c.no_memory) {
        PyErr_NoMemory();
        goto done;
    }
    if (c.failed) {
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
    PyBuffer_Release(&dims);
    PyBuffer_Release(&keeps);
    PyBuffer_Release(&orows);
    PyBuffer_Release(&oscores);
    PyBuffer_Release(&ocounts);
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
    if ((double)total * to * (double)nq < 4194304.0) parts = 1; /* see refine */
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
    {"refine", refine, METH_VARARGS, "Every later funnel stage (accumulate, then keep the best) in one call."},
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

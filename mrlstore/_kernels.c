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
 * per-stage accumulation), _kernels_scan.h (the exact scan's work), this file (refine, the entry points and
 * the module).
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
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MRL_X86 1
#endif

#define MAX_BANDS 64
#define MAX_THREADS 64
#define PREFETCH_AHEAD 4 /* candidate rows requested ahead: a scattered row is a DRAM round trip */
/* The last stage is bounded (norms) only with at least this many candidates per row it keeps: on long lists
 * (500 -> 10) bounds save a third of the time; on short ones (25 -> 10, the default funnel's last stage) their
 * ordering costs more than the rows they save. Exported: the caller skips the norms' setup below it. */
#define BOUND_MIN_PER_KEPT 4
#define WARM_PROBES 2 /* rows checked for residency before a stage: the first and the last */
#define READ_AHEAD_BYTES (8 << 20) /* what a sequential scan asks the kernel to read at a time, per thread */
/* The kernel reads at most max(read_ahead_kb, max_sectors_kb) of one MADV_WILLNEED: ask in pieces that every
 * disk's default (128 KiB) covers */
#define READ_AHEAD_PIECE ((uintptr_t)128 << 10)
#define READ_AHEAD_PROBE ((size_t)2 << 20) /* bytes whose residency one mincore call reports */
enum { COSINE = 0, IP = 1, L2 = 2 };

#include "_kernels_simd.h"
#include "_kernels_rows.h"
#include "_kernels_scan.h"

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
    const Band *norms;     /* per-band squared norms of every row (float32, one column per band), or NULL */
    const int32_t *bounds; /* band b spans columns [bounds[b], bounds[b + 1]) */
    int n_bands;
    int warm_threads; /* > 1: page a cold stage's rows in from this many threads first */
    volatile int failed, no_memory;
} RefineCtx;

/* Write query q's heap, best first, as its results. */
static void write_results(RefineCtx *c, Py_ssize_t q, Heap *h) {
    c->out_counts[q] = write_best(h, c->metric, c->out_rows + q * c->k, c->out_scores + q * c->k);
}

/* The band edge where a bounded last stage splits: the last edge in [covered, to) above 0, when `to` is an
 * edge and the store has norms; -1 otherwise. */
static int prune_split(const RefineCtx *c, int covered, int to) {
    if (!c->norms) return -1;
    int split = -1, to_is_edge = 0;
    for (int b = 0; b <= c->n_bands; b++) {
        if (c->bounds[b] == to) to_is_edge = 1;
        if (c->bounds[b] >= covered && c->bounds[b] < to) split = c->bounds[b];
    }
    return to_is_edge && split > 0 ? split : -1; /* with nothing read yet, a cosine bound is just 1 */
}

/* An upper bound on a row's final key from its sums over [0, split) (dot, sq), the bound t on the dot product
 * of the rest (Cauchy-Schwarz per band, from the stored norms), and those norms' sum xt. The margins (1e-3)
 * dwarf float32 rounding, so the bound never falls below the score the full read computes. */
static double key_bound(int metric, double dot, double sq, double t, double xt, double qq) {
    t = t * 1.001 + 1e-30;
    if (metric == IP) return dot + t;
    double full = sq + xt;
    if (metric == L2) {
        double d = full * 0.999 - 2.0 * (dot + t) + qq - 1e-3 * (full + qq);
        return d > 0 ? -sqrt(d) : 0.0;
    }
    if (!(full > 0) || !(qq > 0)) return INFINITY; /* degenerate rows are always read */
    double num = dot + t;
    return num / sqrt(full * (num >= 0 ? 0.999 : 1.001) * qq);
}

/* Restore the max-heap order (best at 0, `better`) below position i of e[0..n). */
static inline void sift_down(Entry *e, Py_ssize_t n, Py_ssize_t i) {
    Entry x = e[i];
    for (;;) {
        Py_ssize_t l = 2 * i + 1, best = l;
        if (l >= n) break;
        if (l + 1 < n && better(&e[l + 1], &e[l])) best = l + 1;
        if (!better(&e[best], &x)) break;
        e[i] = e[best];
        i = best;
    }
    e[i] = x;
}

/* The last stage, bounded: read columns [covered, split) of every candidate, bound each one's final score
 * with the stored norms of its bands in [split, to), then read the rest for candidates in descending bound
 * order until the next bound cannot beat the k-th best score. Returns the same rows as reading everything
 * (on MRL vectors after a 16-d shortlist of 500, about a third of the rows need their last band). */
static void last_stage_bounded(RefineCtx *c, Py_ssize_t q, int64_t *rows, double *dot, double *sq, Py_ssize_t n,
                               int covered, int split, double qq, Entry *heap, Entry *order) {
    const float *qv = c->queries + q * c->qstride;
    int to = c->dims[c->stages - 1];
    if (split > covered && acc_rows(c->bs, rows, n, qv, covered, split, dot, sq)) c->failed = 1;
    for (int j = covered; j < split; j++) qq += (double)qv[j] * (double)qv[j];
    double qb[MAX_BANDS], qq_full = qq;
    int b0 = 0;
    while (c->bounds[b0] < split) b0++;
    int b1 = b0;
    for (; c->bounds[b1] < to; b1++) {
        qb[b1] = 0;
        for (int j = c->bounds[b1]; j < c->bounds[b1 + 1]; j++) qb[b1] += (double)qv[j] * (double)qv[j];
        qq_full += qb[b1];
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *norm = (const float *)band_row(c->norms, rows[i], 0);
        double bound = INFINITY, t = 0, xt = 0;
        if (norm) {
            for (int b = b0; b < b1; b++) {
                t += sqrt(qb[b] * (double)norm[b]);
                xt += norm[b];
            }
            bound = key_bound(c->metric, dot[i], sq[i], t, xt, qq_full);
            if (isnan(bound)) bound = INFINITY; /* unreadable norms: read the row */
        }
        order[i] = (Entry){bound, rows[i], i};
    }
    /* Best bound first, popped from a max-heap: only the rows read are ever ordered (a full sort of the
     * candidates cost a fifth of the stage). */
    for (Py_ssize_t i = n / 2 - 1; i >= 0; i--) sift_down(order, n, i);
    Heap h = {heap, 0, c->keeps[c->stages - 1]};
    while (n > 0) {
        int64_t group[8];
        double gdot[8], gsq[8];
        Py_ssize_t gpos[8];
        int g = 0;
        for (; n > 0 && g < 8; g++) {
            if (h.n == h.cap && order[0].key < h.e[0].key) { /* no other row can enter */
                n = 0;
                break;
            }
            gpos[g] = order[0].pos;
            group[g] = rows[gpos[g]];
            gdot[g] = dot[gpos[g]];
            gsq[g] = sq[gpos[g]];
            order[0] = order[--n];
            sift_down(order, n, 0);
        }
        if (g && acc_rows(c->bs, group, g, qv, split, to, gdot, gsq)) c->failed = 1;
        for (int r = 0; r < g; r++) {
            heap_push(&h, (Entry){key_of(c->metric, gdot[r], gsq[r], qq_full), group[r], gpos[r]});
        }
    }
    write_results(c, q, &h);
}

/* One query through every stage: accumulate the stage's new columns for the survivors, keep the best
 * keeps[s] (in row order between stages, so the next reads run forward; best first after the last). */
static void refine_query(RefineCtx *c, Py_ssize_t q, int64_t *rows, double *dot, double *sq, Entry *heap,
                         Entry *order) {
    Py_ssize_t n = c->offsets[q + 1] - c->offsets[q];
    memcpy(rows, c->rows + c->offsets[q], sizeof(int64_t) * (size_t)n);
    memset(dot, 0, sizeof(double) * (size_t)n);
    memset(sq, 0, sizeof(double) * (size_t)n);
    const float *qv = c->queries + q * c->qstride;
    int covered = 0;
    double qq = 0; /* the query's squared norm over the columns read so far */
    for (int s = 0; s < c->stages; s++) {
        int split = s == c->stages - 1 && n >= BOUND_MIN_PER_KEPT * (Py_ssize_t)c->keeps[s]
                        ? prune_split(c, covered, c->dims[s])
                        : -1;
        /* all of the stage's columns, also for a bounded last stage, which reads the rest of only some rows:
         * measured cold, the extra reads in parallel cost less than those rows' faults one after another */
        warm_rows(c->bs, rows, n, covered, c->dims[s], c->warm_threads);
        if (split >= 0) {
            last_stage_bounded(c, q, rows, dot, sq, n, covered, split, qq, heap, order);
            return;
        }
        if (acc_rows(c->bs, rows, n, qv, covered, c->dims[s], dot, sq)) c->failed = 1;
        for (int j = covered; j < c->dims[s]; j++) qq += (double)qv[j] * (double)qv[j];
        covered = c->dims[s];
        Heap h = {heap, 0, c->keeps[s]};
        for (Py_ssize_t i = 0; i < n; i++) {
            heap_push(&h, (Entry){key_of(c->metric, dot[i], sq[i], qq), rows[i], i});
        }
        if (s == c->stages - 1) {
            write_results(c, q, &h);
            return;
        }
        qsort(h.e, (size_t)h.n, sizeof(Entry), cmp_pos);
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
    Entry *order = c->norms ? malloc(sizeof(Entry) * longest) : NULL;
    if (rows && dot && sq && heap && (order || !c->norms))
        for (Py_ssize_t q = part; q < c->nq; q += parts) refine_query(c, q, rows, dot, sq, heap, order);
    else
        c->no_memory = 1;
    free(order);
    free(rows);
    free(dot);
    free(sq);
    free(heap);
}

/* refine(bands, rows, offsets, queries, qstride, dims, keeps, metric, out_rows, out_scores, out_counts,
 * threads, norms, bounds): rows sorted within each query; dims/keeps int32 per stage (the last keep is k).
 * norms: None, or [row_norms described like a band] with bounds (int32, the band edges from 0 to the
 * dimension): the last stage then skips rows that cannot make the top k. Writes query q's results best
 * first at out_*[q * k ...] and their number at out_counts[q]. */
static PyObject *refine(PyObject *self, PyObject *args) {
    PyObject *band_seq, *norm_seq;
    Py_buffer rows, offs, qs, dims, keeps, orows, oscores, ocounts, bounds;
    Py_ssize_t qstride;
    int metric, threads, warm_threads = 0;
    if (!PyArg_ParseTuple(args, "Oy*y*y*ny*y*iw*w*w*iOy*|i", &band_seq, &rows, &offs, &qs, &qstride, &dims, &keeps,
                          &metric, &orows, &oscores, &ocounts, &threads, &norm_seq, &bounds, &warm_threads))
        return NULL;
    Bands bs, nbs = {.n = 0};
    PyObject *result = NULL;
    if (parse_bands(band_seq, &bs)) goto done_bufs;
    if (norm_seq != Py_None && parse_bands(norm_seq, &nbs)) goto done;
    int n_bands = (int)(bounds.len / 4) - 1;
    const int32_t *bd = bounds.buf;
    if (nbs.n) {
        int ok = nbs.n == 1 && !nbs.b[0].f16 && nbs.b[0].width == n_bands && n_bands >= 1 && n_bands < MAX_BANDS &&
                 bd[0] == 0;
        for (int b = 0; ok && b < n_bands; b++) ok = bd[b + 1] > bd[b];
        if (!ok) {
            PyErr_SetString(PyExc_ValueError, "norms: one float32 band with a column per band of bounds (ascending)");
            goto done;
        }
        while (bd[n_bands] > qstride) n_bands--; /* queries cut to a prefix: only the bands they cover */
    }
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
    RefineCtx c = {&bs,         rows.buf,     o,          qs.buf, nq, qstride, longest, d, kp, (int)stages, metric, k,
                   orows.buf,   ocounts.buf,  oscores.buf, nbs.n ? &nbs.b[0] : NULL, bd, n_bands, 0, 0, 0};
    /* A thread costs tens of microseconds to start (far more when the cores are busy): only a batch with
     * milliseconds of work is split. A single query's re-rank of a few hundred rows stays on this thread. */
    int parts = threads < 1 ? 1 : threads;
    if (nq < 2 || (double)total * d[stages - 1] < 4194304.0) parts = 1;
    if (parts > nq) parts = (int)nq;
    c.warm_threads = parts == 1 ? warm_threads : 0; /* a batch already reads with every thread */
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
    release_bands(&nbs);
done_bufs:
    PyBuffer_Release(&bounds);
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

/* scan(bands, rows_or_None, lo, hi, live_or_None, queries, qstride, col_to, qq, metric, keep, out_rows,
 *      out_scores, out_counts, threads, norms): per query the best `keep` rows, best first. norms: None or
 *      [row_norms described like a band]; a one-query range scan to a band edge then takes the rows'
 *      squared norms from it instead of computing them. */
static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *band_seq, *rows_obj, *live_obj, *norm_seq;
    long long lo, hi;
    Py_buffer qs, qq, orows, oscores, ocounts;
    Py_buffer rows = {0}, live = {0};
    Py_ssize_t qstride;
    int to, metric, keep, threads;
    if (!PyArg_ParseTuple(args, "OOLLOy*niy*iiw*w*w*iO", &band_seq, &rows_obj, &lo, &hi, &live_obj, &qs, &qstride,
                          &to, &qq, &metric, &keep, &orows, &oscores, &ocounts, &threads, &norm_seq))
        return NULL;
    PyObject *result = NULL;
    Bands bs = {.n = 0}, nbs = {.n = 0};
    Entry *heaps = NULL;
    int *counts = NULL;
    int have_rows = rows_obj != Py_None, have_live = live_obj != Py_None;
    if (have_rows && PyObject_GetBuffer(rows_obj, &rows, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (have_live && PyObject_GetBuffer(live_obj, &live, PyBUF_C_CONTIGUOUS) < 0) {
        have_live = 0;
        goto done;
    }
    if (parse_bands(band_seq, &bs)) goto done;
    if (norm_seq != Py_None && parse_bands(norm_seq, &nbs)) goto done;
    /* The first band is exactly the scanned prefix, and its norms are stored: scan_blocks_prefix. */
    int prefix_norms = nbs.n == 1 && !nbs.b[0].f16 && nbs.b[0].width == bs.n && bs.n >= 1 && bs.b[0].start == 0 &&
                    bs.b[0].width == to;
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
    const Band *norms = prefix_norms ? &nbs.b[0] : NULL;
    ScanCtx c = {&bs,   have_rows ? rows.buf : NULL, have_live ? live.buf : NULL, lo, hi, n_rows, qs.buf, qq.buf,
                 nq,    qstride, to, metric, keep, parts, heaps, counts, norms,
                 have_rows ? 0 : read_ahead_rows(&bs, to, norms), 0};
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
    release_bands(&nbs);
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
/* sum_squares, project: one query's checks and fitted codes in two calls (a numpy chain of them costs    */
/* tens of microseconds once the CPU's caches went cold between queries)                                 */

/* sum_squares(x) -> float: the sum of squares of float32 values, accumulated in double: finite exactly when
 * every value is (no float32 squared overflows a double), positive exactly when one is non-zero (nor
 * underflows one). */
static PyObject *sum_squares(PyObject *self, PyObject *args) {
    Py_buffer x;
    if (!PyArg_ParseTuple(args, "y*", &x)) return NULL;
    PyObject *result = NULL;
    if (!PyBuffer_IsContiguous(&x, 'C') || x.len % 4) {
        PyErr_SetString(PyExc_ValueError, "sum_squares needs a C-contiguous float32 buffer");
    } else {
        const float *v = (const float *)x.buf;
        Py_ssize_t n = x.len / 4, i = 0;
        double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (; i + 4 <= n; i += 4) {
            s0 += (double)v[i] * v[i];
            s1 += (double)v[i + 1] * v[i + 1];
            s2 += (double)v[i + 2] * v[i + 2];
            s3 += (double)v[i + 3] * v[i + 3];
        }
        for (; i < n; i++) s0 += (double)v[i] * v[i];
        result = PyFloat_FromDouble((s0 + s1) + (s2 + s3));
    }
    PyBuffer_Release(&x);
    return result;
}

/* project(x, rows, shift, scale, out): out[i] = rows[i] . (scale * x) - shift[i] for the k rows of a
 * C-contiguous (k, n) float32 matrix; x holds n float32, shift and out k float32 each. x is scaled first, in
 * double: a cosine query's scale can exceed float32's range (subnormal values), and its scaled values cannot
 * overflow a dot product. */
static PyObject *project(PyObject *self, PyObject *args) {
    Py_buffer x, rows, shift, out;
    double scale;
    if (!PyArg_ParseTuple(args, "y*y*y*dw*", &x, &rows, &shift, &scale, &out)) return NULL;
    PyObject *result = NULL;
    float *scaled = NULL;
    Py_ssize_t n = x.len / 4, k = shift.len / 4;
    int shapes = x.len % 4 == 0 && shift.len % 4 == 0 && out.len == 4 * k && n <= INT_MAX &&
                 (n == 0 ? rows.len == 0 : rows.len % (4 * n) == 0 && rows.len / (4 * n) == k);
    if (!PyBuffer_IsContiguous(&x, 'C') || !PyBuffer_IsContiguous(&rows, 'C') || !PyBuffer_IsContiguous(&shift, 'C') ||
        !PyBuffer_IsContiguous(&out, 'C') || !shapes) {
        PyErr_SetString(PyExc_ValueError, "project: x (n float32), rows (k x n float32), shift and out (k float32)");
    } else if ((scaled = malloc((n ? n : 1) * sizeof(float))) == NULL) {
        PyErr_NoMemory();
    } else {
        const float *xv = (const float *)x.buf, *m = (const float *)rows.buf, *sh = (const float *)shift.buf;
        float *o = (float *)out.buf;
        for (Py_ssize_t j = 0; j < n; j++) scaled[j] = (float)(scale * xv[j]);
        double d[4];
        Py_ssize_t r = 0;
        for (; r + 4 <= k; r += 4) { /* the query is read once for four rows */
            dot4_f32(scaled, m + r * n, m + (r + 1) * n, m + (r + 2) * n, m + (r + 3) * n, (int)n, d);
            for (int j = 0; j < 4; j++) o[r + j] = (float)(d[j] - sh[r + j]);
        }
        for (; r < k; r++) o[r] = (float)(dot_f32(m + r * n, scaled, (int)n) - sh[r]);
        result = Py_None;
        Py_INCREF(result);
    }
    free(scaled);
    PyBuffer_Release(&x);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&shift);
    PyBuffer_Release(&out);
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
    {"sum_squares", sum_squares, METH_VARARGS, "Sum of squares of float32 values, in double."},
    {"project", project, METH_VARARGS, "One query's codes: rows @ (scale * x) - shift, float32."},
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
        PyModule_AddIntConstant(m, "BOUND_MIN_PER_KEPT", BOUND_MIN_PER_KEPT);
    }
    return m;
}

/* Rows of the memory-mapped bands, scores, the bounded heap, threads, and the per-stage accumulation.
 * Included by _kernels.c only (after _kernels_simd.h). */
#pragma once

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

/* The part [band_lo, band_hi) of columns [from, to) that band b holds (none when lo >= hi). */
static inline int band_lo(const Band *b, int from) { return from > b->start ? from : b->start; }
static inline int band_hi(const Band *b, int to) { return to < b->start + b->width ? to : b->start + b->width; }

/* dot and sq of one row over columns [from, to): 0 on success, -1 if the row is not mapped. */
static inline int row_dot_sq(const Bands *bs, int64_t row, const float *q, int from, int to, double *dot, double *sq) {
    for (int i = 0; i < bs->n; i++) {
        const Band *b = &bs->b[i];
        int lo = band_lo(b, from), hi = band_hi(b, to);
        if (lo >= hi) continue;
        const char *p = band_row(b, row, lo);
        if (!p) return -1;
        dot_sq(p, b->f16, q + lo, hi - lo, dot, sq);
    }
    return 0;
}

/* row_dot_sq for four rows (out: dot, sq of each, added to): -1 if one is not mapped. */
static inline int rows_dot_sq4(const Bands *bs, const int64_t *rows, const float *q, int from, int to, double *out) {
    for (int i = 0; i < bs->n; i++) {
        const Band *b = &bs->b[i];
        int lo = band_lo(b, from), hi = band_hi(b, to);
        if (lo >= hi) continue;
        const void *p[4];
        for (int r = 0; r < 4; r++)
            if (!(p[r] = band_row(b, rows[r], lo))) return -1;
        dot_sq4(p, b->f16, q + lo, hi - lo, out);
    }
    return 0;
}

static inline int64_t chunk_offset(const Band *b, int64_t row) {
    return b->shift >= 0 ? (row & (b->chunk_rows - 1)) : row % b->chunk_rows;
}

static inline int straddles8(const Band *b, int64_t row) { return chunk_offset(b, row) + 8 > b->chunk_rows; }

/* row_dot_sq for the eight rows row..row+7 (dot, sq of each, added to): 0; 1 when they straddle a chunk
 * boundary in some band (score them one by one); -1 if one is not mapped. */
static inline int rows8_dot_sq(const Bands *bs, int64_t row, const float *q, int to, double *dot, double *sq) {
    for (int i = 0; i < bs->n; i++) {
        const Band *b = &bs->b[i];
        int hi = band_hi(b, to);
        if (b->start >= hi) continue;
        if (straddles8(b, row)) return 1;
    }
    for (int i = 0; i < bs->n; i++) {
        const Band *b = &bs->b[i];
        int hi = band_hi(b, to);
        if (b->start >= hi) continue;
        const char *p = band_row(b, row, b->start);
        if (!p || !band_row(b, row + 7, b->start)) return -1;
        dot_sq8(p, (size_t)b->width * b->itemsize, b->f16, q + b->start, hi - b->start, dot, sq);
    }
    return 0;
}

/* Row `row`, columns [0, to), widened into buf: 0 on success, -1 if not mapped. */
static inline int row_widen(const Bands *bs, int64_t row, int to, float *buf) {
    for (int i = 0; i < bs->n; i++) {
        const Band *b = &bs->b[i];
        int hi = band_hi(b, to);
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

/* The selection key of a score: higher is better, so l2 distances are negated. */
static inline double key_of(int metric, double dot, double sq, double qq) {
    double sc = score_of(metric, dot, sq, qq);
    return metric == L2 ? -sc : sc;
}

/* Which of eight rows (bit r: row r) could enter a full heap whose worst key is `worst` (heap_push decides):
 * the test without square roots or divisions, and with a margin far above double rounding, so it never
 * drops a row that heap_push would keep. Branch-free: whether a row passes is a coin toss early on. */
static inline int could_beat8(int metric, const double *dot, const double *sq, double qq, double worst) {
    int mask = 0;
    if (metric == IP) {
        double w = worst * (worst > 0 ? 1.0 - 1e-12 : 1.0 + 1e-12);
        for (int r = 0; r < 8; r++) mask |= (dot[r] >= w) << r;
    } else if (metric == L2) { /* key = -sqrt(max(d, 0)) >= worst  <=>  max(d, 0) <= worst^2 */
        double w = worst * worst * (1.0 + 1e-12) + 1e-300;
        for (int r = 0; r < 8; r++) mask |= (sq[r] - 2.0 * dot[r] + qq <= w) << r;
    } else if (worst <= 0) {
        mask = 0xff;
    } else { /* dot / sqrt(sq qq) >= worst > 0  <=>  dot > 0 and dot^2 >= worst^2 sq qq */
        double w = worst * worst * qq * (1.0 - 1e-12);
        for (int r = 0; r < 8; r++) mask |= ((dot[r] > 0) & (dot[r] * dot[r] >= w * sq[r])) << r;
    }
    return mask;
}

/* dot8_pass_simd's contract (see there), without SIMD. */
static int dot8_pass(const char *x, size_t stride, int f16, const float *q, int n, const float *sq8, int metric,
                     double qq, double worst, double *dot) {
#ifdef MRL_X86
    if (have_simd) return dot8_pass_simd(x, stride, f16, q, n, sq8, metric, qq, worst, dot);
#endif
    double sq[8];
    for (int r = 0; r < 8; r++) {
        double unused = 0;
        dot[r] = 0;
        dot_sq_portable(x + r * stride, f16, q, n, &dot[r], &unused);
        sq[r] = sq8[r];
    }
    return worst == -INFINITY ? 0xff : could_beat8(metric, dot, sq, qq, worst);
}

/* "Better" for the selection key: higher key, then lower row. l2 keys are negated distances. */
typedef struct {
    double key;
    int64_t row;
    int64_t pos; /* position in the caller's arrays */
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

/* The best `cap` of a stream, kept cheaply: entries that beat the current cut go to a buffer of 2 x cap;
 * a full buffer is cut back to its best cap by selection, which raises the cut. A push costs O(1) instead
 * of a heap's O(log cap) (for a 16-d scan keeping 500 of 100k rows, the heap was a third of the time). */
typedef struct {
    Entry *e; /* 2 x cap */
    Py_ssize_t n, cap;
    Entry worst; /* the cut, once `cut` */
    int cut;
} TopN;

/* Reorder e[0..n) so that e[0..m) are its m best (any order). */
static void select_best(Entry *e, Py_ssize_t n, Py_ssize_t m) {
    Py_ssize_t lo = 0, hi = n - 1;
    while (lo < hi) {
        Entry pivot = e[lo + (hi - lo) / 2];
        Py_ssize_t i = lo, j = hi;
        while (i <= j) {
            while (better(&e[i], &pivot)) i++;
            while (better(&pivot, &e[j])) j--;
            if (i <= j) {
                Entry t = e[i];
                e[i++] = e[j];
                e[j--] = t;
            }
        }
        if (m - 1 <= j)
            hi = j;
        else if (m - 1 >= i)
            lo = i;
        else
            break;
    }
}

static void topn_cut(TopN *t) {
    select_best(t->e, t->n, t->cap);
    t->n = t->cap;
    t->worst = t->e[0];
    for (Py_ssize_t i = 1; i < t->n; i++)
        if (better(&t->worst, &t->e[i])) t->worst = t->e[i];
    t->cut = 1;
}

static inline double topn_threshold(const TopN *t) { return t->cut ? t->worst.key : -INFINITY; }

static inline void topn_push(TopN *t, Entry x) {
    if (t->cut && !better(&x, &t->worst)) return;
    t->e[t->n++] = x;
    if (t->n == 2 * t->cap) topn_cut(t);
}

/* The kept entries (at most cap) into an empty heap of that capacity. */
static void topn_into_heap(TopN *t, Heap *h) {
    if (t->n > t->cap) topn_cut(t);
    for (Py_ssize_t i = 0; i < t->n; i++) heap_push(h, t->e[i]);
}

static int cmp_best_first(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    return better(x, y) ? -1 : (better(y, x) ? 1 : 0);
}

/* Sort the heap's entries best first and write their rows and scores (l2 keys back to distances); returns
 * how many. */
static int write_best(Heap *h, int metric, int64_t *rows, double *scores) {
    qsort(h->e, (size_t)h->n, sizeof(Entry), cmp_best_first);
    for (int j = 0; j < h->n; j++) {
        rows[j] = h->e[j].row;
        scores[j] = metric == L2 ? -h->e[j].key : h->e[j].key;
    }
    return h->n;
}

static int cmp_pos(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    return (x->pos > y->pos) - (x->pos < y->pos);
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
/* cold reads: a stage's rows paged in together                                                         */

static size_t page_bytes(void) {
    static size_t bytes = 0;
    if (!bytes) {
        long got = sysconf(_SC_PAGESIZE);
        bytes = got > 0 ? (size_t)got : 4096;
    }
    return bytes;
}

/* Whether the first page of a row's columns [from, to) in the last band holding some (the widest, as a
 * rule) is in memory: one mincore call. */
static int row_resident(const Bands *bs, int64_t row, int from, int to) {
    for (int i = bs->n - 1; i >= 0; i--) {
        const Band *b = &bs->b[i];
        int lo = band_lo(b, from), hi = band_hi(b, to);
        if (lo >= hi) continue;
        const char *p = band_row(b, row, lo);
        if (!p) return 1;
        unsigned char in_core = 1;
        uintptr_t page = (uintptr_t)p & ~(uintptr_t)(page_bytes() - 1);
        return mincore((void *)page, 1, &in_core) != 0 || (in_core & 1);
    }
    return 1;
}

/* Rows of columns [0, to) (and of the norms) that make READ_AHEAD_BYTES: a scan's read-ahead window. */
static int64_t read_ahead_rows(const Bands *bs, int to, const Band *norms) {
    size_t row_bytes = norms ? (size_t)norms->width * norms->itemsize : 0;
    for (int i = 0; i < bs->n; i++)
        if (band_lo(&bs->b[i], 0) < band_hi(&bs->b[i], to)) row_bytes += (size_t)bs->b[i].width * bs->b[i].itemsize;
    int64_t rows = row_bytes ? (int64_t)(READ_AHEAD_BYTES / row_bytes) : 0;
    return rows < 64 ? 64 : rows & ~(int64_t)7; /* whole blocks of eight */
}

/* Start reading rows [row, stop) of one band (every column) into the page cache without waiting, in pieces;
 * a piece whose first page is in memory is skipped (asking for pages in memory walks them in the kernel: a
 * warm scan pays one mincore call per READ_AHEAD_PROBE bytes instead). */
static void band_read_ahead(const Band *b, int64_t row, int64_t stop) {
    size_t row_bytes = (size_t)b->width * b->itemsize, page = page_bytes();
    unsigned char in_core[READ_AHEAD_PROBE / 4096];
    while (row < stop) {
        int64_t run = b->chunk_rows - chunk_offset(b, row);
        run = run < stop - row ? run : stop - row;
        const char *p = band_row(b, row, b->start);
        if (!p) return;
        uintptr_t first = (uintptr_t)p & ~(uintptr_t)(page - 1), end = (uintptr_t)p + (size_t)run * row_bytes;
        for (uintptr_t at = first; at < end; at += READ_AHEAD_PROBE) {
            size_t span = end - at < READ_AHEAD_PROBE ? end - at : READ_AHEAD_PROBE;
            int known = mincore((void *)at, span, in_core) == 0;
            for (size_t off = 0; off < span; off += READ_AHEAD_PIECE) /* a hint: a failure only costs speed */
                if (!known || !(in_core[off / page] & 1))
                    madvise((void *)(at + off), span - off < READ_AHEAD_PIECE ? span - off : READ_AHEAD_PIECE,
                            MADV_WILLNEED);
        }
        row += run;
    }
}

/* Band maps advise random access (a query's cold rows read one page each, not read_ahead_kb), so a
 * sequential scan says what it reads next: rows [row, stop) of the bands holding columns [0, to) and of
 * the norms. Without it a cold scan of the 2048-wide band waited on one 4 KiB fault after another. */
static void read_ahead(const Bands *bs, int to, const Band *norms, int64_t row, int64_t stop) {
    for (int i = 0; i < bs->n; i++)
        if (band_lo(&bs->b[i], 0) < band_hi(&bs->b[i], to)) band_read_ahead(&bs->b[i], row, stop);
    if (norms) band_read_ahead(norms, row, stop);
}

typedef struct {
    const Bands *bs;
    const int64_t *rows;
    Py_ssize_t n;
    int from, to;
} WarmCtx;

/* Read one byte of every page of the rows' columns [from, to): each thread waits for its own page faults. */
static void warm_work(void *ctx, int part, int parts) {
    const WarmCtx *w = ctx;
    for (Py_ssize_t r = part; r < w->n; r += parts)
        for (int i = 0; i < w->bs->n; i++) {
            const Band *b = &w->bs->b[i];
            int lo = band_lo(b, w->from), hi = band_hi(b, w->to);
            const volatile char *p = lo < hi ? (const volatile char *)band_row(b, w->rows[r], lo) : NULL;
            if (!p) continue;
            size_t bytes = (size_t)(hi - lo) * b->itemsize, step = page_bytes();
            for (size_t off = 0; off < bytes; off += step) (void)p[off];
            (void)p[bytes - 1];
        }
}

/* Before a stage reads n rows: if a few of them, spread over the list, are not in memory (a cold page
 * cache, or a store larger than memory), fault all their pages in from `threads` threads at once, so the
 * stage waits for one round of parallel reads instead of one page fault after another. Rows in memory
 * cost two mincore calls. */
static void warm_rows(const Bands *bs, const int64_t *rows, Py_ssize_t n, int from, int to, int threads) {
    if (threads < 2 || n < 2) return;
    int cold = 0;
    for (int probe = 0; probe < WARM_PROBES && !cold; probe++)
        cold = !row_resident(bs, rows[(n - 1) * probe / (WARM_PROBES - 1)], from, to);
    if (!cold) return;
    WarmCtx w = {bs, rows, n, from, to};
    parallel(warm_work, &w, threads < n ? threads : (int)n);
}

/* ---------------------------------------------------------------------------------------------------- */
/* accumulate: a stage's new columns for a query's candidate rows                                      */

/* Ask for the start of a row's columns [from, to) in every band ahead of use (scattered rows: the hardware
 * prefetcher cannot guess the next one). */
static inline void prefetch_row(const Bands *bs, int64_t row, int from, int to) {
    for (int i = 0; i < bs->n; i++) {
        const Band *b = &bs->b[i];
        int lo = band_lo(b, from), hi = band_hi(b, to);
        if (lo >= hi) continue;
        const char *p = band_row(b, row, lo);
        if (!p) continue;
        size_t bytes = (size_t)(hi - lo) * b->itemsize;
        for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 0);
    }
}

/* Add dot and sq over columns [from, to) of n rows to dot[i], sq[i]: 0, or -1 if a row is not mapped. */
static int acc_rows(const Bands *bs, const int64_t *rows, Py_ssize_t n, const float *qv, int from, int to,
                    double *dot, double *sq) {
    int failed = 0;
    for (Py_ssize_t i = 0; i < n && i < PREFETCH_AHEAD; i++) prefetch_row(bs, rows[i], from, to);
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (Py_ssize_t r = i + PREFETCH_AHEAD; r < i + 4 + PREFETCH_AHEAD && r < n; r++)
            prefetch_row(bs, rows[r], from, to);
        double out[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (rows_dot_sq4(bs, rows + i, qv, from, to, out)) failed = -1;
        for (int r = 0; r < 4; r++) {
            dot[i + r] += out[2 * r];
            sq[i + r] += out[2 * r + 1];
        }
    }
    for (; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) prefetch_row(bs, rows[i + PREFETCH_AHEAD], from, to);
        if (row_dot_sq(bs, rows[i], qv, from, to, &dot[i], &sq[i])) failed = -1;
    }
    return failed;
}

static int check_buf(Py_buffer *b, Py_ssize_t itemsize, Py_ssize_t count, const char *what) {
    if (!PyBuffer_IsContiguous(b, 'C') || b->len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous buffer of %zd items of %zd bytes", what, count,
                     itemsize);
        return -1;
    }
    return 0;
}

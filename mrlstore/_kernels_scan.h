/* The exact scan's work: one query over a range in blocks of eight rows (SIMD dot products, a bound test
 * before any row is kept, a cheap top-n), batches of queries row by row, and the merge of the threads'
 * results. Included by _kernels.c only (after _kernels_rows.h). */
#pragma once

#define BLOCK_SCAN_MAX_COLS 256

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
    const Band *norms; /* row_norms, when the first band is exactly [0, to): column 0 gives sq */
    int64_t ahead;     /* a range scan's read-ahead window in rows (0: a row list, read as it comes) */
    volatile int failed;
} ScanCtx;

/* At range position i, the start of a window: ask for the next window (at the first, for this one too). */
static inline void scan_ahead(const ScanCtx *c, int64_t i, int64_t a, int64_t b) {
    if (!c->ahead || (i - a) % c->ahead) return;
    int64_t from = i == a ? i : i + c->ahead, to = i + 2 * c->ahead < b ? i + 2 * c->ahead : b;
    if (from < to) read_ahead(c->bs, c->to, c->norms, c->lo + from, c->lo + to);
}

/* One query, one row (of a range: skipped unless live): 0, or -1 if it is not mapped. */
static inline int scan_one(ScanCtx *c, TopN *h, int64_t row) {
    if (!c->rows && c->live && !c->live[row]) return 0;
    double dot = 0, sq = 0;
    if (row_dot_sq(c->bs, row, c->queries, 0, c->to, &dot, &sq)) return -1;
    topn_push(h, (Entry){key_of(c->metric, dot, sq, c->qq[0]), row, 0});
    return 0;
}

/* One query over range positions [a, b) in blocks of eight consecutive rows, each row scored only when it
 * could enter the heap. Returns where it stopped (the caller scores the rest), or -1 if a row is not mapped. */
static int64_t scan_blocks(ScanCtx *c, TopN *h, int64_t a, int64_t b) {
    int64_t i = a;
    for (; i + 8 <= b; i += 8) {
        int64_t row = c->lo + i;
        double dot[8] = {0}, sq[8] = {0};
        int got = rows8_dot_sq(c->bs, row, c->queries, c->to, dot, sq);
        if (got < 0) return -1;
        if (got > 0) { /* across a chunk boundary */
            for (int r = 0; r < 8; r++)
                if (scan_one(c, h, row + r)) return -1;
            continue;
        }
        int pass = h->cut ? could_beat8(c->metric, dot, sq, c->qq[0], topn_threshold(h)) : 0xff;
        for (; pass; pass &= pass - 1) {
            int r = __builtin_ctz(pass);
            if (c->live && !c->live[row + r]) continue;
            topn_push(h, (Entry){key_of(c->metric, dot[r], sq[r], c->qq[0]), row + r, 0});
        }
    }
    return i;
}

/* scan_blocks when one band holds exactly the scanned prefix and row_norms give its squared norms: only the
 * dot products are computed (16 columns: 2 loads and 2 FMAs a row) and tested in SIMD lanes. */
static int64_t scan_blocks_prefix(ScanCtx *c, TopN *h, int64_t a, int64_t b) {
    const Band *band = &c->bs->b[0], *nb = c->norms;
    size_t stride = (size_t)band->width * band->itemsize;
    int64_t i = a;
    while (i < b) { /* one run of rows inside one chunk of the band and one of the norms */
        int64_t row = c->lo + i, run = b - i;
        int64_t left = band->chunk_rows - chunk_offset(band, row), left_norms = nb->chunk_rows - chunk_offset(nb, row);
        run = run < left ? run : left;
        run = run < left_norms ? run : left_norms;
        if (run < 8) {
            for (int64_t r = 0; r < run; r++)
                if (scan_one(c, h, row + r)) return -1;
            i += run;
            continue;
        }
        const char *p = band_row(band, row, 0);
        const float *nr = (const float *)band_row(nb, row, 0);
        if (!p || !nr) return -1; /* a mapped chunk is mapped whole */
        for (int64_t end = row + run / 8 * 8; row < end; row += 8, p += 8 * stride, nr += 8 * nb->width) {
            float sq8[8];
            for (int r = 0; r < 8; r++) sq8[r] = nr[r * nb->width];
            double dot[8];
            double worst = topn_threshold(h);
            for (int pass = dot8_pass(p, stride, band->f16, c->queries, c->to, sq8, c->metric, c->qq[0], worst, dot);
                 pass; pass &= pass - 1) {
                int r = __builtin_ctz(pass);
                if (c->live && !c->live[row + r]) continue;
                topn_push(h, (Entry){key_of(c->metric, dot[r], sq8[r], c->qq[0]), row + r, 0});
            }
        }
        i += run / 8 * 8;
    }
    return i;
}

/* One query over positions [a, b) of the range or row list into t. */
static void scan_one_window(ScanCtx *c, TopN *t, int64_t a, int64_t b) {
    int64_t i = a;
    /* Blocks of eight rows pay on narrow prefixes; on wide ones (dims=[2048]) eight rows' streams at once
     * ran slower than one row at a time (15.6 against 10.0 ms over 100k rows). */
    int blocks = !c->rows && (c->norms || c->to <= BLOCK_SCAN_MAX_COLS);
    if (blocks && (i = c->norms ? scan_blocks_prefix(c, t, a, b) : scan_blocks(c, t, a, b)) < 0) {
        c->failed = 1;
        i = b;
    }
    for (; i < b; i++)
        if (scan_one(c, t, c->rows ? c->rows[i] : c->lo + i)) {
            c->failed = 1;
            break;
        }
}

/* One query over positions [a, b) of the range or row list, into the empty heap h, window by window. */
static void scan_one_query(ScanCtx *c, Heap *h, int64_t a, int64_t b) {
    TopN t = {malloc(sizeof(Entry) * 2 * (size_t)c->keep), 0, c->keep, {0, 0, 0}, 0};
    if (!t.e) {
        c->failed = 2;
        return;
    }
    int64_t step = c->ahead ? c->ahead : b - a;
    for (int64_t w = a; w < b && c->failed != 1; w += step) {
        scan_ahead(c, w, a, b);
        scan_one_window(c, &t, w, w + step < b ? w + step : b);
    }
    topn_into_heap(&t, h);
    free(t.e);
}

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
    if (c->nq == 1) { /* fused: read each value once, straight from the map */
        scan_one_query(c, &h[0], a, b);
        c->counts[part] = h[0].n;
        free(h);
        return;
    }
    for (int64_t i = a; i < b; i++) {
        scan_ahead(c, i, a, b);
        int64_t row = c->rows ? c->rows[i] : c->lo + i;
        if (!c->rows && c->live && !c->live[row]) continue;
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
                heap_push(&h[q + j], (Entry){key_of(c->metric, dots[j], sq, c->qq[q + j]), row, 0});
            }
        }
        for (; q < c->nq; q++) {
            double dot = dot_f32(buf, c->queries + q * c->qstride, c->to);
            heap_push(&h[q], (Entry){key_of(c->metric, dot, sq, c->qq[q]), row, 0});
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
        out_counts[q] = write_best(&h, c->metric, out_rows + q * c->keep, out_scores + q * c->keep);
    }
}

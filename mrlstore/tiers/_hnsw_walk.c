/* The walk over the upper-link section of hnswlib's saved index file (optional: mrlstore/tiers/hnsw_file.py
 * has a Python twin with the same results).
 *
 * That section holds, for each element in turn, a uint32 byte count of its upper-level links, then the
 * links. Where each count sits depends on every count before it, so the walk is one sequential pass: about
 * a second of Python at 12M elements, milliseconds here, and without the GIL (an open loads its indexes
 * while other threads download or read bands).
 *
 * upper_levels(upper, levels, count, link_bytes, max_level) -> (element, end_word, bad_size)
 *   upper: the section as uint32 words; levels: int32, count items, zeroed, filled with each element's
 *   number of upper levels. Walks until count elements or the end of the section; a count that is not a
 *   whole number of levels (of link_bytes each) or more than max_level stops it. Returns the element with
 *   the bad count (count when none), the word after the last element (counting the elements not reached
 *   as one empty word each) and the bad count (-1 when none).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *upper_levels(PyObject *self, PyObject *args) {
    Py_buffer upper, levels;
    Py_ssize_t count;
    unsigned long long link_bytes;
    long long max_level;
    if (!PyArg_ParseTuple(args, "y*w*nKL", &upper, &levels, &count, &link_bytes, &max_level)) return NULL;
    PyObject *out = NULL;
    if (count < 0 || link_bytes == 0 || levels.len < count * (Py_ssize_t)sizeof(int32_t)) {
        PyErr_SetString(PyExc_ValueError, "upper_levels: levels must hold count int32 items, link_bytes > 0");
        goto done;
    }
    const uint32_t *words = (const uint32_t *)upper.buf;
    int32_t *level = (int32_t *)levels.buf;
    uint64_t n = (uint64_t)upper.len / 4, word = 0;
    Py_ssize_t element = 0;
    long long bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (; element < count && word < n; element++) {
        uint64_t size = words[word];
        if (size % link_bytes || (long long)(size / link_bytes) > max_level) {
            bad = (long long)size;
            break;
        }
        level[element] = (int32_t)(size / link_bytes);
        word += 1 + size / 4;
    }
    Py_END_ALLOW_THREADS
    if (bad < 0) {
        word += (uint64_t)(count - element);
        element = count;
    }
    out = Py_BuildValue("nKL", element, (unsigned long long)word, bad);
done:
    PyBuffer_Release(&upper);
    PyBuffer_Release(&levels);
    return out;
}

static PyMethodDef methods[] = {
    {"upper_levels", upper_levels, METH_VARARGS, "Each element's upper levels, walking hnswlib's saved byte counts."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hnsw_walk", NULL, -1, methods};

PyMODINIT_FUNC PyInit__hnsw_walk(void) { return PyModule_Create(&module); }

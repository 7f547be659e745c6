/* py_native.c - compiled (native) tasks and batches (catzilla_tasks._engine): a task compiled by
 * compiler.py runs its numba trampoline without the GIL; tasks.map queues many items at once,
 * as Python tasks (_submit_batch) or as chunks of native calls over argument columns. */
#include "py_internal.h"

/* ---- compiled (native) tasks ----
 *
 * compiler.py turns a task into a numba cfunc "trampoline" with one fixed C signature:
 *     int64 tramp(void *col0, ..., void *col7, void *out, void *status, int64 start, int64 stop)
 * It runs items start..stop-1 of flat argument columns (int64, float64 or uint8 per argument),
 * writes out[i] and status[i] (0 = ok, 1 = the call raised) and returns how many raised. The
 * user's function is called inside a numba try/except, so an exception never leaves native
 * code: it needs no GIL on any path (numba's cfunc wrapper takes the GIL only to report an
 * exception that escapes, and none does). */
#define NATIVE_MAXARGS 8
typedef int64_t (*native_tramp)(void *, void *, void *, void *, void *, void *, void *, void *, void *, void *,
                                int64_t, int64_t);

/* The call block of one native task (a bytearray made by compiler.py; the node's arg is the
 * tuple (call block, positional arguments)): the trampoline, the arguments as 8-byte slots,
 * room for the result. */
typedef struct {
    uint64_t tramp;
    int64_t nargs;
    int64_t restype;          /* 'i' int64, 'f' float64, 'b' bool */
    uint64_t slots[NATIVE_MAXARGS];
    uint64_t result;
    uint64_t status;
} native_block;

static int64_t native_call(native_tramp fn, void *const *cols, void *out, void *status, int64_t start, int64_t stop) {
    return fn(cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6], cols[7], out, status, start, stop);
}

static PyObject *native_box(int64_t restype, const void *p) {
    switch (restype) {
    case 'i': return PyLong_FromLongLong(*(const int64_t *)p);
    case 'f': return PyFloat_FromDouble(*(const double *)p);
    case 'b': return PyBool_FromLong(*(const uint8_t *)p != 0);
    }
    PyErr_Format(PyExc_SystemError, "native task: unknown result type %d", (int)restype);
    return NULL;
}

/* A native task's call (GIL held on entry and exit; released around the native code). When
 * the native call raised, the Python function runs once more with the same arguments, under
 * the GIL, to produce the task's real exception (compiled functions are pure: no I/O, no
 * mutable globals, so the re-run computes the same thing). */
PyObject *run_native(ct_task *t) {
    PyObject *a = (PyObject *)t->arg;
    PyObject *blk = a && PyTuple_CheckExact(a) && PyTuple_GET_SIZE(a) == 2 ? PyTuple_GET_ITEM(a, 0) : NULL;
    if (!blk || !PyByteArray_CheckExact(blk) || PyByteArray_GET_SIZE(blk) < (Py_ssize_t)sizeof(native_block)) {
        PyErr_SetString(PyExc_SystemError, "native task without its call block");
        return NULL;
    }
    native_block *b = (native_block *)PyByteArray_AS_STRING(blk);
    void *cols[NATIVE_MAXARGS] = {0};
    for (int64_t j = 0; j < b->nargs && j < NATIVE_MAXARGS; j++) cols[j] = &b->slots[j];
    int64_t nf;
    Py_BEGIN_ALLOW_THREADS
    nf = native_call((native_tramp)(uintptr_t)b->tramp, cols, &b->result, &b->status, 0, 1);
    Py_END_ALLOW_THREADS
    if (nf == 0) return native_box(b->restype, &b->result);
    return PyObject_CallObject((PyObject *)t->fn, PyTuple_GET_ITEM(a, 1));
}



/* A task compiled to native code: compiler.py checks the arguments against a compiled
 * signature (compiling it on first use) and gives back the call block, or None: the task then
 * runs as Python (arguments of other types, a value that does not fit, no compiler). */
PyObject *enqueue_native(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
                         PyObject *kwnames, int priority, ConfigObject *cfg, int64_t block_ns, PyObject *native) {
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0, npos = nvalues - nkw;
    PyObject *pos = PyTuple_New(npos), *kw = nkw ? PyDict_New() : (Py_INCREF(Py_None), Py_None), *prep = NULL;
    if (!pos || !kw) goto done;
    for (Py_ssize_t i = 0; i < npos; i++) {
        Py_INCREF(values[i]);
        PyTuple_SET_ITEM(pos, i, values[i]);
    }
    for (Py_ssize_t i = 0; i < nkw; i++)
        if (PyDict_SetItem(kw, PyTuple_GET_ITEM(kwnames, i), values[npos + i]) < 0) goto done;
    prep = PyObject_CallMethodObjArgs(native, py_mod.native_prepare, pos, kw, func, NULL);
    if (!prep) goto done;
    if (prep == Py_None) {
        Py_CLEAR(prep);
        Py_DECREF(pos);
        Py_DECREF(kw);
        return enqueue_node(self, func, values, nvalues, kwnames, priority, cfg, block_ns);
    }
    if (!PyTuple_CheckExact(prep) || PyTuple_GET_SIZE(prep) != 2 || !PyByteArray_CheckExact(PyTuple_GET_ITEM(prep, 0)) ||
        PyByteArray_GET_SIZE(PyTuple_GET_ITEM(prep, 0)) < (Py_ssize_t)sizeof(native_block) ||
        !PyTuple_CheckExact(PyTuple_GET_ITEM(prep, 1))) {
        PyErr_SetString(PyExc_SystemError, "native task: the compiler's prepare hook returned a bad call block");
        Py_CLEAR(prep);
        goto done;
    }
    ct_task *t = ct_task_new();
    if (!t) {
        PyErr_NoMemory();
        Py_CLEAR(prep);
        goto done;
    }
    Py_INCREF(func);
    t->fn = func;
    t->arg = Py_NewRef(prep);   /* (call block, positional arguments) */
    t->kind = CT_KIND_NATIVE;
    t->priority = (uint8_t)priority;
    Py_DECREF(pos);
    Py_DECREF(kw);
    Py_DECREF(prep);
    return enqueue_submit(self, t, cfg, block_ns);
done:
    Py_XDECREF(pos);
    Py_XDECREF(kw);
    return NULL;
}


/* ---- batches: tasks.map ---- */

typedef struct {
    native_tramp fn;
    int ncols;
    char codes[NATIVE_MAXARGS];
    void *cols[NATIVE_MAXARGS];       /* contiguous columns the trampoline reads (item i at [i]) */
    const char *src[NATIVE_MAXARGS];  /* a strided buffer column gathered into cols[k] by the
                                         worker before the call, or NULL */
    Py_ssize_t stride[NATIVE_MAXARGS];
    void *out;
    uint8_t *status;
    _Atomic int64_t failed;
} native_job;

typedef struct {
    native_job *job;
    int64_t start, stop;
} native_chunk;

/* One engine node of a native batch: a range of items, run on a worker with no GIL. Strided
 * buffer columns are first copied into the job's contiguous columns (this range only). */
static void native_chunk_run(void *p) {
    native_chunk *c = p;
    native_job *j = c->job;
    for (int k = 0; k < j->ncols; k++) {
        const char *s = j->src[k];
        if (!s) continue;
        Py_ssize_t st = j->stride[k];
        if (j->codes[k] == 'b') {
            uint8_t *d = j->cols[k];
            for (int64_t i = c->start; i < c->stop; i++) d[i] = *(const uint8_t *)(s + i * st);
        } else {
            uint64_t *d = j->cols[k];
            for (int64_t i = c->start; i < c->stop; i++) memcpy(&d[i], s + i * st, 8);
        }
    }
    int64_t nf = native_call(j->fn, j->cols, j->out, j->status, c->start, c->stop);
    if (nf) atomic_fetch_add_explicit(&j->failed, nf, memory_order_relaxed);
}

/* Convert items start..stop-1 (argument tuples, or single values when there is one
 * argument) into the job's flat columns (GIL held). Types must match exactly: int fitting in
 * int64 for 'i', float for 'f', bool for 'b'. Returns -1, or the index of the first item that
 * does not match. */
static Py_ssize_t native_pack(native_job *j, PyObject *const *items, Py_ssize_t start, Py_ssize_t stop) {
    int nc = j->ncols;
    for (Py_ssize_t i = start; i < stop; i++) {
        PyObject *item = items[i];
        PyObject *const *vals = &item;
        if (PyTuple_CheckExact(item)) {
            if (PyTuple_GET_SIZE(item) != nc) return i;
            vals = &PyTuple_GET_ITEM(item, 0);
        } else if (nc != 1) {
            return i;
        }
        for (int k = 0; k < nc; k++) {
            PyObject *v = vals[k];
            switch (j->codes[k]) {
            case 'i': {
                if (!PyLong_CheckExact(v)) return i;
                int overflow = 0;
                long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
                if (overflow) return i;
                ((int64_t *)j->cols[k])[i] = x;
                break;
            }
            case 'f':
                if (!PyFloat_CheckExact(v)) return i;
                ((double *)j->cols[k])[i] = PyFloat_AS_DOUBLE(v);
                break;
            default:
                if (!PyBool_Check(v)) return i;
                ((uint8_t *)j->cols[k])[i] = v == Py_True;
            }
        }
    }
    return -1;
}

/* The type code ('i' int64, 'f' float64, 'b' bool) of a buffer format, or 0. Native byte
 * order only ('@', '=' or '<' on a little-endian machine); 'q', 'l' and 'n' of 8 bytes are
 * int64 (numpy's int64 is 'l'); results of type bool may also go to 'B' (uint8 0/1). */
static char buffer_code(const char *fmt, Py_ssize_t itemsize, int for_out) {
    if (!fmt) fmt = "B";
    if (*fmt == '@' || *fmt == '=') fmt++;
#if PY_LITTLE_ENDIAN
    else if (*fmt == '<') fmt++;
#else
    else if (*fmt == '>' || *fmt == '!') fmt++;
#endif
    if (!fmt[0] || fmt[1]) return 0;
    if (strchr("qln", fmt[0]) && itemsize == 8) return 'i';
    if (fmt[0] == 'd' && itemsize == 8) return 'f';
    if ((fmt[0] == '?' || (for_out && fmt[0] == 'B')) && itemsize == 1) return 'b';
    return 0;
}

/* Take the result buffer `out` (writable, C-contiguous, 1-D, n items of restype). */
static int get_out_buffer(PyObject *out, Py_buffer *v, char restype, Py_ssize_t n) {
    if (PyObject_GetBuffer(out, v, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (v->ndim != 1 || v->shape[0] != n || buffer_code(v->format, v->itemsize, 1) != restype) {
        PyErr_Format(PyExc_TypeError, "tasks.map(): out= must be a 1-D buffer of %zd items of type %s, got "
                     "format %s, %d dimensions, %zd items", n,
                     restype == 'i' ? "int64" : restype == 'f' ? "float64" : "bool", v->format ? v->format : "B",
                     v->ndim, v->ndim ? v->shape[0] : (Py_ssize_t)1);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* The engine's side of a native map, shared by _map_native (items: a list or tuple converted
 * here, node by node) and _map_native_buffers (columns read from buffers by the workers).
 * job->cols / job->out left NULL are allocated here (and freed); with box, the results are
 * boxed into a list as the nodes finish, else they stay in job->out (the caller's buffer).
 * Returns (results | None, failed indices, cancelled indices), or the index of the first item
 * that does not match the type codes (only with items). */
static PyObject *map_native_core(EngineObject *self, native_job *job, Py_ssize_t n, PyObject *items, char restype,
                                 int64_t chunk, int priority, double hold_gil, int box) {
    PyObject *ret = NULL, *results = NULL, *failed = NULL, *cancelled = NULL;
    int owned[NATIVE_MAXARGS] = {0}, own_out = job->out == NULL;
    if (chunk > n) chunk = n ? n : 1; /* a node never covers more than the batch: no overflow below */
    int64_t nchunks = n ? (n + chunk - 1) / chunk : 0;
    native_chunk *chunks = PyMem_Malloc((size_t)(nchunks ? nchunks : 1) * sizeof(native_chunk));
    ct_task **nodes = PyMem_Calloc((size_t)(nchunks ? nchunks : 1), sizeof(ct_task *));
    int ok = chunks && nodes;
    for (int k = 0; k < job->ncols && ok; k++)
        if (!job->cols[k]) ok = owned[k] = (job->cols[k] = PyMem_Malloc((size_t)(n ? n : 1) * 8)) != NULL;
    if (ok && own_out) ok = (job->out = PyMem_Malloc((size_t)(n ? n : 1) * 8)) != NULL;
    if (ok) ok = (job->status = PyMem_Malloc((size_t)(n ? n : 1))) != NULL;
    results = ok ? (box ? PyList_New(n) : Py_NewRef(Py_None)) : NULL;
    failed = ok ? PyList_New(0) : NULL;
    cancelled = ok ? PyList_New(0) : NULL;
    if (!ok || !results || !failed || !cancelled) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    int64_t submitted = 0;
    int rc = CT_OK;
    Py_ssize_t bad = -1;
    for (; submitted < nchunks; submitted++) {
        int64_t start = submitted * chunk, stop = chunk < n - start ? start + chunk : n;
        if (items) {
            /* (the list's length is re-read: a callback of another task may have shrunk it) */
            if (PySequence_Fast_GET_SIZE(items) != n) {
                PyErr_SetString(PyExc_RuntimeError, "tasks.map(): the list of arguments changed size during the call");
                rc = CT_EINVAL;
                break;
            }
            bad = native_pack(job, PySequence_Fast_ITEMS(items), start, stop);
            if (bad >= 0) break;
        }
        ct_task *t = ct_task_new();
        if (!t) {
            rc = CT_ENOMEM;
            break;
        }
        chunks[submitted] = (native_chunk){job, start, stop};
        t->fn = (void *)native_chunk_run;
        t->arg = &chunks[submitted];
        t->kind = CT_KIND_C;
        t->priority = (uint8_t)priority;
        ct_task_incref(t);   /* ours, for waiting; the other goes to the engine */
        rc = ct_engine_submit(self->e, t, 0);
        if (rc == CT_EFULL) {
            atomic_fetch_sub_explicit(&self->e->rejected, 1, memory_order_relaxed);
            Py_BEGIN_ALLOW_THREADS
            rc = ct_engine_submit(self->e, t, -1);
            Py_END_ALLOW_THREADS
        }
        if (rc != CT_OK) {
            ct_task_decref(NULL, t);
            ct_task_decref(NULL, t);
            break;
        }
        nodes[submitted] = t;
    }
    /* Wait for every queued node (they use our buffers and the caller's), in order, boxing as
     * they finish. */
    int interrupted = 0, gil_needed = 0;
    for (int64_t i = 0; i < submitted; i++) {
        ct_task *t = nodes[i];
        if (hold_gil > 0 && !gil_needed && ct_task_wait(t, ct_now_ns() + (uint64_t)(hold_gil * 1e9)) != CT_OK)
            gil_needed = 1;
        if (!interrupted && wait_node(t, 0) < 0) {
            /* Ctrl-C: cancel what has not started, wait for what runs */
            interrupted = 1;
            for (int64_t k = i; k < submitted; k++) ct_task_cancel(self->e, nodes[k]);
        }
        if (interrupted) {
            Py_BEGIN_ALLOW_THREADS
            ct_task_wait(t, 0);
            Py_END_ALLOW_THREADS
            continue;
        }
        if (bad >= 0 || rc != CT_OK) continue;
        int was_cancelled = ct_task_status(t) == CT_CANCELLED;
        /* without boxing only failures need a look (the count covers every finished node) */
        if (!box && !was_cancelled && !atomic_load_explicit(&job->failed, memory_order_relaxed)) continue;
        for (int64_t k = chunks[i].start; k < chunks[i].stop; k++) {
            PyObject *v = NULL;
            if (was_cancelled || job->status[k]) {
                PyObject *idx = PyLong_FromLongLong(k);
                if (!idx || PyList_Append(was_cancelled ? cancelled : failed, idx) < 0) {
                    Py_XDECREF(idx);
                    rc = CT_ENOMEM;
                    break;
                }
                Py_DECREF(idx);
                if (box) v = Py_NewRef(Py_None);
            } else if (box) {
                v = native_box(restype, (char *)job->out + (restype == 'b' ? k : 8 * k));
                if (!v) {
                    rc = CT_ENOMEM;
                    break;
                }
            }
            if (box) PyList_SET_ITEM(results, k, v);
        }
    }
    for (int64_t i = 0; i < submitted; i++) ct_task_decref(NULL, nodes[i]);
    if (interrupted || PyErr_Occurred()) goto done;
    if (gil_needed) {
        PyErr_SetString(PyExc_RuntimeError,
                        "native tasks did not finish while the waiting thread held the GIL: the native code "
                        "needed the GIL");
        goto done;
    }
    if (bad >= 0) {
        ret = PyLong_FromSsize_t(bad);
        goto done;
    }
    if (rc != CT_OK) {
        submit_error(self, rc);
        goto done;
    }
    ret = PyTuple_Pack(3, results, failed, cancelled);
done:
    Py_XDECREF(results);
    Py_XDECREF(failed);
    Py_XDECREF(cancelled);
    for (int k = 0; k < job->ncols; k++)
        if (owned[k]) PyMem_Free(job->cols[k]);
    if (own_out) PyMem_Free(job->out);
    PyMem_Free(job->status);
    PyMem_Free(chunks);
    PyMem_Free(nodes);
    return ret;
}

static int map_native_args(const char *fname, unsigned long long tramp, const char *codes, Py_ssize_t ncodes,
                           const char *restype, Py_ssize_t nres, long long chunk, int priority) {
    if (!tramp || ncodes > NATIVE_MAXARGS || nres != 1 || !strchr("ifb", restype[0]) || chunk < 1 || priority < 0 ||
        priority >= CT_NPRIO) {
        PyErr_Format(PyExc_ValueError, "%s(): bad arguments", fname);
        return -1;
    }
    for (Py_ssize_t k = 0; k < ncodes; k++)
        if (!codes[k] || !strchr("ifb", codes[k])) {
            PyErr_Format(PyExc_ValueError, "%s(): unknown type code", fname);
            return -1;
        }
    return 0;
}

/* _map_native(tramp, typecodes, restype, items: list | tuple, chunk, priority, hold_gil_s=0, out=None)
 *   -> (results: list | None, failed: list of indices, cancelled: list of indices) | index: int
 *
 * Runs every item through the trampoline (see native_block), `chunk` items per engine node.
 * One call from Python does it all, pipelined: the items of a node are converted to flat C
 * columns and the node is queued at once, so the workers (which need no GIL) run the first
 * nodes while this thread converts the rest; then it waits for each node in order with the GIL
 * released and boxes its results into the list (with `out`, a writable buffer of n results,
 * the workers write there and nothing is boxed: results is None). Failed items (the call
 * raised) are left None and listed; items of nodes cancelled before they ran (shutdown) are
 * listed as cancelled.
 * When an item does not match the type codes, returns its index after the nodes already queued
 * have finished: the caller runs the batch as Python tasks.
 * hold_gil_s > 0 (tests only): wait WITHOUT releasing the GIL, for up to that many seconds per
 * node: if native code needed the GIL, that wait times out and RuntimeError says so (where a
 * real waiter that held the GIL would deadlock). */
PyObject *Engine_map_native(EngineObject *self, PyObject *args) {
    unsigned long long tramp;
    const char *codes, *restype;
    Py_ssize_t ncodes, nres;
    PyObject *items, *out = Py_None;
    long long chunk;
    int priority = 2;
    double hold_gil = 0;
    if (engine_check(self) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "Ks#s#OL|idO:_map_native", &tramp, &codes, &ncodes, &restype, &nres, &items, &chunk,
                          &priority, &hold_gil, &out))
        return NULL;
    if (closed_to_caller(self)) return refused(self);
    if (map_native_args("_map_native", tramp, codes, ncodes, restype, nres, chunk, priority) < 0) return NULL;
    if (!(PyList_CheckExact(items) || PyTuple_CheckExact(items))) {
        PyErr_SetString(PyExc_ValueError, "_map_native(): items must be a list or a tuple");
        return NULL;
    }
    Py_INCREF(items);   /* a list may change while we convert it: keep it, read it under the GIL only */
    Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
    native_job job = {.fn = (native_tramp)(uintptr_t)tramp, .ncols = (int)ncodes};
    atomic_init(&job.failed, 0);
    memcpy(job.codes, codes, (size_t)ncodes);
    Py_buffer ov;
    int have_out = out != Py_None;
    PyObject *ret = NULL;
    if (have_out) {
        if (get_out_buffer(out, &ov, restype[0], n) < 0) goto done;
        job.out = ov.buf;
    }
    ret = map_native_core(self, &job, n, items, restype[0], chunk, priority, hold_gil, !have_out);
    if (have_out) PyBuffer_Release(&ov);
done:
    Py_DECREF(items);
    return ret;
}

/* _map_native_buffers(tramp, typecodes, restype, columns, chunk, priority, out=None, hold_gil_s=0)
 *   -> (results: list | None, failed, cancelled) as _map_native
 *
 * The argument columns come from objects with the buffer protocol, read by the workers with no
 * Python object per item: `columns` is a tuple of one (obj, j) per parameter: j = -1 for a 1-D
 * buffer, else column j of a 2-D buffer (one row per item). Formats must be the type codes
 * exactly (int64, float64, bool; see buffer_code); any strides (a non-contiguous column is
 * copied, chunk by chunk, by the worker that runs it). Every buffer (and out's) is held from
 * before the first node is queued until the last one has finished, whatever happens (error,
 * Ctrl-C, shutdown); nothing is queued when one does not fit. */
PyObject *Engine_map_native_buffers(EngineObject *self, PyObject *args) {
    unsigned long long tramp;
    const char *codes, *restype;
    Py_ssize_t ncodes, nres;
    PyObject *columns, *out = Py_None;
    long long chunk;
    int priority = 2;
    double hold_gil = 0;
    if (engine_check(self) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "Ks#s#O!L|iOd:_map_native_buffers", &tramp, &codes, &ncodes, &restype, &nres,
                          &PyTuple_Type, &columns, &chunk, &priority, &out, &hold_gil))
        return NULL;
    if (closed_to_caller(self)) return refused(self);
    if (map_native_args("_map_native_buffers", tramp, codes, ncodes, restype, nres, chunk, priority) < 0) return NULL;
    if (ncodes < 1 || PyTuple_GET_SIZE(columns) != ncodes) {
        PyErr_SetString(PyExc_ValueError, "_map_native_buffers(): one column per type code");
        return NULL;
    }
    Py_buffer views[NATIVE_MAXARGS], ov;
    int nviews = 0, have_out = 0;
    PyObject *ret = NULL;
    Py_ssize_t n = -1;
    native_job job = {.fn = (native_tramp)(uintptr_t)tramp, .ncols = (int)ncodes};
    atomic_init(&job.failed, 0);
    memcpy(job.codes, codes, (size_t)ncodes);
    for (Py_ssize_t k = 0; k < ncodes; k++) {
        PyObject *spec = PyTuple_GET_ITEM(columns, k);
        Py_ssize_t j;
        PyObject *obj;
        if (!PyTuple_Check(spec) || !PyArg_ParseTuple(spec, "On", &obj, &j)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_map_native_buffers(): columns of (obj, j)");
            goto done;
        }
        Py_buffer *v = &views[k];
        if (PyObject_GetBuffer(obj, v, PyBUF_STRIDES | PyBUF_FORMAT) < 0) goto done;
        nviews++;
        char code = buffer_code(v->format, v->itemsize, 0);
        if (code != codes[k]) {
            PyErr_Format(PyExc_TypeError, "tasks.map(): argument %zd: the buffer has format %s, the compiled "
                         "signature needs %s", k, v->format ? v->format : "B",
                         codes[k] == 'i' ? "int64" : codes[k] == 'f' ? "float64" : "bool");
            goto done;
        }
        if (j < 0 ? v->ndim != 1 : (v->ndim != 2 || j >= v->shape[1])) {
            PyErr_Format(PyExc_TypeError, "tasks.map(): argument %zd: a buffer of %d dimensions", k, v->ndim);
            goto done;
        }
        if (n < 0) n = v->shape[0];
        if (v->shape[0] != n) {
            PyErr_Format(PyExc_ValueError, "tasks.map(): argument columns of different lengths (%zd and %zd)", n,
                         v->shape[0]);
            goto done;
        }
        const char *p = (const char *)v->buf + (j < 0 ? 0 : j * v->strides[1]);
        if (v->strides[0] == (codes[k] == 'b' ? 1 : 8)) {
            job.cols[k] = (void *)p;   /* read in place */
        } else {
            job.src[k] = p;            /* gathered by the workers into a column of ours */
            job.stride[k] = v->strides[0];
        }
    }
    if (out != Py_None) {
        if (get_out_buffer(out, &ov, restype[0], n) < 0) goto done;
        have_out = 1;
        job.out = ov.buf;
    }
    ret = map_native_core(self, &job, n, NULL, restype[0], chunk, priority, hold_gil, !have_out);
done:
    if (have_out) PyBuffer_Release(&ov);
    for (int k = 0; k < nviews; k++) PyBuffer_Release(&views[k]);
    return ret;
}

/* _submit_batch(func, items, config, block_timeout) -> list of TaskResult: one Python task per
 * item (a tuple of positional arguments, or one value), all queued in one call (all or none
 * per slice of queue_size/2, waiting for room with the GIL released). */
PyObject *Engine_submit_batch(EngineObject *self, PyObject *args) {
    PyObject *func, *items, *config;
    if (engine_check(self) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "OOO:_submit_batch", &func, &items, &config)) return NULL;
    if (closed_to_caller(self)) return refused(self);
    if (!PyCallable_Check(func)) return not_callable(func), NULL;
    ConfigObject *cfg = config != Py_None ? (ConfigObject *)config : lookup_config(func);
    if (cfg && !PyObject_TypeCheck((PyObject *)cfg, &Config_Type)) {
        PyErr_SetString(PyExc_TypeError, "_submit_batch(): config must be a TaskConfig");
        return NULL;
    }
    if (cfg && (cfg->isolation || cfg->delay_ns > 0 || cfg->routed)) {
        PyErr_SetString(PyExc_ValueError,
                        "_submit_batch(): delayed, isolated, limited or routed tasks are queued one by one");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(items, "tasks.map() needs an iterable of argument tuples");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *results = PyList_New(n);
    ct_task **nodes = PyMem_Calloc((size_t)(n ? n : 1), sizeof(ct_task *));
    Py_ssize_t made = 0, submitted = 0;
    int keep = cfg && (cfg->max_retries || cfg->timeout_ns || cfg->on_success || cfg->on_failure);
    if (!results || !nodes) {
        PyErr_NoMemory();
        goto fail;
    }
    for (; made < n; made++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, made);
        PyObject *targs;
        if (PyTuple_CheckExact(item)) {
            targs = PyTuple_GET_SIZE(item) ? Py_NewRef(item) : NULL;
        } else {
            targs = PyTuple_Pack(1, item);
            if (!targs) goto fail;
        }
        ct_task *t = ct_task_new();
        if (!t) {
            Py_XDECREF(targs);
            PyErr_NoMemory();
            goto fail;
        }
        t->fn = Py_NewRef(func);
        t->arg = targs;
        t->kind = CT_KIND_PY;
        t->priority = (uint8_t)(cfg ? cfg->priority : 2);
        if (keep) t->cfg = Py_NewRef((PyObject *)cfg);
        ResultObject *r = result_wrap(self, t);
        if (!r) {
            ct_task_decref(&self->e->hooks, t);
            goto fail;
        }
        PyList_SET_ITEM(results, made, (PyObject *)r);
        nodes[made] = t;
    }
    if (CT_UNLIKELY(self->mem_cap > 0)) {
        /* all or nothing: the whole batch's arguments must fit */
        int64_t need = 0;
        for (Py_ssize_t i = 0; i < made; i++) {
            int64_t b = args_bytes((PyObject *)nodes[i]->arg);
            if (b < 0) goto fail;
            need += b;
        }
        if (self->arg_bytes + need > self->mem_cap) {
            atomic_fetch_add_explicit(&self->e->rejected, (uint64_t)made, memory_order_relaxed);
            memory_full(self, need);
            goto fail;
        }
        for (Py_ssize_t i = 0; i < made; i++)
            if (charge(self, nodes[i], args_bytes((PyObject *)nodes[i]->arg)) < 0) goto fail;
    }
    int rc = CT_OK;
    Py_ssize_t slice = (Py_ssize_t)(self->e->cfg.queue_size / 2);
    if (slice < 1) slice = 1;
    while (submitted < n) {
        Py_ssize_t k = n - submitted < slice ? n - submitted : slice;
        rc = ct_engine_submit_many(self->e, nodes + submitted, (size_t)k, 0);
        if (rc == CT_EFULL) {
            atomic_fetch_sub_explicit(&self->e->rejected, (uint64_t)k, memory_order_relaxed);
            Py_BEGIN_ALLOW_THREADS
            rc = ct_engine_submit_many(self->e, nodes + submitted, (size_t)k, -1);
            Py_END_ALLOW_THREADS
        }
        if (rc != CT_OK) break;
        submitted += k;
    }
    if (rc != CT_OK) {
        /* the engine shut down part-way: what was queued runs (its results are dropped), the
         * rest is released */
        submit_error(self, rc);
        goto fail;
    }
    PyMem_Free(nodes);
    Py_DECREF(seq);
    return results;
fail:
    for (Py_ssize_t i = submitted; i < made; i++) ct_task_decref(&self->e->hooks, nodes[i]);   /* the engine's */
    PyMem_Free(nodes);
    Py_XDECREF(results);   /* the handles' references */
    Py_DECREF(seq);
    return NULL;
}


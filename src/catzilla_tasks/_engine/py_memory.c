/* py_memory.c - memory_pool_mb (catzilla_tasks._engine): the charge of each queued task's
 * arguments against its engine's cap. */
#include "py_internal.h"

/* ---- memory_pool_mb: a cap on the bytes queued tasks' arguments hold ----
 *
 * A task's charge is the size of its argument tuple plus each argument's own size, as
 * sys.getsizeof reports them (an object's own storage: a bytes or str its text, a numpy array
 * its buffer, a list its item array, not the items). It is taken when the task is queued and
 * given back when it starts (or is dropped unstarted); a task whose charge does not fit is
 * refused with QueueFull. Only engines with a cap measure (the default has none): the side
 * table and the sizes cost ~0.3 us per task. GIL held throughout. */

int64_t args_bytes(PyObject *a) {
    if (!a) return 0;
    int64_t total = 0;
    Py_ssize_t n = PyTuple_Check(a) ? PyTuple_GET_SIZE(a) : 0;
    for (Py_ssize_t i = -1; i < n; i++) {
        PyObject *o = i < 0 ? a : PyTuple_GET_ITEM(a, i);
        PyObject *sz = PyObject_CallOneArg(py_mod.getsizeof, o);
        if (!sz) return -1;
        long long v = PyLong_AsLongLong(sz);
        Py_DECREF(sz);
        if (v < 0) return PyErr_Occurred() ? -1 : 0;
        total += v;
    }
    return total;
}

/* Record a charge before the node is submitted (a worker may start it at once). */
int charge(EngineObject *self, ct_task *t, int64_t bytes) {
    PyObject *key = PyLong_FromVoidPtr(t);
    PyObject *val = Py_BuildValue("(KL)", (unsigned long long)(uintptr_t)self, (long long)bytes);
    int rc = key && val ? PyDict_SetItem(py_mod.charges, key, val) : -1;
    Py_XDECREF(key);
    Py_XDECREF(val);
    if (rc == 0) self->arg_bytes += bytes;
    return rc;
}

/* Give back the charge of a node (no-op if it has none). Never leaves an exception set. */
void uncharge(ct_task *t) {
    PyObject *et, *ev, *etb;   /* a pending exception (a release during unwinding) is kept */
    PyErr_Fetch(&et, &ev, &etb);
    PyObject *key = PyLong_FromVoidPtr(t);
    PyObject *val = key ? PyDict_GetItemWithError(py_mod.charges, key) : NULL;
    if (val) {
        EngineObject *eng = (EngineObject *)(uintptr_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(val, 0));
        eng->arg_bytes -= PyLong_AsLongLong(PyTuple_GET_ITEM(val, 1));
        if (PyDict_DelItem(py_mod.charges, key) < 0) PyErr_Clear();
    }
    PyErr_Clear();
    Py_XDECREF(key);
    PyErr_Restore(et, ev, etb);
}

PyObject *memory_full(EngineObject *self, int64_t need) {
    char mb[32];   /* (PyErr_Format has no %g) */
    snprintf(mb, sizeof mb, "%.6g", (double)self->mem_cap / 1048576.0);
    PyErr_Format(py_mod.queue_full,
                 "memory_pool_mb=%s reached: the arguments of the queued tasks hold %lld bytes and these "
                 "need %lld more; wait for some to run (join()), pass smaller arguments, or raise "
                 "memory_pool_mb",
                 mb, (long long)self->arg_bytes, (long long)need);
    return NULL;
}

/* Measure and charge a node about to be queued (mem_cap set). 0, or -1 with an exception
 * (QueueFull when it does not fit). */
int charge_node(EngineObject *self, ct_task *t) {
    int64_t bytes = args_bytes((PyObject *)t->arg);
    if (bytes < 0) return -1;
    if (self->arg_bytes + bytes > self->mem_cap) {
        atomic_fetch_add_explicit(&self->e->rejected, 1, memory_order_relaxed);
        memory_full(self, bytes);
        return -1;
    }
    return charge(self, t, bytes);
}


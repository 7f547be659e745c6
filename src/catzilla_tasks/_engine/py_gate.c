/* py_gate.c - Gate (catzilla_tasks._engine): a workflow step held back until the tasks it depends
 * on have succeeded. */
#include "py_internal.h"

/* ------------------------------------------------------------------ Gate (workflow steps)
 *
 * A Gate is a task that waits for other tasks: a workflow step held back until `pending`
 * dependencies have succeeded. The dependency's worker releases it in C, in its completion
 * path (run_callbacks, callback mode 2): it counts the gate down and queues it when it reaches
 * zero, with no Python frame. Python (workflows.py) builds the gates, wires them, fires the
 * ones without dependencies, and hears only of the rare events through on_fail(gate, exc):
 * the gate's task ended unsuccessfully (exc None: read gate.result), or a released gate could
 * not be queued (exc: QueueFull, RuntimeError after shutdown, ...).
 *
 * Every field is read and written with the GIL held (completion paths of Python-visible
 * tasks hold it), so a gate's state needs no atomics: 0 waiting, 1 queued, 2 cancelled. */

typedef struct GateObject {
    PyObject_VAR_HEAD        /* ob_size: the number of dependents, held inline in dependents[] */
    EngineObject *engine;
    PyObject *func;
    PyObject *values;       /* tuple: positional values, then keyword values */
    PyObject *kwnames;      /* tuple of keyword names, or NULL */
    PyObject *fills;        /* tuple of (index in values, Gate | tuple of Gates), or NULL */
    PyObject *on_fail;
    ct_task *task;          /* its task once queued (a reference; a TaskResult is made on demand) */
    Py_ssize_t pending;
    Py_ssize_t step;        /* the caller's tag (the step's index) */
    int state;
    /* The Gates released by this one's success, inline: no tuple per step (one object fewer
     * for the cycle collector to count and walk, ~15% of a no-op DAG step's cost). */
    struct GateObject *dependents[1];
} GateObject;


static PyObject *gate_value(PyObject *g) {
    ct_task *t = ((GateObject *)g)->task;
    if (!t || ct_task_status(t) != CT_SUCCEEDED) return NULL;
    return t->value ? (PyObject *)t->value : Py_None;
}

/* Queue the gate's task. 1 queued, 0 no room (QueueFull set), -1 another error (set). */
static int gate_enqueue(GateObject *g) {
    PyObject *values = g->values;
    Py_ssize_t n = PyTuple_GET_SIZE(values);
    PyObject *const *vals = &PyTuple_GET_ITEM(values, 0);
    /* With results to take, the call's values are assembled in a plain array (borrowed from
     * the values and the dependencies' tasks; a list per results_of() is ours): the engine
     * copies them into the task's own tuple, so no tuple is built twice. */
    PyObject *small[8], **filled = NULL;
    unsigned char owned_small[8], *owned = NULL;
    int rc = -1;
    if (g->fills) {
        filled = n <= 8 ? small : PyMem_Malloc((size_t)n * (sizeof(PyObject *) + 1));
        if (!filled) {
            PyErr_NoMemory();
            return -1;
        }
        owned = n <= 8 ? owned_small : (unsigned char *)(filled + n);
        for (Py_ssize_t i = 0; i < n; i++) {
            filled[i] = PyTuple_GET_ITEM(values, i);
            owned[i] = 0;
        }
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(g->fills); k++) {
            PyObject *f = PyTuple_GET_ITEM(g->fills, k);
            Py_ssize_t at = PyLong_AsSsize_t(PyTuple_GET_ITEM(f, 0));
            PyObject *src = PyTuple_GET_ITEM(f, 1), *v;
            if (Py_IS_TYPE(src, &Gate_Type)) {
                v = gate_value(src);
                if (!v) goto not_ready;
                if (owned[at]) Py_DECREF(filled[at]);
                filled[at] = v;
                owned[at] = 0;
            } else {
                Py_ssize_t m = PyTuple_GET_SIZE(src);
                v = PyList_New(m);
                if (!v) goto done;
                for (Py_ssize_t i = 0; i < m; i++) {
                    PyObject *x = gate_value(PyTuple_GET_ITEM(src, i));
                    if (!x) {
                        Py_DECREF(v);
                        goto not_ready;
                    }
                    PyList_SET_ITEM(v, i, Py_NewRef(x));
                }
                if (owned[at]) Py_DECREF(filled[at]);
                filled[at] = v;
                owned[at] = 1;
            }
        }
        vals = filled;
    }
    {
        ConfigObject *cfg = lookup_config(g->func);
        PyObject *r = enqueue(g->engine, g->func, vals, n, g->kwnames, cfg ? cfg->priority : 2, cfg, 0,
                              cfg ? cfg->native : NULL);
        if (!r) {
            rc = PyErr_ExceptionMatches(py_mod.queue_full) ? 0 : -1;
            goto done;
        }
        /* keep the task, not its handle: one object fewer per step for the cycle collector
         * to count (a handle is made again when Python asks for gate.result) */
        g->task = ((ResultObject *)r)->t;
        ct_task_incref(g->task);
        Py_DECREF(r);
        g->state = 1;
        rc = 1;
        goto done;
    }
not_ready:
    PyErr_SetString(PyExc_RuntimeError, "a workflow step was released before the results it takes");
done:
    if (filled) {
        for (Py_ssize_t i = 0; i < n; i++)
            if (owned[i]) Py_DECREF(filled[i]);
        if (filled != small) PyMem_Free(filled);
    }
    return rc;
}

/* Tell Python that the gate failed (exc NULL: its task ended unsuccessfully). */
static void gate_report(GateObject *g, PyObject *exc) {
    PyObject *r = PyObject_CallFunctionObjArgs(g->on_fail, (PyObject *)g, exc ? exc : Py_None, NULL);
    if (!r) {
        PyObject *e = fetch_exception();
        report_error("callback", g->on_fail, e);
        Py_XDECREF(e);
    }
    Py_XDECREF(r);
}


/* Queue the gate's task and hook its end to gate_done. 1 queued, 0 no room, -1 error (set). */
static int gate_start(GateObject *g) {
    int rc = gate_enqueue(g);
    if (rc <= 0) return rc;
    /* The GIL is held from the enqueue to here: a Python task cannot end in between, but
     * attach_callback still says so if it has (then its outcome is handled now). */
    ct_task *t = g->task;
    int a = attach_callback(t, (PyObject *)g, 2);
    if (a < 0) return -1;
    if (a == 1) gate_done((PyObject *)g, (int)ct_task_status(t));
    return 1;
}

/* The last dependency succeeded (GIL held, in the completion path): queue, or report. */
static void gate_release(GateObject *g) {
    Py_INCREF(g);
    if (gate_start(g) <= 0) {
        PyObject *exc = fetch_exception();
        gate_report(g, exc);
        Py_XDECREF(exc);
    }
    Py_DECREF(g);
}

/* Callback mode 2 of a node: the gate's task ended with status. */
void gate_done(PyObject *gobj, int status) {
    GateObject *g = (GateObject *)gobj;
    if (status != CT_SUCCEEDED) {
        /* the workflow takes the failure over (on_fail) */
        if (g->task) atomic_fetch_or_explicit(&g->task->state, CT_F_OBSERVED, memory_order_relaxed);
        gate_report(g, NULL);
        return;
    }
    for (Py_ssize_t i = 0; i < Py_SIZE(g); i++) {
        GateObject *d = g->dependents[i];
        if (d && d->state == 0 && --d->pending == 0) gate_release(d);
    }
}

/* gate._fire() -> bool: queue it now (a step without dependencies, or one parked on a full
 * engine). False: no room (QueueFull); other errors raise. Once queued, its end counts down
 * its dependents. */
static PyObject *Gate_fire(GateObject *g, PyObject *unused) {
    if (g->state != 0) {
        PyErr_SetString(PyExc_RuntimeError, g->state == 1 ? "this step is already queued" : "this step was cancelled");
        return NULL;
    }
    int rc = gate_start(g);
    if (rc < 0) return NULL;
    if (rc == 0) {
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyObject *Gate_cancel(GateObject *g, PyObject *unused) {
    if (g->state == 0) {
        g->state = 2;
        Py_RETURN_TRUE;
    }
    if (g->state == 1 && !CT_IS_TERMINAL(atomic_load(&g->task->state))) {
        PyObject *r = (PyObject *)result_wrap(g->engine, g->task);
        if (!r) return NULL;
        PyObject *out = PyObject_CallMethod(r, "cancel", NULL);
        Py_DECREF(r);
        return out;
    }
    Py_RETURN_FALSE;
}

static PyObject *gate_new(EngineObject *self, PyObject *func, PyObject *values, PyObject *kwnames, Py_ssize_t pending,
                          PyObject *on_fail, Py_ssize_t step, Py_ssize_t ndeps) {
    if (!PyCallable_Check(func)) return not_callable(func), NULL;
    if (!PyTuple_Check(values)) {
        PyErr_SetString(PyExc_TypeError, "_gates: values must be a tuple");
        return NULL;
    }
    if (kwnames != Py_None && (!PyTuple_Check(kwnames) || PyTuple_GET_SIZE(kwnames) > PyTuple_GET_SIZE(values))) {
        PyErr_SetString(PyExc_TypeError, "_gates: kwnames must be a tuple of names (the last values) or None");
        return NULL;
    }
    if (pending < 0 || !PyCallable_Check(on_fail)) {
        PyErr_SetString(PyExc_ValueError, "_gates: pending >= 0 and a callable on_fail(gate, exc)");
        return NULL;
    }
    GateObject *g = PyObject_GC_NewVar(GateObject, &Gate_Type, ndeps);
    if (!g) return NULL;
    for (Py_ssize_t i = 0; i < ndeps; i++) g->dependents[i] = NULL;   /* wired by Engine_gates */
    g->engine = (EngineObject *)Py_NewRef(self);
    g->func = Py_NewRef(func);
    g->values = Py_NewRef(values);
    g->kwnames = kwnames == Py_None || PyTuple_GET_SIZE(kwnames) == 0 ? NULL : Py_NewRef(kwnames);
    g->fills = NULL;
    g->task = NULL;
    g->on_fail = Py_NewRef(on_fail);
    g->pending = pending;
    g->step = step;
    g->state = 0;
    PyObject_GC_Track(g);
    return (PyObject *)g;
}

/* Engine._gates(funcs, values, kwnames, pending, dependents, fills, on_fail) -> list of Gates.
 * One call builds a whole workflow execution: per step j, funcs[j], values[j] (tuple),
 * kwnames[j] (tuple or None), pending[j] (int), dependents[j] (tuple of step indices) and
 * fills[j] (None or ((index into values, step index | tuple of step indices), ...)). */
PyObject *Engine_gates(EngineObject *self, PyObject *args) {
    PyObject *funcs, *values, *kwnames, *pending, *deps, *fills, *on_fail;
    if (CT_UNLIKELY(!self->e) && engine_check(self) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!O:_gates", &PyTuple_Type, &funcs, &PyTuple_Type, &values, &PyTuple_Type,
                          &kwnames, &PyTuple_Type, &pending, &PyTuple_Type, &deps, &PyTuple_Type, &fills, &on_fail))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(funcs);
    if (PyTuple_GET_SIZE(values) != n || PyTuple_GET_SIZE(kwnames) != n || PyTuple_GET_SIZE(pending) != n ||
        PyTuple_GET_SIZE(deps) != n || PyTuple_GET_SIZE(fills) != n) {
        PyErr_SetString(PyExc_ValueError, "_gates: every array needs one entry per step");
        return NULL;
    }
    PyObject *gates = PyList_New(n);
    if (!gates) return NULL;
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_ssize_t pj = PyLong_AsSsize_t(PyTuple_GET_ITEM(pending, j));
        if (pj == -1 && PyErr_Occurred()) goto fail;
        PyObject *dj = PyTuple_GET_ITEM(deps, j);
        if (!PyTuple_Check(dj)) {
            PyErr_SetString(PyExc_TypeError, "_gates: dependents[j] is a tuple of step indices");
            goto fail;
        }
        PyObject *g = gate_new(self, PyTuple_GET_ITEM(funcs, j), PyTuple_GET_ITEM(values, j),
                               PyTuple_GET_ITEM(kwnames, j), pj, on_fail, j, PyTuple_GET_SIZE(dj));
        if (!g) goto fail;
        PyList_SET_ITEM(gates, j, g);
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        GateObject *g = (GateObject *)PyList_GET_ITEM(gates, j);
        PyObject *dj = PyTuple_GET_ITEM(deps, j), *fj = PyTuple_GET_ITEM(fills, j);
        if (fj != Py_None && !PyTuple_Check(fj)) {
            PyErr_SetString(PyExc_TypeError, "_gates: fills[j] is a tuple or None");
            goto fail;
        }
        for (Py_ssize_t i = 0; i < Py_SIZE(g); i++) {
            Py_ssize_t k = PyLong_AsSsize_t(PyTuple_GET_ITEM(dj, i));
            if (k < 0 || k >= n) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_IndexError, "_gates: a dependent out of range");
                goto fail;
            }
            g->dependents[i] = (GateObject *)Py_NewRef(PyList_GET_ITEM(gates, k));
        }
        if (fj == Py_None) continue;
        Py_ssize_t nf = PyTuple_GET_SIZE(fj);
        PyObject *ft = PyTuple_New(nf);
        if (!ft) goto fail;
        g->fills = ft;
        for (Py_ssize_t i = 0; i < nf; i++) {
            PyObject *f = PyTuple_GET_ITEM(fj, i), *src, *out;
            Py_ssize_t at;
            if (!PyTuple_Check(f) || PyTuple_GET_SIZE(f) != 2 || (at = PyLong_AsSsize_t(PyTuple_GET_ITEM(f, 0))) < 0 ||
                at >= PyTuple_GET_SIZE(g->values)) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_gates: a fill out of range");
                goto fail;
            }
            src = PyTuple_GET_ITEM(f, 1);
            if (PyLong_Check(src)) {
                Py_ssize_t k = PyLong_AsSsize_t(src);
                if (k < 0 || k >= n) {
                    if (!PyErr_Occurred()) PyErr_SetString(PyExc_IndexError, "_gates: a fill source out of range");
                    goto fail;
                }
                out = Py_NewRef(PyList_GET_ITEM(gates, k));
            } else if (PyTuple_Check(src)) {
                Py_ssize_t m = PyTuple_GET_SIZE(src);
                out = PyTuple_New(m);
                if (!out) goto fail;
                for (Py_ssize_t q = 0; q < m; q++) {
                    Py_ssize_t k = PyLong_AsSsize_t(PyTuple_GET_ITEM(src, q));
                    if (k < 0 || k >= n) {
                        Py_DECREF(out);
                        if (!PyErr_Occurred()) PyErr_SetString(PyExc_IndexError, "_gates: a fill source out of range");
                        goto fail;
                    }
                    PyTuple_SET_ITEM(out, q, Py_NewRef(PyList_GET_ITEM(gates, k)));
                }
            } else {
                PyErr_SetString(PyExc_TypeError, "_gates: a fill source is a step index or a tuple of them");
                goto fail;
            }
            PyObject *pair = PyTuple_New(2);
            if (!pair) {
                Py_DECREF(out);
                goto fail;
            }
            PyTuple_SET_ITEM(pair, 0, Py_NewRef(PyTuple_GET_ITEM(f, 0)));
            PyTuple_SET_ITEM(pair, 1, out);
            PyTuple_SET_ITEM(ft, i, pair);
        }
    }
    return gates;
fail:
    Py_DECREF(gates);  /* the gates' cycles are collected by the GC */
    return NULL;
}

static int Gate_traverse(GateObject *g, visitproc visit, void *arg) {
    Py_VISIT(g->engine);
    Py_VISIT(g->func);
    Py_VISIT(g->values);
    Py_VISIT(g->fills);
    for (Py_ssize_t i = 0; i < Py_SIZE(g); i++) Py_VISIT(g->dependents[i]);
    Py_VISIT(g->on_fail);
    if (g->task) {
        /* the task's objects are the gate's alone once the task is over and the engine has
         * dropped it (the rule TaskResult's traversal follows) */
        ct_task *t = g->task;
        if (t->kind != CT_KIND_C && atomic_load_explicit(&t->refs, memory_order_acquire) == 1 &&
            CT_IS_TERMINAL(atomic_load_explicit(&t->state, memory_order_acquire))) {
            if (t->kind != CT_KIND_PY_C) {
                Py_VISIT((PyObject *)t->fn);
                Py_VISIT((PyObject *)t->arg);
            }
            Py_VISIT((PyObject *)t->value);
            Py_VISIT((PyObject *)t->cfg);
        }
    }
    return 0;
}

static int Gate_clear(GateObject *g) {
    Py_CLEAR(g->func);
    Py_CLEAR(g->values);
    Py_CLEAR(g->kwnames);
    Py_CLEAR(g->fills);
    for (Py_ssize_t i = 0; i < Py_SIZE(g); i++) Py_CLEAR(g->dependents[i]);
    Py_CLEAR(g->on_fail);
    if (g->task) {
        ct_task *t = g->task;
        g->task = NULL;
        ct_task_decref(&g->engine->e->hooks, t);
    }
    Py_CLEAR(g->engine);
    return 0;
}

static void Gate_dealloc(GateObject *g) {
    PyObject_GC_UnTrack(g);
    Gate_clear(g);
    PyObject_GC_Del(g);
}

static PyObject *Gate_get_result(GateObject *g, void *unused) {
    if (!g->task) Py_RETURN_NONE;
    return (PyObject *)result_wrap_tracked(g->engine, g->task);
}
static PyObject *Gate_get_value(GateObject *g, void *unused) {
    PyObject *v = gate_value((PyObject *)g);
    if (!v) {
        PyErr_SetString(PyExc_RuntimeError, "this step has not succeeded");
        return NULL;
    }
    return Py_NewRef(v);
}
static PyObject *Gate_get_step(GateObject *g, void *unused) { return PyLong_FromSsize_t(g->step); }
static PyObject *Gate_get_pending(GateObject *g, void *unused) { return PyLong_FromSsize_t(g->pending); }
static PyObject *Gate_get_state(GateObject *g, void *unused) { return PyLong_FromLong(g->state); }

static PyMethodDef Gate_methods[] = {
    {"_fire", (PyCFunction)Gate_fire, METH_NOARGS, NULL},
    {"cancel", (PyCFunction)Gate_cancel, METH_NOARGS, NULL},
    {NULL},
};

static PyGetSetDef Gate_getset[] = {
    {"result", (getter)Gate_get_result, NULL, NULL, NULL},
    {"value", (getter)Gate_get_value, NULL, NULL, NULL},
    {"step", (getter)Gate_get_step, NULL, NULL, NULL},
    {"pending", (getter)Gate_get_pending, NULL, NULL, NULL},
    {"state", (getter)Gate_get_state, NULL, NULL, NULL},
    {NULL},
};

PyTypeObject Gate_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "catzilla_tasks._engine.Gate",
    .tp_basicsize = offsetof(GateObject, dependents),
    .tp_itemsize = sizeof(GateObject *),
    .tp_dealloc = (destructor)Gate_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A workflow step released in C by its last dependency (private; see workflows.py).",
    .tp_traverse = (traverseproc)Gate_traverse,
    .tp_clear = (inquiry)Gate_clear,
    .tp_methods = Gate_methods,
    .tp_getset = Gate_getset,
};


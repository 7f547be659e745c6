/* py_config.c - ConfigBase, the C half of TaskConfig (catzilla_tasks._engine): the fields the hot
 * path reads without attribute lookups. */
#include "py_internal.h"

/* ------------------------------------------------------------------ ConfigBase */

static int Config_init(ConfigObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"priority", "delay_ms", "max_retries", "timeout_ms", "backoff", "retry_base_ms",
                             "retry_max_ms", "jitter", "retry_on_timeout", "retry_on", "on_success",
                             "on_failure", "on_retry", "isolation", "routed", NULL};
    int priority = 2, max_retries = 0, backoff = 0, jitter = 1, retry_on_timeout = 0, isolation = 0, routed = 0;
    double delay = 0, timeout = 0, base = 100, cap = 60000;
    PyObject *retry_on = Py_None, *on_success = Py_None, *on_failure = Py_None, *on_retry = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|idididdppOOOOpp:ConfigBase", kwlist, &priority, &delay, &max_retries,
                                     &timeout, &backoff, &base, &cap, &jitter, &retry_on_timeout, &retry_on,
                                     &on_success, &on_failure, &on_retry, &isolation, &routed))
        return -1;
    if (priority < 0 || priority >= CT_NPRIO) {
        PyErr_Format(PyExc_ValueError, "priority must be 0..3, got %d", priority);
        return -1;
    }
    if (max_retries < 0 || max_retries > 200) {
        PyErr_Format(PyExc_ValueError, "max_retries must be 0..200, got %d", max_retries);
        return -1;
    }
    self->priority = priority;
    self->max_retries = max_retries;
    self->backoff = backoff;
    self->jitter = jitter;
    self->retry_on_timeout = retry_on_timeout;
    self->isolation = isolation;
    self->routed = routed;
    int64_t delay_ns, timeout_ns, base_ns, cap_ns;
    if (ms_option(delay, "delay_ms", 0, &delay_ns) < 0 || ms_option(timeout, "timeout_ms", 1, &timeout_ns) < 0 ||
        ms_option(base, "retry_base_ms", 0, &base_ns) < 0 || ms_option(cap, "retry_max_ms", 1, &cap_ns) < 0)
        return -1;
    self->delay_ns = delay_ns;
    self->timeout_ns = timeout_ns < 0 ? 0 : timeout_ns;          /* no limit = no timeout */
    self->retry_base_ns = base_ns;
    self->retry_max_ns = cap_ns < 0 ? CT_MAX_TIME_NS : cap_ns;   /* no cap = the longest wait */
#define SET_OPT(field, obj) Py_XSETREF(self->field, (obj) == Py_None ? NULL : (Py_INCREF(obj), (obj)))
    SET_OPT(retry_on, retry_on);
    SET_OPT(on_success, on_success);
    SET_OPT(on_failure, on_failure);
    SET_OPT(on_retry, on_retry);
#undef SET_OPT
    return 0;
}

static int Config_traverse(ConfigObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->retry_on);
    Py_VISIT(self->on_success);
    Py_VISIT(self->on_failure);
    Py_VISIT(self->on_retry);
    Py_VISIT(self->native);
    return 0;
}

static int Config_clear(ConfigObject *self) {
    Py_CLEAR(self->retry_on);
    Py_CLEAR(self->on_success);
    Py_CLEAR(self->on_failure);
    Py_CLEAR(self->on_retry);
    Py_CLEAR(self->native);
    return 0;
}

static void Config_dealloc(ConfigObject *self) {
    PyObject_GC_UnTrack(self);
    Config_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Config_members[] = {
    {"_priority", T_INT, offsetof(ConfigObject, priority), READONLY, NULL},
    {"_max_retries", T_INT, offsetof(ConfigObject, max_retries), READONLY, NULL},
    {"_delay_ns", T_LONGLONG, offsetof(ConfigObject, delay_ns), READONLY, NULL},
    {"_timeout_ns", T_LONGLONG, offsetof(ConfigObject, timeout_ns), READONLY, NULL},
    {"_routed", T_INT, offsetof(ConfigObject, routed), READONLY, NULL},
    {"_native", T_OBJECT, offsetof(ConfigObject, native), 0, "compiler.NativeTask of a compiled task, or None"},
    {NULL},
};

PyTypeObject Config_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "catzilla_tasks._engine.ConfigBase",
    .tp_basicsize = sizeof(ConfigObject),
    .tp_dealloc = (destructor)Config_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fields of a TaskConfig that the engine reads without attribute lookups.",
    .tp_traverse = (traverseproc)Config_traverse,
    .tp_clear = (inquiry)Config_clear,
    .tp_members = Config_members,
    .tp_init = (initproc)Config_init,
    .tp_new = PyType_GenericNew,
};


/* py_module.c - the module catzilla_tasks._engine: its state (py_mod), the one setter of the
 * Python hooks (_install_hooks), module functions, the C API capsule and PyInit__engine. */
#include "py_internal.h"

py_state py_mod;

/* A forked child must not hand out ids its parent also hands out, and the thread that forked
 * is no worker (nor loop thread) of any engine here. */
static void atfork_child(void) {
    new_prefix();
    tl_worker = NULL;
    tl_loop_engine = NULL;
    tl_own_engine = NULL;
}

/* ------------------------------------------------------------------ C API */

static CatzillaTasks_Engine *capi_get_engine(PyObject *obj) {
    if (!PyObject_TypeCheck(obj, &Engine_Type) || !((EngineObject *)obj)->e) {
        PyErr_Format(PyExc_TypeError, "expected a started catzilla_tasks.BackgroundTasks, got %.100s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return (CatzillaTasks_Engine *)((EngineObject *)obj)->e;
}

static int capi_submit(CatzillaTasks_Engine *engine, void (*fn)(void *), void *data, int priority, int64_t block_ns,
                       uint64_t *id_out) {
    if (!engine || !fn || priority < 0 || priority >= CT_NPRIO) return CT_EINVAL;
    if (closed_to_caller((EngineObject *)((ct_engine *)engine)->hooks.ctx)) return CT_ESHUTDOWN;
    ct_task *t = ct_task_new();
    if (!t) return CT_ENOMEM;
    t->fn = (void *)fn;
    t->arg = data;
    t->kind = CT_KIND_C;
    t->priority = (uint8_t)priority;
    uint64_t id = t->id;
    int rc = ct_engine_submit((ct_engine *)engine, t, block_ns);
    if (rc != CT_OK) {
        ct_task_decref(NULL, t);
        return rc;
    }
    if (id_out) *id_out = id;
    return CT_OK;
}

static int capi_submit_many(CatzillaTasks_Engine *engine, void (*fn)(void *), void *const *data, size_t n,
                            int priority, int64_t block_ns) {
    if (!engine || !fn || priority < 0 || priority >= CT_NPRIO) return CT_EINVAL;
    if (closed_to_caller((EngineObject *)((ct_engine *)engine)->hooks.ctx)) return CT_ESHUTDOWN;
    ct_task *stack[256];
    ct_task **ts = n <= 256 ? stack : malloc(n * sizeof(ct_task *));
    if (!ts) return CT_ENOMEM;
    size_t made = 0;
    for (; made < n; made++) {
        ct_task *t = ct_task_new();
        if (!t) break;
        t->fn = (void *)fn;
        t->arg = data[made];
        t->kind = CT_KIND_C;
        t->priority = (uint8_t)priority;
        ts[made] = t;
    }
    int rc = made == n ? ct_engine_submit_many((ct_engine *)engine, ts, n, block_ns) : CT_ENOMEM;
    if (rc != CT_OK)
        for (size_t i = 0; i < made; i++) ct_task_decref(NULL, ts[i]);
    if (ts != stack) free(ts);
    return rc;
}

static const char *capi_strerror(int code) {
    switch (code) {
    case CT_OK: return "ok";
    case CT_EFULL: return "queue full (queue_size reached)";
    case CT_ESHUTDOWN: return "engine shut down";
    case CT_ETIMEDOUT: return "timed out waiting for room in the queue";
    case CT_ENOMEM: return "out of memory";
    case CT_EINVAL: return "invalid argument";
    default: return "unknown error";
    }
}

static const CatzillaTasks_CAPI g_capi = {
    .version = CATZILLA_TASKS_CAPI_VERSION,
    .get_engine = capi_get_engine,
    .submit = capi_submit,
    .submit_many = capi_submit_many,
    .strerror = capi_strerror,
};


/* ------------------------------------------------------------------ module */

/* _install_hooks(**hooks): the one place the Python side's hooks are set (py_mod.hooks), called
 * once by catzilla_tasks/_hooks.py. Every hook is required and checked here: a missing,
 * unknown or ill-typed one is a TypeError at install time, never a NULL at run time. */
typedef struct {
    const char *name;
    size_t offset;
    enum { HOOK_CALLABLE, HOOK_TUPLE, HOOK_EXC_CLASS } kind;
} hook_spec;

#define HOOK(name, kind) {#name, offsetof(py_hooks, name), kind}
static const hook_spec hook_specs[] = {
    HOOK(status_members, HOOK_TUPLE),   HOOK(priority_members, HOOK_TUPLE), HOOK(run_coroutine, HOOK_CALLABLE),
    HOOK(report_error, HOOK_CALLABLE),  HOOK(await_impl, HOOK_CALLABLE),    HOOK(cancel_async, HOOK_CALLABLE),
    HOOK(task_timeout, HOOK_EXC_CLASS), HOOK(isolate, HOOK_CALLABLE),       HOOK(failed, HOOK_CALLABLE),
    HOOK(native_reason, HOOK_CALLABLE), HOOK(route, HOOK_CALLABLE),          HOOK(make_progress, HOOK_CALLABLE),
};
#undef HOOK
#define NHOOKS (sizeof hook_specs / sizeof hook_specs[0])

static PyObject *mod_install_hooks(PyObject *m, PyObject *args, PyObject *kw) {
    if (PyTuple_GET_SIZE(args) != 0) {
        PyErr_SetString(PyExc_TypeError, "_install_hooks() takes keyword arguments only");
        return NULL;
    }
    if (kw) {   /* an unknown name is a mistake, not something to ignore */
        PyObject *key, *val;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kw, &pos, &key, &val)) {
            size_t i = 0;
            while (i < NHOOKS && PyUnicode_CompareWithASCIIString(key, hook_specs[i].name) != 0) i++;
            if (i == NHOOKS) {
                PyErr_Format(PyExc_TypeError, "_install_hooks(): unknown hook %R", key);
                return NULL;
            }
        }
    }
    PyObject *got[NHOOKS];
    for (size_t i = 0; i < NHOOKS; i++) {
        const hook_spec *h = &hook_specs[i];
        PyObject *v = kw ? PyDict_GetItemString(kw, h->name) : NULL;
        if (!v) {
            PyErr_Format(PyExc_TypeError, "_install_hooks(): missing hook %s", h->name);
            return NULL;
        }
        int ok = h->kind == HOOK_TUPLE       ? PyTuple_Check(v)
                 : h->kind == HOOK_EXC_CLASS ? PyExceptionClass_Check(v)
                                             : PyCallable_Check(v);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "_install_hooks(): hook %s must be %s, not %.100s", h->name,
                         h->kind == HOOK_TUPLE       ? "a tuple"
                         : h->kind == HOOK_EXC_CLASS ? "an exception class"
                                                     : "callable",
                         Py_TYPE(v)->tp_name);
            return NULL;
        }
        got[i] = v;
    }
    if (py_mod.hooks_installed) {
        PyErr_SetString(PyExc_RuntimeError,
                        "_install_hooks(): the hooks are already installed (once, by catzilla_tasks._hooks)");
        return NULL;
    }
    for (size_t i = 0; i < NHOOKS; i++)
        *(PyObject **)((char *)&py_mod.hooks + hook_specs[i].offset) = Py_NewRef(got[i]);
    py_mod.hooks_installed = 1;
    Py_RETURN_NONE;
}

static PyObject *mod_memory_stats(PyObject *m, PyObject *unused) {
    ct_slab_stats st;
    ct_slab_get_stats(&ct_task_slab, &st);
    return Py_BuildValue("{s:n,s:L,s:n,s:L,s:L}", "slab_bytes", (Py_ssize_t)st.chunk_bytes, "nodes_in_use",
                         (long long)st.in_use, "node_size", (Py_ssize_t)ct_task_slab.obj_size, "nodes_cached",
                         (long long)st.cached, "nodes_free", (long long)st.free_global);
}

static PyObject *mod_live_ids(PyObject *m, PyObject *unused) {
    return PyLong_FromSsize_t(PyDict_GET_SIZE(py_mod.registry));
}

static PyMethodDef mod_methods[] = {
    {"_install_hooks", (PyCFunction)(void (*)(void))mod_install_hooks, METH_VARARGS | METH_KEYWORDS, NULL},
    {"memory_stats", (PyCFunction)mod_memory_stats, METH_NOARGS,
     "Memory of the task-node slab: bytes taken from the system, nodes in use, bytes per node."},
    {"detached", (PyCFunction)mod_detached, METH_NOARGS, NULL},
    {"current_task", (PyCFunction)mod_current_task, METH_NOARGS,
     "The TaskResult of the task running in this thread (a sync task), or None."},
    {"_registered_ids", (PyCFunction)mod_live_ids, METH_NOARGS, NULL},
    {NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "catzilla_tasks._engine", "The C engine of catzilla_tasks (private).", -1, mod_methods,
};

PyMODINIT_FUNC PyInit__engine(void) {
    if (ct_engine_global_init() != CT_OK) {
        PyErr_SetString(PyExc_ImportError, "catzilla_tasks: could not initialise the node allocator");
        return NULL;
    }
    if (PyType_Ready(&Engine_Type) < 0 || PyType_Ready(&Result_Type) < 0 || PyType_Ready(&Config_Type) < 0 ||
        PyType_Ready(&Gate_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    new_prefix();
    static int atfork_done;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, atfork_child);
        atfork_done = 1;
    }
    py_mod.mono0 = ct_now_ns();
    struct timeval tv;
    gettimeofday(&tv, NULL);
    py_mod.wall0 = (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
    py_mod.registry = PyDict_New();
    py_mod.progress = PyDict_New();
    py_mod.history = PyDict_New();
    py_mod.charges = PyDict_New();
    PyObject *sysmod = PyImport_ImportModule("sys");
    py_mod.getsizeof = sysmod ? PyObject_GetAttrString(sysmod, "getsizeof") : NULL;
    Py_XDECREF(sysmod);
    if (!py_mod.charges || !py_mod.getsizeof) goto fail;
    py_mod.config_attr = PyUnicode_InternFromString("__catzilla_task__");
    py_mod.native_prepare = PyUnicode_InternFromString("_engine_prepare");
    /* The exception classes are defined once, in catzilla_tasks/errors.py (a leaf module, so
       importing it here, while the package itself is still importing, cannot cycle). */
    PyObject *errors = PyImport_ImportModule("catzilla_tasks.errors");
    if (!errors) goto fail;
    py_mod.queue_full = PyObject_GetAttrString(errors, "QueueFull");
    py_mod.task_cancelled = PyObject_GetAttrString(errors, "TaskCancelled");
    Py_DECREF(errors);
    if (!py_mod.registry || !py_mod.progress || !py_mod.history || !py_mod.config_attr || !py_mod.native_prepare || !py_mod.queue_full ||
        !py_mod.task_cancelled)
        goto fail;
    Py_INCREF(&Engine_Type);
    Py_INCREF(&Result_Type);
    Py_INCREF(&Config_Type);
    Py_INCREF(py_mod.queue_full);
    Py_INCREF(py_mod.task_cancelled);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&Engine_Type) < 0 ||
        PyModule_AddObject(m, "TaskResult", (PyObject *)&Result_Type) < 0 ||
        PyModule_AddObject(m, "ConfigBase", (PyObject *)&Config_Type) < 0 ||
        PyModule_AddObject(m, "QueueFull", py_mod.queue_full) < 0 ||
        PyModule_AddObject(m, "TaskCancelled", py_mod.task_cancelled) < 0)
        goto fail;
    PyObject *cap = PyCapsule_New((void *)&g_capi, CATZILLA_TASKS_CAPI_NAME, NULL);
    if (!cap || PyModule_AddObject(m, "_C_API", cap) < 0) goto fail;
    PyModule_AddIntConstant(m, "NODE_SIZE", (long)sizeof(ct_task));
    PyModule_AddIntConstant(m, "MAX_TIME_NS", (long)CT_MAX_TIME_NS);
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}


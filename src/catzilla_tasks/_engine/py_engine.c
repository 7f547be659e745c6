/* py_engine.c - the Engine type behind BackgroundTasks (catzilla_tasks._engine; engine.py subclasses
 * it). add_task is a METH_FASTCALL method: no Python frame between the caller and the queue
 * (Engine_add_task -> enqueue -> enqueue_node -> enqueue_submit, all in this file). Also the
 * control methods (drain, stop, pause, scale), stats and monitor snapshots. */
#include "py_internal.h"

/* An engine belongs to the process that made it: after fork() its threads exist only in the
 * parent (engine.py marks every engine so in the child, _forget_after_fork). */
PyObject *forked_error(void) {
    PyErr_Format(PyExc_RuntimeError,
                 "this BackgroundTasks engine was created before this process was forked (pid %ld is the "
                 "child): its worker threads exist only in the parent, which runs the tasks queued there. "
                 "Create a new BackgroundTasks in the child",
                 (long)getpid());
    return NULL;
}

/* The error of a refused submission (closed_to_caller). */
PyObject *refused(EngineObject *self) {
    if (engine_forked(self)) return forked_error();
    PyErr_SetString(PyExc_RuntimeError,
                    "cannot add a task: this BackgroundTasks engine has been shut down; create a new one");
    return NULL;
}


/* ------------------------------------------------------------------ Engine */

int engine_check(EngineObject *self) {
    if (!self->e) {
        PyErr_SetString(PyExc_RuntimeError, "this engine was not initialised (BackgroundTasks.__init__ not called)");
        return -1;
    }
    return 0;
}

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"workers", "queue_size", "aging_ms", "batch_max", "batch_budget_us", "max_threads", NULL};
    int workers = 4, batch_max = 64, max_threads = 0;
    long long queue_size = 10000;
    double aging_ms = 100.0, budget_us = 200.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|iLdidi:Engine", kwlist, &workers, &queue_size, &aging_ms,
                                     &batch_max, &budget_us, &max_threads))
        return -1;
    if (self->e) {
        PyErr_SetString(PyExc_RuntimeError, "engine already initialised");
        return -1;
    }
    if (!py_mod.hooks_installed) {   /* import catzilla_tasks installs them (_hooks.py) */
        PyErr_SetString(PyExc_RuntimeError,
                        "catzilla_tasks._engine: the Python hooks are not installed (import catzilla_tasks)");
        return -1;
    }
    if (workers < 1 || workers > 1024) {
        PyErr_Format(PyExc_ValueError, "workers must be between 1 and 1024, got %d", workers);
        return -1;
    }
    if (queue_size < 1) {
        PyErr_Format(PyExc_ValueError, "queue_size must be >= 1, got %lld", queue_size);
        return -1;
    }
    ct_config cfg = {
        .workers = workers,
        .max_threads = max_threads > workers ? max_threads : workers + 16,
        .queue_size = queue_size,
        .aging_ns = (uint64_t)(aging_ms > 0 ? fmin(aging_ms * 1e6, (double)CT_MAX_TIME_NS) : 1e8),
        .batch_max = batch_max,
        .batch_budget_ns = (uint64_t)(budget_us > 0 ? fmin(budget_us * 1e3, (double)CT_MAX_TIME_NS) : 2e5),
    };
    ct_hooks hooks = {
        .ctx = self,
        .thread_start = hook_thread_start,
        .thread_stop = hook_thread_stop,
        .run_batch = hook_run_batch,
        .release = hook_release,
        .on_timer = hook_on_timer,
        .drop_entry = hook_drop_entry,
        .skip = hook_skip,
        .hook_thread_start = hook_timer_thread_start,
        .hook_thread_stop = hook_timer_thread_stop,
    };
    self->e = ct_engine_new(&cfg, &hooks);
    if (!self->e) {
        PyErr_NoMemory();
        return -1;
    }
    if (ct_engine_start(self->e) != CT_OK) {
        PyErr_SetString(PyExc_RuntimeError, "could not start the engine's worker threads");
        return -1;
    }
    self->started = 1;
    /* The workers need the engine object: it lives until shutdown, like a thread pool. */
    Py_INCREF(self);
    self->holds_self = 1;
    return 0;
}

static void Engine_dealloc(EngineObject *self) {
    if (self->e) {
        if (!self->stopped) {
            /* Only reachable if init failed half-way: no task can be queued. */
            Py_BEGIN_ALLOW_THREADS
            ct_engine_close(self->e);
            ct_engine_stop_workers(self->e);
            ct_engine_stop_timer(self->e);
            Py_END_ALLOW_THREADS
        }
        if (self->e->scaler_tick) ct_task_decref(&detached_hooks, self->e->scaler_tick);
        ct_engine_free(self->e);
        self->e = NULL;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The engine's config for func: the TaskConfig its decorator attached, or NULL (borrowed). */
ConfigObject *lookup_config(PyObject *func) {
    PyObject *cfg = NULL;
    if (PyMethod_Check(func)) func = PyMethod_GET_FUNCTION(func);
    if (PyFunction_Check(func)) {
        PyObject *d = ((PyFunctionObject *)func)->func_dict;
        if (!d) return NULL;
        cfg = PyDict_GetItemWithError(d, py_mod.config_attr);
        if (!cfg) {
            PyErr_Clear();
            return NULL;
        }
        return PyObject_TypeCheck(cfg, &Config_Type) ? (ConfigObject *)cfg : NULL;
    }
    if (PyCFunction_Check(func)) return NULL;
#if PY_VERSION_HEX >= 0x030D0000
    if (PyObject_GetOptionalAttr(func, py_mod.config_attr, &cfg) <= 0) {
#else
    if (_PyObject_LookupAttr(func, py_mod.config_attr, &cfg) <= 0) {
#endif
        PyErr_Clear();
        return NULL;
    }
    /* callable objects: the reference is kept by the object; borrow it */
    ConfigObject *c = PyObject_TypeCheck(cfg, &Config_Type) ? (ConfigObject *)cfg : NULL;
    Py_DECREF(cfg);
    return c;
}

int not_callable(PyObject *func) {
    PyErr_Format(PyExc_TypeError,
                 "add_task() needs a callable as its first argument, got %.100s %R; pass the function "
                 "itself, e.g. add_task(send_email, user_id), not add_task(send_email(user_id))",
                 Py_TYPE(func)->tp_name, func);
    return -1;
}

PyObject *submit_error(EngineObject *self, int rc) {
    switch (rc) {
    case CT_EFULL:
    case CT_ETIMEDOUT:
        PyErr_Format(py_mod.queue_full,
                     "the engine holds queue_size=%lld queued tasks: wait for some to run (join()), raise "
                     "queue_size, or block until there is room with tasks.options(block_timeout=seconds)",
                     (long long)self->e->cfg.queue_size);
        break;
    case CT_ESHUTDOWN:
        PyErr_SetString(PyExc_RuntimeError,
                        "cannot add a task: this BackgroundTasks engine has been shut down; create a new one");
        break;
    default:
        PyErr_NoMemory();
    }
    return NULL;
}

/* Queue func(*values[:npos], **dict(zip(kwnames, values[npos:]))) and return its TaskResult.
 * values/kwnames are borrowed. */

/* A process-isolated task: engine.py checks that it pickles (a clear TypeError here, at the
 * call site) and gives back a callable that runs it in the engine's process pool. */
static PyObject *enqueue_isolated(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
                                  PyObject *kwnames, int priority, ConfigObject *cfg, int64_t block_ns) {
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0, npos = nvalues - nkw;
    PyObject *pos = PyTuple_New(npos), *kw = PyDict_New(), *call = NULL, *r = NULL;
    if (!pos || !kw) goto done;
    for (Py_ssize_t i = 0; i < npos; i++) {
        Py_INCREF(values[i]);
        PyTuple_SET_ITEM(pos, i, values[i]);
    }
    for (Py_ssize_t i = 0; i < nkw; i++)
        if (PyDict_SetItem(kw, PyTuple_GET_ITEM(kwnames, i), values[npos + i]) < 0) goto done;
    call = PyObject_CallFunctionObjArgs(py_mod.hooks.isolate, (PyObject *)self, func, pos, kw, (PyObject *)cfg, NULL);
    if (call) r = enqueue_node(self, call, NULL, 0, NULL, priority, cfg, block_ns);
done:
    Py_XDECREF(pos);
    Py_XDECREF(kw);
    Py_XDECREF(call);
    return r;
}

/* ---- a config with limits or a named queue (cfg->routed): limits.py submits the call, with a
 * config without them, and returns its handle ---- */
static PyObject *enqueue_routed(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
                                PyObject *kwnames, ConfigObject *cfg, int64_t block_ns) {
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0, npos = nvalues - nkw;
    PyObject *pos = PyTuple_New(npos), *kw = PyDict_New(), *r = NULL;
    if (!pos || !kw) goto done;
    for (Py_ssize_t i = 0; i < npos; i++) PyTuple_SET_ITEM(pos, i, Py_NewRef(values[i]));
    for (Py_ssize_t i = 0; i < nkw; i++)
        if (PyDict_SetItem(kw, PyTuple_GET_ITEM(kwnames, i), values[npos + i]) < 0) goto done;
    PyObject *bs = PyFloat_FromDouble(block_ns < 0 ? -1.0 : (double)block_ns / 1e9);
    if (!bs) goto done;
    r = PyObject_CallFunctionObjArgs(py_mod.hooks.route, (PyObject *)self, func, pos, kw, (PyObject *)cfg, bs, NULL);
    Py_DECREF(bs);
done:
    Py_XDECREF(pos);
    Py_XDECREF(kw);
    return r;
}

/* native: the compiler.NativeTask of a compiled task (usually cfg->native), or NULL/None */
PyObject *enqueue(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
                         PyObject *kwnames, int priority, ConfigObject *cfg, int64_t block_ns, PyObject *native) {
    if (CT_UNLIKELY(cfg && cfg->routed))
        return enqueue_routed(self, func, values, nvalues, kwnames, cfg, block_ns);
    if (CT_UNLIKELY(cfg && cfg->isolation))
        return enqueue_isolated(self, func, values, nvalues, kwnames, priority, cfg, block_ns);
    if (CT_UNLIKELY(native && native != Py_None))
        return enqueue_native(self, func, values, nvalues, kwnames, priority, cfg, block_ns, native);
    return enqueue_node(self, func, values, nvalues, kwnames, priority, cfg, block_ns);
}

PyObject *enqueue_node(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
                              PyObject *kwnames, int priority, ConfigObject *cfg, int64_t block_ns) {
    ct_task *t = ct_task_new();
    if (!t) return PyErr_NoMemory();
    PyObject *arg = NULL;
    if (nvalues > 0) {
        /* keyword names ride at the end of the values (one object less per task) */
        arg = PyTuple_New(nvalues + (kwnames != NULL));
        if (!arg) goto fail_node;
        for (Py_ssize_t i = 0; i < nvalues; i++) {
            Py_INCREF(values[i]);
            PyTuple_SET_ITEM(arg, i, values[i]);
        }
        if (kwnames) {
            Py_INCREF(kwnames);
            PyTuple_SET_ITEM(arg, nvalues, kwnames);
            atomic_store_explicit(&t->state, CT_PENDING | CT_F_KWNAMES, memory_order_relaxed);
        }
    }
    Py_INCREF(func);
    t->fn = func;
    t->arg = arg;
    t->kind = CT_KIND_PY;
    t->priority = (uint8_t)priority;
    return enqueue_submit(self, t, cfg, block_ns);
fail_node:
    ct_task_decref(&self->e->hooks, t);
    return NULL;
}


/* Submit a prepared Python-visible node (its cfg not yet set) and return its TaskResult. */
PyObject *enqueue_submit(EngineObject *self, ct_task *t, ConfigObject *cfg, int64_t block_ns) {
    if (closed_to_caller(self)) {
        ct_task_decref(&self->e->hooks, t);
        return refused(self);
    }
    /* Only a config that changes how the task runs is kept on the node (priority alone is
     * used here and needs nothing later). */
    if (cfg && (cfg->max_retries || cfg->timeout_ns || cfg->on_success || cfg->on_failure || cfg->isolation)) {
        Py_INCREF(cfg);
        t->cfg = cfg;
    }
    if (CT_UNLIKELY(self->mem_cap > 0) && charge_node(self, t) < 0) {
        ct_task_decref(&self->e->hooks, t);
        return NULL;
    }
    ResultObject *r = result_wrap(self, t);   /* refs: 2 (ours, handed to the engine, + handle) */
    if (!r) {
        ct_task_decref(&self->e->hooks, t);
        return NULL;
    }
    int rc;
    uint64_t due = cfg && cfg->delay_ns > 0 ? ct_now_ns() + (uint64_t)cfg->delay_ns : 0;
    rc = due ? ct_engine_submit_at(self->e, t, due, 0) : ct_engine_submit(self->e, t, 0);
    if (rc == CT_EFULL && block_ns != 0) {
        /* full: only now release the GIL and wait for room (and the quick try just made
         * is not a rejection: the blocking one decides) */
        atomic_fetch_sub_explicit(&self->e->rejected, 1, memory_order_relaxed);
        Py_BEGIN_ALLOW_THREADS
        rc = due ? ct_engine_submit_at(self->e, t, due, block_ns) : ct_engine_submit(self->e, t, block_ns);
        Py_END_ALLOW_THREADS
    }
    if (rc != CT_OK) {
        Py_DECREF(r);                       /* handle's reference */
        ct_task_decref(&self->e->hooks, t); /* ours: frees the node and its objects */
        return submit_error(self, rc);
    }
    return (PyObject *)r;
}

static PyObject *Engine_add_task(EngineObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (CT_UNLIKELY(!self->e) && engine_check(self) < 0) return NULL;
    if (CT_UNLIKELY(nargs < 1)) {
        PyErr_SetString(PyExc_TypeError, "add_task() needs the function to run: add_task(func, *args, **kwargs)");
        return NULL;
    }
    PyObject *func = args[0];
    if (CT_UNLIKELY(!PyCallable_Check(func))) return not_callable(func), NULL;
    int priority = 2;
    ConfigObject *cfg = lookup_config(func);
    if (cfg) priority = cfg->priority;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    return enqueue(self, func, args + 1, nargs - 1 + nkw, nkw ? kwnames : NULL, priority, cfg, 0,
                   cfg ? cfg->native : NULL);
}

/* _submit(func, args: tuple, kwargs: dict | None, config: ConfigBase | None, block_timeout) */
static PyObject *Engine_submit(EngineObject *self, PyObject *args) {
    PyObject *func, *pargs, *kwargs, *config, *block;
    if (engine_check(self) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "OO!OOO:_submit", &func, &PyTuple_Type, &pargs, &kwargs, &config, &block)) return NULL;
    if (!PyCallable_Check(func)) return not_callable(func), NULL;
    int priority = 2;
    PyObject *native = NULL;
    ConfigObject *cfg = config != Py_None ? (ConfigObject *)config : lookup_config(func);
    if (cfg) {
        if (!PyObject_TypeCheck((PyObject *)cfg, &Config_Type)) {
            PyErr_SetString(PyExc_TypeError, "_submit(): config must be a TaskConfig");
            return NULL;
        }
        priority = cfg->priority;
        native = cfg->native;
        if ((!native || native == Py_None) && config != Py_None) {
            /* options(...) over a compiled task: the merged config is a copy without the
             * compiled code; the function's own config has it */
            ConfigObject *own = lookup_config(func);
            if (own) native = own->native;
        }
    }
    int64_t block_ns = 0;
    if (block != Py_None) {
        double s = PyFloat_AsDouble(block);
        if (s == -1.0 && PyErr_Occurred()) return NULL;
        if (isnan(s)) {
            PyErr_SetString(PyExc_ValueError, "block_timeout: NaN is not a number of seconds");
            return NULL;
        }
        block_ns = s < 0 || s * 1e9 >= (double)CT_MAX_TIME_NS ? -1 : (int64_t)(s * 1e9);
        if (s > 0 && block_ns == 0) block_ns = 1;
    }
    Py_ssize_t npos = PyTuple_GET_SIZE(pargs);
    if (kwargs == Py_None || PyDict_GET_SIZE(kwargs) == 0)
        return enqueue(self, func, &PyTuple_GET_ITEM(pargs, 0), npos, NULL, priority, cfg, block_ns, native);
    if (!PyDict_Check(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "_submit(): kwargs must be a dict");
        return NULL;
    }
    Py_ssize_t nkw = PyDict_GET_SIZE(kwargs);
    PyObject *names = PyTuple_New(nkw);
    PyObject **vals = PyMem_Malloc(sizeof(PyObject *) * (size_t)(npos + nkw));
    if (!names || !vals) {
        Py_XDECREF(names);
        PyMem_Free(vals);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < npos; i++) vals[i] = PyTuple_GET_ITEM(pargs, i);
    Py_ssize_t pos = 0, i = 0;
    PyObject *k, *v;
    while (PyDict_Next(kwargs, &pos, &k, &v)) {
        if (!PyUnicode_Check(k)) {
            Py_DECREF(names);
            PyMem_Free(vals);
            PyErr_SetString(PyExc_TypeError, "keyword argument names must be strings");
            return NULL;
        }
        Py_INCREF(k);
        PyTuple_SET_ITEM(names, i, k);
        vals[npos + i] = v;
        i++;
    }
    PyObject *r = enqueue(self, func, vals, npos + nkw, names, priority, cfg, block_ns, native);
    PyMem_Free(vals);
    Py_DECREF(names);
    return r;
}

/* submit_c(fn_address, data_address, priority=2): a C function void fn(void *) run with no
 * GIL, with a TaskResult (its value is None). For ctypes users and the tests. */
static PyObject *Engine_submit_c(EngineObject *self, PyObject *args) {
    unsigned long long fn, data;
    int priority = 2;
    if (engine_check(self) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "KK|i:submit_c", &fn, &data, &priority)) return NULL;
    if (closed_to_caller(self)) return refused(self);
    if (!fn) {
        PyErr_SetString(PyExc_ValueError, "submit_c(): the function address is NULL");
        return NULL;
    }
    if (priority < 0 || priority >= CT_NPRIO) {
        PyErr_Format(PyExc_ValueError, "submit_c(): priority must be 0..3, got %d", priority);
        return NULL;
    }
    ct_task *t = ct_task_new();
    if (!t) return PyErr_NoMemory();
    t->fn = (void *)(uintptr_t)fn;
    t->arg = (void *)(uintptr_t)data;
    t->kind = CT_KIND_PY_C;
    t->priority = (uint8_t)priority;
    ResultObject *r = result_wrap(self, t);
    if (!r) {
        ct_task_decref(&self->e->hooks, t);
        return NULL;
    }
    int rc = ct_engine_submit(self->e, t, 0);
    if (rc != CT_OK) {
        Py_DECREF(r);
        ct_task_decref(&self->e->hooks, t);
        return submit_error(self, rc);
    }
    return (PyObject *)r;
}


/* _call_later(seconds, fn): call fn() on the timer thread after `seconds` (not a task: not
 * queued, not counted by join(); for periodic ticks, which then queue the real task). */
static PyObject *Engine_call_later(EngineObject *self, PyObject *args) {
    double secs;
    PyObject *fn;
    if (engine_check(self) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "dO:_call_later", &secs, &fn)) return NULL;
    if (isnan(secs)) {
        PyErr_SetString(PyExc_ValueError, "_call_later(): NaN is not a number of seconds");
        return NULL;
    }
    if (secs * 1e9 > (double)CT_MAX_TIME_NS) secs = (double)CT_MAX_TIME_NS / 1e9;
    if (!atomic_load(&self->e->accepting)) Py_RETURN_FALSE;
    ct_task *t = ct_task_new();
    if (!t) return PyErr_NoMemory();
    Py_INCREF(fn);
    t->fn = fn;
    t->kind = CT_KIND_DETACHED;
    uint64_t due = ct_now_ns() + (uint64_t)(secs > 0 ? secs * 1e9 : 0);
    if (ct_timer_add(&self->e->timer, due, t, CT_TIMER_CALL, 0) != CT_OK) {
        ct_task_decref(&self->e->hooks, t);
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyObject *Engine_close(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    ct_engine_close(self->e);
    Py_RETURN_NONE;
}

/* _drain(timeout=None) -> bool: wait until nothing is queued or running. */
static PyObject *Engine_drain(EngineObject *self, PyObject *args) {
    PyObject *timeout = Py_None;
    if (engine_check(self) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "|O:_drain", &timeout)) return NULL;
    if (engine_forked(self)) return forked_error();
    uint64_t deadline;
    if (parse_timeout(timeout, &deadline, "join") < 0) return NULL;
    int main_thread = _PyOS_IsMainThread();
    for (;;) {
        uint64_t until = deadline;
        if (main_thread) {   /* slices so Ctrl-C is handled (see wait_node) */
            uint64_t slice = ct_now_ns() + 100000000ull;
            if (!until || slice < until) until = slice;
        }
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = ct_engine_drain(self->e, until);
        Py_END_ALLOW_THREADS
        if (rc == CT_OK) Py_RETURN_TRUE;
        if (deadline && ct_now_ns() >= deadline) Py_RETURN_FALSE;
        if (PyErr_CheckSignals() < 0) return NULL;
    }
}

static PyObject *Engine_cancel_queued(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    /* GIL held: dropping Python nodes needs it; the pop lock is never held while waiting for
     * the GIL, so this order cannot deadlock. */
    return PyLong_FromSize_t(ct_engine_cancel_queued(self->e));
}

static PyObject *Engine_stop_workers(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    if (!self->stopped) {
        Py_BEGIN_ALLOW_THREADS
        ct_engine_stop_workers(self->e);
        ct_engine_stop_timer(self->e);
        Py_END_ALLOW_THREADS
        self->stopped = 1;
        if (self->e->scaler_tick) {
            /* no worker or timer can arm it any more: drop the tick (it refers back to the
             * engine, so keeping it would keep the engine alive) */
            ct_task *t = self->e->scaler_tick;
            self->e->scaler_tick = NULL;
            ct_task_decref(&detached_hooks, t);
        }
        if (self->holds_self) {
            self->holds_self = 0;
            Py_DECREF(self);
        }
    }
    Py_RETURN_NONE;
}

/* _in_own_task() -> bool: this thread runs work of this engine (one of its workers, or its
 * event-loop thread), where join() would wait for its own task. */
static PyObject *Engine_in_own_task(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    return PyBool_FromLong((tl_worker && tl_worker->engine == self->e) || tl_loop_engine == self);
}

/* _close_to_outside(): refuse new work except from the engine's own threads (see
 * closed_to_caller); _close() later refuses it all. */
static PyObject *Engine_close_to_outside(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    int open = ENGINE_OPEN;
    atomic_compare_exchange_strong(&self->closing, &open, ENGINE_OUTSIDE_CLOSED);
    Py_RETURN_NONE;
}

/* _accepts_here() -> bool: would a task submitted from this thread be accepted now? */
static PyObject *Engine_accepts_here(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    return PyBool_FromLong(atomic_load(&self->e->accepting) && !closed_to_caller(self));
}

/* _set_memory_cap(bytes): memory_pool_mb (0: no cap). */
static PyObject *Engine_set_memory_cap(EngineObject *self, PyObject *arg) {
    if (engine_check(self) < 0) return NULL;
    long long cap = PyLong_AsLongLong(arg);
    if (cap == -1 && PyErr_Occurred()) return NULL;
    self->mem_cap = cap > 0 ? cap : 0;
    Py_RETURN_NONE;
}

/* _forget_after_fork(): this process is a fork of the one that made the engine (engine.py's
 * after-fork hook): refuse everything with a clear error, report no workers. */
static PyObject *Engine_forget_after_fork(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    atomic_store(&self->closing, ENGINE_FORKED);
    Py_RETURN_NONE;
}

/* _adopt_loop_thread(): the calling thread is this engine's event-loop thread. */
static PyObject *Engine_adopt_loop_thread(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    tl_loop_engine = self;   /* borrowed: the loop thread stops before the engine goes */
    tl_own_engine = self->e;
    Py_RETURN_NONE;
}

static PyObject *Engine_pause(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    ct_engine_pause(self->e, 1);
    Py_RETURN_NONE;
}

static PyObject *Engine_resume(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    ct_engine_pause(self->e, 0);
    Py_RETURN_NONE;
}

static PyObject *Engine_stats(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    ct_stats s;
    ct_engine_get_stats(self->e, &s);
    /* "accepting" is for new work from outside: none once a shutdown began, even while work
     * in flight may still add its own */
    if (atomic_load(&self->closing) != ENGINE_OPEN) s.accepting = 0;
    uint64_t processed = 0, busy = 0;
    for (int i = 0; i < atomic_load(&self->e->nworkers); i++) {
        processed += atomic_load(&self->e->workers[i].processed);
        busy += atomic_load(&self->e->workers[i].busy_ns);
    }
    PyObject *d = Py_BuildValue(
        "{s:(LLLL),s:L,s:L,s:K,s:K,s:K,s:K,s:K,s:i,s:i,s:d,s:O,s:O,s:K,s:d,s:L,s:L,s:K,s:K,s:K}", "queued", (long long)s.queued[0],
        (long long)s.queued[1], (long long)s.queued[2], (long long)s.queued[3], "queued_total",
        (long long)s.queued_total, "running", (long long)s.running, "submitted", (unsigned long long)s.submitted,
        "succeeded", (unsigned long long)s.succeeded, "failed", (unsigned long long)s.failed, "cancelled",
        (unsigned long long)s.cancelled, "rejected", (unsigned long long)s.rejected, "workers", s.workers,
        "sleeping", s.sleeping, "avg_exec_ms", (double)s.avg_exec_ns / 1e6, "accepting",
        s.accepting ? Py_True : Py_False, "paused", s.paused ? Py_True : Py_False, "processed",
        (unsigned long long)processed, "busy_s", (double)busy / 1e9, "queue_size",
        (long long)self->e->cfg.queue_size, "scheduled", (long long)s.scheduled, "retried",
        (unsigned long long)s.retried, "timed_out", (unsigned long long)s.timed_out, "replaced",
        (unsigned long long)s.replaced);
    if (d && dict_set_steal(d, "batched", PyLong_FromLongLong(s.batched)) < 0) Py_CLEAR(d);
    if (d && (dict_set_steal(d, "queued_arg_bytes", PyLong_FromLongLong(self->arg_bytes)) < 0 ||
              dict_set_steal(d, "memory_cap_bytes", PyLong_FromLongLong(self->mem_cap)) < 0))
        Py_CLEAR(d);
    if (d && engine_forked(self) &&   /* the copied counters say the parent's threads live */
        (dict_set_steal(d, "workers", PyLong_FromLong(0)) < 0 || dict_set_steal(d, "sleeping", PyLong_FromLong(0)) < 0))
        Py_CLEAR(d);
    return d;
}

/* _workers() -> [dict]: per-worker figures (batch left, current task's start, counts). */
static PyObject *Engine_workers(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    PyObject *lst = PyList_New(0);
    if (!lst) return NULL;
    uint64_t now = ct_now_ns();
    for (int i = 0; i < atomic_load(&self->e->nworkers); i++) {
        ct_worker *w = &self->e->workers[i];
        uint64_t r = atomic_load(&w->range), since = atomic_load(&w->current_since);
        uint32_t head = (uint32_t)((r >> 16) & 0xFFFFu), tail = (uint32_t)(r & 0xFFFFu);
        PyObject *d = Py_BuildValue("{s:i,s:I,s:O,s:d,s:K,s:K,s:d}", "worker_id", w->id, "batch_left",
                                    tail > head ? tail - head : 0, "busy", since ? Py_True : Py_False,
                                    "current_task_ms", since ? (double)(now - since) / 1e6 : 0.0, "processed",
                                    (unsigned long long)atomic_load(&w->processed), "stolen",
                                    (unsigned long long)atomic_load(&w->stolen), "busy_s",
                                    (double)atomic_load(&w->busy_ns) / 1e9);
        if (!d || PyList_Append(lst, d) < 0) {
            Py_XDECREF(d);
            Py_DECREF(lst);
            return NULL;
        }
        Py_DECREF(d);
    }
    return lst;
}

static PyObject *hist_to_py(ct_hist *const *hs, int nh) {
    PyObject *counts = PyList_New(CT_HIST_BUCKETS);
    if (!counts) return NULL;
    uint64_t sum = 0, n = 0;
    for (int i = 0; i < CT_HIST_BUCKETS; i++) {
        uint64_t c = 0;
        for (int k = 0; k < nh; k++) c += atomic_load_explicit(&hs[k]->count[i], memory_order_relaxed);
        PyList_SET_ITEM(counts, i, PyLong_FromUnsignedLongLong(c));
    }
    for (int k = 0; k < nh; k++) {
        sum += atomic_load_explicit(&hs[k]->sum_ns, memory_order_relaxed);
        n += atomic_load_explicit(&hs[k]->n, memory_order_relaxed);
    }
    return Py_BuildValue("{s:N,s:K,s:K}", "counts", counts, "sum_ns", (unsigned long long)sum, "n", (unsigned long long)n);
}

/* _monitor_raw() -> dict: the engine's raw figures for monitor.py (histograms merged over
 * workers, per-second rates, per-worker time split). */
static PyObject *Engine_monitor_raw(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    ct_engine *e = self->e;
    int forked = engine_forked(self);   /* the slots describe the parent's threads */
    int n = atomic_load(&e->nworkers);
    ct_hist *execs[n + 1], *waits[n];
    uint64_t now = ct_now_ns(), sec_now = now / 1000000000ull;
    uint64_t rate[CT_RATE_SLOTS] = {0};
    PyObject *workers = PyList_New(0);
    if (!workers) return NULL;
    for (int i = 0; i < n; i++) {
        ct_worker *w = &e->workers[i];
        execs[i] = &w->exec_hist;
        waits[i] = &w->wait_hist;
        for (int s = 0; s < CT_RATE_SLOTS; s++) {
            uint64_t ep = atomic_load_explicit(&w->rate.epoch[s], memory_order_relaxed);
            if (ep <= sec_now && sec_now - ep < CT_RATE_SLOTS)
                rate[sec_now - ep] += atomic_load_explicit(&w->rate.count[s], memory_order_relaxed);
        }
        int live = !forked && w->started && !atomic_load(&w->exited) && !atomic_load(&w->retire);
        double cpu_s = -1;
        if (live) {
            clockid_t cid;
            struct timespec ts;
            if (pthread_getcpuclockid(w->thread, &cid) == 0 && clock_gettime(cid, &ts) == 0)
                cpu_s = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
        }
        uint64_t since = atomic_load(&w->current_since);
        PyObject *d = Py_BuildValue(
            "{s:i,s:i,s:O,s:O,s:d,s:d,s:d,s:d,s:K,s:K}", "worker_id", w->id, "tid", atomic_load(&w->tid), "live", live ? Py_True : Py_False, "busy",
            since ? Py_True : Py_False, "current_task_ms", since ? (double)(now - since) / 1e6 : 0.0, "busy_s",
            (double)atomic_load(&w->busy_ns) / 1e9, "gil_wait_s", (double)atomic_load(&w->gil_wait_ns) / 1e9,
            "cpu_s", cpu_s, "processed", (unsigned long long)atomic_load(&w->processed), "stolen",
            (unsigned long long)atomic_load(&w->stolen));
        if (!d || PyList_Append(workers, d) < 0) {
            Py_XDECREF(d);
            Py_DECREF(workers);
            return NULL;
        }
        Py_DECREF(d);
    }
    execs[n] = &e->async_exec_hist;
    PyObject *rates = PyList_New(CT_RATE_SLOTS);   /* rates[k]: tasks finished k seconds ago */
    if (!rates) {
        Py_DECREF(workers);
        return NULL;
    }
    for (int s = 0; s < CT_RATE_SLOTS; s++) PyList_SET_ITEM(rates, s, PyLong_FromUnsignedLongLong(rate[s]));
    PyObject *bounds = PyList_New(CT_HIST_BUCKETS);
    if (!bounds) {
        Py_DECREF(workers);
        Py_DECREF(rates);
        return NULL;
    }
    for (int i = 0; i < CT_HIST_BUCKETS; i++) PyList_SET_ITEM(bounds, i, PyLong_FromUnsignedLongLong(ct_hist_upper(i)));
    double frac = (double)(now % 1000000000ull) / 1e9;
    return Py_BuildValue("{s:N,s:N,s:N,s:N,s:N,s:d,s:d,s:i,s:i}", "workers", workers, "exec", hist_to_py(execs, n + 1),
                         "wait", hist_to_py(waits, n), "bounds_ns", bounds, "rate", rates, "second_fraction", frac,
                         "uptime_s", (double)(now - py_mod.mono0) / 1e9, "sleeping", forked ? 0 : atomic_load(&e->sleepers),
                         "live_workers", forked ? 0 : ct_engine_live_workers(e));
}

static PyObject *Engine_add_worker(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    if (engine_forked(self)) return forked_error();
    int rc;
    /* Reusing an exited worker's slot joins its thread, whose exit needs the GIL: never with it
     * held (stand-ins of waiting workers retire, so exited slots are common). */
    Py_BEGIN_ALLOW_THREADS
    rc = ct_engine_add_worker(self->e);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(rc == CT_OK);
}

static PyObject *Engine_retire_worker(EngineObject *self, PyObject *unused) {
    if (engine_check(self) < 0) return NULL;
    return PyBool_FromLong(ct_engine_retire_worker(self->e) == CT_OK);
}

/* _scaler(enabled, interval_s, tick): install the auto-scaler's tick (called on the timer
 * thread, armed by saturated workers) or turn it off. */
static PyObject *Engine_scaler(EngineObject *self, PyObject *args) {
    int enabled;
    double interval;
    PyObject *tick;
    if (engine_check(self) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "pdO:_scaler", &enabled, &interval, &tick)) return NULL;
    ct_engine *e = self->e;
    if (!e->scaler_tick && tick != Py_None) {
        ct_task *t = ct_task_new();
        if (!t) return PyErr_NoMemory();
        Py_INCREF(tick);
        t->fn = tick;
        t->kind = CT_KIND_DETACHED;
        e->scaler_tick = t;   /* owned by the engine object until it is freed */
    }
    atomic_store(&e->scaler_interval_ns, (uint64_t)(interval > 0 ? fmin(interval * 1e9, (double)CT_MAX_TIME_NS) : 1e8));
    atomic_store(&e->scaler_enabled, enabled && e->scaler_tick);
    Py_RETURN_NONE;
}

/* _scaler_rearm(keep): called by the tick at its end: arm the next tick, or stand down until
 * a saturated worker arms it again. */
static PyObject *Engine_scaler_rearm(EngineObject *self, PyObject *args) {
    int keep;
    if (engine_check(self) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "p:_scaler_rearm", &keep)) return NULL;
    atomic_store(&self->e->scaler_armed, 0);
    if (keep) ct_engine_scaler_arm(self->e);
    Py_RETURN_NONE;
}


static PyMethodDef Engine_methods[] = {
    {"_monitor_raw", (PyCFunction)Engine_monitor_raw, METH_NOARGS, NULL},
    {"_add_worker", (PyCFunction)Engine_add_worker, METH_NOARGS, NULL},
    {"_retire_worker", (PyCFunction)Engine_retire_worker, METH_NOARGS, NULL},
    {"_scaler", (PyCFunction)Engine_scaler, METH_VARARGS, NULL},
    {"_scaler_rearm", (PyCFunction)Engine_scaler_rearm, METH_VARARGS, NULL},
    {"_workers", (PyCFunction)Engine_workers, METH_NOARGS, NULL},
    {"add_task", (PyCFunction)(void (*)(void))Engine_add_task, METH_FASTCALL | METH_KEYWORDS,
     "add_task(func, *args, **kwargs) -> TaskResult\n\nQueue func(*args, **kwargs). Every keyword goes to "
     "func; the task's config comes from its @task decorator (override per call with options(...))."},
    {"_submit", (PyCFunction)Engine_submit, METH_VARARGS, NULL},
    {"_gates", (PyCFunction)Engine_gates, METH_VARARGS, NULL},
    {"submit_c", (PyCFunction)Engine_submit_c, METH_VARARGS,
     "submit_c(fn_address, data_address, priority=2) -> TaskResult\n\nQueue a C function void fn(void *data), "
     "run on a worker with no GIL."},
    {"_map_native", (PyCFunction)Engine_map_native, METH_VARARGS, NULL},
    {"_map_native_buffers", (PyCFunction)Engine_map_native_buffers, METH_VARARGS, NULL},
    {"_submit_batch", (PyCFunction)Engine_submit_batch, METH_VARARGS, NULL},
    {"_close", (PyCFunction)Engine_close, METH_NOARGS, NULL},
    {"_call_later", (PyCFunction)Engine_call_later, METH_VARARGS, NULL},
    {"_drain", (PyCFunction)Engine_drain, METH_VARARGS, NULL},
    {"_in_own_task", (PyCFunction)Engine_in_own_task, METH_NOARGS, NULL},
    {"_adopt_loop_thread", (PyCFunction)Engine_adopt_loop_thread, METH_NOARGS, NULL},
    {"_close_to_outside", (PyCFunction)Engine_close_to_outside, METH_NOARGS, NULL},
    {"_forget_after_fork", (PyCFunction)Engine_forget_after_fork, METH_NOARGS, NULL},
    {"_set_memory_cap", (PyCFunction)Engine_set_memory_cap, METH_O, NULL},
    {"_accepts_here", (PyCFunction)Engine_accepts_here, METH_NOARGS, NULL},
    {"_cancel_queued", (PyCFunction)Engine_cancel_queued, METH_NOARGS, NULL},
    {"_stop_workers", (PyCFunction)Engine_stop_workers, METH_NOARGS, NULL},
    {"pause", (PyCFunction)Engine_pause, METH_NOARGS, "Stop starting queued tasks (running ones finish)."},
    {"resume", (PyCFunction)Engine_resume, METH_NOARGS, "Start queued tasks again after pause()."},
    {"_stats", (PyCFunction)Engine_stats, METH_NOARGS, NULL},
    {NULL},
};

PyTypeObject Engine_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "catzilla_tasks._engine.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The C task engine (use catzilla_tasks.BackgroundTasks).",
    .tp_methods = Engine_methods,
    .tp_init = (initproc)Engine_init,
    .tp_new = PyType_GenericNew,
};


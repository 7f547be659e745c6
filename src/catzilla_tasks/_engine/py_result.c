/* py_result.c - TaskResult, the handle on a task node (catzilla_tasks._engine): wait, cancel,
 * callbacks, stats, await; and task ids: the per-process prefix and the registry that makes an
 * id findable by TaskResult(task_id) (see py_mod.registry). */
#include "py_internal.h"

void new_prefix(void) {
    uint32_t r = 0;
#ifdef __linux__
    if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) r = (uint32_t)(getpid() * 2654435761u ^ ct_now_ns());
#else
    r = arc4random(); /* macOS and the BSDs */
#endif
    snprintf(py_mod.prefix, sizeof py_mod.prefix, "%08x", r);
}

static PyObject *format_id(uint64_t id) {
    return PyUnicode_FromFormat("%s-%llu", py_mod.prefix, (unsigned long long)id);
}


/* Make a node findable by TaskResult(task_id) while it lives (hook_release forgets it). Done
 * wherever its id leaves the engine (task_id, get_stats(), repr, error messages, the failures
 * list), so an id copied from any of them finds the task; tasks whose id nobody sees pay
 * nothing. handle, if not NULL, becomes the task's shared handle unless a live one exists
 * (see py_mod.registry). GIL held. Best effort: a failure to register leaves no exception set. */
static void register_id_as(EngineObject *eng, ct_task *t, PyObject *handle) {
    if (t->kind == CT_KIND_C) return;
    if (atomic_load_explicit(&t->state, memory_order_acquire) & CT_F_REGISTERED) {
        PyObject *entry = handle ? registry_entry(t) : NULL;
        if (entry && PyLong_AsVoidPtr(PyList_GET_ITEM(entry, 2)) == NULL) {
            PyObject *addr = PyLong_FromVoidPtr(handle);
            if (!addr || PyList_SetItem(entry, 2, addr) < 0) PyErr_Clear();
        }
        PyErr_Clear();
        return;
    }
    PyObject *key = PyLong_FromUnsignedLongLong(t->id);
    PyObject *val = Py_BuildValue("[KKK]", (unsigned long long)(uintptr_t)t, (unsigned long long)(uintptr_t)eng,
                                  (unsigned long long)(uintptr_t)handle);
    int rc = key && val ? PyDict_SetItem(py_mod.registry, key, val) : -1;
    Py_XDECREF(key);
    Py_XDECREF(val);
    if (rc < 0) {
        PyErr_Clear();
        return;
    }
    atomic_fetch_or(&t->state, CT_F_REGISTERED);
}

void register_id(EngineObject *eng, ct_task *t) { register_id_as(eng, t, NULL); }

/* The id of a node as users see it (registered: see register_id). */
PyObject *node_id(EngineObject *eng, ct_task *t) {
    register_id(eng, t);
    return format_id(t->id);
}

PyObject *status_member(uint32_t code) {
    PyObject *members = py_mod.hooks.status_members;
    if (members && code < (uint32_t)PyTuple_GET_SIZE(members)) {   /* a tuple: _install_hooks checks */
        PyObject *m = PyTuple_GET_ITEM(members, code);
        Py_INCREF(m);
        return m;
    }
    return PyLong_FromUnsignedLong(code);
}

static PyObject *priority_member(int p) {
    PyObject *members = py_mod.hooks.priority_members;
    if (members && p < PyTuple_GET_SIZE(members)) {   /* a tuple: _install_hooks checks */
        PyObject *m = PyTuple_GET_ITEM(members, p);
        Py_INCREF(m);
        return m;
    }
    return PyLong_FromLong(p);
}


/* ------------------------------------------------------------------ TaskResult */


/* A handle joins the cycle collector only once it hands out something that can lead back to
 * it: the task's exception (its traceback will hold the caller's frame) or a container value.
 * Tracking every handle at creation would make the collector walk every queued task: 40%
 * of the no-op throughput, measured. */
static inline void result_track(ResultObject *self) {
    if (!PyObject_GC_IsTracked((PyObject *)self)) PyObject_GC_Track(self);
}

/* A handle made off the hot path, for code that may keep it where a cycle can form through
 * the task (a callback's closure, a frame of the task itself via current_task(), a future's
 * chain, TaskResult(task_id)): tracked from the start, since it may never read the outcome
 * itself while another handle hands the task's exception to a frame that holds it. */
ResultObject *result_wrap_tracked(EngineObject *eng, ct_task *t) {
    ResultObject *r = result_wrap(eng, t);
    if (r) result_track(r);
    return r;
}

/* The cycle collector sees through a handle into its node only while the handle is the node's
 * sole owner (the task is over and the engine has dropped it): the node's objects then belong
 * to this handle alone. That is the case that matters: a failed task's exception, re-raised by
 * wait() in a function that holds the handle, gets that function's frame in its traceback, so
 * handle -> node -> exception -> traceback -> frame -> handle, a cycle that would otherwise
 * never be freed. The owner count only falls while the handle exists (new handles are made
 * with the GIL held, as the collector runs), so a traversal can only see more, never less, in
 * its second pass: the collector stays conservative. */
static int node_is_ours(ResultObject *self) {
    ct_task *t = self->t;
    if (!t || t->kind == CT_KIND_C) return 0;
    uint32_t st = atomic_load_explicit(&t->state, memory_order_acquire);
    /* (once a node is final, its value is its outcome: every path that ends a node takes the
     * callbacks list out of it before any Python code can run) */
    return atomic_load_explicit(&t->refs, memory_order_acquire) == 1 && CT_IS_TERMINAL(st);
}

static int Result_traverse(ResultObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->engine);
    if (node_is_ours(self)) {
        ct_task *t = self->t;
        if (t->kind != CT_KIND_PY_C) {
            Py_VISIT((PyObject *)t->fn);
            Py_VISIT((PyObject *)t->arg);
        }
        Py_VISIT((PyObject *)t->value);
        Py_VISIT((PyObject *)t->cfg);
    }
    return 0;
}

static int Result_clear(ResultObject *self) {
    if (node_is_ours(self)) {
        ct_task *t = self->t;
        /* the outcome goes with the cycle: a failure nobody read is reported now, once */
        report_unobserved(t);
        if (t->kind != CT_KIND_PY_C) {
            Py_CLEAR(t->fn);
            Py_CLEAR(t->arg);
        }
        Py_CLEAR(t->value);
        Py_CLEAR(t->cfg);
    }
    return 0;
}

ct_hooks detached_hooks = {.release = hook_release};

static void Result_dealloc(ResultObject *self) {
    PyObject_GC_UnTrack(self);
    if (self->t && (atomic_load_explicit(&self->t->state, memory_order_relaxed) & CT_F_REGISTERED)) {
        /* No longer the task's shared handle (a small int: no allocation, no Python code, so
         * nothing can look the dying handle up meanwhile) */
        PyObject *type, *val, *tb;
        PyErr_Fetch(&type, &val, &tb);
        PyObject *entry = registry_entry(self->t);
        if (entry && PyLong_AsVoidPtr(PyList_GET_ITEM(entry, 2)) == (void *)self)
            PyList_SetItem(entry, 2, PyLong_FromLong(0));
        PyErr_Clear();
        PyErr_Restore(type, val, tb);
    }
    if (self->t) {
        ct_task *t = self->t;
        self->t = NULL;
        ct_task_decref(self->engine ? &self->engine->e->hooks : &detached_hooks, t);
    }
    Py_XDECREF(self->engine);
    PyObject_GC_Del(self);
}

int parse_timeout(PyObject *timeout, uint64_t *deadline, const char *fname) {
    *deadline = 0;
    if (timeout == NULL || timeout == Py_None) return 0;
    /* a bool is refused as at every other time entry point (wait(True) is a mistake, not 1 s) */
    double s = PyBool_Check(timeout) ? (PyErr_SetNone(PyExc_TypeError), -1.0) : PyFloat_AsDouble(timeout);
    if (s == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "%s(): timeout must be a number of seconds or None, got %.100s", fname,
                     Py_TYPE(timeout)->tp_name);
        return -1;
    }
    if (isnan(s)) {
        PyErr_Format(PyExc_ValueError, "%s(): timeout is NaN; give seconds >= 0, or None to wait without limit", fname);
        return -1;
    }
    if (s < 0) {
        PyErr_Format(PyExc_ValueError, "%s(): timeout must be >= 0 seconds (or None to wait forever), got %R", fname,
                     timeout);
        return -1;
    }
    if (s * 1e9 >= (double)CT_MAX_TIME_NS) return 0;   /* infinite, or past what the engine represents: no limit */
    uint64_t ns = (uint64_t)(s * 1e9);
    *deadline = ct_now_ns() + (ns ? ns : 1);
    return 0;
}

/* A worker blocks on another task (a task waiting for a task): the engine starts a stand-in
 * worker for as long as it waits, so the task it waits for (queued, or in this worker's own
 * batch, which the stand-in steals) can run even when every worker waits so. A wait that
 * cannot finish at all is refused: a task waiting for itself. The running task's timeout_ms
 * bounds the wait too: past it, the wait raises the task's TaskTimeout (the timer cannot
 * interrupt a thread blocked here). */
static _Thread_local int tl_no_standin;   /* the last wait here could not start a stand-in */
static int wait_node_in_worker(ct_task *t, uint64_t deadline) {
    if (t == tl_current) {
        PyErr_SetString(PyExc_RuntimeError,
                        "a task cannot wait() for itself: it would never finish (return its value instead)");
        return -1;
    }
    ct_engine *e = tl_worker->engine;
    ct_task *me = tl_current;
    ConfigObject *mc = me && tl_current_engine && tl_current_engine->e == e ? (ConfigObject *)me->cfg : NULL;
    uint64_t mine = mc && mc->timeout_ns > 0 && !mc->isolation ? ts_load(&me->t_start) + (uint64_t)mc->timeout_ns : 0;
    int added, rc, over = 0;
    Py_BEGIN_ALLOW_THREADS   /* starting and retiring threads: never with the GIL held */
    added = ct_engine_block_begin(e);
    for (;;) {
        uint64_t until = mine && (!deadline || mine < deadline) ? mine : deadline;
        rc = ct_task_wait(t, until);
        if (rc == CT_OK) break;
        uint64_t now = ct_now_ns();
        if (mine && now >= mine) {
            over = 1;
            break;
        }
        if (deadline && now >= deadline) break;
    }
    ct_engine_block_end(e, added);
    Py_END_ALLOW_THREADS
    tl_no_standin = !added;
    if (rc == CT_OK) return 0;
    if (over && py_mod.hooks.task_timeout) {
        /* as the timer would have: this attempt timed out (the timer, when it fires, sees the
         * flag and injects nothing; what it injected if it came first is withdrawn) */
        atomic_fetch_or(&me->state, CT_F_TIMEDOUT);
        PyThreadState_SetAsyncExc(tl_worker->thread_ident, NULL);
        PyErr_SetNone(py_mod.hooks.task_timeout);
        return -1;
    }
    return 1;
}

/* A time option in ms (TaskConfig) to ns. NaN and negative values are refused. Past
 * CT_MAX_TIME_NS (infinity included): a limit (limit=1) becomes -1, "no limit"; a delay is
 * refused, since a task that never runs would only hold its room in the queue. */
int ms_option(double ms, const char *field, int limit, int64_t *out) {
    const char *why = NULL;
    if (isnan(ms) || ms < 0)
        why = "%s: must be a number of milliseconds >= 0, got %R";
    else if (ms * 1e6 > (double)CT_MAX_TIME_NS && !limit)
        why = "%s: %R ms is past the longest time the engine can wait (100 years)";
    if (why) {
        PyObject *v = PyFloat_FromDouble(ms);
        if (v) PyErr_Format(PyExc_ValueError, why, field, v);
        Py_XDECREF(v);
        return -1;
    }
    *out = limit && ms * 1e6 >= (double)CT_MAX_TIME_NS ? -1 : (int64_t)(ms * 1e6);
    return 0;
}

/* Wait for the node with the GIL released. On the main thread the wait is cut into slices so
 * Ctrl-C (a signal handled by Python only between bytecodes) still interrupts it. Returns 0,
 * 1 on timeout, -1 with an exception set (interrupted). */
int wait_node(ct_task *t, uint64_t deadline) {
    if (CT_IS_TERMINAL(atomic_load_explicit(&t->state, memory_order_acquire))) return 0;
    /* (a poll, wait(0), needs no stand-in) */
    if (tl_worker && (!deadline || deadline > ct_now_ns() + 1000000)) return wait_node_in_worker(t, deadline);
    int main_thread = _PyOS_IsMainThread();
    for (;;) {
        uint64_t until = deadline;
        if (main_thread) {
            uint64_t slice = ct_now_ns() + 100000000ull;
            if (!until || slice < until) until = slice;
        }
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = ct_task_wait(t, until);
        Py_END_ALLOW_THREADS
        if (rc == CT_OK) return 0;
        if (deadline && ct_now_ns() >= deadline) return 1;
        if (PyErr_CheckSignals() < 0) return -1;
    }
}

/* The outcome of a finished node: its value, or its exception raised. */
static PyObject *node_outcome(ResultObject *self) {
    ct_task *t = self->t;
    uint32_t s = ct_task_status(t);
    PyObject *v = (PyObject *)t->value;
    switch (s) {
    case CT_SUCCEEDED:
        if (!v) v = Py_None;
        if (PyObject_GC_IsTracked(v)) result_track(self);
        Py_INCREF(v);
        return v;
    case CT_CANCELLED: {
        if (v && PyExceptionInstance_Check(v)) {  /* cancelled while it ran (an isolated task) */
            result_track(self);
            PyErr_SetObject((PyObject *)Py_TYPE(v), v);
            return NULL;
        }
        PyObject *id = node_id(self->engine, t);
        uint32_t st = atomic_load_explicit(&t->state, memory_order_acquire);
        if (st & CT_F_ASYNC)   /* its coroutine was cancelled on the loop */
            PyErr_Format(py_mod.task_cancelled, "task %U was cancelled while it ran", id);
        else if (t->attempt > 0)
            PyErr_Format(py_mod.task_cancelled, "task %U was cancelled after attempt %d, before its retry", id,
                         (int)t->attempt);
        else
            PyErr_Format(py_mod.task_cancelled, "task %U was cancelled before it ran", id);
        Py_XDECREF(id);
        return NULL;
    }
    default:
        atomic_fetch_or_explicit(&t->state, CT_F_OBSERVED, memory_order_relaxed);
        if (v && PyExceptionInstance_Check(v)) {
            result_track(self);
            PyErr_SetObject((PyObject *)Py_TYPE(v), v);
        } else {
            PyObject *id = node_id(self->engine, t);
            PyErr_Format(PyExc_RuntimeError, "task %U failed", id);
            Py_XDECREF(id);
        }
        return NULL;
    }
}

/* t (of this worker's engine) is a sync task this worker thread started and has not finished:
 * its call is suspended below the caller on this thread's stack (help_run ran the caller's task
 * while t waited), so it can resume only after the caller returns. (An async task runs on the
 * event loop; a worker's slot is reused only once its thread has exited.) */
static int held_below(ct_task *t) {
    uint32_t st = atomic_load_explicit(&t->state, memory_order_acquire);
    return (st & CT_STATUS_MASK) == CT_RUNNING && !(st & CT_F_ASYNC) && t != tl_current &&
           (st >> CT_WORKER_SHIFT) == (uint32_t)tl_worker->id + 1u;
}

static PyObject *Result_wait(ResultObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:wait", kwlist, &timeout)) return NULL;
    uint64_t deadline;
    if (parse_timeout(timeout, &deadline, "wait") < 0) return NULL;
    if (engine_forked(self->engine) && !CT_IS_TERMINAL(atomic_load_explicit(&self->t->state, memory_order_acquire)))
        return forked_error();   /* nothing in this process will ever end it */
    if (tl_loop_engine && !CT_IS_TERMINAL(atomic_load_explicit(&self->t->state, memory_order_acquire)) &&
        !(timeout != Py_None && PyFloat_AsDouble(timeout) == 0.0)) {
        /* on the engine's event loop: blocking here stops every async task (the one waited
         * for may be one of them) */
        PyErr_SetString(PyExc_RuntimeError,
                        "wait() would block the engine's event loop (an async task is running here): use "
                        "`await result` instead");
        return NULL;
    }
    if (tl_worker && (!deadline || deadline > ct_now_ns() + 1000000)) {   /* (a poll, wait(0), runs nothing) */
        if (self->engine && tl_worker->engine == self->engine->e && held_below(self->t)) {
            PyObject *id = node_id(self->engine, self->t);
            PyErr_Format(PyExc_RuntimeError,
                         "task %U is suspended further up this worker's thread, waiting (directly or through "
                         "other tasks) for the task now waiting for it, which this worker ran while it waited: a "
                         "cycle of tasks waiting on each other, so this wait can never finish",
                         id);
            Py_XDECREF(id);
            return NULL;
        }
        help_run(self->engine, self->t);
    }
    tl_no_standin = 0;
    int rc = wait_node(self->t, deadline);
    if (rc < 0) return NULL;
    if (rc > 0) {
        uint32_t s = ct_task_status(self->t);   /* read once: the message says what it was */
        if (CT_IS_TERMINAL(s)) return node_outcome(self);   /* it ended just as the wait did */
        PyObject *id = node_id(self->engine, self->t);
        PyObject *st = status_member(s);
        PyErr_Format(PyExc_TimeoutError,
                     "task %U did not finish within %R s (status %S); call wait() again with a longer "
                     "timeout, or cancel() it%s",
                     id, timeout, st,
                     tl_no_standin ? " (this task waits in a worker and no stand-in worker could be started: "
                                     "every thread the engine may have is taken, possibly by tasks waiting on "
                                     "each other, a deadlock; raise max_workers or do not wait on tasks in tasks)"
                                   : "");
        Py_XDECREF(id);
        Py_XDECREF(st);
        return NULL;
    }
    return node_outcome(self);
}

static PyObject *Result_is_ready(ResultObject *self, PyObject *unused) {
    return PyBool_FromLong(CT_IS_TERMINAL(atomic_load_explicit(&self->t->state, memory_order_acquire)));
}

/* Cancel the task if it has not started (queued, delayed; a detached result not settled):
 * 1 if it is now CANCELLED, 0 otherwise (running or final). Its done callbacks run. */
static int result_cancel_not_started(ResultObject *self) {
    ct_task *t = self->t;
    if (t->kind == CT_KIND_DETACHED) {
        if (!ct_task_settle(t, CT_CANCELLED, NULL)) return 0;
        take_callbacks(NULL, t, CT_CANCELLED);
        return 1;
    }
    if (!ct_task_cancel(self->engine ? self->engine->e : NULL, t)) return 0;
    /* its arguments no longer count against memory_pool_mb, though the node stays queued
     * until a worker pops it (uncharge is idempotent: run_one's call then finds nothing) */
    if (CT_UNLIKELY(self->engine && self->engine->mem_cap > 0)) uncharge(t);
    /* Callbacks of a cancelled task: done callbacks learn of it now (the node itself is
     * dropped when a worker pops it). */
    take_callbacks(self->engine, t, CT_CANCELLED);
    return 1;
}

/* _cancel_queued(): cancel() for what has not started only, decided atomically (a status
 * check then cancel() could find the task started in between and kill or ask it). */
static PyObject *Result_cancel_queued(ResultObject *self, PyObject *unused) {
    return PyBool_FromLong(result_cancel_not_started(self));
}

static PyObject *Result_cancel(ResultObject *self, PyObject *unused) {
    ct_task *t = self->t;
    if (result_cancel_not_started(self)) Py_RETURN_TRUE;
    if (t->kind == CT_KIND_DETACHED) Py_RETURN_FALSE;
    uint32_t st = atomic_load(&t->state);
    if ((st & CT_STATUS_MASK) != CT_RUNNING) Py_RETURN_FALSE;
    /* Running: an async task's coroutine is cancelled (it ends CANCELLED), so is a
     * process-isolated one (its child is killed); a sync task
     * in a thread cannot be stopped safely from outside, so it is asked: it sees
     * current_task().cancel_requested and may stop early. */
    atomic_fetch_or(&t->state, CT_F_CANCEL_REQ);
    if (t->kind == CT_KIND_PY && t->cfg && ((ConfigObject *)t->cfg)->isolation && !(st & CT_F_ASYNC)) {
        /* A process-isolated task: its call (isolation.IsolatedCall) kills its child; the
         * task then ends CANCELLED. False if its outcome was already in. */
        PyObject *r = PyObject_CallMethod((PyObject *)t->fn, "cancel", NULL);
        if (!r && PyErr_ExceptionMatches(PyExc_AttributeError)) {  /* not one of ours */
            PyErr_Clear();
            Py_RETURN_FALSE;
        }
        if (!r) return NULL;
        int took = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (took < 0) return NULL;
        return PyBool_FromLong(took);
    }
    if ((st & CT_F_ASYNC) && py_mod.hooks.cancel_async && self->engine) {
        PyObject *r =
            PyObject_CallFunctionObjArgs(py_mod.hooks.cancel_async, (PyObject *)self->engine, (PyObject *)self, NULL);
        if (!r) return NULL;
        Py_DECREF(r);
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

/* Append (fn, mode) to the node's callbacks, or return 1 if the node is already final.
 *
 * Everything is allocated before the final check: allocating a container can start the cycle
 * collector, whose finalizers run Python code, and Python code lets other threads take the
 * GIL, so the task could end between a check and the append, and its callbacks would never
 * run. From the check to the flag below, nothing can release the GIL (appending to a list
 * only reallocates its item array, which never starts the collector). The end paths
 * (complete_py, cancel) keep the same rule from taking the list to the terminal state. */
int attach_callback(ct_task *t, PyObject *fn, int mode) {
    if (CT_IS_TERMINAL(atomic_load_explicit(&t->state, memory_order_acquire))) return 1;
    PyObject *entry = Py_BuildValue("(Oi)", fn, mode);
    if (!entry) return -1;
    PyObject *fresh = NULL;   /* a list of our own, if the node may have none */
    for (;;) {
        uint32_t st = atomic_load_explicit(&t->state, memory_order_acquire);
        if (CT_IS_TERMINAL(st)) {
            Py_DECREF(entry);
            Py_XDECREF(fresh);
            return 1;
        }
        if (st & CT_F_CALLBACKS) {
            int rc = PyList_Append((PyObject *)t->value, entry);
            Py_DECREF(entry);
            Py_XDECREF(fresh);
            return rc < 0 ? -1 : 0;
        }
        if (fresh) break;
        fresh = PyList_New(0);   /* may run other threads: check again */
        if (!fresh) {
            Py_DECREF(entry);
            return -1;
        }
    }
    if (PyList_Append(fresh, entry) < 0) {
        Py_DECREF(entry);
        Py_DECREF(fresh);
        return -1;
    }
    Py_DECREF(entry);
    t->value = fresh;
    /* All writers of a Python-visible node's end state hold the GIL, as we do: the flag and
     * the list cannot race with completion. */
    atomic_fetch_or_explicit(&t->state, CT_F_CALLBACKS, memory_order_acq_rel);
    return 0;
}

static PyObject *Result_add_callback(ResultObject *self, PyObject *fn) {
    if (!PyCallable_Check(fn)) {
        PyErr_Format(PyExc_TypeError, "add_callback() needs a callable taking the task's value, got %.100s",
                     Py_TYPE(fn)->tp_name);
        return NULL;
    }
    int rc = attach_callback(self->t, fn, 0);
    if (rc < 0) return NULL;
    if (rc == 1 && ct_task_status(self->t) == CT_SUCCEEDED) {
        PyObject *v = self->t->value ? (PyObject *)self->t->value : Py_None;
        PyObject *r = PyObject_CallOneArg(fn, v);
        if (!r) return NULL;   /* called here, in the caller's thread: its error is the caller's */
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

static PyObject *Result_on_done(ResultObject *self, PyObject *fn) {
    int rc = attach_callback(self->t, fn, 1);
    if (rc < 0) return NULL;
    if (rc == 1) {
        PyObject *r = PyObject_CallOneArg(fn, (PyObject *)self);
        if (!r) return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

/* _settle(value=None, exc=None, cancelled=False): end a detached node, or an async task
 * whose coroutine finished on the event loop. */
static PyObject *Result_settle(ResultObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"value", "exc", "cancelled", NULL};
    PyObject *value = Py_None, *exc = Py_None;
    int cancelled = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OOp:_settle", kwlist, &value, &exc, &cancelled)) return NULL;
    ct_task *t = self->t;
    int status = cancelled ? CT_CANCELLED : (exc != Py_None ? CT_FAILED : CT_SUCCEEDED);
    PyObject *v = status == CT_FAILED ? exc : (status == CT_SUCCEEDED ? value : NULL);
    Py_XINCREF(v);
    uint32_t st = atomic_load(&t->state);
    if (t->kind == CT_KIND_DETACHED) {
        if (CT_IS_TERMINAL(st)) {
            Py_XDECREF(v);
            Py_RETURN_FALSE;
        }
        complete_py(NULL, t, status, v);
        Py_RETURN_TRUE;
    }
    if (!(st & CT_F_ASYNC) || (st & CT_STATUS_MASK) != CT_RUNNING || !self->engine) {
        Py_XDECREF(v);
        PyErr_SetString(PyExc_RuntimeError, "_settle(): this task is not waiting for an outcome from outside");
        return NULL;
    }
    ct_hist_record_shared(&self->engine->e->async_exec_hist, ct_now_ns() - ts_load(&t->t_start));
    if (status == CT_CANCELLED && (st & CT_F_TIMEDOUT)) {
        /* cancelled by its timeout, not by a user */
        status = CT_TIMED_OUT;
        ConfigObject *cfg = (ConfigObject *)t->cfg;
        register_id(self->engine, t);   /* the message carries the id */
        v = PyObject_CallFunction(py_mod.hooks.task_timeout, "s", "");
        PyObject *msg = PyUnicode_FromFormat("task %s-%llu ran longer than timeout_ms=%lld", py_mod.prefix,
                                             (unsigned long long)t->id,
                                             (long long)(cfg ? cfg->timeout_ns / 1000000 : 0));
        Py_XDECREF(v);
        v = msg ? PyObject_CallOneArg(py_mod.hooks.task_timeout, msg) : NULL;
        Py_XDECREF(msg);
        if (!v) return NULL;
    }
    if (status == CT_FAILED || status == CT_TIMED_OUT) {
        atomic_fetch_and(&t->state, ~CT_F_ASYNC);
        uint64_t start = ts_load(&t->t_start), end = ct_now_ns();
        if (maybe_retry(self->engine, t, status, v, start, end)) {
            Py_XDECREF(v);
            Py_RETURN_TRUE;
        }
    }
    complete_py(self->engine, t, status, v);
    Py_RETURN_TRUE;
}

static double wall_of(uint64_t mono) { return py_mod.wall0 + ((double)mono - (double)py_mod.mono0) / 1e9; }

int dict_set_steal(PyObject *d, const char *k, PyObject *v) {
    if (!v) return -1;
    int rc = PyDict_SetItemString(d, k, v);
    Py_DECREF(v);
    return rc;
}

static PyObject *Result_get_stats(ResultObject *self, PyObject *unused) {
    ct_task *t = self->t;
    uint32_t st = atomic_load_explicit(&t->state, memory_order_acquire);
    uint64_t q = ts_load(&t->t_enqueue), s = ts_load(&t->t_start), e = ts_load(&t->t_end);
    if (!CT_IS_TERMINAL(st)) e = 0;
    uint32_t wid = st >> CT_WORKER_SHIFT;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
#define NUM_OR_NONE(cond, expr) ((cond) ? PyFloat_FromDouble(expr) : (Py_INCREF(Py_None), Py_None))
    if (dict_set_steal(d, "task_id", node_id(self->engine, t)) < 0 ||
        dict_set_steal(d, "status", status_member(st & CT_STATUS_MASK)) < 0 ||
        dict_set_steal(d, "priority", priority_member(t->priority)) < 0 ||
        dict_set_steal(d, "queued_at", NUM_OR_NONE(q, wall_of(q))) < 0 ||
        dict_set_steal(d, "started_at", NUM_OR_NONE(s, wall_of(s))) < 0 ||
        dict_set_steal(d, "finished_at", NUM_OR_NONE(e, wall_of(e))) < 0 ||
        dict_set_steal(d, "queue_wait_ms", NUM_OR_NONE(q && s, (double)(s - q) / 1e6)) < 0 ||
        dict_set_steal(d, "execution_time_ms", NUM_OR_NONE(s && e, (double)(e - s) / 1e6)) < 0 ||
        dict_set_steal(d, "attempts", PyLong_FromLong(t->attempt)) < 0 ||
        dict_set_steal(d, "worker_id", wid ? PyLong_FromUnsignedLong(wid - 1) : (Py_INCREF(Py_None), Py_None)) < 0 ||
        dict_set_steal(d, "is_async", PyBool_FromLong((st & CT_F_ASYNC) != 0)) < 0 ||
        dict_set_steal(d, "native", PyBool_FromLong(t->kind == CT_KIND_NATIVE)) < 0 ||
        dict_set_steal(d, "compile_reason",
                       py_mod.hooks.native_reason && (t->kind == CT_KIND_PY || t->kind == CT_KIND_NATIVE) && t->fn
                           ? PyObject_CallFunctionObjArgs(py_mod.hooks.native_reason, (PyObject *)t->fn,
                                                          t->kind == CT_KIND_NATIVE ? Py_True : Py_False, NULL)
                           : Py_NewRef(Py_None)) < 0) {
        Py_DECREF(d);
        return NULL;
    }
#undef NUM_OR_NONE
    PyObject *hist = NULL;
    if ((st & CT_F_HISTORY) && CT_IS_TERMINAL(st) && t->kind != CT_KIND_PY_C) {   /* moved into arg */
        if (t->arg && PyList_Check((PyObject *)t->arg)) hist = PyList_GetSlice((PyObject *)t->arg, 0, PY_SSIZE_T_MAX);
    } else if (st & CT_F_HISTORY) {
        PyObject *key = PyLong_FromUnsignedLongLong(t->id);
        PyObject *lst = key ? PyDict_GetItemWithError(py_mod.history, key) : NULL;
        Py_XDECREF(key);
        if (lst) hist = PyList_GetSlice(lst, 0, PyList_GET_SIZE(lst));
        PyErr_Clear();
    }
    if (dict_set_steal(d, "history", hist ? hist : PyList_New(0)) < 0) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

/* Reading the id makes this handle the task's shared one if it has none (TaskResult(task_id)
 * then returns this very object). */
static PyObject *Result_get_task_id(ResultObject *self, void *unused) {
    register_id_as(self->engine, self->t, (PyObject *)self);
    return format_id(self->t->id);
}

/* ---- progress (progress.py): set_progress() stores what hooks.make_progress makes, under the
 * task's id in py_mod.progress, until the node is freed (hook_release); a detached handle of a
 * concurrency-limited call (limits.py) holds instead the TaskResult of its run (or None while
 * it is parked), whose progress and status it shows ---- */
static int progress_store(ResultObject *self, PyObject *value) {
    register_id(self->engine, self->t);   /* so that hook_release forgets it */
    PyObject *key = PyLong_FromUnsignedLongLong(self->t->id);
    int rc = key ? PyDict_SetItem(py_mod.progress, key, value) : -1;
    Py_XDECREF(key);
    return rc;
}

/* The TaskResult (or None) a detached handle is linked to (borrowed), else NULL (no error). */
static PyObject *progress_link(ct_task *t) {
    if (!(atomic_load_explicit(&t->state, memory_order_relaxed) & CT_F_REGISTERED)) return NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(t->id);
    PyObject *v = key ? PyDict_GetItemWithError(py_mod.progress, key) : NULL;
    Py_XDECREF(key);
    PyErr_Clear();
    return v && (v == Py_None || PyObject_TypeCheck(v, &Result_Type)) ? v : NULL;
}

static PyObject *Result_set_progress(ResultObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fraction", "message", NULL};
    PyObject *fraction, *message = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:set_progress", kwlist, &fraction, &message)) return NULL;
    PyObject *p = PyObject_CallFunctionObjArgs(py_mod.hooks.make_progress, (PyObject *)self, fraction, message, NULL);
    if (!p) return NULL;
    int rc = progress_store(self, p);
    Py_DECREF(p);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

/* _link_progress(other): this handle shows the progress (and, detached, the status) of other;
 * None: of nothing yet (a parked call: PENDING). */
static PyObject *Result_link_progress(ResultObject *self, PyObject *other) {
    if (other != Py_None && !PyObject_TypeCheck(other, &Result_Type)) {
        PyErr_SetString(PyExc_TypeError, "_link_progress(): expected a TaskResult or None");
        return NULL;
    }
    if (progress_store(self, other) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Result_get_progress(ResultObject *self, void *unused) {
    for (int hops = 0; hops < 4; hops++) {
        if (!(atomic_load_explicit(&self->t->state, memory_order_relaxed) & CT_F_REGISTERED)) break;
        PyObject *key = PyLong_FromUnsignedLongLong(self->t->id);
        if (!key) return NULL;
        PyObject *v = PyDict_GetItemWithError(py_mod.progress, key);
        Py_DECREF(key);
        if (!v) {
            if (PyErr_Occurred()) return NULL;
            break;
        }
        if (!PyObject_TypeCheck(v, &Result_Type)) return Py_NewRef(v);   /* a Progress, or None */
        self = (ResultObject *)v;
    }
    Py_RETURN_NONE;
}
/* ---- end of progress ---- */

static PyObject *Result_get_status(ResultObject *self, void *unused) {
    if (CT_UNLIKELY(self->t->kind == CT_KIND_DETACHED) && !CT_IS_TERMINAL(atomic_load(&self->t->state))) {
        /* the handle of a concurrency-limited call (limits.py): PENDING while it is parked (linked
         * to None), then the status of the run (linked to its TaskResult) */
        PyObject *link = progress_link(self->t);
        if (link == Py_None) return status_member(CT_PENDING);
        if (link) return Result_get_status((ResultObject *)link, NULL);
    }
    return status_member(ct_task_status(self->t));
}
static PyObject *Result_get_key(ResultObject *self, void *unused) { return PyLong_FromUnsignedLongLong(self->t->id); }
static PyObject *Result_get_cancel_requested(ResultObject *self, void *unused) {
    uint32_t st = atomic_load(&self->t->state);
    return PyBool_FromLong((st & CT_F_CANCEL_REQ) || (st & CT_STATUS_MASK) == CT_CANCELLED);
}

/* _engine.current_task(): the TaskResult of the task running in this thread, or None. */
PyObject *mod_current_task(PyObject *m, PyObject *unused) {
    if (!tl_current) Py_RETURN_NONE;
    return (PyObject *)result_wrap_tracked(tl_current_engine, tl_current);
}
static PyObject *Result_get_priority(ResultObject *self, void *unused) { return priority_member(self->t->priority); }

static PyObject *Result_repr(ResultObject *self) {
    PyObject *st = status_member(ct_task_status(self->t));
    PyObject *id = node_id(self->engine, self->t);
    PyObject *r = PyUnicode_FromFormat("<TaskResult %U %S>", id, st);
    Py_XDECREF(st);
    Py_XDECREF(id);
    return r;
}

static PyObject *Result_await(ResultObject *self) {
    if (!py_mod.hooks.await_impl) {
        PyErr_SetString(PyExc_RuntimeError, "catzilla_tasks is not initialised (import catzilla_tasks)");
        return NULL;
    }
    return PyObject_CallOneArg(py_mod.hooks.await_impl, (PyObject *)self);
}

/* TaskResult(task_id): the live task with that id (queued, running, or finished and still
 * referenced somewhere). */
static PyObject *Result_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *tid;
    if (!PyArg_ParseTuple(args, "U:TaskResult", &tid)) return NULL;
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(tid, &len);
    if (!s) return NULL;
    size_t plen = strlen(py_mod.prefix);
    unsigned long long id = 0;
    int ok = (size_t)len > plen + 1 && (size_t)len <= plen + 1 + 20 && strncmp(s, py_mod.prefix, plen) == 0 &&
             s[plen] == '-' && s[plen + 1] != '0';
    /* exactly the decimal digits the engine writes: strtoull alone would take a sign, spaces,
     * a trailing NUL or a wrapped-around negative number as some other task's id */
    for (Py_ssize_t i = (Py_ssize_t)plen + 1; ok && i < len; i++) ok = s[i] >= '0' && s[i] <= '9';
    if (ok) {
        char *end = NULL;
        errno = 0;
        id = strtoull(s + plen + 1, &end, 10);
        ok = end == s + len && errno == 0 && id > 0;
    }
    PyObject *entry = NULL;
    if (ok) {
        PyObject *key = PyLong_FromUnsignedLongLong(id);
        if (!key) return NULL;
        entry = PyDict_GetItemWithError(py_mod.registry, key);
        Py_DECREF(key);
        if (!entry && PyErr_Occurred()) return NULL;
    }
    if (!entry) {
        PyErr_Format(PyExc_LookupError,
                     "no live task with id %R in this process: a task can be looked up by id while it is "
                     "queued or running, or while a TaskResult for it is still referenced",
                     tid);
        return NULL;
    }
    ct_task *t = (ct_task *)(uintptr_t)PyLong_AsUnsignedLongLong(PyList_GET_ITEM(entry, 0));
    EngineObject *eng = (EngineObject *)(uintptr_t)PyLong_AsUnsignedLongLong(PyList_GET_ITEM(entry, 1));
    Py_INCREF(entry);   /* result_wrap may run the collector, which may drop the entry */
    ResultObject *r = result_wrap_tracked(eng, t);
    if (r && PyLong_AsVoidPtr(PyList_GET_ITEM(entry, 2)) == NULL) {
        PyErr_Clear();
        /* the new handle is the task's shared one from now on (small ints are cached: no
         * allocation between the lookup and here) */
        PyObject *addr = PyLong_FromVoidPtr(r);
        if (!addr || PyList_SetItem(entry, 2, addr) < 0) PyErr_Clear();
    }
    Py_DECREF(entry);
    return (PyObject *)r;
}

/* _engine.detached(): a TaskResult no engine runs, settled later with _settle (TaskFuture). */
PyObject *mod_detached(PyObject *m, PyObject *unused) {
    ct_task *t = ct_task_new();
    if (!t) return PyErr_NoMemory();
    t->kind = CT_KIND_DETACHED;
    atomic_store(&t->state, CT_RUNNING);
    ts_store(&t->t_enqueue, ct_now_ns());
    ResultObject *r = PyObject_GC_New(ResultObject, &Result_Type);
    if (!r) {
        ct_task_decref(&detached_hooks, t);
        return NULL;
    }
    r->t = t;   /* takes the node's only reference */
    r->engine = NULL;
    PyObject_GC_Track(r);   /* a future: chains keep it in closures and frames (rare: no cost to add_task) */
    return (PyObject *)r;
}

static PyMethodDef Result_methods[] = {
    {"wait", (PyCFunction)(void (*)(void))Result_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(timeout=None) -> value\n\nBlock until the task ends; return its value or raise its exception. "
     "TimeoutError if it is not done in time; TaskCancelled if it was cancelled."},
    {"is_ready", (PyCFunction)Result_is_ready, METH_NOARGS, "True once the task has ended (any outcome)."},
    {"done", (PyCFunction)Result_is_ready, METH_NOARGS, "Same as is_ready()."},
    {"cancel", (PyCFunction)Result_cancel, METH_NOARGS,
     "Cancel the task if it has not started. Returns whether it took effect."},
    {"_cancel_queued", (PyCFunction)Result_cancel_queued, METH_NOARGS,
     "Cancel the task only if it has not started (a running one is neither asked nor killed)."},
    {"add_callback", (PyCFunction)Result_add_callback, METH_O,
     "add_callback(cb): call cb(value) when the task succeeds (in the worker thread; at once, in this "
     "thread, if it already has)."},
    {"get_stats", (PyCFunction)Result_get_stats, METH_NOARGS, "Timing and placement of this task, as a dict."},
    {"_on_done", (PyCFunction)Result_on_done, METH_O, NULL},
    {"_settle", (PyCFunction)(void (*)(void))Result_settle, METH_VARARGS | METH_KEYWORDS, NULL},
    {"set_progress", (PyCFunction)(void (*)(void))Result_set_progress, METH_VARARGS | METH_KEYWORDS,
     "set_progress(fraction, message=None): report how far the task is (0.0 to 1.0), read as result.progress."},
    {"_link_progress", (PyCFunction)Result_link_progress, METH_O, NULL},
    {NULL},
};

static PyGetSetDef Result_getset[] = {
    {"task_id", (getter)Result_get_task_id, NULL, "The task's id (str), unique in this process.", NULL},
    {"status", (getter)Result_get_status, NULL, "The task's TaskStatus.", NULL},
    {"priority", (getter)Result_get_priority, NULL, "The task's TaskPriority.", NULL},
    {"_key", (getter)Result_get_key, NULL, NULL, NULL},
    {"cancel_requested", (getter)Result_get_cancel_requested, NULL,
     "True once cancel() was asked for this task (a running sync task may check it and stop).", NULL},
    {"progress", (getter)Result_get_progress, NULL,
     "The last set_progress() of the task: a Progress(fraction, message), or None.", NULL},
    {NULL},
};

static PyAsyncMethods Result_async = {.am_await = (unaryfunc)Result_await};

PyTypeObject Result_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "catzilla_tasks.TaskResult",
    .tp_basicsize = sizeof(ResultObject),
    .tp_dealloc = (destructor)Result_dealloc,
    .tp_repr = (reprfunc)Result_repr,
    .tp_as_async = &Result_async,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The handle of one task: its id, status and outcome.\n\nTaskResult(task_id) finds a live task by id.",
    .tp_traverse = (traverseproc)Result_traverse,
    .tp_clear = (inquiry)Result_clear,
    .tp_methods = Result_methods,
    .tp_getset = Result_getset,
    .tp_new = Result_new,
};


/* py_run.c - running a Python task on a worker and completing it (catzilla_tasks._engine).
 *
 * hook_run_batch takes a worker's batch under one GIL acquisition and runs each task (run_one):
 * a sync call, a coroutine handed to the event loop, a compiled task (py_native.c). complete_py
 * ends a task: its callbacks (on_success/on_failure, add_done_callback, workflow gates), the
 * failures list, retries with backoff and the attempts history. hook_release drops a node's
 * Python objects when its last reference goes. Also: the error reporter and the thread-locals. */
#include "py_internal.h"

/* Call the error reporter (logging in engine.py); never lets an exception escape. */
void report_error(const char *what, PyObject *subject, PyObject *exc) {
    if (!py_mod.hooks.report_error) return;
    PyObject *r = PyObject_CallFunction(py_mod.hooks.report_error, "sOO", what, subject ? subject : Py_None,
                                        exc ? exc : Py_None);
    if (!r) PyErr_WriteUnraisable(py_mod.hooks.report_error);
    Py_XDECREF(r);
}

/* Can exc (its traceback, cause and context included) be formatted? Not if the cycle
 * collector has already cleared part of it: the last owner of a node may let go inside a
 * collection (a frame in the exception's own traceback held the handle), after the collector
 * cleared the tracebacks of that cycle (a cleared traceback has no frame). */
static int exc_intact(PyObject *exc, int depth) {
    if (!exc || exc == Py_None) return 1;
    if (depth > 16 || !PyExceptionInstance_Check(exc) || !((PyBaseExceptionObject *)exc)->args) return 0;
    PyObject *tb = ((PyBaseExceptionObject *)exc)->traceback;
    for (int n = 0; tb && tb != Py_None && n < 10000; n++) {
        if (!PyTraceBack_Check(tb) || !((PyTracebackObject *)tb)->tb_frame) return 0;
        tb = (PyObject *)((PyTracebackObject *)tb)->tb_next;
    }
    return exc_intact(((PyBaseExceptionObject *)exc)->cause, depth + 1) &&
           exc_intact(((PyBaseExceptionObject *)exc)->context, depth + 1);
}

/* The last owner of a failed node lets go and nobody read its outcome: log it, once. The
 * common case, a fire-and-forget task, is logged by complete_py itself; this runs wherever
 * the last reference goes later (a handle's dealloc in any thread, the timer, the cycle
 * collector), so whatever exception is being raised there is kept aside. */
void report_unobserved(ct_task *t) {
    uint32_t st = atomic_load_explicit(&t->state, memory_order_acquire);
    uint32_t s = st & CT_STATUS_MASK;
    if ((s != CT_FAILED && s != CT_TIMED_OUT) || (st & CT_F_OBSERVED) || !t->value ||
        !PyExceptionInstance_Check((PyObject *)t->value))
        return;
    PyObject *type, *val, *tb;
    PyErr_Fetch(&type, &val, &tb);
    atomic_fetch_or_explicit(&t->state, CT_F_OBSERVED, memory_order_relaxed);   /* once */
    if (exc_intact((PyObject *)t->value, 0)) {
        /* "task_late": logged as text, the exception itself is not kept (this may run inside
         * a collection that goes on clearing it) */
        report_error("task_late", t->fn ? (PyObject *)t->fn : Py_None, (PyObject *)t->value);
    } else {
        /* (torn apart by the collector: say what is known, touch nothing of it) */
        PyObject *msg =
            PyUnicode_FromFormat("task %s-%llu failed with %s (its traceback went with a reference cycle)", py_mod.prefix,
                                 (unsigned long long)t->id, Py_TYPE((PyObject *)t->value)->tp_name);
        report_error("task", Py_None, msg);
        Py_XDECREF(msg);
        PyErr_Clear();
    }
    PyErr_Restore(type, val, tb);
}

/* The pending exception, normalised, with its traceback attached. */
PyObject *fetch_exception(void) {
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}


/* ------------------------------------------------------------------ hooks */


/* Remove id from a module dict if it is there. The last reference of a node may go while an
 * exception is being raised (a handle dropped by the frame that raises its outcome): that
 * exception is kept. */
static void forget_id(PyObject *dict, uint64_t id) {
    PyObject *type, *val, *tb;
    PyErr_Fetch(&type, &val, &tb);
    PyObject *key = PyLong_FromUnsignedLongLong(id);
    if (key && PyDict_GetItemWithError(dict, key) && PyDict_DelItem(dict, key) < 0) PyErr_Clear();
    Py_XDECREF(key);
    PyErr_Clear();
    PyErr_Restore(type, val, tb);
}

void hook_release(ct_task *t) {
    uint32_t st = atomic_load_explicit(&t->state, memory_order_relaxed);
    if (CT_UNLIKELY(PyDict_GET_SIZE(py_mod.charges) > 0)) uncharge(t);   /* queued, never ran */
    report_unobserved(t);
    if (st & CT_F_REGISTERED) {
        forget_id(py_mod.registry, t->id);
        if (CT_UNLIKELY(PyDict_GET_SIZE(py_mod.progress) > 0)) forget_id(py_mod.progress, t->id);   /* set_progress */
    }
    if (t->kind != CT_KIND_PY_C) {
        Py_CLEAR(t->fn);
        Py_CLEAR(t->arg);
    }
    Py_CLEAR(t->value);
    Py_CLEAR(t->cfg);
    /* (a task that ended took its history into arg: complete_py) */
    if (st & CT_F_HISTORY) forget_id(py_mod.history, t->id);
}

/* the thread-locals py_internal.h declares */
_Thread_local ct_worker *tl_worker;
_Thread_local EngineObject *tl_loop_engine;
_Thread_local ct_engine *tl_own_engine;


void hook_thread_start(ct_worker *w) {
    tl_worker = w;
    tl_own_engine = w->engine;
    PyGILState_Ensure();                 /* creates this thread's state, kept for its life */
    w->thread_ident = PyThread_get_thread_ident();
    w->py_state = PyEval_SaveThread();
}

void hook_thread_stop(ct_worker *w) {
    PyEval_RestoreThread((PyThreadState *)w->py_state);
    PyGILState_Release(PyGILState_UNLOCKED);
    w->py_state = NULL;
}


/* Run the callbacks list taken from a finished node (GIL held). Entries are (fn, mode):
 * mode 0 = add_callback (called with the value, on success only), 1 = done callback (called
 * with a TaskResult, whatever the outcome), 2 = a workflow Gate (gate_done). A raising callback is reported, never raised. */
void run_callbacks(EngineObject *eng, ct_task *t, PyObject *cbs, int status, PyObject *value) {
    Py_ssize_t n = PyList_GET_SIZE(cbs);
    ResultObject *handle = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *entry = PyList_GET_ITEM(cbs, i);
        PyObject *fn = PyTuple_GET_ITEM(entry, 0);
        long mode = PyLong_AsLong(PyTuple_GET_ITEM(entry, 1));
        PyObject *r = NULL;
        if (mode == 2) {   /* a workflow gate: counts down its dependents, in C */
            gate_done(fn, status);
            continue;
        }
        if (mode == 0) {
            if (status != CT_SUCCEEDED) continue;
            r = PyObject_CallOneArg(fn, value ? value : Py_None);
        } else {
            if (!handle) handle = result_wrap_tracked(eng, t);
            if (!handle) {
                PyErr_Clear();
                continue;
            }
            r = PyObject_CallOneArg(fn, (PyObject *)handle);
        }
        if (!r) {
            PyObject *exc = fetch_exception();
            report_error("callback", fn, exc);
            Py_XDECREF(exc);
        }
        Py_XDECREF(r);
    }
    Py_XDECREF(handle);
}

/* Take the callbacks out of a node that has just become final and run them (GIL held). The
 * flag goes with the list: whichever end path comes first runs them, exactly once. */
void take_callbacks(EngineObject *eng, ct_task *t, int status) {
    uint32_t st = atomic_fetch_and_explicit(&t->state, ~CT_F_CALLBACKS, memory_order_acq_rel);
    if (!(st & CT_F_CALLBACKS)) return;
    PyObject *cbs = (PyObject *)t->value;
    t->value = NULL;
    run_callbacks(eng, t, cbs, status, NULL);
    Py_DECREF(cbs);
}

/* Call a config hook (on_success / on_failure / on_retry) in the worker; a raising hook is
 * reported, never raised. */
static void call_hook(PyObject *fn, PyObject *arg) {
    if (!fn) return;
    PyObject *r = PyObject_CallOneArg(fn, arg ? arg : Py_None);
    if (!r) {
        PyObject *exc = fetch_exception();
        report_error("callback", fn, exc);
        Py_XDECREF(exc);
    }
    Py_XDECREF(r);
}

static PyObject *history_take(ct_task *t);

/* End a Python-visible node that was running on eng (GIL held): the config's final hook,
 * store the outcome, set the terminal state (waiters wake), then run callbacks, then drop the
 * engine's reference. Steals value.
 *
 * Whatever runs Python code (hooks, the failure report, freeing the arguments) comes first:
 * Python code lets other threads take the GIL, and from taking the callbacks list to the
 * terminal state no other thread may attach a callback (see attach_callback). */
void complete_py(EngineObject *eng, ct_task *t, int status, PyObject *value) {
    ConfigObject *cfg = (ConfigObject *)t->cfg;
    int failed = status == CT_FAILED || status == CT_TIMED_OUT;
    if (cfg) {
        if (status == CT_SUCCEEDED)
            call_hook(cfg->on_success, value);
        else if (failed)
            call_hook(cfg->on_failure, value);
    }
    if (eng && py_mod.hooks.failed && failed) {
        /* the monitor's recent failures (rare path: failures only) */
        PyObject *id = node_id(eng, t);
        PyObject *r = id ? PyObject_CallFunctionObjArgs(py_mod.hooks.failed, (PyObject *)eng, id, (PyObject *)t->fn,
                                                        value ? value : Py_None, NULL)
                         : NULL;
        if (!r) PyErr_Clear();
        Py_XDECREF(r);
        Py_XDECREF(id);
    }
    uint32_t base = eng ? 1 : 0;
    if (t->kind != CT_KIND_PY_C) {
        /* the call is over: its arguments need not live as long as the result */
        Py_CLEAR(t->arg);
        /* and the history of its failed attempts moves from the global dict into the node's
         * free arg slot: held by the node alone, it is collected with it (a traceback in it
         * may hold the task's own handle) */
        if (atomic_load_explicit(&t->state, memory_order_relaxed) & CT_F_HISTORY) t->arg = history_take(t);
    }
    /* From here to the terminal state: no Python code, no new container. */
    PyObject *cbs = NULL;
    uint32_t st = atomic_fetch_and_explicit(&t->state, ~CT_F_CALLBACKS, memory_order_acq_rel);
    if (st & CT_F_CALLBACKS) {
        cbs = (PyObject *)t->value;
        t->value = NULL;
    }
    /* Callbacks may submit work (a workflow step releases the next): until they ran, this
     * completion counts as running, so a drain cannot end in between. */
    if (eng && cbs) ct_engine_hold(eng->e);
    /* Someone can still look at the outcome: a handle (beyond the engine's own reference;
     * a detached node has no engine reference), or a callback. A failure is always kept: if
     * nobody reads it, it is logged when the node's last owner lets go (report_unobserved). */
    int keep = failed || atomic_load_explicit(&t->refs, memory_order_acquire) > base || cbs;
    PyObject *drop = NULL;
    if (keep) {
        t->value = value;
    } else {
        drop = value;
    }
    if (eng) {
        ct_task_finish(eng->e, t, status);
    } else {
        ct_task_settle(t, status, NULL);
    }
    if (cbs) {
        run_callbacks(eng, t, cbs, status, (PyObject *)t->value);
        Py_DECREF(cbs);
    }
    Py_XDECREF(drop);
    /* The attempt's timeout entry holds the node until the timeout would have expired: a
     * failure nobody holds must be logged (and its traceback freed) now, not then. (Failures
     * only: O(timer entries).) */
    if (eng && failed && cfg && cfg->timeout_ns > 0 && !cfg->isolation) ct_engine_sweep_watches(eng->e);
    if (eng && failed && atomic_load_explicit(&t->refs, memory_order_acquire) == 1 &&
        !(atomic_load_explicit(&t->state, memory_order_acquire) & CT_F_OBSERVED)) {
        /* nobody else holds it: nobody can read it, logged now (with the exception itself) */
        atomic_fetch_or_explicit(&t->state, CT_F_OBSERVED, memory_order_relaxed);
        report_error("task", (PyObject *)t->fn, (PyObject *)t->value);
    }
    if (eng && cbs) ct_engine_unhold(eng->e);
    if (eng) ct_task_decref(&eng->e->hooks, t);
}

_Thread_local ct_task *tl_current;
_Thread_local EngineObject *tl_current_engine;

/* ---- retries ---- */

static _Thread_local uint64_t rng_state;

static double rng_unit(void) {
    if (!rng_state) rng_state = ct_now_ns() ^ ((uint64_t)(uintptr_t)&rng_state << 17) ^ 0x9E3779B97F4A7C15ull;
    /* xorshift64*: plenty for jitter */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

/* Back-off before attempt `attempt + 1`, after `attempt` failed (1-based). */
static uint64_t backoff_ns(const ConfigObject *c, int attempt) {
    double base = (double)c->retry_base_ns, cap = (double)c->retry_max_ns, d;
    switch (c->backoff) {
    case BACKOFF_EXPONENTIAL: d = base * ldexp(1.0, attempt - 1 < 60 ? attempt - 1 : 60); break;
    case BACKOFF_LINEAR: d = base * attempt; break;
    default: d = base; break;
    }
    if (d > cap) d = cap;
    if (d > (double)CT_MAX_TIME_NS) d = (double)CT_MAX_TIME_NS;
    if (c->jitter) d *= rng_unit();
    return d > 0 ? (uint64_t)d : 0;
}

/* The history list of t out of py_mod.history (a new reference), or NULL. */
static PyObject *history_take(ct_task *t) {
    PyObject *key = PyLong_FromUnsignedLongLong(t->id);
    PyObject *lst = key ? PyDict_GetItemWithError(py_mod.history, key) : NULL;
    Py_XINCREF(lst);
    if (lst && PyDict_DelItem(py_mod.history, key) < 0) Py_CLEAR(lst);
    Py_XDECREF(key);
    PyErr_Clear();
    return lst;
}

/* Remember a failed attempt for get_stats()["history"]. */
static void record_attempt(ct_task *t, int status, PyObject *exc, uint64_t start, uint64_t end) {
    PyObject *key = PyLong_FromUnsignedLongLong(t->id);
    if (!key) goto fail;
    PyObject *lst = PyDict_GetItemWithError(py_mod.history, key);
    if (!lst) {
        if (PyErr_Occurred() || !(lst = PyList_New(0)) || PyDict_SetItem(py_mod.history, key, lst) < 0) {
            Py_XDECREF(lst);
            Py_DECREF(key);
            goto fail;
        }
        Py_DECREF(lst);   /* the dict holds it */
        atomic_fetch_or(&t->state, CT_F_HISTORY);
    }
    Py_DECREF(key);
    PyObject *st = status_member((uint32_t)status);
    PyObject *rec = Py_BuildValue("{s:i,s:N,s:O,s:d,s:d}", "attempt", (int)t->attempt, "status", st, "error",
                                  exc ? exc : Py_None, "started_at",
                                  py_mod.wall0 + ((double)start - (double)py_mod.mono0) / 1e9, "execution_time_ms",
                                  (double)(end - start) / 1e6);
    if (!rec || PyList_Append(lst, rec) < 0) {
        Py_XDECREF(rec);
        goto fail;
    }
    Py_DECREF(rec);
    return;
fail:
    PyErr_Clear();
}

/* An attempt of a task with a config ended badly (GIL held). Records it and, when the config
 * allows another attempt, reschedules the task after its back-off and returns 1 (the node is
 * then the timer's). Returns 0 when the task must end with this outcome. */
int maybe_retry(EngineObject *eng, ct_task *t, int status, PyObject *exc, uint64_t start, uint64_t end) {
    ConfigObject *c = (ConfigObject *)t->cfg;
    if (!c || !eng || status == CT_CANCELLED) return 0;
    if (c->max_retries > 0 || t->attempt > 1) record_attempt(t, status, exc, start, end);
    if ((int)t->attempt > c->max_retries) return 0;
    if (status == CT_TIMED_OUT && !c->retry_on_timeout) return 0;
    if (status == CT_FAILED) {
        PyObject *kinds = c->retry_on ? c->retry_on : PyExc_Exception;
        if (!exc || !PyErr_GivenExceptionMatches(exc, kinds)) return 0;
    }
    if (c->on_retry) {
        PyObject *n = PyLong_FromLong(t->attempt);
        call_hook(c->on_retry, n);
        Py_XDECREF(n);
    }
    return ct_engine_reschedule(eng->e, t, ct_now_ns() + backoff_ns(c, t->attempt)) == CT_OK;
}


static uint64_t run_attempt(ct_worker *w, EngineObject *eng, ct_task *t, uint64_t now);

/* Run one task of a batch (GIL held). now = the clock at its start; returns the clock at
 * its end (one clock read per task). */
uint64_t run_one(ct_worker *w, EngineObject *eng, ct_task *t, uint64_t now) {
    if (t->kind == CT_KIND_C) {
        Py_BEGIN_ALLOW_THREADS
        ct_engine_run_c(w, t);
        Py_END_ALLOW_THREADS
        return ct_now_ns();
    }
    /* run by a worker that waited for it (help_run): only dropped here */
    if (CT_UNLIKELY(atomic_load_explicit(&t->state, memory_order_acquire) & CT_F_INLINE) &&
        ct_engine_drop_claimed(eng->e, t))
        return now;
    ts_store(&t->t_start, now);
    atomic_store_explicit(&w->current_since, now, memory_order_relaxed);
    if (CT_UNLIKELY(eng->mem_cap > 0)) uncharge(t);   /* no longer queued */
    if (!ct_task_begin(t, w->id)) {
        if (ct_engine_drop_claimed(eng->e, t)) return now;   /* claimed just now */
        ts_store(&t->t_start, 0);
        complete_py(eng, t, CT_CANCELLED, NULL);  /* already cancelled: counted out, callbacks run */
        return now;
    }
    return run_attempt(w, eng, t, now);
}

/* ---- contextvars: a Python task runs in the context its add_task ran in ----
 * enqueue_node (py_engine.c) keeps a copy of the submitter's context (PyContext_CopyCurrent),
 * flagged CT_F_CONTEXT: the last item of the node's argument tuple, or the argument itself
 * when the task has no arguments. Each task has its own copy, so an attempt enters that
 * object itself (a context is entered by one thread at a time: only the thread running the
 * task does). A task that may be retried enters a fresh copy per attempt instead, so that
 * every attempt starts from the submitter's values. The context is entered for the whole
 * attempt: the call, the hand-off of an async task's coroutine to the event loop (which copies
 * the context it is called in, as asyncio does), the config's hooks, the callbacks at the end.
 * What the task sets stays in its copy. Only public C API (PyContext_*) is used. */
static PyObject *node_context(ct_task *t) {   /* borrowed */
    PyObject *a = (PyObject *)t->arg;
    return PyTuple_CheckExact(a) ? PyTuple_GET_ITEM(a, PyTuple_GET_SIZE(a) - 1) : a;
}

static uint64_t attempt_in_context(ct_worker *w, EngineObject *eng, ct_task *t, uint64_t now);

/* The task's context entered for an attempt: a new reference to the entered object, or NULL
 * (out of memory: the attempt then runs in the worker's context). Out of line, as is the
 * exit: a task without a context pays one flag test, and attempt_in_context, called once,
 * is inlined into run_attempt. */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((noinline))
#endif
static PyObject *enter_task_context(ct_task *t) {
    ConfigObject *cfg = (ConfigObject *)t->cfg;
    PyObject *ctx = node_context(t);
    /* (a reference of our own: the attempt's end may drop the node's arguments) */
    ctx = cfg && cfg->max_retries > 0 ? PyContext_Copy(ctx) : Py_NewRef(ctx);
    if (ctx && PyContext_Enter(ctx) < 0) {   /* (entered already: never expected) a copy then */
        PyErr_Clear();
        Py_SETREF(ctx, PyContext_Copy(ctx));
        if (ctx && PyContext_Enter(ctx) < 0) Py_CLEAR(ctx);
    }
    if (!ctx) PyErr_Clear();
    return ctx;
}

/* A task without a context of its own (its submitter had no variables) whose thread has one:
 * a new empty context for the attempt, so that it sees no variable an earlier task of this
 * thread set, and what it sets goes with the attempt (as for a task with a context: stays
 * its own). A thread that never used contextvars has none (PyThreadState.context NULL: see
 * enqueue_node) and pays nothing; the first task that uses them makes the thread's own, in
 * which no task runs again. The thread running a task inline (help while waiting) has the
 * copy of its waiter's context entered: the inline task starts empty too, as on a worker. */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((noinline))
#endif
static PyObject *enter_empty_context(void) {
    PyObject *ctx = PyContext_New();
    if (ctx && PyContext_Enter(ctx) < 0) Py_CLEAR(ctx);
    if (!ctx) PyErr_Clear();
    return ctx;
}

#if defined(__GNUC__) || defined(__clang__)
__attribute__((noinline))
#endif
static void leave_task_context(PyObject *ctx) {
    if (PyContext_Exit(ctx) < 0) PyErr_Clear();
    Py_DECREF(ctx);
}

/* An attempt of a task this worker has started (RUNNING for it), in the task's context: the
 * call, its outcome, the retry or the end. */
static uint64_t run_attempt(ct_worker *w, EngineObject *eng, ct_task *t, uint64_t now) {
    PyObject *ctx = NULL;
    if (CT_UNLIKELY(t->kind == CT_KIND_PY && (atomic_load_explicit(&t->state, memory_order_relaxed) & CT_F_CONTEXT)))
        ctx = enter_task_context(t);
    else if (CT_UNLIKELY(PyThreadState_Get()->context != NULL))
        ctx = enter_empty_context();
    uint64_t end = attempt_in_context(w, eng, t, now);
    if (CT_UNLIKELY(ctx != NULL)) leave_task_context(ctx);
    return end;
}

static uint64_t attempt_in_context(ct_worker *w, EngineObject *eng, ct_task *t, uint64_t now) {
    t->attempt++;
    ConfigObject *cfg = (ConfigObject *)t->cfg;
    /* (a process-isolated task's timeout is enforced by its pool, which kills the child) */
    if (cfg && cfg->timeout_ns > 0 && !cfg->isolation)
        ct_engine_watch(eng->e, t, now + (uint64_t)cfg->timeout_ns, CT_TIMER_TIMEOUT, t->attempt);
    PyObject *res;
    /* Armed: from here to the end of the call the timeout may raise TaskTimeout in it. */
    atomic_store_explicit(&w->in_call, t, memory_order_relaxed);
    if (t->kind == CT_KIND_PY_C) {
        Py_BEGIN_ALLOW_THREADS
        ((ct_c_func)t->fn)(t->arg);
        Py_END_ALLOW_THREADS
        res = Py_None;
        Py_INCREF(res);
    } else if (t->kind == CT_KIND_NATIVE) {
        tl_current = t;
        tl_current_engine = eng;
        res = run_native(t);
        tl_current = NULL;
        tl_current_engine = NULL;
    } else {
        PyObject *a = (PyObject *)t->arg, *kw = NULL;
        uint32_t flags = atomic_load_explicit(&t->state, memory_order_relaxed);
        Py_ssize_t n = 0, nkw = 0;
        /* (the context, the last item or the whole argument, was entered by run_attempt) */
        if (a && PyTuple_CheckExact(a)) n = PyTuple_GET_SIZE(a) - ((flags & CT_F_CONTEXT) != 0);
        if (flags & CT_F_KWNAMES) {
            kw = PyTuple_GET_ITEM(a, --n);
            nkw = PyTuple_GET_SIZE(kw);
        }
        tl_current = t;
        tl_current_engine = eng;
        res = PyObject_Vectorcall((PyObject *)t->fn, n ? &PyTuple_GET_ITEM(a, 0) : NULL, (size_t)(n - nkw), kw);
        tl_current = NULL;
        tl_current_engine = NULL;
    }
    /* Disarmed before any other Python code runs on this thread (hooks, callbacks, the next
     * task): the GIL is held from the call's return to here, and the timer injects only into
     * a call in progress (hook_on_timer, under the GIL too). */
    atomic_store_explicit(&w->in_call, NULL, memory_order_relaxed);
    uint64_t end = ct_now_ns();
    ts_store(&t->t_end, end);
    atomic_fetch_add_explicit(&w->processed, 1, memory_order_relaxed);
    ct_hist_record_owner(&w->wait_hist, now - t->t_enqueue);
    if (!(res && PyCoro_CheckExact(res))) {   /* an async task's time is recorded when it ends */
        ct_hist_record_owner(&w->exec_hist, end - now);
        ct_rate_record_owner(&w->rate, end);
    }
    int status = CT_SUCCEEDED;
    PyObject *out = res;
    if (atomic_load_explicit(&t->state, memory_order_acquire) & CT_F_TIMEDOUT) {
        /* Our timeout fired during this call. If the TaskTimeout we injected has not been
         * raised yet (the task was in C code and returned), it must not go off later in
         * someone else's code: the pending exception never outlives the call. */
        PyThreadState_SetAsyncExc(w->thread_ident, NULL);
        if (!res) {
            out = fetch_exception();
            if (out && PyErr_GivenExceptionMatches(out, py_mod.hooks.task_timeout)) {
                register_id(eng, t);   /* the message carries the id */
                PyObject *msg = PyUnicode_FromFormat("task %s-%llu ran longer than timeout_ms=%lld", py_mod.prefix,
                                                     (unsigned long long)t->id,
                                                     (long long)(cfg ? cfg->timeout_ns / 1000000 : 0));
                if (msg) {
                    PyObject *argst = PyTuple_Pack(1, msg);
                    if (argst) PyObject_SetAttrString(out, "args", argst);
                    Py_XDECREF(argst);
                    Py_DECREF(msg);
                }
                PyErr_Clear();
                status = CT_TIMED_OUT;
            } else {
                status = CT_FAILED;
            }
        }
    } else if (!res) {
        out = fetch_exception();
        status = CT_FAILED;
        if (cfg && cfg->isolation && out) {  /* its pool killed the child: the timeout, or cancel() */
            if (PyErr_GivenExceptionMatches(out, py_mod.hooks.task_timeout)) status = CT_TIMED_OUT;
            else if (PyErr_GivenExceptionMatches(out, py_mod.task_cancelled)) status = CT_CANCELLED;
        }
    }
    if (status != CT_SUCCEEDED) {
        if (maybe_retry(eng, t, status, out, now, end)) {
            Py_XDECREF(out);
            return end;
        }
        complete_py(eng, t, status, out);
        return end;
    }
    if (PyCoro_CheckExact(res) && py_mod.hooks.run_coroutine) {
        /* An async task: its coroutine runs on the engine's event loop; the loop settles
         * the node (TaskResult._settle), which ends it like any other. */
        atomic_fetch_or_explicit(&t->state, CT_F_ASYNC, memory_order_acq_rel);
        ResultObject *h = result_wrap_tracked(eng, t);
        PyObject *r =
            h ? PyObject_CallFunctionObjArgs(py_mod.hooks.run_coroutine, (PyObject *)eng, (PyObject *)h, res, NULL) : NULL;
        Py_XDECREF(h);
        if (!r) {
            atomic_fetch_and_explicit(&t->state, ~CT_F_ASYNC, memory_order_acq_rel);
            PyObject *exc = fetch_exception();
            PyObject *close = PyObject_CallMethod(res, "close", NULL);
            if (!close) PyErr_Clear();
            Py_XDECREF(close);
            Py_DECREF(res);
            complete_py(eng, t, CT_FAILED, exc);
            return ct_now_ns();
        }
        Py_DECREF(r);
        Py_DECREF(res);
        return ct_now_ns();
    }
    complete_py(eng, t, CT_SUCCEEDED, res);
    return end;
}


#define CT_URGENT_MAX 16

void hook_run_batch(ct_worker *w) {
    EngineObject *eng = (EngineObject *)w->engine->hooks.ctx;
    ct_task *t;
    int have_gil = 0;
    uint64_t now = 0, t0 = 0;
    size_t ran = 0;
    if (w->batch_has_py) {
        /* Take the GIL before taking a task: a task waits for the GIL inside the batch,
         * where a worker that holds the GIL can still see it and run it if it is urgent
         * (ct_engine_grab_urgent), not in this thread's hands. */
        uint64_t g0 = ct_now_ns();
        PyEval_RestoreThread((PyThreadState *)w->py_state);
        have_gil = 1;
        now = t0 = ct_now_ns();
        atomic_fetch_add_explicit(&w->gil_wait_ns, now - g0, memory_order_relaxed);
    }
    int first = 1;
    while ((t = ct_worker_take(w))) {
        if (first) ct_worker_begin_batch(w, have_gil ? now : ct_now_ns());
        first = 0;
        /* C tasks before any Python one run without taking the GIL at all */
        if (t->kind == CT_KIND_C && !have_gil) {
            ct_engine_run_c(w, t);
            continue;
        }
        if (!have_gil) {
            uint64_t g0 = ct_now_ns();
            PyEval_RestoreThread((PyThreadState *)w->py_state);
            have_gil = 1;
            now = t0 = ct_now_ns();
            atomic_fetch_add_explicit(&w->gil_wait_ns, now - g0, memory_order_relaxed);
        }
        /* Something more urgent arrived while this batch runs: run it first, now, under the
         * GIL we already hold. This keeps CRITICAL waits at one task's length. */
        if (t->priority > 0 && ct_engine_has_urgent(w->engine, t->priority)) {
            ct_task *urgent[CT_BATCH_HARD_MAX];
            size_t m = ct_engine_pop_urgent(w->engine, t->priority, urgent, CT_URGENT_MAX);
            /* or it sits in the batch of a sibling that waits for the GIL we hold: take it */
            if (!m) m = ct_engine_grab_urgent(w->engine, w, t->priority, urgent);
            for (size_t j = 0; j < m; j++) now = run_one(w, eng, urgent[j], now);
            ran += m;
        }
        now = run_one(w, eng, t, now);
        ran++;
    }
    if (have_gil) {
        ct_engine_note_exec(w->engine, now - t0, ran);
        w->py_state = PyEval_SaveThread();
    }
}

/* Help while waiting: a worker about to wait for a task of its own engine that nobody has
 * started yet runs it itself, now, on this thread (ct_engine_claim takes it out of its queue or
 * batch atomically; the worker that pops it later only drops it), as a popper would: its
 * priority's place is skipped, its stats, callbacks, timeout and outcome are the same. So a
 * chain of tasks waiting on tasks needs no thread per link. Not when the running task has a
 * timeout_ms (its wait must stay interruptible), when more urgent work waits, when the waited task may retry (a retry
 * queues the node again, which may still sit in a queue), when the engine is paused, or past
 * HELP_MAX_DEPTH nested runs (the C stack): the wait then gets a stand-in worker. */
#define HELP_MAX_DEPTH 48

/* Python frames this thread has open (the recursion budget it has used). A task run inline sits
 * on its waiter's frames: only a shallow waiter runs one, so it keeps nearly all of a worker's. */
static int recursion_used(void) {
    PyThreadState *ts = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030C0000
    return ts->py_recursion_limit - ts->py_recursion_remaining;
#else
    return ts->recursion_limit - ts->recursion_remaining;
#endif
}
static _Thread_local int tl_help_depth;
void help_run(EngineObject *eng, ct_task *t) {
    ct_worker *w = tl_worker;
    if (!eng || w->engine != eng->e || t == tl_current || tl_help_depth >= HELP_MAX_DEPTH) return;
    if (t->kind != CT_KIND_PY && t->kind != CT_KIND_NATIVE && t->kind != CT_KIND_PY_C) return;
    ConfigObject *c = (ConfigObject *)t->cfg, *mc = tl_current ? (ConfigObject *)tl_current->cfg : NULL;
    if ((c && c->max_retries > 0) || (mc && mc->timeout_ns > 0) || atomic_load(&eng->e->paused)) return;
    if (recursion_used() > Py_GetRecursionLimit() / 8) return;   /* its budget: nearly a worker's */
    /* Not ahead of more urgent queued work (a stand-in pops that first): the wait runs at the
     * priority of the task or of its waiter, whichever is more urgent. */
    int prio = t->priority, mine = tl_current ? tl_current->priority : CT_NPRIO;
    if (mine < prio) prio = mine;
    if (prio > 0 && ct_engine_has_urgent(eng->e, prio)) return;
    if (ct_task_status(t) != CT_PENDING) return;
    /* entered around it: a copy of this thread's context, so that nothing it does changes its
     * waiter's values under it (run_attempt then enters the task's own context, or a new empty
     * one for a task without: it sees none of its waiter's values, as on another worker). The
     * copy gives the thread a context if it had none: its later tasks without one each get the
     * empty context (enter_empty_context) */
    PyObject *ctx = PyContext_CopyCurrent();
    if (!ctx) {
        PyErr_Clear();
        return;
    }
    if (!ct_engine_claim(eng->e, t, w->id)) {   /* (counted running; its queue room given back) */
        Py_DECREF(ctx);
        return;
    }
    /* this thread's task (its call is suspended in this wait) is put back afterwards */
    ct_task *cur = tl_current, *in_call = atomic_load_explicit(&w->in_call, memory_order_relaxed);
    EngineObject *cur_eng = tl_current_engine;
    uint64_t since = atomic_load_explicit(&w->current_since, memory_order_relaxed), now = ct_now_ns();
    ct_task_incref(t);          /* dropped by its end, as a popper's */
    ts_store(&t->t_start, now);
    atomic_store_explicit(&w->current_since, now, memory_order_relaxed);
    if (CT_UNLIKELY(eng->mem_cap > 0)) uncharge(t);
    /* it starts as on a worker: no exception being handled (the waiter may wait in an except
     * block; the task would see it in sys.exc_info() and chain it to its own) */
    PyObject *handled = PyErr_GetHandledException();
    PyErr_SetHandledException(NULL);
    int entered = PyContext_Enter(ctx) == 0;
    if (!entered) PyErr_Clear();
    tl_help_depth++;
    run_attempt(w, eng, t, now);
    tl_help_depth--;
    if (entered && PyContext_Exit(ctx) < 0) PyErr_Clear();
    Py_DECREF(ctx);
    PyErr_SetHandledException(handled);
    Py_XDECREF(handled);
    tl_current = cur;
    tl_current_engine = cur_eng;
    atomic_store_explicit(&w->in_call, in_call, memory_order_relaxed);
    atomic_store_explicit(&w->current_since, since, memory_order_relaxed);
}

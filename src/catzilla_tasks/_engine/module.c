/* module.c - Python bindings of the engine: catzilla_tasks._engine.
 *
 * Types:
 *   Engine      the C engine behind BackgroundTasks (engine.py subclasses it). add_task is
 *               a METH_FASTCALL method: no Python frame between the caller and the queue.
 *   TaskResult  a thin handle on a task node (one reference on the node, one on the engine).
 *   ConfigBase  the C half of TaskConfig: the fields the hot path reads without attribute
 *               lookups.
 *
 * Reference ownership of a queued Python task's node:
 *   fn      the callable (strong)
 *   arg     a tuple of positional values followed by keyword values, or NULL (strong);
 *           with CT_F_KWNAMES its last item is the tuple of keyword names (vectorcall's
 *           kwnames; usually the caller's constant tuple, so a keyword call costs no dict and
 *           the node no field)
 *   value   before the end: a list of callbacks, or NULL; after: the result or the
 *           exception, kept only while someone can look at it (strong)
 *   cfg     the TaskConfig when it changes how the task runs, or NULL (strong)
 * All are dropped by hook_release, with the GIL, when the last reference goes.
 *
 * GIL rules: a worker takes the GIL once per batch (hook_run_batch) with the thread state it
 * created when it started, and never waits for a core lock while holding it (the core locks
 * are all short and never held while taking the GIL). Blocking calls from Python (wait, join,
 * shutdown, a blocking add on a full engine) release the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <pthread.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#ifdef __linux__
#include <sys/random.h>
#endif
#include <sys/time.h>
#include <unistd.h>

#include "catzilla_tasks.h"
#include "ct_engine.h"

#include <math.h>

/* ------------------------------------------------------------------ globals */

static PyObject *g_status_members;    /* tuple: TaskStatus by code */
static PyObject *g_priority_members;  /* tuple: TaskPriority by value */
static PyObject *g_run_coroutine;     /* f(engine, handle, coroutine) */
static PyObject *g_report_error;      /* f(what: str, subject, exc) */
static PyObject *g_await_impl;        /* f(handle) -> iterator */
static PyObject *g_cancel_async;      /* f(engine, handle): cancel the coroutine of an async task */
static PyObject *g_task_timeout;      /* catzilla_tasks.errors.TaskTimeout */
static PyObject *g_history;           /* {id: [attempt dicts]} of tasks with failed attempts */
static PyObject *g_isolate;           /* f(engine, func, args, kwargs, config) -> callable run in a child */
static PyObject *g_failed;            /* f(engine, task_id, func, exc): a task ended FAILED or TIMED_OUT */
/* {id: [node address, engine address, handle address or 0]} of tasks whose id was read. The
 * handle is the task's shared handle: TaskResult(task_id) and every other handle the engine
 * hands out for that task is that object while it lives (a borrowed address, cleared by its
 * dealloc), so they all share one node reference: a cycle through the task then holds one
 * handle, which the cycle collector can see through (node_is_ours). */
static PyObject *g_registry;
static PyObject *g_config_attr;       /* "__catzilla_task__" */
static PyObject *g_native_prepare;    /* f(native, args, kwargs, func) -> (call block, args) | None (compiler.py) */
static PyObject *g_native_reason;     /* f(func, ran_native) -> why the task ran as Python, or None */
static PyObject *g_charges;           /* {node address: (engine address, bytes)}: queued tasks of engines
                                       * with a memory cap, and the bytes their arguments hold */
static PyObject *g_getsizeof;         /* sys.getsizeof */
static PyObject *QueueFullError, *TaskCancelledError;
static char g_prefix[16];
static uint64_t g_mono0;
static double g_wall0;

typedef struct EngineObject EngineObject;

typedef struct {
    PyObject_HEAD
    ct_task *t;
    EngineObject *engine;   /* NULL for detached nodes */
} ResultObject;

struct EngineObject {
    PyObject_HEAD
    ct_engine *e;
    int started;
    int stopped;            /* workers joined */
    int holds_self;         /* a strong reference to self while workers run */
    int64_t mem_cap;        /* memory_pool_mb in bytes: bound on arg_bytes (0 = none) */
    int64_t arg_bytes;      /* bytes of the arguments of its queued tasks (GIL), while mem_cap */
    _Atomic int closing;    /* ENGINE_OPEN, ENGINE_OUTSIDE_CLOSED (shutdown drains: see
                             * closed_to_caller) or ENGINE_FORKED (this process is a fork) */
};
enum { ENGINE_OPEN = 0, ENGINE_OUTSIDE_CLOSED = 1, ENGINE_FORKED = 2 };

enum { BACKOFF_EXPONENTIAL = 0, BACKOFF_LINEAR = 1, BACKOFF_FIXED = 2 };

typedef struct {
    PyObject_HEAD
    int priority;
    int max_retries;
    int backoff;
    int jitter;              /* full jitter: a uniform draw in [0, delay) */
    int retry_on_timeout;
    int isolation;           /* 1: run in the engine's process pool (engine.py) */
    int64_t delay_ns;
    int64_t timeout_ns;      /* 0 = none */
    int64_t retry_base_ns, retry_max_ns;
    PyObject *retry_on;      /* exception class or tuple of them; NULL = any Exception */
    PyObject *on_success, *on_failure, *on_retry;
    PyObject *native;        /* compiler.NativeTask of a task compiled to native code, or NULL/None */
} ConfigObject;

static PyTypeObject Engine_Type, Result_Type, Config_Type;

static inline uint64_t ts_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void ts_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static void new_prefix(void) {
    uint32_t r = 0;
#ifdef __linux__
    if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) r = (uint32_t)(getpid() * 2654435761u ^ ct_now_ns());
#else
    r = arc4random(); /* macOS and the BSDs */
#endif
    snprintf(g_prefix, sizeof g_prefix, "%08x", r);
}

static PyObject *format_id(uint64_t id) { return PyUnicode_FromFormat("%s-%llu", g_prefix, (unsigned long long)id); }

/* The registry entry of a registered node (borrowed), or NULL (no error set). */
static PyObject *registry_entry(ct_task *t) {
    if (!(atomic_load_explicit(&t->state, memory_order_relaxed) & CT_F_REGISTERED)) return NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(t->id);
    PyObject *entry = key ? PyDict_GetItemWithError(g_registry, key) : NULL;
    Py_XDECREF(key);
    if (!entry || !PyList_CheckExact(entry) || PyList_GET_SIZE(entry) != 3) {
        PyErr_Clear();
        return NULL;
    }
    return entry;
}

/* Make a node findable by TaskResult(task_id) while it lives (hook_release forgets it). Done
 * wherever its id leaves the engine (task_id, get_stats(), repr, error messages, the failures
 * list), so an id copied from any of them finds the task; tasks whose id nobody sees pay
 * nothing. handle, if not NULL, becomes the task's shared handle unless a live one exists
 * (see g_registry). GIL held. Best effort: a failure to register leaves no exception set. */
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
    int rc = key && val ? PyDict_SetItem(g_registry, key, val) : -1;
    Py_XDECREF(key);
    Py_XDECREF(val);
    if (rc < 0) {
        PyErr_Clear();
        return;
    }
    atomic_fetch_or(&t->state, CT_F_REGISTERED);
}

static void register_id(EngineObject *eng, ct_task *t) { register_id_as(eng, t, NULL); }

/* The id of a node as users see it (registered: see register_id). */
static PyObject *node_id(EngineObject *eng, ct_task *t) {
    register_id(eng, t);
    return format_id(t->id);
}

static PyObject *status_member(uint32_t code) {
    if (g_status_members && PyTuple_Check(g_status_members) && code < (uint32_t)PyTuple_GET_SIZE(g_status_members)) {
        PyObject *m = PyTuple_GET_ITEM(g_status_members, code);
        Py_INCREF(m);
        return m;
    }
    return PyLong_FromUnsignedLong(code);
}

static PyObject *priority_member(int p) {
    if (g_priority_members && PyTuple_Check(g_priority_members) && p < PyTuple_GET_SIZE(g_priority_members)) {
        PyObject *m = PyTuple_GET_ITEM(g_priority_members, p);
        Py_INCREF(m);
        return m;
    }
    return PyLong_FromLong(p);
}

/* Call the error reporter (logging in engine.py); never lets an exception escape. */
static void report_error(const char *what, PyObject *subject, PyObject *exc) {
    if (!g_report_error) return;
    PyObject *r = PyObject_CallFunction(g_report_error, "sOO", what, subject ? subject : Py_None, exc ? exc : Py_None);
    if (!r) PyErr_WriteUnraisable(g_report_error);
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
static void report_unobserved(ct_task *t) {
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
        PyObject *msg = PyUnicode_FromFormat("task %s-%llu failed with %s (its traceback went with a reference cycle)",
                                             g_prefix, (unsigned long long)t->id, Py_TYPE((PyObject *)t->value)->tp_name);
        report_error("task", Py_None, msg);
        Py_XDECREF(msg);
        PyErr_Clear();
    }
    PyErr_Restore(type, val, tb);
}

/* The pending exception, normalised, with its traceback attached. */
static PyObject *fetch_exception(void) {
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

static void uncharge(ct_task *t);

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

static void hook_release(ct_task *t) {
    uint32_t st = atomic_load_explicit(&t->state, memory_order_relaxed);
    if (CT_UNLIKELY(PyDict_GET_SIZE(g_charges) > 0)) uncharge(t);   /* queued, never ran */
    report_unobserved(t);
    if (st & CT_F_REGISTERED) forget_id(g_registry, t->id);
    if (t->kind != CT_KIND_PY_C) {
        Py_CLEAR(t->fn);
        Py_CLEAR(t->arg);
    }
    Py_CLEAR(t->value);
    Py_CLEAR(t->cfg);
    /* (a task that ended took its history into arg: complete_py) */
    if (st & CT_F_HISTORY) forget_id(g_history, t->id);
}

/* The worker this thread is (NULL on other threads), and the engine whose event-loop thread
 * this is (engine.py's _LoopRunner says so): a wait() there must not block as elsewhere. */
static _Thread_local ct_worker *tl_worker;
static _Thread_local EngineObject *tl_loop_engine;
/* The engine whose thread this is: a worker, the hook (timer) thread or the event-loop thread.
 * Work submitted there comes from work in flight. */
static _Thread_local ct_engine *tl_own_engine;

/* While shutdown(wait_for_completion=True) drains, work from outside is refused but work that
 * in-flight tasks create (a task adding a task, a finished step releasing the next, a
 * coroutine's follow-up: all on the engine's own threads) is accepted, so it finishes too. */
static inline int closed_to_caller(EngineObject *self) {
    int c = atomic_load_explicit(&self->closing, memory_order_relaxed);
    return CT_UNLIKELY(c != ENGINE_OPEN) && (c == ENGINE_FORKED || tl_own_engine != self->e);
}

static inline int engine_forked(EngineObject *self) {
    return self && atomic_load_explicit(&self->closing, memory_order_relaxed) == ENGINE_FORKED;
}

/* An engine belongs to the process that made it: after fork() its threads exist only in the
 * parent (engine.py marks every engine so in the child, _forget_after_fork). */
static PyObject *forked_error(void) {
    PyErr_Format(PyExc_RuntimeError,
                 "this BackgroundTasks engine was created before this process was forked (pid %ld is the "
                 "child): its worker threads exist only in the parent, which runs the tasks queued there. "
                 "Create a new BackgroundTasks in the child",
                 (long)getpid());
    return NULL;
}

/* The error of a refused submission (closed_to_caller). */
static PyObject *refused(EngineObject *self) {
    if (engine_forked(self)) return forked_error();
    PyErr_SetString(PyExc_RuntimeError,
                    "cannot add a task: this BackgroundTasks engine has been shut down; create a new one");
    return NULL;
}

/* A forked child must not hand out ids its parent also hands out, and the thread that forked
 * is no worker (nor loop thread) of any engine here. */
static void atfork_child(void) {
    new_prefix();
    tl_worker = NULL;
    tl_loop_engine = NULL;
    tl_own_engine = NULL;
}

static void hook_thread_start(ct_worker *w) {
    tl_worker = w;
    tl_own_engine = w->engine;
    PyGILState_Ensure();                 /* creates this thread's state, kept for its life */
    w->thread_ident = PyThread_get_thread_ident();
    w->py_state = PyEval_SaveThread();
}

static void hook_thread_stop(ct_worker *w) {
    PyEval_RestoreThread((PyThreadState *)w->py_state);
    PyGILState_Release(PyGILState_UNLOCKED);
    w->py_state = NULL;
}

static ResultObject *result_wrap(EngineObject *eng, ct_task *t);
static ResultObject *result_wrap_tracked(EngineObject *eng, ct_task *t);
static void gate_done(PyObject *gate, int status);

/* Run the callbacks list taken from a finished node (GIL held). Entries are (fn, mode):
 * mode 0 = add_callback (called with the value, on success only), 1 = done callback (called
 * with a TaskResult, whatever the outcome), 2 = a workflow Gate (gate_done). A raising callback is reported, never raised. */
static void run_callbacks(EngineObject *eng, ct_task *t, PyObject *cbs, int status, PyObject *value) {
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
static void take_callbacks(EngineObject *eng, ct_task *t, int status) {
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
static void complete_py(EngineObject *eng, ct_task *t, int status, PyObject *value) {
    ConfigObject *cfg = (ConfigObject *)t->cfg;
    int failed = status == CT_FAILED || status == CT_TIMED_OUT;
    if (cfg) {
        if (status == CT_SUCCEEDED)
            call_hook(cfg->on_success, value);
        else if (failed)
            call_hook(cfg->on_failure, value);
    }
    if (eng && g_failed && failed) {
        /* the monitor's recent failures (rare path: failures only) */
        PyObject *id = node_id(eng, t);
        PyObject *r = id ? PyObject_CallFunctionObjArgs(g_failed, (PyObject *)eng, id, (PyObject *)t->fn,
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

/* The task this thread is running (catzilla_tasks.current_task()). */
static _Thread_local ct_task *tl_current;
static _Thread_local EngineObject *tl_current_engine;

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

/* The history list of t out of g_history (a new reference), or NULL. */
static PyObject *history_take(ct_task *t) {
    PyObject *key = PyLong_FromUnsignedLongLong(t->id);
    PyObject *lst = key ? PyDict_GetItemWithError(g_history, key) : NULL;
    Py_XINCREF(lst);
    if (lst && PyDict_DelItem(g_history, key) < 0) Py_CLEAR(lst);
    Py_XDECREF(key);
    PyErr_Clear();
    return lst;
}

/* Remember a failed attempt for get_stats()["history"]. */
static void record_attempt(ct_task *t, int status, PyObject *exc, uint64_t start, uint64_t end) {
    PyObject *key = PyLong_FromUnsignedLongLong(t->id);
    if (!key) goto fail;
    PyObject *lst = PyDict_GetItemWithError(g_history, key);
    if (!lst) {
        if (PyErr_Occurred() || !(lst = PyList_New(0)) || PyDict_SetItem(g_history, key, lst) < 0) {
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
                                  g_wall0 + ((double)start - (double)g_mono0) / 1e9, "execution_time_ms",
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
static int maybe_retry(EngineObject *eng, ct_task *t, int status, PyObject *exc, uint64_t start, uint64_t end) {
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
static PyObject *run_native(ct_task *t) {
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

static uint64_t run_attempt(ct_worker *w, EngineObject *eng, ct_task *t, uint64_t now);

/* Run one task of a batch (GIL held). now = the clock at its start; returns the clock at
 * its end (one clock read per task). */
static uint64_t run_one(ct_worker *w, EngineObject *eng, ct_task *t, uint64_t now) {
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

/* An attempt of a task this worker has started (RUNNING for it): the call, its outcome, the
 * retry or the end. */
static uint64_t run_attempt(ct_worker *w, EngineObject *eng, ct_task *t, uint64_t now) {
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
        Py_ssize_t n = a ? PyTuple_GET_SIZE(a) : 0, nkw = 0;
        if (atomic_load_explicit(&t->state, memory_order_relaxed) & CT_F_KWNAMES) {
            kw = PyTuple_GET_ITEM(a, --n);
            nkw = PyTuple_GET_SIZE(kw);
        }
        tl_current = t;
        tl_current_engine = eng;
        res = PyObject_Vectorcall((PyObject *)t->fn, a ? &PyTuple_GET_ITEM(a, 0) : NULL, (size_t)(n - nkw), kw);
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
            if (out && PyErr_GivenExceptionMatches(out, g_task_timeout)) {
                register_id(eng, t);   /* the message carries the id */
                PyObject *msg = PyUnicode_FromFormat("task %s-%llu ran longer than timeout_ms=%lld", g_prefix,
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
            if (PyErr_GivenExceptionMatches(out, g_task_timeout)) status = CT_TIMED_OUT;
            else if (PyErr_GivenExceptionMatches(out, TaskCancelledError)) status = CT_CANCELLED;
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
    if (PyCoro_CheckExact(res) && g_run_coroutine) {
        /* An async task: its coroutine runs on the engine's event loop; the loop settles
         * the node (TaskResult._settle), which ends it like any other. */
        atomic_fetch_or_explicit(&t->state, CT_F_ASYNC, memory_order_acq_rel);
        ResultObject *h = result_wrap_tracked(eng, t);
        PyObject *r = h ? PyObject_CallFunctionObjArgs(g_run_coroutine, (PyObject *)eng, (PyObject *)h, res, NULL) : NULL;
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

/* ---- the timer thread's Python side ---- */

static void hook_timer_thread_start(ct_engine *e) {
    tl_own_engine = e;
    PyGILState_Ensure();
    e->timer_py_state = PyEval_SaveThread();
}

static void hook_timer_thread_stop(ct_engine *e) {
    PyEval_RestoreThread((PyThreadState *)e->timer_py_state);
    PyGILState_Release(PyGILState_UNLOCKED);
    e->timer_py_state = NULL;
}

/* Is the call of t's attempt running now on the worker of state word st? (GIL held) */
static int attempt_in_call(ct_engine *e, ct_task *t, uint32_t st) {
    uint32_t wid = st >> CT_WORKER_SHIFT;
    return wid && atomic_load_explicit(&e->workers[wid - 1].in_call, memory_order_relaxed) == t;
}

/* A timeout or stuck-check is due for (task, attempt token). */
static void hook_on_timer(ct_engine *e, ct_timer_entry *en) {
    PyEval_RestoreThread((PyThreadState *)e->timer_py_state);
    EngineObject *eng = (EngineObject *)e->hooks.ctx;
    ct_task *t = en->task;
    uint32_t st = atomic_load_explicit(&t->state, memory_order_acquire);
    if (en->kind == CT_TIMER_CALL) {
        /* a short callable (periodic tick): runs here, on the timer thread */
        PyObject *r = PyObject_CallNoArgs((PyObject *)t->fn);
        if (!r) {
            PyObject *exc = fetch_exception();
            report_error("callback", (PyObject *)t->fn, exc);
            Py_XDECREF(exc);
        }
        Py_XDECREF(r);
    } else if ((st & CT_STATUS_MASK) == CT_RUNNING && t->attempt == en->token &&
               ((st & CT_F_ASYNC) || attempt_in_call(e, t, st))) {
        /* Under the GIL: a Python attempt cannot end (its end needs the GIL) while we look.
         * A sync attempt whose call has returned is out of the timeout's reach: its hooks
         * (on_success, on_failure, on_retry) and callbacks run with no time limit. */
        uint32_t wid = st >> CT_WORKER_SHIFT;
        ConfigObject *cfg = (ConfigObject *)t->cfg;
        if (en->kind == CT_TIMER_TIMEOUT) {
            if (atomic_fetch_or(&t->state, CT_F_TIMEDOUT) & CT_F_TIMEDOUT) {
                /* its own wait() for a task already raised its TaskTimeout (wait_node_in_worker) */
            } else if (st & CT_F_ASYNC) {
                ResultObject *h = result_wrap(eng, t);
                PyObject *r = h && g_cancel_async
                                  ? PyObject_CallFunctionObjArgs(g_cancel_async, (PyObject *)eng, (PyObject *)h, NULL)
                                  : NULL;
                if (!r) PyErr_Clear();
                Py_XDECREF(r);
                Py_XDECREF(h);
            } else if (wid && g_task_timeout) {
                /* Raised in the task at its next Python instruction. A task inside C code
                 * (a blocking call) sees it only when the call returns: the STUCK check. */
                PyThreadState_SetAsyncExc(e->workers[wid - 1].thread_ident, g_task_timeout);
                uint64_t grace = cfg && cfg->timeout_ns > 100000000 ? (uint64_t)cfg->timeout_ns : 100000000ull;
                if (grace > 5000000000ull) grace = 5000000000ull;
                ct_engine_watch(e, t, ct_now_ns() + grace, CT_TIMER_STUCK, en->token);
            }
        } else if (en->kind == CT_TIMER_STUCK && wid) {
            ct_worker *w = &e->workers[wid - 1];
            if (!atomic_exchange(&w->retire, 1)) {
                atomic_fetch_add_explicit(&e->replaced, 1, memory_order_relaxed);
                int added;
                Py_BEGIN_ALLOW_THREADS   /* it may join a thread that left: not under the GIL */
                added = ct_engine_add_worker(e) == CT_OK;
                Py_END_ALLOW_THREADS
                register_id(eng, t);   /* the message carries the id */
                PyObject *msg = PyUnicode_FromFormat(
                    "task %s-%llu is past its timeout and cannot be interrupted (it is inside C code); it is left "
                    "to finish, and worker %d is %s",
                    g_prefix, (unsigned long long)t->id, w->id,
                    added ? "replaced by a new worker meanwhile" : "NOT replaced (no room for more threads)");
                report_error("stuck", (PyObject *)t->fn, msg);
                Py_XDECREF(msg);
            }
        }
    }
    ct_task_decref(&e->hooks, t);
    e->timer_py_state = PyEval_SaveThread();
}

/* A popped task cancelled before it started (ct_engine_cancel_queued). */
static void hook_skip(ct_engine *e, ct_task *t) {
    EngineObject *eng = (EngineObject *)e->hooks.ctx;
    if (CT_UNLIKELY(eng->mem_cap > 0)) uncharge(t);   /* no longer queued (a handle may keep the node) */
    complete_py(eng, t, CT_CANCELLED, NULL);
}

/* Entries left in the timer when the engine stops (called with no GIL held). A delayed task
 * that never became due ends CANCELLED here: its callbacks learn of it. */
static void hook_drop_entry(ct_engine *e, ct_timer_entry *en) {
    PyGILState_STATE g = PyGILState_Ensure();
    if (CT_UNLIKELY(((EngineObject *)e->hooks.ctx)->mem_cap > 0)) uncharge(en->task);   /* never queued now */
    if (en->kind == CT_TIMER_READY && ct_task_status(en->task) == CT_CANCELLED)
        take_callbacks((EngineObject *)e->hooks.ctx, en->task, CT_CANCELLED);
    ct_task_decref(&e->hooks, en->task);
    PyGILState_Release(g);
}

#define CT_URGENT_MAX 16

static void hook_run_batch(ct_worker *w) {
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

/* ------------------------------------------------------------------ TaskResult */

static ResultObject *result_wrap(EngineObject *eng, ct_task *t) {
    PyObject *entry = registry_entry(t);
    if (entry) {   /* the task's shared handle, if it lives */
        ResultObject *shared = (ResultObject *)PyLong_AsVoidPtr(PyList_GET_ITEM(entry, 2));
        if (shared) return (ResultObject *)Py_NewRef((PyObject *)shared);
        PyErr_Clear();
    }
    ResultObject *r = PyObject_GC_New(ResultObject, &Result_Type);
    if (!r) return NULL;
    ct_task_incref(t);
    r->t = t;
    r->engine = eng;
    Py_XINCREF(eng);
    return r;   /* not tracked by the cycle collector until it can be part of a cycle */
}

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
static ResultObject *result_wrap_tracked(EngineObject *eng, ct_task *t) {
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

/* Last reference of a detached node (no engine): the same clean-up as an engine's. */
static ct_hooks detached_hooks = {.release = hook_release};

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

static int parse_timeout(PyObject *timeout, uint64_t *deadline, const char *fname) {
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
    if (over && g_task_timeout) {
        /* as the timer would have: this attempt timed out (the timer, when it fires, sees the
         * flag and injects nothing; what it injected if it came first is withdrawn) */
        atomic_fetch_or(&me->state, CT_F_TIMEDOUT);
        PyThreadState_SetAsyncExc(tl_worker->thread_ident, NULL);
        PyErr_SetNone(g_task_timeout);
        return -1;
    }
    return 1;
}

/* A time option in ms (TaskConfig) to ns. NaN and negative values are refused. Past
 * CT_MAX_TIME_NS (infinity included): a limit (limit=1) becomes -1, "no limit"; a delay is
 * refused, since a task that never runs would only hold its room in the queue. */
static int ms_option(double ms, const char *field, int limit, int64_t *out) {
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
static int wait_node(ct_task *t, uint64_t deadline) {
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
            PyErr_Format(TaskCancelledError, "task %U was cancelled while it ran", id);
        else if (t->attempt > 0)
            PyErr_Format(TaskCancelledError, "task %U was cancelled after attempt %d, before its retry", id,
                         (int)t->attempt);
        else
            PyErr_Format(TaskCancelledError, "task %U was cancelled before it ran", id);
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

/* Help while waiting: a worker about to wait for a task of its own engine that nobody has
 * started yet runs it itself, now, on this thread (ct_task_claim takes it out of its queue or
 * batch atomically; the worker that pops it later only drops it), as a popper would: its
 * priority's place is skipped, its stats, callbacks, timeout and outcome are the same. So a
 * chain of tasks waiting on tasks needs no thread per link. Not when the running task has a
 * timeout_ms (its wait must stay interruptible), when the waited task may retry (a retry
 * queues the node again, which may still sit in a queue), when the engine is paused, or past
 * HELP_MAX_DEPTH nested runs (the C stack): the wait then gets a stand-in worker. */
#define HELP_MAX_DEPTH 48
static _Thread_local int tl_help_depth;
static void help_run(EngineObject *eng, ct_task *t) {
    ct_worker *w = tl_worker;
    if (!eng || w->engine != eng->e || t == tl_current || tl_help_depth >= HELP_MAX_DEPTH) return;
    if (t->kind != CT_KIND_PY && t->kind != CT_KIND_NATIVE && t->kind != CT_KIND_PY_C) return;
    ConfigObject *c = (ConfigObject *)t->cfg, *mc = tl_current ? (ConfigObject *)tl_current->cfg : NULL;
    if ((c && c->max_retries > 0) || (mc && mc->timeout_ns > 0) || atomic_load(&eng->e->paused)) return;
    if (ct_task_status(t) != CT_PENDING || !ct_task_claim(t, w->id)) return;
    /* this thread's task (its call is suspended in this wait) is put back afterwards */
    ct_task *cur = tl_current, *in_call = atomic_load_explicit(&w->in_call, memory_order_relaxed);
    EngineObject *cur_eng = tl_current_engine;
    uint64_t since = atomic_load_explicit(&w->current_since, memory_order_relaxed), now = ct_now_ns();
    ct_task_incref(t);          /* dropped by its end, as a popper's */
    ct_engine_hold(eng->e);     /* counted out by its end; the popper counts out its own */
    ts_store(&t->t_start, now);
    atomic_store_explicit(&w->current_since, now, memory_order_relaxed);
    if (CT_UNLIKELY(eng->mem_cap > 0)) uncharge(t);
    tl_help_depth++;
    run_attempt(w, eng, t, now);
    tl_help_depth--;
    tl_current = cur;
    tl_current_engine = cur_eng;
    atomic_store_explicit(&w->in_call, in_call, memory_order_relaxed);
    atomic_store_explicit(&w->current_since, since, memory_order_relaxed);
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
    if (tl_worker && (!deadline || deadline > ct_now_ns() + 1000000))   /* (a poll, wait(0), runs nothing) */
        help_run(self->engine, self->t);
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
    if ((st & CT_F_ASYNC) && g_cancel_async && self->engine) {
        PyObject *r = PyObject_CallFunctionObjArgs(g_cancel_async, (PyObject *)self->engine, (PyObject *)self, NULL);
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
static int attach_callback(ct_task *t, PyObject *fn, int mode) {
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
        v = PyObject_CallFunction(g_task_timeout, "s", "");
        PyObject *msg = PyUnicode_FromFormat("task %s-%llu ran longer than timeout_ms=%lld", g_prefix,
                                             (unsigned long long)t->id,
                                             (long long)(cfg ? cfg->timeout_ns / 1000000 : 0));
        Py_XDECREF(v);
        v = msg ? PyObject_CallOneArg(g_task_timeout, msg) : NULL;
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

static double wall_of(uint64_t mono) { return g_wall0 + ((double)mono - (double)g_mono0) / 1e9; }

static int dict_set_steal(PyObject *d, const char *k, PyObject *v) {
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
                       g_native_reason && (t->kind == CT_KIND_PY || t->kind == CT_KIND_NATIVE) && t->fn
                           ? PyObject_CallFunctionObjArgs(g_native_reason, (PyObject *)t->fn,
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
        PyObject *lst = key ? PyDict_GetItemWithError(g_history, key) : NULL;
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

static PyObject *Result_get_status(ResultObject *self, void *unused) { return status_member(ct_task_status(self->t)); }
static PyObject *Result_get_key(ResultObject *self, void *unused) { return PyLong_FromUnsignedLongLong(self->t->id); }
static PyObject *Result_get_cancel_requested(ResultObject *self, void *unused) {
    uint32_t st = atomic_load(&self->t->state);
    return PyBool_FromLong((st & CT_F_CANCEL_REQ) || (st & CT_STATUS_MASK) == CT_CANCELLED);
}

/* _engine.current_task(): the TaskResult of the task running in this thread, or None. */
static PyObject *mod_current_task(PyObject *m, PyObject *unused) {
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
    if (!g_await_impl) {
        PyErr_SetString(PyExc_RuntimeError, "catzilla_tasks is not initialised (import catzilla_tasks)");
        return NULL;
    }
    return PyObject_CallOneArg(g_await_impl, (PyObject *)self);
}

/* TaskResult(task_id): the live task with that id (queued, running, or finished and still
 * referenced somewhere). */
static PyObject *Result_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *tid;
    if (!PyArg_ParseTuple(args, "U:TaskResult", &tid)) return NULL;
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(tid, &len);
    if (!s) return NULL;
    size_t plen = strlen(g_prefix);
    unsigned long long id = 0;
    int ok = (size_t)len > plen + 1 && (size_t)len <= plen + 1 + 20 && strncmp(s, g_prefix, plen) == 0 &&
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
        entry = PyDict_GetItemWithError(g_registry, key);
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
static PyObject *mod_detached(PyObject *m, PyObject *unused) {
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
    {NULL},
};

static PyGetSetDef Result_getset[] = {
    {"task_id", (getter)Result_get_task_id, NULL, "The task's id (str), unique in this process.", NULL},
    {"status", (getter)Result_get_status, NULL, "The task's TaskStatus.", NULL},
    {"priority", (getter)Result_get_priority, NULL, "The task's TaskPriority.", NULL},
    {"_key", (getter)Result_get_key, NULL, NULL, NULL},
    {"cancel_requested", (getter)Result_get_cancel_requested, NULL,
     "True once cancel() was asked for this task (a running sync task may check it and stop).", NULL},
    {NULL},
};

static PyAsyncMethods Result_async = {.am_await = (unaryfunc)Result_await};

static PyTypeObject Result_Type = {
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

/* ------------------------------------------------------------------ ConfigBase */

static int Config_init(ConfigObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"priority", "delay_ms", "max_retries", "timeout_ms", "backoff", "retry_base_ms",
                             "retry_max_ms", "jitter", "retry_on_timeout", "retry_on", "on_success",
                             "on_failure", "on_retry", "isolation", NULL};
    int priority = 2, max_retries = 0, backoff = 0, jitter = 1, retry_on_timeout = 0, isolation = 0;
    double delay = 0, timeout = 0, base = 100, cap = 60000;
    PyObject *retry_on = Py_None, *on_success = Py_None, *on_failure = Py_None, *on_retry = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|idididdppOOOOp:ConfigBase", kwlist, &priority, &delay, &max_retries,
                                     &timeout, &backoff, &base, &cap, &jitter, &retry_on_timeout, &retry_on,
                                     &on_success, &on_failure, &on_retry, &isolation))
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
    {"_native", T_OBJECT, offsetof(ConfigObject, native), 0, "compiler.NativeTask of a compiled task, or None"},
    {NULL},
};

static PyTypeObject Config_Type = {
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

/* ------------------------------------------------------------------ Engine */

static int engine_check(EngineObject *self) {
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
static ConfigObject *lookup_config(PyObject *func) {
    PyObject *cfg = NULL;
    if (PyMethod_Check(func)) func = PyMethod_GET_FUNCTION(func);
    if (PyFunction_Check(func)) {
        PyObject *d = ((PyFunctionObject *)func)->func_dict;
        if (!d) return NULL;
        cfg = PyDict_GetItemWithError(d, g_config_attr);
        if (!cfg) {
            PyErr_Clear();
            return NULL;
        }
        return PyObject_TypeCheck(cfg, &Config_Type) ? (ConfigObject *)cfg : NULL;
    }
    if (PyCFunction_Check(func)) return NULL;
#if PY_VERSION_HEX >= 0x030D0000
    if (PyObject_GetOptionalAttr(func, g_config_attr, &cfg) <= 0) {
#else
    if (_PyObject_LookupAttr(func, g_config_attr, &cfg) <= 0) {
#endif
        PyErr_Clear();
        return NULL;
    }
    /* callable objects: the reference is kept by the object; borrow it */
    ConfigObject *c = PyObject_TypeCheck(cfg, &Config_Type) ? (ConfigObject *)cfg : NULL;
    Py_DECREF(cfg);
    return c;
}

static int not_callable(PyObject *func) {
    PyErr_Format(PyExc_TypeError,
                 "add_task() needs a callable as its first argument, got %.100s %R; pass the function "
                 "itself, e.g. add_task(send_email, user_id), not add_task(send_email(user_id))",
                 Py_TYPE(func)->tp_name, func);
    return -1;
}

static PyObject *submit_error(EngineObject *self, int rc) {
    switch (rc) {
    case CT_EFULL:
    case CT_ETIMEDOUT:
        PyErr_Format(QueueFullError,
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
static PyObject *enqueue_node(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
                              PyObject *kwnames, int priority, ConfigObject *cfg, int64_t block_ns);
static PyObject *enqueue_submit(EngineObject *self, ct_task *t, ConfigObject *cfg, int64_t block_ns);
static PyObject *enqueue_native(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
                                PyObject *kwnames, int priority, ConfigObject *cfg, int64_t block_ns, PyObject *native);

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
    call = PyObject_CallFunctionObjArgs(g_isolate, (PyObject *)self, func, pos, kw, (PyObject *)cfg, NULL);
    if (call) r = enqueue_node(self, call, NULL, 0, NULL, priority, cfg, block_ns);
done:
    Py_XDECREF(pos);
    Py_XDECREF(kw);
    Py_XDECREF(call);
    return r;
}

/* native: the compiler.NativeTask of a compiled task (usually cfg->native), or NULL/None */
static PyObject *enqueue(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
                         PyObject *kwnames, int priority, ConfigObject *cfg, int64_t block_ns, PyObject *native) {
    if (CT_UNLIKELY(cfg && cfg->isolation))
        return enqueue_isolated(self, func, values, nvalues, kwnames, priority, cfg, block_ns);
    if (CT_UNLIKELY(native && native != Py_None && g_native_prepare))
        return enqueue_native(self, func, values, nvalues, kwnames, priority, cfg, block_ns, native);
    return enqueue_node(self, func, values, nvalues, kwnames, priority, cfg, block_ns);
}

static PyObject *enqueue_node(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
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

/* ---- memory_pool_mb: a cap on the bytes queued tasks' arguments hold ----
 *
 * A task's charge is the size of its argument tuple plus each argument's own size, as
 * sys.getsizeof reports them (an object's own storage: a bytes or str its text, a numpy array
 * its buffer, a list its item array, not the items). It is taken when the task is queued and
 * given back when it starts (or is dropped unstarted); a task whose charge does not fit is
 * refused with QueueFull. Only engines with a cap measure (the default has none): the side
 * table and the sizes cost ~0.3 us per task. GIL held throughout. */

static int64_t args_bytes(PyObject *a) {
    if (!a) return 0;
    int64_t total = 0;
    Py_ssize_t n = PyTuple_Check(a) ? PyTuple_GET_SIZE(a) : 0;
    for (Py_ssize_t i = -1; i < n; i++) {
        PyObject *o = i < 0 ? a : PyTuple_GET_ITEM(a, i);
        PyObject *sz = PyObject_CallOneArg(g_getsizeof, o);
        if (!sz) return -1;
        long long v = PyLong_AsLongLong(sz);
        Py_DECREF(sz);
        if (v < 0) return PyErr_Occurred() ? -1 : 0;
        total += v;
    }
    return total;
}

/* Record a charge before the node is submitted (a worker may start it at once). */
static int charge(EngineObject *self, ct_task *t, int64_t bytes) {
    PyObject *key = PyLong_FromVoidPtr(t);
    PyObject *val = Py_BuildValue("(KL)", (unsigned long long)(uintptr_t)self, (long long)bytes);
    int rc = key && val ? PyDict_SetItem(g_charges, key, val) : -1;
    Py_XDECREF(key);
    Py_XDECREF(val);
    if (rc == 0) self->arg_bytes += bytes;
    return rc;
}

/* Give back the charge of a node (no-op if it has none). Never leaves an exception set. */
static void uncharge(ct_task *t) {
    PyObject *et, *ev, *etb;   /* a pending exception (a release during unwinding) is kept */
    PyErr_Fetch(&et, &ev, &etb);
    PyObject *key = PyLong_FromVoidPtr(t);
    PyObject *val = key ? PyDict_GetItemWithError(g_charges, key) : NULL;
    if (val) {
        EngineObject *eng = (EngineObject *)(uintptr_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(val, 0));
        eng->arg_bytes -= PyLong_AsLongLong(PyTuple_GET_ITEM(val, 1));
        if (PyDict_DelItem(g_charges, key) < 0) PyErr_Clear();
    }
    PyErr_Clear();
    Py_XDECREF(key);
    PyErr_Restore(et, ev, etb);
}

static PyObject *memory_full(EngineObject *self, int64_t need) {
    char mb[32];   /* (PyErr_Format has no %g) */
    snprintf(mb, sizeof mb, "%.6g", (double)self->mem_cap / 1048576.0);
    PyErr_Format(QueueFullError,
                 "memory_pool_mb=%s reached: the arguments of the queued tasks hold %lld bytes and these "
                 "need %lld more; wait for some to run (join()), pass smaller arguments, or raise "
                 "memory_pool_mb",
                 mb, (long long)self->arg_bytes, (long long)need);
    return NULL;
}

/* Measure and charge a node about to be queued (mem_cap set). 0, or -1 with an exception
 * (QueueFull when it does not fit). */
static int charge_node(EngineObject *self, ct_task *t) {
    int64_t bytes = args_bytes((PyObject *)t->arg);
    if (bytes < 0) return -1;
    if (self->arg_bytes + bytes > self->mem_cap) {
        atomic_fetch_add_explicit(&self->e->rejected, 1, memory_order_relaxed);
        memory_full(self, bytes);
        return -1;
    }
    return charge(self, t, bytes);
}

/* Submit a prepared Python-visible node (its cfg not yet set) and return its TaskResult. */
static PyObject *enqueue_submit(EngineObject *self, ct_task *t, ConfigObject *cfg, int64_t block_ns) {
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

/* A task compiled to native code: compiler.py checks the arguments against a compiled
 * signature (compiling it on first use) and gives back the call block, or None: the task then
 * runs as Python (arguments of other types, a value that does not fit, no compiler). */
static PyObject *enqueue_native(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
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
    prep = PyObject_CallFunctionObjArgs(g_native_prepare, native, pos, kw, func, NULL);
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
static PyObject *Engine_map_native(EngineObject *self, PyObject *args) {
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
static PyObject *Engine_map_native_buffers(EngineObject *self, PyObject *args) {
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
static PyObject *Engine_submit_batch(EngineObject *self, PyObject *args) {
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
    if (cfg && (cfg->isolation || cfg->delay_ns > 0)) {
        PyErr_SetString(PyExc_ValueError, "_submit_batch(): delayed or isolated tasks are queued one by one");
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

/* _set_native_hooks(prepare, reason): compiler.py's hooks (see g_native_prepare, g_native_reason) */
static PyObject *mod_set_native_hooks(PyObject *m, PyObject *args) {
    PyObject *prepare, *reason;
    if (!PyArg_ParseTuple(args, "OO:_set_native_hooks", &prepare, &reason)) return NULL;
    Py_XSETREF(g_native_prepare, prepare == Py_None ? NULL : Py_NewRef(prepare));
    Py_XSETREF(g_native_reason, reason == Py_None ? NULL : Py_NewRef(reason));
    Py_RETURN_NONE;
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
                         "uptime_s", (double)(now - g_mono0) / 1e9, "sleeping", forked ? 0 : atomic_load(&e->sleepers),
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

static PyTypeObject Gate_Type;

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
            rc = PyErr_ExceptionMatches(QueueFullError) ? 0 : -1;
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

static int attach_callback(ct_task *t, PyObject *fn, int mode);
static void gate_done(PyObject *gobj, int status);

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
static void gate_done(PyObject *gobj, int status) {
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
static PyObject *Engine_gates(EngineObject *self, PyObject *args) {
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

static PyTypeObject Gate_Type = {
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

static PyTypeObject Engine_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "catzilla_tasks._engine.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The C task engine (use catzilla_tasks.BackgroundTasks).",
    .tp_methods = Engine_methods,
    .tp_init = (initproc)Engine_init,
    .tp_new = PyType_GenericNew,
};

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

static PyObject *mod_set_hooks(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"status_members", "priority_members", "run_coroutine", "report_error", "await_impl",
                             "cancel_async", "task_timeout", "isolate", "failed", NULL};
    PyObject *sm, *pm, *rc, *re, *aw, *ca, *tt, *iso, *fl;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!OOOOOOO:_set_hooks", kwlist, &PyTuple_Type, &sm, &PyTuple_Type, &pm,
                                     &rc, &re, &aw, &ca, &tt, &iso, &fl))
        return NULL;
    Py_INCREF(fl);
    Py_XSETREF(g_failed, fl);
    Py_INCREF(iso);
    Py_XSETREF(g_isolate, iso);
    Py_INCREF(ca);
    Py_XSETREF(g_cancel_async, ca);
    Py_INCREF(tt);
    Py_XSETREF(g_task_timeout, tt);
    Py_INCREF(sm);
    Py_XSETREF(g_status_members, sm);
    Py_INCREF(pm);
    Py_XSETREF(g_priority_members, pm);
    Py_INCREF(rc);
    Py_XSETREF(g_run_coroutine, rc);
    Py_INCREF(re);
    Py_XSETREF(g_report_error, re);
    Py_INCREF(aw);
    Py_XSETREF(g_await_impl, aw);
    Py_RETURN_NONE;
}

static PyObject *mod_memory_stats(PyObject *m, PyObject *unused) {
    ct_slab_stats st;
    ct_slab_get_stats(&ct_task_slab, &st);
    return Py_BuildValue("{s:n,s:L,s:n,s:L,s:L}", "slab_bytes", (Py_ssize_t)st.chunk_bytes, "nodes_in_use",
                         (long long)st.in_use, "node_size", (Py_ssize_t)ct_task_slab.obj_size, "nodes_cached",
                         (long long)st.cached, "nodes_free", (long long)st.free_global);
}

static PyObject *mod_live_ids(PyObject *m, PyObject *unused) { return PyLong_FromSsize_t(PyDict_GET_SIZE(g_registry)); }

static PyMethodDef mod_methods[] = {
    {"_set_hooks", (PyCFunction)(void (*)(void))mod_set_hooks, METH_VARARGS | METH_KEYWORDS, NULL},
    {"memory_stats", (PyCFunction)mod_memory_stats, METH_NOARGS,
     "Memory of the task-node slab: bytes taken from the system, nodes in use, bytes per node."},
    {"detached", (PyCFunction)mod_detached, METH_NOARGS, NULL},
    {"current_task", (PyCFunction)mod_current_task, METH_NOARGS,
     "The TaskResult of the task running in this thread (a sync task), or None."},
    {"_registered_ids", (PyCFunction)mod_live_ids, METH_NOARGS, NULL},
    {"_set_native_hooks", (PyCFunction)mod_set_native_hooks, METH_VARARGS, NULL},
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
    g_mono0 = ct_now_ns();
    struct timeval tv;
    gettimeofday(&tv, NULL);
    g_wall0 = (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
    g_registry = PyDict_New();
    g_history = PyDict_New();
    g_charges = PyDict_New();
    PyObject *sysmod = PyImport_ImportModule("sys");
    g_getsizeof = sysmod ? PyObject_GetAttrString(sysmod, "getsizeof") : NULL;
    Py_XDECREF(sysmod);
    if (!g_charges || !g_getsizeof) goto fail;
    g_config_attr = PyUnicode_InternFromString("__catzilla_task__");
    /* The exception classes are defined once, in catzilla_tasks/errors.py (a leaf module, so
       importing it here, while the package itself is still importing, cannot cycle). */
    PyObject *errors = PyImport_ImportModule("catzilla_tasks.errors");
    if (!errors) goto fail;
    QueueFullError = PyObject_GetAttrString(errors, "QueueFull");
    TaskCancelledError = PyObject_GetAttrString(errors, "TaskCancelled");
    Py_DECREF(errors);
    if (!g_registry || !g_history || !g_config_attr || !QueueFullError || !TaskCancelledError) goto fail;
    Py_INCREF(&Engine_Type);
    Py_INCREF(&Result_Type);
    Py_INCREF(&Config_Type);
    Py_INCREF(QueueFullError);
    Py_INCREF(TaskCancelledError);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&Engine_Type) < 0 ||
        PyModule_AddObject(m, "TaskResult", (PyObject *)&Result_Type) < 0 ||
        PyModule_AddObject(m, "ConfigBase", (PyObject *)&Config_Type) < 0 ||
        PyModule_AddObject(m, "QueueFull", QueueFullError) < 0 ||
        PyModule_AddObject(m, "TaskCancelled", TaskCancelledError) < 0)
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

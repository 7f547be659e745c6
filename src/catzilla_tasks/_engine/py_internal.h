/* py_internal.h - what the Python binding files (py_*.c) share: the object types, the module's
 * state (one struct, py_mod, holding the Python hooks and the dicts the bindings own), and the
 * functions one binding file calls in another. Only py_*.c include it; ct_*.c never see Python.
 *
 * Where the bindings live (catzilla_tasks._engine):
 *   py_module.c  module init, the C API capsule, py_mod and _install_hooks (the one setter)
 *   py_engine.c  Engine: construction, add_task/submit (the submit hot path), control, stats
 *   py_config.c  ConfigBase, the C half of TaskConfig
 *   py_result.c  TaskResult: handles, waiting, cancelling, callbacks, stats; task ids
 *   py_run.c     running a task on a worker and completing it: callbacks, retries, history
 *   py_timer.c   the timer thread's Python side: delayed tasks, retries and timeouts firing
 *   py_memory.c  memory_pool_mb: the bytes queued tasks' arguments hold
 *   py_native.c  compiled (native) tasks and batches (tasks.map)
 *   py_gate.c    Gate: workflow steps that wait for other tasks
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
 * shutdown, a blocking add on a full engine) release the GIL.
 *
 * Symbols: setup.py builds with -fvisibility=hidden, so the functions declared here are
 * private to the extension (direct calls, inlinable within a file); only PyInit__engine is
 * exported. */
#ifndef PY_INTERNAL_H
#define PY_INTERNAL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#ifdef __linux__
#include <sys/random.h>
#endif
#include <sys/time.h>
#include <unistd.h>

#include "catzilla_tasks.h"
#include "ct_engine.h"

/* ------------------------------------------------------------------ module state */

/* The Python side's hooks: set once, all together, by _engine._install_hooks(**hooks), which
 * catzilla_tasks/_hooks.py calls when the package is imported. Every field is required (the
 * setter refuses a call that lacks one); no engine starts before they are installed. */
typedef struct py_hooks {
    PyObject *status_members;   /* tuple: TaskStatus by code */
    PyObject *priority_members; /* tuple: TaskPriority by value */
    PyObject *run_coroutine;    /* f(engine, handle, coroutine) */
    PyObject *report_error;     /* f(what: str, subject, exc) */
    PyObject *await_impl;       /* f(handle) -> iterator */
    PyObject *cancel_async;     /* f(engine, handle): cancel the coroutine of an async task */
    PyObject *task_timeout;     /* catzilla_tasks.errors.TaskTimeout */
    PyObject *isolate;          /* f(engine, func, args, kwargs, config) -> callable run in a child */
    PyObject *failed;           /* f(engine, task_id, func, exc): a task ended FAILED or TIMED_OUT */
    PyObject *native_reason;    /* f(func, ran_native) -> why the task ran as Python, or None */
    /* rate limits, concurrency limits, named queues (limits.py) and progress (progress.py) */
    PyObject *route;            /* f(engine, func, args, kwargs, config, block_s) -> handle: a routed config */
    PyObject *make_progress;    /* f(handle, fraction, message) -> Progress (TaskResult.set_progress) */
} py_hooks;

typedef struct py_state {
    py_hooks hooks;
    int hooks_installed;
    /* made by PyInit__engine */
    /* {id: [node address, engine address, handle address or 0]} of tasks whose id was read. The
     * handle is the task's shared handle: TaskResult(task_id) and every other handle the engine
     * hands out for that task is that object while it lives (a borrowed address, cleared by its
     * dealloc), so they all share one node reference: a cycle through the task then holds one
     * handle, which the cycle collector can see through (node_is_ours). */
    PyObject *registry;
    PyObject *history;          /* {id: [attempt dicts]} of tasks with failed attempts */
    PyObject *progress;         /* {id: Progress, or the TaskResult (or None) a detached handle
                                 * shows} of registered tasks that reported progress (py_result.c) */
    PyObject *charges;          /* {node address: (engine address, bytes)}: queued tasks of engines
                                 * with a memory cap, and the bytes their arguments hold */
    PyObject *getsizeof;        /* sys.getsizeof */
    PyObject *config_attr;      /* "__catzilla_task__" */
    PyObject *native_prepare;   /* "_engine_prepare": the method of compiler.NativeTask that
                                 * checks a call's arguments (see enqueue_native) */
    PyObject *queue_full;       /* catzilla_tasks.errors.QueueFull */
    PyObject *task_cancelled;   /* catzilla_tasks.errors.TaskCancelled */
    char prefix[16];            /* of task ids: random per process (new after fork) */
    uint64_t mono0;             /* ct_now_ns() and the wall clock at import: stats' timestamps */
    double wall0;
} py_state;

/* The one instance (py_module.c). A hook is a struct field read: no lookup on the hot path. */
extern py_state py_mod;

/* ------------------------------------------------------------------ object types */

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
    int routed;              /* 1: rate/concurrency limit or named queue: submitted by hooks.route (limits.py) */
    int64_t delay_ns;
    int64_t timeout_ns;      /* 0 = none */
    int64_t retry_base_ns, retry_max_ns;
    PyObject *retry_on;      /* exception class or tuple of them; NULL = any Exception */
    PyObject *on_success, *on_failure, *on_retry;
    PyObject *native;        /* compiler.NativeTask of a task compiled to native code, or NULL/None */
} ConfigObject;

extern PyTypeObject Engine_Type, Result_Type, Config_Type, Gate_Type;

/* Last reference of a detached node (no engine): the same clean-up as an engine's. */
extern ct_hooks detached_hooks;

/* ------------------------------------------------------------------ thread-locals (py_run.c) */

/* The worker this thread is (NULL on other threads), and the engine whose event-loop thread
 * this is (engine.py's _LoopRunner says so): a wait() there must not block as elsewhere. */
extern _Thread_local ct_worker *tl_worker;
extern _Thread_local EngineObject *tl_loop_engine;
/* The engine whose thread this is: a worker, the hook (timer) thread or the event-loop thread.
 * Work submitted there comes from work in flight. */
extern _Thread_local ct_engine *tl_own_engine;
/* The task this thread is running (catzilla_tasks.current_task()). */
extern _Thread_local ct_task *tl_current;
extern _Thread_local EngineObject *tl_current_engine;

/* ------------------------------------------------------------------ small shared helpers */

static inline uint64_t ts_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void ts_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

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

/* The registry entry of a registered node (borrowed), or NULL (no error set). */
static inline PyObject *registry_entry(ct_task *t) {
    if (!(atomic_load_explicit(&t->state, memory_order_relaxed) & CT_F_REGISTERED)) return NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(t->id);
    PyObject *entry = key ? PyDict_GetItemWithError(py_mod.registry, key) : NULL;
    Py_XDECREF(key);
    if (!entry || !PyList_CheckExact(entry) || PyList_GET_SIZE(entry) != 3) {
        PyErr_Clear();
        return NULL;
    }
    return entry;
}

/* A handle on node t (a new reference): the task's shared handle if it has a live one, else a
 * new one. Inline: every add_task makes one. */
static inline ResultObject *result_wrap(EngineObject *eng, ct_task *t) {
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

/* ------------------------------------------------------------------ functions across files */

/* py_run.c */
void complete_py(EngineObject *eng, ct_task *t, int status, PyObject *value);
PyObject *fetch_exception(void);
void hook_release(ct_task *t);
void hook_run_batch(ct_worker *w);
void hook_thread_start(ct_worker *w);
void hook_thread_stop(ct_worker *w);
int maybe_retry(EngineObject *eng, ct_task *t, int status, PyObject *exc, uint64_t start, uint64_t end);
void report_error(const char *what, PyObject *subject, PyObject *exc);
void report_unobserved(ct_task *t);
void run_callbacks(EngineObject *eng, ct_task *t, PyObject *cbs, int status, PyObject *value);
uint64_t run_one(ct_worker *w, EngineObject *eng, ct_task *t, uint64_t now);
void help_run(EngineObject *eng, ct_task *t);   /* a worker runs the task it is about to wait for */
void take_callbacks(EngineObject *eng, ct_task *t, int status);

/* py_timer.c */
void hook_drop_entry(ct_engine *e, ct_timer_entry *en);
void hook_on_timer(ct_engine *e, ct_timer_entry *en);
void hook_skip(ct_engine *e, ct_task *t);
void hook_timer_thread_start(ct_engine *e);
void hook_timer_thread_stop(ct_engine *e);

/* py_result.c */
int attach_callback(ct_task *t, PyObject *fn, int mode);
int dict_set_steal(PyObject *d, const char *k, PyObject *v);
PyObject *mod_current_task(PyObject *m, PyObject *unused);
PyObject *mod_detached(PyObject *m, PyObject *unused);
int ms_option(double ms, const char *field, int limit, int64_t *out);
void new_prefix(void);
PyObject *node_id(EngineObject *eng, ct_task *t);
int parse_timeout(PyObject *timeout, uint64_t *deadline, const char *fname);
void register_id(EngineObject *eng, ct_task *t);
ResultObject *result_wrap_tracked(EngineObject *eng, ct_task *t);
PyObject *status_member(uint32_t code);
int wait_node(ct_task *t, uint64_t deadline);

/* py_engine.c */
int engine_check(EngineObject *self);
PyObject *enqueue(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
    PyObject *kwnames, int priority, ConfigObject *cfg, int64_t block_ns, PyObject *native);
PyObject *enqueue_node(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
    PyObject *kwnames, int priority, ConfigObject *cfg, int64_t block_ns);
PyObject *enqueue_submit(EngineObject *self, ct_task *t, ConfigObject *cfg, int64_t block_ns);
PyObject *forked_error(void);
ConfigObject *lookup_config(PyObject *func);
int not_callable(PyObject *func);
PyObject *refused(EngineObject *self);
PyObject *submit_error(EngineObject *self, int rc);

/* py_memory.c */
int64_t args_bytes(PyObject *a);
int charge(EngineObject *self, ct_task *t, int64_t bytes);
int charge_node(EngineObject *self, ct_task *t);
PyObject *memory_full(EngineObject *self, int64_t need);
void uncharge(ct_task *t);

/* py_native.c */
PyObject *Engine_map_native(EngineObject *self, PyObject *args);
PyObject *Engine_map_native_buffers(EngineObject *self, PyObject *args);
PyObject *Engine_submit_batch(EngineObject *self, PyObject *args);
PyObject *enqueue_native(EngineObject *self, PyObject *func, PyObject *const *values, Py_ssize_t nvalues,
    PyObject *kwnames, int priority, ConfigObject *cfg, int64_t block_ns, PyObject *native);
PyObject *run_native(ct_task *t);

/* py_gate.c */
PyObject *Engine_gates(EngineObject *self, PyObject *args);
void gate_done(PyObject *gobj, int status);
#endif /* PY_INTERNAL_H */

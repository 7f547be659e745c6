/* py_timer.c - the timer thread's Python side (catzilla_tasks._engine): a delayed task or a
 * retry coming due, a running task's timeout firing, entries dropped at shutdown. */
#include "py_internal.h"

/* ---- the timer thread's Python side ---- */

void hook_timer_thread_start(ct_engine *e) {
    tl_own_engine = e;
    PyGILState_Ensure();
    e->timer_py_state = PyEval_SaveThread();
}

void hook_timer_thread_stop(ct_engine *e) {
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
void hook_on_timer(ct_engine *e, ct_timer_entry *en) {
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
                PyObject *cancel = py_mod.hooks.cancel_async;
                PyObject *r = h && cancel ? PyObject_CallFunctionObjArgs(cancel, (PyObject *)eng, (PyObject *)h, NULL) : NULL;
                if (!r) PyErr_Clear();
                Py_XDECREF(r);
                Py_XDECREF(h);
            } else if (wid && py_mod.hooks.task_timeout) {
                /* Raised in the task at its next Python instruction. A task inside C code
                 * (a blocking call) sees it only when the call returns: the STUCK check. */
                PyThreadState_SetAsyncExc(e->workers[wid - 1].thread_ident, py_mod.hooks.task_timeout);
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
                    py_mod.prefix, (unsigned long long)t->id, w->id,
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
void hook_skip(ct_engine *e, ct_task *t) {
    EngineObject *eng = (EngineObject *)e->hooks.ctx;
    if (CT_UNLIKELY(eng->mem_cap > 0)) uncharge(t);   /* no longer queued (a handle may keep the node) */
    complete_py(eng, t, CT_CANCELLED, NULL);
}

/* Entries left in the timer when the engine stops (called with no GIL held). A delayed task
 * that never became due ends CANCELLED here: its callbacks learn of it. */
void hook_drop_entry(ct_engine *e, ct_timer_entry *en) {
    PyGILState_STATE g = PyGILState_Ensure();
    if (CT_UNLIKELY(((EngineObject *)e->hooks.ctx)->mem_cap > 0)) uncharge(en->task);   /* never queued now */
    if (en->kind == CT_TIMER_READY && ct_task_status(en->task) == CT_CANCELLED)
        take_callbacks((EngineObject *)e->hooks.ctx, en->task, CT_CANCELLED);
    ct_task_decref(&e->hooks, en->task);
    PyGILState_Release(g);
}


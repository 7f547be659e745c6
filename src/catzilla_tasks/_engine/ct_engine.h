/* ct_engine.h - the engine core: task nodes, four priority queues, the worker pool.
 *
 * Pure C: Python runs through ct_hooks (the py_*.c bindings), so the core builds and is stress-tested
 * alone with C tasks (tests/c/, under ThreadSanitizer).
 *
 * Lifecycle of a node: ct_task_new (refs=1, owned by the submitter) -> ct_engine_submit (the
 * engine takes that reference; a result handle takes its own) -> a worker pops it in a batch,
 * ct_task_begin (PENDING->RUNNING) -> run -> ct_task_finish (terminal state, counters, waiters
 * woken) -> ct_task_decref by each owner; the last one releases it to the slab. */
#ifndef CT_ENGINE_H
#define CT_ENGINE_H

#include "ct_common.h"
#include "ct_queue.h"
#include "ct_slab.h"
#include "ct_timer.h"
#include "ct_hist.h"
#include <pthread.h>

#define CT_NPRIO 4   /* CRITICAL=0, HIGH=1, NORMAL=2, LOW=3 */
#define CT_HELD_PRIO 2   /* priorities tracked in engine->held (CRITICAL, HIGH) */

enum ct_status {
    CT_PENDING = 0,
    CT_SCHEDULED = 1,
    CT_RUNNING = 2,
    CT_SUCCEEDED = 3,
    CT_FAILED = 4,
    CT_CANCELLED = 5,
    CT_TIMED_OUT = 6,
};
#define CT_STATUS_MASK 0xFu
#define CT_IS_TERMINAL(s) (((s) & CT_STATUS_MASK) >= CT_SUCCEEDED)

/* Flag bits of ct_task.state above the status nibble. */
#define CT_F_WAITERS   0x10u   /* a thread is parked on this node (ct_sync) */
#define CT_F_CALLBACKS 0x20u   /* Python callbacks are attached (py_result.c) */
#define CT_F_REGISTERED 0x40u  /* the id is in the live-task registry (py_result.c) */
#define CT_F_ASYNC     0x80u   /* handed to the event loop: settled from outside */
#define CT_F_TIMEDOUT  0x100u  /* its timeout fired during the current attempt */
#define CT_F_HISTORY   0x200u  /* py_run.c keeps a history of failed attempts */
#define CT_F_CANCEL_REQ 0x400u /* cancel() was asked while it ran (cooperative for sync tasks) */
#define CT_F_KWNAMES   0x800u  /* bindings: arg ends with the keyword names (vectorcall style) */
#define CT_F_INLINE    0x1000u /* run by a worker waiting for it (ct_task_claim), not by the one that
                                  pops it: the popper only drops it (ct_engine_drop_claimed) */
#define CT_F_OBSERVED  0x8000u /* bindings: someone read the outcome (a failure is then not logged) */
#define CT_WORKER_SHIFT 16     /* bits 16..31: 1 + id of the worker that ran it (0 = none) */

enum ct_kind {
    CT_KIND_C = 0,        /* fn(arg) with no GIL, no Python objects: the core runs it */
    CT_KIND_PY = 1,       /* Python callable: handed to hooks.run_batch */
    CT_KIND_PY_C = 2,     /* C function submitted from Python (has Python-side state) */
    CT_KIND_DETACHED = 3, /* never queued: settled from outside (futures, chains) */
    CT_KIND_NATIVE = 4,   /* compiled task (py_native.c): Python-visible, its call runs native code
                           * with the GIL released */
};

typedef void (*ct_c_func)(void *data);

typedef struct ct_task {
    ct_qnode link;              /* queue link (first: a ct_qnode* is a ct_task*) */
    void *fn;                   /* ct_c_func, or PyObject* callable (owned) */
    void *arg;                  /* C data, or PyObject* args tuple or NULL (owned); with
                                   CT_F_KWNAMES its last item is the tuple of keyword names */
    void *value;                /* PyObject*: callbacks before the end, then result or exception */
    void *cfg;                  /* PyObject* TaskConfig (owned) or NULL: retries, timeout */
    /* One word for the fields set before the node is published (the attempt is written
     * only by the thread running the task): the id keeps 48 bits (2^48 tasks take nine
     * years at a million a second) so the count of owners can have 32 with the node still
     * 80 bytes. */
    uint64_t id : 48;
    uint64_t priority : 4;
    uint64_t kind : 4;
    uint64_t attempt : 8;       /* 1-based attempt being run or last run */
    uint64_t t_enqueue, t_start, t_end;   /* ct_now_ns(); 0 = not yet */
    _Atomic uint32_t state;     /* status | flags | worker id */
    /* Owners: the engine, timer entries, each TaskResult handle. 32 bits: a count that
     * wrapped would free the node under its handles, and 2^32 handles (48 bytes each) do
     * not fit in memory. */
    _Atomic uint32_t refs;
} ct_task;
#define CT_ID_MASK ((UINT64_C(1) << 48) - 1)

typedef struct ct_engine ct_engine;

#define CT_BATCH_HARD_MAX 256

/* A worker's batch is visible to its siblings: the owner takes tasks from the front, an idle
 * sibling may steal the rest from the back when the owner has been stuck on one task for
 * longer than the batch budget (a blocking task must not hold back its batch-mates while
 * other workers idle). range packs (generation:32 | head:16 | tail:16); the generation
 * changes at every refill so a thief's compare-and-swap can never succeed on a stale view. */
typedef struct ct_worker {
    ct_engine *engine;
    pthread_t thread;
    int id;
    int started;
    void *py_state;                     /* py_run.c: this thread's PyThreadState */
    _Atomic uint64_t processed;
    _Atomic uint64_t busy_ns;
    _Atomic uint64_t stolen;            /* tasks this worker stole from siblings */
    unsigned long thread_ident;         /* py_run.c: PyThread_get_thread_ident() of the thread */
    _Atomic(struct ct_task *) in_call;  /* py_run.c: the task whose call runs now (its timeout may
                                           interrupt it; nothing else on this thread may be) */
    _Atomic int tid;                    /* kernel thread id (for /proc/.../schedstat) */
    _Atomic int retire;                 /* replaced or scaled down: exit after the current batch */
    _Atomic int exited;
    _Atomic uint64_t gil_wait_ns;       /* py_run.c: time spent waiting for the GIL */
    ct_hist exec_hist, wait_hist;       /* per task: execution time, queue wait */
    ct_rate rate;                       /* tasks finished per second */
    _Atomic uint64_t current_since;     /* start of the task being run, 0 = none */
    _Atomic int batch_prio;             /* most urgent priority in the batch at publish */
    int batch_has_py;                   /* the batch at publish holds a non-C task (owner only) */
    CT_ALIGNED _Atomic uint64_t range;
    _Atomic(ct_task *) batch[CT_BATCH_HARD_MAX];
} ct_worker;

typedef struct ct_hooks {
    void *ctx;
    void (*thread_start)(ct_worker *w);
    void (*thread_stop)(ct_worker *w);
    /* Run this worker's batch: take tasks with ct_worker_take until it returns NULL; each
     * must be finished or handed on (async) and its engine reference dropped. Any kind may
     * appear; ct_engine_run_c runs a C task. */
    void (*run_batch)(ct_worker *w);
    /* Drop the Python objects of a node whose last reference goes (called with the GIL by
     * whoever drops it; never called for CT_KIND_C). */
    void (*release)(ct_task *t);
    /* A popped node that will not run (cancelled before it started; cancel_queued, or a
     * worker that pops it): end it with ct_task_finish, run what waits on it, and drop the
     * engine's reference; never called for CT_KIND_C. Same GIL rule as release. NULL: the
     * core only counts it out and drops it. */
    void (*skip)(ct_engine *e, ct_task *t);
    /* Hook thread: a TIMEOUT, STUCK or CALL entry is due. Must drop the entry's node
     * reference. These entries need the GIL, so the timer hands them to a thread of their
     * own: the timer thread itself never waits for the GIL, and delayed tasks are released
     * on time however busy the interpreter is. */
    void (*on_timer)(ct_engine *e, ct_timer_entry *entry);
    /* Drop the node reference of an entry left at shutdown (no GIL held). */
    void (*drop_entry)(ct_engine *e, ct_timer_entry *entry);
    void (*hook_thread_start)(ct_engine *e);
    void (*hook_thread_stop)(ct_engine *e);
} ct_hooks;

typedef struct ct_config {
    int workers;                 /* threads started by ct_engine_start */
    int max_threads;             /* room for workers, replacements of stuck ones included */
    int64_t queue_size;          /* bound on queued (not yet running) tasks, all priorities */
    uint64_t aging_ns;           /* a lower queue not served for this long is served next */
    int batch_max;               /* most tasks popped at once */
    uint64_t batch_budget_ns;    /* target run time of one batch (sizes batches of slow tasks) */
} ct_config;

typedef struct ct_stats {
    int64_t queued[CT_NPRIO];
    int64_t queued_total;
    int64_t running;             /* started and not finished */
    int64_t scheduled;
    int64_t batched;             /* taken by a worker, not started (counted in queued_total) */
    uint64_t submitted, succeeded, failed, cancelled, rejected, retried, timed_out, replaced;
    int workers, sleeping;
    uint64_t avg_exec_ns;
    int accepting, paused;
} ct_stats;

struct ct_engine {
    ct_queue queues[CT_NPRIO];
    CT_ALIGNED _Atomic int64_t queued;           /* total queued: the queue_size bound */
    CT_ALIGNED _Atomic int64_t qcount[CT_NPRIO];  /* per priority (stats, urgency checks) */
    CT_ALIGNED _Atomic int64_t running;           /* popped and not finished (incl. async) */
    /* CRITICAL and HIGH tasks sitting not started in published batches: a worker holding
     * the GIL runs them itself rather than let them wait for their batch's owner to get it. */
    _Atomic int64_t held[CT_HELD_PRIO];
    _Atomic uint64_t submitted, succeeded, failed, cancelled, rejected, retried, timed_out, replaced;
    _Atomic int64_t scheduled;                    /* waiting in the timer (counted in queued) */
    _Atomic uint64_t avg_exec_ns;                 /* EWMA of execution time per task */

    /* Consumers: one lock for popping from all four queues (held for one batch). */
    CT_ALIGNED pthread_mutex_t pop_lock;
    uint64_t starve_since[CT_NPRIO];              /* ageing: first pass-over, 0 = none (pop_lock) */

    /* Sleeping and waking: idle workers, producers blocked on a full engine, drain waiters. */
    CT_ALIGNED pthread_mutex_t idle_lock;
    pthread_cond_t work_cond, space_cond, drain_cond;
    _Atomic int sleepers, space_waiters, drain_waiters;
    _Atomic int waking;                           /* a signalled worker has not woken yet */
    _Atomic int accepting, stopping, paused;

    ct_config cfg;
    ct_hooks hooks;
    ct_timer timer;
    _Atomic int64_t watches;                      /* TIMEOUT/STUCK entries in the timer */
    int64_t watch_compact_at;                     /* when to sweep finished tasks' watches */
    void *timer_py_state;                         /* py_timer.c: the hook thread's PyThreadState */
    struct {                                      /* due entries waiting for the hook thread */
        pthread_mutex_t lock;
        pthread_cond_t cond;
        ct_timer_entry *q;
        size_t n, cap;
        int stopping, started;
        pthread_t thread;
    } hookq;
    ct_worker *workers;                           /* cfg.max_threads slots */
    _Atomic int nworkers;                         /* slots ever used (high-water mark) */
    pthread_mutex_t grow_lock;                    /* adding or retiring worker threads */
    ct_hist async_exec_hist;                      /* async tasks (ended on the loop thread) */
    /* Auto-scaling: while enabled, a worker that finishes a batch with work still queued and no
     * idle sibling arms one tick (a CALL timer entry) of the scaler; the scaler re-arms itself
     * while it has something to watch. An idle engine has no ticks at all. */
    _Atomic int scaler_enabled, scaler_armed;
    _Atomic uint64_t scaler_interval_ns;
    ct_task *scaler_tick;                         /* py_engine.c: node holding the tick callable */
};

/* The node slab of the process (initialised by ct_engine_global_init). */
extern ct_slab ct_task_slab;
int ct_engine_global_init(void);

/* ---- engine ---- */
ct_engine *ct_engine_new(const ct_config *cfg, const ct_hooks *hooks);
int ct_engine_start(ct_engine *e);
/* Submit a prepared node (priority, kind, fn, arg set). Takes over the caller's reference.
 * block_ns: 0 = fail at once with CT_EFULL when full; <0 = wait forever; >0 = wait up to.
 * On error the caller still owns the node. */
int ct_engine_submit(ct_engine *e, ct_task *t, int64_t block_ns);
/* Submit n nodes at once (all or none: CT_EFULL if they do not all fit). */
int ct_engine_submit_many(ct_engine *e, ct_task **t, size_t n, int64_t block_ns);
/* Submit a node that becomes due at due_ns (SCHEDULED until then; counted against queue_size). */
int ct_engine_submit_at(ct_engine *e, ct_task *t, uint64_t due_ns, int64_t block_ns);
/* A running task waits for another attempt: RUNNING -> SCHEDULED until due_ns. The engine's
 * reference moves to the timer. Never refused for room (the task was already admitted). */
int ct_engine_reschedule(ct_engine *e, ct_task *t, uint64_t due_ns);
/* Ask the timer to call hooks.on_timer for (t, kind, token) at due_ns (takes a reference).
 * Watches of attempts that ended are swept from the timer here, now and then (amortised
 * O(1)), so a long timeout on a short task does not keep its node for the whole timeout:
 * the caller must be allowed to drop node references (hold the GIL for Python nodes). */
int ct_engine_watch(ct_engine *e, ct_task *t, uint64_t due_ns, uint32_t kind, uint32_t token);
/* Start one more worker thread (a stuck worker's replacement, or scaling up), reusing the
 * slot of an exited one. CT_OK or CT_ENOMEM (no room). */
int ct_engine_add_worker(ct_engine *e);
/* Ask one live worker (preferably an idle one) to exit. CT_OK, or CT_EINVAL if only one is left. */
int ct_engine_retire_worker(ct_engine *e);
/* A worker is about to block until other work of the engine is done (a task waiting for a
 * task): start a stand-in worker so the pool keeps its size while it waits. Returns 1 if one was started; pass that to ct_engine_block_end when the wait is over
 * (it retires one worker again). Never call with the GIL held (threads start and stop). */
int ct_engine_block_begin(ct_engine *e);
void ct_engine_block_end(ct_engine *e, int added);
/* Count one more task as running / one less (a completion whose callbacks may still submit
 * work: a drain must not end before they ran). */
void ct_engine_hold(ct_engine *e);
void ct_engine_unhold(ct_engine *e);
/* Tasks taken into workers' batches and not started yet (a snapshot; no lock). */
int64_t ct_engine_batched(ct_engine *e);
/* Live workers (started, not exited, not retiring). */
int ct_engine_live_workers(ct_engine *e);
/* Drop the timer's watches of attempts that are over (their node references with them). The
 * caller must be allowed to drop node references (GIL for Python nodes). O(entries). */
void ct_engine_sweep_watches(ct_engine *e);
/* Arm the scaler tick now if auto-scaling is on and it is not armed (any thread). */
void ct_engine_scaler_arm(ct_engine *e);
/* Stop the timer and hook threads (call with no GIL held); leftover entries go to
 * hooks.drop_entry. */
void ct_engine_stop_timer(ct_engine *e);
/* Stop accepting tasks (submit returns CT_ESHUTDOWN from now on). */
void ct_engine_close(ct_engine *e);
/* Wait until nothing is queued or running. deadline_ns 0 = forever. CT_OK / CT_ETIMEDOUT. */
int ct_engine_drain(ct_engine *e, uint64_t deadline_ns);
/* Cancel everything not started: the queues and the rest of workers' batches. Returns how
 * many. Drops the nodes: hold the GIL if Python nodes may be among them. */
size_t ct_engine_cancel_queued(ct_engine *e);
/* Stop the workers after their current batch and join them. */
void ct_engine_stop_workers(ct_engine *e);
void ct_engine_free(ct_engine *e);
void ct_engine_pause(ct_engine *e, int paused);
void ct_engine_get_stats(ct_engine *e, ct_stats *out);

/* ---- used by hooks while running a batch ---- */
/* Pop up to max tasks of priority < prio (more urgent than prio) without blocking. */
size_t ct_engine_pop_urgent(ct_engine *e, int prio, ct_task **out, size_t max);
/* Cheap check: is work more urgent than prio waiting, in a queue or in a batch? */
static inline int ct_engine_has_urgent(ct_engine *e, int prio) {
    for (int p = 0; p < prio; p++) {
        if (atomic_load_explicit(&e->qcount[p], memory_order_relaxed) > 0) return 1;
        if (p < CT_HELD_PRIO && atomic_load_explicit(&e->held[p], memory_order_relaxed) > 0) return 1;
    }
    return 0;
}
/* Take the not-started rest of a sibling's batch that holds work more urgent than prio (the
 * sibling is typically waiting for the GIL this caller holds). out must hold
 * CT_BATCH_HARD_MAX tasks; the caller runs them. */
size_t ct_engine_grab_urgent(ct_engine *e, ct_worker *self, int prio, ct_task **out);
/* The next task of w's own batch (owner only), or NULL when the batch is done or stolen. */
ct_task *ct_worker_take(ct_worker *w);
/* Owner, right after taking the first task of a batch (GIL held if it needs it): marks the
 * worker busy since now and wakes a sibling to watch the rest of the batch. */
void ct_worker_begin_batch(ct_worker *w, uint64_t now);
/* Run a CT_KIND_C task on this thread: begin, call, finish, drop the engine's reference. */
void ct_engine_run_c(ct_worker *w, ct_task *t);
/* Record a batch's execution time (feeds batch sizing). */
void ct_engine_note_exec(ct_engine *e, uint64_t ns, size_t ntasks);

/* ---- nodes ---- */
ct_task *ct_task_new(void);
/* PENDING -> RUNNING for worker w. Returns 0 if the task was cancelled meanwhile. */
int ct_task_begin(ct_task *t, int worker_id);
/* A worker waiting for t runs it itself, on its own thread ("help while waiting"): PENDING ->
 * RUNNING for worker_id, marked CT_F_INLINE, in one compare-and-swap, so neither the worker that
 * pops it (from a queue or a batch) nor cancel() can take it too. 1 if claimed. The node stays
 * where it is queued; the claimer runs it as a popper would, holding a node reference and one
 * count of running of its own: use ct_engine_claim, which also counts. Never for a node that
 * could be queued again while it still sits in a queue (a retry). */
int ct_task_claim(ct_task *t, int worker_id);
/* ct_task_claim, and the engine's counts for it: the node counted queued -> running as a pop
 * would (its room in the queue is given back at once: it is no queued work, though it stays in
 * its queue or batch until popped; otherwise claimed nodes waiting for busy workers to pop them
 * fill queue_size), that count held until the node is dropped (a drain waits for that), and
 * one count of running for the claimer (ended by its ct_task_finish). 1 if claimed. */
int ct_engine_claim(ct_engine *e, ct_task *t, int worker_id);
/* A popped node that its waiter claimed (ct_engine_claim, CT_F_INLINE): undo its pop's counts
 * (queued back up, running down), end the claim's count for it, and drop the engine's
 * reference; 1 if it was one (the popper must do nothing else with it), else 0. From the later
 * of its claim and its pop to this, queued reads one low per such node (its room was given
 * back by both: queue_size admits that many more for a moment; running, one high, keeps a
 * drain waiting). */
int ct_engine_drop_claimed(ct_engine *e, ct_task *t);
/* Terminal state for a task that was running on e: counters, waiters woken.
 * Returns the state word before the change (so the caller sees CT_F_CALLBACKS). */
uint32_t ct_task_finish(ct_engine *e, ct_task *t, int status);
/* Terminal state for a node not counted by an engine (detached). 0 if it was already final. */
int ct_task_settle(ct_task *t, int status, uint32_t *old_state);
/* PENDING -> CANCELLED. 1 if it took effect. The node stays queued until popped and skipped. */
int ct_task_cancel(ct_engine *e, ct_task *t);
/* Wait for a terminal state. deadline_ns 0 = forever. CT_OK / CT_ETIMEDOUT. No GIL held! */
int ct_task_wait(ct_task *t, uint64_t deadline_ns);
static inline void ct_task_incref(ct_task *t) {
    atomic_fetch_add_explicit(&t->refs, 1, memory_order_relaxed);
}
/* Drop a reference; the last one calls hooks->release (if not CT_KIND_C) and frees the node.
 * hooks may be NULL for pure C nodes. Whoever may drop the last reference of a Python node
 * must hold the GIL. */
void ct_task_decref(const ct_hooks *hooks, ct_task *t);
static inline uint32_t ct_task_status(const ct_task *t) {
    return atomic_load_explicit(&((ct_task *)t)->state, memory_order_acquire) & CT_STATUS_MASK;
}

#endif

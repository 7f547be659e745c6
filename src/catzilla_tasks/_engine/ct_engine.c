/* ct_engine.c - see ct_engine.h.
 *
 * Counters and who moves them:
 *   queued      +n by a submitter before it pushes (that is the queue_size reservation),
 *               -n by the worker that pops. Drain waits for queued == 0 && running == 0.
 *   qcount[p]   +1 by a submitter after its push, -k by the popper: "is there visible work
 *               at priority p" (may dip below 0 for an instant; readers treat <= 0 as empty).
 *   running     +n by the popper *before* it lowers queued (so queued+running never reads 0
 *               while a task is in a worker's hands), -1 per task finished or skipped.
 *
 * Sleep/wake protocol (no lost wake-ups, no polling): a worker with nothing to pop takes
 * idle_lock, bumps sleepers, re-checks qcount and only then waits on work_cond. A submitter
 * pushes, bumps qcount, issues a seq_cst fence and reads sleepers: one of the two sides always
 * sees the other (store-buffer pattern with fences on both sides). Drain and space waiters use
 * the same pattern with their own counters. */
#include "ct_engine.h"
#include "ct_sync.h"

#include <sched.h>
#if CT_HAVE_GETTID
#include <sys/syscall.h>
#endif
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

ct_slab ct_task_slab;
static pthread_once_t ct_global_once = PTHREAD_ONCE_INIT;
static int ct_global_rc = CT_OK;
static _Atomic uint64_t ct_next_id = 1;

static void ct_global_init_once(void) { ct_global_rc = ct_slab_init(&ct_task_slab, sizeof(ct_task)); }

int ct_engine_global_init(void) {
    pthread_once(&ct_global_once, ct_global_init_once);
    return ct_global_rc;
}

/* ------------------------------------------------------------------ nodes */

ct_task *ct_task_new(void) {
    ct_task *t = ct_slab_alloc(&ct_task_slab);
    if (!t) return NULL;
    atomic_store_explicit(&t->link.next, NULL, memory_order_relaxed);
    t->fn = t->arg = t->value = t->cfg = NULL;
    t->attempt = 0;
    t->id = atomic_fetch_add_explicit(&ct_next_id, 1, memory_order_relaxed) & CT_ID_MASK;
    t->t_enqueue = t->t_start = t->t_end = 0;
    atomic_store_explicit(&t->state, CT_PENDING, memory_order_relaxed);
    atomic_store_explicit(&t->refs, 1, memory_order_relaxed);
    t->priority = 2;
    t->kind = CT_KIND_C;
    return t;
}

void ct_task_decref(const ct_hooks *hooks, ct_task *t) {
    /* acq_rel: the last owner must see every write the others made before dropping theirs */
    if (atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1) return;
    if (t->kind != CT_KIND_C && hooks && hooks->release) hooks->release(t);
    ct_slab_free(&ct_task_slab, t);
}

static int ct_task_begin_as(ct_task *t, int worker_id, uint32_t flags) {
    uint32_t old = atomic_load_explicit(&t->state, memory_order_acquire);
    uint32_t wid = ((uint32_t)worker_id + 1u) << CT_WORKER_SHIFT;
    for (;;) {
        if ((old & CT_STATUS_MASK) != CT_PENDING) return 0;
        uint32_t nw = (old & ~(CT_STATUS_MASK | (0xFFFFu << CT_WORKER_SHIFT))) | CT_RUNNING | wid | flags;
        if (atomic_compare_exchange_weak_explicit(&t->state, &old, nw, memory_order_acq_rel,
                                                  memory_order_acquire))
            return 1;
    }
}

int ct_task_begin(ct_task *t, int worker_id) { return ct_task_begin_as(t, worker_id, 0); }

int ct_task_claim(ct_task *t, int worker_id) { return ct_task_begin_as(t, worker_id, CT_F_INLINE); }

/* Move a non-terminal node to status. Returns 1 and the previous word, or 0 if terminal. */
static int ct_task_set_terminal(ct_task *t, int status, uint32_t *old_out) {
    uint32_t old = atomic_load_explicit(&t->state, memory_order_acquire);
    for (;;) {
        if (CT_IS_TERMINAL(old)) {
            if (old_out) *old_out = old;
            return 0;
        }
        uint32_t nw = (old & ~CT_STATUS_MASK) | (uint32_t)status;
        /* release: the result stored in the node happens-before any reader of the status */
        if (atomic_compare_exchange_weak_explicit(&t->state, &old, nw, memory_order_acq_rel,
                                                  memory_order_acquire))
            break;
    }
    if (old & CT_F_WAITERS) ct_park_wake(&t->state);
    if (old_out) *old_out = old;
    return 1;
}

int ct_task_settle(ct_task *t, int status, uint32_t *old_state) {
    return ct_task_set_terminal(t, status, old_state);
}

static void ct_engine_notify_drain(ct_engine *e) {
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&e->drain_waiters, memory_order_relaxed) == 0) return;
    pthread_mutex_lock(&e->idle_lock);
    pthread_cond_broadcast(&e->drain_cond);
    pthread_mutex_unlock(&e->idle_lock);
}

static void ct_engine_running_done(ct_engine *e, int64_t n) {
    int64_t left = atomic_fetch_sub(&e->running, n) - n;
    if (left == 0 && atomic_load(&e->queued) == 0) ct_engine_notify_drain(e);
}

/* Give back room taken by a submit that then did not queue (engine closed meanwhile): a
 * drain may be waiting for exactly this, and so may a blocked producer. */
static void ct_engine_unreserve(ct_engine *e, int64_t n) {
    int64_t left = atomic_fetch_sub(&e->queued, n) - n;
    if (left == 0 && atomic_load(&e->running) == 0) ct_engine_notify_drain(e);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load(&e->space_waiters) > 0) {
        pthread_mutex_lock(&e->idle_lock);
        pthread_cond_broadcast(&e->space_cond);
        pthread_mutex_unlock(&e->idle_lock);
    }
}

uint32_t ct_task_finish(ct_engine *e, ct_task *t, int status) {
    uint32_t old = 0;
    if (ct_task_set_terminal(t, status, &old)) {
        if (status == CT_SUCCEEDED)
            atomic_fetch_add_explicit(&e->succeeded, 1, memory_order_relaxed);
        else if (status == CT_CANCELLED)
            atomic_fetch_add_explicit(&e->cancelled, 1, memory_order_relaxed);
        else if (status == CT_FAILED)
            atomic_fetch_add_explicit(&e->failed, 1, memory_order_relaxed);
        else if (status == CT_TIMED_OUT)   /* tasks that ended so, not timeouts that fired */
            atomic_fetch_add_explicit(&e->timed_out, 1, memory_order_relaxed);
    }
    ct_engine_running_done(e, 1);
    return old;
}

int ct_task_cancel(ct_engine *e, ct_task *t) {
    uint32_t old = atomic_load_explicit(&t->state, memory_order_acquire);
    for (;;) {
        uint32_t s = old & CT_STATUS_MASK;
        if (s != CT_PENDING && s != CT_SCHEDULED) return 0;
        uint32_t nw = (old & ~CT_STATUS_MASK) | CT_CANCELLED;
        if (atomic_compare_exchange_weak_explicit(&t->state, &old, nw, memory_order_acq_rel,
                                                  memory_order_acquire))
            break;
    }
    if (e) atomic_fetch_add_explicit(&e->cancelled, 1, memory_order_relaxed);
    if (old & CT_F_WAITERS) ct_park_wake(&t->state);
    /* A delayed task: let it through to a queue now, where a worker drops it, so it holds
     * neither memory nor join()/shutdown() until its original due time. */
    if (e && (old & CT_STATUS_MASK) == CT_SCHEDULED) ct_timer_expedite(&e->timer, t);
    return 1;
}

static int ct_ready_terminal(uint32_t s) { return CT_IS_TERMINAL(s); }

int ct_task_wait(ct_task *t, uint64_t deadline_ns) {
    return ct_park_wait(&t->state, CT_F_WAITERS, ct_ready_terminal, deadline_ns);
}

/* ------------------------------------------------------------------ engine */

static void ct_wake_one(ct_engine *e);
static void ct_engine_scaler_wake(ct_engine *e);
static void ct_engine_hookq_push(ct_engine *e, ct_timer_entry *en);

/* Timer thread: a due entry. READY entries carry the engine's reference of a SCHEDULED node
 * into its queue; the others go to the hooks. */
static void ct_engine_timer_fire(void *ctx, ct_timer_entry *en) {
    ct_engine *e = ctx;
    ct_task *t = en->task;
    if (en->kind != CT_TIMER_READY) {
        if (en->kind != CT_TIMER_CALL) atomic_fetch_sub(&e->watches, 1);
        if (e->hooks.on_timer)
            ct_engine_hookq_push(e, en);
        else
            ct_task_decref(&e->hooks, t);   /* pure C engines: no Python nodes, no GIL needed */
        return;
    }
    /* SCHEDULED -> PENDING; a cancelled node goes through too and a worker drops it */
    uint32_t old = atomic_load_explicit(&t->state, memory_order_acquire);
    while ((old & CT_STATUS_MASK) == CT_SCHEDULED &&
           !atomic_compare_exchange_weak_explicit(&t->state, &old, (old & ~CT_STATUS_MASK) | CT_PENDING,
                                                  memory_order_acq_rel, memory_order_acquire)) {
    }
    atomic_fetch_sub(&e->scheduled, 1);
    ct_queue_push(&e->queues[t->priority], &t->link);
    atomic_fetch_add_explicit(&e->qcount[t->priority], 1, memory_order_relaxed);
    ct_wake_one(e);
}

static void ct_engine_timer_thread_stop(void *ctx) { ct_slab_flush_thread(); }

static void *ct_engine_hook_main(void *arg) {
    ct_engine *e = arg;
    if (e->hooks.hook_thread_start) e->hooks.hook_thread_start(e);
    pthread_mutex_lock(&e->hookq.lock);
    for (;;) {
        while (e->hookq.n == 0 && !e->hookq.stopping) pthread_cond_wait(&e->hookq.cond, &e->hookq.lock);
        if (e->hookq.n == 0) break;   /* stopping and drained */
        ct_timer_entry *batch = e->hookq.q;
        size_t n = e->hookq.n;
        e->hookq.q = NULL;
        e->hookq.n = e->hookq.cap = 0;
        pthread_mutex_unlock(&e->hookq.lock);
        for (size_t i = 0; i < n; i++) e->hooks.on_timer(e, &batch[i]);
        free(batch);
        pthread_mutex_lock(&e->hookq.lock);
    }
    pthread_mutex_unlock(&e->hookq.lock);
    if (e->hooks.hook_thread_stop) e->hooks.hook_thread_stop(e);
    ct_slab_flush_thread();
    return NULL;
}

/* Timer thread: hand a GIL-needing entry to the hook thread (started on first use). */
static void ct_engine_hookq_push(ct_engine *e, ct_timer_entry *en) {
    pthread_mutex_lock(&e->hookq.lock);
    if (!e->hookq.started && !e->hookq.stopping) {
        if (pthread_create(&e->hookq.thread, NULL, ct_engine_hook_main, e) == 0) e->hookq.started = 1;
    }
    if (e->hookq.n == e->hookq.cap) {
        size_t cap = e->hookq.cap ? e->hookq.cap * 2 : 64;
        ct_timer_entry *q = realloc(e->hookq.q, cap * sizeof *q);
        if (!q) {   /* out of memory: the entry is lost, its node reference must not be */
            pthread_mutex_unlock(&e->hookq.lock);
            if (e->hooks.drop_entry) e->hooks.drop_entry(e, en);
            return;
        }
        e->hookq.q = q;
        e->hookq.cap = cap;
    }
    e->hookq.q[e->hookq.n++] = *en;
    pthread_cond_signal(&e->hookq.cond);
    pthread_mutex_unlock(&e->hookq.lock);
}

static void ct_engine_drop_entry(void *ctx, ct_timer_entry *en) {
    ct_engine *e = ctx;
    if (en->kind == CT_TIMER_READY) {
        /* a task that never became due: it ends CANCELLED and leaves the counts */
        ct_task_cancel(NULL, en->task);
        atomic_fetch_sub(&e->scheduled, 1);
        atomic_fetch_sub(&e->queued, 1);
    }
    if (e->hooks.drop_entry)
        e->hooks.drop_entry(e, en);
    else
        ct_task_decref(&e->hooks, en->task);
}

void ct_engine_stop_timer(ct_engine *e) {
    ct_timer_stop(&e->timer, ct_engine_drop_entry);
    /* then the hook thread: it runs what the timer handed over, then exits */
    pthread_mutex_lock(&e->hookq.lock);
    e->hookq.stopping = 1;
    pthread_cond_signal(&e->hookq.cond);
    int started = e->hookq.started;
    pthread_mutex_unlock(&e->hookq.lock);
    if (started) pthread_join(e->hookq.thread, NULL);
    e->hookq.started = 0;
}

ct_engine *ct_engine_new(const ct_config *cfg, const ct_hooks *hooks) {
    if (ct_engine_global_init() != CT_OK) return NULL;
    if (cfg->workers < 0 || cfg->queue_size <= 0) return NULL;
    ct_engine *e = NULL;
    if (posix_memalign((void **)&e, CT_CACHELINE, sizeof *e) != 0) return NULL;
    memset(e, 0, sizeof *e);
    for (int p = 0; p < CT_NPRIO; p++) ct_queue_init(&e->queues[p]);
    pthread_mutex_init(&e->pop_lock, NULL);
    pthread_mutex_init(&e->idle_lock, NULL);
    ct_cond_init(&e->work_cond);
    ct_cond_init(&e->space_cond);
    ct_cond_init(&e->drain_cond);
    e->cfg = *cfg;
    if (e->cfg.batch_max <= 0) e->cfg.batch_max = 64;
    if (e->cfg.batch_max > CT_BATCH_HARD_MAX) e->cfg.batch_max = CT_BATCH_HARD_MAX;
    if (e->cfg.batch_budget_ns == 0) e->cfg.batch_budget_ns = 200000;
    if (e->cfg.aging_ns == 0) e->cfg.aging_ns = 100000000;
    if (hooks) e->hooks = *hooks;
    atomic_store(&e->accepting, 1);
    if (e->cfg.max_threads < cfg->workers) e->cfg.max_threads = cfg->workers;
    if (e->cfg.max_threads < 1) e->cfg.max_threads = 1;
    size_t wbytes = sizeof(ct_worker) * (size_t)e->cfg.max_threads;
    if (posix_memalign((void **)&e->workers, CT_CACHELINE, wbytes) != 0)
        e->workers = NULL;
    else
        memset(e->workers, 0, wbytes);
    if (!e->workers) {
        free(e);
        return NULL;
    }
    for (int i = 0; i < e->cfg.max_threads; i++) {
        e->workers[i].engine = e;
        e->workers[i].id = i;
    }
    atomic_store(&e->nworkers, 0);
    pthread_mutex_init(&e->grow_lock, NULL);
    ct_timer_init(&e->timer, ct_engine_timer_fire, e);
    e->watch_compact_at = 4096;
    e->timer.thread_stop = ct_engine_timer_thread_stop;
    pthread_mutex_init(&e->hookq.lock, NULL);
    pthread_cond_init(&e->hookq.cond, NULL);
    return e;
}

/* How many to pop: a batch should run for about batch_budget_ns, so slow (blocking) tasks are
 * taken one at a time and spread over the workers, while no-op tasks come 64 at a time. */
static size_t ct_batch_size(ct_engine *e) {
    uint64_t avg = atomic_load_explicit(&e->avg_exec_ns, memory_order_relaxed);
    size_t n = (size_t)e->cfg.batch_max;
    if (avg > 0) {
        uint64_t fit = e->cfg.batch_budget_ns / avg;
        if (fit < n) n = fit ? (size_t)fit : 1;
    }
    return n;
}

void ct_engine_note_exec(ct_engine *e, uint64_t ns, size_t ntasks) {
    if (!ntasks) return;
    uint64_t sample = ns / ntasks;
    uint64_t avg = atomic_load_explicit(&e->avg_exec_ns, memory_order_relaxed);
    /* EWMA with weight 1/4: adapts within a few batches when the workload changes */
    uint64_t nw = avg ? avg - avg / 4 + sample / 4 : sample;
    atomic_store_explicit(&e->avg_exec_ns, nw ? nw : 1, memory_order_relaxed);
}

/* pop_lock held */
static size_t ct_pop_from(ct_engine *e, int p, ct_task **out, size_t max) {
    size_t k = 0;
    while (k < max) {
        ct_qnode *n = ct_queue_pop(&e->queues[p]);
        if (!n) break;
        out[k++] = (ct_task *)n;
    }
    if (k) atomic_fetch_sub_explicit(&e->qcount[p], (int64_t)k, memory_order_relaxed);
    return k;
}

static void ct_engine_popped(ct_engine *e, size_t n) {
    atomic_fetch_add(&e->running, (int64_t)n);
    atomic_fetch_sub(&e->queued, (int64_t)n);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&e->space_waiters, memory_order_relaxed) > 0) {
        pthread_mutex_lock(&e->idle_lock);
        pthread_cond_broadcast(&e->space_cond);
        pthread_mutex_unlock(&e->idle_lock);
    }
}

static int ct_engine_visible_work(ct_engine *e) {
    for (int p = 0; p < CT_NPRIO; p++)
        if (atomic_load(&e->qcount[p]) > 0) return 1;
    return 0;
}

/* Strict priority with ageing. Rule: a pop fills its batch from the highest priority down. A
 * lower queue that holds work but gets nothing from a pop was "passed over"; once it has been
 * passed over continuously for aging_ns, the next pop serves it first (one batch). So under a
 * steady stream of higher work each lower level still gets a batch every aging_ns, and time
 * spent paused or idle never counts as starvation. */
static size_t ct_pop_batch(ct_engine *e, ct_task **out, size_t max) {
    if (atomic_load_explicit(&e->paused, memory_order_relaxed)) return 0;
    pthread_mutex_lock(&e->pop_lock);
    size_t n = 0;
    uint64_t now = ct_now_ns();
    int served[CT_NPRIO] = {0};
    for (int p = CT_NPRIO - 1; p >= 1; p--) {
        if (e->starve_since[p] && now - e->starve_since[p] >= e->cfg.aging_ns) {
            size_t k = ct_pop_from(e, p, out, max);
            n += k;
            served[p] = k > 0;
            if (k) break;
        }
    }
    for (int p = 0; p < CT_NPRIO && n < max; p++) {
        size_t k = ct_pop_from(e, p, out + n, max - n);
        if (k) served[p] = 1;
        n += k;
    }
    for (int p = 1; p < CT_NPRIO; p++) {
        if (served[p] || atomic_load_explicit(&e->qcount[p], memory_order_relaxed) <= 0)
            e->starve_since[p] = 0;
        else if (!e->starve_since[p])
            e->starve_since[p] = now;
    }
    pthread_mutex_unlock(&e->pop_lock);
    if (n) ct_engine_popped(e, n);
    return n;
}

size_t ct_engine_pop_urgent(ct_engine *e, int prio, ct_task **out, size_t max) {
    size_t n = 0;
    pthread_mutex_lock(&e->pop_lock);
    for (int p = 0; p < prio && n < max; p++) {
        size_t k = ct_pop_from(e, p, out + n, max - n);
        if (k) e->starve_since[p] = 0;
        n += k;
    }
    pthread_mutex_unlock(&e->pop_lock);
    if (n) ct_engine_popped(e, n);
    return n;
}

/* Wake one sleeping worker, unless one is already being woken: a burst of submits costs one
 * futex wake, not one per task. The woken worker clears `waking` and, if it leaves work
 * behind, wakes the next (chain wake in ct_worker_main). */
static void ct_wake_one(ct_engine *e) {
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&e->sleepers, memory_order_relaxed) == 0) return;
    if (atomic_load_explicit(&e->paused, memory_order_relaxed)) return;
    if (atomic_exchange(&e->waking, 1)) return;
    pthread_mutex_lock(&e->idle_lock);
    if (atomic_load(&e->sleepers) > 0)
        pthread_cond_signal(&e->work_cond);   /* a sleeper is in cond_wait: we hold its lock */
    else
        atomic_store(&e->waking, 0);
    pthread_mutex_unlock(&e->idle_lock);
}

/* ---- batches and stealing ---- */

#define CT_RANGE(gen, head, tail) (((uint64_t)(gen) << 32) | ((uint64_t)(head) << 16) | (uint64_t)(tail))
#define CT_GEN(r) ((uint32_t)((r) >> 32))
#define CT_HEAD(r) ((uint32_t)(((r) >> 16) & 0xFFFFu))
#define CT_TAIL(r) ((uint32_t)((r)&0xFFFFu))

static void ct_held_add(ct_engine *e, ct_task **ts, size_t n, int sign, int *min_prio, int *has_py) {
    int64_t c[CT_HELD_PRIO] = {0};
    int mp = CT_NPRIO, py = 0;
    for (size_t i = 0; i < n; i++) {
        int p = ts[i]->priority;
        if (p < mp) mp = p;
        if (p < CT_HELD_PRIO) c[p]++;
        py |= ts[i]->kind != CT_KIND_C;
    }
    if (has_py) *has_py = py;
    for (int p = 0; p < CT_HELD_PRIO; p++)
        if (c[p]) atomic_fetch_add_explicit(&e->held[p], sign * c[p], memory_order_relaxed);
    if (min_prio) *min_prio = mp;
}

/* Owner only, batch empty: publish tasks[0..n) as its batch. */
static void ct_worker_publish(ct_worker *w, ct_task **tasks, size_t n) {
    int mp;
    ct_held_add(w->engine, tasks, n, +1, &mp, &w->batch_has_py);
    /* entries are atomics: a thief may read stale ones while this refill runs (its CAS on the
     * range then fails and it drops what it read) */
    for (size_t i = 0; i < n; i++) atomic_store_explicit(&w->batch[i], tasks[i], memory_order_relaxed);
    atomic_store_explicit(&w->batch_prio, mp, memory_order_relaxed);
    uint64_t r = atomic_load_explicit(&w->range, memory_order_relaxed);
    /* release: the entries written before are visible to a thief that acquires the range */
    atomic_store_explicit(&w->range, CT_RANGE(CT_GEN(r) + 1, 0, n), memory_order_release);
}

ct_task *ct_worker_take(ct_worker *w) {
    uint64_t r = atomic_load_explicit(&w->range, memory_order_acquire);
    for (;;) {
        uint32_t head = CT_HEAD(r), tail = CT_TAIL(r);
        if (head >= tail) return NULL;
        ct_task *t = atomic_load_explicit(&w->batch[head], memory_order_relaxed);
        if (atomic_compare_exchange_weak_explicit(&w->range, &r, CT_RANGE(CT_GEN(r), head + 1, tail),
                                                  memory_order_acq_rel, memory_order_acquire)) {
            if (t->priority < CT_HELD_PRIO)
                atomic_fetch_sub_explicit(&w->engine->held[t->priority], 1, memory_order_relaxed);
            return t;
        }
    }
}

/* Take every not-yet-started task of v's batch into out. Returns how many (0 if none). */
static size_t ct_worker_grab(ct_worker *v, ct_task **out) {
    uint64_t r = atomic_load_explicit(&v->range, memory_order_acquire);
    for (;;) {
        uint32_t head = CT_HEAD(r), tail = CT_TAIL(r);
        if (head >= tail) return 0;
        size_t k = tail - head;
        for (size_t j = 0; j < k; j++) out[j] = atomic_load_explicit(&v->batch[head + j], memory_order_relaxed);
        /* the generation in r makes this fail if the owner refilled meanwhile */
        if (atomic_compare_exchange_weak_explicit(&v->range, &r, CT_RANGE(CT_GEN(r), head, head),
                                                  memory_order_acq_rel, memory_order_acquire)) {
            ct_held_add(v->engine, out, k, -1, NULL, NULL);   /* no longer in v's batch */
            return k;
        }
    }
}

size_t ct_engine_grab_urgent(ct_engine *e, ct_worker *self, int prio, ct_task **out) {
    for (int i = 0; i < e->nworkers; i++) {
        ct_worker *v = &e->workers[i];
        if (v == self || atomic_load_explicit(&v->batch_prio, memory_order_relaxed) >= prio) continue;
        size_t k = ct_worker_grab(v, out);
        if (k) return k;
    }
    return 0;
}

/* Steal every not-yet-started task of a sibling stuck on one task for more than the batch
 * budget. Returns how many were moved into thief->batch (published). */
static size_t ct_worker_steal(ct_engine *e, ct_worker *thief, ct_task **out) {
    uint64_t now = ct_now_ns(), patience = e->cfg.batch_budget_ns;
    for (int i = 0; i < e->nworkers; i++) {
        ct_worker *v = &e->workers[i];
        if (v == thief) continue;
        uint64_t r = atomic_load_explicit(&v->range, memory_order_acquire);
        if (CT_HEAD(r) >= CT_TAIL(r)) continue;
        uint64_t since = atomic_load_explicit(&v->current_since, memory_order_relaxed);
        if (!since || now - since < patience) continue;   /* not started (GIL) or not stuck yet */
        size_t k = ct_worker_grab(v, out);
        if (k) {
            ct_worker_publish(thief, out, k);
            atomic_fetch_add_explicit(&thief->stolen, k, memory_order_relaxed);
            return k;
        }
    }
    return 0;
}

static void ct_wake_sibling(ct_engine *e) {
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&e->sleepers, memory_order_relaxed) == 0) return;
    pthread_mutex_lock(&e->idle_lock);
    pthread_cond_signal(&e->work_cond);
    pthread_mutex_unlock(&e->idle_lock);
}

/* When a sibling's batch leftovers become stealable (0 = no sibling has leftovers). */
static uint64_t ct_steal_deadline(ct_engine *e, ct_worker *self) {
    uint64_t deadline = 0, patience = e->cfg.batch_budget_ns;
    for (int i = 0; i < e->nworkers; i++) {
        ct_worker *v = &e->workers[i];
        if (v == self) continue;
        uint64_t r = atomic_load_explicit(&v->range, memory_order_acquire);
        if (CT_HEAD(r) >= CT_TAIL(r)) continue;
        uint64_t since = atomic_load_explicit(&v->current_since, memory_order_relaxed);
        /* An owner that has not started (waiting for the GIL) is not watched: it signals a
         * sleeper when it starts (ct_worker_begin_batch). */
        if (!since) continue;
        if (!deadline || since + patience < deadline) deadline = since + patience;
    }
    return deadline;
}

void ct_worker_begin_batch(ct_worker *w, uint64_t now) {
    atomic_store_explicit(&w->current_since, now, memory_order_relaxed);
    /* Batch-mates wait behind the task about to start: make sure a sleeping sibling watches
     * them, in case that task blocks (not coalesced with the queue wakes: those may be
     * consumed by a worker that never looks at batches). */
    uint64_t r = atomic_load_explicit(&w->range, memory_order_acquire);
    if (CT_HEAD(r) < CT_TAIL(r)) {
        ct_engine *e = w->engine;
        ct_wake_sibling(e);
        /* No sibling idle to take them either: the pool may be too small (blocking tasks),
         * let the auto-scaler look (it counts batched tasks as waiting). */
        if (atomic_load_explicit(&e->scaler_enabled, memory_order_relaxed) &&
            !atomic_load_explicit(&e->scaler_armed, memory_order_relaxed) &&
            atomic_load_explicit(&e->sleepers, memory_order_relaxed) == 0)
            ct_engine_scaler_wake(e);
    }
}

/* Returns 0 when the worker should exit. Sleeps until signalled, or until a sibling's batch
 * leftovers become stealable. */
static int ct_worker_sleep(ct_engine *e, ct_worker *w) {
    int keep = 1, timed_out = 0;
    uint64_t deadline_ns = 0;
    pthread_mutex_lock(&e->idle_lock);
    atomic_fetch_add(&e->sleepers, 1);
    for (;;) {
        if (atomic_load(&w->retire)) {   /* scaled down: leave now */
            keep = 0;
            break;
        }
        /* Look at the siblings' batches only now, after announcing the sleep, and again after
         * every wake: a worker that publishes a batch either is seen here or sees sleepers > 0
         * and signals (ct_wake_sibling); both sides are seq_cst. */
        deadline_ns = ct_steal_deadline(e, w);
        if (atomic_load(&e->stopping)) {
            /* exit only once the queues are empty (or the engine is paused) */
            if (atomic_load(&e->paused) || !ct_engine_visible_work(e)) keep = 0;
            break;
        }
        if (!atomic_load(&e->paused) && ct_engine_visible_work(e)) break;
        if (deadline_ns) {
            struct timespec ts = ct_deadline_ts(deadline_ns);
            int rc = pthread_cond_timedwait(&e->work_cond, &e->idle_lock, &ts);
            atomic_store(&e->waking, 0);
            if (rc != 0) {
                timed_out = 1;   /* time to look at the siblings again */
                break;
            }
            continue;
        }
        pthread_cond_wait(&e->work_cond, &e->idle_lock);
        /* Whoever is woken consumes the pending wake, even if a busy sibling took the work
         * first and this worker goes back to sleep: otherwise `waking` would stay set and no
         * submitter would signal again. */
        atomic_store(&e->waking, 0);
    }
    /* This worker was watching a sibling's batch leftovers but leaves for queued work: hand
     * the watch to another sleeper, or the leftovers could wait behind a stuck task while
     * workers sleep. */
    if (deadline_ns && !timed_out && atomic_load(&e->sleepers) > 1) pthread_cond_signal(&e->work_cond);
    atomic_fetch_sub(&e->sleepers, 1);
    pthread_mutex_unlock(&e->idle_lock);
    return keep;
}

int ct_engine_claim(ct_engine *e, ct_task *t, int worker_id) {
    if (!ct_task_claim(t, worker_id)) return 0;
    /* Counted as a pop would count it, queued -> running (its room is free now: space waiters
     * are woken), plus the claimer's own count of running. Running first, then out of queued:
     * queued + running never reads 0 on the way. The node's count keeps a drain waiting until
     * the node has left its queue too (ct_engine_drop_claimed). */
    atomic_fetch_add(&e->running, 2);
    ct_engine_unreserve(e, 1);
    return 1;
}

int ct_engine_drop_claimed(ct_engine *e, ct_task *t) {
    if (!(atomic_load_explicit(&t->state, memory_order_acquire) & CT_F_INLINE)) return 0;
    /* its pop counted it queued -> running once more (ct_engine_claim already had): undone,
     * and the claim's count for the node ends. queued first, so a drain never sees 0 and 0
     * while a count is off */
    atomic_fetch_add(&e->queued, 1);
    ct_engine_running_done(e, 2);
    ct_task_decref(&e->hooks, t);
    return 1;
}

static void ct_engine_skip(ct_engine *e, ct_task *t) {
    if (ct_engine_drop_claimed(e, t)) return;   /* its waiter ran it */
    if (t->kind != CT_KIND_C && e->hooks.skip) {   /* its callbacks must learn of the end */
        e->hooks.skip(e, t);
        return;
    }
    ct_engine_running_done(e, 1);
    ct_task_decref(&e->hooks, t);
}

void ct_engine_run_c(ct_worker *w, ct_task *t) {
    ct_engine *e = w->engine;
    if (!ct_task_begin(t, w->id)) {
        ct_engine_skip(e, t);
        return;
    }
    uint64_t start = ct_now_ns();
    __atomic_store_n(&t->t_start, start, __ATOMIC_RELAXED);
    atomic_store_explicit(&w->current_since, start, memory_order_relaxed);
    ((ct_c_func)t->fn)(t->arg);
    uint64_t end = ct_now_ns();
    __atomic_store_n(&t->t_end, end, __ATOMIC_RELAXED);
    ct_hist_record_owner(&w->exec_hist, end - start);
    ct_hist_record_owner(&w->wait_hist, start - t->t_enqueue);
    ct_rate_record_owner(&w->rate, end);
    ct_task_finish(e, t, CT_SUCCEEDED);
    atomic_fetch_add_explicit(&w->processed, 1, memory_order_relaxed);
    ct_task_decref(&e->hooks, t);
}

static void *ct_worker_main(void *arg) {
    ct_worker *w = arg;
    ct_engine *e = w->engine;
#if CT_HAVE_GETTID
    atomic_store(&w->tid, (int)syscall(SYS_gettid));
#else
    atomic_store(&w->tid, 0); /* unknown: no per-thread CPU figures from /proc */
#endif
    if (e->hooks.thread_start) e->hooks.thread_start(w);
    int empty_pops = 0;
    ct_task *got[CT_BATCH_HARD_MAX];
    for (;;) {
        size_t n = ct_pop_batch(e, got, ct_batch_size(e));
        if (n) {
            ct_worker_publish(w, got, n);
        } else {
            n = ct_worker_steal(e, w, got);
            if (n == 0) {
                /* Work can be visible in qcount while its link is still landing (a producer
                 * between two instructions): yield once before sleeping on it again. */
                if (empty_pops++ > 0 && ct_engine_visible_work(e) && !atomic_load(&e->paused)) sched_yield();
                if (!ct_worker_sleep(e, w)) break;
                continue;
            }
        }
        empty_pops = 0;
        if (ct_engine_visible_work(e)) ct_wake_one(e);   /* more left: get a sibling going */
        uint64_t t0 = ct_now_ns();
        if (e->hooks.run_batch) {
            e->hooks.run_batch(w);
        } else {
            ct_task *t;
            int first = 1;
            while ((t = ct_worker_take(w))) {
                if (first) ct_worker_begin_batch(w, ct_now_ns());
                first = 0;
                ct_engine_run_c(w, t);
            }
        }
        atomic_store_explicit(&w->current_since, 0, memory_order_relaxed);
        uint64_t dt = ct_now_ns() - t0;
        atomic_fetch_add_explicit(&w->busy_ns, dt, memory_order_relaxed);
        /* run_batch measures its own tasks (it waits for the GIL first, which is not the
         * tasks' time and must not shrink the batches) */
        if (!e->hooks.run_batch) ct_engine_note_exec(e, dt, n);
        if (atomic_load(&w->retire)) break;   /* replaced or scaled down */
        /* Saturated (work waits, no sibling idle): let the auto-scaler look, if it is on. */
        if (atomic_load_explicit(&e->scaler_enabled, memory_order_relaxed) &&
            !atomic_load_explicit(&e->scaler_armed, memory_order_relaxed) &&
            atomic_load_explicit(&e->sleepers, memory_order_relaxed) == 0 && ct_engine_visible_work(e))
            ct_engine_scaler_wake(e);
    }
    if (e->hooks.thread_stop) e->hooks.thread_stop(w);
    ct_slab_flush_thread();
    /* Last: the slot may be reused (and this thread joined) from now on. thread_stop may need
     * the GIL, and whoever adds a worker may hold it: a slot marked exited before that would
     * have it join a thread waiting for the GIL its joiner holds. */
    atomic_store(&w->exited, 1);
    return NULL;
}

int ct_engine_start(ct_engine *e) {
    for (int i = 0; i < e->cfg.workers; i++)
        if (ct_engine_add_worker(e) != CT_OK) return CT_ENOMEM;
    return CT_OK;
}

int ct_engine_add_worker(ct_engine *e) {
    int rc = CT_ENOMEM;
    pthread_mutex_lock(&e->grow_lock);
    if (atomic_load(&e->stopping)) {
        pthread_mutex_unlock(&e->grow_lock);
        return rc;
    }
    int n = atomic_load(&e->nworkers), slot = -1;
    /* reuse the slot of a worker that exited (retired), else take a new one */
    for (int i = 0; i < n && slot < 0; i++)
        if (e->workers[i].started && atomic_load(&e->workers[i].exited)) slot = i;
    if (slot >= 0) {
        ct_worker *w = &e->workers[slot];
        pthread_join(w->thread, NULL);   /* it has exited: returns at once */
        w->started = 0;
        atomic_store(&w->retire, 0);
        atomic_store(&w->exited, 0);
        atomic_store(&w->current_since, 0);
    } else if (n < e->cfg.max_threads) {
        slot = n;
    }
    if (slot >= 0) {
        ct_worker *w = &e->workers[slot];
        if (pthread_create(&w->thread, NULL, ct_worker_main, w) == 0) {
            w->started = 1;
            if (slot == n) atomic_store(&e->nworkers, n + 1);   /* siblings may now look at it */
            rc = CT_OK;
        }
    }
    pthread_mutex_unlock(&e->grow_lock);
    return rc;
}

void ct_engine_hold(ct_engine *e) { atomic_fetch_add(&e->running, 1); }
void ct_engine_unhold(ct_engine *e) { ct_engine_running_done(e, 1); }

int ct_engine_block_begin(ct_engine *e) {
    /* Always a stand-in, even when a sibling sleeps: that sibling may be retiring, or take
     * other work that blocks too; a thread start is small next to a wait that blocks. */
    return ct_engine_add_worker(e) == CT_OK;
}

void ct_engine_block_end(ct_engine *e, int added) {
    if (added) ct_engine_retire_worker(e);
}

int64_t ct_engine_batched(ct_engine *e) {
    int64_t n = 0;
    int nw = atomic_load(&e->nworkers);
    for (int i = 0; i < nw; i++) {
        uint64_t r = atomic_load_explicit(&e->workers[i].range, memory_order_relaxed);
        if (CT_HEAD(r) < CT_TAIL(r)) n += CT_TAIL(r) - CT_HEAD(r);
    }
    return n;
}

int ct_engine_live_workers(ct_engine *e) {
    int live = 0, n = atomic_load(&e->nworkers);
    for (int i = 0; i < n; i++) {
        ct_worker *w = &e->workers[i];
        live += w->started && !atomic_load(&w->exited) && !atomic_load(&w->retire);
    }
    return live;
}

int ct_engine_retire_worker(ct_engine *e) {
    int rc = CT_EINVAL;
    pthread_mutex_lock(&e->grow_lock);
    if (ct_engine_live_workers(e) > 1) {
        int n = atomic_load(&e->nworkers), pick = -1;
        /* the highest-numbered live worker not running a task, else the highest live one */
        for (int pass = 0; pass < 2 && pick < 0; pass++)
            for (int i = n - 1; i >= 0 && pick < 0; i--) {
                ct_worker *w = &e->workers[i];
                if (!w->started || atomic_load(&w->exited) || atomic_load(&w->retire)) continue;
                if (pass == 0 && atomic_load(&w->current_since)) continue;
                pick = i;
            }
        if (pick >= 0) {
            atomic_store(&e->workers[pick].retire, 1);
            rc = CT_OK;
        }
    }
    pthread_mutex_unlock(&e->grow_lock);
    if (rc == CT_OK) {
        pthread_mutex_lock(&e->idle_lock);
        pthread_cond_broadcast(&e->work_cond);   /* a sleeping one exits now */
        pthread_mutex_unlock(&e->idle_lock);
    }
    return rc;
}

static void ct_engine_scaler_arm_in(ct_engine *e, uint64_t delay_ns) {
    if (!atomic_load_explicit(&e->scaler_enabled, memory_order_relaxed) || !e->scaler_tick) return;
    int expected = 0;
    if (!atomic_compare_exchange_strong(&e->scaler_armed, &expected, 1)) return;
    ct_task_incref(e->scaler_tick);
    uint64_t due = ct_now_ns() + delay_ns;
    if (ct_timer_add(&e->timer, due, e->scaler_tick, CT_TIMER_CALL, 0) != CT_OK) {
        atomic_fetch_sub(&e->scaler_tick->refs, 1);
        atomic_store(&e->scaler_armed, 0);
    }
}

void ct_engine_scaler_arm(ct_engine *e) { ct_engine_scaler_arm_in(e, atomic_load(&e->scaler_interval_ns)); }

/* A worker saw work wait with no idle sibling: the first tick comes at once, so the scaler
 * takes its baseline now and decides one interval later (not two). */
static void ct_engine_scaler_wake(ct_engine *e) { ct_engine_scaler_arm_in(e, 0); }

/* Take room for n tasks if it is there. A compare-and-swap, not add-then-undo: a failed
 * attempt never shows a transient count to anyone (a drain or a blocked producer reading the
 * count at that instant would otherwise sleep through the only change it waits for). */
static int ct_try_reserve(ct_engine *e, int64_t n, int64_t cap) {
    int64_t q = atomic_load_explicit(&e->queued, memory_order_relaxed);
    do {
        if (q + n > cap) return 0;
    } while (!atomic_compare_exchange_weak(&e->queued, &q, q + n));
    return 1;
}

/* Reserve room for n tasks (the queue_size bound). */
static int ct_engine_reserve(ct_engine *e, size_t n, int64_t block_ns) {
    int64_t cap = e->cfg.queue_size;
    if ((int64_t)n > cap) return CT_EFULL;
    if (ct_try_reserve(e, (int64_t)n, cap)) return CT_OK;
    if (block_ns == 0) return CT_EFULL;
    uint64_t deadline = block_ns > 0 ? ct_deadline_after((uint64_t)block_ns) : 0;
    int rc = CT_OK;
    pthread_mutex_lock(&e->idle_lock);
    /* Announce, then look (seq_cst both): a popper lowers queued, then reads space_waiters. */
    atomic_fetch_add(&e->space_waiters, 1);
    for (;;) {
        if (ct_try_reserve(e, (int64_t)n, cap)) break;
        if (!atomic_load(&e->accepting)) {
            rc = CT_ESHUTDOWN;
            break;
        }
        if (deadline) {
            struct timespec ts = ct_deadline_ts(deadline);
            if (pthread_cond_timedwait(&e->space_cond, &e->idle_lock, &ts) != 0 && ct_now_ns() >= deadline) {
                if (!ct_try_reserve(e, (int64_t)n, cap)) rc = CT_ETIMEDOUT;
                break;
            }
        } else {
            pthread_cond_wait(&e->space_cond, &e->idle_lock);
        }
    }
    atomic_fetch_sub(&e->space_waiters, 1);
    pthread_mutex_unlock(&e->idle_lock);
    return rc;
}

int ct_engine_submit_many(ct_engine *e, ct_task **ts, size_t n, int64_t block_ns) {
    if (n == 0) return CT_OK;
    if (!atomic_load_explicit(&e->accepting, memory_order_relaxed)) return CT_ESHUTDOWN;
    int rc = ct_engine_reserve(e, n, block_ns);
    if (rc != CT_OK) {
        if (rc == CT_EFULL || rc == CT_ETIMEDOUT)
            atomic_fetch_add_explicit(&e->rejected, n, memory_order_relaxed);
        return rc;
    }
    /* Re-check after reserving: close() sets accepting=0 and then drains; a submitter that
     * reserved first is seen by the drain (queued > 0), one that reserved after sees
     * accepting == 0 here (both are seq_cst). */
    if (!atomic_load(&e->accepting)) {
        ct_engine_unreserve(e, (int64_t)n);
        return CT_ESHUTDOWN;
    }
    uint64_t now = ct_now_ns();
    for (size_t i = 0; i < n; i++) {
        ct_task *t = ts[i];
        int p = t->priority < CT_NPRIO ? t->priority : CT_NPRIO - 1;
        t->priority = (uint8_t)p;
        t->t_enqueue = now;
        ct_queue_push(&e->queues[p], &t->link);
        atomic_fetch_add_explicit(&e->qcount[p], 1, memory_order_relaxed);
    }
    atomic_fetch_add_explicit(&e->submitted, n, memory_order_relaxed);
    ct_wake_one(e);
    return CT_OK;
}

int ct_engine_submit(ct_engine *e, ct_task *t, int64_t block_ns) {
    return ct_engine_submit_many(e, &t, 1, block_ns);
}

int ct_engine_submit_at(ct_engine *e, ct_task *t, uint64_t due_ns, int64_t block_ns) {
    if (!atomic_load_explicit(&e->accepting, memory_order_relaxed)) return CT_ESHUTDOWN;
    int rc = ct_engine_reserve(e, 1, block_ns);
    if (rc != CT_OK) {
        if (rc == CT_EFULL || rc == CT_ETIMEDOUT) atomic_fetch_add_explicit(&e->rejected, 1, memory_order_relaxed);
        return rc;
    }
    if (!atomic_load(&e->accepting)) {
        ct_engine_unreserve(e, 1);
        return CT_ESHUTDOWN;
    }
    if (t->priority >= CT_NPRIO) t->priority = CT_NPRIO - 1;
    t->t_enqueue = ct_now_ns();
    atomic_store_explicit(&t->state, (atomic_load(&t->state) & ~CT_STATUS_MASK) | CT_SCHEDULED, memory_order_release);
    atomic_fetch_add(&e->scheduled, 1);
    atomic_fetch_add_explicit(&e->submitted, 1, memory_order_relaxed);
    rc = ct_timer_add(&e->timer, due_ns, t, CT_TIMER_READY, 0);
    if (rc != CT_OK) {
        atomic_fetch_sub(&e->scheduled, 1);
        atomic_fetch_sub(&e->submitted, 1);
        atomic_store(&t->state, (atomic_load(&t->state) & ~CT_STATUS_MASK) | CT_PENDING);
        ct_engine_unreserve(e, 1);
    }
    return rc;
}

int ct_engine_reschedule(ct_engine *e, ct_task *t, uint64_t due_ns) {
    uint32_t old = atomic_load_explicit(&t->state, memory_order_acquire);
    for (;;) {
        if ((old & CT_STATUS_MASK) != CT_RUNNING) return CT_EINVAL;
        uint32_t nw = (old & ~(CT_STATUS_MASK | CT_F_TIMEDOUT)) | CT_SCHEDULED;
        if (atomic_compare_exchange_weak_explicit(&t->state, &old, nw, memory_order_acq_rel, memory_order_acquire))
            break;
    }
    /* queued first, then running: queued + running never reads 0 on the way */
    atomic_fetch_add(&e->queued, 1);
    atomic_fetch_add(&e->scheduled, 1);
    atomic_fetch_add_explicit(&e->retried, 1, memory_order_relaxed);
    int rc = ct_timer_add(&e->timer, due_ns, t, CT_TIMER_READY, 0);
    if (rc != CT_OK) {
        /* no timer (shutting down): due at once, straight into the queue */
        atomic_fetch_sub(&e->scheduled, 1);
        atomic_store(&t->state, (atomic_load(&t->state) & ~CT_STATUS_MASK) | CT_PENDING);
        ct_queue_push(&e->queues[t->priority], &t->link);
        atomic_fetch_add_explicit(&e->qcount[t->priority], 1, memory_order_relaxed);
        ct_wake_one(e);
    }
    ct_engine_running_done(e, 1);
    return CT_OK;
}

/* A watch whose attempt is over: the task ended, waits for a retry, or runs a later attempt. */
static int ct_watch_dead(const ct_timer_entry *en) {
    if (en->kind == CT_TIMER_READY || en->kind == CT_TIMER_CALL) return 0;
    uint32_t st = atomic_load_explicit(&en->task->state, memory_order_acquire);
    return (st & CT_STATUS_MASK) != CT_RUNNING || en->task->attempt != en->token;
}

void ct_engine_sweep_watches(ct_engine *e) {
    ct_task **dead = NULL;
    size_t k = ct_timer_remove_if(&e->timer, ct_watch_dead, &dead);
    atomic_fetch_sub(&e->watches, (int64_t)k);
    for (size_t i = 0; i < k; i++) ct_task_decref(&e->hooks, dead[i]);
    free(dead);
}

int ct_engine_watch(ct_engine *e, ct_task *t, uint64_t due_ns, uint32_t kind, uint32_t token) {
    if (atomic_load(&e->watches) >= e->watch_compact_at) {
        ct_engine_sweep_watches(e);
        int64_t left = atomic_load(&e->watches);
        e->watch_compact_at = left * 2 > 4096 ? left * 2 : 4096;
    }
    ct_task_incref(t);
    int rc = ct_timer_add(&e->timer, due_ns, t, kind, token);
    if (rc != CT_OK)
        atomic_fetch_sub_explicit(&t->refs, 1, memory_order_relaxed);   /* the caller holds one more */
    else
        atomic_fetch_add(&e->watches, 1);
    return rc;
}

void ct_engine_close(ct_engine *e) {
    atomic_store(&e->accepting, 0);
    pthread_mutex_lock(&e->idle_lock);
    pthread_cond_broadcast(&e->space_cond);
    pthread_mutex_unlock(&e->idle_lock);
}

int ct_engine_drain(ct_engine *e, uint64_t deadline_ns) {
    int rc = CT_OK;
    pthread_mutex_lock(&e->idle_lock);
    atomic_fetch_add(&e->drain_waiters, 1);
    while (atomic_load(&e->queued) > 0 || atomic_load(&e->running) > 0) {
        if (deadline_ns) {
            struct timespec ts = ct_deadline_ts(deadline_ns);
            if (pthread_cond_timedwait(&e->drain_cond, &e->idle_lock, &ts) != 0 && ct_now_ns() >= deadline_ns) {
                if (atomic_load(&e->queued) > 0 || atomic_load(&e->running) > 0) rc = CT_ETIMEDOUT;
                break;
            }
        } else {
            pthread_cond_wait(&e->drain_cond, &e->idle_lock);
        }
    }
    atomic_fetch_sub(&e->drain_waiters, 1);
    pthread_mutex_unlock(&e->idle_lock);
    return rc;
}

size_t ct_engine_cancel_queued(ct_engine *e) {
    ct_task *batch[CT_BATCH_HARD_MAX];
    size_t total = 0;
    /* Delayed tasks: cancelled and made due now, so they flow through a queue and out. */
    pthread_mutex_lock(&e->timer.lock);
    int moved = 0;
    for (size_t i = 0; i < e->timer.n; i++) {
        ct_timer_entry *en = &e->timer.heap[i];
        if (en->kind != CT_TIMER_READY) continue;
        uint32_t old = atomic_load(&en->task->state);
        while ((old & CT_STATUS_MASK) == CT_SCHEDULED &&
               !atomic_compare_exchange_weak(&en->task->state, &old, (old & ~CT_STATUS_MASK) | CT_CANCELLED)) {
        }
        if ((old & CT_STATUS_MASK) == CT_SCHEDULED) {
            total++;
            atomic_fetch_add_explicit(&e->cancelled, 1, memory_order_relaxed);
            if (old & CT_F_WAITERS) ct_park_wake(&en->task->state);
        }
        en->due = 0;
        moved = 1;
    }
    if (moved) {
        for (size_t i = e->timer.n / 2 + 1; i-- > 0;) {
            /* re-heapify: every READY entry is now due */
            size_t j = i;
            for (;;) {
                size_t l = 2 * j + 1, r = l + 1, m = j;
                if (l < e->timer.n && e->timer.heap[l].due < e->timer.heap[m].due) m = l;
                if (r < e->timer.n && e->timer.heap[r].due < e->timer.heap[m].due) m = r;
                if (m == j) break;
                ct_timer_entry tmp = e->timer.heap[m];
                e->timer.heap[m] = e->timer.heap[j];
                e->timer.heap[j] = tmp;
                j = m;
            }
        }
        pthread_cond_signal(&e->timer.cond);
    }
    pthread_mutex_unlock(&e->timer.lock);
    for (;;) {
        size_t n = 0;
        pthread_mutex_lock(&e->pop_lock);
        for (int p = 0; p < CT_NPRIO && n < CT_BATCH_HARD_MAX; p++)
            n += ct_pop_from(e, p, batch + n, CT_BATCH_HARD_MAX - n);
        pthread_mutex_unlock(&e->pop_lock);
        if (n == 0) break;
        ct_engine_popped(e, n);
        for (size_t i = 0; i < n; i++) {
            if (ct_task_cancel(e, batch[i])) total++;
            ct_engine_skip(e, batch[i]);
        }
    }
    /* and the tasks sitting in workers' batches, not started yet */
    for (int i = 0; i < e->nworkers; i++) {
        size_t n = ct_worker_grab(&e->workers[i], batch);
        for (size_t j = 0; j < n; j++) {
            if (ct_task_cancel(e, batch[j])) total++;
            ct_engine_skip(e, batch[j]);
        }
    }
    return total;
}

void ct_engine_pause(ct_engine *e, int paused) {
    atomic_store(&e->paused, paused ? 1 : 0);
    if (!paused) {
        pthread_mutex_lock(&e->idle_lock);
        pthread_cond_broadcast(&e->work_cond);
        pthread_mutex_unlock(&e->idle_lock);
    }
}

void ct_engine_stop_workers(ct_engine *e) {
    pthread_mutex_lock(&e->idle_lock);
    atomic_store(&e->stopping, 1);
    pthread_cond_broadcast(&e->work_cond);
    pthread_mutex_unlock(&e->idle_lock);
    pthread_mutex_lock(&e->grow_lock);   /* no worker is added from now on (stopping) */
    int n = atomic_load(&e->nworkers);
    pthread_mutex_unlock(&e->grow_lock);
    for (int i = 0; i < n; i++) {
        if (!e->workers[i].started) continue;
        pthread_join(e->workers[i].thread, NULL);
        e->workers[i].started = 0;
    }
}

void ct_engine_free(ct_engine *e) {
    if (!e) return;
    ct_timer_destroy(&e->timer);
    pthread_mutex_destroy(&e->hookq.lock);
    pthread_cond_destroy(&e->hookq.cond);
    free(e->hookq.q);
    pthread_mutex_destroy(&e->grow_lock);
    pthread_mutex_destroy(&e->pop_lock);
    pthread_mutex_destroy(&e->idle_lock);
    pthread_cond_destroy(&e->work_cond);
    pthread_cond_destroy(&e->space_cond);
    pthread_cond_destroy(&e->drain_cond);
    free(e->workers);
    free(e);
}

void ct_engine_get_stats(ct_engine *e, ct_stats *s) {
    memset(s, 0, sizeof *s);
    for (int p = 0; p < CT_NPRIO; p++) {
        int64_t q = atomic_load_explicit(&e->qcount[p], memory_order_relaxed);
        s->queued[p] = q > 0 ? q : 0;
    }
    int64_t q = atomic_load(&e->queued);
    /* A task a worker has taken into its batch but not started still waits: it is counted
     * as queued, not running (the engine's own running counter includes it, for drain). */
    int64_t running = atomic_load(&e->running), batched = ct_engine_batched(e);
    if (batched > running) batched = running > 0 ? running : 0;
    s->batched = batched;
    s->queued_total = (q > 0 ? q : 0) + batched;
    s->running = running - batched;
    s->submitted = atomic_load(&e->submitted);
    s->succeeded = atomic_load(&e->succeeded);
    s->failed = atomic_load(&e->failed);
    s->cancelled = atomic_load(&e->cancelled);
    s->rejected = atomic_load(&e->rejected);
    s->retried = atomic_load(&e->retried);
    s->timed_out = atomic_load(&e->timed_out);
    s->replaced = atomic_load(&e->replaced);
    s->scheduled = atomic_load(&e->scheduled);
    s->workers = ct_engine_live_workers(e);
    s->sleeping = atomic_load(&e->sleepers);
    s->avg_exec_ns = atomic_load(&e->avg_exec_ns);
    s->accepting = atomic_load(&e->accepting);
    s->paused = atomic_load(&e->paused);
}

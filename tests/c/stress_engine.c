/* stress_engine.c - the engine core's own stress test: C tasks only, no Python.
 *
 *   (a) producers/workers: every task runs exactly once, through blocking submit, the
 *       full-queue path and submit_many
 *   (b) cancellation racing with the workers: each task ran once or was cancelled, never both
 *   (c) waiting on tasks while the workers finish them (a lost wake-up hits a deadline)
 *   (d) pause/resume, full queue, cancel_queued, batch stealing, close (ESHUTDOWN), drain,
 *       stop_workers, free
 *   (e) the node slab: every node handed out was given back
 *   (f) give-up submitters (CT_EFULL) must not strand a
 *       drain or a blocked producer (lost wake-up)
 *   (g) as (b), with threads also claiming queued tasks and running them (help while waiting)
 *
 * Build and run (plain; scripts/sanitizer-tests does the same under TSan and ASan+UBSan):
 *   gcc -std=c11 -O2 -g -pthread -D_GNU_SOURCE -Isrc/catzilla_tasks/_engine tests/c/stress_engine.c \
 *       src/catzilla_tasks/_engine/ct_*.c -o build/stress_engine        (the core: not the py_*.c bindings)
 *   build/stress_engine [N [TESTS]]     N tasks (default 1000000), TESTS a subset of "abcdefg"
 *                                       (default "abcdefg"; e runs last whatever the order)
 * Environment: STRESS_TIMEOUT seconds per test before the watchdog aborts (default 600).
 * Exit status 0 only if every test passed. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "ct_engine.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NPRODUCERS 4
#define NWORKERS 4
#define QUEUE_SIZE 10000
#define MAGIC 0x5eedc0deu

/* ------------------------------------------------------------------ helpers */

static long g_n = 1000000;
static unsigned g_timeout_s = 600;
static const char *volatile g_current = "setup";
static _Atomic long g_fail;     /* failures reported in the current test (any thread) */
static int g_passed, g_failed;
static int g_hooks_ctx;         /* hooks.ctx: the core must not care what it points to */

static void failf(int line, const char *fmt, ...) {
    va_list ap;
    long n = atomic_fetch_add(&g_fail, 1);
    if (n >= 20) return;        /* keep the log readable: the count is reported at the end */
    flockfile(stderr);
    fprintf(stderr, "  FAIL (%s, stress_engine.c:%d): ", g_current, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    funlockfile(stderr);
}
#define FAIL(...) failf(__LINE__, __VA_ARGS__)
#define CHECK(cond, ...)              \
    do {                              \
        if (!(cond)) FAIL(__VA_ARGS__); \
    } while (0)

/* A state the test cannot recover from (workers may still touch test memory): report and
 * leave at once, with the summary line. */
static void fatal(int line, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "  FATAL (%s, stress_engine.c:%d): ", g_current, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    printf("[FAIL] %s\n", g_current);
    printf("stress_engine: %d passed, %d failed\n", g_passed, g_failed + 1);
    fflush(NULL);
    _exit(1);
}
#define FATAL(...) fatal(__LINE__, __VA_ARGS__)

static void on_alarm(int sig) {
    (void)sig;
    static const char a[] = "  FATAL: watchdog: test '";
    static const char b[] = "' still running after STRESS_TIMEOUT seconds (hang / lost wake-up?)\n";
    const char *cur = g_current;
    (void)!write(2, a, sizeof a - 1);
    (void)!write(2, cur, strlen(cur));
    (void)!write(2, b, sizeof b - 1);
    static const char c[] = "stress_engine: watchdog expired, failed\n";
    (void)!write(1, c, sizeof c - 1);
    _exit(3);
}

static double now_s(void) { return (double)ct_now_ns() / 1e9; }
static uint64_t deadline_in_s(double s) { return ct_now_ns() + (uint64_t)(s * 1e9); }
static void sleep_ms(unsigned ms) { usleep(ms * 1000u); }

static inline uint64_t rng_next(uint64_t *s) {   /* xorshift64 */
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n, size);
    if (!p) FATAL("out of memory (%zu x %zu bytes)", n, size);
    return p;
}

static void start_thread(pthread_t *th, void *(*fn)(void *), void *arg) {
    if (pthread_create(th, NULL, fn, arg) != 0) FATAL("pthread_create failed");
}

/* ------------------------------------------------------------------ tasks */

typedef struct slot {
    _Atomic uint32_t runs;      /* incremented by the task: must end at exactly 1 (or 0) */
    _Atomic uint32_t cancels;   /* successful ct_task_cancel calls on the task */
    uint32_t spin;              /* work: set before submit, read by the worker (plain) */
    uint32_t sleep_us;          /* a blocking task: its batch-mates get stolen by idle workers */
    uint32_t plain;             /* written plainly by the task, read plainly after
                                 * drain/wait: ThreadSanitizer checks the happens-before */
} slot_t;

static void task_run(void *data) {
    slot_t *s = data;
    if (s->sleep_us) usleep(s->sleep_us);
    uint64_t x = s->spin;
    for (uint32_t i = 0; i < s->spin; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        __asm__ volatile("" : "+r"(x));
    }
    atomic_fetch_add_explicit(&s->runs, 1, memory_order_relaxed);
    s->plain = MAGIC;
}

/* One task in SLOW_EVERY blocks for a while (longer than the batch budget), so idle workers
 * steal the rest of its batch while it runs. */
#ifndef SLOW_EVERY
#define SLOW_EVERY 1000
#endif
#ifndef SLOW_MIN_US
#define SLOW_MIN_US 300
#endif
#ifndef SLOW_SPAN_US
#define SLOW_SPAN_US 700
#endif
static void maybe_slow(slot_t *s, uint64_t *rng) {
    uint64_t r = rng_next(rng);
    if (r % SLOW_EVERY == 0) s->sleep_us = SLOW_MIN_US + (uint32_t)((r >> 32) % SLOW_SPAN_US);
}

static uint64_t engine_stolen(ct_engine *e) {
    uint64_t n = 0;
    for (int i = 0; i < e->nworkers; i++) n += atomic_load(&e->workers[i].stolen);
    return n;
}

static ct_task *task_make(slot_t *s, int prio) {
    ct_task *t = ct_task_new();
    if (!t) FATAL("ct_task_new returned NULL");
    t->kind = CT_KIND_C;
    t->fn = (void *)task_run;
    t->arg = s;
    t->priority = (uint8_t)prio;
    return t;
}

static ct_engine *engine_make(int workers, int64_t queue_size) {
    ct_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.workers = workers;
    cfg.queue_size = queue_size;
    cfg.aging_ns = 2000000;          /* 2 ms: ageing kicks in during the runs */
    cfg.batch_max = 64;
    cfg.batch_budget_ns = 200000;
    ct_hooks hooks;
    memset(&hooks, 0, sizeof hooks); /* run_batch == NULL: the core runs C tasks itself */
    hooks.ctx = &g_hooks_ctx;
    ct_engine *e = ct_engine_new(&cfg, &hooks);
    if (!e) FATAL("ct_engine_new returned NULL");
    int rc = ct_engine_start(e);
    if (rc != CT_OK) FATAL("ct_engine_start returned %d", rc);
    return e;
}

/* Drain with a deadline far beyond what the remaining work needs. ct_engine_drain re-checks
 * the counters when its deadline passes, so a lost wake-up shows up as a drain that returns
 * CT_OK only at its deadline: that is a failure too. */
static double drain_budget_s(void) { return g_timeout_s * 0.4 < 30 ? g_timeout_s * 0.4 : 30; }

static void engine_drain_or_die(ct_engine *e, const char *what) {
    uint64_t t0 = ct_now_ns();
    double budget = drain_budget_s();
    int rc = ct_engine_drain(e, deadline_in_s(budget));
    double dt = (double)(ct_now_ns() - t0) / 1e9;
    if (rc != CT_OK) {
        ct_stats st;
        ct_engine_get_stats(e, &st);
        FATAL("%s: ct_engine_drain returned %d after %.1fs (queued=%lld running=%lld)", what, rc, dt,
              (long long)st.queued_total, (long long)st.running);
    }
    if (dt >= budget * 0.95)
        FAIL("%s: ct_engine_drain returned CT_OK only at its deadline (%.1fs): the engine was idle but "
             "the drain waiter was not woken (lost wake-up)", what, dt);
}

/* close, drain, stop, free: the normal end of an engine's life */
static void engine_finish(ct_engine *e) {
    ct_engine_close(e);
    engine_drain_or_die(e, "engine_finish");
    ct_engine_stop_workers(e);
    ct_engine_free(e);
}

/* After a drain: no work left, no failures, the given counters. */
static void check_stats(ct_engine *e, uint64_t submitted, uint64_t succeeded, uint64_t cancelled) {
    ct_stats st;
    ct_engine_get_stats(e, &st);
    CHECK(st.queued_total == 0, "stats.queued_total = %lld after drain", (long long)st.queued_total);
    CHECK(st.running == 0, "stats.running = %lld after drain", (long long)st.running);
    for (int p = 0; p < CT_NPRIO; p++)
        CHECK(st.queued[p] == 0, "stats.queued[%d] = %lld after drain", p, (long long)st.queued[p]);
    CHECK(st.submitted == submitted, "stats.submitted = %llu, expected %llu",
          (unsigned long long)st.submitted, (unsigned long long)submitted);
    CHECK(st.succeeded == succeeded, "stats.succeeded = %llu, expected %llu",
          (unsigned long long)st.succeeded, (unsigned long long)succeeded);
    CHECK(st.cancelled == cancelled, "stats.cancelled = %llu, expected %llu",
          (unsigned long long)st.cancelled, (unsigned long long)cancelled);
    CHECK(st.failed == 0, "stats.failed = %llu", (unsigned long long)st.failed);
}

/* ------------------------------------------------------------------ (a) exactly once */

typedef struct prod_a {
    ct_engine *e;
    slot_t *slots;
    long lo, hi;
    int id;
    uint64_t singles, many_calls, efull_retries;
} prod_a;

static _Atomic int g_a_done;   /* producers finished */

static void *producer_a(void *arg) {
    prod_a *a = arg;
    uint64_t rng = 0x9E3779B97F4A7C15ull * (uint64_t)(a->id + 1);
    ct_task *batch[128];
    long i = a->lo;
    while (i < a->hi) {
        long k = 1 + (long)(rng_next(&rng) % 128);
        if (k > a->hi - i) k = a->hi - i;
        int mode = (int)(rng_next(&rng) % 8);
        if (mode < 2) {
            /* all or none, waiting for room */
            for (long j = 0; j < k; j++) {
                maybe_slow(&a->slots[i + j], &rng);
                batch[j] = task_make(&a->slots[i + j], (int)(rng_next(&rng) % CT_NPRIO));
            }
            int rc = ct_engine_submit_many(a->e, batch, (size_t)k, -1);
            a->many_calls++;
            if (rc != CT_OK) {
                FAIL("ct_engine_submit_many(n=%ld, block=-1) returned %d", k, rc);
                for (long j = 0; j < k; j++) ct_task_decref(NULL, batch[j]);
            }
        } else {
            for (long j = 0; j < k; j++) {
                maybe_slow(&a->slots[i + j], &rng);
                ct_task *t = task_make(&a->slots[i + j], (int)(rng_next(&rng) % CT_NPRIO));
                int rc;
                if (mode == 2) {
                    /* no blocking: on CT_EFULL the node is still ours, try again */
                    while ((rc = ct_engine_submit(a->e, t, 0)) == CT_EFULL) {
                        a->efull_retries++;
                        sched_yield();
                    }
                } else {
                    rc = ct_engine_submit(a->e, t, -1);
                }
                a->singles++;
                if (rc != CT_OK) {
                    FAIL("ct_engine_submit(block=%d) returned %d", mode == 2 ? 0 : -1, rc);
                    ct_task_decref(NULL, t);
                }
            }
        }
        i += k;
    }
    atomic_fetch_add(&g_a_done, 1);
    return NULL;
}

static void test_a(void) {
    long n = g_n;
    slot_t *slots = xcalloc((size_t)n, sizeof *slots);
    ct_engine *e = engine_make(NWORKERS, QUEUE_SIZE);
    prod_a prods[NPRODUCERS];
    pthread_t th[NPRODUCERS];
    double t0 = now_s();
    atomic_store(&g_a_done, 0);
    for (int p = 0; p < NPRODUCERS; p++) {
        prods[p] = (prod_a){.e = e, .slots = slots, .lo = n * p / NPRODUCERS, .hi = n * (p + 1) / NPRODUCERS, .id = p};
        start_thread(&th[p], producer_a, &prods[p]);
    }
    /* watch the engine while the producers run: the full-queue path must have been taken */
    int64_t peak_queued = 0;
    int peak_space_waiters = 0;
    while (atomic_load(&g_a_done) < NPRODUCERS) {
        int64_t q = atomic_load(&e->queued);
        int sw = atomic_load(&e->space_waiters);
        if (q > peak_queued) peak_queued = q;
        if (sw > peak_space_waiters) peak_space_waiters = sw;
        usleep(200);
    }
    for (int p = 0; p < NPRODUCERS; p++) pthread_join(th[p], NULL);
    engine_drain_or_die(e, "test a");
    double dt = now_s() - t0;

    long bad_runs = 0, bad_plain = 0;
    for (long i = 0; i < n; i++) {
        uint32_t r = atomic_load_explicit(&slots[i].runs, memory_order_relaxed);
        if (r != 1) {
            if (bad_runs++ < 5) FAIL("task %ld ran %u times (expected exactly 1)", i, r);
        } else if (slots[i].plain != MAGIC) {
            if (bad_plain++ < 5) FAIL("task %ld: its write is not visible after drain", i);
        }
    }
    CHECK(bad_runs == 0, "%ld of %ld tasks did not run exactly once", bad_runs, n);
    check_stats(e, (uint64_t)n, (uint64_t)n, 0);
    uint64_t stolen = engine_stolen(e);
    uint64_t singles = 0, many = 0, retries = 0;
    for (int p = 0; p < NPRODUCERS; p++) {
        singles += prods[p].singles;
        many += prods[p].many_calls;
        retries += prods[p].efull_retries;
    }
    engine_finish(e);
    free(slots);
    printf("  a: %ld tasks (%llu single submits, %llu submit_many calls, %llu CT_EFULL retries), "
           "%d producers, %d workers, queue_size %d: %.2fs, %.0f tasks/s\n",
           n, (unsigned long long)singles, (unsigned long long)many, (unsigned long long)retries, NPRODUCERS,
           NWORKERS, QUEUE_SIZE, dt, (double)n / dt);
    printf("  a: peak queued %lld, peak producers blocked on a full queue %d%s; %llu tasks stolen from "
           "the batches of blocked workers\n", (long long)peak_queued, peak_space_waiters,
           retries == 0 && peak_space_waiters == 0 ? " (note: the full-queue path was not seen)" : "",
           (unsigned long long)stolen);
}

/* ------------------------------------------------------------------ (b) cancellation race */

typedef struct prod_b {
    ct_engine *e;
    slot_t *slots;
    ct_task **tasks;
    long base, count;
    _Atomic long published;   /* tasks[base .. base+published) are submitted */
    int id;
} prod_b;

static _Atomic int g_b_stop;
static int g_b_claim;   /* test g: the racing threads also claim tasks and run them (help while waiting) */

static void *producer_b(void *arg) {
    prod_b *b = arg;
    uint64_t rng = 0xD1B54A32D192ED03ull * (uint64_t)(b->id + 1);
    for (long k = 0; k < b->count; k++) {
        long i = b->base + k;
        b->slots[i].spin = (uint32_t)(rng_next(&rng) % 256);
        maybe_slow(&b->slots[i], &rng);
        ct_task *t = task_make(&b->slots[i], (int)(rng_next(&rng) % CT_NPRIO));
        ct_task_incref(t);   /* ours: the node stays valid after the engine drops its reference */
        b->tasks[i] = t;
        int rc = ct_engine_submit(b->e, t, -1);
        if (rc != CT_OK) {
            FAIL("ct_engine_submit(block=-1) returned %d", rc);
            ct_task_decref(NULL, t);
            ct_task_decref(NULL, t);
            b->tasks[i] = NULL;
        }
        atomic_store_explicit(&b->published, k + 1, memory_order_release);
    }
    return NULL;
}

typedef struct canceller {
    ct_engine *e;
    prod_b *prods;
    slot_t *slots;
    int id;
    uint64_t attempts, hits, claims;
} canceller;

static void *canceller_b(void *arg) {
    canceller *c = arg;
    uint64_t rng = 0x2545F4914F6CDD1Dull * (uint64_t)(c->id + 7);
    while (!atomic_load_explicit(&g_b_stop, memory_order_acquire)) {
        prod_b *b = &c->prods[rng_next(&rng) % NPRODUCERS];
        long pub = atomic_load_explicit(&b->published, memory_order_acquire);
        if (pub == 0) {
            sched_yield();
            continue;
        }
        /* mostly the newest tasks (likely still queued), sometimes any */
        uint64_t r = rng_next(&rng);
        long back = (r & 3) ? (long)((r >> 8) % 2048) : (long)((r >> 8) % (uint64_t)pub);
        if (back >= pub) back = pub - 1;
        long i = b->base + pub - 1 - back;
        ct_task *t = b->tasks[i];
        if (!t) continue;
        if (g_b_claim && (r & 4)) {
            /* a waiter helping: it claims the task and runs it itself, as py_run.c's help_run
             * (the worker that pops it then only drops it: ct_engine_drop_claimed) */
            if (ct_engine_claim(c->e, t, NWORKERS + c->id)) {
                ct_task_incref(t);
                ((ct_c_func)t->fn)(t->arg);
                ct_task_finish(c->e, t, CT_SUCCEEDED);
                ct_task_decref(NULL, t);
                c->claims++;
            }
            continue;
        }
        int rc = ct_task_cancel(c->e, t);
        c->attempts++;
        if (rc == 1) {
            atomic_fetch_add_explicit(&c->slots[i].cancels, 1, memory_order_relaxed);
            c->hits++;
        } else if (rc != 0) {
            FAIL("ct_task_cancel returned %d", rc);
        }
        if ((r >> 60) == 0) sched_yield();
    }
    return NULL;
}

static void test_b(void) {
    long n = g_n / 4 > 1000 ? g_n / 4 : 1000;
    slot_t *slots = xcalloc((size_t)n, sizeof *slots);
    ct_task **tasks = xcalloc((size_t)n, sizeof *tasks);
    ct_engine *e = engine_make(NWORKERS, QUEUE_SIZE);
    prod_b prods[NPRODUCERS];
    canceller cs[2];
    pthread_t pth[NPRODUCERS], cth[2];
    double t0 = now_s();
    atomic_store(&g_b_stop, 0);
    for (int p = 0; p < NPRODUCERS; p++) {
        prods[p].e = e;
        prods[p].slots = slots;
        prods[p].tasks = tasks;
        prods[p].base = n * p / NPRODUCERS;
        prods[p].count = n * (p + 1) / NPRODUCERS - prods[p].base;
        atomic_init(&prods[p].published, 0);
        prods[p].id = p;
    }
    for (int c = 0; c < 2; c++) {
        cs[c] = (canceller){.e = e, .prods = prods, .slots = slots, .id = c};
        start_thread(&cth[c], canceller_b, &cs[c]);
    }
    for (int p = 0; p < NPRODUCERS; p++) start_thread(&pth[p], producer_b, &prods[p]);
    for (int p = 0; p < NPRODUCERS; p++) pthread_join(pth[p], NULL);
    atomic_store_explicit(&g_b_stop, 1, memory_order_release);
    for (int c = 0; c < 2; c++) pthread_join(cth[c], NULL);
    engine_drain_or_die(e, "test b");
    double dt = now_s() - t0;

    long ran = 0, cancelled = 0, bad = 0;
    for (long i = 0; i < n; i++) {
        uint32_t r = atomic_load_explicit(&slots[i].runs, memory_order_relaxed);
        uint32_t c = atomic_load_explicit(&slots[i].cancels, memory_order_relaxed);
        ran += r;
        cancelled += c;
        if (r + c != 1 || r > 1 || c > 1) {
            if (bad++ < 5) FAIL("task %ld: ran %u times, cancelled %u times (expected exactly one of the two)", i, r, c);
            continue;
        }
        if (!tasks[i]) continue;
        uint32_t st = ct_task_status(tasks[i]);
        if (r) {
            CHECK(st == CT_SUCCEEDED, "task %ld ran but its status is %u", i, st);
            CHECK(slots[i].plain == MAGIC, "task %ld: its write is not visible after drain", i);
        } else {
            CHECK(st == CT_CANCELLED, "task %ld was cancelled but its status is %u", i, st);
        }
    }
    CHECK(bad == 0, "%ld of %ld tasks were not exactly 'ran once' xor 'cancelled once'", bad, n);
    check_stats(e, (uint64_t)n, (uint64_t)ran, (uint64_t)cancelled);
    uint64_t stolen = engine_stolen(e);
    for (long i = 0; i < n; i++)
        if (tasks[i]) ct_task_decref(NULL, tasks[i]);
    engine_finish(e);
    uint64_t attempts = cs[0].attempts + cs[1].attempts;
    if (cancelled == 0 || ran == 0)
        printf("  b: note: the race was one-sided this time (ran %ld, cancelled %ld)\n", ran, cancelled);
    free(tasks);
    free(slots);
    printf("  %s: %ld tasks: %ld ran (%llu by claimers), %ld cancelled (%llu cancel calls by 2 threads, %llu too "
           "late), %llu stolen: %.2fs\n", g_b_claim ? "g" : "b", n, ran,
           (unsigned long long)(cs[0].claims + cs[1].claims), cancelled, (unsigned long long)attempts,
           (unsigned long long)(attempts - (uint64_t)cancelled), (unsigned long long)stolen, dt);
}

/* (g) as (b), and the racing threads also claim queued tasks and run them themselves (a worker
 * waiting for a task runs it: ct_engine_claim), against workers popping and threads cancelling:
 * each task still runs once or is cancelled, never both, and the counters add up. */
static void test_g(void) {
    g_b_claim = 1;
    test_b();
    g_b_claim = 0;
}

/* ------------------------------------------------------------------ (c) waiting */

#define NWAITERS 4
#define NPROD_C 2

typedef struct ctx_c {
    ct_engine *e;
    slot_t *slots;
    _Atomic(ct_task *) *tasks;   /* published before submit: waits may start on PENDING nodes */
    long n;
    double wait_timeout_s;
    _Atomic int abort;
    _Atomic uint64_t waits, slow_waits;
} ctx_c;

typedef struct arg_c {
    ctx_c *c;
    int id;
} arg_c;

static void *producer_c(void *arg) {
    arg_c *a = arg;
    ctx_c *c = a->c;
    uint64_t rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)(a->id + 11) * 0xBF58476D1CE4E5B9ull;
    for (long i = a->id; i < c->n && !atomic_load(&c->abort); i += NPROD_C) {
        c->slots[i].spin = (uint32_t)(rng_next(&rng) % 4096);
        maybe_slow(&c->slots[i], &rng);
        ct_task *t = task_make(&c->slots[i], (int)(rng_next(&rng) % CT_NPRIO));
        ct_task_incref(t);   /* the test's reference, dropped at the end */
        atomic_store_explicit(&c->tasks[i], t, memory_order_release);
        int rc = ct_engine_submit(c->e, t, -1);
        if (rc != CT_OK) {
            FAIL("ct_engine_submit returned %d", rc);
            atomic_store(&c->abort, 1);
            ct_task_decref(NULL, t);   /* the engine's; ours stays */
        }
        /* now and then a burst of ten without a pause, else a short breather so waiters
         * often arrive before the worker does */
        if (rng_next(&rng) % 10 == 0) sched_yield();
    }
    return NULL;
}

static void *waiter_c(void *arg) {
    arg_c *a = arg;
    ctx_c *c = a->c;
    /* two waiters per task: task i is waited on by threads i % NWAITERS and (i + 1) % NWAITERS */
    for (long i = 0; i < c->n && !atomic_load(&c->abort); i++) {
        if (i % NWAITERS != a->id && (i + 1) % NWAITERS != a->id) continue;
        ct_task *t;
        uint64_t pub_deadline = deadline_in_s(g_timeout_s * 0.5);
        while ((t = atomic_load_explicit(&c->tasks[i], memory_order_acquire)) == NULL) {
            if (atomic_load(&c->abort)) return NULL;
            if (ct_now_ns() > pub_deadline) {
                FAIL("task %ld was never published (producer stuck?)", i);
                atomic_store(&c->abort, 1);
                return NULL;
            }
            sched_yield();
        }
        uint64_t t0 = ct_now_ns();
        int rc = ct_task_wait(t, deadline_in_s(c->wait_timeout_s));
        uint64_t waited = ct_now_ns() - t0;
        atomic_fetch_add_explicit(&c->waits, 1, memory_order_relaxed);
        if (waited > 1000000000ull) atomic_fetch_add_explicit(&c->slow_waits, 1, memory_order_relaxed);
        /* ct_park_wait re-checks the state at its deadline: a missed wake-up returns CT_OK
         * then, so a wait that lasted until the deadline is a failure as well */
        if (rc != CT_OK || (double)waited >= c->wait_timeout_s * 0.95e9) {
            ct_stats st;
            ct_engine_get_stats(c->e, &st);
            FAIL("ct_task_wait on task %ld returned %d after %.1fs (its deadline); status %u, state 0x%x, "
                 "queued %lld, running %lld (lost wake-up?)",
                 i, rc, (double)waited / 1e9, ct_task_status(t), atomic_load(&t->state),
                 (long long)st.queued_total, (long long)st.running);
            atomic_store(&c->abort, 1);
            return NULL;
        }
        uint32_t st = ct_task_status(t);
        if (st != CT_SUCCEEDED) FAIL("task %ld: ct_task_wait returned CT_OK but status is %u", i, st);
        else if (c->slots[i].plain != MAGIC)
            FAIL("task %ld: its write is not visible after ct_task_wait", i);
        else if (atomic_load_explicit(&c->slots[i].runs, memory_order_relaxed) != 1)
            FAIL("task %ld: ran %u times", i, atomic_load(&c->slots[i].runs));
    }
    return NULL;
}

static void test_c(void) {
    long n = g_n / 10;
    if (n < 1000) n = 1000;
    if (n > 100000) n = 100000;
    ctx_c c;
    memset(&c, 0, sizeof c);
    c.slots = xcalloc((size_t)n, sizeof *c.slots);
    c.tasks = xcalloc((size_t)n, sizeof *c.tasks);
    c.n = n;
    c.wait_timeout_s = g_timeout_s / 4.0 < 5 ? g_timeout_s / 4.0 : 5;
    c.e = engine_make(NWORKERS, QUEUE_SIZE);
    pthread_t pth[NPROD_C], wth[NWAITERS];
    arg_c pa[NPROD_C], wa[NWAITERS];
    double t0 = now_s();
    for (int w = 0; w < NWAITERS; w++) {
        wa[w] = (arg_c){&c, w};
        start_thread(&wth[w], waiter_c, &wa[w]);
    }
    for (int p = 0; p < NPROD_C; p++) {
        pa[p] = (arg_c){&c, p};
        start_thread(&pth[p], producer_c, &pa[p]);
    }
    for (int p = 0; p < NPROD_C; p++) pthread_join(pth[p], NULL);
    for (int w = 0; w < NWAITERS; w++) pthread_join(wth[w], NULL);
    engine_drain_or_die(c.e, "test c");
    double dt = now_s() - t0;
    long submitted = 0;
    for (long i = 0; i < n; i++) {
        ct_task *t = atomic_load(&c.tasks[i]);
        if (!t) continue;
        submitted++;
        CHECK(atomic_load(&c.slots[i].runs) == 1, "task %ld ran %u times", i, atomic_load(&c.slots[i].runs));
    }
    if (!atomic_load(&c.abort)) check_stats(c.e, (uint64_t)n, (uint64_t)n, 0);
    for (long i = 0; i < n; i++) {
        ct_task *t = atomic_load(&c.tasks[i]);
        if (t) ct_task_decref(NULL, t);
    }
    engine_finish(c.e);
    printf("  c: %ld tasks, %llu waits by %d threads (%llu took over 1s): %.2fs\n", submitted,
           (unsigned long long)atomic_load(&c.waits), NWAITERS, (unsigned long long)atomic_load(&c.slow_waits), dt);
    free(c.tasks);
    free(c.slots);
}

/* ------------------------------------------------------------------ (d) pause, full, close */

typedef struct blocked_submit {
    ct_engine *e;
    ct_task *t;
    int64_t block_ns;
    _Atomic int done;
    int rc;
} blocked_submit;

static void *blocked_submitter(void *arg) {
    blocked_submit *b = arg;
    b->rc = ct_engine_submit(b->e, b->t, b->block_ns);
    atomic_store(&b->done, 1);
    return NULL;
}

static long count_runs(slot_t *slots, long n) {
    long r = 0;
    for (long i = 0; i < n; i++) r += atomic_load(&slots[i].runs);
    return r;
}

static void test_d(void) {
    enum { CAP = 1000, M = 500, K = 300, DIRECT = 10 };
    /* slots: [0, CAP) fill the queue, CAP: blocked submitter, [CAP+1, CAP+1+K): cancel_queued,
     * then DIRECT direct cancels, then CAP for the close phase, then one blocked at close */
    const long nslots = CAP + 1 + K + DIRECT + CAP + 1 + 8;
    slot_t *slots = xcalloc((size_t)nslots, sizeof *slots);
    ct_task **tasks = xcalloc((size_t)nslots, sizeof *tasks);
    uint64_t submitted = 0, succeeded = 0, cancelled = 0;
    ct_stats st;
    ct_engine *e = engine_make(NWORKERS, CAP);
    double t0 = now_s();

    /* 1. paused: nothing runs, tasks stay queued */
    sleep_ms(20);   /* the workers reach their sleep */
    ct_engine_pause(e, 1);
    for (long i = 0; i < M; i++) {
        tasks[i] = task_make(&slots[i], (int)(i % CT_NPRIO));
        ct_task_incref(tasks[i]);
        int rc = ct_engine_submit(e, tasks[i], -1);
        if (rc != CT_OK) FATAL("submit to a paused engine with room returned %d", rc);
        submitted++;
    }
    sleep_ms(50);
    CHECK(count_runs(slots, M) == 0, "%ld tasks ran while the engine was paused", count_runs(slots, M));
    ct_engine_get_stats(e, &st);
    CHECK(st.paused == 1, "stats.paused = %d while paused", st.paused);
    CHECK(st.queued_total == M, "stats.queued_total = %lld while paused, expected %d", (long long)st.queued_total, M);
    CHECK(st.running == 0, "stats.running = %lld while paused", (long long)st.running);
    int rc = ct_task_wait(tasks[0], deadline_in_s(0.03));
    CHECK(rc == CT_ETIMEDOUT, "ct_task_wait on a task of a paused engine returned %d, expected CT_ETIMEDOUT", rc);
    CHECK(ct_task_status(tasks[0]) == CT_PENDING, "status of a queued task is %u", ct_task_status(tasks[0]));
    rc = ct_engine_drain(e, deadline_in_s(0.03));
    CHECK(rc == CT_ETIMEDOUT, "ct_engine_drain of a paused engine with work returned %d, expected CT_ETIMEDOUT", rc);

    /* 2. full: fill to queue_size, then the non-blocking, timed and all-or-none paths */
    for (long i = M; i < CAP; i++) {
        tasks[i] = task_make(&slots[i], (int)(i % CT_NPRIO));
        ct_task_incref(tasks[i]);
        rc = ct_engine_submit(e, tasks[i], 0);
        if (rc != CT_OK) FATAL("submit below queue_size returned %d", rc);
        submitted++;
    }
    slot_t spare;
    memset(&spare, 0, sizeof spare);
    ct_task *x = task_make(&spare, 1);
    rc = ct_engine_submit(e, x, 0);
    CHECK(rc == CT_EFULL, "submit(block=0) on a full engine returned %d, expected CT_EFULL", rc);
    uint64_t tb = ct_now_ns();
    rc = ct_engine_submit(e, x, 20000000);   /* 20 ms */
    uint64_t waited = ct_now_ns() - tb;
    CHECK(rc == CT_ETIMEDOUT || rc == CT_EFULL, "submit(block=20ms) on a full engine returned %d", rc);
    CHECK(waited >= 15000000, "submit(block=20ms) on a full engine gave up after %.1f ms", (double)waited / 1e6);
    ct_task *two[2] = {x, task_make(&spare, 2)};
    rc = ct_engine_submit_many(e, two, 2, 0);
    CHECK(rc == CT_EFULL, "submit_many(2, block=0) on a full engine returned %d, expected CT_EFULL", rc);
    ct_task_decref(NULL, two[1]);
    CHECK(atomic_load(&spare.runs) == 0, "a rejected task ran");
    ct_engine_get_stats(e, &st);
    CHECK(st.rejected >= 3, "stats.rejected = %llu after 3 rejected submits", (unsigned long long)st.rejected);
    CHECK(st.queued_total == CAP, "stats.queued_total = %lld at queue_size %d", (long long)st.queued_total, CAP);

    /* 3. a producer blocked on the full paused engine gets through after resume */
    blocked_submit bs = {.e = e, .t = task_make(&slots[CAP], 0), .block_ns = -1};
    pthread_t bth;
    start_thread(&bth, blocked_submitter, &bs);
    sleep_ms(50);
    CHECK(!atomic_load(&bs.done), "submit(block=-1) on a full paused engine returned %d at once", bs.rc);
    ct_engine_pause(e, 0);
    pthread_join(bth, NULL);
    CHECK(bs.rc == CT_OK, "blocked submit returned %d after resume, expected CT_OK", bs.rc);
    if (bs.rc == CT_OK) submitted++;
    else ct_task_decref(NULL, bs.t);
    engine_drain_or_die(e, "test d after resume");
    succeeded = (uint64_t)CAP + (bs.rc == CT_OK);
    for (long i = 0; i <= CAP; i++) {
        if (i == CAP && bs.rc != CT_OK) break;
        CHECK(atomic_load(&slots[i].runs) == 1, "task %ld ran %u times after resume", i, atomic_load(&slots[i].runs));
        CHECK(slots[i].plain == MAGIC, "task %ld: its write is not visible after drain", i);
        if (i < CAP) CHECK(ct_task_status(tasks[i]) == CT_SUCCEEDED, "task %ld status %u", i, ct_task_status(tasks[i]));
    }
    /* the timed-out/rejected node is still ours and never ran */
    CHECK(atomic_load(&spare.runs) == 0, "a rejected task ran");
    ct_task_decref(NULL, x);

    /* 4. cancel_queued cancels what is queued (paused so nothing is taken meanwhile) */
    ct_engine_pause(e, 1);
    sleep_ms(10);
    long base = CAP + 1;
    for (long i = base; i < base + K; i++) {
        tasks[i] = task_make(&slots[i], (int)(i % CT_NPRIO));
        ct_task_incref(tasks[i]);
        rc = ct_engine_submit(e, tasks[i], -1);
        if (rc != CT_OK) FATAL("submit returned %d", rc);
        submitted++;
    }
    size_t nc = ct_engine_cancel_queued(e);
    CHECK(nc == K, "ct_engine_cancel_queued returned %zu, expected %d", nc, K);
    cancelled += nc;
    ct_engine_get_stats(e, &st);
    CHECK(st.queued_total == 0 && st.running == 0, "after cancel_queued: queued %lld, running %lld",
          (long long)st.queued_total, (long long)st.running);

    /* 5. direct cancels of queued tasks: once only */
    long dbase = base + K;
    for (long i = dbase; i < dbase + DIRECT; i++) {
        tasks[i] = task_make(&slots[i], (int)(i % CT_NPRIO));
        ct_task_incref(tasks[i]);
        rc = ct_engine_submit(e, tasks[i], -1);
        if (rc != CT_OK) FATAL("submit returned %d", rc);
        submitted++;
    }
    for (long i = dbase; i < dbase + DIRECT; i += 2) {
        rc = ct_task_cancel(e, tasks[i]);
        CHECK(rc == 1, "ct_task_cancel on a queued task returned %d", rc);
        rc = ct_task_cancel(e, tasks[i]);
        CHECK(rc == 0, "second ct_task_cancel on the same task returned %d", rc);
        cancelled++;
    }
    ct_engine_pause(e, 0);
    engine_drain_or_die(e, "test d after cancels");
    for (long i = base; i < dbase + DIRECT; i++) {
        int should_run = i >= dbase && (i - dbase) % 2 == 1;
        CHECK((long)atomic_load(&slots[i].runs) == should_run, "task %ld ran %u times, expected %d", i,
              atomic_load(&slots[i].runs), should_run);
        uint32_t s = ct_task_status(tasks[i]);
        CHECK(s == (should_run ? CT_SUCCEEDED : CT_CANCELLED), "task %ld status %u", i, s);
        rc = ct_task_wait(tasks[i], deadline_in_s(1));
        CHECK(rc == CT_OK, "ct_task_wait on a finished task returned %d", rc);
        if (should_run) succeeded++;
    }
    check_stats(e, submitted, succeeded, cancelled);

    /* 5b. batch stealing: a worker blocked on one task; its batch-mates run on idle siblings */
    {
        enum { F = 20 };
        slot_t blocker, fs[F];
        memset(&blocker, 0, sizeof blocker);
        memset(fs, 0, sizeof fs);
        blocker.sleep_us = 300000;
        ct_task *bt[F + 1];
        ct_engine_pause(e, 1);
        sleep_ms(10);
        bt[0] = task_make(&blocker, 0);   /* first in the FIFO: heads the batch */
        ct_task_incref(bt[0]);
        for (int j = 0; j < F; j++) bt[1 + j] = task_make(&fs[j], 0);
        ct_task *blocker_task = bt[0];
        rc = ct_engine_submit_many(e, bt, F + 1, -1);
        if (rc != CT_OK) FATAL("submit_many returned %d", rc);
        submitted += F + 1;
        uint64_t stolen0 = engine_stolen(e);
        ct_engine_pause(e, 0);
        uint64_t limit = deadline_in_s(5);
        while (ct_task_status(blocker_task) == CT_PENDING && ct_now_ns() < limit) usleep(200);
        long done = 0;
        while (ct_now_ns() < limit) {
            done = 0;
            for (int j = 0; j < F; j++) done += atomic_load(&fs[j].runs);
            if (done == F || ct_task_status(blocker_task) != CT_RUNNING) break;
            usleep(500);
        }
        CHECK(done == F, "only %ld of %d batch-mates of a task blocked for 300 ms ran before it finished "
              "(idle workers did not steal them)", done, F);
        engine_drain_or_die(e, "test d, stealing");
        succeeded += F + 1;
        CHECK(atomic_load(&blocker.runs) == 1, "the blocking task ran %u times", atomic_load(&blocker.runs));
        for (int j = 0; j < F; j++)
            CHECK(atomic_load(&fs[j].runs) == 1, "batch-mate %d ran %u times", j, atomic_load(&fs[j].runs));
        printf("  d: %llu tasks stolen from a blocked worker's batch\n",
               (unsigned long long)(engine_stolen(e) - stolen0));
        ct_task_decref(NULL, blocker_task);
    }
    check_stats(e, submitted, succeeded, cancelled);

    /* 5c. cancel_queued also cancels the not-started rest of a worker's batch */
    {
        enum { F = 20 };
        slot_t blocker, fs[F];
        memset(&blocker, 0, sizeof blocker);
        memset(fs, 0, sizeof fs);
        blocker.sleep_us = 100000;
        ct_engine *e1 = engine_make(1, 100);   /* one worker: nobody steals */
        ct_task *bt[F + 1], *keep[F + 1];
        ct_engine_pause(e1, 1);
        sleep_ms(10);
        for (int j = 0; j <= F; j++) {
            bt[j] = keep[j] = task_make(j ? &fs[j - 1] : &blocker, 0);
            ct_task_incref(bt[j]);
        }
        rc = ct_engine_submit_many(e1, bt, F + 1, -1);
        if (rc != CT_OK) FATAL("submit_many returned %d", rc);
        ct_engine_pause(e1, 0);
        uint64_t limit = deadline_in_s(5);
        while (ct_task_status(keep[0]) == CT_PENDING && ct_now_ns() < limit) usleep(200);
        CHECK(ct_task_status(keep[0]) == CT_RUNNING, "the blocking task is not running (status %u)",
              ct_task_status(keep[0]));
        size_t ncb = ct_engine_cancel_queued(e1);
        CHECK(ncb == F, "ct_engine_cancel_queued with %d tasks left in a busy worker's batch returned %zu", F, ncb);
        engine_drain_or_die(e1, "test d, cancel_queued of a batch");
        CHECK(atomic_load(&blocker.runs) == 1, "the blocking task ran %u times", atomic_load(&blocker.runs));
        for (int j = 0; j < F; j++) {
            CHECK(atomic_load(&fs[j].runs) == 0, "batch-mate %d ran after cancel_queued", j);
            CHECK(ct_task_status(keep[j + 1]) == CT_CANCELLED, "batch-mate %d: status %u after cancel_queued", j,
                  ct_task_status(keep[j + 1]));
        }
        check_stats(e1, F + 1, 1, F);
        engine_finish(e1);
        for (int j = 0; j <= F; j++) ct_task_decref(NULL, keep[j]);
    }

    /* 6. close: queued work still runs, a blocked producer is released, new submits refused */
    ct_engine_pause(e, 1);
    sleep_ms(10);
    long cbase = dbase + DIRECT;
    for (long i = cbase; i < cbase + CAP; i++) {
        tasks[i] = task_make(&slots[i], (int)(i % CT_NPRIO));
        ct_task_incref(tasks[i]);
        rc = ct_engine_submit(e, tasks[i], -1);
        if (rc != CT_OK) FATAL("submit returned %d", rc);
        submitted++;
    }
    long blk = cbase + CAP;
    blocked_submit bs2 = {.e = e, .t = task_make(&slots[blk], 3), .block_ns = -1};
    start_thread(&bth, blocked_submitter, &bs2);
    sleep_ms(50);
    CHECK(!atomic_load(&bs2.done), "submit(block=-1) on a full paused engine returned %d at once", bs2.rc);
    ct_engine_close(e);
    pthread_join(bth, NULL);
    CHECK(bs2.rc == CT_ESHUTDOWN, "a submit blocked across close returned %d, expected CT_ESHUTDOWN", bs2.rc);
    if (bs2.rc == CT_OK) submitted++, succeeded++;
    else ct_task_decref(NULL, bs2.t);   /* refused: still ours */
    ct_task *late = task_make(&slots[blk + 1], 0);
    rc = ct_engine_submit(e, late, -1);
    CHECK(rc == CT_ESHUTDOWN, "submit after close returned %d, expected CT_ESHUTDOWN", rc);
    rc = ct_engine_submit(e, late, 0);
    CHECK(rc == CT_ESHUTDOWN, "submit(block=0) after close returned %d, expected CT_ESHUTDOWN", rc);
    ct_task *late2[2] = {late, task_make(&slots[blk + 2], 1)};
    rc = ct_engine_submit_many(e, late2, 2, -1);
    CHECK(rc == CT_ESHUTDOWN, "submit_many after close returned %d, expected CT_ESHUTDOWN", rc);
    ct_task_decref(NULL, late2[0]);
    ct_task_decref(NULL, late2[1]);
    ct_engine_get_stats(e, &st);
    CHECK(st.accepting == 0, "stats.accepting = %d after close", st.accepting);
    ct_engine_pause(e, 0);
    engine_drain_or_die(e, "test d after close");   /* CT_OK, or a fatal failure */
    for (long i = cbase; i < cbase + CAP; i++)
        CHECK(atomic_load(&slots[i].runs) == 1, "task %ld queued before close ran %u times", i,
              atomic_load(&slots[i].runs));
    succeeded += CAP;
    for (long i = blk; i < blk + 3; i++)
        CHECK(atomic_load(&slots[i].runs) == 0, "refused task %ld ran", i);
    check_stats(e, submitted, succeeded, cancelled);
    rc = ct_engine_drain(e, 0);
    CHECK(rc == CT_OK, "second ct_engine_drain returned %d", rc);

    /* 7. stop_workers joins (a hang here is caught by the watchdog); then free */
    ct_engine_stop_workers(e);
    ct_engine_free(e);
    for (long i = 0; i < nslots; i++)
        if (tasks[i]) ct_task_decref(NULL, tasks[i]);
    free(tasks);
    free(slots);
    printf("  d: pause/resume, full queue, blocked submit, cancel_queued, cancel, stealing, close, drain, stop, "
           "free: %.2fs\n",
           now_s() - t0);
}

/* ------------------------------------------------------------------ (f) rejected submits

 * Opt-in (run with TESTS containing f): submitters that give up on CT_EFULL (block_ns = 0)
 * race with the worker and with drain / blocked producers. A rejected submit takes back a
 * reservation it briefly held in engine->queued; whoever looked at queued in that window (the
 * last finishing task, a drain, a blocked producer) must still be woken. A drain or a timed
 * submit that returns only at its deadline although the engine went idle is a lost wake-up. */

#define NHAMMER 6
static _Atomic int g_f_go, g_f_stop, g_f_quit;
static slot_t g_f_slot;   /* all hammer tasks share it: only runs is used (atomically) */

static void *hammer_f(void *arg) {
    ct_engine *e = arg;
    ct_task *t = task_make(&g_f_slot, 2);
    while (!atomic_load(&g_f_quit)) {
        while (!atomic_load(&g_f_go) && !atomic_load(&g_f_quit)) sched_yield();
        while (!atomic_load(&g_f_stop))
            if (ct_engine_submit(e, t, 0) == CT_OK) t = task_make(&g_f_slot, 2);
    }
    ct_task_decref(NULL, t);
    return NULL;
}

static void test_f(void) {
    enum { ITERS = 200 };
    const double limit_ms = 100;
    ct_engine *e = engine_make(1, 1);
    pthread_t th[NHAMMER];
    int lost_drain = 0, lost_space = 0;
    double t0 = now_s();
    for (int i = 0; i < NHAMMER; i++) start_thread(&th[i], hammer_f, e);
    for (int it = 0; it < ITERS; it++) {
        atomic_store(&g_f_stop, 0);
        atomic_store(&g_f_go, 1);
        usleep(200 + (unsigned)(it * 37 % 300));
        atomic_store(&g_f_stop, 1);
        atomic_store(&g_f_go, 0);
        uint64_t t1 = ct_now_ns();
        uint64_t limit = t1 + (uint64_t)(limit_ms * 1e6);
        if (it % 2 == 0) {
            /* the drain: nothing is left but the rejected submits' transient reservations */
            int rc = ct_engine_drain(e, limit);
            double ms = (double)(ct_now_ns() - t1) / 1e6;
            if (rc != CT_OK || ms >= limit_ms * 0.95) {
                if (lost_drain++ < 3)
                    FAIL("iteration %d: ct_engine_drain returned %d after %.1f ms (its deadline) with queued=%lld "
                         "running=%lld: not woken after a rejected submit took its reservation back",
                         it, rc, ms, (long long)atomic_load(&e->queued), (long long)atomic_load(&e->running));
            }
        } else {
            /* a blocked producer: queue_size 1, the queue is empty or about to be */
            ct_task *t = task_make(&g_f_slot, 1);
            int rc = ct_engine_submit(e, t, (int64_t)(limit_ms * 1e6));
            double ms = (double)(ct_now_ns() - t1) / 1e6;
            if (rc != CT_OK) ct_task_decref(NULL, t);
            if (ms >= limit_ms * 0.95) {
                if (lost_space++ < 3)
                    FAIL("iteration %d: submit(block=%.0fms) returned %d only at its deadline with an idle "
                         "engine (queued=%lld running=%lld): a blocked producer was not woken after a rejected "
                         "submit took its reservation back",
                         it, limit_ms, rc, (long long)atomic_load(&e->queued),
                         (long long)atomic_load(&e->running));
            }
            engine_drain_or_die(e, "test f");
        }
    }
    atomic_store(&g_f_quit, 1);
    for (int i = 0; i < NHAMMER; i++) pthread_join(th[i], NULL);
    engine_finish(e);
    printf("  f: %d iterations with %d give-up submitters: %d drains and %d blocked submits woken only by "
           "their deadline: %.2fs\n", ITERS, NHAMMER, lost_drain, lost_space, now_s() - t0);
}

/* ------------------------------------------------------------------ (e) slab */

static void test_e(void) {
    int64_t in_use = atomic_load(&ct_task_slab.in_use);
    CHECK(in_use == 0, "ct_task_slab.in_use = %lld after every engine and node is gone (leaked or double-freed nodes)",
          (long long)in_use);
    printf("  e: slab in_use %lld, %zu KiB taken from the system\n", (long long)in_use,
           atomic_load(&ct_task_slab.chunk_bytes) / 1024);
}

/* ------------------------------------------------------------------ main */

typedef struct test {
    char key;
    const char *name;
    void (*fn)(void);
} test;

static const test TESTS[] = {
    {'a', "a: every task runs exactly once (producers, workers, full queue, submit_many)", test_a},
    {'b', "b: cancellation race (ran once xor cancelled)", test_b},
    {'c', "c: ct_task_wait while workers finish (no lost wake-ups)", test_c},
    {'d', "d: pause/resume, full queue, cancel_queued, close, drain, stop, free", test_d},
    {'f', "f: rejected submits do not strand drain or blocked producers", test_f},
    {'g', "g: claims by waiters race with workers and cancels (ran once xor cancelled)", test_g},
    {'e', "e: slab in_use back to 0", test_e},
};

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1) {
        char *end;
        g_n = strtol(argv[1], &end, 10);
        if (*end || g_n < 100) {
            fprintf(stderr, "usage: %s [N>=100 [TESTS]]   (TESTS: subset of abcdefg; default abcdefg)\n", argv[0]);
            return 2;
        }
    }
    const char *which = argc > 2 ? argv[2] : "abcdefg";
    const char *to = getenv("STRESS_TIMEOUT");
    if (to && atoi(to) > 0) g_timeout_s = (unsigned)atoi(to);
    signal(SIGALRM, on_alarm);
    if (ct_engine_global_init() != CT_OK) {
        fprintf(stderr, "ct_engine_global_init failed\n");
        return 2;
    }
    printf("stress_engine: N=%ld, tests %s, watchdog %us per test\n", g_n, which, g_timeout_s);
    for (size_t k = 0; k < sizeof TESTS / sizeof TESTS[0]; k++) {
        if (!strchr(which, TESTS[k].key)) continue;
        g_current = TESTS[k].name;
        atomic_store(&g_fail, 0);
        alarm(g_timeout_s);
        double t0 = now_s();
        TESTS[k].fn();
        alarm(0);
        long f = atomic_load(&g_fail);
        if (f == 0) {
            g_passed++;
            printf("[PASS] %s (%.2fs)\n", TESTS[k].name, now_s() - t0);
        } else {
            g_failed++;
            printf("[FAIL] %s: %ld failed checks (%.2fs)\n", TESTS[k].name, f, now_s() - t0);
        }
    }
    printf("stress_engine: %d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}

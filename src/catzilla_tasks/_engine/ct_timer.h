/* ct_timer.h - the engine's timer: a min-heap of deadlines served by one thread.
 *
 * Delayed tasks, retry back-offs and task timeouts all wait here, never in a thread of their
 * own. The thread sleeps on a condvar until the earliest deadline (or until an earlier one is
 * added); nothing polls. Entries own one reference on their task node. */
#ifndef CT_TIMER_H
#define CT_TIMER_H

#include "ct_common.h"
#include <pthread.h>

struct ct_task;

enum ct_timer_kind {
    CT_TIMER_READY = 0,    /* the task is due: move it into its priority queue */
    CT_TIMER_TIMEOUT = 1,  /* the task's attempt `token` ran out of time */
    CT_TIMER_STUCK = 2,    /* the attempt still runs after its timeout fired: replace its worker */
    CT_TIMER_CALL = 3,     /* call the node's callable on the timer thread (periodic ticks) */
};

typedef struct ct_timer_entry {
    uint64_t due;
    struct ct_task *task;
    uint32_t kind;
    uint32_t token;
} ct_timer_entry;

/* Called on the timer thread, with no lock held, for each due entry. */
typedef void (*ct_timer_fire_fn)(void *ctx, ct_timer_entry *entry);

typedef struct ct_timer {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    ct_timer_entry *heap;     /* guarded by lock */
    size_t n, cap;
    int stopping;             /* guarded by lock */
    int started;
    pthread_t thread;
    ct_timer_fire_fn fire;
    void *ctx;
    void (*thread_start)(void *ctx);   /* optional: e.g. create a Python thread state */
    void (*thread_stop)(void *ctx);
    _Atomic uint64_t fired;
} ct_timer;

void ct_timer_init(ct_timer *tm, ct_timer_fire_fn fire, void *ctx);
/* Add an entry (starts the thread on first use). CT_OK or CT_ENOMEM. */
int ct_timer_add(ct_timer *tm, uint64_t due, struct ct_task *task, uint32_t kind, uint32_t token);
/* Make every READY entry of task due now. Returns how many entries were changed. */
size_t ct_timer_expedite(ct_timer *tm, struct ct_task *task);
/* Entries not yet fired. */
size_t ct_timer_pending(ct_timer *tm);
/* Remove every entry for which dead(ctx, entry) is true; their tasks are returned in *out (a
 * malloc'd array the caller frees) so the caller can drop their references. Returns how many. */
size_t ct_timer_remove_if(ct_timer *tm, int (*dead)(const ct_timer_entry *entry), struct ct_task ***out);
/* Stop the thread; entries still in the heap are handed to drop (with no lock held). */
void ct_timer_stop(ct_timer *tm, void (*drop)(void *ctx, ct_timer_entry *entry));
void ct_timer_destroy(ct_timer *tm);

#endif

/* ct_timer.c - see ct_timer.h. */
#include "ct_timer.h"
#include "ct_sync.h"

#include <stdlib.h>

#define CT_TIMER_FIRE_BATCH 256

static void heap_swap(ct_timer_entry *a, ct_timer_entry *b) {
    ct_timer_entry t = *a;
    *a = *b;
    *b = t;
}

static void heap_up(ct_timer_entry *h, size_t i) {
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p].due <= h[i].due) break;
        heap_swap(&h[p], &h[i]);
        i = p;
    }
}

static void heap_down(ct_timer_entry *h, size_t n, size_t i) {
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && h[l].due < h[m].due) m = l;
        if (r < n && h[r].due < h[m].due) m = r;
        if (m == i) return;
        heap_swap(&h[m], &h[i]);
        i = m;
    }
}

void ct_timer_init(ct_timer *tm, ct_timer_fire_fn fire, void *ctx) {
    pthread_mutex_init(&tm->lock, NULL);
    ct_cond_init(&tm->cond);
    tm->heap = NULL;
    tm->n = tm->cap = 0;
    tm->stopping = 0;
    tm->started = 0;
    tm->fire = fire;
    tm->ctx = ctx;
    tm->thread_start = tm->thread_stop = NULL;
    atomic_store(&tm->fired, 0);
}

static void *ct_timer_main(void *arg) {
    ct_timer *tm = arg;
    ct_timer_entry due[CT_TIMER_FIRE_BATCH];
    if (tm->thread_start) tm->thread_start(tm->ctx);
    pthread_mutex_lock(&tm->lock);
    for (;;) {
        if (tm->stopping) break;
        if (tm->n == 0) {
            pthread_cond_wait(&tm->cond, &tm->lock);
            continue;
        }
        uint64_t now = ct_now_ns();
        if (tm->heap[0].due > now) {
            struct timespec ts = ct_deadline_ts(tm->heap[0].due);
            pthread_cond_timedwait(&tm->cond, &tm->lock, &ts);
            continue;   /* re-read the top: an earlier entry may have been added */
        }
        size_t k = 0;
        while (tm->n && tm->heap[0].due <= now && k < CT_TIMER_FIRE_BATCH) {
            due[k++] = tm->heap[0];
            tm->heap[0] = tm->heap[--tm->n];
            heap_down(tm->heap, tm->n, 0);
        }
        pthread_mutex_unlock(&tm->lock);
        for (size_t i = 0; i < k; i++) tm->fire(tm->ctx, &due[i]);
        atomic_fetch_add_explicit(&tm->fired, k, memory_order_relaxed);
        pthread_mutex_lock(&tm->lock);
    }
    pthread_mutex_unlock(&tm->lock);
    if (tm->thread_stop) tm->thread_stop(tm->ctx);
    return NULL;
}

int ct_timer_add(ct_timer *tm, uint64_t due, struct ct_task *task, uint32_t kind, uint32_t token) {
    pthread_mutex_lock(&tm->lock);
    if (tm->stopping) {
        pthread_mutex_unlock(&tm->lock);
        return CT_ESHUTDOWN;
    }
    if (!tm->started) {
        if (pthread_create(&tm->thread, NULL, ct_timer_main, tm) != 0) {
            pthread_mutex_unlock(&tm->lock);
            return CT_ENOMEM;
        }
        tm->started = 1;
    }
    if (tm->n == tm->cap) {
        size_t cap = tm->cap ? tm->cap * 2 : 256;
        ct_timer_entry *h = realloc(tm->heap, cap * sizeof *h);
        if (!h) {
            pthread_mutex_unlock(&tm->lock);
            return CT_ENOMEM;
        }
        tm->heap = h;
        tm->cap = cap;
    }
    size_t i = tm->n++;
    tm->heap[i] = (ct_timer_entry){due, task, kind, token};
    heap_up(tm->heap, i);
    /* only an entry that became the earliest changes when the thread must wake */
    if (tm->heap[0].task == task && tm->heap[0].due == due) pthread_cond_signal(&tm->cond);
    pthread_mutex_unlock(&tm->lock);
    return CT_OK;
}

size_t ct_timer_expedite(ct_timer *tm, struct ct_task *task) {
    size_t changed = 0;
    pthread_mutex_lock(&tm->lock);
    for (size_t i = 0; i < tm->n; i++) {
        if (tm->heap[i].task == task && tm->heap[i].kind == CT_TIMER_READY && tm->heap[i].due > 0) {
            tm->heap[i].due = 0;
            heap_up(tm->heap, i);
            changed++;
        }
    }
    if (changed) pthread_cond_signal(&tm->cond);
    pthread_mutex_unlock(&tm->lock);
    return changed;
}

size_t ct_timer_remove_if(ct_timer *tm, int (*dead)(const ct_timer_entry *entry), struct ct_task ***out) {
    *out = NULL;
    pthread_mutex_lock(&tm->lock);
    size_t ndead = 0;
    for (size_t i = 0; i < tm->n; i++) ndead += dead(&tm->heap[i]) != 0;
    struct ct_task **removed = ndead ? malloc(ndead * sizeof *removed) : NULL;
    if (!removed) {
        pthread_mutex_unlock(&tm->lock);
        return 0;
    }
    size_t k = 0, j = 0;
    for (size_t i = 0; i < tm->n; i++) {
        if (k < ndead && dead(&tm->heap[i]))
            removed[k++] = tm->heap[i].task;
        else
            tm->heap[j++] = tm->heap[i];
    }
    tm->n = j;
    for (size_t i = j / 2 + 1; i-- > 0;) heap_down(tm->heap, tm->n, i);
    pthread_cond_signal(&tm->cond);   /* the earliest deadline may have changed */
    pthread_mutex_unlock(&tm->lock);
    *out = removed;
    return k;
}

size_t ct_timer_pending(ct_timer *tm) {
    pthread_mutex_lock(&tm->lock);
    size_t n = tm->n;
    pthread_mutex_unlock(&tm->lock);
    return n;
}

void ct_timer_stop(ct_timer *tm, void (*drop)(void *ctx, ct_timer_entry *entry)) {
    pthread_mutex_lock(&tm->lock);
    tm->stopping = 1;
    pthread_cond_signal(&tm->cond);
    int started = tm->started;
    pthread_mutex_unlock(&tm->lock);
    if (started) pthread_join(tm->thread, NULL);
    pthread_mutex_lock(&tm->lock);
    ct_timer_entry *h = tm->heap;
    size_t n = tm->n;
    tm->heap = NULL;
    tm->n = tm->cap = 0;
    pthread_mutex_unlock(&tm->lock);
    for (size_t i = 0; i < n; i++)
        if (drop) drop(tm->ctx, &h[i]);
    free(h);
}

void ct_timer_destroy(ct_timer *tm) {
    pthread_mutex_destroy(&tm->lock);
    pthread_cond_destroy(&tm->cond);
    free(tm->heap);
    tm->heap = NULL;
}

/* ct_hist.h - log-linear latency histograms, one per worker (no shared cache line on the hot
 * path: the owner stores, readers load and merge).
 *
 * Bucket i covers [lo(i), lo(i+1)) nanoseconds: four buckets per power of two from 1 us up
 * (bucket 0 also takes everything below 1 us), 128 buckets reach ~18 minutes; the relative
 * error of a percentile read from it is below 25 %, enough to tell 10 ms from 15 ms. */
#ifndef CT_HIST_H
#define CT_HIST_H

#include "ct_common.h"

#define CT_HIST_BUCKETS 128
#define CT_HIST_MIN_EXP 10   /* 2^10 ns ~ 1 us */

typedef struct ct_hist {
    _Atomic uint64_t count[CT_HIST_BUCKETS];
    _Atomic uint64_t sum_ns;
    _Atomic uint64_t n;
} ct_hist;

static inline int ct_hist_bucket(uint64_t ns) {
    if (ns < (1ull << CT_HIST_MIN_EXP)) return 0;
    int e = 63 - __builtin_clzll(ns);                   /* 2^e <= ns < 2^(e+1) */
    int sub = (int)((ns >> (e - 2)) & 3);               /* which quarter of that octave */
    int i = (e - CT_HIST_MIN_EXP) * 4 + sub + 1;
    return i < CT_HIST_BUCKETS ? i : CT_HIST_BUCKETS - 1;
}

/* Upper bound (exclusive) of bucket i, in ns. */
static inline uint64_t ct_hist_upper(int i) {
    if (i == 0) return 1ull << CT_HIST_MIN_EXP;
    int e = (i - 1) / 4 + CT_HIST_MIN_EXP, sub = (i - 1) % 4;
    return (1ull << e) + (uint64_t)(sub + 1) * (1ull << (e - 2));
}

/* Single writer (the owning thread): plain load + store, no locked instruction. */
static inline void ct_hist_record_owner(ct_hist *h, uint64_t ns) {
    _Atomic uint64_t *c = &h->count[ct_hist_bucket(ns)];
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1, memory_order_relaxed);
    atomic_store_explicit(&h->sum_ns, atomic_load_explicit(&h->sum_ns, memory_order_relaxed) + ns, memory_order_relaxed);
    atomic_store_explicit(&h->n, atomic_load_explicit(&h->n, memory_order_relaxed) + 1, memory_order_relaxed);
}

/* Many writers. */
static inline void ct_hist_record_shared(ct_hist *h, uint64_t ns) {
    atomic_fetch_add_explicit(&h->count[ct_hist_bucket(ns)], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_ns, ns, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->n, 1, memory_order_relaxed);
}

/* Per-second task counts over the last CT_RATE_SLOTS seconds (owner writes). */
#define CT_RATE_SLOTS 64
typedef struct ct_rate {
    _Atomic uint64_t epoch[CT_RATE_SLOTS];   /* second number the slot counts */
    _Atomic uint64_t count[CT_RATE_SLOTS];
} ct_rate;

static inline void ct_rate_record_owner(ct_rate *r, uint64_t now_ns) {
    uint64_t sec = now_ns / 1000000000ull;
    int s = (int)(sec % CT_RATE_SLOTS);
    if (atomic_load_explicit(&r->epoch[s], memory_order_relaxed) != sec) {
        atomic_store_explicit(&r->count[s], 0, memory_order_relaxed);
        atomic_store_explicit(&r->epoch[s], sec, memory_order_relaxed);
    }
    atomic_store_explicit(&r->count[s], atomic_load_explicit(&r->count[s], memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

#endif

/* ct_sync.h - a parking lot: a thread waits for a 32-bit state word to reach a condition and
 * is woken by the thread that changes it.
 *
 * Why not a condvar per task: it would cost 48+ bytes in every node, and almost no task is
 * waited on. Waiters hash the word's address onto one of CT_PARK_STRIPES mutex+condvar pairs
 * and set a flag bit in the word; the writer only touches a stripe when that flag is set. */
#ifndef CT_SYNC_H
#define CT_SYNC_H

#include "ct_common.h"
#include <pthread.h>

#define CT_PARK_STRIPES 64

/* Init a condvar whose timed waits take ct_deadline_ts() deadlines (CLOCK_MONOTONIC on Linux;
 * see ct_common.h for the portable build). */
void ct_cond_init(pthread_cond_t *c);

typedef int (*ct_park_ready_fn)(uint32_t state);

/* Block until ready(*word) or until deadline_ns (0 = no deadline). Sets flag in *word before
 * each sleep. Returns CT_OK or CT_ETIMEDOUT. Call with no locks held (and no GIL). */
int ct_park_wait(_Atomic uint32_t *word, uint32_t flag, ct_park_ready_fn ready, uint64_t deadline_ns);

/* After changing *word: wake everyone parked on it. Call only if the old value had the flag. */
void ct_park_wake(_Atomic uint32_t *word);

#endif

/* ct_common.h - small shared helpers of the engine core: clocks, branch hints, cache lines.
 * The core (ct_*.c) never includes Python.h, so it builds alone for the C stress tests. */
#ifndef CT_COMMON_H
#define CT_COMMON_H

#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>
#include <time.h>

#define CT_LIKELY(x) __builtin_expect(!!(x), 1)
#define CT_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define CT_CACHELINE 64
#define CT_ALIGNED _Alignas(CT_CACHELINE)

/* Monotonic nanoseconds: all engine timestamps use this clock (vDSO, ~20 ns). */
static inline uint64_t ct_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The longest time the engine represents: 100 years. Waits, delays, timeouts and back-offs
 * are all kept below it, so now + any of them never overflows 64 bits; a longer limit means
 * "no limit" (a longer delay is refused by the bindings). */
#define CT_MAX_TIME_NS INT64_C(3155760000000000000)

/* Deadline ns from now for a wait; 0 (no deadline) when ns is past CT_MAX_TIME_NS. */
static inline uint64_t ct_deadline_after(uint64_t ns) {
    return ns > (uint64_t)CT_MAX_TIME_NS ? 0 : ct_now_ns() + ns;
}

/* Portability. Linux has everything the core wants; elsewhere (macOS has no
 * pthread_condattr_setclock and no gettid) small fallbacks take over. -DCT_FORCE_PORTABLE selects
 * the fallbacks on Linux too: scripts/sanitizer-tests builds the C stress test that way, so the
 * portable paths are compiled and exercised on every CI run. */
#if defined(__linux__) && !defined(CT_FORCE_PORTABLE)
#define CT_COND_MONOTONIC 1 /* condvars wait on CLOCK_MONOTONIC (ct_cond_init) */
#define CT_HAVE_GETTID 1
#else
#define CT_COND_MONOTONIC 0 /* condvars wait on CLOCK_REALTIME, the POSIX default */
#define CT_HAVE_GETTID 0
#endif

/* The absolute deadline for pthread_cond_timedwait on a condvar made by ct_cond_init, from a
 * ct_now_ns() deadline. Without a monotonic condvar clock the remaining time is added to the
 * wall clock: a wall-clock jump can then end a wait early (every caller re-checks ct_now_ns()
 * and waits again) or late (by the size of a backward jump, the portable build's limit). */
static inline struct timespec ct_deadline_ts(uint64_t deadline_ns) {
    struct timespec ts;
#if CT_COND_MONOTONIC
    ts.tv_sec = (time_t)(deadline_ns / 1000000000ull);
    ts.tv_nsec = (long)(deadline_ns % 1000000000ull);
#else
    uint64_t now = ct_now_ns(), left = deadline_ns > now ? deadline_ns - now : 0;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t nsec = (uint64_t)ts.tv_nsec + left % 1000000000ull;
    ts.tv_sec += (time_t)(left / 1000000000ull + nsec / 1000000000ull);
    ts.tv_nsec = (long)(nsec % 1000000000ull);
#endif
    return ts;
}

/* Return codes of the core API. */
enum {
    CT_OK = 0,
    CT_EFULL = -1,      /* queue_size reached and the caller did not ask to block */
    CT_ESHUTDOWN = -2,  /* the engine no longer accepts tasks */
    CT_ETIMEDOUT = -3,  /* a blocking call ran out of time */
    CT_ENOMEM = -4,
    CT_EINVAL = -5,
};

#endif

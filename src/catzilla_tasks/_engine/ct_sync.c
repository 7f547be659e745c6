/* ct_sync.c - see ct_sync.h. */
#include "ct_sync.h"

typedef struct ct_stripe {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    char pad[CT_CACHELINE - (sizeof(pthread_mutex_t) + sizeof(pthread_cond_t)) % CT_CACHELINE];
} ct_stripe;

static ct_stripe ct_stripes[CT_PARK_STRIPES];
static pthread_once_t ct_stripes_once = PTHREAD_ONCE_INIT;

void ct_cond_init(pthread_cond_t *c) {
#if CT_COND_MONOTONIC
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(c, &attr);
    pthread_condattr_destroy(&attr);
#else
    pthread_cond_init(c, NULL); /* CLOCK_REALTIME: ct_deadline_ts converts */
#endif
}

static void ct_stripes_init(void) {
    for (int i = 0; i < CT_PARK_STRIPES; i++) {
        pthread_mutex_init(&ct_stripes[i].lock, NULL);
        ct_cond_init(&ct_stripes[i].cond);
    }
}

static ct_stripe *ct_stripe_of(const void *addr) {
    uintptr_t h = (uintptr_t)addr;
    h ^= h >> 17;
    h *= 0x9E3779B97F4A7C15ull;
    return &ct_stripes[(h >> 40) % CT_PARK_STRIPES];
}

int ct_park_wait(_Atomic uint32_t *word, uint32_t flag, ct_park_ready_fn ready, uint64_t deadline_ns) {
    if (ready(atomic_load_explicit(word, memory_order_acquire))) return CT_OK;
    pthread_once(&ct_stripes_once, ct_stripes_init);
    ct_stripe *s = ct_stripe_of(word);
    int rc = CT_OK;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        /* Setting the flag and re-reading are one RMW: either the writer's change comes after
         * it (the writer sees the flag and takes this stripe's lock, which we hold until
         * cond_wait releases it) or we see the change here. No lost wake-up. */
        uint32_t v = atomic_fetch_or_explicit(word, flag, memory_order_acq_rel);
        if (ready(v)) break;
        if (deadline_ns) {
            struct timespec ts = ct_deadline_ts(deadline_ns);
            if (pthread_cond_timedwait(&s->cond, &s->lock, &ts) != 0 && ct_now_ns() >= deadline_ns) {
                rc = ready(atomic_load_explicit(word, memory_order_acquire)) ? CT_OK : CT_ETIMEDOUT;
                break;
            }
        } else {
            pthread_cond_wait(&s->cond, &s->lock);
        }
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

void ct_park_wake(_Atomic uint32_t *word) {
    pthread_once(&ct_stripes_once, ct_stripes_init);
    ct_stripe *s = ct_stripe_of(word);
    pthread_mutex_lock(&s->lock);
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

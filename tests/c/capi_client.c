/* capi_client.c - a small extension-like library that uses catzilla_tasks' C API, built by
 * tests/test_capi.py with the system compiler and loaded with ctypes.
 *
 * cz_init is called with the GIL (ctypes.PyDLL); cz_submit runs without it (ctypes.CDLL)
 * and submits from plain pthreads that have never touched Python. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "catzilla_tasks.h"

static const CatzillaTasks_CAPI *api;
static CatzillaTasks_Engine *engine;
static _Atomic long counter;
static _Atomic long slots_sum;

static void bump(void *data) { atomic_fetch_add_explicit(&counter, 1, memory_order_relaxed); }
static void add_slot(void *data) { atomic_fetch_add_explicit(&slots_sum, (long)(intptr_t)data, memory_order_relaxed); }

int cz_init(PyObject *tasks) {
    api = CatzillaTasks_Import();
    if (!api) return -1;
    engine = api->get_engine(tasks);
    return engine ? 0 : -1;
}

struct job {
    long n;
    int priority;
    long failures;
    int first_error;
};

static void *producer(void *arg) {
    struct job *j = arg;
    for (long i = 0; i < j->n; i++) {
        int rc = api->submit(engine, bump, NULL, j->priority, -1, NULL);
        if (rc != CATZILLA_TASKS_OK) {
            if (!j->failures) j->first_error = rc;
            j->failures++;
        }
    }
    return NULL;
}

/* Submit n tasks from `threads` new pthreads; returns the number of failed submits, and the
 * first error code through *first_error. */
long cz_submit(long n, int threads, int priority, int *first_error) {
    pthread_t th[64];
    struct job jobs[64];
    if (threads < 1 || threads > 64) return -1;
    long failures = 0;
    *first_error = 0;
    for (int i = 0; i < threads; i++) {
        jobs[i] = (struct job){n / threads + (i < n % threads), priority, 0, 0};
        pthread_create(&th[i], NULL, producer, &jobs[i]);
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        failures += jobs[i].failures;
        if (!*first_error) *first_error = jobs[i].first_error;
    }
    return failures;
}

/* submit_many: values 1..n, their sum lands in slots_sum. */
int cz_submit_many(long n, int priority) {
    void **data = malloc(sizeof(void *) * (size_t)n);
    for (long i = 0; i < n; i++) data[i] = (void *)(intptr_t)(i + 1);
    int rc = api->submit_many(engine, add_slot, data, (size_t)n, priority, 0);
    free(data);
    return rc;
}

long cz_count(void) { return atomic_load(&counter); }
long cz_slots_sum(void) { return atomic_load(&slots_sum); }
const char *cz_strerror(int rc) { return api->strerror(rc); }

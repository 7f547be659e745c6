/* catzilla_tasks.h - the C-level API of catzilla_tasks, for other extensions.
 *
 * Submit C tasks (void fn(void *data)) to a BackgroundTasks engine from any thread, with or
 * without the GIL. The task runs on the engine's worker threads with no GIL held.
 *
 *     #include "catzilla_tasks.h"
 *     const CatzillaTasks_CAPI *api = CatzillaTasks_Import();      // GIL held; NULL + error
 *     CatzillaTasks_Engine *eng = api->get_engine(tasks_object);  // GIL held; NULL + error
 *     int rc = api->submit(eng, my_fn, my_data, CATZILLA_TASKS_NORMAL, 0, NULL);  // any thread
 *
 * Keep a reference to the Python BackgroundTasks object for as long as you use its engine
 * pointer. After shutdown, submit returns CATZILLA_TASKS_ESHUTDOWN. */
#ifndef CATZILLA_TASKS_H
#define CATZILLA_TASKS_H

#include <Python.h>
#include <stdint.h>

#define CATZILLA_TASKS_CAPI_NAME "catzilla_tasks._engine._C_API"
#define CATZILLA_TASKS_CAPI_VERSION 1

enum {
    CATZILLA_TASKS_CRITICAL = 0,
    CATZILLA_TASKS_HIGH = 1,
    CATZILLA_TASKS_NORMAL = 2,
    CATZILLA_TASKS_LOW = 3,
};

/* submit's return codes */
enum {
    CATZILLA_TASKS_OK = 0,
    CATZILLA_TASKS_EFULL = -1,      /* queue_size reached (block_ns == 0) */
    CATZILLA_TASKS_ESHUTDOWN = -2,  /* engine shut down */
    CATZILLA_TASKS_ETIMEDOUT = -3,  /* still full after block_ns */
    CATZILLA_TASKS_ENOMEM = -4,
    CATZILLA_TASKS_EINVAL = -5,
};

/* The longest time the engine represents (100 years, in ns); longer waits have no limit. */
#define CATZILLA_TASKS_MAX_TIME_NS INT64_C(3155760000000000000)

typedef struct CatzillaTasks_Engine CatzillaTasks_Engine;

typedef struct CatzillaTasks_CAPI {
    int version;
    CatzillaTasks_Engine *(*get_engine)(PyObject *tasks);
    /* block_ns: 0 = fail at once when full, < 0 = wait for room, > 0 = wait up to that long
     * (past 100 years, CATZILLA_TASKS_MAX_TIME_NS: without limit, as an infinite timeout is
     * in Python).
     * id_out (may be NULL) receives the task's numeric id. */
    int (*submit)(CatzillaTasks_Engine *engine, void (*fn)(void *data), void *data, int priority,
                  int64_t block_ns, uint64_t *id_out);
    /* n tasks fn(data[i]) in one call: all are queued or none (room is reserved at once). */
    int (*submit_many)(CatzillaTasks_Engine *engine, void (*fn)(void *data), void *const *data,
                       size_t n, int priority, int64_t block_ns);
    const char *(*strerror)(int code);
} CatzillaTasks_CAPI;

static inline const CatzillaTasks_CAPI *CatzillaTasks_Import(void) {
    const CatzillaTasks_CAPI *api = (const CatzillaTasks_CAPI *)PyCapsule_Import(CATZILLA_TASKS_CAPI_NAME, 0);
    if (api && api->version < CATZILLA_TASKS_CAPI_VERSION) {
        PyErr_SetString(PyExc_ImportError, "catzilla_tasks C API is older than this header");
        return NULL;
    }
    return api;
}

#endif

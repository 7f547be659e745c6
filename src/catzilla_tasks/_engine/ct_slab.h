/* ct_slab.h - fixed-size object allocator with per-thread free lists.
 *
 * Why: a task node is allocated by the submitting thread and freed by a worker. glibc's
 * malloc/free of 64-128 bytes costs ~12 ns plus cross-thread arena traffic; a thread-local
 * free list costs ~1 ns. Objects move between threads in batches through one global stack
 * guarded by a mutex, so the lock is taken once per CT_SLAB_BATCH objects.
 * Memory is carved from large chunks and kept for the life of the process (a task engine
 * reaches a steady state; returning chunks to the OS would need per-chunk accounting). */
#ifndef CT_SLAB_H
#define CT_SLAB_H

#include "ct_common.h"
#include <pthread.h>

#define CT_SLAB_MAX 4          /* distinct slabs in one process (thread caches are per slab) */
#define CT_SLAB_BATCH 64       /* objects moved between a thread cache and the global stack */

typedef struct ct_slab {
    size_t obj_size;
    int index;                          /* slot of this slab in each thread's cache array */
    pthread_mutex_t lock;
    void *batches;                      /* global stack of full batches (guarded by lock) */
    size_t nbatches;
    void *spare;                        /* loose objects from exited threads (guarded by lock) */
    size_t nspare;
    void *chunks;                       /* every chunk ever carved (guarded by lock) */
    size_t carved;                      /* objects carved from chunks so far (guarded by lock) */
    char *carve_ptr, *carve_end;        /* rest of the newest chunk (guarded by lock) */
    _Atomic size_t chunk_bytes;         /* memory taken from the system */
    _Atomic int64_t in_use;             /* objects handed out and not yet freed */
} ct_slab;

/* Initialise a process-wide slab. Returns CT_OK or CT_EINVAL when CT_SLAB_MAX slabs exist. */
int ct_slab_init(ct_slab *slab, size_t obj_size);
void *ct_slab_alloc(ct_slab *slab);
void ct_slab_free(ct_slab *slab, void *obj);
/* Give this thread's cached objects back to the global stacks (also done at thread exit of
 * every thread that allocated or freed an object). */
void ct_slab_flush_thread(void);

/* Where the slab's objects are: handed out, free in threads' caches, free on the global
 * stacks (a snapshot: in_use and the caches move without the lock). */
typedef struct ct_slab_stats {
    size_t chunk_bytes;
    int64_t in_use, cached, free_global;
} ct_slab_stats;
void ct_slab_get_stats(ct_slab *slab, ct_slab_stats *out);

#endif

/* ct_slab.c - see ct_slab.h. */
#include "ct_slab.h"

#include <stdlib.h>
#include <string.h>

/* Under AddressSanitizer a free object is poisoned past its 16-byte free-list header, so a
 * use after free of a task node is reported even though the memory is never returned. */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define CT_POISON(p, n) ASAN_POISON_MEMORY_REGION((char *)(p) + sizeof(ct_free), (n) - sizeof(ct_free))
#define CT_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((char *)(p) + sizeof(ct_free), (n) - sizeof(ct_free))
#else
#define CT_POISON(p, n) ((void)(p), (void)(n))
#define CT_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define CT_SLAB_CHUNK (256 * 1024)
#define CT_SLAB_CACHE_MAX (2 * CT_SLAB_BATCH)

/* A free object is reused as this header. A batch on the global stack is a chain of exactly
 * CT_SLAB_BATCH objects linked by next; batches are linked by next_batch of their first. */
typedef struct ct_free {
    struct ct_free *next;
    struct ct_free *next_batch;
} ct_free;

typedef struct ct_cache {
    ct_free *head;
    size_t count;
} ct_cache;

static ct_slab *ct_slabs[CT_SLAB_MAX];
static _Atomic int ct_nslabs;
static _Thread_local ct_cache ct_tl_cache[CT_SLAB_MAX];
static _Thread_local int ct_tl_registered;
static pthread_key_t ct_tl_key;
static pthread_once_t ct_tl_once = PTHREAD_ONCE_INIT;

static void ct_tl_destructor(void *unused) { ct_slab_flush_thread(); }
static void ct_tl_key_init(void) { pthread_key_create(&ct_tl_key, ct_tl_destructor); }

/* First use of the slabs on a thread: ask for a destructor so the cache is handed back when
 * the thread exits (Python threads come and go; their cached nodes must not be stranded). */
static void ct_tl_register(void) {
    pthread_once(&ct_tl_once, ct_tl_key_init);
    pthread_setspecific(ct_tl_key, (void *)1);
    ct_tl_registered = 1;
}

/* fork(): no slab lock may be held by another thread at that instant, or the child (which
 * has only the forking thread) would wait for it forever on its first refill. */
static void ct_slab_fork_prepare(void) {
    int n = atomic_load(&ct_nslabs);
    for (int i = 0; i < n && i < CT_SLAB_MAX; i++)
        if (ct_slabs[i]) pthread_mutex_lock(&ct_slabs[i]->lock);
}

static void ct_slab_fork_done(void) {
    int n = atomic_load(&ct_nslabs);
    for (int i = (n < CT_SLAB_MAX ? n : CT_SLAB_MAX) - 1; i >= 0; i--)
        if (ct_slabs[i]) pthread_mutex_unlock(&ct_slabs[i]->lock);
}

static pthread_once_t ct_fork_once = PTHREAD_ONCE_INIT;
static void ct_fork_register(void) { pthread_atfork(ct_slab_fork_prepare, ct_slab_fork_done, ct_slab_fork_done); }

int ct_slab_init(ct_slab *slab, size_t obj_size) {
    pthread_once(&ct_fork_once, ct_fork_register);
    int idx = atomic_fetch_add(&ct_nslabs, 1);
    if (idx >= CT_SLAB_MAX) return CT_EINVAL;
    memset(slab, 0, sizeof *slab);
    if (obj_size < sizeof(ct_free)) obj_size = sizeof(ct_free);
    slab->obj_size = (obj_size + 7) & ~(size_t)7;   /* 8-byte alignment: nodes hold only 8-byte fields */
    slab->index = idx;
    pthread_mutex_init(&slab->lock, NULL);
    ct_slabs[idx] = slab;
    return CT_OK;
}

/* Refill an empty thread cache: a full batch from the global stack, else loose objects,
 * else fresh objects carved from a chunk. */
static void ct_slab_refill(ct_slab *slab, ct_cache *c) {
    ct_free *head = NULL;
    size_t n = 0;
    pthread_mutex_lock(&slab->lock);
    if (slab->batches) {
        head = slab->batches;
        slab->batches = head->next_batch;
        slab->nbatches--;
        n = CT_SLAB_BATCH;
    } else {
        while (slab->spare && n < CT_SLAB_BATCH) {
            ct_free *o = slab->spare;
            slab->spare = o->next;
            slab->nspare--;
            o->next = head;
            head = o;
            n++;
        }
        while (n < CT_SLAB_BATCH) {
            if (slab->carve_ptr + slab->obj_size > slab->carve_end) {
                char *chunk = malloc(CT_SLAB_CHUNK);
                if (!chunk) break;
                /* the first 16 bytes link the chunk list; objects follow, 8-aligned */
                *(void **)chunk = slab->chunks;
                slab->chunks = chunk;
                slab->carve_ptr = chunk + 16;
                slab->carve_end = chunk + CT_SLAB_CHUNK;
                atomic_fetch_add_explicit(&slab->chunk_bytes, CT_SLAB_CHUNK, memory_order_relaxed);
            }
            ct_free *o = (ct_free *)slab->carve_ptr;
            slab->carve_ptr += slab->obj_size;
            slab->carved++;
            o->next = head;
            CT_POISON(o, slab->obj_size);
            head = o;
            n++;
        }
    }
    pthread_mutex_unlock(&slab->lock);
    c->head = head;
    c->count = n;
}

void *ct_slab_alloc(ct_slab *slab) {
    ct_cache *c = &ct_tl_cache[slab->index];
    if (CT_UNLIKELY(c->count == 0)) {
        if (CT_UNLIKELY(!ct_tl_registered)) ct_tl_register();
        ct_slab_refill(slab, c);
        if (c->count == 0) return NULL;
    }
    ct_free *o = c->head;
    c->head = o->next;
    c->count--;
    CT_UNPOISON(o, slab->obj_size);
    atomic_fetch_add_explicit(&slab->in_use, 1, memory_order_relaxed);
    return o;
}

/* Move the first CT_SLAB_BATCH objects of a cache to the global stack as one batch. */
static void ct_slab_give_batch(ct_slab *slab, ct_cache *c) {
    ct_free *first = c->head, *last = first;
    for (size_t i = 1; i < CT_SLAB_BATCH; i++) last = last->next;
    c->head = last->next;
    last->next = NULL;
    c->count -= CT_SLAB_BATCH;
    pthread_mutex_lock(&slab->lock);
    first->next_batch = slab->batches;
    slab->batches = first;
    slab->nbatches++;
    pthread_mutex_unlock(&slab->lock);
}

void ct_slab_free(ct_slab *slab, void *obj) {
    ct_cache *c = &ct_tl_cache[slab->index];
    ct_free *o = obj;
    /* A thread that only frees (it drops the last handle of tasks it never made) holds objects
     * too: its cache must be handed back when it exits, like an allocating thread's. */
    if (CT_UNLIKELY(!ct_tl_registered)) ct_tl_register();
    CT_POISON(o, slab->obj_size);
    o->next = c->head;
    c->head = o;
    c->count++;
    atomic_fetch_sub_explicit(&slab->in_use, 1, memory_order_relaxed);
    if (CT_UNLIKELY(c->count >= CT_SLAB_CACHE_MAX)) ct_slab_give_batch(slab, c);
}

void ct_slab_flush_thread(void) {
    int n = atomic_load(&ct_nslabs);
    if (n > CT_SLAB_MAX) n = CT_SLAB_MAX;
    for (int i = 0; i < n; i++) {
        ct_slab *slab = ct_slabs[i];
        ct_cache *c = &ct_tl_cache[i];
        if (!slab) continue;
        while (c->count >= CT_SLAB_BATCH) ct_slab_give_batch(slab, c);
        if (c->count == 0) continue;
        /* the rest is shorter than a batch: hand it over as loose objects */
        ct_free *last = c->head;
        while (last->next) last = last->next;
        pthread_mutex_lock(&slab->lock);
        last->next = slab->spare;
        slab->spare = c->head;
        slab->nspare += c->count;
        pthread_mutex_unlock(&slab->lock);
        c->head = NULL;
        c->count = 0;
    }
}

void ct_slab_get_stats(ct_slab *slab, ct_slab_stats *out) {
    pthread_mutex_lock(&slab->lock);
    int64_t carved = (int64_t)slab->carved;
    int64_t free_global = (int64_t)(slab->nbatches * CT_SLAB_BATCH + slab->nspare);
    size_t bytes = atomic_load_explicit(&slab->chunk_bytes, memory_order_relaxed);
    pthread_mutex_unlock(&slab->lock);
    int64_t in_use = atomic_load_explicit(&slab->in_use, memory_order_relaxed);
    int64_t cached = carved - free_global - in_use;   /* (in_use moves meanwhile: clamp) */
    out->chunk_bytes = bytes;
    out->in_use = in_use > 0 ? in_use : 0;
    out->free_global = free_global;
    out->cached = cached > 0 ? cached : 0;
}
